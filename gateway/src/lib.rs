//! The edge gateway: one per printer. Owns the serial link and the printer's truth, keeps it
//! durable, and stays autonomous when the network is gone.
//!
//! - [`machine`]: the decisions, a pure state machine (no IO, no clock).
//! - [`store`]: the durable state (redb).
//! - [`link`] and [`serial`]: the Marlin host driver (sans-IO) and its serial-port task.
//! - [`printer`]: streams verified files into the link and reports to the machine.
//! - [`files`]: the file cache on disk.
//! - [`run`]: the process: one loop that feeds the machine and carries out what it decides.
//! - [`config`]: the TOML file and the broker URL.
//! - [`firstboot`]: the Pi image's first-boot file (`printloop-gateway firstboot`).

pub mod config;
pub mod files;
pub mod firstboot;
pub mod link;
pub mod machine;
pub mod printer;
pub mod run;
pub mod serial;
pub mod store;
pub mod streamer;
