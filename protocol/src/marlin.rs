//! Marlin host-protocol codec (owned by the simulator work).
