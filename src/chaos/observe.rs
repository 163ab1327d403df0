//! The runner's own view of the topic tree: every printer's retained `status` and `state`
//! (newest wins, a late will is ignored) and the `job_started` / `file_verified` events, from a
//! direct connection to the broker (not through any proxy) that reconnects and re-subscribes
//! after a broker restart.
//!
//! A broker that sends no retained messages to wildcard filters (RabbitMQ 3.10) shows the
//! observer only what is published after it subscribed: a runner waits for
//! [`Observer::subscribed`] before it starts the gateways, so every birth is seen live.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::presence::{Presence, Status};
use protocol::state::{Event, EventKind, StateSnapshot};
use protocol::{Payload as _, PrinterTopicKind, Topic, Topics};
use rumqttc::{AsyncClient, MqttOptions, QoS, SubscribeFilter};
use transport::{Acks, Forwarding, MqttEvent, Out, Reconnect};

use invariants::Observed;

/// What the retained topics say about one printer.
#[derive(Debug, Clone, Default)]
pub struct PrinterSeen {
    /// The newest presence (a will older than the newest birth is ignored).
    pub status: Option<Status>,
    /// The newest state by (epoch, seq).
    pub state: Option<StateSnapshot>,
}

/// Everything seen so far.
#[derive(Debug, Default)]
pub struct Seen {
    /// By printer id.
    pub printers: BTreeMap<String, PrinterSeen>,
    /// Events of interest.
    pub observed: Observed,
    /// Messages that did not decode.
    pub undecodable: u64,
    /// The broker granted every subscription (on some connection).
    pub subscribed: bool,
}

impl Seen {
    fn apply(&mut self, topics: &Topics, topic: &str, payload: &[u8]) {
        let Ok(t) = topics.parse(topic) else {
            return;
        };
        match t {
            Topic::Status(id) => match Status::decode(payload) {
                Ok(s) => {
                    let p = self.printers.entry(id.as_str().to_owned()).or_default();
                    let newer = match &p.status {
                        None => true,
                        Some(old) => {
                            s.epoch > old.epoch
                                || (s.epoch == old.epoch && s.presence == Presence::Offline)
                        }
                    };
                    if newer {
                        p.status = Some(s);
                    }
                }
                Err(_) => self.undecodable += 1,
            },
            Topic::State(id) => match StateSnapshot::decode(payload) {
                Ok(s) => {
                    let p = self.printers.entry(id.as_str().to_owned()).or_default();
                    if p.state
                        .as_ref()
                        .is_none_or(|old| (s.epoch, s.seq) > (old.epoch, old.seq))
                    {
                        p.state = Some(s);
                    }
                }
                Err(_) => self.undecodable += 1,
            },
            Topic::Events(id) => match Event::decode(payload) {
                Ok(e) => match e.event {
                    EventKind::JobStarted { job_id } => {
                        self.observed
                            .starts
                            .push((id.as_str().to_owned(), job_id, e.epoch, e.seq));
                    }
                    EventKind::FileVerified { job_id, sha256 } => {
                        self.observed
                            .verified
                            .push((id.as_str().to_owned(), job_id, sha256));
                    }
                    _ => {}
                },
                Err(_) => self.undecodable += 1,
            },
            _ => {}
        }
    }
}

/// A running observer.
pub struct Observer {
    /// What it has seen.
    pub seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Observer {
    /// Connects to `127.0.0.1:port` and keeps watching until dropped.
    pub fn start(port: u16, topics: Topics) -> Observer {
        Self::start_with(port, topics, None)
    }

    /// [`Observer::start`], logging in with `(user, password)` when given.
    pub fn start_with(port: u16, topics: Topics, login: Option<(String, String)>) -> Observer {
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let mut opts = MqttOptions::new(
            format!("chaos-observer-{}", std::process::id()),
            "127.0.0.1",
            port,
        );
        opts.set_clean_session(true)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(2 * 1024 * 1024, 64 * 1024);
        if let Some((user, password)) = login {
            opts.set_credentials(user, password);
        }
        let (client, eventloop) = AsyncClient::new(opts, 64);
        let filters: Vec<SubscribeFilter> = [
            PrinterTopicKind::Status,
            PrinterTopicKind::State,
            PrinterTopicKind::Events,
        ]
        .into_iter()
        .map(|k| SubscribeFilter::new(topics.all_printers(k), QoS::AtLeastOnce))
        .collect();
        let (tx, mut rx) = tokio::sync::mpsc::channel(256);
        let forwarding = Forwarding {
            reconnect: Reconnect::After(Duration::from_millis(200)),
            // A clean session: subscribe again on every connection.
            resubscribe: Some((client, filters)),
            acks: Acks::Subscribe,
        };
        let forward = transport::forward::spawn(eventloop, forwarding, Out::Bounded(tx));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let _forward = AbortOnDrop(forward);
            while let Some(ev) = rx.recv().await {
                let Ok(mut seen) = s.lock() else {
                    continue;
                };
                match ev {
                    MqttEvent::Message(p) => seen.apply(&topics, &p.topic, &p.payload),
                    MqttEvent::SubAck(codes) => {
                        seen.subscribed |= codes
                            .iter()
                            .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_)));
                    }
                    _ => {}
                }
            }
        });
        Observer { seen, task }
    }

    /// Whether the broker has granted the observer's subscriptions.
    pub fn subscribed(&self) -> bool {
        self.seen.lock().is_ok_and(|s| s.subscribed)
    }

    /// A copy of the retained view.
    pub fn printers(&self) -> BTreeMap<String, PrinterSeen> {
        self.seen
            .lock()
            .map(|s| s.printers.clone())
            .unwrap_or_default()
    }

    /// A copy of the events seen.
    pub fn observed(&self) -> Observed {
        self.seen
            .lock()
            .map(|s| s.observed.clone())
            .unwrap_or_default()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Aborts a task when dropped (with the task that owns it).
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
