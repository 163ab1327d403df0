//! One MQTT connection for a CLI command: rumqttc's event loop runs in the shared forwarding
//! task (`transport::forward`); the caller subscribes and publishes through the [`AsyncClient`].

use std::hash::BuildHasher as _;
use std::time::Duration;

use protocol::ClientId;
use rumqttc::{AsyncClient, MqttOptions, QoS, SubscribeReasonCode, Transport};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use transport::{Acks, Forwarding, MqttEvent, Out, Reconnect};

use super::{Endpoint, OpsError};

/// Largest packet sent: a 64 KiB chunk is ~87 KiB as base64 in its JSON envelope.
const MAX_OUTGOING: usize = 256 * 1024;
/// Largest packet accepted: API answers and the queue snapshot are at most 1 MiB.
const MAX_INCOMING: usize = 2 * 1024 * 1024;
/// How long a watcher waits before the event loop reconnects.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// What the event-loop task reports.
#[derive(Debug)]
pub(crate) enum LinkEvent {
    /// CONNACK accepted (after a reconnect too).
    Connected,
    /// SUBACK with one code per filter.
    SubAck(Vec<SubscribeReasonCode>),
    /// A publish arrived.
    Message { topic: String, payload: Vec<u8> },
    /// The connection failed or ended (a reconnecting link goes on after a pause).
    Down { reason: String },
}

/// A connected client and the events of its connection.
pub(crate) struct Link {
    pub(crate) client: AsyncClient,
    pub(crate) client_id: ClientId,
    pub(crate) broker: String,
    events: mpsc::Receiver<MqttEvent>,
    task: JoinHandle<()>,
}

/// `cli-<pid>-<random>`: unique per invocation, so two operators never share a response topic.
pub(crate) fn unique_client_id() -> ClientId {
    let random = std::collections::hash_map::RandomState::new().hash_one((
        std::process::id(),
        std::time::SystemTime::now(),
        std::thread::current().id(),
    ));
    let id = format!("cli-{}-{random:016x}", std::process::id());
    // Digits, hex and '-' only, at most 4 + 10 + 1 + 16 characters: always a valid id.
    ClientId::new(id).unwrap_or_else(|_| unreachable!("generated client ids are valid"))
}

/// The name the operator API answers this CLI under (`api/response/<name>`): `cli`, or
/// `cli-<user>` with broker credentials. One topic per person, not one per invocation: a broker
/// keeps every topic it was asked for (rumqttd never frees a subscription's log), so a name per
/// run would grow it by one for every `printloop jobs list` a cron job or a script makes.
/// Concurrent runs share the topic and keep to their own answers by request id (each request id
/// starts with the run's unique MQTT client id).
pub(crate) fn api_client_name(ep: &Endpoint) -> ClientId {
    let fallback =
        || ClientId::new("cli").unwrap_or_else(|_| unreachable!("\"cli\" is a valid id"));
    match &ep.credentials {
        Some(c) => ClientId::new(format!("cli-{}", c.username)).unwrap_or_else(|_| fallback()),
        None => fallback(),
    }
}

fn options(ep: &Endpoint, client_id: &ClientId) -> MqttOptions {
    let mut o = MqttOptions::new(client_id.as_str(), ep.broker.host.clone(), ep.broker.port);
    o.set_clean_session(true)
        .set_keep_alive(Duration::from_secs(15))
        .set_max_packet_size(MAX_INCOMING, MAX_OUTGOING);
    if let Some(c) = &ep.credentials {
        o.set_credentials(c.username.clone(), c.password.clone());
    }
    if ep.broker.tls {
        o.set_transport(Transport::tls_with_default_config());
    }
    o
}

impl Link {
    /// Connects and waits (at most the endpoint's timeout) for the broker to accept us.
    ///
    /// With `reconnect`, the event loop keeps going after a failure (a watcher survives a broker
    /// restart); otherwise it stops at the first one.
    pub(crate) async fn connect(ep: &Endpoint, reconnect: bool) -> Result<Link, OpsError> {
        let client_id = unique_client_id();
        let broker = ep.broker.to_string();
        let (client, mut eventloop) = AsyncClient::new(options(ep, &client_id), 16);
        let mut network = transport::network_options();
        network.set_connection_timeout(ep.timeout.as_secs().max(1));
        eventloop.set_network_options(network);
        let (tx, events) = mpsc::channel(256);
        let forwarding = Forwarding {
            reconnect: if reconnect {
                Reconnect::After(RECONNECT_DELAY)
            } else {
                Reconnect::Never
            },
            resubscribe: None,
            acks: Acks::Subscribe,
        };
        let task = transport::forward::spawn(eventloop, forwarding, Out::Bounded(tx));
        let mut link = Link {
            client,
            client_id,
            broker: broker.clone(),
            events,
            task,
        };
        let first = tokio::time::timeout(ep.timeout, link.next()).await;
        let fail = |reason: String| OpsError::Connect {
            broker: broker.clone(),
            reason,
        };
        match first {
            Ok(Some(LinkEvent::Connected)) => Ok(link),
            Ok(Some(LinkEvent::Down { reason })) => Err(fail(reason)),
            Ok(Some(other)) => Err(fail(format!("expected a CONNACK, got {other:?}"))),
            Ok(None) => Err(fail("the connection ended".into())),
            Err(_) => Err(fail(format!(
                "no answer within {} s",
                ep.timeout.as_secs().max(1)
            ))),
        }
    }

    /// The next event; `None` once the task has ended.
    pub(crate) async fn next(&mut self) -> Option<LinkEvent> {
        loop {
            return Some(match self.events.recv().await? {
                MqttEvent::Connected { .. } => LinkEvent::Connected,
                MqttEvent::SubAck(codes) => LinkEvent::SubAck(codes),
                MqttEvent::Message(p) => LinkEvent::Message {
                    topic: p.topic,
                    payload: p.payload.to_vec(),
                },
                MqttEvent::Down { error, .. } => LinkEvent::Down { reason: error },
                MqttEvent::PubAck | MqttEvent::PubComp => continue,
            });
        }
    }

    /// Sends SUBSCRIBE for `filter` (the SUBACK arrives as an event).
    pub(crate) async fn subscribe(&self, filter: &str, qos: QoS) -> Result<(), OpsError> {
        self.client
            .subscribe(filter, qos)
            .await
            .map_err(|e| OpsError::ConnectionLost {
                broker: self.broker.clone(),
                reason: e.to_string(),
            })
    }

    /// Sends DISCONNECT and waits briefly for the connection to close.
    pub(crate) async fn close(mut self) {
        if self.client.disconnect().await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Some(ev) = self.events.recv().await {
                    if matches!(ev, MqttEvent::Down { .. }) {
                        return;
                    }
                }
            })
            .await;
        }
        self.task.abort();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_unique_and_valid() {
        let a = unique_client_id();
        let b = unique_client_id();
        assert_ne!(a, b);
        assert!(a
            .as_str()
            .starts_with(&format!("cli-{}-", std::process::id())));
    }
}
