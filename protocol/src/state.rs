//! The printer's state snapshot (`printers/<id>/state`) and its events (`printers/<id>/events`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::codec::{Payload, Version};
use crate::command::ResultStatus;
use crate::ids::{CommandId, JobId, Sha256Hex};

/// The printer state machine, as the gateway sees it.
///
/// `disconnected → idle → ready (bed clear) → preparing → printing ⇄ paused → finished → idle`,
/// plus `error` (recoverable) and `halted` (firmware kill: needs a reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PrinterPhase {
    /// The serial link to the printer is down (the gateway itself is up).
    Disconnected,
    /// Connected; nobody has confirmed the bed is clear yet.
    Idle,
    /// Connected, bed confirmed clear: can start a job.
    Ready,
    /// A job was accepted: fetching its file, heating.
    Preparing,
    /// Streaming G-code.
    Printing,
    /// Paused by a command or by the printer.
    Paused,
    /// A job ended (see `job.stage`); the bed must be cleared before the next one.
    Finished,
    /// A recoverable error (see `error`); an operator must look.
    Error,
    /// The firmware halted (thermal runaway, kill()): the printer needs a reset.
    Halted,
}

/// Where a job stands on the printer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStage {
    /// Pulling and verifying the file.
    Transferring,
    /// File verified; preparing the printer.
    Starting,
    /// Streaming G-code.
    Printing,
    /// Paused.
    Paused,
    /// Every line was acknowledged by the firmware.
    Finished,
    /// Ended by an error (firmware halt, file mismatch, …); `reason` says which.
    Failed,
    /// Ended by a cancel command.
    Cancelled,
    /// Ended because the gateway or the printer restarted mid-print; never resumed by itself.
    Interrupted,
}

impl JobStage {
    /// Whether the job has ended on this printer.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Finished | Self::Failed | Self::Cancelled | Self::Interrupted
        )
    }
}

/// One heater: measured and target temperature in °C.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Heater {
    /// Measured temperature, °C.
    pub actual: f64,
    /// Target temperature, °C (0 = off).
    pub target: f64,
}

/// The printer's temperatures.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Temperatures {
    /// The hotend.
    pub nozzle: Heater,
    /// The bed.
    pub bed: Heater,
}

/// The job on the printer now (running, or ended and waiting for the bed to be cleared).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobProgress {
    /// The job.
    pub job_id: JobId,
    /// Its file.
    pub file_sha256: Sha256Hex,
    /// Its name, for people.
    pub name: String,
    /// Where it stands.
    pub stage: JobStage,
    /// G-code lines acknowledged by the firmware.
    pub line: u64,
    /// G-code lines in the file (after stripping comments); 0 until known.
    pub total_lines: u64,
    /// Progress in percent (from M73 when the file has it, else lines).
    pub progress_pct: f64,
    /// Remaining time in seconds (from M73 R), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_s: Option<u64>,
    /// File bytes received so far, while transferring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transferred_bytes: Option<u64>,
    /// File size in bytes.
    pub size_bytes: u64,
    /// When printing started (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    /// When the job ended (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at_ms: Option<u64>,
    /// Why it failed or was interrupted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A job that ended on this printer, from the gateway's durable ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LedgerEntry {
    /// The job.
    pub job_id: JobId,
    /// How it ended (a terminal stage).
    pub outcome: JobStage,
    /// The last line acknowledged.
    pub line: u64,
    /// When it ended (Unix ms).
    pub ended_at_ms: u64,
}

/// The last command the gateway handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LastCommand {
    /// Its id.
    pub id: CommandId,
    /// What the gateway answered.
    pub status: ResultStatus,
}

/// The full state of one printer. Retained, QoS 1; published on change (rate-limited) and as a
/// heartbeat every `heartbeat_s`.
///
/// `(epoch, seq)` orders snapshots: a reader ignores one that is not newer than what it has.
/// `seq` is shared with `events` and restarts at 1 in every epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateSnapshot {
    /// Protocol version.
    pub v: Version,
    /// The gateway's connection epoch.
    pub epoch: u64,
    /// Sequence number within the epoch.
    pub seq: u64,
    /// When this snapshot was built (Unix ms).
    pub at_ms: u64,
    /// The heartbeat period: a snapshot older than 3 of these means the printer is stale.
    pub heartbeat_s: u32,
    /// The printer's phase.
    pub phase: PrinterPhase,
    /// Whether an operator has confirmed the bed is clear since the last job.
    pub bed_clear: bool,
    /// Whether the printer is held out of work by its operator.
    #[serde(default)]
    pub maintenance: bool,
    /// The current (or just ended) job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobProgress>,
    /// The temperatures, once the printer has reported them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temps: Option<Temperatures>,
    /// The last command handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_command: Option<LastCommand>,
    /// The most recent jobs that ended here, newest first (at most 16): what reconciliation
    /// reads when events were lost.
    #[serde(default)]
    pub recent_jobs: Vec<LedgerEntry>,
    /// The error that put the printer in `error` or `halted`; while it is `disconnected`, why
    /// (`serial: …`, e.g. a port that does not exist or that the gateway may not open, with the fix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Payload for StateSnapshot {
    const SCHEMA: &'static str = "state";
}

/// Something that happened on a printer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum EventKind {
    /// The gateway accepted a job.
    JobAccepted {
        /// The job.
        job_id: JobId,
    },
    /// The job's file was received and verified.
    FileVerified {
        /// The job.
        job_id: JobId,
        /// The file.
        sha256: Sha256Hex,
    },
    /// The first line was sent to the printer.
    JobStarted {
        /// The job.
        job_id: JobId,
    },
    /// The job was paused.
    JobPaused {
        /// The job.
        job_id: JobId,
    },
    /// The job was resumed.
    JobResumed {
        /// The job.
        job_id: JobId,
    },
    /// The job ended (any terminal outcome).
    JobEnded {
        /// The job.
        job_id: JobId,
        /// How it ended.
        outcome: JobStage,
        /// The last line acknowledged.
        line: u64,
        /// Why, for failed and interrupted jobs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// An operator confirmed the bed is clear.
    BedCleared {},
    /// The serial link came up and the firmware answered.
    PrinterConnected {
        /// The firmware name from M115.
        firmware: String,
    },
    /// The serial link went down.
    PrinterDisconnected {
        /// Why.
        reason: String,
    },
    /// The printer reported an error.
    PrinterError {
        /// The firmware's message.
        message: String,
        /// Whether the firmware halted.
        fatal: bool,
    },
}

/// One event. QoS 1, not retained. `(epoch, seq)` orders it with the state snapshots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Protocol version.
    pub v: Version,
    /// The gateway's epoch when the event was published.
    pub epoch: u64,
    /// Sequence number within the epoch (shared with `state`).
    pub seq: u64,
    /// When it happened (Unix ms); events journaled during an outage keep their time.
    pub at_ms: u64,
    /// What happened.
    pub event: EventKind,
}

impl Payload for Event {
    const SCHEMA: &'static str = "event";
}
