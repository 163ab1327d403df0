//! Marlin printer simulator.
