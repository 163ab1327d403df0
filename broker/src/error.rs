//! The one error type of the broker crate.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while loading `broker.toml` or running the embedded broker.
///
/// Configuration errors name the file (`origin`) and the key, so an operator can fix the file
/// without reading code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The configuration file could not be read.
    #[error("cannot read broker config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a value has the wrong type / a required key is missing.
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    /// A key that neither printloop nor rumqttd knows (rumqttd itself would silently ignore it).
    #[error("{origin}: unknown key `{key}`")]
    UnknownKey { origin: String, key: String },
    /// A key is present and well-typed but its value cannot work.
    #[error("{origin}: `{key}`: {reason}")]
    Invalid {
        origin: String,
        key: String,
        reason: String,
    },
    /// A listener key such as `v4.1` that the configuration does not have.
    #[error("no listener `{key}` in the broker config (have: {have})")]
    UnknownListener { key: String, have: String },
    /// The configuration could not be written back as TOML.
    #[error("cannot serialise the broker config: {0}")]
    Serialize(String),
    /// Finding a free loopback port failed.
    #[error("cannot find a free port on {ip}: {source}")]
    FreePort {
        ip: std::net::IpAddr,
        #[source]
        source: std::io::Error,
    },
    /// A listener's address is already taken (checked just before rumqttd binds it).
    #[error("listener `{listener}` cannot bind {addr}: {source}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The broker thread could not be spawned.
    #[error("cannot spawn the broker thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// rumqttd returned from `Broker::start` (all its listeners died) or failed to start.
    #[error("rumqttd stopped: {0}")]
    Stopped(String),
    /// A listener did not answer within the readiness timeout.
    #[error("listener `{listener}` on {addr} was not ready within {timeout:?}: {last_error}")]
    NotReady {
        listener: String,
        addr: SocketAddr,
        timeout: Duration,
        last_error: String,
    },
    /// rumqttd refused a local (in-process) link.
    #[error("cannot create local link `{client_id}`: {reason}")]
    Link { client_id: String, reason: String },
}
