//! printloop's wire contract. No IO and no clock: time is always passed in.
pub mod marlin;
