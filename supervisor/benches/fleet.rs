//! Fleet benchmark (issues #4, #13): the real supervisor (`printloop supervisor`, a child
//! process with its production defaults) against a real `printloop broker` child process and N
//! lightweight fake printers in this process (one rumqttc client each, no pty, no firmware
//! model).
//!
//! `cargo bench -p supervisor --bench fleet -- --printers 1000 [--duration 20] [--print-ms 1000..3000] [--broker mosquitto] [--soak 600] [--pullers 50 --pull-mb 50] [--no-build]`
//!
//! `--outgoing N`: rumqttd's `router.max_outgoing_packet_count` instead of 3 × printers + 100 (the
//! shipped 1 000 shows the fallback when the supervisor's QoS 0 snapshot of retained states is
//! cut short: the printers' heartbeats fill in the rest).
//!
//! `--broker mosquitto`: the system's Mosquitto (docs/mosquitto.conf's limits, no persistence)
//! instead of `printloop broker`. The release `printloop` binary is built first (quick when up
//! to date) unless `--no-build`.
//!
//! `--soak S`: after the broker restart below, S more seconds of printing with the supervisor
//! killed -9 half way (the fleet goes on finishing prints for 3 s while it is gone), its
//! reconciliation timed like the broker's, dispatch latency per half, and the supervisor's RSS
//! at each step (`scripts/fleet-soak.sh` runs 10 000 printers this way).
//!
//! Prints human lines and, last, one JSON object. What is measured:
//! - `printers_online`: fake printers connected at the end of the steady window.
//! - `state_msgs_per_s`: `state` messages the fakes published per second in the steady window
//!   (the supervisor subscribes to all of them; "handled" is checked by dispatch latency and by
//!   the supervisor's job gauges keeping up with the fakes' truth, printed as a human line).
//! - `dispatch_*_ms`: measured at the fake printer, from publishing `ready` to receiving its
//!   `start_job` (the queue is kept non-empty, so this is the supervisor's reaction time plus two
//!   broker hops, not queue wait).
//! - `reconcile_after_broker_restart_s`: the broker is SIGKILLed (rumqttd forgets sessions and
//!   retained messages); while it is down every printing fake finishes its job (the supervisor
//!   can only learn it from `state.recent_jobs`), then the fleet is frozen (no new starts). From
//!   the moment the restarted broker is ready until the supervisor's `/metrics` show N printers
//!   online and not stale, its phase counts equal the fakes' phases exactly, and its finished
//!   and done jobs together equal the jobs the fakes finished (a finished job whose printer
//!   went ready again is harvested: done). `/metrics` is rendered once a second: ±1 s.
//! - `supervisor_peak_rss_kb`: VmHWM of the supervisor process (of its last life with
//!   `--soak`), and `supervisor_rss_kb`: its VmRSS at each step of the run.
//! - The dashboard (issue #12): the steady window's first half runs with no browser, its
//!   second half with `--streams` (default 10) live streams (`/api/v1/stream`) reading all the
//!   time: `dispatch_p99_ms_no_streams` vs `dispatch_p99_ms_streams` (one run, so the ratio is
//!   what counts on a noisy machine), `stream_bytes_per_s_per_client` and frames a second per
//!   client, and `first_load_ms`: a new browser's page (`GET /`) plus its initial state
//!   (`GET /api/v1/fleet`), under that load, worst of 5.
//!
//! - `--pullers K --pull-mb M` (issue #13, files at scale): the last K printers of the fleet
//!   are pullers. After the steady window K different files of M MB are uploaded with the real
//!   CLI (`printloop jobs add --tag pull`) while the fleet prints; then the pullers go ready
//!   together, take those jobs and pull the files as gateways do (a window of 8 chunk requests
//!   of 64 KiB each; the chunks are counted, not hashed: that is each Pi's work, not the
//!   supervisor host's). `pulls` in the JSON: upload time, the pulls' speed (all together and
//!   each), and the rest of the fleet's dispatch latency while the supervisor serves them.
//!   Ordinary jobs carry the tag `fleet` and pullers only `pull`, so neither takes the other's.
//!
//! Fakes go `ready` on their own 0.2–0.5 s after finishing (no operator `bed_clear`); the
//! supervisor then takes their finished jobs as harvested (done) from `recent_jobs`.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use protocol::command::{Command, CommandAction, CommandErrorCode, CommandResult, ResultStatus};
use protocol::presence::{Meta, Status};
use protocol::state::{JobProgress, JobStage, LedgerEntry, PrinterPhase, StateSnapshot};
use protocol::{CommandId, Payload, PrinterId, Sha256Hex, Topic, Topics, Version};
use rumqttc::{AsyncClient, LastWill, MqttOptions, QoS};
use testkit::BrokerProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use transport::{Forwarding, MqttEvent, Out, Reconnect};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone)]
struct Args {
    printers: usize,
    duration_s: u64,
    print_ms: (u64, u64),
    no_build: bool,
    streams: usize,
    mosquitto: bool,
    soak_s: u64,
    /// `--pullers K`: K more printers that pull their job's file as a gateway does.
    pullers: usize,
    /// `--pull-mb M`: the size of each puller's file (each a different file).
    pull_mb: u64,
    /// `--outgoing N`: rumqttd's `max_outgoing_packet_count` (default 3 × printers + 100, the
    /// size docs/broker.md asks for; the shipped 1 000 tests the fallback when it is smaller:
    /// a QoS 0 subscription then gets only that many retained messages).
    outgoing: Option<usize>,
}

fn parse_args() -> Args {
    let mut a = Args {
        printers: 1000,
        duration_s: 20,
        print_ms: (1000, 3000),
        no_build: false,
        streams: 10,
        mosquitto: false,
        soak_s: 0,
        pullers: 0,
        pull_mb: 50,
        outgoing: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--printers" => {
                a.printers = val.parse().unwrap_or(a.printers);
                i += 1;
            }
            "--duration" => {
                a.duration_s = val.parse().unwrap_or(a.duration_s);
                i += 1;
            }
            "--print-ms" => {
                if let Some((lo, hi)) = val.split_once("..") {
                    if let (Ok(lo), Ok(hi)) = (lo.parse(), hi.parse()) {
                        a.print_ms = (lo, hi);
                    }
                }
                i += 1;
            }
            "--streams" => {
                a.streams = val.parse().unwrap_or(a.streams);
                i += 1;
            }
            "--soak" => {
                a.soak_s = val.parse().unwrap_or(a.soak_s);
                i += 1;
            }
            "--pullers" => {
                a.pullers = val.parse().unwrap_or(a.pullers);
                i += 1;
            }
            "--pull-mb" => {
                a.pull_mb = val.parse().unwrap_or(a.pull_mb).clamp(1, 2000);
                i += 1;
            }
            "--outgoing" => {
                a.outgoing = val.parse().ok();
                i += 1;
            }
            "--no-build" => a.no_build = true,
            "--broker" => {
                a.mosquitto = val == "mosquitto";
                i += 1;
            }
            _ => {} // `--bench` and friends from cargo
        }
        i += 1;
    }
    a
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn vm_hwm_kb(pid: &str) -> u64 {
    status_kb(pid, "VmHWM:")
}

/// A kB figure of `/proc/<pid>/status` (`VmHWM:`, `VmRSS:`).
fn status_kb(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// What every fake shares with the harness.
struct Shared {
    topics: Topics,
    sha: Sha256Hex,
    size: u64,
    print_ms: (u64, u64),
    start: Instant,
    connected: AtomicUsize,
    states_published: AtomicU64,
    starts_received: AtomicU64,
    jobs_finished: AtomicU64,
    /// Phase counts (truth): ready, printing, finished.
    ready: AtomicUsize,
    printing: AtomicUsize,
    finished: AtomicUsize,
    measuring: AtomicBool,
    /// Dispatch latency is sampled only for printers that went ready after this (ms since
    /// `start`): a printer ready since before a freeze waits on the freeze, not on dispatch.
    measure_since_ms: AtomicU64,
    /// The broker is being restarted: printing fakes finish when they lose it.
    outage: AtomicBool,
    /// No phase changes and no new starts.
    frozen: AtomicBool,
    latencies_us: Mutex<Vec<u64>>,
    /// `--pullers`: they go ready (and take their big jobs) when this is set.
    pull_go: AtomicBool,
    /// Each finished pull: (first request → last byte, bytes).
    pulls: Mutex<Vec<(Duration, u64)>>,
    /// Bytes the pullers received so far.
    pulled_bytes: AtomicU64,
    /// Chunk answers that were refusals (not found, bad range, unavailable).
    pull_refusals: AtomicU64,
}

impl Shared {
    fn measure_from_now(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.measure_since_ms.store(ms, Ordering::Relaxed);
    }

    fn count(&self, phase: PrinterPhase) -> Option<&AtomicUsize> {
        match phase {
            PrinterPhase::Ready => Some(&self.ready),
            PrinterPhase::Printing => Some(&self.printing),
            PrinterPhase::Finished => Some(&self.finished),
            _ => None,
        }
    }
}

struct Fake {
    id: PrinterId,
    n: u64,
    sh: Arc<Shared>,
    client: AsyncClient,
    epoch: u64,
    seq: u64,
    phase: PrinterPhase,
    job: Option<JobProgress>,
    recent: VecDeque<LedgerEntry>,
    ran: VecDeque<protocol::JobId>,
    ready_since: Instant,
    next_phase: Option<Instant>,
    next_heartbeat: Instant,
    rng: u64,
    last_cmd: Option<protocol::state::LastCommand>,
    /// `--pullers`: this printer pulls its job's file before printing, as a gateway does.
    puller: bool,
    pull: Option<Pull>,
}

/// A file being pulled: a window of [`PULL_WINDOW`] chunk requests in flight, as the gateway
/// keeps (`DEFAULT_CHUNK_WINDOW`). The fake does not decode or hash the chunks: on a farm that
/// is each Pi's work, not the supervisor's host's, and here it would take the CPU the
/// supervisor is being measured on.
struct Pull {
    sha: Sha256Hex,
    size: u64,
    /// The next offset to ask for.
    next: u64,
    /// Offsets asked for and not answered yet.
    asked: std::collections::BTreeSet<u64>,
    received: u64,
    started: Instant,
    requests: u64,
}

/// The bytes after `"key":` in a JSON object (no nesting: a chunk answer is flat).
fn after_key<'a>(json: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let pat = format!("\"{key}\":");
    let at = json.windows(pat.len()).position(|w| w == pat.as_bytes())?;
    Some(&json[at + pat.len()..])
}

/// A chunk answer's offset and decoded length, or `None` for a refusal or garbage.
fn chunk_offset_and_len(json: &[u8]) -> Option<(u64, u64)> {
    if !after_key(json, "status")?.starts_with(b"\"ok\"") {
        return None;
    }
    let digits = after_key(json, "offset")?;
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    let offset: u64 = std::str::from_utf8(&digits[..end]).ok()?.parse().ok()?;
    let data = after_key(json, "data_b64")?.strip_prefix(b"\"")?;
    let b64 = &data[..data.iter().position(|&b| b == b'"')?];
    let pad = b64.iter().rev().take_while(|&&b| b == b'=').count();
    Some((offset, (b64.len() / 4 * 3 - pad) as u64))
}

/// Chunk requests a puller keeps in flight (the gateway's default window).
const PULL_WINDOW: usize = 8;
/// Bytes per chunk request (the protocol's largest).
const PULL_CHUNK: u64 = 64 * 1024;

impl Fake {
    fn topic(&self, kind: fn(PrinterId) -> Topic) -> String {
        self.sh.topics.format(&kind(self.id.clone()))
    }

    fn rand(&mut self, lo: u64, hi: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        lo + self.rng % (hi - lo).max(1)
    }

    fn set_phase(&mut self, phase: PrinterPhase) {
        if let Some(c) = self.sh.count(self.phase) {
            c.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(c) = self.sh.count(phase) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.phase = phase;
    }

    fn publish_state(&mut self) {
        self.seq += 1;
        let s = StateSnapshot {
            v: Version,
            epoch: self.epoch,
            seq: self.seq,
            at_ms: unix_ms(),
            heartbeat_s: 10,
            phase: self.phase,
            bed_clear: self.phase == PrinterPhase::Ready,
            maintenance: false,
            job: self.job.clone(),
            temps: None,
            last_command: self.last_cmd.clone(),
            recent_jobs: self.recent.iter().cloned().collect(),
            error: None,
        };
        let t = self.topic(Topic::State);
        if self
            .client
            .try_publish(t, QoS::AtLeastOnce, true, s.encode())
            .is_ok()
        {
            self.sh.states_published.fetch_add(1, Ordering::Relaxed);
        }
        self.next_heartbeat = Instant::now() + Duration::from_secs(10);
    }

    fn birth(&mut self) {
        let meta = Meta {
            v: Version,
            printer_id: self.id.clone(),
            epoch: self.epoch,
            name: format!("bench {}", self.id),
            model: "fake".into(),
            firmware: None,
            build_volume: None,
            // Pullers take only the big files' jobs, the rest only the fleet's small ones.
            tags: vec![if self.puller { "pull" } else { "fleet" }.into()],
            gateway_version: "bench".into(),
        };
        let _ = self
            .client
            .try_subscribe(self.topic(Topic::Cmd), QoS::AtLeastOnce);
        if self.puller {
            let _ = self
                .client
                .try_subscribe(self.topic(Topic::FileChunk), QoS::AtLeastOnce);
        }
        let _ = self.client.try_publish(
            self.topic(Topic::Meta),
            QoS::AtLeastOnce,
            true,
            meta.encode(),
        );
        self.publish_state();
        let _ = self.client.try_publish(
            self.topic(Topic::Status),
            QoS::AtLeastOnce,
            true,
            Status::online(self.epoch, unix_ms()).encode(),
        );
    }

    fn result(
        &mut self,
        id: CommandId,
        status: ResultStatus,
        refusal: Option<(CommandErrorCode, &str)>,
    ) {
        let r = CommandResult {
            v: Version,
            id: id.clone(),
            status,
            reason: refusal.map(|(_, why)| why.to_owned()),
            code: refusal.map(|(code, _)| code),
            epoch: self.epoch,
            at_ms: unix_ms(),
            retry_after_ms: None,
        };
        self.last_cmd = Some(protocol::state::LastCommand { id, status });
        let _ = self.client.try_publish(
            self.topic(Topic::CmdResult),
            QoS::AtLeastOnce,
            false,
            r.encode(),
        );
    }

    fn on_command(&mut self, payload: &[u8]) {
        let Ok(cmd) = Command::decode(payload) else {
            return;
        };
        match cmd.action {
            CommandAction::StartJob(s) => {
                if self.sh.frozen.load(Ordering::Relaxed) {
                    return; // frozen fleet: the start is lost (the supervisor retries later)
                }
                if self.phase != PrinterPhase::Ready || self.ran.contains(&s.job_id) {
                    self.result(
                        cmd.id,
                        ResultStatus::Error,
                        Some((CommandErrorCode::NotReady, "not ready")),
                    );
                    return;
                }
                if self.puller {
                    self.start_pull(cmd.id, s);
                    return;
                }
                let since = self.sh.start
                    + Duration::from_millis(self.sh.measure_since_ms.load(Ordering::Relaxed));
                if self.sh.measuring.load(Ordering::Relaxed) && self.ready_since >= since {
                    let us = self.ready_since.elapsed().as_micros() as u64;
                    if let Ok(mut l) = self.sh.latencies_us.lock() {
                        l.push(us);
                    }
                }
                self.sh.starts_received.fetch_add(1, Ordering::Relaxed);
                self.result(cmd.id, ResultStatus::Ok, None);
                self.ran.push_front(s.job_id.clone());
                self.ran.truncate(16);
                self.job = Some(JobProgress {
                    job_id: s.job_id,
                    file_sha256: s.file_sha256,
                    name: s.name,
                    stage: JobStage::Printing,
                    line: 0,
                    total_lines: 100,
                    progress_pct: 0.0,
                    remaining_s: None,
                    transferred_bytes: None,
                    size_bytes: s.size_bytes,
                    started_at_ms: Some(unix_ms()),
                    ended_at_ms: None,
                    reason: None,
                });
                self.set_phase(PrinterPhase::Printing);
                let (lo, hi) = self.sh.print_ms;
                let d = self.rand(lo, hi);
                self.next_phase = Some(Instant::now() + Duration::from_millis(d));
                self.publish_state();
            }
            CommandAction::Rebirth(_) => {
                self.result(cmd.id, ResultStatus::Ok, None);
                self.birth();
            }
            _ => self.result(cmd.id, ResultStatus::Ok, None),
        }
    }

    /// Printing → finished (the job into the ledger) → ready.
    fn advance(&mut self) {
        match self.phase {
            PrinterPhase::Printing => {
                let now = unix_ms();
                if let Some(j) = self.job.as_mut() {
                    j.stage = JobStage::Finished;
                    j.line = j.total_lines;
                    j.progress_pct = 100.0;
                    j.ended_at_ms = Some(now);
                    self.recent.push_front(LedgerEntry {
                        job_id: j.job_id.clone(),
                        outcome: JobStage::Finished,
                        line: j.line,
                        ended_at_ms: now,
                    });
                    self.recent.truncate(5);
                }
                self.sh.jobs_finished.fetch_add(1, Ordering::Relaxed);
                self.set_phase(PrinterPhase::Finished);
                let d = self.rand(200, 500);
                self.next_phase = Some(Instant::now() + Duration::from_millis(d));
            }
            PrinterPhase::Finished => {
                self.job = None;
                self.set_phase(PrinterPhase::Ready);
                self.ready_since = Instant::now();
                self.next_phase = None;
            }
            // A puller waits (not ready) until the big files are queued.
            PrinterPhase::Idle if self.sh.pull_go.load(Ordering::Relaxed) => {
                self.set_phase(PrinterPhase::Ready);
                self.ready_since = Instant::now();
                self.next_phase = None;
            }
            PrinterPhase::Idle => {
                self.next_phase = Some(Instant::now() + Duration::from_millis(200));
            }
            _ => self.next_phase = None,
        }
    }

    /// A puller's start: accepted, then the file pulled a window at a time; printing once
    /// every byte is in.
    fn start_pull(&mut self, id: CommandId, s: protocol::command::StartJob) {
        self.result(id, ResultStatus::Ok, None);
        self.ran.push_front(s.job_id.clone());
        self.ran.truncate(16);
        self.pull = Some(Pull {
            sha: s.file_sha256.clone(),
            size: s.size_bytes,
            next: 0,
            asked: Default::default(),
            received: 0,
            started: Instant::now(),
            requests: 0,
        });
        self.job = Some(JobProgress {
            job_id: s.job_id,
            file_sha256: s.file_sha256,
            name: s.name,
            stage: JobStage::Transferring,
            line: 0,
            total_lines: 100,
            progress_pct: 0.0,
            remaining_s: None,
            transferred_bytes: Some(0),
            size_bytes: s.size_bytes,
            started_at_ms: None,
            ended_at_ms: None,
            reason: None,
        });
        self.set_phase(PrinterPhase::Preparing);
        self.publish_state();
        self.ask_chunks();
    }

    /// Fills the window of chunk requests.
    fn ask_chunks(&mut self) {
        let topic = self.topic(Topic::FileRequest);
        let Some(pull) = self.pull.as_mut() else {
            return;
        };
        while pull.asked.len() < PULL_WINDOW && pull.next < pull.size {
            pull.requests += 1;
            let req = protocol::files::FileChunkRequest {
                v: Version,
                request_id: CommandId::new(format!("pull-{}-{}", self.n, pull.requests))
                    .expect("valid id"),
                sha256: pull.sha.clone(),
                offset: pull.next,
                len: PULL_CHUNK.min(pull.size - pull.next) as u32,
            };
            if self
                .client
                .try_publish(topic.clone(), QoS::AtLeastOnce, false, req.encode())
                .is_err()
            {
                break; // the client's queue is full: asked again on the next answer
            }
            pull.asked.insert(pull.next);
            pull.next += u64::from(req.len);
        }
    }

    /// A chunk (or a refusal) for the file being pulled. Read the cheap way (the offset and
    /// the length of the base64 text, found in the bytes): a real gateway's parsing is its
    /// Pi's work, and here it would be the harness's CPU, not the supervisor's.
    fn on_chunk(&mut self, payload: &[u8]) {
        let Some(pull) = self.pull.as_mut() else {
            return;
        };
        match chunk_offset_and_len(payload) {
            Some((offset, len)) if pull.asked.remove(&offset) => {
                pull.received += len;
                self.sh.pulled_bytes.fetch_add(len, Ordering::Relaxed);
            }
            Some(_) => return, // a duplicate (QoS 1)
            None => {
                // Asked again from the start of what is missing, a window at a time.
                self.sh.pull_refusals.fetch_add(1, Ordering::Relaxed);
                if let Some(&first) = pull.asked.iter().next() {
                    pull.next = first;
                }
                pull.asked.clear();
            }
        }
        if pull.received >= pull.size && pull.asked.is_empty() {
            let took = pull.started.elapsed();
            if let Ok(mut p) = self.sh.pulls.lock() {
                p.push((took, pull.size));
            }
            self.pull = None;
            if let Some(j) = self.job.as_mut() {
                j.stage = JobStage::Printing;
                j.transferred_bytes = Some(j.size_bytes);
                j.started_at_ms = Some(unix_ms());
            }
            self.set_phase(PrinterPhase::Printing);
            let (lo, hi) = self.sh.print_ms;
            let d = self.rand(lo, hi);
            self.next_phase = Some(Instant::now() + Duration::from_millis(d));
            self.publish_state();
            return;
        }
        if let (Some(j), Some(pull)) = (self.job.as_mut(), self.pull.as_ref()) {
            j.transferred_bytes = Some(pull.received);
        }
        self.ask_chunks();
    }

    async fn run(mut self, el: rumqttc::EventLoop) {
        // printloop's one forwarding task, as a gateway uses it: backoff, a will per connection.
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let forwarding = Forwarding {
            reconnect: Reconnect::Backoff {
                max: Duration::from_secs(5),
                seed: self.n,
            },
            ..Forwarding::default()
        };
        let _forward = transport::forward::spawn(el, forwarding, Out::Bounded(tx));
        let mut online = false;
        loop {
            let wake = self
                .next_phase
                .unwrap_or(self.next_heartbeat)
                .min(self.next_heartbeat);
            tokio::select! {
                ev = rx.recv() => match ev {
                    None => return,
                    Some(MqttEvent::Connected { .. }) => {
                        if !online {
                            online = true;
                            self.sh.connected.fetch_add(1, Ordering::Relaxed);
                        }
                        self.seq = 0;
                        self.birth();
                        if let Some(pull) = self.pull.as_mut() {
                            // What was asked on the lost connection is asked again.
                            if let Some(&first) = pull.asked.iter().next() {
                                pull.next = first;
                            }
                            pull.asked.clear();
                            self.ask_chunks();
                        }
                    }
                    Some(MqttEvent::Message(p)) if p.topic.ends_with("/file/chunk") => {
                        self.on_chunk(&p.payload);
                    }
                    Some(MqttEvent::Message(p)) => self.on_command(&p.payload),
                    Some(MqttEvent::Down { next_will, .. }) => {
                        if online {
                            online = false;
                            self.sh.connected.fetch_sub(1, Ordering::Relaxed);
                        }
                        if self.sh.outage.load(Ordering::Relaxed) && self.phase == PrinterPhase::Printing {
                            // Finishes while nobody can hear it: only its ledger will tell. (It
                            // goes ready again once the fleet is no longer frozen.)
                            self.advance();
                        }
                        // The next connection's will carries the next epoch.
                        self.epoch += 1;
                        if let Some(next) = next_will {
                            let _ = next.send(LastWill::new(
                                self.topic(Topic::Status),
                                Status::offline(self.epoch, unix_ms(), None).encode(),
                                QoS::AtLeastOnce,
                                true,
                            ));
                        }
                    }
                    Some(_) => {}
                },
                _ = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    if self.next_phase.is_some_and(|t| t <= now) {
                        if self.sh.frozen.load(Ordering::Relaxed) {
                            // Thawed, the fleet's held-back changes come spread over 5 s (as
                            // beds are cleared), not all in one instant.
                            let d = self.rand(200, 5_000);
                            self.next_phase = Some(now + Duration::from_millis(d));
                        } else {
                            self.advance();
                            if online { self.publish_state(); } else { self.next_heartbeat = now + Duration::from_secs(10); }
                        }
                    } else if online {
                        self.publish_state();
                    } else {
                        self.next_heartbeat = now + Duration::from_secs(10);
                    }
                }
            }
        }
    }
}

/// The pullers' own runtime: one thread at a lower CPU priority. Fifty gateways pulling files
/// are fifty Pis on a farm; here their work must not take the CPU from the fakes that time
/// dispatch (nor from the supervisor being measured).
fn puller_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-pullers")
        .on_thread_start(|| supervisor::run::lower_this_threads_priority(10))
        .enable_all()
        .build()
}

fn spawn_fake(i: usize, port: u16, sh: Arc<Shared>, puller: Option<&tokio::runtime::Handle>) {
    let is_puller = puller.is_some();
    let id = PrinterId::new(format!("p{i:05}")).expect("valid printer id");
    let epoch = 1;
    let mut o = MqttOptions::new(format!("bench-gw-{id}"), "127.0.0.1", port);
    o.set_clean_session(false)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(256 * 1024, 256 * 1024)
        .set_last_will(LastWill::new(
            sh.topics.format(&Topic::Status(id.clone())),
            Status::offline(epoch, unix_ms(), None).encode(),
            QoS::AtLeastOnce,
            true,
        ));
    let (client, mut el) = AsyncClient::new(o, 64);
    el.set_network_options(transport::network_options());
    if !is_puller {
        sh.ready.fetch_add(1, Ordering::Relaxed);
    }
    let fake = Fake {
        id,
        n: i as u64,
        sh,
        client,
        epoch,
        seq: 0,
        phase: if is_puller {
            PrinterPhase::Idle
        } else {
            PrinterPhase::Ready
        },
        job: None,
        recent: VecDeque::new(),
        ran: VecDeque::new(),
        ready_since: Instant::now(),
        next_phase: is_puller.then(|| Instant::now() + Duration::from_millis(200)),
        next_heartbeat: Instant::now() + Duration::from_secs(10),
        rng: (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        last_cmd: None,
        puller: is_puller,
        pull: None,
    };
    match puller {
        Some(rt) => drop(rt.spawn(fake.run(el))),
        None => drop(tokio::spawn(fake.run(el))),
    }
}

/// The operator: uploads one file, submits jobs, reads answers.
struct Operator {
    client: AsyncClient,
    topics: Topics,
    next: u64,
    answers: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
}

impl Operator {
    async fn connect(port: u16, topics: Topics) -> Operator {
        let o = MqttOptions::new("bench-operator", "127.0.0.1", port);
        let mut o = o;
        o.set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024)
            .set_keep_alive(Duration::from_secs(30));
        let (client, el) = AsyncClient::new(o, 64);
        let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let forwarding = Forwarding {
            reconnect: Reconnect::After(Duration::from_millis(200)),
            ..Forwarding::default()
        };
        transport::forward::spawn(el, forwarding, Out::Unbounded(tx));
        let (answers_tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let resp = topics.format(&Topic::ApiResponse(
            protocol::ClientId::new("bench-operator").expect("valid"),
        ));
        let c = client.clone();
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                match ev {
                    // A clean session: subscribe again on every connection (a restarted
                    // broker has forgotten it).
                    MqttEvent::Connected { .. } => {
                        let _ = c.try_subscribe(resp.clone(), QoS::AtLeastOnce);
                    }
                    MqttEvent::Message(p) => {
                        let _ = answers_tx.send(p.payload.to_vec());
                    }
                    _ => {}
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        Operator {
            client,
            topics,
            next: 0,
            answers: rx,
        }
    }

    async fn request(&mut self, op: serde_json::Value) -> Result<serde_json::Value, BoxError> {
        self.next += 1;
        let id = format!("bench-{}", self.next);
        let mut req = op;
        req["v"] = 1.into();
        req["id"] = id.clone().into();
        req["client"] = "bench-operator".into();
        self.client
            .publish(
                self.topics.format(&Topic::ApiRequest),
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&req)?,
            )
            .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some(bytes)) = tokio::time::timeout(left, self.answers.recv()).await else {
                return Err(format!("no answer to {id}").into());
            };
            let v: serde_json::Value = serde_json::from_slice(&bytes)?;
            if v["id"] == id.as_str() {
                if v["ok"] != true {
                    return Err(format!("{id} refused: {}", v["error"]).into());
                }
                return Ok(v);
            }
        }
    }
}

async fn scrape(addr: std::net::SocketAddr) -> Option<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    Some(body)
}

fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

fn locate_printloop(no_build: bool) -> Result<PathBuf, BoxError> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let built = target.join("release").join("printloop");
    // The supervisor and the broker run from it: it is brought up to date first (quick when
    // it is), unless --no-build.
    if no_build && built.exists() {
        println!(
            "printloop binary: {} (not rebuilt: --no-build)",
            built.display()
        );
        return Ok(built);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("building printloop (release) for the supervisor and broker child processes…");
    let st = std::process::Command::new(cargo)
        .args(["build", "--release", "--quiet", "--bin", "printloop"])
        .current_dir(&root)
        .status()?;
    if !st.success() {
        return Err("cargo build --release --bin printloop failed".into());
    }
    Ok(built)
}

fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    getrlimit(Resource::RLIMIT_NOFILE).map_or(0, |(s, _)| s)
}

fn main() -> Result<(), BoxError> {
    let args = parse_args();
    let n = args.printers;
    let nofile = raise_nofile();
    println!(
        "fleet bench: {n} printers, steady window {} s, prints {}..{} ms, nofile {nofile}, {} cpus",
        args.duration_s,
        args.print_ms.0,
        args.print_ms.1,
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    let binary = locate_printloop(args.no_build)?;
    // A bench-only copy of the shipped broker.toml, sized for the fleet (docs/broker.md: the
    // QoS 0 retained cap must exceed 3 x printers).
    let dir = tempfile::tempdir()?;
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../broker.toml");
    let mut table: toml::Table = toml::from_str(&std::fs::read_to_string(&shipped)?)?;
    if let Some(router) = table.get_mut("router").and_then(|r| r.as_table_mut()) {
        router.insert("max_connections".into(), ((n + 100) as i64).into());
        router.insert(
            "max_outgoing_packet_count".into(),
            (args.outgoing.unwrap_or((3 * n + 100).max(1000)) as i64).into(),
        );
    }
    let cfg = dir.path().join("broker.toml");
    std::fs::write(&cfg, toml::to_string(&table)?)?;
    let mut broker = if args.mosquitto {
        // docs/mosquitto.conf's limits; no persistence, so a restart forgets everything, as
        // rumqttd does (the harder case for reconciliation).
        Broker::Mosquitto(testkit::Mosquitto::start_with(testkit::MosquittoOptions {
            extra_lines: vec![
                "max_packet_size 1048576".into(),
                "max_queued_messages 10000".into(),
                "max_inflight_messages 20".into(),
            ],
            ..Default::default()
        })?)
    } else {
        Broker::Rumqttd(BrokerProcess::start(&binary, &cfg)?)
    };
    let port = broker.port();
    println!(
        "broker: pid {:?} port {port}, max_connections {}, max_outgoing_packet_count {}",
        broker.pid(),
        n + 100,
        args.outgoing.unwrap_or((3 * n + 100).max(1000))
    );

    // The supervisor: `printloop supervisor`, its own process as in production, so that its
    // memory is measured apart from the fakes and it can be killed -9 (`--soak`).
    let sup_dir = dir.path().join("supervisor");
    // The dashboard's viewer (a wall screen's token).
    let token = supervisor::http::tokens::add(
        &sup_dir.join(supervisor::http::tokens::TOKENS_FILE),
        "bench",
        protocol::web::Role::Viewer,
        0,
    )?;
    let mut sup = SupervisorProc::new(&binary, port, &sup_dir, dir.path())?;
    sup.start()?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let pullers = puller_runtime()?;
    let result = rt.block_on(async {
        sup.wait_ready(Duration::from_secs(30)).await?;
        drive(
            &args,
            port,
            (sup.web, token),
            &mut broker,
            &mut sup,
            &pullers,
        )
        .await
    });
    pullers.shutdown_background();
    let sup_hwm = sup.pid().map_or(0, |p| vm_hwm_kb(&p.to_string()));
    sup.kill9();
    let broker_hwm = broker.pid().map_or(0, |p| vm_hwm_kb(&p.to_string()));
    broker.kill();
    let r = result?;
    let own_hwm = vm_hwm_kb("self");
    println!(
        "peak RSS (VmHWM): supervisor {sup_hwm} kB ({:.1} kB per printer, its last life if --soak killed it), broker {broker_hwm} kB, bench process ({n} fakes, not measured) {own_hwm} kB",
        sup_hwm as f64 / n as f64
    );
    if !r.rss.is_empty() {
        println!("supervisor RSS over the run (VmRSS, kB):");
        for (what, kb) in &r.rss {
            println!(
                "  {what}: {kb} kB ({:.1} kB per printer)",
                *kb as f64 / n as f64
            );
        }
    }
    let sustained = r.online == n
        && r.p99 < 50.0
        && r.max < 1000.0
        && r.reconcile_s.is_some()
        && r.restart_s.iter().all(Option::is_some)
        && r.web.p99_streams < 50.0
        && r.web.first_load_ms < 1000.0;
    println!(
        "verdict: {} ({n} printers: {} online, dispatch p99 {:.1} ms; with {} live streams p99 {:.1} ms; first page load {:.0} ms)",
        if sustained {
            "SUSTAINED"
        } else {
            "NOT sustained"
        },
        r.online,
        r.p99,
        r.web.streams,
        r.web.p99_streams,
        r.web.first_load_ms
    );
    let json = serde_json::json!({
        "printers": n,
        "broker": if args.mosquitto { "mosquitto" } else { "rumqttd" },
        "printers_online": r.online,
        "state_msgs_per_s": (r.states_per_s * 10.0).round() / 10.0,
        "dispatch_p50_ms": (r.p50 * 100.0).round() / 100.0,
        "dispatch_p99_ms": (r.p99 * 100.0).round() / 100.0,
        "dispatch_max_ms": (r.max * 10.0).round() / 10.0,
        "broker_peak_rss_kb": broker_hwm,
        "reconcile_after_broker_restart_s": r.reconcile_s.map(|s| (s * 100.0).round() / 100.0),
        "supervisor_peak_rss_kb": sup_hwm,
        "supervisor_rss_kb": r.rss.iter().map(|(w, kb)| serde_json::json!({"at": w, "kb": kb})).collect::<Vec<_>>(),
        "reconcile_after_supervisor_kill_s": r.restart_s,
        "soak_phases": r.phases.iter().map(|p| serde_json::json!({"phase": p.0, "p50_ms": p.1, "p99_ms": p.2, "max_ms": p.3, "starts": p.4})).collect::<Vec<_>>(),
        "bench_process_peak_rss_kb": own_hwm,
        "stream_clients": r.web.streams,
        "dispatch_p99_ms_no_streams": (r.web.p99_no_streams * 100.0).round() / 100.0,
        "dispatch_p99_ms_streams": (r.web.p99_streams * 100.0).round() / 100.0,
        "stream_bytes_per_s_per_client": r.web.bytes_per_s.round(),
        "stream_frames_per_s_per_client": (r.web.frames_per_s * 100.0).round() / 100.0,
        "first_load_ms": (r.web.first_load_ms * 10.0).round() / 10.0,
        "fleet_json_bytes": r.web.fleet_bytes,
        "pulls": r.pulls.as_ref().map(|p| serde_json::json!({
            "pullers": args.pullers,
            "file_mb": args.pull_mb,
            "upload_s": (p.upload_s * 10.0).round() / 10.0,
            "pulled": p.done,
            "window_s": (p.window_s * 10.0).round() / 10.0,
            "total_mb_s": (p.total_mb_s * 10.0).round() / 10.0,
            "pull_s_min": (p.pull_s.0 * 10.0).round() / 10.0,
            "pull_s_median": (p.pull_s.1 * 10.0).round() / 10.0,
            "pull_s_max": (p.pull_s.2 * 10.0).round() / 10.0,
            "refusals": p.refusals,
            "dispatch_p50_ms": (p.p50 * 100.0).round() / 100.0,
            "dispatch_p99_ms": (p.p99 * 100.0).round() / 100.0,
            "dispatch_max_ms": (p.max * 10.0).round() / 10.0,
            "starts": p.starts,
        })),
    });
    println!("{json}");
    Ok(())
}

struct Report {
    /// `--pullers`.
    pulls: Option<PullReport>,
    web: Web,
    /// Supervisor VmRSS at named points of the run.
    rss: Vec<(String, u64)>,
    /// `--soak`: reconcile time after each supervisor kill -9.
    restart_s: Vec<Option<f64>>,
    /// `--soak`: dispatch p50/p99/max (ms) and starts per phase.
    phases: Vec<(String, f64, f64, f64, usize)>,
    online: usize,
    states_per_s: f64,
    p50: f64,
    p99: f64,
    max: f64,
    reconcile_s: Option<f64>,
}

/// The dashboard's figures.
#[derive(Debug, Default)]
struct Web {
    streams: usize,
    p99_no_streams: f64,
    p99_streams: f64,
    bytes_per_s: f64,
    frames_per_s: f64,
    first_load_ms: f64,
    fleet_bytes: usize,
}

/// One live stream, as a browser holds it: counts bytes and frames until `stop`.
async fn stream_reader(
    web: std::net::SocketAddr,
    token: String,
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    frames: Arc<AtomicU64>,
) {
    let Ok(mut s) = tokio::net::TcpStream::connect(web).await else {
        return;
    };
    let req =
        format!("GET /api/v1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(k)) => {
                bytes.fetch_add(k as u64, Ordering::Relaxed);
                let f = buf[..k].windows(7).filter(|w| w == b"event: ").count();
                frames.fetch_add(f as u64, Ordering::Relaxed);
            }
            Err(_) => {}
        }
    }
}

/// A new browser's first paint: the page, then the fleet's initial state (ms, and its bytes).
async fn first_load(web: std::net::SocketAddr, token: &str) -> Result<(f64, usize), BoxError> {
    let t = Instant::now();
    let page = http_get(web, "/", token).await?;
    let fleet = http_get(web, "/api/v1/fleet", token).await?;
    if !page.contains("<html") || !fleet.contains("\"printers\"") {
        return Err("the page or the fleet did not load".into());
    }
    Ok((t.elapsed().as_secs_f64() * 1000.0, fleet.len()))
}

async fn http_get(web: std::net::SocketAddr, path: &str, token: &str) -> Result<String, BoxError> {
    let mut s = tokio::net::TcpStream::connect(web).await?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut body)).await??;
    Ok(body)
}

async fn drive(
    args: &Args,
    port: u16,
    (web_addr, token): (std::net::SocketAddr, String),
    broker: &mut Broker,
    sup: &mut SupervisorProc,
    pullers: &tokio::runtime::Runtime,
) -> Result<Report, BoxError> {
    let metrics = sup.metrics;
    let mut rss: Vec<(String, u64)> = vec![("started, jobs queued".into(), 0)];
    let n = args.printers;
    let topics = Topics::default();
    let gcode = b"G28\nG1 X10 Y10 F3000\nG1 X0 Y0\nM84\n".to_vec();
    let sha = Sha256Hex::digest(&gcode);
    let sh = Arc::new(Shared {
        topics: topics.clone(),
        sha: sha.clone(),
        size: gcode.len() as u64,
        print_ms: args.print_ms,
        start: Instant::now(),
        connected: AtomicUsize::new(0),
        states_published: AtomicU64::new(0),
        starts_received: AtomicU64::new(0),
        jobs_finished: AtomicU64::new(0),
        ready: AtomicUsize::new(0),
        printing: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
        measuring: AtomicBool::new(false),
        measure_since_ms: AtomicU64::new(0),
        outage: AtomicBool::new(false),
        frozen: AtomicBool::new(false),
        latencies_us: Mutex::new(Vec::new()),
        pull_go: AtomicBool::new(false),
        pulls: Mutex::new(Vec::new()),
        pulled_bytes: AtomicU64::new(0),
        pull_refusals: AtomicU64::new(0),
    });
    let _ = sh.size;

    // Upload the file and queue a first batch before the fleet arrives.
    let mut op = Operator::connect(port, topics.clone()).await;
    use base64::Engine as _;
    op.request(serde_json::json!({"op": "upload_chunk", "args": {
        "sha256": sha.as_str(), "offset": 0, "total_size": gcode.len(),
        "data_b64": base64::engine::general_purpose::STANDARD.encode(&gcode)}}))
        .await?;
    let mut submitted: u64 = 0;
    let target_backlog = n as u64;
    let submit = |copies: u64| {
        serde_json::json!({"op": "submit_job", "args": {
            "name": "bench.gcode", "sha256": sha.as_str(), "copies": copies, "tags": ["fleet"]}})
    };
    while submitted < target_backlog {
        let c = (target_backlog - submitted).min(1000);
        op.request(submit(c)).await?;
        submitted += c;
    }
    println!("queued {submitted} jobs");
    rss[0].1 = sup.rss_kb();

    // The fleet connects (rumqttd accepts ~1000 connections/s: next_connection_delay_ms = 1).
    let t0 = Instant::now();
    for i in 0..n {
        // The last `--pullers` of the fleet pull their files, on their own runtime.
        let puller = (i >= n - args.pullers.min(n)).then(|| pullers.handle());
        spawn_fake(i, port, sh.clone(), puller);
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60 + n as u64 / 200);
    while sh.connected.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{} of {n} fakes connected in {:.1} s",
        sh.connected.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64()
    );

    // Keep the backlog full: every 200 ms top the queue up to ~n jobs not yet started.
    let keep_fed = |submitted: &mut u64| {
        let started = sh.starts_received.load(Ordering::Relaxed);
        let outstanding = submitted.saturating_sub(started);
        (outstanding < target_backlog).then(|| {
            let c = (target_backlog - outstanding).min(1000);
            *submitted += c;
            submit(c)
        })
    };
    let mut min_queued = f64::INFINITY;
    let warm_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < warm_until {
        if let Some(req) = keep_fed(&mut submitted) {
            if let Err(e) = op.request(req).await {
                println!("operator: {e} (the supervisor is behind)");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    rss.push(("fleet connected, warmed up".into(), sup.rss_kb()));
    // Steady window.
    sh.measuring.store(true, Ordering::Relaxed);
    let s0 = sh.states_published.load(Ordering::Relaxed);
    let st0 = sh.starts_received.load(Ordering::Relaxed);
    let w0 = Instant::now();
    let mut last_scrape = Instant::now();
    // The second half of the window with the browsers' live streams.
    let half = Duration::from_secs(args.duration_s) / 2;
    let stop_streams = Arc::new(AtomicBool::new(false));
    let stream_bytes = Arc::new(AtomicU64::new(0));
    let stream_frames = Arc::new(AtomicU64::new(0));
    let mut streams_since: Option<Instant> = None;
    let mut web = Web {
        streams: args.streams,
        ..Web::default()
    };
    let mut lat_a: Vec<u64> = Vec::new();
    let mut loads: Vec<f64> = Vec::new();
    while w0.elapsed() < Duration::from_secs(args.duration_s) {
        if streams_since.is_none() && w0.elapsed() >= half {
            lat_a = sh.latencies_us.lock().map_err(|_| "poisoned")?.clone();
            for _ in 0..args.streams {
                tokio::spawn(stream_reader(
                    web_addr,
                    token.clone(),
                    stop_streams.clone(),
                    stream_bytes.clone(),
                    stream_frames.clone(),
                ));
            }
            streams_since = Some(Instant::now());
        }
        if let Some(since) = streams_since {
            // A few new browsers arrive while the others watch.
            if loads.len() < 5 && since.elapsed() > Duration::from_secs(1 + loads.len() as u64) {
                let (ms, bytes) = first_load(web_addr, &token).await?;
                loads.push(ms);
                web.fleet_bytes = bytes;
            }
        }
        if let Some(req) = keep_fed(&mut submitted) {
            if let Err(e) = op.request(req).await {
                println!("operator: {e} (the supervisor is behind)");
            }
        }
        if last_scrape.elapsed() > Duration::from_secs(1) {
            last_scrape = Instant::now();
            if let Some(m) = scrape(metrics).await {
                if let Some(q) = gauge(&m, "printloop_jobs{state=\"queued\"}") {
                    min_queued = min_queued.min(q);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let secs = w0.elapsed().as_secs_f64();
    sh.measuring.store(false, Ordering::Relaxed);
    stop_streams.store(true, Ordering::Relaxed);
    if let Some(since) = streams_since {
        let s = since.elapsed().as_secs_f64() * args.streams.max(1) as f64;
        web.bytes_per_s = stream_bytes.load(Ordering::Relaxed) as f64 / s;
        web.frames_per_s = stream_frames.load(Ordering::Relaxed) as f64 / s;
    }
    web.first_load_ms = loads.iter().copied().fold(0.0, f64::max);
    let states = sh.states_published.load(Ordering::Relaxed) - s0;
    let starts = sh.starts_received.load(Ordering::Relaxed) - st0;
    let online = sh.connected.load(Ordering::Relaxed);
    let mut lat = std::mem::take(&mut *sh.latencies_us.lock().map_err(|_| "poisoned")?);
    // Samples are appended: the first `lat_a.len()` are the half without streams.
    let mut lat_b = lat.split_off(lat_a.len().min(lat.len()));
    lat_a.sort_unstable();
    lat_b.sort_unstable();
    web.p99_no_streams = pct(&lat_a, 0.99);
    web.p99_streams = pct(&lat_b, 0.99);
    lat.extend(lat_b.iter().copied());
    lat.sort_unstable();
    let (p50, p99) = (pct(&lat, 0.5), pct(&lat, 0.99));
    println!(
        "dashboard: {} live streams in the second half: dispatch p99 {:.2} ms without, {:.2} ms with; {:.0} bytes/s and {:.2} frames/s per stream; first page load (HTML + {} bytes of fleet state) worst {:.0} ms of {}",
        web.streams,
        web.p99_no_streams,
        web.p99_streams,
        web.bytes_per_s,
        web.frames_per_s,
        web.fleet_bytes,
        web.first_load_ms,
        loads.len()
    );
    println!(
        "steady {secs:.1} s: {online}/{n} online, {:.0} states/s, {:.0} starts/s, dispatch (ready -> start_job at the printer) p50 {p50:.2} ms p99 {p99:.2} ms max {:.1} ms over {} starts, smallest queued backlog seen {min_queued}",
        states as f64 / secs,
        starts as f64 / secs,
        lat.last().copied().unwrap_or(0) as f64 / 1000.0,
        lat.len()
    );
    if let Some(m) = scrape(metrics).await {
        println!(
            "supervisor view vs fakes: printing {:?} vs {}, ready {:?} vs {}, jobs finished {:?} vs {} (+ in flight)",
            gauge(&m, "printloop_printers_phase{phase=\"printing\"}"),
            sh.printing.load(Ordering::Relaxed),
            gauge(&m, "printloop_printers_phase{phase=\"ready\"}"),
            sh.ready.load(Ordering::Relaxed),
            gauge(&m, "printloop_jobs{state=\"finished\"}")
                .zip(gauge(&m, "printloop_jobs{state=\"done\"}"))
                .map(|(f, d)| f + d),
            sh.jobs_finished.load(Ordering::Relaxed),
        );
    }

    let pulls = if args.pullers > 0 {
        let run = (&mut op, &mut submitted, target_backlog);
        Some(pull_phase(args, port, &sh, run, sup).await?)
    } else {
        None
    };

    rss.push(("end of the steady window".into(), sup.rss_kb()));

    // Broker restart: kill it, printing fakes finish while it is down, freeze, start it again.
    sh.outage.store(true, Ordering::Relaxed);
    sh.frozen.store(true, Ordering::Relaxed);
    let tk = Instant::now();
    broker.kill();
    let down_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < down_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "broker killed; {} fakes still think they are connected after 2 s",
        sh.connected.load(Ordering::Relaxed)
    );
    let b = tokio::task::block_in_place(|| broker.start_again());
    b?;
    println!("broker up again after {:.2} s", tk.elapsed().as_secs_f64());
    let reconcile_s = reconciled(&sh, metrics, n, "the broker was ready", 0).await;
    rss.push(("reconciled after the broker restart".into(), sup.rss_kb()));

    // --soak: go on printing, kill -9 the supervisor half way, go on to the end.
    let mut restart_s = Vec::new();
    let mut phases = Vec::new();
    if args.soak_s > 0 {
        let half = Duration::from_secs(args.soak_s / 2);
        sh.outage.store(false, Ordering::Relaxed);
        let burst = Duration::from_secs(20).min(half / 2);
        let run = (target_backlog, burst, half - burst);
        phases.extend(thaw("the broker restart", &sh, &mut op, &mut submitted, run, sup).await?);
        rss.push(("before the supervisor kill -9".into(), sup.rss_kb()));

        // kill -9: the fleet goes on finishing prints while the supervisor is gone.
        sup.kill9();
        println!("supervisor killed -9");
        tokio::time::sleep(Duration::from_secs(3)).await;
        sh.frozen.store(true, Ordering::Relaxed);
        sh.measuring.store(false, Ordering::Relaxed);
        // Jobs its first life archived: its counter starts again from 0.
        let archived_before = sup.archived_jobs();
        tokio::task::block_in_place(|| sup.start())?;
        sup.wait_ready(Duration::from_secs(60)).await?;
        restart_s
            .push(reconciled(&sh, metrics, n, "the supervisor restarted", archived_before).await);
        rss.push((
            "reconciled after the supervisor restart".into(),
            sup.rss_kb(),
        ));
        phases.extend(
            thaw(
                "the supervisor restart",
                &sh,
                &mut op,
                &mut submitted,
                run,
                sup,
            )
            .await?,
        );
        sh.measuring.store(false, Ordering::Relaxed);
        rss.push(("end of the soak".into(), sup.rss_kb()));
        if let Some(m) = scrape(metrics).await {
            println!(
                "soak: {} jobs finished by the fakes; supervisor holds {:?} done + {:?} finished, archived {:?}",
                sh.jobs_finished.load(Ordering::Relaxed),
                gauge(&m, "printloop_jobs{state=\"done\"}"),
                gauge(&m, "printloop_jobs{state=\"finished\"}"),
                gauge(&m, "printloop_jobs_archived_total"),
            );
        }
    }
    Ok(Report {
        pulls,
        web,
        rss,
        restart_s,
        phases,
        online,
        states_per_s: states as f64 / secs,
        p50,
        p99,
        max: lat.last().copied().unwrap_or(0) as f64 / 1000.0,
        reconcile_s,
    })
}

/// `--pullers`: what the pull window measured.
struct PullReport {
    upload_s: f64,
    done: usize,
    window_s: f64,
    total_mb_s: f64,
    /// Per pull: min, median, max seconds.
    pull_s: (f64, f64, f64),
    refusals: u64,
    /// Dispatch of the rest of the fleet during the pulls.
    p50: f64,
    p99: f64,
    max: f64,
    starts: usize,
}

/// Writes a valid G-code file of at least `size` bytes, different for each `k`.
fn write_pull_file(path: &std::path::Path, k: usize, size: u64) -> Result<(), BoxError> {
    Ok(testkit::gcode::write_repeated(
        path,
        size,
        &format!("fleet bench puller {k}"),
    )?)
}

/// `--pullers K --pull-mb M`: K different files of M MB are uploaded with the real CLI
/// (`printloop jobs add --tag pull`) while the fleet prints; then the K pullers go ready at
/// once, take those jobs and pull the files (a window of chunks each, as gateways do) while the
/// rest of the fleet goes on printing small jobs. Measured: the rest's dispatch latency over
/// the pulls (the supervisor serves chunks and dispatches at once), and the pulls' speed.
async fn pull_phase(
    args: &Args,
    port: u16,
    sh: &Shared,
    (op, submitted, backlog): (&mut Operator, &mut u64, u64),
    sup: &SupervisorProc,
) -> Result<PullReport, BoxError> {
    let k = args.pullers.min(args.printers);
    let files = sup
        .data_dir
        .parent()
        .ok_or("the supervisor's data dir has no parent")?
        .join("pull-files");
    std::fs::create_dir_all(&files)?;
    let (binary, size) = (sup.binary.clone(), args.pull_mb * 1_000_000);
    println!(
        "pullers: uploading {k} files of {} MB with printloop jobs add",
        args.pull_mb
    );
    let t_up = Instant::now();
    // The uploads run beside the fleet, which keeps printing (and being fed) meanwhile; four
    // operators at a time.
    let upload = move |i: usize| {
        let (binary, files) = (binary.clone(), files.clone());
        async move {
            let path = files.join(format!("pull-{i}.gcode"));
            tokio::task::block_in_place(|| write_pull_file(&path, i, size))?;
            let out = tokio::process::Command::new(&binary)
                .args([
                    "jobs",
                    "add",
                    "--tag",
                    "pull",
                    "--timeout",
                    "120",
                    "--broker",
                ])
                .arg(format!("mqtt://127.0.0.1:{port}"))
                .arg(&path)
                .stdin(std::process::Stdio::null())
                .output()
                .await?;
            let _ = std::fs::remove_file(&path);
            if out.status.success() {
                Ok(())
            } else {
                Err::<(), BoxError>(
                    format!(
                        "printloop jobs add {i}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    )
                    .into(),
                )
            }
        }
    };
    let uploads = tokio::spawn(async move {
        let mut running = tokio::task::JoinSet::new();
        for i in 0..k {
            if running.len() >= 4 {
                if let Some(done) = running.join_next().await {
                    done??;
                }
            }
            running.spawn(upload(i));
        }
        while let Some(done) = running.join_next().await {
            done??;
        }
        Ok::<(), BoxError>(())
    });
    let limit = Duration::from_secs(60 + k as u64 * args.pull_mb);
    while !uploads.is_finished() {
        if t_up.elapsed() > limit {
            uploads.abort();
            return Err(format!("uploads not done within {limit:?}").into());
        }
        keep_printing(sh, op, submitted, backlog, Duration::from_millis(500), sup).await;
    }
    uploads.await??;
    let upload_s = t_up.elapsed().as_secs_f64();
    println!(
        "pullers: {k} files uploaded in {upload_s:.1} s ({:.1} MB/s)",
        (k as u64 * size) as f64 / 1e6 / upload_s
    );

    // Go: the pullers turn ready together.
    let from = sh.latencies_us.lock().map_err(|_| "poisoned")?.len();
    sh.measure_from_now();
    sh.measuring.store(true, Ordering::Relaxed);
    let go = Instant::now();
    sh.pull_go.store(true, Ordering::Relaxed);
    let limit = Duration::from_secs(60 + k as u64 * args.pull_mb / 2);
    let mut last_print = Instant::now();
    while sh.pulls.lock().map_err(|_| "poisoned")?.len() < k && go.elapsed() < limit {
        keep_printing(sh, op, submitted, backlog, Duration::from_millis(500), sup).await;
        if last_print.elapsed() >= Duration::from_secs(10) {
            last_print = Instant::now();
            println!(
                "pullers: {:.0} MB pulled after {:.0} s, {} of {k} done",
                sh.pulled_bytes.load(Ordering::Relaxed) as f64 / 1e6,
                go.elapsed().as_secs_f64(),
                sh.pulls.lock().map_err(|_| "poisoned")?.len()
            );
        }
    }
    let window = go.elapsed();
    sh.measuring.store(false, Ordering::Relaxed);
    let mut l = sh.latencies_us.lock().map_err(|_| "poisoned")?[from..].to_vec();
    l.sort_unstable();
    let pulls = sh.pulls.lock().map_err(|_| "poisoned")?.clone();
    let mut secs: Vec<f64> = pulls.iter().map(|(d, _)| d.as_secs_f64()).collect();
    secs.sort_by(f64::total_cmp);
    let bytes: u64 = pulls.iter().map(|(_, b)| b).sum();
    let r = PullReport {
        upload_s,
        done: pulls.len(),
        window_s: window.as_secs_f64(),
        total_mb_s: bytes as f64 / 1e6 / window.as_secs_f64(),
        pull_s: (
            secs.first().copied().unwrap_or(0.0),
            secs.get(secs.len() / 2).copied().unwrap_or(0.0),
            secs.last().copied().unwrap_or(0.0),
        ),
        refusals: sh.pull_refusals.load(Ordering::Relaxed),
        p50: pct(&l, 0.5),
        p99: pct(&l, 0.99),
        max: l.last().copied().unwrap_or(0) as f64 / 1000.0,
        starts: l.len(),
    };
    println!(
        "pullers: {} of {k} files of {} MB pulled at once in {:.1} s ({:.1} MB/s in all; each {:.1}/{:.1}/{:.1} s min/median/max, {} refusals); the rest of the fleet meanwhile: dispatch p50 {:.2} ms p99 {:.2} ms max {:.1} ms over {} starts",
        r.done, args.pull_mb, r.window_s, r.total_mb_s, r.pull_s.0, r.pull_s.1, r.pull_s.2,
        r.refusals, r.p50, r.p99, r.max, r.starts
    );
    if r.done < k {
        return Err(format!("only {} of {k} pulls finished within {limit:?}", r.done).into());
    }
    Ok(r)
}

/// Thaws the frozen fleet after `what` and keeps it printing: first the burst of its
/// held-back readies (a burst no farm makes by hand: every printer finished during the
/// outage), then the steady state again. `(backlog, burst, steady)`.
async fn thaw(
    what: &str,
    sh: &Shared,
    op: &mut Operator,
    submitted: &mut u64,
    (backlog, burst, steady): (u64, Duration, Duration),
    sup: &SupervisorProc,
) -> Result<Vec<(String, f64, f64, f64, usize)>, BoxError> {
    sh.frozen.store(false, Ordering::Relaxed);
    sh.measure_from_now();
    sh.measuring.store(true, Ordering::Relaxed);
    let mut phases = Vec::new();
    for (name, dur) in [("burst", burst), ("steady", steady)] {
        let from = sh.latencies_us.lock().map_err(|_| "poisoned")?.len();
        keep_printing(sh, op, submitted, backlog, dur, sup).await;
        phases.push(phase(&format!("{name} after {what}"), sh, from)?);
    }
    Ok(phases)
}

/// Dispatch latency of the samples taken since `from`, printed and returned.
fn phase(name: &str, sh: &Shared, from: usize) -> Result<(String, f64, f64, f64, usize), BoxError> {
    let mut l = sh.latencies_us.lock().map_err(|_| "poisoned")?[from..].to_vec();
    l.sort_unstable();
    let (p50, p99) = (pct(&l, 0.5), pct(&l, 0.99));
    let max = l.last().copied().unwrap_or(0) as f64 / 1000.0;
    println!(
        "soak, {name}: dispatch p50 {p50:.2} ms p99 {p99:.2} ms max {max:.1} ms over {} starts",
        l.len()
    );
    Ok((name.to_owned(), p50, p99, max, l.len()))
}

/// Keeps the queue fed for `dur` while the fleet prints.
async fn keep_printing(
    sh: &Shared,
    op: &mut Operator,
    submitted: &mut u64,
    target_backlog: u64,
    dur: Duration,
    sup: &SupervisorProc,
) {
    let until = Instant::now() + dur;
    let mut errors = 0u32;
    let mut sampled = Instant::now();
    while Instant::now() < until {
        // The supervisor's memory as it goes (is it bounded?).
        if sampled.elapsed() >= Duration::from_secs(60) {
            sampled = Instant::now();
            println!(
                "soak: supervisor RSS {} kB at {:.0} s",
                sup.rss_kb(),
                sh.start.elapsed().as_secs_f64()
            );
        }
        let started = sh.starts_received.load(Ordering::Relaxed);
        let outstanding = submitted.saturating_sub(started);
        if outstanding < target_backlog {
            let c = (target_backlog - outstanding).min(1000);
            let req = serde_json::json!({"op": "submit_job", "args": {
                "name": "bench.gcode", "sha256": sh.sha.as_str(), "copies": c, "tags": ["fleet"]}});
            match op.request(req).await {
                Ok(_) => *submitted += c,
                Err(e) => {
                    errors += 1;
                    if errors <= 3 {
                        println!("operator: {e} (the supervisor is behind)");
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Seconds from now until the supervisor's `/metrics` show every printer online and phase
/// counts and finished jobs equal to the fakes' truth (the fleet is frozen), at most 90 s.
async fn reconciled(
    sh: &Shared,
    metrics: std::net::SocketAddr,
    n: usize,
    since: &str,
    archived_before: i64,
) -> Option<f64> {
    let up = Instant::now();
    let mut reconcile_s = None;
    let mut last = String::new();
    let limit = Duration::from_secs(90);
    while up.elapsed() < limit {
        if let Some(m) = scrape(metrics).await {
            let g = |name: &str| gauge(&m, name).unwrap_or(-1.0) as i64;
            let sup_online = g("printloop_printers{presence=\"online\"}");
            let sup_ready = g("printloop_printers_phase{phase=\"ready\"}");
            let sup_printing = g("printloop_printers_phase{phase=\"printing\"}");
            let sup_finished = g("printloop_printers_phase{phase=\"finished\"}");
            // Finished jobs whose printer went ready again (its bed cleared there) are
            // harvested: done. Harvested jobs beyond the history retention were archived:
            // they count too.
            let sup_jobs_fin = g("printloop_jobs{state=\"finished\"}")
                + g("printloop_jobs{state=\"done\"}")
                + g("printloop_jobs_archived_total")
                + archived_before;
            let truth = (
                sh.ready.load(Ordering::Relaxed) as i64,
                sh.printing.load(Ordering::Relaxed) as i64,
                sh.finished.load(Ordering::Relaxed) as i64,
                sh.jobs_finished.load(Ordering::Relaxed) as i64,
            );
            last = format!(
                "supervisor online {sup_online}, ready {sup_ready}/{}, printing {sup_printing}/{}, finished {sup_finished}/{}, jobs finished {sup_jobs_fin}/{}; fakes connected {}",
                truth.0, truth.1, truth.2, truth.3, sh.connected.load(Ordering::Relaxed)
            );
            if sup_online == n as i64
                && (sup_ready, sup_printing, sup_finished, sup_jobs_fin) == truth
                && sh.connected.load(Ordering::Relaxed) == n
            {
                reconcile_s = Some(up.elapsed().as_secs_f64());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match reconcile_s {
        Some(s) => println!("reconciled {s:.2} s after {since}: {last}"),
        None => println!("NOT reconciled within {limit:?} after {since}: {last}"),
    }
    reconcile_s
}

/// `printloop supervisor` as a child process on free loopback ports.
struct SupervisorProc {
    binary: PathBuf,
    data_dir: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    metrics: std::net::SocketAddr,
    web: std::net::SocketAddr,
    child: Option<std::process::Child>,
}

impl SupervisorProc {
    fn new(
        binary: &std::path::Path,
        broker_port: u16,
        data_dir: &std::path::Path,
        dir: &std::path::Path,
    ) -> Result<Self, BoxError> {
        let metrics: std::net::SocketAddr =
            format!("127.0.0.1:{}", testkit::free_port()).parse()?;
        let web: std::net::SocketAddr = format!("127.0.0.1:{}", testkit::free_port()).parse()?;
        let args = vec![
            "supervisor".into(),
            "--broker".into(),
            format!("mqtt://127.0.0.1:{broker_port}"),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--metrics".into(),
            metrics.to_string(),
            "--http".into(),
            web.to_string(),
        ];
        Ok(SupervisorProc {
            binary: binary.to_owned(),
            data_dir: data_dir.to_owned(),
            args,
            log: dir.join("supervisor.log"),
            metrics,
            web,
            child: None,
        })
    }

    fn start(&mut self) -> Result<(), BoxError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = std::process::Command::new(&self.binary)
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Until `/metrics` answers (the store is open and the HTTP side listens).
    async fn wait_ready(&mut self, limit: Duration) -> Result<(), BoxError> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    let tail = std::fs::read_to_string(&self.log).unwrap_or_default();
                    let tail: Vec<&str> = tail.lines().rev().take(20).collect();
                    return Err(format!("the supervisor exited ({st}): {tail:?}").into());
                }
            }
            if scrape(self.metrics).await.is_some() {
                println!("supervisor ready in {:.2} s", t.elapsed().as_secs_f64());
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("the supervisor did not answer /metrics within {limit:?}").into())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Jobs in its history archive (`<data_dir>/history/*.jsonl`, one per line).
    fn archived_jobs(&self) -> i64 {
        let Ok(dir) = std::fs::read_dir(self.data_dir.join("history")) else {
            return 0;
        };
        dir.filter_map(Result::ok)
            .filter_map(|e| std::fs::read(e.path()).ok())
            .map(|b| b.iter().filter(|&&c| c == b'\n').count() as i64)
            .sum()
    }

    fn rss_kb(&self) -> u64 {
        self.pid()
            .map_or(0, |p| status_kb(&p.to_string(), "VmRSS:"))
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }
}

impl Drop for SupervisorProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The broker under test: `printloop broker` (rumqttd) or a system Mosquitto.
enum Broker {
    Rumqttd(BrokerProcess),
    Mosquitto(testkit::MosquittoGuard),
}

impl Broker {
    fn port(&self) -> u16 {
        match self {
            Broker::Rumqttd(b) => b.v4_port(),
            Broker::Mosquitto(m) => m.port(),
        }
    }
    fn pid(&self) -> Option<u32> {
        match self {
            Broker::Rumqttd(b) => b.pid(),
            Broker::Mosquitto(m) => m.pid(),
        }
    }
    fn kill(&mut self) {
        match self {
            Broker::Rumqttd(b) => b.kill(),
            Broker::Mosquitto(m) => m.kill(),
        }
    }
    fn start_again(&mut self) -> Result<(), BoxError> {
        match self {
            Broker::Rumqttd(b) => b.start_again()?,
            Broker::Mosquitto(m) => m.start_again()?,
        }
        Ok(())
    }
}
