//! In-process rumqttd for tests, from the shipped `broker.toml` on free ports.
use std::path::PathBuf;

use broker::{BrokerConfig, BrokerError, ListenerKind};

use crate::Result;

/// The `broker.toml` at the root of the repository, as shipped.
pub fn shipped_broker_toml() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("broker.toml")
}

/// rumqttd running in the test process. rumqttd has no shutdown API: the broker keeps serving
/// until the test process exits, even after this handle is dropped. Each test gets its own
/// broker on its own ports, so leftovers do not interfere.
#[derive(Debug)]
pub struct EmbeddedBroker {
    inner: broker::EmbeddedBroker,
}

impl EmbeddedBroker {
    /// The shipped `broker.toml` on free loopback ports.
    pub fn start() -> Result<Self> {
        Self::start_with(BrokerConfig::load(shipped_broker_toml())?)
    }

    /// `config` with every listener moved to a free port (retried if another process takes a
    /// port first).
    pub fn start_with(config: BrokerConfig) -> Result<Self> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match broker::EmbeddedBroker::start(config.clone().with_free_ports()?) {
                Ok(inner) => return Ok(EmbeddedBroker { inner }),
                Err(BrokerError::Bind { .. }) if attempt < 3 => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The first MQTT 3.1.1 listener's port; panics if the config has none.
    pub fn v4_port(&self) -> u16 {
        self.port(ListenerKind::V4)
    }

    /// The first MQTT 5 listener's port; panics if the config has none.
    pub fn v5_port(&self) -> u16 {
        self.port(ListenerKind::V5)
    }

    fn port(&self, kind: ListenerKind) -> u16 {
        match self.inner.addr(kind) {
            Some(addr) => addr.port(),
            None => panic!("the embedded broker has no {} listener", kind.section()),
        }
    }

    /// The broker crate's handle.
    pub fn inner(&self) -> &broker::EmbeddedBroker {
        &self.inner
    }
}
