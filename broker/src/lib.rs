//! Embedded rumqttd.
pub mod cli;
