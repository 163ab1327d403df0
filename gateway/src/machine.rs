//! The gateway's decisions: a pure state machine.
//!
//! `Gateway::handle(now, input) -> Vec<Output>`. Inputs are MQTT connection changes and
//! messages, what the printer link reports, results of file IO, and timer ticks. Outputs are
//! durable mutations, publishes, printer commands and file IO requests. The shell carries the
//! outputs out **in order**; within one `handle` every `Persist` comes before the publishes it
//! justifies ("persist, then publish"). No IO, no clock: `now` is passed in.

use std::collections::HashMap;

use protocol::command::{Command, CommandAction, CommandResult, JobRef, ResultStatus, StartJob};
use protocol::files::{verify_chunk, FileChunkRequest, FileChunkResponse, MAX_CHUNK_LEN};
use protocol::limit::{Limiter, Rate};
use protocol::presence::{BuildVolume, Firmware, Meta, Presence, Status};
use protocol::state::{
    Event, EventKind, JobProgress, JobStage, LastCommand, LedgerEntry, PrinterPhase, StateSnapshot,
    Temperatures,
};
use protocol::{CommandId, JobId, Payload, PrinterId, Sha256Hex, Topic, Topics, Version};
use transport::outgoing::Lane;

use crate::store::{
    CommandRecord, CurrentJob, FileRecord, Flags, LedgerRecord, Mutation, Snapshot,
};

/// What the gateway core needs to know about its printer and its policies.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// This printer.
    pub printer_id: PrinterId,
    /// The topic tree.
    pub topics: Topics,
    /// For people.
    pub name: String,
    /// Printer model.
    pub model: String,
    /// Operator tags.
    pub tags: Vec<String>,
    /// Build volume.
    pub build_volume: Option<BuildVolume>,
    /// Heartbeat period for `state`.
    pub heartbeat_ms: u64,
    /// Minimum time between two `state` publishes caused by changes.
    pub state_min_interval_ms: u64,
    /// Bytes per file chunk requested.
    pub chunk_len: u32,
    /// How long to wait for a chunk before asking again.
    pub chunk_timeout_ms: u64,
    /// How many times in a row a chunk may time out before the job fails.
    pub chunk_attempts: u32,
    /// Persist the line reached every this many lines (and at every pause/end).
    pub checkpoint_lines: u64,
    /// Largest total size of cached files.
    pub cache_max_bytes: u64,
    /// The gateway's version string.
    pub gateway_version: String,
    /// Commands admitted per client (a client over it is answered `busy`).
    pub command_rate: Rate,
    /// Re-publish events the broker has not echoed back after this long.
    pub outbox_resend_ms: u64,
}

/// Commands a gateway admits per client: ten a second, twenty at once. The supervisor sends a
/// printer a handful per job; a person pressing buttons, fewer.
pub const COMMAND_RATE: Rate = Rate::new(10.0, 20.0);

impl CoreConfig {
    /// Defaults for `printer_id`.
    pub fn new(printer_id: PrinterId) -> Self {
        Self {
            name: printer_id.to_string(),
            printer_id,
            topics: Topics::default(),
            model: "Marlin printer".into(),
            tags: Vec::new(),
            build_volume: None,
            heartbeat_ms: 10_000,
            state_min_interval_ms: 250,
            chunk_len: MAX_CHUNK_LEN,
            chunk_timeout_ms: 5_000,
            chunk_attempts: 12,
            checkpoint_lines: 200,
            cache_max_bytes: 2 * 1024 * 1024 * 1024,
            gateway_version: env!("CARGO_PKG_VERSION").into(),
            command_rate: COMMAND_RATE,
            outbox_resend_ms: 15_000,
        }
    }
}

pub use protocol::Now;

/// What the printer link reports (the shell maps its driver's events to these).
#[derive(Debug, Clone, PartialEq)]
pub enum PrinterEvent {
    /// The port is open and the firmware answered M115.
    Ready {
        /// Its identity and capabilities.
        firmware: Firmware,
    },
    /// The firmware acknowledged `count` print lines of the current stream in total.
    LinesAcked {
        /// Lines acknowledged since the stream started.
        count: u64,
    },
    /// Progress from an acknowledged `M73` line.
    Progress {
        /// Percent done.
        percent: f64,
        /// Minutes remaining, if given.
        remaining_min: Option<u64>,
    },
    /// New temperatures.
    Temperatures(Temperatures),
    /// The firmware halted (thermal runaway, kill()).
    Fatal {
        /// Its message.
        message: String,
    },
    /// A non-fatal `Error:` line.
    FirmwareError {
        /// Its message.
        message: String,
    },
    /// The printer restarted on its own (unexpected `start`).
    Reset,
    /// The port is gone (cable pulled, device vanished).
    Disconnected {
        /// Why.
        reason: String,
    },
    /// The printer stopped answering.
    Timeout,
}

/// What the core asks of the printer link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrinterCommand {
    /// Stream the verified file `sha256` from its first line.
    StartStream {
        /// The job (for logs).
        job_id: JobId,
        /// The file.
        sha256: Sha256Hex,
    },
    /// Stop sending new lines (what the firmware has buffered still runs).
    PauseStream,
    /// Continue sending lines.
    ResumeStream,
    /// Drop the rest of the stream and make the printer safe (heaters and fan off).
    CancelStream,
    /// Reopen the port, which resets the printer (after a halt).
    ResetPrinter,
}

/// One publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retained?
    pub retain: bool,
    /// For events: their outbox key (for logs; the echo of the event acknowledges it).
    pub outbox_key: Option<u64>,
    /// Its priority in the shell's outgoing queue.
    pub lane: Lane,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Commit these mutations durably before carrying out anything after them.
    Persist(Vec<Mutation>),
    /// Subscribe (QoS 1).
    Subscribe(String),
    /// Publish (QoS 1).
    Publish(Publish),
    /// Tell the printer link.
    Printer(PrinterCommand),
    /// Write a verified chunk of a partial file at `offset`; answer `ChunkStored` or
    /// `ChunkStoreFailed`.
    StoreChunk {
        /// The file.
        sha256: Sha256Hex,
        /// Where.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Hash the whole stored file and count its G-code lines; answer `FileChecked`.
    CheckFile {
        /// The file.
        sha256: Sha256Hex,
    },
    /// Delete a cached file (eviction, or a corrupt one).
    RemoveFile {
        /// The file.
        sha256: Sha256Hex,
    },
}

/// Everything that happens to the gateway.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The broker accepted our connection.
    MqttConnected {
        /// Whether the broker kept our session (subscriptions, queued commands).
        session_present: bool,
    },
    /// The connection to the broker is gone.
    MqttDisconnected,
    /// A message on a subscribed topic.
    Message {
        /// Topic name.
        topic: String,
        /// Payload.
        payload: Vec<u8>,
    },
    /// The printer link reported something.
    Printer(PrinterEvent),
    /// A chunk was written.
    ChunkStored {
        /// The file.
        sha256: Sha256Hex,
        /// Where it started.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// Writing a chunk failed (disk full, IO error).
    ChunkStoreFailed {
        /// The file.
        sha256: Sha256Hex,
        /// Why.
        reason: String,
    },
    /// A stored file was hashed.
    FileChecked {
        /// The file.
        sha256: Sha256Hex,
        /// `Ok(lines)` when the content matches its name (with its G-code line count).
        result: Result<u64, String>,
    },
    /// Free disk space for the file cache, as measured by the shell.
    DiskFree {
        /// Bytes free.
        bytes: u64,
    },
    /// Time passed.
    Tick,
}

/// The state of the link to the printer.
#[derive(Debug, Clone, PartialEq)]
enum LinkState {
    Down { reason: String },
    Ready,
    Halted,
}

/// An outstanding file chunk request.
#[derive(Debug, Clone)]
struct Transfer {
    sha256: Sha256Hex,
    size: u64,
    received: u64,
    request_id: Option<CommandId>,
    deadline_ms: u64,
    attempts: u32,
    requests: u64,
    storing: bool,
}

/// The gateway core.
pub struct Gateway {
    cfg: CoreConfig,
    epoch: u64,
    seq: u64,
    /// The epoch `seq` counts in: `seq` restarts when the epoch changes, so every event and
    /// state of an epoch has its own `(epoch, seq)`, whether it was made before or after the
    /// connection came up.
    seq_epoch: u64,
    connected: bool,
    link: LinkState,
    firmware: Option<Firmware>,
    flags: Flags,
    error: Option<String>,
    current: Option<CurrentJob>,
    progress_pct: Option<f64>,
    remaining_s: Option<u64>,
    temps: Option<Temperatures>,
    last_command: Option<LastCommand>,
    recent_jobs: Vec<LedgerEntry>,
    ledger: HashMap<JobId, Option<JobStage>>,
    commands: HashMap<CommandId, CommandRecord>,
    files: HashMap<Sha256Hex, FileRecord>,
    disk_free: Option<u64>,
    transfer: Option<Transfer>,
    checking: Option<Sha256Hex>,
    outbox: Vec<(u64, Vec<u8>)>,
    next_outbox_key: u64,
    state_dirty: bool,
    last_state_ms: Option<u64>,
    last_checkpoint_line: u64,
    /// Per-client admission of commands.
    limiter: Limiter,
    /// Commands answered `busy` since the start.
    refused_commands: u64,
    /// When the outbox was last (re-)published.
    outbox_sent_ms: u64,
    /// When our retained topics were last re-asserted (birth) after a contradiction.
    reasserted_ms: Option<u64>,
    /// A contradiction waits for its re-assertion.
    reassert_due: bool,
}

/// Our retained topics are re-asserted at most this often (a client that keeps forging them
/// cannot make the gateway flood the broker; that client needs the ACL, `docs/broker.md`).
const REASSERT_EVERY_MS: u64 = 1_000;

/// Upper bound of `recent_jobs` in the state snapshot.
const RECENT_JOBS: usize = 16;

impl Gateway {
    /// Builds the core from the durable snapshot. A job that was running when the gateway
    /// stopped is **interrupted** (the printer resets when its port is reopened, so the print
    /// is gone); the outputs returned record that durably and journal its event.
    pub fn new(cfg: CoreConfig, snap: Snapshot, now: Now) -> (Self, Vec<Output>) {
        let next_outbox_key = snap.outbox.last().map(|(k, _)| k + 1).unwrap_or(1);
        let limiter = Limiter::new(cfg.command_rate);
        let mut g = Self {
            cfg,
            epoch: snap.epoch,
            seq: 0,
            seq_epoch: snap.epoch,
            connected: false,
            link: LinkState::Down {
                reason: "not opened yet".into(),
            },
            firmware: None,
            flags: snap.flags,
            error: None,
            current: snap.current,
            progress_pct: None,
            remaining_s: None,
            temps: None,
            last_command: None,
            recent_jobs: snap.recent_jobs,
            ledger: snap.ledger.into_iter().collect(),
            commands: snap.commands.into_iter().collect(),
            files: snap
                .files
                .into_iter()
                .map(|f| (f.sha256.clone(), f))
                .collect(),
            disk_free: None,
            transfer: None,
            checking: None,
            outbox: snap.outbox,
            next_outbox_key,
            state_dirty: true,
            last_state_ms: None,
            last_checkpoint_line: 0,
            limiter,
            refused_commands: 0,
            outbox_sent_ms: now.mono_ms,
            reasserted_ms: None,
            reassert_due: false,
        };
        let mut out = Vec::new();
        if let Some(job) = g.current.clone() {
            g.last_checkpoint_line = job.line;
            match job.stage {
                JobStage::Starting | JobStage::Printing | JobStage::Paused => {
                    // The last epoch's `seq`s were used before the restart: journal in a new
                    // epoch, so the event cannot be taken for one the supervisor already has.
                    g.epoch += 1;
                    out.push(Output::Persist(vec![Mutation::SetEpoch(g.epoch)]));
                    g.end_job(
                        now,
                        JobStage::Interrupted,
                        Some("gateway restarted during the print".into()),
                        &mut out,
                    );
                }
                JobStage::Transferring => {
                    // Nothing was printed: carry on pulling the file from where it stopped.
                    g.begin_transfer(now, &job.file_sha256, job.size_bytes, &mut out);
                }
                _ => {}
            }
        }
        (g, out)
    }

    /// The epoch of the current (or last) connection.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Call before every connection attempt: the next epoch, persisted, and the will that
    /// carries it. Returns the mutations to commit **before** connecting, the will topic and
    /// payload.
    pub fn prepare_connect(&mut self, now: Now) -> (Vec<Mutation>, String, Vec<u8>) {
        self.epoch += 1;
        let will = Status::offline(self.epoch, now.unix_ms, None).encode();
        (
            vec![Mutation::SetEpoch(self.epoch)],
            self.topic(Topic::Status(self.cfg.printer_id.clone())),
            will,
        )
    }

    /// A goodbye for a clean shutdown (retained `status` offline with a reason).
    pub fn goodbye(&self, now: Now) -> Publish {
        Publish {
            topic: self.topic(Topic::Status(self.cfg.printer_id.clone())),
            payload: Status::offline(self.epoch, now.unix_ms, Some("shutdown".into())).encode(),
            retain: true,
            outbox_key: None,
            lane: Lane::Control,
        }
    }

    /// The printer's phase now.
    pub fn phase(&self) -> PrinterPhase {
        match &self.link {
            LinkState::Halted => return PrinterPhase::Halted,
            LinkState::Down { .. } => return PrinterPhase::Disconnected,
            LinkState::Ready => {}
        }
        if self.error.is_some() {
            return PrinterPhase::Error;
        }
        match self.current.as_ref().map(|j| j.stage) {
            Some(JobStage::Transferring | JobStage::Starting) => PrinterPhase::Preparing,
            Some(JobStage::Printing) => PrinterPhase::Printing,
            Some(JobStage::Paused) => PrinterPhase::Paused,
            Some(_) => PrinterPhase::Finished,
            None if self.flags.bed_clear && !self.flags.maintenance => PrinterPhase::Ready,
            None => PrinterPhase::Idle,
        }
    }

    fn reassert_allowed(&self, now: Now) -> bool {
        self.reasserted_ms
            .is_none_or(|t| now.mono_ms >= t + REASSERT_EVERY_MS)
    }

    /// When `handle(now, Tick)` should be called next (monotonic ms).
    pub fn next_deadline(&self) -> Option<u64> {
        let mut d: Option<u64> = None;
        let mut at = |t: u64| d = Some(d.map_or(t, |x| x.min(t)));
        if self.connected {
            match self.last_state_ms {
                None => at(0),
                Some(last) => {
                    at(last + self.cfg.heartbeat_ms);
                    if self.state_dirty {
                        at(last + self.cfg.state_min_interval_ms);
                    }
                }
            }
            if let Some(t) = &self.transfer {
                if t.request_id.is_some() {
                    at(t.deadline_ms);
                }
            }
            if self.reassert_due {
                at(self.reasserted_ms.map_or(0, |t| t + REASSERT_EVERY_MS));
            }
            if !self.outbox.is_empty() {
                at(self.outbox_sent_ms + self.cfg.outbox_resend_ms);
            }
        }
        d
    }

    /// Handles one input.
    pub fn handle(&mut self, now: Now, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::MqttConnected { session_present } => {
                self.on_connected(now, session_present, &mut out)
            }
            Input::MqttDisconnected => {
                self.connected = false;
                if let Some(t) = &mut self.transfer {
                    t.request_id = None;
                }
            }
            Input::Message { topic, payload } => self.on_message(now, &topic, &payload, &mut out),
            Input::Printer(ev) => self.on_printer(now, ev, &mut out),
            Input::ChunkStored {
                sha256,
                offset,
                len,
            } => self.on_chunk_stored(now, sha256, offset, len, &mut out),
            Input::ChunkStoreFailed { sha256, reason } => {
                if self.transfer.as_ref().is_some_and(|t| t.sha256 == sha256) {
                    self.transfer = None;
                    self.end_job(
                        now,
                        JobStage::Failed,
                        Some(format!("storing the file failed: {reason}")),
                        &mut out,
                    );
                }
            }
            Input::FileChecked { sha256, result } => {
                self.on_file_checked(now, sha256, result, &mut out)
            }
            Input::DiskFree { bytes } => self.disk_free = Some(bytes),
            Input::Tick => {}
        }
        self.on_time(now, &mut out);
        out
    }

    // ----- MQTT -----

    fn topic(&self, t: Topic) -> String {
        self.cfg.topics.format(&t)
    }

    fn on_connected(&mut self, now: Now, session_present: bool, out: &mut Vec<Output>) {
        self.connected = true;
        let me = self.cfg.printer_id.clone();
        // Subscribe on every connect: after `session_present = 0` (rumqttd forgets sessions on
        // restart) it is required, and with a kept session it is harmless. Our own `events` come
        // back to us: that echo is the proof the broker has an event, so it leaves the outbox.
        let _ = session_present;
        out.push(Output::Subscribe(self.topic(Topic::Cmd(me.clone()))));
        out.push(Output::Subscribe(self.topic(Topic::FileChunk(me.clone()))));
        out.push(Output::Subscribe(self.topic(Topic::Events(me.clone()))));
        // Our own retained topics too: this gateway holds their truth, and re-asserts it when
        // anyone else's message replaces it (`on_own_retained`).
        out.push(Output::Subscribe(self.topic(Topic::Status(me.clone()))));
        out.push(Output::Subscribe(self.topic(Topic::Meta(me.clone()))));
        out.push(Output::Subscribe(self.topic(Topic::State(me.clone()))));
        // What happened while we were away goes first, in order, with its original time.
        self.publish_outbox(now, out);
        self.birth(now, out);
        // The retained copies the broker sends back on subscribing are the last connection's:
        // this birth replaces them.
        self.reasserted_ms = Some(now.mono_ms);
        self.reassert_due = false;
        // A transfer that was waiting for the broker asks again.
        if let Some(t) = &self.transfer {
            if !t.storing {
                let (sha, size) = (t.sha256.clone(), t.size);
                self.request_chunk(now, &sha, size, out);
            }
        }
    }

    /// Publishes every event the broker has not echoed back yet, oldest first.
    fn publish_outbox(&mut self, now: Now, out: &mut Vec<Output>) {
        let topic = self.topic(Topic::Events(self.cfg.printer_id.clone()));
        for (key, payload) in &self.outbox {
            out.push(Output::Publish(Publish {
                topic: topic.clone(),
                payload: payload.clone(),
                retain: false,
                outbox_key: Some(*key),
                lane: Lane::Control,
            }));
        }
        self.outbox_sent_ms = now.mono_ms;
    }

    fn meta(&self) -> Meta {
        Meta {
            v: Version,
            printer_id: self.cfg.printer_id.clone(),
            epoch: self.epoch,
            name: self.cfg.name.clone(),
            model: self.cfg.model.clone(),
            firmware: self.firmware.clone(),
            build_volume: self.cfg.build_volume,
            tags: self.cfg.tags.clone(),
            gateway_version: self.cfg.gateway_version.clone(),
        }
    }

    /// A message on one of our own retained topics: our echo, or someone else's claim about
    /// this printer (a forged or stale `status`, `state` or `meta`). A claim that contradicts
    /// ours is answered by publishing the truth again, at most once a second.
    fn on_own_retained(&mut self, topic: &Topic, payload: &[u8]) {
        if !self.connected {
            return;
        }
        let ours = match topic {
            Topic::Status(_) => Status::decode(payload)
                .is_ok_and(|s| s.presence == Presence::Online && s.epoch == self.epoch),
            Topic::State(_) => StateSnapshot::decode(payload)
                .is_ok_and(|s| s.epoch == self.epoch && s.seq <= self.seq),
            Topic::Meta(_) => Meta::decode(payload).is_ok_and(|m| m == self.meta()),
            _ => true,
        };
        if !ours && !self.reassert_due {
            tracing::warn!(
                topic = %self.topic(topic.clone()),
                "a retained message contradicts this printer's own (forged, or left by an old \
                 connection): publishing the truth again"
            );
            self.reassert_due = true;
        }
    }

    fn birth(&mut self, now: Now, out: &mut Vec<Output>) {
        let me = self.cfg.printer_id.clone();
        let meta = self.meta();
        out.push(Output::Publish(Publish {
            topic: self.topic(Topic::Meta(me.clone())),
            payload: meta.encode(),
            retain: true,
            outbox_key: None,
            lane: Lane::Control,
        }));
        self.publish_state(now, out);
        out.push(Output::Publish(Publish {
            topic: self.topic(Topic::Status(me)),
            payload: Status::online(self.epoch, now.unix_ms).encode(),
            retain: true,
            outbox_key: None,
            lane: Lane::Control,
        }));
    }

    fn next_seq(&mut self) -> u64 {
        if self.seq_epoch != self.epoch {
            self.seq_epoch = self.epoch;
            self.seq = 0;
        }
        self.seq += 1;
        self.seq
    }

    /// The state snapshot as it is now.
    pub fn snapshot(&self, now: Now) -> StateSnapshot {
        StateSnapshot {
            v: Version,
            epoch: self.epoch,
            seq: self.seq,
            at_ms: now.unix_ms,
            heartbeat_s: (self.cfg.heartbeat_ms / 1000).max(1) as u32,
            phase: self.phase(),
            bed_clear: self.flags.bed_clear,
            maintenance: self.flags.maintenance,
            job: self.current.as_ref().map(|j| self.progress(j)),
            temps: self.temps,
            last_command: self.last_command.clone(),
            recent_jobs: self.recent_jobs.clone(),
            // While the printer is disconnected, the error says why (a port that cannot be
            // opened names its fix), so Home Assistant and `printloop watch` show it.
            error: self.error.clone().or_else(|| match &self.link {
                LinkState::Down { reason } => Some(format!("serial: {reason}")),
                _ => None,
            }),
        }
    }

    fn progress(&self, j: &CurrentJob) -> JobProgress {
        let by_lines = if j.total_lines > 0 {
            (j.line as f64 * 100.0 / j.total_lines as f64).min(100.0)
        } else {
            0.0
        };
        let pct = match j.stage {
            JobStage::Finished => 100.0,
            _ => self.progress_pct.unwrap_or(by_lines),
        };
        JobProgress {
            job_id: j.job_id.clone(),
            file_sha256: j.file_sha256.clone(),
            name: j.name.clone(),
            stage: j.stage,
            line: j.line,
            total_lines: j.total_lines,
            progress_pct: (pct * 10.0).round() / 10.0,
            remaining_s: self.remaining_s.filter(|_| !j.stage.is_terminal()),
            transferred_bytes: self
                .transfer
                .as_ref()
                .filter(|t| t.sha256 == j.file_sha256)
                .map(|t| t.received),
            size_bytes: j.size_bytes,
            started_at_ms: j.started_at_ms,
            ended_at_ms: j.ended_at_ms,
            reason: j.reason.clone(),
        }
    }

    fn publish_state(&mut self, now: Now, out: &mut Vec<Output>) {
        if !self.connected {
            return;
        }
        self.next_seq();
        let snap = self.snapshot(now);
        out.push(Output::Publish(Publish {
            topic: self.topic(Topic::State(self.cfg.printer_id.clone())),
            payload: snap.encode(),
            retain: true,
            outbox_key: None,
            lane: Lane::Control,
        }));
        self.state_dirty = false;
        self.last_state_ms = Some(now.mono_ms);
    }

    fn on_time(&mut self, now: Now, out: &mut Vec<Output>) {
        if self.connected {
            let due = match self.last_state_ms {
                None => true,
                Some(last) => {
                    now.mono_ms >= last + self.cfg.heartbeat_ms
                        || (self.state_dirty
                            && now.mono_ms >= last + self.cfg.state_min_interval_ms)
                }
            };
            if due {
                self.publish_state(now, out);
            }
            if self.reassert_due && self.reassert_allowed(now) {
                self.reassert_due = false;
                self.reasserted_ms = Some(now.mono_ms);
                self.birth(now, out);
            }
            if !self.outbox.is_empty()
                && now.mono_ms >= self.outbox_sent_ms + self.cfg.outbox_resend_ms
            {
                tracing::info!(
                    events = self.outbox.len(),
                    "events not echoed by the broker yet: publishing them again"
                );
                self.publish_outbox(now, out);
            }
            let timed_out = self.transfer.as_ref().is_some_and(|t| {
                t.request_id.is_some() && !t.storing && now.mono_ms >= t.deadline_ms
            });
            if timed_out {
                self.on_chunk_timeout(now, out);
            }
        }
    }

    /// Journals an event durably and publishes it when connected.
    fn event(&mut self, now: Now, kind: EventKind, out: &mut Vec<Output>) {
        let ev = Event {
            v: Version,
            epoch: self.epoch,
            seq: self.next_seq(),
            at_ms: now.unix_ms,
            event: kind,
        };
        let key = self.next_outbox_key;
        self.next_outbox_key += 1;
        let payload = ev.encode();
        if self.outbox.is_empty() {
            self.outbox_sent_ms = now.mono_ms;
        }
        self.outbox.push((key, payload.clone()));
        out.push(Output::Persist(vec![Mutation::PushOutbox(
            key,
            payload.clone(),
        )]));
        if self.connected {
            out.push(Output::Publish(Publish {
                topic: self.topic(Topic::Events(self.cfg.printer_id.clone())),
                payload,
                retain: false,
                outbox_key: Some(key),
                lane: Lane::Control,
            }));
        }
        self.state_dirty = true;
    }

    // ----- commands -----

    fn on_message(&mut self, now: Now, topic: &str, payload: &[u8], out: &mut Vec<Output>) {
        match self.cfg.topics.parse(topic) {
            Ok(Topic::Cmd(p)) if p == self.cfg.printer_id => self.on_command(now, payload, out),
            Ok(Topic::FileChunk(p)) if p == self.cfg.printer_id => self.on_chunk(now, payload, out),
            Ok(Topic::Events(p)) if p == self.cfg.printer_id => self.on_own_event(payload, out),
            Ok(t @ (Topic::Status(_) | Topic::State(_) | Topic::Meta(_)))
                if t.printer() == Some(&self.cfg.printer_id) =>
            {
                self.on_own_retained(&t, payload)
            }
            Ok(other) => tracing::warn!(?other, "message on a topic this gateway does not handle"),
            Err(e) => tracing::warn!(error = %e, "message on an unknown topic"),
        }
    }

    /// Our own event came back from the broker: it and everything before it are delivered.
    fn on_own_event(&mut self, payload: &[u8], out: &mut Vec<Output>) {
        let Ok(echo) = Event::decode(payload) else {
            return;
        };
        let key = self.outbox.iter().find_map(|(k, bytes)| {
            Event::decode(bytes)
                .ok()
                .filter(|e| e.epoch == echo.epoch && e.seq == echo.seq)
                .map(|_| *k)
        });
        if let Some(key) = key {
            self.outbox.retain(|(k, _)| *k > key);
            out.push(Output::Persist(vec![Mutation::AckOutbox(key)]));
        }
    }

    fn answer(
        &mut self,
        now: Now,
        id: CommandId,
        status: ResultStatus,
        reason: Option<String>,
        mut mutations: Vec<Mutation>,
        out: &mut Vec<Output>,
    ) {
        let record = CommandRecord {
            at_ms: now.unix_ms,
            status,
            reason: reason.clone(),
        };
        if status != ResultStatus::Duplicate {
            mutations.push(Mutation::PutCommand(id.clone(), record.clone()));
            self.commands.insert(id.clone(), record);
            if self.commands.len() > crate::store::COMMAND_MEMORY {
                if let Some(oldest) = self
                    .commands
                    .iter()
                    .min_by_key(|(_, r)| r.at_ms)
                    .map(|(k, _)| k.clone())
                {
                    self.commands.remove(&oldest);
                }
            }
        }
        if !mutations.is_empty() {
            out.push(Output::Persist(mutations));
        }
        self.last_command = Some(LastCommand {
            id: id.clone(),
            status,
        });
        self.state_dirty = true;
        match status {
            ResultStatus::Error => {
                tracing::warn!(command = %id, reason = reason.as_deref().unwrap_or(""), "command refused")
            }
            _ => tracing::info!(command = %id, ?status, "command answered"),
        }
        let result = CommandResult {
            v: Version,
            id,
            status,
            reason,
            epoch: self.epoch,
            at_ms: now.unix_ms,
            retry_after_ms: None,
        };
        if self.connected {
            out.push(Output::Publish(Publish {
                topic: self.topic(Topic::CmdResult(self.cfg.printer_id.clone())),
                payload: result.encode(),
                retain: false,
                outbox_key: None,
                lane: Lane::Answer,
            }));
        }
    }

    /// Answers `busy` to a command over its client's rate: nothing is carried out or stored
    /// (a flood costs no disk write and no state publish), and the answer waits in the lowest
    /// lane, behind state, events and real answers.
    fn refuse_busy(
        &mut self,
        now: Now,
        id: CommandId,
        client: &str,
        busy: protocol::limit::Busy,
        out: &mut Vec<Output>,
    ) {
        self.refused_commands += 1;
        if self.refused_commands.is_power_of_two() {
            tracing::warn!(
                client = %client,
                refused = self.refused_commands,
                "commands over their client's rate are answered busy and not carried out"
            );
        }
        if !self.connected {
            return;
        }
        let result = CommandResult {
            v: Version,
            id,
            status: ResultStatus::Busy,
            reason: Some(format!(
                "client {client} sends more than {} commands a second: retry after {} ms",
                self.cfg.command_rate.per_s, busy.retry_after_ms
            )),
            epoch: self.epoch,
            at_ms: now.unix_ms,
            retry_after_ms: Some(busy.retry_after_ms),
        };
        out.push(Output::Publish(Publish {
            topic: self.topic(Topic::CmdResult(self.cfg.printer_id.clone())),
            payload: result.encode(),
            retain: false,
            outbox_key: None,
            lane: Lane::Refusal,
        }));
    }

    /// Admits a command from `client` (`anonymous` when it names none), or answers `busy`.
    fn admit(
        &mut self,
        now: Now,
        id: &CommandId,
        client: Option<&protocol::ClientId>,
        out: &mut Vec<Output>,
    ) -> bool {
        let client = client.map_or("anonymous", |c| c.as_str());
        match self.limiter.admit(client, now.mono_ms) {
            Ok(()) => true,
            Err(busy) => {
                let client = client.to_owned();
                self.refuse_busy(now, id.clone(), &client, busy, out);
                false
            }
        }
    }

    fn on_command(&mut self, now: Now, payload: &[u8], out: &mut Vec<Output>) {
        let cmd = match Command::decode(payload) {
            Ok(c) => c,
            Err(reject) => {
                match reject.id {
                    Some(id) if !self.admit(now, &id, reject.client.as_ref(), out) => {}
                    Some(id) => self.answer(
                        now,
                        id,
                        ResultStatus::Error,
                        Some(reject.error.to_string()),
                        vec![],
                        out,
                    ),
                    None => {
                        tracing::warn!(error = %reject.error, "command without a readable id dropped")
                    }
                }
                return;
            }
        };
        if !self.admit(now, &cmd.id, cmd.client.as_ref(), out) {
            return;
        }
        if let Some(prev) = self.commands.get(&cmd.id) {
            let reason =
                Some(format!("command already handled ({:?})", prev.status).to_lowercase());
            self.answer(now, cmd.id, ResultStatus::Duplicate, reason, vec![], out);
            return;
        }
        if cmd.expired(now.unix_ms) {
            let reason = Some(format!(
                "expired at {} (now {})",
                cmd.expires_at.unwrap_or_default(),
                now.unix_ms
            ));
            self.answer(now, cmd.id, ResultStatus::Expired, reason, vec![], out);
            return;
        }
        let span = tracing::info_span!("command", printer = %self.cfg.printer_id, id = %cmd.id, kind = cmd.action.kind());
        let _enter = span.enter();
        let result = match cmd.action {
            CommandAction::StartJob(s) => self.cmd_start(now, s, out),
            CommandAction::Pause(r) => self.cmd_pause_resume(now, r, true, out),
            CommandAction::Resume(r) => self.cmd_pause_resume(now, r, false, out),
            CommandAction::Cancel(r) => self.cmd_cancel(now, r, out),
            CommandAction::BedCleared(_) => self.cmd_bed_cleared(now, out),
            CommandAction::Rebirth(_) => {
                if self.connected {
                    self.birth(now, out);
                }
                Ok(vec![])
            }
        };
        match result {
            Ok(muts) => self.answer(now, cmd.id, ResultStatus::Ok, None, muts, out),
            Err(reason) => self.answer(now, cmd.id, ResultStatus::Error, Some(reason), vec![], out),
        }
    }

    fn check_job_ref(&self, r: &JobRef) -> Result<&CurrentJob, String> {
        let job = self.current.as_ref().ok_or("no job on this printer")?;
        if let Some(want) = &r.job_id {
            if *want != job.job_id {
                return Err(format!(
                    "job {want} is not the current job ({})",
                    job.job_id
                ));
            }
        }
        Ok(job)
    }

    fn cmd_start(
        &mut self,
        now: Now,
        s: StartJob,
        out: &mut Vec<Output>,
    ) -> Result<Vec<Mutation>, String> {
        if s.printer_id != self.cfg.printer_id {
            return Err(format!(
                "this start_job is for printer {}, not {}",
                s.printer_id, self.cfg.printer_id
            ));
        }
        if let Some(outcome) = self.ledger.get(&s.job_id) {
            return Err(match outcome {
                Some(o) => format!(
                    "job {} already ran on this printer ({o:?}); it never runs again",
                    s.job_id
                )
                .to_lowercase(),
                None => format!("job {} is already on this printer", s.job_id),
            });
        }
        match self.phase() {
            PrinterPhase::Ready => {}
            PrinterPhase::Idle if self.flags.maintenance => {
                return Err("printer is in maintenance".into())
            }
            PrinterPhase::Idle => {
                return Err("printer is idle: the bed must be cleared first".into())
            }
            other => return Err(format!("printer is not ready (phase {other:?})").to_lowercase()),
        }
        if s.size_bytes == 0 {
            return Err("file is empty".into());
        }
        let cached = self.files.get(&s.file_sha256).is_some_and(|f| f.verified);
        if !cached {
            if s.size_bytes > self.cfg.cache_max_bytes {
                return Err(format!(
                    "file of {} bytes is larger than the cache ({} bytes)",
                    s.size_bytes, self.cfg.cache_max_bytes
                ));
            }
            let evictable: u64 = self.evictable_bytes(&s.file_sha256);
            if let Some(free) = self.disk_free {
                if s.size_bytes > free + evictable {
                    return Err(format!(
                        "not enough disk space: {} bytes needed, {} free",
                        s.size_bytes,
                        free + evictable
                    ));
                }
            }
        }
        let job = CurrentJob {
            job_id: s.job_id.clone(),
            file_sha256: s.file_sha256.clone(),
            name: s.name.clone(),
            size_bytes: s.size_bytes,
            stage: JobStage::Transferring,
            line: 0,
            total_lines: 0,
            accepted_at_ms: now.unix_ms,
            started_at_ms: None,
            ended_at_ms: None,
            reason: None,
        };
        self.ledger.insert(s.job_id.clone(), None);
        self.current = Some(job.clone());
        self.progress_pct = None;
        self.remaining_s = None;
        self.last_checkpoint_line = 0;
        let muts = vec![
            Mutation::PutLedger(LedgerRecord {
                job_id: s.job_id.clone(),
                outcome: None,
                line: 0,
                accepted_at_ms: now.unix_ms,
                ended_at_ms: None,
            }),
            Mutation::SetCurrent(Some(job)),
        ];
        // The acceptance is durable before anything else happens.
        out.push(Output::Persist(muts));
        self.event(
            now,
            EventKind::JobAccepted {
                job_id: s.job_id.clone(),
            },
            out,
        );
        if cached {
            self.check_file(&s.file_sha256, out);
        } else {
            self.begin_transfer(now, &s.file_sha256, s.size_bytes, out);
        }
        Ok(vec![])
    }

    /// Pause (`pause`) or resume the current job; the other one of the pair is a no-op.
    fn cmd_pause_resume(
        &mut self,
        now: Now,
        r: JobRef,
        pause: bool,
        out: &mut Vec<Output>,
    ) -> Result<Vec<Mutation>, String> {
        let (from, to, command, wanted) = if pause {
            (
                JobStage::Printing,
                JobStage::Paused,
                PrinterCommand::PauseStream,
                "printing",
            )
        } else {
            (
                JobStage::Paused,
                JobStage::Printing,
                PrinterCommand::ResumeStream,
                "paused",
            )
        };
        let job = self.check_job_ref(&r)?;
        if job.stage == to {
            return Ok(vec![]);
        }
        if job.stage != from {
            return Err(format!("job is {:?}, not {wanted}", job.stage).to_lowercase());
        }
        if !pause && self.link != LinkState::Ready {
            return Err("printer link is not ready".into());
        }
        let job_id = job.job_id.clone();
        out.push(Output::Printer(command));
        let muts = self.set_stage(to);
        out.push(Output::Persist(muts));
        let kind = if pause {
            EventKind::JobPaused { job_id }
        } else {
            EventKind::JobResumed { job_id }
        };
        self.event(now, kind, out);
        Ok(vec![])
    }

    fn cmd_cancel(
        &mut self,
        now: Now,
        r: JobRef,
        out: &mut Vec<Output>,
    ) -> Result<Vec<Mutation>, String> {
        let job = self.check_job_ref(&r)?;
        if job.stage.is_terminal() {
            return Err(format!("job already ended ({:?})", job.stage).to_lowercase());
        }
        if matches!(job.stage, JobStage::Printing | JobStage::Paused) {
            out.push(Output::Printer(PrinterCommand::CancelStream));
        }
        self.transfer = None;
        self.end_job(
            now,
            JobStage::Cancelled,
            Some("cancelled by command".into()),
            out,
        );
        Ok(vec![])
    }

    fn cmd_bed_cleared(
        &mut self,
        now: Now,
        out: &mut Vec<Output>,
    ) -> Result<Vec<Mutation>, String> {
        match self.phase() {
            PrinterPhase::Preparing | PrinterPhase::Printing | PrinterPhase::Paused => {
                return Err("a job is on the printer; cancel it first".into())
            }
            PrinterPhase::Halted => {
                // The operator has looked at the printer: reset it (reopening the port resets
                // the board) and start from a clear bed.
                out.push(Output::Printer(PrinterCommand::ResetPrinter));
            }
            _ => {}
        }
        self.error = None;
        let mut muts = Vec::new();
        if self.current.as_ref().is_some_and(|j| j.stage.is_terminal()) {
            self.current = None;
            muts.push(Mutation::SetCurrent(None));
        }
        self.flags.bed_clear = true;
        muts.push(Mutation::SetFlags(self.flags));
        out.push(Output::Persist(muts));
        self.event(now, EventKind::BedCleared {}, out);
        Ok(vec![])
    }

    fn set_stage(&mut self, stage: JobStage) -> Vec<Mutation> {
        let Some(job) = &mut self.current else {
            return vec![];
        };
        job.stage = stage;
        self.state_dirty = true;
        vec![Mutation::SetCurrent(Some(job.clone()))]
    }

    /// Ends the current job with `outcome`: ledger, current job and event, durably.
    fn end_job(
        &mut self,
        now: Now,
        outcome: JobStage,
        reason: Option<String>,
        out: &mut Vec<Output>,
    ) {
        let Some(mut job) = self.current.take() else {
            return;
        };
        job.stage = outcome;
        job.ended_at_ms = Some(now.unix_ms);
        job.reason = reason.clone();
        let entry = LedgerEntry {
            job_id: job.job_id.clone(),
            outcome,
            line: job.line,
            ended_at_ms: now.unix_ms,
        };
        self.ledger.insert(job.job_id.clone(), Some(outcome));
        self.recent_jobs.insert(0, entry);
        self.recent_jobs.truncate(RECENT_JOBS);
        let mut muts = vec![Mutation::PutLedger(LedgerRecord {
            job_id: job.job_id.clone(),
            outcome: Some(outcome),
            line: job.line,
            accepted_at_ms: job.accepted_at_ms,
            ended_at_ms: Some(now.unix_ms),
        })];
        if job.started_at_ms.is_none() {
            // Nothing was printed: the bed is as clear as it was; the printer is ready again.
            muts.push(Mutation::SetCurrent(None));
        } else {
            self.current = Some(job.clone());
            muts.push(Mutation::SetCurrent(Some(job.clone())));
        }
        out.push(Output::Persist(muts));
        tracing::info!(printer = %self.cfg.printer_id, job = %job.job_id, ?outcome, line = job.line, reason = reason.as_deref().unwrap_or(""), "job ended");
        self.event(
            now,
            EventKind::JobEnded {
                job_id: job.job_id,
                outcome,
                line: job.line,
                reason,
            },
            out,
        );
    }

    // ----- printer -----

    fn on_printer(&mut self, now: Now, ev: PrinterEvent, out: &mut Vec<Output>) {
        let was_dirty = self.state_dirty;
        self.state_dirty = true;
        match ev {
            PrinterEvent::Ready { firmware } => {
                let was_halted = self.link == LinkState::Halted;
                self.link = LinkState::Ready;
                let name = firmware.name.clone();
                self.firmware = Some(firmware);
                if was_halted {
                    self.error = None;
                }
                self.event(now, EventKind::PrinterConnected { firmware: name }, out);
                if self.connected {
                    self.birth(now, out);
                }
                // A verified file waiting for the printer starts now.
                if self
                    .current
                    .as_ref()
                    .is_some_and(|j| j.stage == JobStage::Starting)
                {
                    self.start_stream(now, out);
                }
            }
            PrinterEvent::LinesAcked { count } => {
                let Some(job) = &mut self.current else { return };
                if !matches!(job.stage, JobStage::Printing | JobStage::Paused) {
                    return;
                }
                job.line = count;
                let done = job.total_lines > 0 && job.line >= job.total_lines;
                let checkpoint = job.line >= self.last_checkpoint_line + self.cfg.checkpoint_lines;
                let snapshot = job.clone();
                if done {
                    self.end_job(now, JobStage::Finished, None, out);
                } else if checkpoint {
                    self.last_checkpoint_line = snapshot.line;
                    out.push(Output::Persist(vec![Mutation::SetCurrent(Some(snapshot))]));
                }
            }
            PrinterEvent::Progress {
                percent,
                remaining_min,
            } => {
                self.progress_pct = Some(percent.clamp(0.0, 100.0));
                self.remaining_s = remaining_min.map(|m| m * 60);
            }
            PrinterEvent::Temperatures(t) => {
                self.temps = Some(t);
                // Temperatures alone do not make a state change worth publishing early (but
                // must not cancel one that is due: a job that just ended stayed `preparing`
                // until the next heartbeat, issue #10).
                self.state_dirty = was_dirty;
            }
            PrinterEvent::Fatal { message } => {
                self.link = LinkState::Halted;
                self.error = Some(message.clone());
                self.event(
                    now,
                    EventKind::PrinterError {
                        message: message.clone(),
                        fatal: true,
                    },
                    out,
                );
                if self
                    .current
                    .as_ref()
                    .is_some_and(|j| !j.stage.is_terminal())
                {
                    self.transfer = None;
                    self.end_job(
                        now,
                        JobStage::Failed,
                        Some(format!("printer halted: {message}")),
                        out,
                    );
                }
            }
            PrinterEvent::FirmwareError { message } => {
                self.event(
                    now,
                    EventKind::PrinterError {
                        message,
                        fatal: false,
                    },
                    out,
                );
            }
            PrinterEvent::Reset => {
                if self.printing() {
                    self.end_job(
                        now,
                        JobStage::Interrupted,
                        Some("printer reset during the print".into()),
                        out,
                    );
                }
                self.link = LinkState::Down {
                    reason: "printer reset".into(),
                };
            }
            PrinterEvent::Disconnected { reason } => {
                if self.printing() {
                    self.end_job(
                        now,
                        JobStage::Interrupted,
                        Some(format!("serial link lost: {reason}")),
                        out,
                    );
                }
                self.event(
                    now,
                    EventKind::PrinterDisconnected {
                        reason: reason.clone(),
                    },
                    out,
                );
                if self.link != LinkState::Halted {
                    self.link = LinkState::Down { reason };
                }
            }
            PrinterEvent::Timeout => {
                if self.printing() {
                    self.end_job(
                        now,
                        JobStage::Interrupted,
                        Some("printer stopped answering".into()),
                        out,
                    );
                }
                self.event(
                    now,
                    EventKind::PrinterDisconnected {
                        reason: "printer stopped answering".into(),
                    },
                    out,
                );
                self.link = LinkState::Down {
                    reason: "printer stopped answering".into(),
                };
            }
        }
    }

    fn printing(&self) -> bool {
        self.current
            .as_ref()
            .is_some_and(|j| matches!(j.stage, JobStage::Printing | JobStage::Paused))
    }

    fn start_stream(&mut self, now: Now, out: &mut Vec<Output>) {
        if self.link != LinkState::Ready {
            return; // waits in Starting until the printer is ready
        }
        let Some(job) = &mut self.current else { return };
        job.stage = JobStage::Printing;
        job.started_at_ms = Some(now.unix_ms);
        job.line = 0;
        let (job_id, sha) = (job.job_id.clone(), job.file_sha256.clone());
        self.flags.bed_clear = false;
        self.last_checkpoint_line = 0;
        if let Some(f) = self.files.get_mut(&sha) {
            f.last_used_ms = now.unix_ms;
        }
        let mut muts = vec![
            Mutation::SetCurrent(Some(job.clone())),
            Mutation::SetFlags(self.flags),
        ];
        if let Some(f) = self.files.get(&sha) {
            muts.push(Mutation::PutFile(f.clone()));
        }
        out.push(Output::Persist(muts));
        out.push(Output::Printer(PrinterCommand::StartStream {
            job_id: job_id.clone(),
            sha256: sha,
        }));
        self.event(now, EventKind::JobStarted { job_id }, out);
    }

    // ----- files -----

    fn evictable_bytes(&self, keep: &Sha256Hex) -> u64 {
        let in_use = self.current.as_ref().map(|j| &j.file_sha256);
        self.files
            .values()
            .filter(|f| &f.sha256 != keep && Some(&f.sha256) != in_use)
            .map(|f| f.received_bytes)
            .sum()
    }

    fn begin_transfer(&mut self, now: Now, sha: &Sha256Hex, size: u64, out: &mut Vec<Output>) {
        let received = self
            .files
            .get(sha)
            .filter(|f| f.size_bytes == size)
            .map_or(0, |f| f.received_bytes);
        // Make room: evict least recently used files not in use until the new one fits.
        let mut cached: Vec<FileRecord> = self
            .files
            .values()
            .filter(|f| &f.sha256 != sha)
            .cloned()
            .collect();
        cached.sort_by_key(|f| f.last_used_ms);
        let mut total: u64 = cached.iter().map(|f| f.received_bytes).sum();
        let mut muts = Vec::new();
        for f in cached {
            let over_cache = total + size > self.cfg.cache_max_bytes;
            let over_disk = self
                .disk_free
                .is_some_and(|free| size.saturating_sub(received) > free);
            if !(over_cache || over_disk) {
                break;
            }
            total -= f.received_bytes;
            if let Some(free) = &mut self.disk_free {
                *free += f.received_bytes;
            }
            self.files.remove(&f.sha256);
            muts.push(Mutation::RemoveFile(f.sha256.clone()));
            out.push(Output::RemoveFile { sha256: f.sha256 });
        }
        let record = FileRecord {
            sha256: sha.clone(),
            size_bytes: size,
            received_bytes: received,
            verified: false,
            last_used_ms: now.unix_ms,
        };
        self.files.insert(sha.clone(), record.clone());
        muts.push(Mutation::PutFile(record));
        out.push(Output::Persist(muts));
        self.transfer = Some(Transfer {
            sha256: sha.clone(),
            size,
            received,
            request_id: None,
            deadline_ms: 0,
            attempts: 0,
            requests: 0,
            storing: false,
        });
        if received >= size {
            self.transfer = None;
            self.check_file(sha, out);
        } else if self.connected {
            self.request_chunk(now, sha, size, out);
        }
    }

    fn request_chunk(&mut self, now: Now, sha: &Sha256Hex, size: u64, out: &mut Vec<Output>) {
        let Some(t) = &mut self.transfer else { return };
        t.requests += 1;
        let id = CommandId::new(format!(
            "{}-e{}-f{}",
            self.cfg.printer_id, self.epoch, t.requests
        ))
        .expect("a printer id and numbers always form a valid command id");
        let len = (size - t.received).min(u64::from(self.cfg.chunk_len)) as u32;
        let req = FileChunkRequest {
            v: Version,
            request_id: id.clone(),
            sha256: sha.clone(),
            offset: t.received,
            len,
        };
        t.request_id = Some(id);
        t.deadline_ms = now.mono_ms + self.cfg.chunk_timeout_ms;
        out.push(Output::Publish(Publish {
            topic: self
                .cfg
                .topics
                .format(&Topic::FileRequest(self.cfg.printer_id.clone())),
            payload: req.encode(),
            retain: false,
            outbox_key: None,
            lane: Lane::Answer,
        }));
    }

    fn on_chunk_timeout(&mut self, now: Now, out: &mut Vec<Output>) {
        self.retry_chunk(now, "file chunk timed out", out);
    }

    /// Asks for the current chunk again, or fails the job once `chunk_attempts` in a row went
    /// wrong (timed out, corrupt, or not the chunk asked for): a server that keeps answering
    /// wrongly must not keep the printer `preparing` for ever.
    fn retry_chunk(&mut self, now: Now, why: &str, out: &mut Vec<Output>) {
        let Some(t) = &mut self.transfer else { return };
        t.attempts += 1;
        if t.attempts >= self.cfg.chunk_attempts {
            let (offset, attempts) = (t.received, t.attempts);
            self.transfer = None;
            self.end_job(
                now,
                JobStage::Failed,
                Some(format!(
                    "file transfer stalled at byte {offset} after {attempts} attempts ({why})"
                )),
                out,
            );
            return;
        }
        let (sha, size) = (t.sha256.clone(), t.size);
        tracing::warn!(printer = %self.cfg.printer_id, sha = %sha, offset = t.received, attempt = t.attempts, "{why}; asking again");
        self.request_chunk(now, &sha, size, out);
    }

    fn on_chunk(&mut self, now: Now, payload: &[u8], out: &mut Vec<Output>) {
        let resp = match FileChunkResponse::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "malformed file chunk dropped");
                return;
            }
        };
        let Some(t) = &mut self.transfer else {
            tracing::debug!("file chunk with no transfer under way dropped");
            return;
        };
        if t.request_id.as_ref() != Some(resp.request_id()) || t.storing {
            tracing::debug!(request = %resp.request_id(), "stale file chunk dropped");
            return;
        }
        match resp {
            FileChunkResponse::Error { code, message, .. } => {
                self.transfer = None;
                self.end_job(
                    now,
                    JobStage::Failed,
                    Some(format!("file unavailable ({code:?}): {message}").to_lowercase()),
                    out,
                );
            }
            FileChunkResponse::Ok {
                sha256,
                offset,
                total_size,
                chunk_sha256,
                data_b64,
                ..
            } => {
                if sha256 == t.sha256 && total_size != t.size {
                    // The file server knows the file; the command's size was wrong. Asking
                    // again cannot help.
                    let reason = format!(
                        "the file is {total_size} bytes, not the {} bytes start_job said",
                        t.size
                    );
                    self.transfer = None;
                    self.end_job(now, JobStage::Failed, Some(reason), out);
                    return;
                }
                if sha256 != t.sha256 || offset != t.received {
                    tracing::debug!(%offset, expected = t.received, "file chunk does not match the request");
                    self.retry_chunk(now, "file chunk does not match the request", out);
                    return;
                }
                match verify_chunk(offset, total_size, &chunk_sha256, &data_b64) {
                    Ok(data) => {
                        t.storing = true;
                        out.push(Output::StoreChunk {
                            sha256,
                            offset,
                            data,
                        });
                    }
                    Err(e) => {
                        self.retry_chunk(now, &format!("corrupt file chunk ({e})"), out);
                    }
                }
            }
        }
    }

    fn on_chunk_stored(
        &mut self,
        now: Now,
        sha: Sha256Hex,
        offset: u64,
        len: u64,
        out: &mut Vec<Output>,
    ) {
        let Some(t) = &mut self.transfer else { return };
        if t.sha256 != sha || offset != t.received {
            return;
        }
        t.storing = false;
        t.attempts = 0;
        t.received += len;
        t.request_id = None;
        let (received, size) = (t.received, t.size);
        if let Some(f) = self.files.get_mut(&sha) {
            f.received_bytes = received;
            out.push(Output::Persist(vec![Mutation::PutFile(f.clone())]));
        }
        self.state_dirty = true;
        if received >= size {
            self.transfer = None;
            self.check_file(&sha, out);
        } else if self.connected {
            self.request_chunk(now, &sha, size, out);
        }
    }

    fn check_file(&mut self, sha: &Sha256Hex, out: &mut Vec<Output>) {
        self.checking = Some(sha.clone());
        out.push(Output::CheckFile {
            sha256: sha.clone(),
        });
    }

    fn on_file_checked(
        &mut self,
        now: Now,
        sha: Sha256Hex,
        result: Result<u64, String>,
        out: &mut Vec<Output>,
    ) {
        if self.checking.as_ref() != Some(&sha) {
            return;
        }
        self.checking = None;
        let Some(job) = &self.current else { return };
        if job.file_sha256 != sha || job.stage != JobStage::Transferring {
            return;
        }
        let job_id = job.job_id.clone();
        match result {
            Ok(lines) => {
                if let Some(f) = self.files.get_mut(&sha) {
                    f.verified = true;
                    f.received_bytes = f.size_bytes;
                    out.push(Output::Persist(vec![Mutation::PutFile(f.clone())]));
                }
                if let Some(job) = &mut self.current {
                    job.total_lines = lines;
                    job.stage = JobStage::Starting;
                }
                self.event(
                    now,
                    EventKind::FileVerified {
                        job_id,
                        sha256: sha,
                    },
                    out,
                );
                self.start_stream(now, out);
            }
            Err(reason) => {
                self.files.remove(&sha);
                out.push(Output::Persist(vec![Mutation::RemoveFile(sha.clone())]));
                out.push(Output::RemoveFile { sha256: sha });
                self.end_job(
                    now,
                    JobStage::Failed,
                    Some(format!("file failed verification: {reason}")),
                    out,
                );
            }
        }
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
