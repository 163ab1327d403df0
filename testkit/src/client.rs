//! A small MQTT 3.1.1 test client on rumqttc 0.25: every wait is bounded.
//!
//! The event loop runs in a task that forwards incoming publishes to one channel and
//! acknowledgements to another, and stops at the first connection error (no silent reconnects:
//! a test decides when to reconnect, by connecting a new client with the same id).
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnAck, ConnectReturnCode, Event, EventLoop, MqttOptions, Outgoing, Packet,
    Publish, QoS, SubscribeReasonCode,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;

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
    ConnAck(ConnAck),
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
    connack: ConnAck,
    publishes: UnboundedReceiver<Publish>,
    acks: UnboundedReceiver<Control>,
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
        let (publish_tx, publishes) = unbounded_channel();
        let (ack_tx, mut acks) = unbounded_channel();
        let task = tokio::spawn(drive(eventloop, publish_tx, ack_tx));
        let fail = |reason: String| Error::Mqtt {
            client_id: client_id.clone(),
            reason,
        };
        let connack = match tokio::time::timeout(RECV_TIMEOUT, acks.recv()).await {
            Ok(Some(Control::ConnAck(c))) if c.code == ConnectReturnCode::Success => c,
            Ok(Some(Control::ConnAck(c))) => {
                task.abort();
                return Err(fail(format!("connection refused: {:?}", c.code)));
            }
            Ok(Some(Control::Closed(e))) => return Err(fail(format!("cannot connect: {e}"))),
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
            connack,
            publishes,
            acks,
            task,
        })
    }

    /// The client id.
    pub fn id(&self) -> &str {
        &self.client_id
    }

    /// The broker's CONNACK `session_present` flag.
    pub fn session_present(&self) -> bool {
        self.connack.session_present
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

    async fn next_ack(&mut self, what: &str) -> Result<Control> {
        match tokio::time::timeout(RECV_TIMEOUT, self.acks.recv()).await {
            Ok(Some(Control::Closed(e))) => {
                Err(self.error(format!("{what}: connection closed: {e}")))
            }
            Ok(Some(ack)) => Ok(ack),
            Ok(None) => Err(self.error(format!("{what}: event loop ended"))),
            Err(_) => Err(self.error(format!("{what}: no answer within {RECV_TIMEOUT:?}"))),
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
        tokio::time::timeout(timeout, self.publishes.recv())
            .await
            .ok()
            .flatten()
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
        let waited = tokio::time::timeout(RECV_TIMEOUT, async {
            loop {
                match self.acks.recv().await {
                    Some(Control::Closed(_)) | None => return,
                    Some(_) => continue,
                }
            }
        })
        .await;
        self.task.abort();
        waited.map_err(|_| self.error("the connection did not close after DISCONNECT"))
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

async fn drive(
    mut eventloop: EventLoop,
    publishes: UnboundedSender<Publish>,
    acks: UnboundedSender<Control>,
) {
    let mut disconnecting = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = publishes.send(p);
            }
            Ok(Event::Incoming(Packet::ConnAck(c))) => {
                let _ = acks.send(Control::ConnAck(c));
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                let _ = acks.send(Control::SubAck(s.return_codes));
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                let _ = acks.send(Control::PubAck);
            }
            Ok(Event::Incoming(Packet::PubComp(_))) => {
                let _ = acks.send(Control::PubComp);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => disconnecting = true,
            Ok(_) => {}
            Err(e) => {
                let reason = if disconnecting {
                    format!("closed after DISCONNECT ({e})")
                } else {
                    e.to_string()
                };
                let _ = acks.send(Control::Closed(reason));
                return;
            }
        }
    }
}
