//! `printloop broker`: run the embedded broker from a `broker.toml` until the process ends.
use std::path::PathBuf;

use crate::{BrokerConfig, BrokerError, EmbeddedBroker};

/// Arguments of `printloop broker`.
#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    /// The broker configuration file.
    #[arg(long, default_value = "broker.toml")]
    pub config: PathBuf,
    /// The client registry (`clients.toml`, written by `printloop printers add` and
    /// `printloop clients add`): logins on listeners beyond loopback are checked against it.
    /// Without it, such listeners refuse every client but `broker.toml`'s static `auth` map.
    #[arg(long)]
    pub clients: Option<PathBuf>,
}

/// Loads the configuration, starts rumqttd, logs its listeners and blocks.
///
/// Returns only with an error: a bad configuration, a listener that cannot bind or does not
/// answer, or rumqttd stopping. Stop the broker by ending the process (SIGINT/SIGTERM): rumqttd
/// keeps nothing on disk, so there is nothing to flush.
pub fn run(args: BrokerArgs) -> Result<(), BrokerError> {
    let mut config = BrokerConfig::load(&args.config)?;
    if let Some(path) = &args.clients {
        let auth = crate::clients::Authenticator::new(Some(path.clone()), None).map_err(|e| {
            BrokerError::Invalid {
                origin: args.config.display().to_string(),
                key: "--clients".into(),
                reason: e.to_string(),
            }
        })?;
        config.set_authenticator(std::sync::Arc::new(auth));
    }
    let broker = EmbeddedBroker::start(config)?;
    for listener in broker.listeners() {
        tracing::info!(
            listener = %listener.config_key(),
            name = %listener.name,
            addr = %listener.addr,
            protocol = listener.kind.section(),
            tls = listener.tls,
            "broker listening"
        );
    }
    tracing::info!(config = %args.config.display(), "broker ready");
    broker.wait()
}
