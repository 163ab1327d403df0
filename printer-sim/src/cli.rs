//! `printloop sim` (placeholder until the simulator lands).
use std::path::PathBuf;

/// Arguments of `printloop sim`.
#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Where to link the pseudo-terminal's device path.
    #[arg(long)]
    pub link: PathBuf,
}

/// Runs the simulator until Ctrl-C.
pub async fn run(_args: SimArgs) -> Result<(), std::io::Error> {
    Err(std::io::Error::other("simulator not built yet"))
}
