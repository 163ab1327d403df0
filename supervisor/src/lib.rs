//! The supervisor: the one place where fleet decisions are made.
//!
//! - [`machine`]: the reactive loop, a pure state machine (no IO, no clock).
//! - [`model`]: the durable records and the mutations the machine emits.
//! - [`store`]: the redb database that holds them.
//! - [`files`]: content-addressed G-code storage: uploads in, chunks out.
//! - [`ha`]: Home Assistant MQTT discovery configs and button presses (pure).
//! - [`history`]: the archive of ended jobs that left the store (JSON lines by month).

pub mod cli;
pub mod files;
pub mod ha;
pub mod history;
pub mod http;
pub mod machine;
pub mod model;
pub mod operator;
pub mod run;
pub mod store;
