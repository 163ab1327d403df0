//! The hostile client: a raw rumqttc connection under its own client id (`attacker`), which
//! also listens to whatever its login may read (commands and their results, the queue, API
//! answers to `attacker`, file chunks, states) to aim its attacks. Oversized messages go out on
//! connections of their own ([`Attacker::one_shot`]): a broker drops a client that sends more
//! than it accepts, and rumqttc would send the same message again on every reconnect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::api::{ApiResponse, ApiResult};
use protocol::command::CommandResult;
use protocol::{JobId, Payload as _, PrinterTopicKind, Topic, Topics};
use rumqttc::{AsyncClient, QoS, SubscribeFilter};
use tokio::task::JoinHandle;
use transport::{Acks, Forwarding, MqttEvent, Out, Reconnect};

use super::probe::{Conn, Forged};

/// What the attacker heard.
#[derive(Debug, Default)]
pub struct Inbox {
    /// Answers to its API requests: id → (ok, error text).
    pub api: HashMap<String, (bool, Option<String>)>,
    /// Jobs its `submit_job` requests made: request id → job ids.
    pub api_jobs: HashMap<String, Vec<JobId>>,
    /// Results of commands whose id starts with `attacker-`: id → (printer, status, reason).
    pub results: HashMap<String, (String, String, Option<String>)>,
    /// The newest command id of the supervisor's seen in any `cmd/result`.
    pub sup_ids: Vec<String>,
    /// The newest `start_job` sent on each printer's `cmd` (raw), when the login may read it.
    pub starts: HashMap<String, Vec<u8>>,
    /// The newest `state` of each printer (raw).
    pub states: HashMap<String, Vec<u8>>,
    /// The newest retained `queue` (raw).
    pub queue: Option<Vec<u8>>,
    /// File chunk answers: (printer, request id, status).
    pub chunks: Vec<(String, String, String)>,
}

/// The attacker's connection.
pub struct Attacker {
    conn: Conn,
    topics: Topics,
    client: AsyncClient,
    /// What it heard.
    pub inbox: Arc<Mutex<Inbox>>,
    /// Payloads it sent.
    pub forged: Forged,
    subscribed: Arc<AtomicBool>,
    /// Times its connection was dropped.
    pub disconnects: Arc<AtomicU64>,
    one_shots: u64,
    task: JoinHandle<()>,
}

/// How a message on a connection of its own ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shot {
    /// The broker acknowledged it (PUBACK).
    Acked,
    /// The broker closed the connection (or refused the login).
    Dropped(String),
    /// Neither within 3 s.
    NoAnswer,
}

impl Attacker {
    /// Connects as `attacker` and subscribes to everything it wants to hear.
    pub async fn connect(conn: Conn, topics: Topics, forged: Forged) -> Attacker {
        let mut opts = conn.options("attacker");
        opts.set_inflight(1000);
        let (client, eventloop) = AsyncClient::new(opts, 20_000);
        let inbox: Arc<Mutex<Inbox>> = Arc::default();
        let subscribed = Arc::new(AtomicBool::new(false));
        let disconnects = Arc::new(AtomicU64::new(0));
        let filters: Vec<SubscribeFilter> = [
            topics.all_printers(PrinterTopicKind::Cmd),
            topics.all_printers(PrinterTopicKind::CmdResult),
            topics.all_printers(PrinterTopicKind::FileChunk),
            topics.all_printers(PrinterTopicKind::State),
            topics.format(&Topic::Queue),
            format!("{}/api/response/attacker", topics.root()),
        ]
        .into_iter()
        .map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce))
        .collect();
        let (sub, ib, t, s, dc) = (
            client.clone(),
            inbox.clone(),
            topics.clone(),
            subscribed.clone(),
            disconnects.clone(),
        );
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let forwarding = Forwarding {
            reconnect: Reconnect::After(Duration::from_millis(200)),
            resubscribe: Some((sub, filters)),
            acks: Acks::Subscribe,
        };
        let forward = transport::forward::spawn(eventloop, forwarding, Out::Bounded(tx));
        let task = tokio::spawn(async move {
            let _forward = crate::chaos::observe::AbortOnDrop(forward);
            while let Some(ev) = rx.recv().await {
                match ev {
                    MqttEvent::SubAck(_) => s.store(true, Ordering::SeqCst),
                    MqttEvent::Message(p) => {
                        if let Ok(mut inbox) = ib.lock() {
                            inbox.apply(&t, &p.topic, &p.payload);
                        }
                    }
                    MqttEvent::Down { error, .. } => {
                        dc.fetch_add(1, Ordering::SeqCst);
                        tracing::info!(%error, "attacker: connection dropped");
                    }
                    _ => {}
                }
            }
        });
        let a = Attacker {
            conn,
            topics,
            client,
            inbox,
            forged,
            subscribed,
            disconnects,
            one_shots: 0,
            task,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !a.subscribed.load(Ordering::SeqCst) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        a
    }

    /// The topic tree.
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// Publishes on its main connection (QoS 1); waits for room in the client's queue, at most
    /// 5 s. `false` if it could not even queue the message.
    pub async fn send(&self, topic: &str, payload: Vec<u8>, retain: bool) -> bool {
        self.forged.add(&payload);
        matches!(
            tokio::time::timeout(
                Duration::from_secs(5),
                self.client
                    .publish(topic, QoS::AtLeastOnce, retain, payload)
            )
            .await,
            Ok(Ok(()))
        )
    }

    /// One message on a connection of its own (client id `attacker-shot-<n>`): connect,
    /// publish (QoS 1), wait for the PUBACK or the broker closing the connection.
    pub async fn one_shot(&mut self, topic: &str, payload: Vec<u8>, retain: bool) -> Shot {
        self.forged.add(&payload);
        self.one_shots += 1;
        let opts = self
            .conn
            .options(&format!("attacker-shot-{}", self.one_shots));
        let (client, eventloop) = AsyncClient::new(opts, 4);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let forwarding = Forwarding {
            acks: Acks::All,
            ..Forwarding::default()
        };
        let forward = transport::forward::spawn(eventloop, forwarding, Out::Unbounded(tx));
        let _forward = crate::chaos::observe::AbortOnDrop(forward);
        if let Err(e) = client.try_publish(topic, QoS::AtLeastOnce, retain, payload) {
            return Shot::Dropped(format!("not sent: {e}"));
        }
        let outcome = tokio::time::timeout(Duration::from_secs(3), async {
            while let Some(ev) = rx.recv().await {
                match ev {
                    MqttEvent::PubAck => return Shot::Acked,
                    MqttEvent::Down { error, .. } => return Shot::Dropped(error),
                    _ => {}
                }
            }
            Shot::Dropped("the connection ended".into())
        })
        .await
        .unwrap_or(Shot::NoAnswer);
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
        outcome
    }

    /// A snapshot of what it heard, read by `f`.
    pub fn heard<T>(&self, f: impl FnOnce(&Inbox) -> T) -> Option<T> {
        self.inbox.lock().ok().map(|i| f(&i))
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Inbox {
    fn apply(&mut self, topics: &Topics, topic: &str, payload: &[u8]) {
        let Ok(t) = topics.parse(topic) else {
            if topic.ends_with("/api/response/attacker") {
                self.api_answer(payload);
            }
            return;
        };
        match t {
            Topic::ApiResponse(_) => self.api_answer(payload),
            Topic::CmdResult(p) => {
                let Ok(r) = CommandResult::decode(payload) else {
                    return;
                };
                let id = r.id.as_str();
                if id.starts_with("sup-") {
                    if self.sup_ids.len() >= 64 {
                        self.sup_ids.remove(0);
                    }
                    self.sup_ids.push(id.to_owned());
                } else if id.starts_with("attacker-") {
                    let status = serde_json::to_value(r.status)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    self.results
                        .insert(id.to_owned(), (p.as_str().to_owned(), status, r.reason));
                }
            }
            Topic::Cmd(p) => {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
                    return;
                };
                let from_supervisor = v["id"].as_str().is_some_and(|id| id.starts_with("sup-"));
                if from_supervisor && v["kind"] == "start_job" {
                    self.starts.insert(p.as_str().to_owned(), payload.to_vec());
                }
            }
            Topic::State(p) => {
                self.states.insert(p.as_str().to_owned(), payload.to_vec());
            }
            Topic::Queue => self.queue = Some(payload.to_vec()),
            Topic::FileChunk(p) => {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
                    return;
                };
                let id = v["request_id"].as_str().unwrap_or_default();
                if id.starts_with("attacker-") {
                    self.chunks.push((
                        p.as_str().to_owned(),
                        id.to_owned(),
                        v["status"].as_str().unwrap_or_default().to_owned(),
                    ));
                }
            }
            _ => {}
        }
    }

    fn api_answer(&mut self, payload: &[u8]) {
        if let Ok(r) = ApiResponse::decode(payload) {
            if let Some(ApiResult::Submitted { job_ids }) = &r.result {
                self.api_jobs
                    .insert(r.id.as_str().to_owned(), job_ids.clone());
            }
            self.api.insert(r.id.as_str().to_owned(), (r.ok, r.error));
        } else if let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) {
            // An answer this build cannot decode strictly (a newer supervisor): keep what it says.
            if let Some(id) = v["id"].as_str() {
                let ok = v["ok"].as_bool().unwrap_or(false);
                let error = v["error"].as_str().map(str::to_owned);
                self.api.insert(id.to_owned(), (ok, error));
            }
        }
    }
}
