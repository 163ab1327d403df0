//! The gateway's decisions: a pure state machine.
//!
//! `Gateway::handle(now, input) -> Vec<Output>`. Inputs are MQTT connection changes and
//! messages, what the printer link reports, results of file IO, and timer ticks. Outputs are
//! durable mutations, publishes, printer commands and file IO requests. The shell carries the
//! outputs out **in order**; within one `handle` every `Persist` comes before the publishes it
//! justifies ("persist, then publish"). No IO, no clock: `now` is passed in.
//!
//! This file holds the types, the core's construction from the durable snapshot and the routing
//! of inputs; the rest is split by concern:
//! - `commands`: commands on `cmd`, their admission and refusals;
//! - `jobs`: a job's stages, its start on the printer and its end in the ledger;
//! - `printer`: what the printer link reports;
//! - `transfer`: pulling a job's file in verified chunks, and the file cache;
//! - `reports`: the birth, `state` and the event outbox published to the broker;
//! - `timers`: what falls due with time (heartbeat, re-publishing, chunk timeouts).

use std::collections::HashMap;
use std::time::Duration;

use std::collections::BTreeMap;

use protocol::files::MAX_CHUNK_LEN;
use protocol::limit::{Limiter, Rate};
use protocol::presence::{BuildVolume, Firmware, Status};
use protocol::state::{JobStage, LastCommand, LedgerEntry, PrinterPhase, Temperatures};
use protocol::{CommandId, JobId, Payload, PrinterId, Sha256Hex, Topic, Topics};
use transport::outgoing::Lane;

use crate::store::{CommandRecord, CurrentJob, FileRecord, Flags, Mutation, Snapshot};

mod commands;
mod jobs;
mod printer;
mod reports;
mod timers;
mod transfer;

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
    pub heartbeat: Duration,
    /// Minimum time between two `state` publishes caused by changes.
    pub state_min_interval: Duration,
    /// Bytes per file chunk requested.
    pub chunk_len: u32,
    /// How long to wait for a chunk before asking again.
    pub chunk_timeout: Duration,
    /// How many times in a row a chunk may time out before the job fails.
    pub chunk_attempts: u32,
    /// Most chunks in flight at once (the window grows to it while chunks arrive).
    pub chunk_window: u32,
    /// Persist the line reached every this many lines (and at every pause/end).
    pub checkpoint_lines: u64,
    /// Largest total size of cached files.
    pub cache_max_bytes: u64,
    /// The gateway's version string.
    pub gateway_version: String,
    /// Commands admitted per client (a client over it is answered `busy`).
    pub command_rate: Rate,
    /// Re-publish events the broker has not echoed back after this long.
    pub outbox_resend: Duration,
}

/// A duration in milliseconds, saturating (no setting comes near).
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Most file chunks in flight: 8 × 64 KiB = 512 KiB (~700 KiB as JSON), enough for 25 MB/s
/// over a 20 ms round trip. The broker holds a window's answers in its log for the gateway's
/// chunk topic (`broker.toml` keeps 2 × 1 MiB of it): a window larger than that log loses
/// chunks and the transfer stalls until it asks again.
pub const DEFAULT_CHUNK_WINDOW: u32 = 8;

/// Commands a gateway admits per client: ten a second, twenty at once. The supervisor sends a
/// printer a handful per job; a person pressing buttons, fewer.
pub const COMMAND_RATE: Rate = Rate::new(10.0, 20.0);

impl CoreConfig {
    /// `heartbeat` in milliseconds (the machine counts in milliseconds of `Now`).
    pub fn heartbeat_ms(&self) -> u64 {
        ms(self.heartbeat)
    }
    /// `state_min_interval` in milliseconds.
    pub fn state_min_interval_ms(&self) -> u64 {
        ms(self.state_min_interval)
    }
    /// `chunk_timeout` in milliseconds.
    pub fn chunk_timeout_ms(&self) -> u64 {
        ms(self.chunk_timeout)
    }
    /// `outbox_resend` in milliseconds.
    pub fn outbox_resend_ms(&self) -> u64 {
        ms(self.outbox_resend)
    }

    /// Defaults for `printer_id`.
    pub fn new(printer_id: PrinterId) -> Self {
        Self {
            name: printer_id.to_string(),
            printer_id,
            topics: Topics::default(),
            model: "Marlin printer".into(),
            tags: Vec::new(),
            build_volume: None,
            heartbeat: Duration::from_millis(10_000),
            state_min_interval: Duration::from_millis(250),
            chunk_len: MAX_CHUNK_LEN,
            chunk_timeout: Duration::from_millis(5_000),
            chunk_attempts: 12,
            chunk_window: DEFAULT_CHUNK_WINDOW,
            checkpoint_lines: 200,
            cache_max_bytes: 2 * 1024 * 1024 * 1024,
            gateway_version: env!("CARGO_PKG_VERSION").into(),
            command_rate: COMMAND_RATE,
            outbox_resend: Duration::from_millis(15_000),
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
    /// Write a verified chunk of a partial file at `offset` (dropping anything after it);
    /// with `sync`, make the file durable up to its end before answering. Answer `ChunkStored`
    /// (with the same `sync`) or `ChunkStoreFailed`.
    StoreChunk {
        /// The file.
        sha256: Sha256Hex,
        /// Where.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
        /// Sync to disk.
        sync: bool,
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
        /// The file is durable up to the chunk's end (it was asked to sync).
        synced: bool,
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

/// A file on its way in.
#[derive(Debug, Clone)]
struct Transfer {
    sha256: Sha256Hex,
    size: u64,
    /// Written to the partial file (answered `ChunkStored`), contiguous from 0.
    stored: u64,
    /// Handed to the shell to write, contiguous from 0 (`stored` ≤ `writing`).
    writing: u64,
    /// The end of the last write asked to be synced.
    synced_mark: u64,
    /// The next byte to ask for.
    next: u64,
    /// Requests in flight, by offset.
    in_flight: BTreeMap<u64, Asked>,
    /// Verified chunks that arrived before the ones in front of them, by offset (at most a
    /// window's worth).
    ahead: BTreeMap<u64, Vec<u8>>,
    /// Chunks that may be in flight at once.
    window: u32,
    /// When to ask again if no chunk arrives (monotonic ms).
    deadline_ms: u64,
    /// Things that went wrong since the last chunk stored.
    attempts: u32,
    /// Requests made (numbers their ids).
    requests: u64,
}

impl Transfer {
    fn new(sha256: Sha256Hex, size: u64, received: u64) -> Self {
        Self {
            sha256,
            size,
            stored: received,
            writing: received,
            synced_mark: received,
            next: received,
            in_flight: BTreeMap::new(),
            ahead: BTreeMap::new(),
            window: transfer::START_WINDOW,
            deadline_ms: 0,
            attempts: 0,
            requests: 0,
        }
    }
}

/// A chunk asked for.
#[derive(Debug, Clone)]
struct Asked {
    /// The request's id: only an answer carrying it counts.
    id: CommandId,
    /// Bytes asked for.
    len: u32,
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

    /// Handles one input.
    pub fn handle(&mut self, now: Now, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::MqttConnected { session_present } => {
                self.on_connected(now, session_present, &mut out)
            }
            Input::MqttDisconnected => self.connected = false,
            Input::Message { topic, payload } => self.on_message(now, &topic, &payload, &mut out),
            Input::Printer(ev) => self.on_printer(now, ev, &mut out),
            Input::ChunkStored {
                sha256,
                offset,
                len,
                synced,
            } => self.on_chunk_stored(now, sha256, offset, len, synced, &mut out),
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
}

#[cfg(test)]
mod tests;
