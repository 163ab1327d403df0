//! The embedded MQTT broker: rumqttd 0.20 configured from `broker.toml`.
//!
//! - [`BrokerConfig`] reads `broker.toml` strictly (unknown keys, missing listeners and unusable
//!   values are errors that name the file and the key) and can move listeners to other ports.
//! - [`EmbeddedBroker`] runs rumqttd on its own threads and returns once every listener answers.
//!   rumqttd has no shutdown API: an embedded broker serves until the process exits.
//! - [`clients`] is the client registry (`clients.toml`): who may log in, with which role; the
//!   embedded broker checks it on every listener beyond loopback, and it writes Mosquitto's
//!   password file and topic ACL.
//! - [`cli::run`] is `printloop broker`.
//!
//! See `docs/broker.md` for the rumqttd limitations the rest of printloop is built to survive.
pub mod cli;
pub mod clients;
mod config;
mod embedded;
mod error;

pub use config::{free_port, BrokerConfig, Listener, ListenerKind};
pub use embedded::{EmbeddedBroker, PreparedBroker, DEFAULT_READY_TIMEOUT};
pub use error::BrokerError;
/// The rumqttd version this crate wraps, for types such as `rumqttd::local::LinkTx`.
pub use rumqttd;
