//! A small MQTT 3.1.1 test client on rumqttc 0.25: every wait is bounded.
//!
//! The event loop runs in printloop's one forwarding task (`transport::forward`), which stops at
//! the first connection error (no silent reconnects: a test decides when to reconnect, by
//! connecting a new client with the same id). Publishes that arrive while the test waits for an
//! acknowledgement are kept for `recv`, and acknowledgements that arrive while it waits for a
//! publish are kept for the next wait.
use std::collections::VecDeque;
use std::time::Duration;

use rumqttc::{AsyncClient, MqttOptions, Publish, QoS, SubscribeReasonCode};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::task::JoinHandle;
use transport::{Acks, Forwarding, MqttEvent, Out};

use crate::{Error, Result};

/// How long a client waits for an acknowledgement or a message before giving up.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest packet the test client sends or accepts: file chunks of 64 KiB travel as base64 in
/// JSON (rumqttc's default of 10 KiB is far too small).
const MAX_PACKET: usize = 2 * 1024 * 1024;

/// Options for a loopback client: keep-alive 5 s, clean session, 2 MiB packets.
pub fn mqtt_options(client_id: &str, port: u16) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(5))
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    options
}

#[derive(Debug)]
enum Control {
    SubAck(Vec<SubscribeReasonCode>),
    PubAck,
    PubComp,
    Closed(String),
}

/// A connected MQTT 3.1.1 client whose received publishes queue up for the test.
#[derive(Debug)]
pub struct TestClient {
    client_id: String,
    client: AsyncClient,
    session_present: bool,
    events: UnboundedReceiver<MqttEvent>,
    /// Publishes that arrived while waiting for an acknowledgement.
    publishes: VecDeque<Publish>,
    /// Acknowledgements (and the end of the connection) that arrived while waiting for a publish.
    acks: VecDeque<Control>,
    task: JoinHandle<()>,
}

impl TestClient {
    /// Connects a clean-session client to `127.0.0.1:port`.
    pub async fn connect(port: u16, client_id: &str) -> Result<Self> {
        Self::connect_with(mqtt_options(client_id, port)).await
    }

    /// Connects with `options` and waits (at most [`RECV_TIMEOUT`]) for an accepting CONNACK.
    pub async fn connect_with(options: MqttOptions) -> Result<Self> {
        let client_id = options.client_id();
        let (client, eventloop) = AsyncClient::new(options, 256);
        let (tx, mut events) = unbounded_channel();
        let forwarding = Forwarding {
            acks: Acks::All,
            ..Forwarding::default()
        };
        let task = transport::forward::spawn(eventloop, forwarding, Out::Unbounded(tx));
        let fail = |reason: String| Error::Mqtt {
            client_id: client_id.clone(),
            reason,
        };
        let session_present = match tokio::time::timeout(RECV_TIMEOUT, events.recv()).await {
            Ok(Some(MqttEvent::Connected { session_present })) => session_present,
            Ok(Some(MqttEvent::Down { error, .. })) => {
                return Err(fail(format!("cannot connect: {error}")))
            }
            Ok(other) => {
                task.abort();
                return Err(fail(format!("expected a CONNACK, got {other:?}")));
            }
            Err(_) => {
                task.abort();
                return Err(fail(format!("no CONNACK within {RECV_TIMEOUT:?}")));
            }
        };
        Ok(TestClient {
            client_id,
            client,
            session_present,
            events,
            publishes: VecDeque::new(),
            acks: VecDeque::new(),
            task,
        })
    }

    /// The client id.
    pub fn id(&self) -> &str {
        &self.client_id
    }

    /// The broker's CONNACK `session_present` flag.
    pub fn session_present(&self) -> bool {
        self.session_present
    }

    /// The underlying rumqttc client, for what the helpers do not cover.
    pub fn client(&self) -> &AsyncClient {
        &self.client
    }

    fn error(&self, reason: impl Into<String>) -> Error {
        Error::Mqtt {
            client_id: self.client_id.clone(),
            reason: reason.into(),
        }
    }

    /// The next event of the connection, sorted: a publish or an acknowledgement.
    fn sort(&mut self, ev: MqttEvent) {
        match ev {
            MqttEvent::Message(p) => self.publishes.push_back(p),
            MqttEvent::SubAck(codes) => self.acks.push_back(Control::SubAck(codes)),
            MqttEvent::PubAck => self.acks.push_back(Control::PubAck),
            MqttEvent::PubComp => self.acks.push_back(Control::PubComp),
            MqttEvent::Down { error, .. } => self.acks.push_back(Control::Closed(error)),
            MqttEvent::Connected { .. } => {}
        }
    }

    async fn next_control(&mut self, timeout: Duration) -> Option<Control> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(c) = self.acks.pop_front() {
                return Some(c);
            }
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) => self.sort(ev),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    async fn next_ack(&mut self, what: &str) -> Result<Control> {
        match self.next_control(RECV_TIMEOUT).await {
            Some(Control::Closed(e)) => Err(self.error(format!("{what}: connection closed: {e}"))),
            Some(ack) => Ok(ack),
            None if self.events.is_closed() => Err(self.error(format!("{what}: event loop ended"))),
            None => Err(self.error(format!("{what}: no answer within {RECV_TIMEOUT:?}"))),
        }
    }

    /// Subscribes and waits for the SUBACK; a refused subscription is an error.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Result<()> {
        self.client
            .subscribe(filter, qos)
            .await
            .map_err(|e| self.error(format!("subscribe {filter}: {e}")))?;
        loop {
            match self.next_ack(&format!("SUBACK for {filter}")).await? {
                Control::SubAck(codes) if codes.contains(&SubscribeReasonCode::Failure) => {
                    return Err(self.error(format!("subscription to {filter} refused")))
                }
                Control::SubAck(_) => return Ok(()),
                _ => continue,
            }
        }
    }

    /// Publishes; with QoS 1 or 2 also waits until the broker acknowledged it (use one
    /// `publish` at a time: acknowledgements are not matched to packet ids).
    pub async fn publish(
        &mut self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: impl Into<Vec<u8>>,
    ) -> Result<()> {
        self.client
            .publish(topic, qos, retain, payload)
            .await
            .map_err(|e| self.error(format!("publish {topic}: {e}")))?;
        if qos == QoS::AtMostOnce {
            return Ok(());
        }
        loop {
            match (
                qos,
                self.next_ack(&format!("ack for publish to {topic}"))
                    .await?,
            ) {
                (QoS::AtLeastOnce, Control::PubAck) | (QoS::ExactlyOnce, Control::PubComp) => {
                    return Ok(())
                }
                _ => continue,
            }
        }
    }

    /// The next received publish, or `None` after `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Publish> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(p) = self.publishes.pop_front() {
                return Some(p);
            }
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) => self.sort(ev),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The next received publish; panics after [`RECV_TIMEOUT`] naming `what` was expected.
    pub async fn expect_message(&mut self, what: &str) -> Publish {
        match self.recv(RECV_TIMEOUT).await {
            Some(p) => p,
            None => panic!(
                "client `{}` received no message within {RECV_TIMEOUT:?}; expected {what}",
                self.client_id
            ),
        }
    }

    /// Panics if a publish arrives within `within` (use sparingly: it always waits `within`).
    pub async fn expect_no_message(&mut self, within: Duration, why: &str) {
        if let Some(p) = self.recv(within).await {
            panic!(
                "client `{}` received {:?} = {:?}; expected nothing because {why}",
                self.client_id,
                p.topic,
                String::from_utf8_lossy(&p.payload)
            );
        }
    }

    /// Collects publishes until none arrives for `quiet` (or `limit` elapsed).
    pub async fn collect_until_quiet(&mut self, quiet: Duration, limit: Duration) -> Vec<Publish> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut out = Vec::new();
        while tokio::time::Instant::now() < deadline {
            match self.recv(quiet).await {
                Some(p) => out.push(p),
                None => break,
            }
        }
        out
    }

    /// Sends DISCONNECT (the will is discarded) and waits, bounded, for the connection to end.
    pub async fn disconnect(mut self) -> Result<()> {
        self.client
            .disconnect()
            .await
            .map_err(|e| self.error(format!("disconnect: {e}")))?;
        let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
        let closed = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_control(left).await {
                Some(Control::Closed(_)) => break true,
                Some(_) => continue,
                None => break self.events.is_closed(),
            }
        };
        self.task.abort();
        if closed {
            Ok(())
        } else {
            Err(self.error("the connection did not close after DISCONNECT"))
        }
    }

    /// Drops the connection without DISCONNECT, like a crashed client or a pulled cable seen
    /// from a healthy network: the socket closes and the broker publishes the will.
    pub async fn kill(mut self) {
        self.task.abort();
        // Wait until the task (and with it the socket) is gone.
        let _ = (&mut self.task).await;
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}
