//! `printloop broker` (placeholder until the broker lands).
use std::path::PathBuf;

/// Arguments of `printloop broker`.
#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    /// The broker configuration file.
    #[arg(long, default_value = "broker.toml")]
    pub config: PathBuf,
}

/// Runs the broker until the process is stopped.
pub fn run(_args: BrokerArgs) -> Result<(), std::io::Error> {
    Err(std::io::Error::other("broker not built yet"))
}
