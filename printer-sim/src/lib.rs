//! Marlin printer simulator.
pub mod cli;
