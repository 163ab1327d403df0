//! Sans-IO Marlin host driver (in progress).
