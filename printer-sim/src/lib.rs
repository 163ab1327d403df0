//! Marlin printer simulator (placeholder doc, rewritten below).
pub mod cli;
mod config;
mod error;
pub mod firmware;
mod gcode;
mod heater;
mod rng;
mod shell;

pub use config::SimConfig;
pub use error::SimError;
pub use firmware::{Fault, Firmware, Phase, Progress, Stats, TempStatus};
pub use rng::SplitMix64;
pub use shell::{SimControl, SimHandle, SimStats, Simulator};
