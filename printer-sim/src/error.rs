//! Errors of the simulator.
use std::path::PathBuf;

/// What can go wrong when running a simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A knob is out of range (the message names it).
    #[error("invalid simulator config: {0}")]
    Config(String),
    /// The pseudo-terminal could not be created or configured.
    #[error("pseudo-terminal: {0}")]
    Pty(#[source] nix::Error),
    /// The device link could not be made or removed.
    #[error("device link {path}: {source}")]
    Link {
        /// The link path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the pseudo-terminal failed.
    #[error("pseudo-terminal IO: {0}")]
    Io(#[from] std::io::Error),
    /// The simulator task has stopped; the control request was not carried out.
    #[error("the simulator has stopped")]
    Stopped,
    /// A bounded wait ran out.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The request does not fit the current state (e.g. `replug` while plugged in).
    #[error("{0}")]
    InvalidState(&'static str),
}
