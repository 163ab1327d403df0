//! The reactive loop: every fleet decision, as a pure state machine.
//!
//! `Supervisor::handle(now, input) -> Vec<Output>`. Inputs are what the broker delivers
//! (printer status/meta/state/events/results, operator requests), results of file IO, and timer
//! ticks. Outputs are durable mutations, publishes and file IO. No IO, no clock.
//!
//! The rules it keeps:
//! - **Persist, then publish**: an assignment is durable before its start command leaves.
//! - **Never move a job off a printer it cannot hear from**: a silent printer may still be
//!   printing. After the step timeout the job is flagged `timed_out`; an operator decides.
//! - **Reconcile on every contact**: each newer `state` is compared with what the supervisor
//!   believes; the printer's report wins for what happened on the printer (its ledger in
//!   `recent_jobs` tells the outcome of jobs that ended while nobody listened).
//! - **Exactly-once start** rests on the gateway's ledger (a job id never runs twice) and on
//!   start commands that expire; the supervisor may re-send a start freely.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use protocol::api::{
    ApiOp, ApiReject, ApiRequest, ApiResponse, ApiResult, BedClear, JobArgs, JobState, JobSummary,
    ListJobs, PrinterArgs, PrinterSummary, QueueCounts, QueueSnapshot, SubmitJob, UploadChunk,
};
use protocol::command::{
    Command, CommandAction, CommandResult, Empty, JobRef, ResultStatus, StartJob,
};
use protocol::files::{ChunkErrorCode, FileChunkRequest, FileChunkResponse};
use protocol::presence::{Meta, Presence, Status};
use protocol::state::{Event, EventKind, JobStage, PrinterPhase, StateSnapshot};
use protocol::{
    ClientId, CommandId, JobId, Payload, PrinterId, PrinterTopicKind, Sha256Hex, Topic, Topics,
    Version,
};

use protocol::limit::{Limiter, Rate};
use transport::outgoing::Lane;

use crate::ha::{self, HaConfig, PressAction};
use crate::model::{FileRecord, JobRecord, Mutation, PrinterRecord, Snapshot, StartSent};

/// The client id Home Assistant's button presses answer to (`api/response/homeassistant`).
pub const HA_CLIENT: &str = "homeassistant";
/// The client name on the supervisor's commands to gateways (their rate limit is per client).
pub const SUPERVISOR_CLIENT: &str = "supervisor";

/// Printers whose discovery configs go out in one round (13 messages each)...
const HA_PRINTERS_PER_ROUND: usize = 25;
/// ...and the pause between rounds: a thousand printers' configs never flood the MQTT queue.
pub(crate) const HA_ROUND_MS: u64 = 100;

/// The supervisor's policies.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// The topic tree.
    pub topics: Topics,
    /// A printer is stale after this many of its heartbeats without a `state`.
    pub stale_heartbeats: u32,
    /// A start command expires this long after it was sent.
    pub command_ttl_ms: u64,
    /// A start with no sign of life after this long is sent again (a new command id).
    pub command_retry_ms: u64,
    /// A job whose printer is silent this long is flagged `timed_out` (never moved).
    pub step_timeout_ms: u64,
    /// Jobs failed in a row before a printer is held out of dispatch.
    pub breaker_threshold: u32,
    /// Minimum time between two queue snapshots.
    pub queue_min_interval_ms: u64,
    /// A printer online without a `state` for this long is asked to re-publish (rebirth).
    pub rebirth_after_ms: u64,
    /// Home Assistant discovery and buttons.
    pub ha: HaConfig,
    /// Secret that makes the supervisor's command ids unpredictable (random for each
    /// configuration; a deterministic simulation sets its own). A client that could guess the
    /// next id could send it first, and the real command would be answered `duplicate`.
    pub command_key: [u8; 16],
    /// API requests admitted per client (a client over it is answered busy).
    pub api_rate: Rate,
}

/// API requests the supervisor admits per client: a hundred a second, two hundred at once
/// (an upload is one request per 64 KiB chunk, so this still takes 6 MiB/s from one client).
pub const API_RATE: Rate = Rate::new(100.0, 200.0);

/// 16 random bytes from the operating system (a clock-derived fallback if it has none: ids
/// stay distinct, if less secret).
fn random_key() -> [u8; 16] {
    let mut key = [0u8; 16];
    if getrandom::fill(&mut key).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        key = (t ^ u128::from(std::process::id())).to_le_bytes();
    }
    key
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            command_key: random_key(),
            topics: Topics::default(),
            stale_heartbeats: 3,
            command_ttl_ms: 120_000,
            command_retry_ms: 15_000,
            step_timeout_ms: 300_000,
            breaker_threshold: 3,
            queue_min_interval_ms: 250,
            rebirth_after_ms: 5_000,
            ha: HaConfig::default(),
            api_rate: API_RATE,
        }
    }
}

pub use protocol::Now;

/// One publish (QoS 1 unless `qos0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retained?
    pub retain: bool,
    /// Its priority in the shell's outgoing queue.
    pub lane: Lane,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Commit durably before anything after it.
    Persist(Vec<Mutation>),
    /// Subscribe; `qos0` for retained-snapshot wildcards (rumqttd sends at most 100 retained
    /// messages on a QoS 1 wildcard).
    Subscribe {
        /// The filter.
        filter: String,
        /// QoS 0 instead of 1.
        qos0: bool,
    },
    /// Publish.
    Publish(Publish),
    /// Read a chunk from the file store and answer the printer (stateless; done by the shell).
    ServeChunk {
        /// Who asked.
        printer: PrinterId,
        /// The request.
        request: FileChunkRequest,
    },
    /// Store an upload chunk; answer with `Input::Uploaded`.
    StoreUpload {
        /// Who asked.
        client: ClientId,
        /// The request id.
        id: CommandId,
        /// The chunk.
        chunk: UploadChunk,
    },
}

/// The result of storing an upload chunk.
#[derive(Debug, Clone, PartialEq)]
pub enum UploadOutcome {
    /// Stored; `complete` when the whole file is verified.
    Progress {
        /// Bytes stored, contiguous from 0.
        received: u64,
        /// The file's size.
        total_size: u64,
        /// The stored file, once complete and verified.
        complete: Option<FileRecord>,
    },
    /// Refused.
    Failed(String),
}

/// Everything that happens to the supervisor.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Connected to the broker.
    Connected,
    /// Lost the broker.
    Disconnected,
    /// A message.
    Message {
        /// Topic.
        topic: String,
        /// Payload.
        payload: Vec<u8>,
    },
    /// An upload chunk was handled.
    Uploaded {
        /// Who asked.
        client: ClientId,
        /// The request id.
        id: CommandId,
        /// What happened.
        outcome: UploadOutcome,
    },
    /// Time passed.
    Tick,
    /// The printers enrolled in the client registry (`clients.toml`, gateway role), read at
    /// start and whenever the file changes; `None` when there is no registry (a loopback-only
    /// farm, the demo): then every printer that reports is enrolled.
    Enrolled(Option<BTreeSet<PrinterId>>),
}

/// How far a printer's clock may run behind the supervisor's when it judges a start
/// command's expiry: a start is only given up this long after it expired.
const START_EXPIRY_SKEW_MS: u64 = 5_000;

#[derive(Debug, Clone)]
struct PendingStart {
    job: JobId,
    command: CommandId,
    /// Earlier sends of the same start (retries replace `command`): an `ok` for any of them
    /// means the printer has the job.
    earlier: Vec<CommandId>,
    sent_mono: u64,
    expires_unix: u64,
    /// The printer refused the latest send, at this `(epoch, at_ms)` of its own. The start is
    /// only given up once a report made after that says the printer does not have the job:
    /// an earlier send may have been accepted and the report saying so not be in yet.
    refused: Option<(u64, u64)>,
    /// The printer answered the latest send `busy`: send it again at this instant.
    busy_retry_mono: Option<u64>,
}

impl PendingStart {
    /// When a start still without a sign of life is sent again.
    fn retry_at(&self, retry_ms: u64) -> u64 {
        self.busy_retry_mono.unwrap_or(self.sent_mono + retry_ms)
    }
}

#[derive(Debug, Clone)]
struct PrinterView {
    rec: PrinterRecord,
    presence: Presence,
    status_epoch: u64,
    state: Option<StateSnapshot>,
    last_state_mono: Option<u64>,
    online_since_mono: u64,
    last_event: (u64, u64),
    stale: bool,
    pending: Option<PendingStart>,
    last_rebirth_mono: Option<u64>,
    silent_since_mono: Option<u64>,
    /// Its last `meta` (names its Home Assistant device).
    meta: Option<Meta>,
    /// A digest of the Home Assistant configs last published for it (none: not published).
    ha_published: Option<u64>,
    /// In the client registry (or there is none): only then does it get work.
    enrolled: bool,
    /// Reports that contradict the marks above (a `state` not newer than the one held, or
    /// one of an epoch below an `offline` status): a stream of them is the live printer.
    behind: Option<Behind>,
}

/// A stream of reports from below the supervisor's marks for a printer.
#[derive(Debug, Clone)]
struct Behind {
    epoch: u64,
    seq: u64,
    since_mono: u64,
    count: u32,
}

/// Reports in a row, over at least one heartbeat, that make a stream below the marks the live
/// one. A lone old copy (a retained message from before a restart, a late redelivery) never
/// makes a stream: its `seq` does not go on increasing.
const BEHIND_REPORTS: u32 = 3;

impl PrinterView {
    /// Counts `s` into the stream below the marks; true when that stream is the live printer.
    fn behind_is_live(&mut self, s: &StateSnapshot, now: Now) -> bool {
        match &mut self.behind {
            Some(b) if b.epoch == s.epoch && s.seq > b.seq => {
                b.seq = s.seq;
                b.count += 1;
            }
            Some(b) if b.epoch == s.epoch && s.seq == b.seq => {}
            _ => {
                self.behind = Some(Behind {
                    epoch: s.epoch,
                    seq: s.seq,
                    since_mono: now.mono_ms,
                    count: 1,
                })
            }
        }
        let heartbeat_ms = u64::from(s.heartbeat_s.max(1)) * 1000;
        self.behind.as_ref().is_some_and(|b| {
            b.count >= BEHIND_REPORTS && now.mono_ms >= b.since_mono + heartbeat_ms
        })
    }

    fn new(rec: PrinterRecord, now: Now) -> Self {
        // A start sent before a restart is still on its way as far as anyone knows: it is
        // retried (or expires) from now on, and the job is not moved meanwhile.
        let pending = rec.start_sent.as_ref().map(|s| PendingStart {
            job: s.job.clone(),
            command: s.command.clone(),
            earlier: Vec::new(),
            sent_mono: now.mono_ms,
            expires_unix: s.expires_at_ms,
            refused: None,
            busy_retry_mono: None,
        });
        Self {
            rec,
            presence: Presence::Offline,
            status_epoch: 0,
            state: None,
            last_state_mono: None,
            online_since_mono: now.mono_ms,
            last_event: (0, 0),
            behind: None,
            stale: false,
            pending,
            last_rebirth_mono: None,
            silent_since_mono: Some(now.mono_ms),
            meta: None,
            ha_published: None,
            enrolled: true,
        }
    }

    fn phase(&self) -> Option<PrinterPhase> {
        self.state.as_ref().map(|s| s.phase)
    }

    fn reachable(&self) -> bool {
        self.presence == Presence::Online && !self.stale && self.state.is_some()
    }

    fn heartbeat_ms(&self) -> u64 {
        self.state
            .as_ref()
            .map_or(10_000, |s| u64::from(s.heartbeat_s.max(1)) * 1000)
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// Reconciliations that changed the supervisor's view.
    pub reconciliations: u64,
    /// Start commands sent again.
    pub command_retries: u64,
    /// Start commands sent.
    pub starts_sent: u64,
    /// Rebirth requests sent.
    pub rebirths: u64,
    /// Messages that failed to decode.
    pub rejected_messages: u64,
    /// File requests refused: the printer has no job waiting for that file.
    pub refused_pulls: u64,
    /// Jobs seen on a printer other than the one they were placed on (counted once per printer
    /// and job; each is logged once as an error).
    pub foreign_jobs: u64,
    /// API requests answered busy: their client sent more than its rate.
    pub busy_requests: u64,
    /// Commands a gateway answered busy.
    pub busy_commands: u64,
    /// Printers whose reports went backwards for good (a forged or impossible epoch or seq had
    /// been taken): the supervisor followed the live reports again.
    pub report_resets: u64,
    /// Dispatch latencies (job queued → start command sent), milliseconds.
    pub dispatch_latency_ms: Vec<u64>,
}

/// The supervisor.
pub struct Supervisor {
    cfg: SupervisorConfig,
    epoch: u64,
    next_job: u64,
    commands_sent: u64,
    connected: bool,
    jobs: BTreeMap<JobId, JobRecord>,
    printers: BTreeMap<PrinterId, PrinterView>,
    files: HashMap<Sha256Hex, FileRecord>,
    answers: HashMap<String, Vec<u8>>,
    queued_since_mono: HashMap<JobId, u64>,
    queue_dirty: bool,
    queue_seq: u64,
    last_queue_mono: Option<u64>,
    counters: Counters,
    /// (printer, job) pairs seen running where the job was not placed, logged once each.
    foreign: BTreeSet<(PrinterId, JobId)>,
    /// The enrolled printers (`None`: no registry, every printer is).
    enrolled: Option<BTreeSet<PrinterId>>,
    /// Printers whose Home Assistant configs may need publishing.
    ha_dirty: BTreeSet<PrinterId>,
    /// The fleet device's configs need publishing.
    ha_fleet_dirty: bool,
    /// Home Assistant came online: re-publish every config at this instant (jittered).
    ha_republish_mono: Option<u64>,
    /// When the last round of printer configs went out.
    ha_round_mono: Option<u64>,
    /// Per-client admission of API requests.
    api_limiter: Limiter,
    /// When our retained status was last re-asserted after a contradiction.
    status_reasserted_mono: Option<u64>,
    /// A contradiction of our status waits for its re-assertion.
    status_reassert_due: bool,
}

/// Our retained status is re-asserted at most this often.
const STATUS_REASSERT_EVERY_MS: u64 = 1_000;

fn job_state_of(stage: JobStage) -> JobState {
    match stage {
        JobStage::Transferring => JobState::Transferring,
        JobStage::Starting => JobState::Starting,
        JobStage::Printing => JobState::Printing,
        JobStage::Paused => JobState::Paused,
        JobStage::Finished => JobState::Finished,
        JobStage::Failed => JobState::Failed,
        JobStage::Cancelled => JobState::Cancelled,
        JobStage::Interrupted => JobState::Interrupted,
    }
}

/// States in which a job is (or may be) on a printer.
fn active(state: JobState) -> bool {
    matches!(
        state,
        JobState::Assigned
            | JobState::Transferring
            | JobState::Starting
            | JobState::Printing
            | JobState::Paused
            | JobState::TimedOut
    )
}

impl Supervisor {
    /// Builds the supervisor from its durable snapshot.
    pub fn new(cfg: SupervisorConfig, snap: Snapshot, now: Now) -> Self {
        let api_rate = cfg.api_rate;
        let mut queued_since = HashMap::new();
        for j in &snap.jobs {
            if j.state == JobState::Queued {
                queued_since.insert(j.job_id.clone(), now.mono_ms);
            }
        }
        Self {
            cfg,
            epoch: snap.epoch,
            next_job: snap.next_job.max(1),
            commands_sent: 0,
            connected: false,
            jobs: snap
                .jobs
                .into_iter()
                .map(|j| (j.job_id.clone(), j))
                .collect(),
            printers: snap
                .printers
                .into_iter()
                .map(|p| (p.printer_id.clone(), PrinterView::new(p, now)))
                .collect(),
            files: snap
                .files
                .into_iter()
                .map(|f| (f.sha256.clone(), f))
                .collect(),
            answers: snap.requests.into_iter().collect(),
            queued_since_mono: queued_since,
            queue_dirty: true,
            queue_seq: 0,
            last_queue_mono: None,
            counters: Counters::default(),
            foreign: BTreeSet::new(),
            enrolled: None,
            ha_dirty: BTreeSet::new(),
            ha_fleet_dirty: false,
            ha_republish_mono: None,
            ha_round_mono: None,
            api_limiter: Limiter::new(api_rate),
            status_reasserted_mono: None,
            status_reassert_due: false,
        }
    }

    /// Before connecting: the next epoch (persist it first) and the will carrying it.
    pub fn prepare_connect(&mut self, now: Now) -> (Vec<Mutation>, String, Vec<u8>) {
        self.epoch += 1;
        (
            vec![Mutation::SetEpoch(self.epoch)],
            self.cfg.topics.format(&Topic::SupervisorStatus),
            Status::offline(self.epoch, now.unix_ms, None).encode(),
        )
    }

    /// A clean goodbye.
    pub fn goodbye(&self, now: Now) -> Publish {
        Publish {
            topic: self.cfg.topics.format(&Topic::SupervisorStatus),
            payload: Status::offline(self.epoch, now.unix_ms, Some("shutdown".into())).encode(),
            retain: true,
            lane: Lane::Control,
        }
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Counters for metrics.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Drains the dispatch latency samples (the metrics shell keeps its histogram).
    pub fn take_dispatch_latencies(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.counters.dispatch_latency_ms)
    }

    /// Every job, by id.
    pub fn jobs(&self) -> impl Iterator<Item = &JobRecord> {
        self.jobs.values()
    }

    /// Every printer as operators see it.
    pub fn printer_summaries(&self) -> Vec<PrinterSummary> {
        self.printers.values().map(|p| self.summary(p)).collect()
    }

    fn summary(&self, p: &PrinterView) -> PrinterSummary {
        let job = p.state.as_ref().and_then(|s| s.job.as_ref());
        PrinterSummary {
            printer_id: p.rec.printer_id.clone(),
            presence: p.presence,
            stale: p.stale,
            phase: p.phase().unwrap_or(PrinterPhase::Disconnected),
            job_id: job
                .map(|j| j.job_id.clone())
                .or_else(|| p.rec.assigned.clone()),
            progress_pct: job.map(|j| j.progress_pct),
            held: p.rec.held,
            consecutive_failures: p.rec.consecutive_failures,
            enrolled: p.enrolled,
        }
    }

    /// When `Tick` is due next (monotonic ms).
    pub fn next_deadline(&self) -> Option<u64> {
        let mut d: Option<u64> = None;
        let mut at = |t: u64| d = Some(d.map_or(t, |x: u64| x.min(t)));
        if let Some(t) = self.status_reassert_at().filter(|_| self.connected) {
            at(t);
        }
        if self.queue_dirty {
            at(self
                .last_queue_mono
                .map_or(0, |l| l + self.cfg.queue_min_interval_ms));
        }
        for p in self.printers.values() {
            if p.presence == Presence::Online && !p.stale {
                if let Some(last) = p.last_state_mono {
                    at(last + p.heartbeat_ms() * u64::from(self.cfg.stale_heartbeats) + 1);
                } else {
                    at(p.online_since_mono + self.cfg.rebirth_after_ms);
                }
            }
            if let Some(pending) = &p.pending {
                at(pending.retry_at(self.cfg.command_retry_ms));
            }
            if let Some(since) = p.silent_since_mono {
                if p.rec.assigned.is_some() {
                    at(since + self.cfg.step_timeout_ms);
                }
            }
        }
        if let Some(t) = self.ha_republish_mono {
            at(t);
        }
        if self.cfg.ha.enabled && self.connected && !self.ha_dirty.is_empty() {
            at(self.ha_round_mono.map_or(0, |t| t + HA_ROUND_MS));
        }
        d
    }

    /// Handles one input.
    pub fn handle(&mut self, now: Now, input: Input) -> Vec<Output> {
        self.handle_batch(now, std::iter::once(input))
    }

    /// Handles several inputs that arrived together, then looks at timers, dispatch and the
    /// queue snapshot once for all of them (each of those scans the fleet).
    pub fn handle_batch(
        &mut self,
        now: Now,
        inputs: impl IntoIterator<Item = Input>,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        for input in inputs {
            self.apply(now, input, &mut out);
        }
        self.on_time(now, &mut out);
        self.dispatch(now, &mut out);
        self.publish_queue(now, &mut out, false);
        self.publish_discovery(now, &mut out);
        self.persist_pending_starts(&mut out);
        out
    }

    /// Mirrors each printer's in-memory pending start into its durable record: a start command
    /// is committed as sent (in the same transaction as the batch, before anything of the batch
    /// is published), and its answer, expiry or refusal clears it. Without this a supervisor
    /// restarted between sending a start and hearing the answer would see the job as merely
    /// assigned and could move it to a second printer while the first one prints it.
    fn persist_pending_starts(&mut self, out: &mut Vec<Output>) {
        let mut muts = Vec::new();
        for p in self.printers.values_mut() {
            let want = p.pending.as_ref().map(|x| StartSent {
                job: x.job.clone(),
                command: x.command.clone(),
                expires_at_ms: x.expires_unix,
            });
            if p.rec.start_sent != want {
                p.rec.start_sent = want;
                muts.push(Mutation::PutPrinter(p.rec.clone()));
            }
        }
        if !muts.is_empty() {
            out.push(Output::Persist(muts));
        }
    }

    fn apply(&mut self, now: Now, input: Input, out: &mut Vec<Output>) {
        match input {
            Input::Connected => self.on_connected(now, out),
            Input::Disconnected => self.connected = false,
            Input::Message { topic, payload } => self.on_message(now, &topic, &payload, out),
            Input::Uploaded {
                client,
                id,
                outcome,
            } => self.on_uploaded(now, client, id, outcome, out),
            Input::Tick => {}
            Input::Enrolled(set) => self.on_enrolled(set, out),
        }
    }

    /// Only enrolled printers get work and a Home Assistant device (issue #10: retained
    /// messages for an invented printer `ghost` made the supervisor dispatch a real job to it).
    /// Others are listed, flagged.
    fn on_enrolled(&mut self, set: Option<BTreeSet<PrinterId>>, out: &mut Vec<Output>) {
        let mut withdrawn = Vec::new();
        for (id, p) in &mut self.printers {
            let enrolled = set.as_ref().is_none_or(|s| s.contains(id));
            if p.enrolled != enrolled {
                if enrolled {
                    tracing::info!(printer = %id, "printer enrolled: it gets work");
                    self.ha_dirty.insert(id.clone());
                } else {
                    tracing::warn!(printer = %id, "printer not in the client registry: it gets no work (`printloop printers add` enrols it)");
                    if p.ha_published.take().is_some() {
                        withdrawn.push(id.clone());
                    }
                }
                p.enrolled = enrolled;
            }
        }
        self.enrolled = set;
        if self.cfg.ha.enabled {
            for id in withdrawn {
                for topic in ha::printer_config_topics(&self.cfg.ha, &self.cfg.topics, &id) {
                    self.publish(out, topic, Vec::new(), true);
                }
            }
        }
    }

    fn topic(&self, t: Topic) -> String {
        self.cfg.topics.format(&t)
    }

    fn publish(&self, out: &mut Vec<Output>, topic: String, payload: Vec<u8>, retain: bool) {
        self.publish_in(Lane::Control, out, topic, payload, retain);
    }

    fn publish_in(
        &self,
        lane: Lane,
        out: &mut Vec<Output>,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) {
        if self.connected {
            out.push(Output::Publish(Publish {
                topic,
                payload,
                retain,
                lane,
            }));
        }
    }

    /// Whether printer `p` may pull file `sha`: only for a job of its own that is on its way
    /// to the printer (issue #10: any client could pull any stored G-code by asking under any
    /// printer's name).
    fn may_pull(&self, p: &PrinterId, sha: &Sha256Hex) -> bool {
        self.jobs.values().any(|j| {
            j.printer.as_ref() == Some(p)
                && &j.sha256 == sha
                && matches!(
                    j.state,
                    JobState::Assigned | JobState::Transferring | JobState::Starting
                )
        })
    }

    fn refuse_pull(&mut self, p: PrinterId, request: FileChunkRequest, out: &mut Vec<Output>) {
        self.counters.refused_pulls += 1;
        tracing::warn!(printer = %p, sha = %request.sha256, "file request refused: no job of this printer is waiting for that file");
        let refusal = FileChunkResponse::Error {
            v: Version,
            request_id: request.request_id,
            sha256: request.sha256,
            code: ChunkErrorCode::NotFound,
            message: "no job of this printer is waiting for that file".into(),
        };
        let topic = self.cfg.topics.format(&Topic::FileChunk(p));
        self.publish(out, topic, refusal.encode(), false);
    }

    fn on_connected(&mut self, now: Now, out: &mut Vec<Output>) {
        self.connected = true;
        let t = &self.cfg.topics;
        // Retained snapshots first, at QoS 0 (see docs/broker.md); then the live streams.
        for kind in [
            PrinterTopicKind::Status,
            PrinterTopicKind::Meta,
            PrinterTopicKind::State,
        ] {
            out.push(Output::Subscribe {
                filter: t.all_printers(kind),
                qos0: true,
            });
        }
        for kind in [
            PrinterTopicKind::Events,
            PrinterTopicKind::CmdResult,
            PrinterTopicKind::FileRequest,
        ] {
            out.push(Output::Subscribe {
                filter: t.all_printers(kind),
                qos0: false,
            });
        }
        out.push(Output::Subscribe {
            filter: t.format(&Topic::ApiRequest),
            qos0: false,
        });
        if self.cfg.ha.enabled {
            // Home Assistant's birth, and its buttons (it publishes both at QoS 0).
            out.push(Output::Subscribe {
                filter: ha::ha_status_topic(&self.cfg.ha),
                qos0: true,
            });
            out.push(Output::Subscribe {
                filter: format!("{}/ha/printers/+/press", t.root()),
                qos0: true,
            });
            // The broker may have lost the retained configs (rumqttd keeps none): publish
            // them all again once each printer's meta is back.
            self.ha_fleet_dirty = true;
            for (id, p) in self.printers.iter_mut() {
                p.ha_published = None;
                self.ha_dirty.insert(id.clone());
            }
        }
        // Our own presence too: we hold its truth, and re-assert it when anyone else's message
        // replaces it (`on_own_status`).
        out.push(Output::Subscribe {
            filter: t.format(&Topic::SupervisorStatus),
            qos0: true,
        });
        // Then our own birth.
        self.publish(
            out,
            self.topic(Topic::SupervisorStatus),
            Status::online(self.epoch, now.unix_ms).encode(),
            true,
        );
        // The retained copy the broker sends back on subscribing is the last connection's.
        self.status_reasserted_mono = Some(now.mono_ms);
        self.status_reassert_due = false;
        self.queue_dirty = true;
        self.last_queue_mono = None;
        for p in self.printers.values_mut() {
            // Everything we knew of presence is from before; the retained messages will tell.
            p.online_since_mono = now.mono_ms;
        }
    }

    fn on_message(&mut self, now: Now, topic: &str, payload: &[u8], out: &mut Vec<Output>) {
        if self.cfg.ha.enabled && topic == ha::ha_status_topic(&self.cfg.ha) {
            self.on_ha_status(now, payload);
            return;
        }
        let parsed = match self.cfg.topics.parse(topic) {
            Ok(t) => t,
            Err(e) => {
                self.counters.rejected_messages += 1;
                tracing::warn!(error = %e, "message on an unknown topic");
                return;
            }
        };
        if let Topic::HaPress(p) = parsed {
            if self.cfg.ha.enabled {
                self.on_press(now, p, payload, out);
            }
            return;
        }
        if parsed == Topic::SupervisorStatus {
            self.on_own_status(payload);
            return;
        }
        if payload.is_empty() {
            return; // a cleared retained topic
        }
        let result = match parsed {
            Topic::Status(p) => Status::decode(payload).map(|s| self.on_status(now, p, s, out)),
            Topic::Meta(p) => Meta::decode(payload).map(|m| self.on_meta(now, p, m, out)),
            Topic::State(p) => {
                StateSnapshot::decode(payload).map(|s| self.on_state(now, p, s, out))
            }
            Topic::Events(p) => Event::decode(payload).map(|e| self.on_event(now, p, e, out)),
            Topic::CmdResult(p) => {
                CommandResult::decode(payload).map(|r| self.on_result(now, p, r, out))
            }
            Topic::FileRequest(p) => FileChunkRequest::decode(payload).map(|request| {
                if self.may_pull(&p, &request.sha256) {
                    out.push(Output::ServeChunk {
                        printer: p,
                        request,
                    });
                } else {
                    self.refuse_pull(p, request, out);
                }
            }),
            Topic::ApiRequest => {
                self.on_api(now, payload, out);
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            self.counters.rejected_messages += 1;
            tracing::warn!(%topic, error = %e, "message rejected");
        }
    }

    fn printer_mut(&mut self, now: Now, id: &PrinterId, out: &mut Vec<Output>) -> &mut PrinterView {
        if !self.printers.contains_key(id) {
            let rec = PrinterRecord {
                printer_id: id.clone(),
                tags: vec![],
                held: false,
                consecutive_failures: 0,
                assigned: None,
                first_seen_ms: now.unix_ms,
                start_sent: None,
            };
            out.push(Output::Persist(vec![Mutation::PutPrinter(rec.clone())]));
            let mut view = PrinterView::new(rec, now);
            view.enrolled = self.enrolled.as_ref().is_none_or(|s| s.contains(id));
            if view.enrolled {
                tracing::info!(printer = %id, "new printer");
            } else {
                tracing::warn!(printer = %id, "a printer that is not in the client registry reports: it gets no work (`printloop printers add` enrols it)");
            }
            self.ha_dirty.insert(id.clone());
            self.printers.insert(id.clone(), view);
        }
        self.printers.get_mut(id).expect("inserted above")
    }

    fn on_status(&mut self, now: Now, id: PrinterId, s: Status, out: &mut Vec<Output>) {
        let p = self.printer_mut(now, &id, out);
        if s.epoch < p.status_epoch {
            tracing::debug!(printer = %id, epoch = s.epoch, "late status of an older epoch ignored");
            return;
        }
        if s.presence == Presence::Offline && s.epoch < p.status_epoch {
            return;
        }
        let was = p.presence;
        p.status_epoch = s.epoch;
        p.presence = s.presence;
        match s.presence {
            Presence::Online => {
                p.online_since_mono = now.mono_ms;
                if was != Presence::Online {
                    tracing::info!(printer = %id, epoch = s.epoch, "printer online");
                }
            }
            Presence::Offline => {
                p.silent_since_mono.get_or_insert(now.mono_ms);
                if was != Presence::Offline {
                    tracing::warn!(printer = %id, epoch = s.epoch, "printer offline");
                }
            }
        }
        self.queue_dirty = true;
    }

    fn on_meta(&mut self, now: Now, id: PrinterId, m: Meta, out: &mut Vec<Output>) {
        let p = self.printer_mut(now, &id, out);
        if p.rec.tags != m.tags {
            p.rec.tags = m.tags.clone();
            let rec = p.rec.clone();
            out.push(Output::Persist(vec![Mutation::PutPrinter(rec)]));
        }
        if p.meta.as_ref() != Some(&m) {
            p.meta = Some(m);
            self.ha_dirty.insert(id);
        }
    }

    fn on_state(&mut self, now: Now, id: PrinterId, s: StateSnapshot, out: &mut Vec<Output>) {
        let p = self.printer_mut(now, &id, out);
        let not_newer = p
            .state
            .as_ref()
            .is_some_and(|have| (s.epoch, s.seq) <= (have.epoch, have.seq));
        let below_offline = s.epoch < p.status_epoch && p.presence == Presence::Offline;
        if not_newer || below_offline {
            // A duplicate, an old retained copy, a late report of a dead connection — or the
            // live printer, below a mark that was forged (a `state` with a huge `seq`, an
            // `offline` with a huge epoch) or is otherwise impossible. A stream of them is the
            // live printer: follow it again, without a restart.
            if !p.behind_is_live(&s, now) {
                if not_newer {
                    return;
                }
            } else {
                tracing::warn!(
                    printer = %id,
                    epoch = s.epoch,
                    seq = s.seq,
                    held_epoch = p.state.as_ref().map_or(p.status_epoch, |h| h.epoch).max(p.status_epoch),
                    "this printer's live reports are below what was taken for its latest (a forged or \
                     impossible epoch or seq): following the live reports again"
                );
                self.counters.report_resets += 1;
                let p = self.printers.get_mut(&id).expect("known");
                p.behind = None;
                p.state = None;
                p.status_epoch = s.epoch;
                p.presence = Presence::Online;
                p.online_since_mono = now.mono_ms;
                p.last_event = p.last_event.min((s.epoch, s.seq));
            }
        }
        let p = self.printers.get_mut(&id).expect("known");
        if !not_newer && !below_offline {
            p.behind = None;
        }
        if s.epoch > p.status_epoch {
            // A state of a newer connection is proof of life even before its status arrives.
            p.status_epoch = s.epoch;
            p.presence = Presence::Online;
        }
        if p.stale {
            tracing::info!(printer = %id, "printer is reporting again");
        }
        p.stale = false;
        p.silent_since_mono = None;
        p.last_state_mono = Some(now.mono_ms);
        p.state = Some(s.clone());
        // A refused start is settled by the first report made after the refusal.
        if let Some(x) = &p.pending {
            if x.refused
                .is_some_and(|(e, at)| (s.epoch, s.at_ms) > (e, at))
            {
                let shows = s.job.as_ref().is_some_and(|j| j.job_id == x.job)
                    || s.recent_jobs.iter().any(|e| e.job_id == x.job);
                if !shows {
                    p.pending = None;
                }
            }
        }
        self.reconcile(now, &id, &s, out);
        self.queue_dirty = true;
    }

    fn on_event(&mut self, now: Now, id: PrinterId, e: Event, out: &mut Vec<Output>) {
        let p = self.printer_mut(now, &id, out);
        if (e.epoch, e.seq) <= p.last_event {
            return; // a duplicate (QoS 1 redelivery or an outbox re-send)
        }
        p.last_event = (e.epoch, e.seq);
        match e.event {
            EventKind::JobEnded {
                job_id,
                outcome,
                line,
                reason,
            } => {
                tracing::info!(printer = %id, job = %job_id, ?outcome, line, "job ended (event)");
                self.apply_outcome(now, &id, &job_id, outcome, reason, Some(e.at_ms), out);
            }
            EventKind::JobStarted { job_id } => {
                let mut muts = Vec::new();
                if let Some(j) = self.jobs.get_mut(&job_id) {
                    if matches!(
                        j.state,
                        JobState::Assigned
                            | JobState::Transferring
                            | JobState::Starting
                            | JobState::TimedOut
                    ) && j.printer.as_ref() == Some(&id)
                    {
                        j.state = JobState::Printing;
                        j.started_at_ms = Some(e.at_ms);
                        muts.push(Mutation::PutJob(j.clone()));
                    }
                }
                if !muts.is_empty() {
                    out.push(Output::Persist(muts));
                    self.queue_dirty = true;
                }
            }
            EventKind::PrinterError { message, fatal } => {
                tracing::warn!(printer = %id, fatal, %message, "printer error");
            }
            _ => {}
        }
    }

    fn on_result(&mut self, now: Now, id: PrinterId, r: CommandResult, out: &mut Vec<Output>) {
        let Some(p) = self.printers.get_mut(&id) else {
            return;
        };
        let Some(pending) = p.pending.clone() else {
            return;
        };
        let latest = pending.command == r.id;
        if !latest && !pending.earlier.contains(&r.id) {
            return;
        }
        match r.status {
            // Refusals of earlier sends say nothing: the latest one is still on its way.
            ResultStatus::Expired | ResultStatus::Error if !latest => {}
            ResultStatus::Ok => {
                tracing::info!(printer = %id, job = %pending.job, "start accepted");
                p.pending = None;
                let mut muts = Vec::new();
                if let Some(j) = self.jobs.get_mut(&pending.job) {
                    if j.state == JobState::Assigned {
                        j.state = JobState::Transferring;
                        muts.push(Mutation::PutJob(j.clone()));
                    }
                }
                if !muts.is_empty() {
                    out.push(Output::Persist(muts));
                }
            }
            ResultStatus::Duplicate => {}
            ResultStatus::Busy => {
                // Nothing happened on the printer: send it again when it says.
                self.counters.busy_commands += 1;
                if latest {
                    let wait = r.retry_after_ms.unwrap_or(1_000).clamp(10, 60_000);
                    if let Some(x) = p.pending.as_mut() {
                        x.busy_retry_mono = Some(now.mono_ms + wait);
                    }
                }
            }
            ResultStatus::Expired | ResultStatus::Error => {
                tracing::warn!(printer = %id, job = %pending.job, status = ?r.status, reason = r.reason.as_deref().unwrap_or(""), "start refused");
                // The printer's next report tells the truth (an earlier send may have been
                // accepted; a job that already ran shows in its ledger): until it comes, the
                // start stays pending, so the job is not moved. Then it is sent again when
                // the printer is ready, or moved if the printer shows it does not have it.
                if let Some(x) = p.pending.as_mut() {
                    x.refused = Some((r.epoch, r.at_ms));
                }
            }
        }
        self.queue_dirty = true;
    }

    /// Compares a printer's report with what the supervisor believes, and converges.
    fn reconcile(&mut self, now: Now, id: &PrinterId, s: &StateSnapshot, out: &mut Vec<Output>) {
        // 0. A job recorded finished that is no longer on the printer's bed was harvested there
        // (its bed was cleared by a command this supervisor could not judge, e.g. one sent
        // while it had no state of the printer): it is done.
        let on_bed = s.job.as_ref().map(|j| &j.job_id);
        let mut harvested = Vec::new();
        for entry in &s.recent_jobs {
            if entry.outcome != JobStage::Finished || on_bed == Some(&entry.job_id) {
                continue;
            }
            if let Some(j) = self.jobs.get_mut(&entry.job_id) {
                if j.state == JobState::Finished && j.printer.as_ref() == Some(id) {
                    j.state = JobState::Done;
                    harvested.push(Mutation::PutJob(j.clone()));
                }
            }
        }
        if !harvested.is_empty() {
            self.counters.reconciliations += 1;
            out.push(Output::Persist(harvested));
            self.queue_dirty = true;
        }
        // 1. Jobs that ended on this printer while nobody listened.
        for entry in s.recent_jobs.iter().rev() {
            let Some(j) = self.jobs.get(&entry.job_id) else {
                continue;
            };
            // A cancelled job too: the printer's outcome is recorded and frees the printer.
            let open = active(j.state) || j.state == JobState::Cancelled;
            if open && j.printer.as_ref() == Some(id) {
                self.counters.reconciliations += 1;
                tracing::info!(printer = %id, job = %entry.job_id, outcome = ?entry.outcome, "reconciled: the job ended while we were apart");
                self.apply_outcome(
                    now,
                    id,
                    &entry.job_id.clone(),
                    entry.outcome,
                    None,
                    Some(entry.ended_at_ms),
                    out,
                );
            }
        }
        // 2. The job on the printer now.
        if let Some(pj) = &s.job {
            match self.jobs.get(&pj.job_id).cloned() {
                Some(j) if pj.stage.is_terminal() => {
                    if active(j.state) {
                        self.counters.reconciliations += 1;
                        self.apply_outcome(
                            now,
                            id,
                            &pj.job_id,
                            pj.stage,
                            pj.reason.clone(),
                            pj.ended_at_ms,
                            out,
                        );
                    }
                }
                Some(j) => {
                    if matches!(j.state, JobState::Cancelled) {
                        // The operator cancelled it while the printer could not hear us.
                        self.send(
                            now,
                            id,
                            CommandAction::Cancel(JobRef {
                                job_id: Some(pj.job_id.clone()),
                            }),
                            None,
                            out,
                        );
                    } else if j.state == JobState::Done
                        || j.printer.as_ref() != Some(id) && j.printer.is_some()
                        || j.printer.is_none() && !self.is_enrolled(id)
                    {
                        self.note_foreign(id, &pj.job_id);
                    } else {
                        let state = job_state_of(pj.stage);
                        let mut rec = j.clone();
                        let changed = rec.state != state || rec.printer.as_ref() != Some(id);
                        if rec.state != state
                            && !(rec.state == JobState::Assigned && state == JobState::Transferring)
                        {
                            self.counters.reconciliations +=
                                u64::from(rec.state == JobState::TimedOut);
                        }
                        rec.state = state;
                        rec.printer = Some(id.clone());
                        rec.progress_pct = Some(pj.progress_pct);
                        rec.started_at_ms = pj.started_at_ms.or(rec.started_at_ms);
                        rec.reason = None;
                        self.jobs.insert(rec.job_id.clone(), rec.clone());
                        let p = self.printers.get_mut(id).expect("known");
                        if p.pending.as_ref().is_some_and(|x| x.job == rec.job_id) {
                            p.pending = None;
                        }
                        let mut muts = vec![];
                        if changed {
                            muts.push(Mutation::PutJob(rec.clone()));
                        }
                        if p.rec.assigned.as_ref() != Some(&rec.job_id) {
                            p.rec.assigned = Some(rec.job_id.clone());
                            muts.push(Mutation::PutPrinter(p.rec.clone()));
                        }
                        if !muts.is_empty() {
                            out.push(Output::Persist(muts));
                        }
                    }
                }
                None => {
                    tracing::warn!(printer = %id, job = %pj.job_id, "printer runs a job this supervisor does not know");
                }
            }
        }
        // 3. A job we assigned that the printer does not show: start it when it is ready.
        // One flagged timed-out before it ever started (the printer went silent with the start
        // unanswered) is assigned again: the printer is back and does not have it, and it never
        // runs a job id twice, so sending the start again is safe.
        let shows = |job: &JobId| {
            s.job.as_ref().is_some_and(|pj| &pj.job_id == job)
                || s.recent_jobs.iter().any(|e| &e.job_id == job)
        };
        // A printer still holding a job that has ended in the supervisor's books (cancelled
        // while the printer could not hear of it, before it ever had it) and that its current
        // report does not show: nothing will ever end it there, so the printer is free again.
        let p = self.printers.get_mut(id).expect("known");
        if let Some(job) = p.rec.assigned.clone() {
            let ended = self.jobs.get(&job).is_none_or(|j| !active(j.state));
            if ended
                && p.pending.as_ref().is_none_or(|x| x.job != job)
                && Self::surely_without(p, &job)
            {
                tracing::info!(printer = %id, job = %job, "reconciled: the printer never had the ended job; it is free");
                p.rec.assigned = None;
                self.counters.reconciliations += 1;
                out.push(Output::Persist(vec![Mutation::PutPrinter(p.rec.clone())]));
                self.queue_dirty = true;
            }
        }
        let p = &self.printers[id];
        if let Some(job) = p.rec.assigned.clone() {
            let stuck = p.reachable()
                && p.pending.as_ref().is_none_or(|x| x.job != job)
                && !shows(&job)
                && self.jobs.get(&job).is_some_and(|j| {
                    j.state == JobState::TimedOut
                        && j.started_at_ms.is_none()
                        && j.printer.as_ref() == Some(id)
                });
            if stuck {
                let j = self.jobs.get_mut(&job).expect("checked");
                j.state = JobState::Assigned;
                j.reason = None;
                self.counters.reconciliations += 1;
                tracing::info!(printer = %id, job = %job, "reconciled: the timed-out job never started; it is assigned again");
                out.push(Output::Persist(vec![Mutation::PutJob(j.clone())]));
                self.queue_dirty = true;
            }
        }
        self.push_start(now, id, out);
    }

    fn is_enrolled(&self, id: &PrinterId) -> bool {
        self.enrolled.as_ref().is_none_or(|s| s.contains(id))
    }

    /// A printer reports a job that was not placed on it: counted and logged once per pair.
    fn note_foreign(&mut self, printer: &PrinterId, job: &JobId) {
        if self.foreign.insert((printer.clone(), job.clone())) {
            self.counters.foreign_jobs += 1;
            tracing::error!(printer = %printer, job = %job, "a printer reports a job the supervisor placed elsewhere (a replayed start or a forged report?); ignored, counted in printloop_foreign_jobs_total");
        }
    }

    /// Records how a job ended on `printer`.
    #[allow(clippy::too_many_arguments)]
    fn apply_outcome(
        &mut self,
        _now: Now,
        printer: &PrinterId,
        job_id: &JobId,
        stage: JobStage,
        reason: Option<String>,
        ended_at: Option<u64>,
        out: &mut Vec<Output>,
    ) {
        let Some(j) = self.jobs.get_mut(job_id) else {
            return;
        };
        if !active(j.state) && j.state != JobState::Cancelled {
            return;
        }
        if j.printer.as_ref() != Some(printer) {
            // Only the printer a job was placed on says how it ended: an outcome from any other
            // (a forged `job_ended`, an invented printer) changes nothing.
            self.note_foreign(printer, job_id);
            return;
        }
        let new_state = job_state_of(stage);
        if j.state == new_state {
            // Already recorded (an operator's cancel, confirmed now by the printer): the
            // printer is free again all the same.
            if let Some(p) = self.printers.get_mut(printer) {
                if p.rec.assigned.as_ref() == Some(job_id) {
                    p.rec.assigned = None;
                    p.pending = None;
                    out.push(Output::Persist(vec![Mutation::PutPrinter(p.rec.clone())]));
                    self.queue_dirty = true;
                }
            }
            return;
        }
        j.state = new_state;
        j.printer = Some(printer.clone());
        j.ended_at_ms = ended_at;
        if stage == JobStage::Finished {
            j.progress_pct = Some(100.0);
        }
        j.reason = reason;
        let rec = j.clone();
        let mut muts = vec![Mutation::PutJob(rec)];
        if let Some(p) = self.printers.get_mut(printer) {
            if p.rec.assigned.as_ref() == Some(job_id) {
                p.rec.assigned = None;
            }
            if p.pending.as_ref().is_some_and(|x| &x.job == job_id) {
                p.pending = None;
            }
            match stage {
                JobStage::Finished => p.rec.consecutive_failures = 0,
                JobStage::Failed | JobStage::Interrupted => {
                    p.rec.consecutive_failures += 1;
                    if p.rec.consecutive_failures >= self.cfg.breaker_threshold && !p.rec.held {
                        p.rec.held = true;
                        tracing::error!(printer = %printer, failures = p.rec.consecutive_failures, "circuit breaker: printer held out of dispatch until an operator releases it");
                    }
                }
                _ => {}
            }
            muts.push(Mutation::PutPrinter(p.rec.clone()));
        }
        out.push(Output::Persist(muts));
        self.queue_dirty = true;
    }

    /// `sup-<epoch>-<n>-<tag>`: readable, unique, and not guessable from the ids seen so far
    /// (the tag is a keyed digest of epoch and n).
    fn next_command_id(&mut self) -> CommandId {
        use sha2::Digest as _;
        self.commands_sent += 1;
        let (epoch, n) = (self.epoch, self.commands_sent);
        let mut h = sha2::Sha256::new();
        h.update(self.cfg.command_key);
        h.update(epoch.to_le_bytes());
        h.update(n.to_le_bytes());
        let tag: String = h.finalize()[..5]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        CommandId::new(format!("sup-{epoch}-{n}-{tag}")).expect("digits form a valid id")
    }

    fn send(
        &mut self,
        now: Now,
        printer: &PrinterId,
        action: CommandAction,
        expires: Option<u64>,
        out: &mut Vec<Output>,
    ) -> CommandId {
        let id = self.next_command_id();
        let cmd = Command {
            expires_at: expires.map(|ttl| now.unix_ms + ttl),
            client: Some(ClientId::new(SUPERVISOR_CLIENT).expect("a valid client id")),
            ..Command::new(id.clone(), action)
        };
        self.publish(
            out,
            self.topic(Topic::Cmd(printer.clone())),
            cmd.encode(),
            false,
        );
        id
    }

    /// Sends the start of the printer's assigned job when the printer is ready for it.
    fn push_start(&mut self, now: Now, id: &PrinterId, out: &mut Vec<Output>) {
        let Some(p) = self.printers.get(id) else {
            return;
        };
        let Some(job_id) = p.rec.assigned.clone() else {
            return;
        };
        let Some(job) = self.jobs.get(&job_id).cloned() else {
            return;
        };
        if job.state != JobState::Assigned
            || !p.reachable()
            || p.phase() != Some(PrinterPhase::Ready)
        {
            return;
        }
        if let Some(pending) = &p.pending {
            if pending.job == job_id && now.mono_ms < pending.retry_at(self.cfg.command_retry_ms) {
                return; // on its way
            }
            self.counters.command_retries += 1;
        }
        if !self.connected {
            return;
        }
        let action = CommandAction::StartJob(StartJob {
            job_id: job.job_id.clone(),
            printer_id: id.clone(),
            file_sha256: job.sha256.clone(),
            size_bytes: job.size_bytes,
            name: job.name.clone(),
        });
        let cmd = self.send(now, id, action, Some(self.cfg.command_ttl_ms), out);
        self.counters.starts_sent += 1;
        if let Some(q) = self.queued_since_mono.remove(&job_id) {
            self.counters
                .dispatch_latency_ms
                .push(now.mono_ms.saturating_sub(q));
        }
        tracing::info!(printer = %id, job = %job_id, command = %cmd, "start sent");
        let p = self.printers.get_mut(id).expect("known");
        let mut earlier = match p.pending.take() {
            Some(old) if old.job == job_id => {
                let mut e = old.earlier;
                e.push(old.command);
                e
            }
            _ => Vec::new(),
        };
        if earlier.len() > 16 {
            earlier.remove(0);
        }
        p.pending = Some(PendingStart {
            job: job_id,
            command: cmd,
            earlier,
            sent_mono: now.mono_ms,
            expires_unix: now.unix_ms + self.cfg.command_ttl_ms,
            refused: None,
            busy_retry_mono: None,
        });
    }

    /// Gives queued jobs to printers. Ready printers first; otherwise a job waits, assigned,
    /// on an online printer whose bed is not yet cleared (deferred start).
    ///
    /// The free printers are listed once per call (in id order, as a per-job scan would find
    /// them) and the jobs are only collected when some printer is free: with thousands of
    /// printers and queued jobs this runs after every message.
    fn dispatch(&mut self, now: Now, out: &mut Vec<Output>) {
        let mut ready_free: Vec<PrinterId> = self
            .printers
            .values()
            .filter(|p| Self::is_free(p, true))
            .map(|p| p.rec.printer_id.clone())
            .collect();
        if ready_free.is_empty() && !self.printers.values().any(|p| Self::is_free(p, false)) {
            return; // nothing can be placed: no job needs looking at
        }
        let mut queued: Vec<(i32, u64, JobId)> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Queued)
            .map(|j| (-j.priority, j.seq, j.job_id.clone()))
            .collect();
        // An assigned job that its printer no longer holds (the printer was found running
        // another job, or forgotten), with no start on its way and not shown by the printer:
        // nobody will ever start it where it is, so it goes back to the queue.
        let orphans: Vec<JobId> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Assigned && self.orphaned(j))
            .map(|j| j.job_id.clone())
            .collect();
        for job in orphans {
            let j = self.jobs.get_mut(&job).expect("listed");
            tracing::warn!(job = %job, printer = ?j.printer, "assigned job held by no printer: back to the queue");
            j.state = JobState::Queued;
            j.printer = None;
            out.push(Output::Persist(vec![Mutation::PutJob(j.clone())]));
            queued.push((-j.priority, j.seq, job));
            self.queue_dirty = true;
        }
        // A deferred job (assigned, not started, printer not ready) moves to a ready printer.
        let deferred: Vec<(PrinterId, JobId)> = if ready_free.is_empty() {
            Vec::new()
        } else {
            self.printers
                .values()
                .filter(|p| p.pending.is_none() && p.phase() != Some(PrinterPhase::Ready))
                .filter_map(|p| {
                    let j = p.rec.assigned.as_ref()?;
                    // Only when the printer's current report shows it does not have the job
                    // (a start it accepted may not have been heard of yet).
                    (self.jobs.get(j)?.state == JobState::Assigned && Self::surely_without(p, j))
                        .then(|| (p.rec.printer_id.clone(), j.clone()))
                })
                .collect()
        };
        for (printer, job) in deferred {
            if self.pick(&ready_free, &job).is_some() {
                let p = self.printers.get_mut(&printer).expect("known");
                p.rec.assigned = None;
                let rec = p.rec.clone();
                let j = self.jobs.get_mut(&job).expect("known");
                j.state = JobState::Queued;
                j.printer = None;
                out.push(Output::Persist(vec![
                    Mutation::PutPrinter(rec),
                    Mutation::PutJob(j.clone()),
                ]));
                queued.push((-j.priority, j.seq, job));
            }
        }
        queued.sort();
        // Listed after the deferred moves: a printer that gave its job back may take another.
        let mut later_free: Vec<PrinterId> = self
            .printers
            .values()
            .filter(|p| Self::is_free(p, false))
            .map(|p| p.rec.printer_id.clone())
            .collect();
        for (_, _, job_id) in queued {
            if ready_free.is_empty() && later_free.is_empty() {
                break;
            }
            let ready = self.pick(&ready_free, &job_id);
            let deferred = ready.is_none();
            let printer = match ready {
                Some(i) => ready_free.remove(i),
                None => match self.pick(&later_free, &job_id) {
                    Some(i) => later_free.remove(i),
                    None => continue,
                },
            };
            let j = self.jobs.get_mut(&job_id).expect("queued job exists");
            j.state = JobState::Assigned;
            j.printer = Some(printer.clone());
            j.assigned_at_ms = Some(now.unix_ms);
            let jrec = j.clone();
            let p = self.printers.get_mut(&printer).expect("known");
            p.rec.assigned = Some(job_id.clone());
            let prec = p.rec.clone();
            // Persist the assignment before the start command can leave.
            out.push(Output::Persist(vec![
                Mutation::PutJob(jrec),
                Mutation::PutPrinter(prec),
            ]));
            tracing::info!(printer = %printer, job = %job_id, deferred, "job assigned");
            self.queue_dirty = true;
            self.push_start(now, &printer, out);
        }
    }

    /// Whether an `assigned` job is held by no printer: its printer does not list it as its
    /// job, has no start of it on the way, and does not show it in its last report.
    fn orphaned(&self, j: &JobRecord) -> bool {
        let Some(p) = j.printer.as_ref().and_then(|id| self.printers.get(id)) else {
            return true;
        };
        p.rec.assigned.as_ref() != Some(&j.job_id)
            && p.pending.as_ref().is_none_or(|x| x.job != j.job_id)
            && Self::surely_without(p, &j.job_id)
    }

    /// Whether the printer's current report says it does not have `job` (neither on its bed
    /// nor in its recent ledger). No current report (unknown, stale, or of an older epoch than
    /// its status): not sure, so false.
    fn surely_without(p: &PrinterView, job: &JobId) -> bool {
        let Some(s) = p
            .state
            .as_ref()
            .filter(|s| p.reachable() && s.epoch >= p.status_epoch)
        else {
            return false;
        };
        !(s.job.as_ref().is_some_and(|pj| &pj.job_id == job)
            || s.recent_jobs.iter().any(|e| &e.job_id == job))
    }

    /// The first of `free` whose tags `job` accepts (its index).
    fn pick(&self, free: &[PrinterId], job: &JobId) -> Option<usize> {
        let j = self.jobs.get(job)?;
        free.iter().position(|id| {
            self.printers
                .get(id)
                .is_some_and(|p| j.tags.iter().all(|t| p.rec.tags.contains(t)))
        })
    }

    /// A printer that can take a job now (`ready`), or that will once its bed is cleared.
    fn is_free(p: &PrinterView, ready: bool) -> bool {
        if !(p.enrolled
            && p.reachable()
            && !p.rec.held
            && p.rec.assigned.is_none()
            && p.pending.is_none())
        {
            return false;
        }
        let Some(s) = p.state.as_ref() else {
            return false;
        };
        if s.maintenance {
            return false;
        }
        if ready {
            s.phase == PrinterPhase::Ready
        } else {
            matches!(s.phase, PrinterPhase::Idle | PrinterPhase::Finished)
                && s.job.as_ref().is_none_or(|pj| pj.stage.is_terminal())
        }
    }

    /// A message on `supervisor/status`: our echo, or someone else's claim (a forged `offline`,
    /// a cleared topic). A contradiction is answered with our presence again, at most once a
    /// second.
    fn on_own_status(&mut self, payload: &[u8]) {
        let ours = Status::decode(payload)
            .is_ok_and(|s| s.presence == Presence::Online && s.epoch == self.epoch);
        if self.connected && !ours && !self.status_reassert_due {
            tracing::warn!("a retained supervisor status contradicts ours (forged, or left by an old connection): publishing it again");
            self.status_reassert_due = true;
        }
    }

    fn status_reassert_at(&self) -> Option<u64> {
        self.status_reassert_due.then(|| {
            self.status_reasserted_mono
                .map_or(0, |t| t + STATUS_REASSERT_EVERY_MS)
        })
    }

    fn on_time(&mut self, now: Now, out: &mut Vec<Output>) {
        if self.connected && self.status_reassert_at().is_some_and(|t| now.mono_ms >= t) {
            self.status_reassert_due = false;
            self.status_reasserted_mono = Some(now.mono_ms);
            self.publish(
                out,
                self.topic(Topic::SupervisorStatus),
                Status::online(self.epoch, now.unix_ms).encode(),
                true,
            );
        }
        // Only printers with something due (a superset of what the body below acts on): this
        // runs after every message, so it must not clone every printer id each time.
        let ids: Vec<PrinterId> = self
            .printers
            .values()
            .filter(|p| {
                let stale_due = p.presence == Presence::Online
                    && !p.stale
                    && p.last_state_mono.is_some_and(|last| {
                        now.mono_ms > last + p.heartbeat_ms() * u64::from(self.cfg.stale_heartbeats)
                    });
                let rebirth_due = p.presence == Presence::Online
                    && p.state.as_ref().is_none_or(|s| s.epoch < p.status_epoch);
                let timeout_due = p.rec.assigned.is_some()
                    && p.silent_since_mono
                        .is_some_and(|since| now.mono_ms >= since + self.cfg.step_timeout_ms);
                stale_due || rebirth_due || timeout_due || p.pending.is_some()
            })
            .map(|p| p.rec.printer_id.clone())
            .collect();
        for id in ids {
            let stale_after = {
                let p = &self.printers[&id];
                p.heartbeat_ms() * u64::from(self.cfg.stale_heartbeats)
            };
            let p = self.printers.get_mut(&id).expect("listed");
            if p.presence == Presence::Online && !p.stale {
                if let Some(last) = p.last_state_mono {
                    if now.mono_ms > last + stale_after {
                        p.stale = true;
                        p.silent_since_mono.get_or_insert(now.mono_ms);
                        self.queue_dirty = true;
                        tracing::warn!(printer = %id, "printer stale: no state for {} ms", now.mono_ms - last);
                    }
                }
            }
            // Online without a state of this epoch: ask it to re-publish everything.
            let p = self.printers.get_mut(&id).expect("listed");
            let needs_rebirth = p.presence == Presence::Online
                && p.state.as_ref().is_none_or(|s| s.epoch < p.status_epoch)
                && now.mono_ms >= p.online_since_mono + self.cfg.rebirth_after_ms
                && p.last_rebirth_mono
                    .is_none_or(|l| now.mono_ms >= l + self.cfg.rebirth_after_ms * 4);
            if needs_rebirth && self.connected {
                p.last_rebirth_mono = Some(now.mono_ms);
                self.counters.rebirths += 1;
                tracing::info!(printer = %id, "views disagree: asking for a rebirth");
                self.send(
                    now,
                    &id,
                    CommandAction::Rebirth(Empty {}),
                    Some(60_000),
                    out,
                );
            }
            // Step timeout: flag the job of a printer silent too long (never move it).
            let p = &self.printers[&id];
            if let (Some(since), Some(job)) = (p.silent_since_mono, p.rec.assigned.clone()) {
                if now.mono_ms >= since + self.cfg.step_timeout_ms {
                    if let Some(j) = self.jobs.get_mut(&job) {
                        if active(j.state) && j.state != JobState::TimedOut {
                            j.state = JobState::TimedOut;
                            j.reason = Some(format!(
                                "no report from {id} for {} s; it may still be printing",
                                (now.mono_ms - since) / 1000
                            ));
                            tracing::error!(printer = %id, job = %job, "job timed out: flagged for an operator, not moved");
                            out.push(Output::Persist(vec![Mutation::PutJob(j.clone())]));
                            self.queue_dirty = true;
                        }
                    }
                }
            }
            // A start whose command expired without any answer: the job goes back to the queue
            // only if the printer never reported it (it cannot start any more: it expired).
            let p = &self.printers[&id];
            if let Some(pending) = p.pending.clone() {
                let shows = p.state.as_ref().is_some_and(|s| {
                    s.job.as_ref().is_some_and(|j| j.job_id == pending.job)
                        || s.recent_jobs.iter().any(|e| e.job_id == pending.job)
                });
                // The printer judges expiry by its own clock: allow for some skew.
                if !shows
                    && now.unix_ms > pending.expires_unix.saturating_add(START_EXPIRY_SKEW_MS)
                    && p.reachable()
                {
                    let p = self.printers.get_mut(&id).expect("listed");
                    p.pending = None;
                } else if now.mono_ms >= pending.retry_at(self.cfg.command_retry_ms) {
                    self.push_start(now, &id, out);
                }
            }
        }
    }

    fn publish_queue(&mut self, now: Now, out: &mut Vec<Output>, force: bool) {
        if !self.connected || !(self.queue_dirty || force) {
            return;
        }
        if !force
            && self
                .last_queue_mono
                .is_some_and(|l| now.mono_ms < l + self.cfg.queue_min_interval_ms)
        {
            return;
        }
        self.queue_seq += 1;
        let snap = self.queue_snapshot(now);
        self.publish(out, self.topic(Topic::Queue), snap.encode(), true);
        self.queue_dirty = false;
        self.last_queue_mono = Some(now.mono_ms);
    }

    /// The queue snapshot as it is now.
    pub fn queue_snapshot(&self, now: Now) -> QueueSnapshot {
        let mut counts = QueueCounts::default();
        let mut open: Vec<&JobRecord> = self.jobs.values().filter(|j| j.is_open()).collect();
        for j in &open {
            match j.state {
                JobState::Queued => counts.queued += 1,
                JobState::Assigned | JobState::Transferring | JobState::Starting => {
                    counts.starting += 1
                }
                JobState::Printing | JobState::Paused => counts.printing += 1,
                JobState::Finished => counts.awaiting_harvest += 1,
                JobState::Failed | JobState::Interrupted | JobState::TimedOut => {
                    counts.attention += 1
                }
                JobState::Done | JobState::Cancelled => {}
            }
        }
        open.sort_by_key(|j| (j.state != JobState::Queued, -j.priority, j.seq));
        let truncated = open.len() > 100;
        QueueSnapshot {
            v: Version,
            epoch: self.epoch,
            seq: self.queue_seq,
            at_ms: now.unix_ms,
            counts,
            jobs: open.into_iter().take(100).map(summary).collect(),
            truncated,
        }
    }

    // ----- operator API -----

    fn answer(
        &mut self,
        now: Now,
        client: &ClientId,
        id: &CommandId,
        result: Result<ApiResult, String>,
        remember: bool,
        out: &mut Vec<Output>,
    ) {
        let resp = match result {
            Ok(r) => ApiResponse {
                v: Version,
                id: id.clone(),
                ok: true,
                result: Some(r),
                error: None,
                retry_after_ms: None,
            },
            Err(e) => ApiResponse {
                v: Version,
                id: id.clone(),
                ok: false,
                result: None,
                error: Some(e),
                retry_after_ms: None,
            },
        };
        let payload = resp.encode();
        if remember {
            let key = format!("{client}/{id}");
            self.answers.insert(key.clone(), payload.clone());
            out.push(Output::Persist(vec![Mutation::PutRequest {
                key,
                response: payload.clone(),
                at_ms: now.unix_ms,
            }]));
        }
        self.publish_in(
            Lane::Answer,
            out,
            self.topic(Topic::ApiResponse(client.clone())),
            payload,
            false,
        );
    }

    /// Admits a request of `client`, or answers it busy (nothing done, nothing stored, in the
    /// lowest lane) and says no.
    fn admit_api(
        &mut self,
        now: Now,
        client: &ClientId,
        id: &CommandId,
        out: &mut Vec<Output>,
    ) -> bool {
        let Err(busy) = self.api_limiter.admit(client.as_str(), now.mono_ms) else {
            return true;
        };
        self.counters.busy_requests += 1;
        if self.counters.busy_requests.is_power_of_two() {
            tracing::warn!(%client, refused = self.counters.busy_requests, "API requests over their client's rate are answered busy and not carried out");
        }
        let resp = ApiResponse {
            v: Version,
            id: id.clone(),
            ok: false,
            result: None,
            error: Some(format!(
                "busy: client {client} sends more than {} requests a second; nothing was done, \
                 retry after {} ms",
                self.cfg.api_rate.per_s, busy.retry_after_ms
            )),
            retry_after_ms: Some(busy.retry_after_ms),
        };
        self.publish_in(
            Lane::Refusal,
            out,
            self.topic(Topic::ApiResponse(client.clone())),
            resp.encode(),
            false,
        );
        false
    }

    fn on_api(&mut self, now: Now, payload: &[u8], out: &mut Vec<Output>) {
        let req = match ApiRequest::decode(payload) {
            Ok(r) if !self.admit_api(now, &r.client, &r.id, out) => return,
            Err(ApiReject {
                client: Some(client),
                id: Some(id),
                ..
            }) if !self.admit_api(now, &client, &id, out) => return,
            Ok(r) if r.client.as_str() == HA_CLIENT => {
                // Home Assistant's presses are requests of this client with ids made from the
                // printer's state; one from the network could claim such an id first and make
                // the real press look like a repeat.
                self.counters.rejected_messages += 1;
                tracing::warn!(id = %r.id, "API request under Home Assistant's reserved client name refused");
                let why = format!("the client name {HA_CLIENT:?} is reserved for Home Assistant's buttons; choose another");
                self.answer(now, &r.client, &r.id, Err(why), false, out);
                return;
            }
            Ok(r) => r,
            Err(reject) => {
                self.counters.rejected_messages += 1;
                match (reject.client, reject.id) {
                    (Some(client), Some(id)) => {
                        self.answer(now, &client, &id, Err(reject.error.to_string()), false, out)
                    }
                    _ => {
                        tracing::warn!(error = %reject.error, "API request without a readable id and client dropped")
                    }
                }
                return;
            }
        };
        self.run_request(now, req, out);
    }

    /// Carries out a decoded request (from `api/request`, or made from a button press) and
    /// answers it; a request id seen before gets its first answer again and nothing happens.
    fn run_request(&mut self, now: Now, req: ApiRequest, out: &mut Vec<Output>) {
        let key = format!("{}/{}", req.client, req.id);
        if let Some(prev) = self.answers.get(&key) {
            // A retried request gets the same answer, and nothing happens twice.
            self.publish(
                out,
                self.topic(Topic::ApiResponse(req.client.clone())),
                prev.clone(),
                false,
            );
            return;
        }
        let span = tracing::info_span!("api", client = %req.client, id = %req.id);
        let _e = span.enter();
        let (client, id) = (req.client.clone(), req.id.clone());
        let (result, remember) = match req.op {
            ApiOp::UploadChunk(chunk) => {
                out.push(Output::StoreUpload { client, id, chunk });
                return;
            }
            ApiOp::SubmitJob(s) => (self.api_submit(now, s, out), true),
            ApiOp::CancelJob(a) => (self.api_cancel(now, &a.job_id, out), true),
            ApiOp::RequeueJob(a) => (
                self.api_requeue(now, &a.job_id, out)
                    .map(|j| ApiResult::Submitted { job_ids: vec![j] }),
                true,
            ),
            ApiOp::SetPriority(a) => (self.api_priority(&a.job_id, a.priority, out), true),
            ApiOp::ListJobs(l) => (Ok(self.api_list(&l)), false),
            ApiOp::ListPrinters(_) => (
                Ok(ApiResult::Printers {
                    printers: self.printer_summaries(),
                }),
                false,
            ),
            ApiOp::BedClear(b) => (self.api_bed_clear(now, b, out), true),
            ApiOp::ReleasePrinter(a) => (self.api_release(&a.printer_id, out), true),
            ApiOp::PausePrinter(a) => (self.api_pause_resume(now, &a.printer_id, true, out), true),
            ApiOp::ResumePrinter(a) => {
                (self.api_pause_resume(now, &a.printer_id, false, out), true)
            }
            ApiOp::ForgetPrinter(a) => (self.api_forget(&a.printer_id, out), true),
        };
        if let Err(e) = &result {
            tracing::warn!(error = %e, "request refused");
        }
        self.answer(now, &client, &id, result, remember, out);
        self.queue_dirty = true;
    }

    fn on_uploaded(
        &mut self,
        now: Now,
        client: ClientId,
        id: CommandId,
        outcome: UploadOutcome,
        out: &mut Vec<Output>,
    ) {
        let result = match outcome {
            UploadOutcome::Progress {
                received,
                total_size,
                complete,
            } => {
                if let Some(f) = complete {
                    if !self.files.contains_key(&f.sha256) {
                        tracing::info!(sha256 = %f.sha256, size = f.size_bytes, "file stored");
                        out.push(Output::Persist(vec![Mutation::PutFile(f.clone())]));
                        self.files.insert(f.sha256.clone(), f);
                    }
                }
                Ok(ApiResult::Uploaded {
                    received,
                    total_size,
                })
            }
            UploadOutcome::Failed(e) => Err(e),
        };
        self.answer(now, &client, &id, result, false, out);
    }

    fn api_submit(
        &mut self,
        now: Now,
        s: SubmitJob,
        out: &mut Vec<Output>,
    ) -> Result<ApiResult, String> {
        let Some(file) = self.files.get(&s.sha256).cloned() else {
            return Err(format!(
                "file {} is not stored: upload it first (printloop jobs add does)",
                s.sha256
            ));
        };
        if s.copies == 0 || s.copies > 1000 {
            return Err(format!("copies must be 1 to 1000, not {}", s.copies));
        }
        if s.name.trim().is_empty() || s.name.len() > 200 {
            return Err("name must be 1 to 200 characters".into());
        }
        let mut ids = Vec::new();
        let mut muts = Vec::new();
        for _ in 0..s.copies {
            let n = self.next_job;
            self.next_job += 1;
            let job_id = JobId::new(format!("j-{n:06}")).expect("digits form a valid id");
            let rec = JobRecord {
                job_id: job_id.clone(),
                name: s.name.clone(),
                sha256: s.sha256.clone(),
                size_bytes: file.size_bytes,
                priority: s.priority,
                seq: n,
                tags: s.tags.clone(),
                state: JobState::Queued,
                printer: None,
                retry_of: None,
                attempt: 0,
                progress_pct: None,
                submitted_at_ms: now.unix_ms,
                assigned_at_ms: None,
                started_at_ms: None,
                ended_at_ms: None,
                reason: None,
            };
            self.queued_since_mono.insert(job_id.clone(), now.mono_ms);
            self.jobs.insert(job_id.clone(), rec.clone());
            muts.push(Mutation::PutJob(rec));
            ids.push(job_id);
        }
        muts.push(Mutation::SetNextJob(self.next_job));
        out.push(Output::Persist(muts));
        tracing::info!(jobs = ?ids.iter().map(JobId::as_str).collect::<Vec<_>>(), name = %s.name, "jobs queued");
        Ok(ApiResult::Submitted { job_ids: ids })
    }

    fn api_cancel(
        &mut self,
        now: Now,
        job: &JobId,
        out: &mut Vec<Output>,
    ) -> Result<ApiResult, String> {
        let j = self
            .jobs
            .get(job)
            .cloned()
            .ok_or_else(|| format!("unknown job {job:?}"))?;
        match j.state {
            JobState::Queued => {}
            s if active(s) => {
                let printer = j.printer.clone().ok_or("active job without a printer")?;
                // Tell the printer (queued in its session if it is away).
                self.send(
                    now,
                    &printer,
                    CommandAction::Cancel(JobRef {
                        job_id: Some(job.clone()),
                    }),
                    None,
                    out,
                );
                if let Some(p) = self.printers.get_mut(&printer) {
                    if p.rec.assigned.as_ref() == Some(job) && s == JobState::Assigned {
                        p.rec.assigned = None;
                        p.pending = None;
                        out.push(Output::Persist(vec![Mutation::PutPrinter(p.rec.clone())]));
                    }
                }
            }
            other => return Err(format!("job {job} already ended ({other:?})").to_lowercase()),
        }
        let j = self.jobs.get_mut(job).expect("checked");
        j.state = JobState::Cancelled;
        j.ended_at_ms.get_or_insert(now.unix_ms);
        j.reason = Some("cancelled by an operator".into());
        out.push(Output::Persist(vec![Mutation::PutJob(j.clone())]));
        self.queued_since_mono.remove(job);
        Ok(ApiResult::Done {})
    }

    fn api_requeue(
        &mut self,
        now: Now,
        job: &JobId,
        out: &mut Vec<Output>,
    ) -> Result<JobId, String> {
        let j = self
            .jobs
            .get(job)
            .cloned()
            .ok_or_else(|| format!("unknown job {job:?}"))?;
        if !matches!(
            j.state,
            JobState::Failed
                | JobState::Interrupted
                | JobState::TimedOut
                | JobState::Cancelled
                | JobState::Finished
        ) {
            return Err(format!(
                "job {job} is {:?}: only an ended or timed-out job can be requeued",
                j.state
            )
            .to_lowercase());
        }
        let base = j.retry_of.clone().unwrap_or_else(|| j.job_id.clone());
        let attempt = j.attempt + 1;
        let new_id = JobId::new(format!("{base}.r{attempt}")).map_err(|e| e.to_string())?;
        if self.jobs.contains_key(&new_id) {
            return Err(format!("job {job} was already requeued as {new_id}"));
        }
        let n = self.next_job;
        self.next_job += 1;
        let rec = JobRecord {
            job_id: new_id.clone(),
            state: JobState::Queued,
            printer: None,
            retry_of: Some(base),
            attempt,
            progress_pct: None,
            seq: n,
            submitted_at_ms: now.unix_ms,
            assigned_at_ms: None,
            started_at_ms: None,
            ended_at_ms: None,
            reason: None,
            ..j.clone()
        };
        let mut old = j;
        let mut muts = vec![
            Mutation::PutJob(rec.clone()),
            Mutation::SetNextJob(self.next_job),
        ];
        if old.state == JobState::Finished {
            old.state = JobState::Failed;
            old.reason = Some("marked failed by an operator".into());
            muts.push(Mutation::PutJob(old.clone()));
            self.jobs.insert(old.job_id.clone(), old);
        }
        self.queued_since_mono.insert(new_id.clone(), now.mono_ms);
        self.jobs.insert(new_id.clone(), rec);
        out.push(Output::Persist(muts));
        tracing::info!(job = %job, new = %new_id, "requeued");
        Ok(new_id)
    }

    fn api_priority(
        &mut self,
        job: &JobId,
        priority: i32,
        out: &mut Vec<Output>,
    ) -> Result<ApiResult, String> {
        let j = self
            .jobs
            .get_mut(job)
            .ok_or_else(|| format!("unknown job {job:?}"))?;
        if j.state != JobState::Queued {
            return Err(format!("job {job} is not queued").to_lowercase());
        }
        j.priority = priority;
        out.push(Output::Persist(vec![Mutation::PutJob(j.clone())]));
        Ok(ApiResult::Done {})
    }

    fn api_list(&self, l: &ListJobs) -> ApiResult {
        let limit = l.limit.unwrap_or(100).clamp(1, 1000) as usize;
        let mut open: Vec<&JobRecord> = self.jobs.values().filter(|j| j.is_open()).collect();
        open.sort_by_key(|j| (j.state != JobState::Queued, -j.priority, j.seq));
        let mut jobs: Vec<JobSummary> = open.into_iter().map(summary).collect();
        if l.include_ended {
            let mut rest: Vec<&JobRecord> = self
                .jobs
                .values()
                .filter(|j| !jobs.iter().any(|s| s.job_id == j.job_id))
                .collect();
            rest.sort_by_key(|j| {
                std::cmp::Reverse((j.ended_at_ms.unwrap_or(j.submitted_at_ms), j.seq))
            });
            jobs.extend(rest.into_iter().map(summary));
        }
        jobs.truncate(limit);
        ApiResult::Jobs { jobs }
    }

    fn api_bed_clear(
        &mut self,
        now: Now,
        b: BedClear,
        out: &mut Vec<Output>,
    ) -> Result<ApiResult, String> {
        let p = self.known(&b.printer_id)?;
        // The job the printer last reported, and whether it has ended: by the printer's own
        // state, or by its `job_ended` event, which can arrive before the next (rate-limited)
        // state does.
        let reported = p.state.as_ref().and_then(|s| s.job.as_ref());
        let ended_by_event = reported
            .and_then(|j| self.jobs.get(&j.job_id))
            .is_some_and(|j| {
                matches!(
                    j.state,
                    JobState::Finished
                        | JobState::Failed
                        | JobState::Interrupted
                        | JobState::Cancelled
                        | JobState::Done
                )
            });
        if let Some(phase) = p.phase() {
            let busy = matches!(
                phase,
                PrinterPhase::Preparing | PrinterPhase::Printing | PrinterPhase::Paused
            );
            if busy && !ended_by_event {
                return Err(
                    format!("printer {} is {phase:?}: it is not done", b.printer_id).to_lowercase(),
                );
            }
        }
        // Judge the print that is on the bed.
        let on_bed = reported
            .filter(|j| j.stage.is_terminal() || ended_by_event)
            .map(|j| j.job_id.clone());
        if let Some(job) = on_bed {
            if let Some(j) = self.jobs.get(&job).cloned() {
                match (j.state, b.failed) {
                    (JobState::Finished, false) => {
                        let j = self.jobs.get_mut(&job).expect("known");
                        j.state = JobState::Done;
                        out.push(Output::Persist(vec![Mutation::PutJob(j.clone())]));
                    }
                    (JobState::Finished | JobState::Failed | JobState::Interrupted, _) => {
                        // A job an operator already requeued stays requeued once: the bed
                        // is cleared all the same (refusing would leave the printer stuck).
                        if let Err(e) = self.api_requeue(now, &job, out) {
                            tracing::info!(job = %job, reason = %e, "not requeued again");
                        }
                        if let Some(p) = self.printers.get_mut(&b.printer_id) {
                            if b.failed && j.state == JobState::Finished {
                                p.rec.consecutive_failures += 1;
                                if p.rec.consecutive_failures >= self.cfg.breaker_threshold {
                                    p.rec.held = true;
                                }
                                out.push(Output::Persist(vec![Mutation::PutPrinter(
                                    p.rec.clone(),
                                )]));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        tracing::info!(printer = %b.printer_id, failed = b.failed, "operator cleared the bed");
        self.send(
            now,
            &b.printer_id,
            CommandAction::BedCleared(Empty {}),
            Some(self.cfg.command_ttl_ms),
            out,
        );
        Ok(ApiResult::Done {})
    }

    fn api_release(
        &mut self,
        printer: &PrinterId,
        out: &mut Vec<Output>,
    ) -> Result<ApiResult, String> {
        let p = self.known_mut(printer)?;
        p.rec.held = false;
        p.rec.consecutive_failures = 0;
        out.push(Output::Persist(vec![Mutation::PutPrinter(p.rec.clone())]));
        tracing::info!(printer = %printer, "released by an operator");
        Ok(ApiResult::Done {})
    }

    /// The printer, or the API's "unknown printer" error.
    fn known(&self, printer: &PrinterId) -> Result<&PrinterView, String> {
        self.printers
            .get(printer)
            .ok_or_else(|| format!("unknown printer {:?}", printer.as_str()))
    }

    fn known_mut(&mut self, printer: &PrinterId) -> Result<&mut PrinterView, String> {
        self.printers
            .get_mut(printer)
            .ok_or_else(|| format!("unknown printer {:?}", printer.as_str()))
    }

    /// `pause_printer` / `resume_printer`: checked against the printer's last state, then a
    /// `pause`/`resume` command for its current job (the gateway checks again).
    fn api_pause_resume(
        &mut self,
        now: Now,
        printer: &PrinterId,
        pause: bool,
        out: &mut Vec<Output>,
    ) -> Result<ApiResult, String> {
        let p = self.known(printer)?;
        let (wanted, verb) = if pause {
            (PrinterPhase::Printing, "pause")
        } else {
            (PrinterPhase::Paused, "resume")
        };
        if !p.reachable() {
            return Err(format!(
                "printer {printer} is offline or silent: cannot {verb}"
            ));
        }
        let phase = p.phase().unwrap_or(PrinterPhase::Disconnected);
        if phase != wanted {
            return Err(format!(
                "printer {printer} is {}: only a {} printer can be told to {verb}",
                phase_name(phase),
                phase_name(wanted)
            ));
        }
        let job_id = p
            .state
            .as_ref()
            .and_then(|s| s.job.as_ref())
            .map(|j| j.job_id.clone());
        let action = if pause {
            CommandAction::Pause(JobRef {
                job_id: job_id.clone(),
            })
        } else {
            CommandAction::Resume(JobRef {
                job_id: job_id.clone(),
            })
        };
        let cmd = self.send(now, printer, action, Some(self.cfg.command_ttl_ms), out);
        tracing::info!(printer = %printer, job = ?job_id.as_ref().map(JobId::as_str), command = %cmd, "{verb} sent");
        Ok(ApiResult::Done {})
    }

    /// `forget_printer`: a decommissioned printer leaves the supervisor, Home Assistant and
    /// the broker's retained topics.
    fn api_forget(
        &mut self,
        printer: &PrinterId,
        out: &mut Vec<Output>,
    ) -> Result<ApiResult, String> {
        let p = self.known(printer)?;
        if p.presence == Presence::Online && !p.stale {
            return Err(format!(
                "printer {printer} is online: stop its gateway before forgetting it"
            ));
        }
        if let Some(job) = p.rec.assigned.as_ref().and_then(|j| self.jobs.get(j)) {
            if active(job.state) && job.state != JobState::TimedOut {
                return Err(format!(
                    "printer {printer} has job {} ({}): cancel it first",
                    job.job_id,
                    format!("{:?}", job.state).to_lowercase()
                ));
            }
        }
        self.printers.remove(printer);
        self.ha_dirty.remove(printer);
        out.push(Output::Persist(vec![Mutation::RemovePrinter(
            printer.clone(),
        )]));
        if self.cfg.ha.enabled {
            for topic in ha::printer_config_topics(&self.cfg.ha, &self.cfg.topics, printer) {
                self.publish(out, topic, Vec::new(), true);
            }
        }
        // An empty retained message deletes the retained one: nothing of it stays.
        for t in [
            Topic::Status(printer.clone()),
            Topic::Meta(printer.clone()),
            Topic::State(printer.clone()),
        ] {
            self.publish(out, self.topic(t), Vec::new(), true);
        }
        tracing::info!(printer = %printer, "printer forgotten (decommissioned)");
        Ok(ApiResult::Done {})
    }

    // ----- Home Assistant -----

    fn on_ha_status(&mut self, now: Now, payload: &[u8]) {
        if payload.trim_ascii() != b"online" {
            return;
        }
        let delay = ha::jitter(
            now.unix_ms ^ self.epoch.rotate_left(32),
            self.cfg.ha.republish_jitter_ms,
        );
        let at = now.mono_ms + delay;
        tracing::info!(
            delay_ms = delay,
            "Home Assistant is online: discovery follows"
        );
        self.ha_republish_mono = Some(self.ha_republish_mono.map_or(at, |t| t.min(at)));
    }

    /// A Home Assistant button: made into the operator request it stands for, with an id
    /// derived from the printer, the action and the printer's last state `(epoch, seq)`: a
    /// press delivered twice, or pressed twice before the printer reported anything new,
    /// happens once; a press after the printer moved on (pause, resume, pause) is new. The
    /// request is checked against the printer's phase; refusals are answered on
    /// `api/response/homeassistant` and logged.
    fn on_press(&mut self, now: Now, printer: PrinterId, payload: &[u8], out: &mut Vec<Output>) {
        let client = ClientId::new(HA_CLIENT).expect("a valid client id");
        let action = match PressAction::parse(payload) {
            Ok(a) => a,
            Err(e) => {
                self.counters.rejected_messages += 1;
                tracing::warn!(printer = %printer, error = %e, "Home Assistant press ignored");
                return;
            }
        };
        let seen = self
            .printers
            .get(&printer)
            .and_then(|p| p.state.as_ref())
            .map_or((0, 0), |s| (s.epoch, s.seq));
        let id = press_id(&printer, action, seen);
        if self.answers.contains_key(&format!("{client}/{id}")) {
            tracing::debug!(printer = %printer, action = action.as_str(), "Home Assistant press repeated: done once");
            return;
        }
        if !self.admit_api(now, &client, &id, out) {
            return;
        }
        let op = match self.press_op(&printer, action) {
            Ok(op) => op,
            Err(e) => {
                tracing::warn!(printer = %printer, action = action.as_str(), error = %e, "Home Assistant press refused");
                self.answer(now, &client, &id, Err(e), false, out);
                return;
            }
        };
        tracing::info!(printer = %printer, action = action.as_str(), "Home Assistant press");
        self.run_request(
            now,
            ApiRequest {
                v: Version,
                id,
                client,
                op,
            },
            out,
        );
    }

    /// The request a press stands for, if it makes sense in the printer's phase.
    fn press_op(&self, printer: &PrinterId, action: PressAction) -> Result<ApiOp, String> {
        let p = self.known(printer)?;
        let phase = p.phase().unwrap_or(PrinterPhase::Disconnected);
        let args = PrinterArgs {
            printer_id: printer.clone(),
        };
        Ok(match action {
            PressAction::Pause => ApiOp::PausePrinter(args),
            PressAction::Resume => ApiOp::ResumePrinter(args),
            PressAction::Cancel => {
                let job = p
                    .state
                    .as_ref()
                    .and_then(|s| s.job.as_ref())
                    .filter(|j| !j.stage.is_terminal())
                    .map(|j| j.job_id.clone())
                    .ok_or_else(|| {
                        format!(
                            "printer {printer} is {} with no job to cancel",
                            phase_name(phase)
                        )
                    })?;
                ApiOp::CancelJob(JobArgs { job_id: job })
            }
            PressAction::BedCleared => {
                if !matches!(phase, PrinterPhase::Idle | PrinterPhase::Finished) {
                    return Err(format!(
                        "printer {printer} is {}: the bed is cleared only when idle or finished",
                        phase_name(phase)
                    ));
                }
                ApiOp::BedClear(BedClear {
                    printer_id: printer.clone(),
                    failed: false,
                })
            }
        })
    }

    /// Publishes the discovery configs that changed (or all of them, when Home Assistant came
    /// online). A printer's configs wait for its `meta`, which names the device.
    fn publish_discovery(&mut self, now: Now, out: &mut Vec<Output>) {
        if !self.cfg.ha.enabled || !self.connected {
            return;
        }
        if self.ha_republish_mono.is_some_and(|t| now.mono_ms >= t) {
            self.ha_republish_mono = None;
            self.ha_fleet_dirty = true;
            for (id, p) in self.printers.iter_mut() {
                p.ha_published = None;
                self.ha_dirty.insert(id.clone());
            }
        }
        if std::mem::take(&mut self.ha_fleet_dirty) {
            for c in ha::fleet_configs(&self.cfg.ha, &self.cfg.topics) {
                self.publish(out, c.topic, c.payload, true);
            }
        }
        if self.ha_dirty.is_empty()
            || self
                .ha_round_mono
                .is_some_and(|t| now.mono_ms < t + HA_ROUND_MS)
        {
            return;
        }
        self.ha_round_mono = Some(now.mono_ms);
        let mut sent = 0;
        while sent < HA_PRINTERS_PER_ROUND {
            let Some(id) = self.ha_dirty.pop_first() else {
                break;
            };
            // Without meta it waits: its meta marks it dirty again.
            let Some(p) = self.printers.get(&id) else {
                continue;
            };
            // An invented printer gets no device in Home Assistant (enrolling it marks it
            // dirty again).
            if !p.enrolled {
                continue;
            }
            let Some(meta) = p.meta.as_ref() else {
                continue;
            };
            let configs = ha::printer_configs(&self.cfg.ha, &self.cfg.topics, &id, Some(meta));
            let digest = {
                use std::hash::{Hash as _, Hasher as _};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                configs
                    .iter()
                    .for_each(|c| (&c.topic, &c.payload).hash(&mut h));
                h.finish()
            };
            if p.ha_published == Some(digest) {
                continue;
            }
            sent += 1;
            tracing::info!(printer = %id, entities = configs.len(), "Home Assistant discovery published");
            for c in configs {
                self.publish(out, c.topic, c.payload, true);
            }
            if let Some(p) = self.printers.get_mut(&id) {
                p.ha_published = Some(digest);
            }
        }
    }
}

/// `ha-<printer>-<action>-<epoch>-<seq>`, or a digest of it when a long printer id would make
/// it longer than an id may be.
fn press_id(printer: &PrinterId, action: PressAction, (epoch, seq): (u64, u64)) -> CommandId {
    let readable = format!("ha-{printer}-{}-{epoch}-{seq}", action.as_str());
    CommandId::new(readable.clone()).unwrap_or_else(|_| {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(readable.as_bytes());
        let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        CommandId::new(format!("ha-{hex}")).expect("28 characters of [a-z0-9-]")
    })
}

fn phase_name(phase: PrinterPhase) -> String {
    format!("{phase:?}").to_lowercase()
}

fn summary(j: &JobRecord) -> JobSummary {
    JobSummary {
        job_id: j.job_id.clone(),
        name: j.name.clone(),
        sha256: j.sha256.clone(),
        state: j.state,
        priority: j.priority,
        printer_id: j.printer.clone(),
        progress_pct: j.progress_pct,
        submitted_at_ms: j.submitted_at_ms,
        started_at_ms: j.started_at_ms,
        ended_at_ms: j.ended_at_ms,
        reason: j.reason.clone(),
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
