//! The probe: what an honest client sees while the attacker works.
//!
//! - **Command latency**: every [`PROBE_EVERY`] it sends a harmless command with a fresh id
//!   (`probe-<printer>-<n>`) on each printer's `cmd` and times the `cmd/result` with that id.
//! - **State gap**: the arrival times of every printer's `state` that comes from its real
//!   gateway: it decodes, its `(epoch, seq)` is newer than the last real one, and its bytes are
//!   not a payload the attacker sent ([`Forged`]). The real gateway's epoch comes from its
//!   `status` online messages (and its states), the supervisor's from `supervisor/status`.
//! - **API latency** ([`ApiProbe`]): `list_printers` through the operator API, one at a time.
//!
//! [`Probe::window`] turns the samples between two instants into a class's worst figures.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::api::{ApiOp, NoArgs};
use protocol::command::CommandResult;
use protocol::presence::{Presence, Status};
use protocol::state::StateSnapshot;
use protocol::{Payload as _, PrinterTopicKind, Topic, Topics};
use rumqttc::{AsyncClient, MqttOptions, QoS, SubscribeFilter};
use tokio::task::JoinHandle;
use transport::{Acks, Forwarding, MqttEvent, Out, Reconnect};

use crate::ops::{ApiClient, Endpoint, OpsError};

/// How often the probe sends a command to each printer (and asks the API).
pub const PROBE_EVERY: Duration = Duration::from_millis(200);

/// The harmless command the probe sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeCommand {
    /// `pause` naming a job no printer has: answered `error`, changes nothing, and makes the
    /// gateway re-publish nothing but its state (so a forged retained `status` or `meta` stays
    /// until its owner re-asserts it by itself).
    Pause,
    /// `rebirth`: the gateway re-publishes meta, state and status on every probe — which
    /// repairs forged retained topics by itself, so the `forged_retained` check cannot fail.
    Rebirth,
}

/// Hashes of every payload the attacker published (exact bytes).
#[derive(Debug, Clone, Default)]
pub struct Forged(Arc<Mutex<HashSet<u64>>>);

impl Forged {
    fn hash(payload: &[u8]) -> u64 {
        let mut h = DefaultHasher::new();
        payload.hash(&mut h);
        h.finish()
    }

    /// Remembers `payload` as forged.
    pub fn add(&self, payload: &[u8]) {
        if let Ok(mut set) = self.0.lock() {
            set.insert(Self::hash(payload));
        }
    }

    /// Whether the attacker sent exactly these bytes.
    pub fn contains(&self, payload: &[u8]) -> bool {
        self.0
            .lock()
            .map(|set| set.contains(&Self::hash(payload)))
            .unwrap_or(false)
    }
}

/// One probe command.
#[derive(Debug, Clone)]
struct CmdSample {
    printer: usize,
    sent: Instant,
    answered: Option<Instant>,
}

/// One API request.
#[derive(Debug, Clone)]
struct ApiSample {
    sent: Instant,
    took: Duration,
}

/// Everything the probe measured so far.
#[derive(Debug, Default)]
struct Data {
    cmds: Vec<CmdSample>,
    pending: HashMap<String, usize>,
    send_failures: u64,
    /// Per printer: arrival times of real states.
    states: Vec<Vec<Instant>>,
    last_seq: Vec<Option<(u64, u64)>>,
    /// Per printer: the real gateway's epoch (its newest online status or state).
    epoch: Vec<Option<u64>>,
    heartbeat_s: Vec<Option<u32>>,
    /// The supervisor's epoch (its newest real online status).
    sup_epoch: Option<u64>,
    api: Vec<ApiSample>,
}

/// A class's worst figures.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// Worst command latency (ms) and its printer; an unanswered command counts until the
    /// window's end.
    pub worst_cmd_ms: u64,
    /// The printer of the worst command latency.
    pub worst_cmd_printer: usize,
    /// Commands sent in the window that had no answer at its end (sent > 2 s before it).
    pub unanswered: usize,
    /// Worst API latency (ms); a request without an answer counts its timeout.
    pub worst_api_ms: u64,
    /// Worst interval between two real states (ms), per printer.
    pub gaps_ms: Vec<u64>,
}

/// The running probe.
pub struct Probe {
    data: Arc<Mutex<Data>>,
    n: usize,
    tasks: Vec<JoinHandle<()>>,
}

/// What the probe needs to connect.
#[derive(Debug, Clone)]
pub struct Conn {
    /// The broker's loopback port.
    pub port: u16,
    /// `(user, password)` on a broker that asks for a login.
    pub login: Option<(String, String)>,
}

impl Conn {
    /// MQTT options for a client of this broker.
    pub fn options(&self, client_id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", self.port);
        o.set_clean_session(true)
            .set_keep_alive(Duration::from_secs(10))
            .set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
        if let Some((u, p)) = &self.login {
            o.set_credentials(u.clone(), p.clone());
        }
        o
    }
}

fn printer_index(id: &str, n: usize) -> Option<usize> {
    let i: usize = id.strip_prefix('p')?.parse().ok()?;
    (i < n && id == format!("p{i}")).then_some(i)
}

impl Probe {
    /// Starts probing printers `p0..p<n>` and the API at `ep`.
    pub fn start(
        conn: &Conn,
        ep: Endpoint,
        topics: Topics,
        n: usize,
        forged: Forged,
        command: ProbeCommand,
    ) -> Probe {
        let data = Arc::new(Mutex::new(Data {
            states: vec![Vec::new(); n],
            last_seq: vec![None; n],
            epoch: vec![None; n],
            heartbeat_s: vec![None; n],
            ..Default::default()
        }));
        let (client, eventloop) = AsyncClient::new(conn.options("probe"), 256);
        let filters: Vec<SubscribeFilter> = [
            topics.all_printers(PrinterTopicKind::State),
            topics.all_printers(PrinterTopicKind::Status),
            topics.all_printers(PrinterTopicKind::CmdResult),
            topics.format(&Topic::SupervisorStatus),
        ]
        .into_iter()
        .map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce))
        .collect();
        let d = data.clone();
        let t = topics.clone();
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let forwarding = Forwarding {
            reconnect: Reconnect::After(Duration::from_millis(200)),
            resubscribe: Some((client.clone(), filters)),
            acks: Acks::None,
        };
        let forward = transport::forward::spawn(eventloop, forwarding, Out::Bounded(tx));
        let listen = tokio::spawn(async move {
            let _forward = crate::chaos::observe::AbortOnDrop(forward);
            while let Some(ev) = rx.recv().await {
                match ev {
                    MqttEvent::Message(p) => {
                        let now = Instant::now();
                        if let Ok(mut data) = d.lock() {
                            data.apply(&t, n, &forged, &p.topic, &p.payload, now);
                        }
                    }
                    MqttEvent::Down { error, .. } => {
                        tracing::warn!(%error, "probe: connection lost");
                    }
                    _ => {}
                }
            }
        });
        let d = data.clone();
        let send = tokio::spawn(async move {
            let mut seq = 0u64;
            let mut tick = tokio::time::interval(PROBE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                for i in 0..n {
                    seq += 1;
                    let id = format!("probe-p{i}-{seq}");
                    // Named as client `probe` (a gateway that limits commands per client
                    // counts the probe apart from the attacker).
                    let payload = match command {
                        ProbeCommand::Rebirth => serde_json::json!({
                            "v": 1, "id": id, "client": "probe", "kind": "rebirth", "args": {}
                        }),
                        ProbeCommand::Pause => serde_json::json!({
                            "v": 1, "id": id, "client": "probe", "kind": "pause",
                            "args": {"job_id": "probe-no-such-job"}
                        }),
                    }
                    .to_string();
                    let topic = topics.format(&Topic::Cmd(
                        protocol::PrinterId::new(format!("p{i}"))
                            .unwrap_or_else(|_| unreachable!("p<n> is a valid printer id")),
                    ));
                    let sent = Instant::now();
                    if let Ok(mut data) = d.lock() {
                        let k = data.cmds.len();
                        data.cmds.push(CmdSample {
                            printer: i,
                            sent,
                            answered: None,
                        });
                        data.pending.insert(id, k);
                    }
                    let ok = tokio::time::timeout(
                        Duration::from_secs(1),
                        client.publish(topic, QoS::AtLeastOnce, false, payload),
                    )
                    .await;
                    if !matches!(ok, Ok(Ok(()))) {
                        if let Ok(mut data) = d.lock() {
                            data.send_failures += 1;
                        }
                    }
                }
            }
        });
        let api = tokio::spawn(
            ApiProbe {
                ep,
                data: data.clone(),
            }
            .run(),
        );
        Probe {
            data,
            n,
            tasks: vec![listen, send, api],
        }
    }

    /// The worst figures of `[start, end]`.
    pub fn window(&self, start: Instant, end: Instant) -> Window {
        let Ok(data) = self.data.lock() else {
            return Window::default();
        };
        let mut w = Window {
            gaps_ms: vec![0; self.n],
            ..Default::default()
        };
        for c in &data.cmds {
            let in_window = c.sent >= start && c.sent <= end;
            let late_answer = c.sent < start && c.answered.is_some_and(|a| a >= start && a <= end);
            if !in_window && !late_answer {
                continue;
            }
            let until = c.answered.filter(|a| *a <= end).unwrap_or(end);
            let ms = ms(until.saturating_duration_since(c.sent));
            if c.answered.is_none_or(|a| a > end)
                && end.saturating_duration_since(c.sent) > Duration::from_secs(2)
            {
                w.unanswered += 1;
            }
            if ms > w.worst_cmd_ms {
                w.worst_cmd_ms = ms;
                w.worst_cmd_printer = c.printer;
            }
        }
        for a in &data.api {
            if a.sent >= start && a.sent <= end {
                w.worst_api_ms = w.worst_api_ms.max(ms(a.took));
            }
        }
        for (i, times) in data.states.iter().enumerate() {
            let mut prev = times
                .iter()
                .rev()
                .find(|t| **t < start)
                .copied()
                .unwrap_or(start);
            let mut worst = Duration::ZERO;
            for t in times.iter().filter(|t| **t >= start && **t <= end) {
                worst = worst.max(t.saturating_duration_since(prev));
                prev = *t;
            }
            worst = worst.max(end.saturating_duration_since(prev));
            w.gaps_ms[i] = ms(worst);
        }
        w
    }

    /// The real gateway's epoch of printer `i`, as far as the probe has seen.
    pub fn epoch(&self, i: usize) -> Option<u64> {
        self.data.lock().ok().and_then(|d| d.epoch[i])
    }

    /// The newest real `(epoch, seq)` of printer `i`'s state.
    pub fn last_seq(&self, i: usize) -> Option<(u64, u64)> {
        self.data.lock().ok().and_then(|d| d.last_seq[i])
    }

    /// Printer `i`'s heartbeat (from its states).
    pub fn heartbeat_s(&self, i: usize) -> Option<u32> {
        self.data.lock().ok().and_then(|d| d.heartbeat_s[i])
    }

    /// The supervisor's epoch.
    pub fn sup_epoch(&self) -> Option<u64> {
        self.data.lock().ok().and_then(|d| d.sup_epoch)
    }

    /// Probe commands that could not even be handed to the MQTT client.
    pub fn send_failures(&self) -> u64 {
        self.data.lock().map(|d| d.send_failures).unwrap_or(0)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Data {
    fn apply(
        &mut self,
        topics: &Topics,
        n: usize,
        forged: &Forged,
        topic: &str,
        payload: &[u8],
        now: Instant,
    ) {
        let Ok(t) = topics.parse(topic) else {
            return;
        };
        if forged.contains(payload) {
            return;
        }
        match t {
            Topic::State(id) => {
                let Some(i) = printer_index(id.as_str(), n) else {
                    return;
                };
                let Ok(s) = StateSnapshot::decode(payload) else {
                    return;
                };
                if self.last_seq[i].is_none_or(|last| (s.epoch, s.seq) > last) {
                    self.last_seq[i] = Some((s.epoch, s.seq));
                    self.states[i].push(now);
                    self.heartbeat_s[i] = Some(s.heartbeat_s);
                    if self.epoch[i].is_none_or(|e| s.epoch > e) {
                        self.epoch[i] = Some(s.epoch);
                    }
                }
            }
            Topic::Status(id) => {
                let Some(i) = printer_index(id.as_str(), n) else {
                    return;
                };
                if let Ok(s) = Status::decode(payload) {
                    if s.presence == Presence::Online {
                        self.epoch[i] = Some(s.epoch);
                    }
                }
            }
            Topic::SupervisorStatus => {
                if let Ok(s) = Status::decode(payload) {
                    if s.presence == Presence::Online {
                        self.sup_epoch = Some(s.epoch);
                    }
                }
            }
            Topic::CmdResult(_) => {
                let Ok(r) = CommandResult::decode(payload) else {
                    return;
                };
                if let Some(k) = self.pending.remove(r.id.as_str()) {
                    if let Some(c) = self.cmds.get_mut(k) {
                        c.answered = Some(now);
                    }
                }
            }
            _ => {}
        }
    }
}

/// `list_printers`, one request at a time, every [`PROBE_EVERY`].
struct ApiProbe {
    ep: Endpoint,
    data: Arc<Mutex<Data>>,
}

impl ApiProbe {
    async fn run(self) {
        let mut api: Option<ApiClient> = None;
        loop {
            let sent = Instant::now();
            if api.is_none() {
                api = ApiClient::connect(&self.ep).await.ok();
            }
            if let Some(client) = api.as_mut() {
                let r = client.request(ApiOp::ListPrinters(NoArgs {})).await;
                let took = sent.elapsed();
                if let Ok(mut d) = self.data.lock() {
                    d.api.push(ApiSample { sent, took });
                }
                match r {
                    Ok(_) | Err(OpsError::Refused { .. }) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "probe: API request failed; reconnecting");
                        if let Some(c) = api.take() {
                            c.close().await;
                        }
                    }
                }
            }
            tokio::time::sleep(PROBE_EVERY.saturating_sub(sent.elapsed())).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printer_indices_are_exact() {
        assert_eq!(printer_index("p0", 2), Some(0));
        assert_eq!(printer_index("p1", 2), Some(1));
        assert_eq!(printer_index("p2", 2), None);
        assert_eq!(printer_index("p01", 2), None);
        assert_eq!(printer_index("ghost", 2), None);
    }

    #[test]
    fn a_gap_counts_from_the_last_state_before_the_window_to_its_end() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let probe = Probe {
            data: Arc::new(Mutex::new(Data {
                states: vec![vec![at(0), at(1000), at(4000)]],
                last_seq: vec![None],
                epoch: vec![None],
                heartbeat_s: vec![None],
                cmds: vec![
                    CmdSample {
                        printer: 0,
                        sent: at(500),
                        answered: Some(at(700)),
                    },
                    CmdSample {
                        printer: 0,
                        sent: at(1500),
                        answered: None,
                    },
                ],
                ..Default::default()
            })),
            n: 1,
            tasks: vec![],
        };
        let w = probe.window(at(500), at(5000));
        assert_eq!(w.gaps_ms, vec![3000]);
        assert_eq!(w.worst_cmd_ms, 3500, "unanswered: until the window's end");
        assert_eq!(w.unanswered, 1);
        let forged = Forged::default();
        forged.add(b"x");
        assert!(forged.contains(b"x") && !forged.contains(b"y"));
    }
}
