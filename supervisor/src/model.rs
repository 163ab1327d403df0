//! What the supervisor keeps durably, and the mutations its state machine emits.
//!
//! The machine ([`crate::machine`]) never touches the store: it returns `Persist(Vec<Mutation>)`
//! outputs and the shell applies each batch in one redb transaction **before** carrying out the
//! publishes that follow it.

use protocol::api::JobState;
use protocol::{CommandId, JobId, PrinterId, Sha256Hex};
use serde::{Deserialize, Serialize};

/// One job: a request to print one copy of one file once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Never reused. A requeue makes a new job (`<id>.r<n>`).
    pub job_id: JobId,
    /// For people.
    pub name: String,
    /// The file.
    pub sha256: Sha256Hex,
    /// Its size.
    pub size_bytes: u64,
    /// Higher first.
    pub priority: i32,
    /// Submission order; ties in priority go by it.
    pub seq: u64,
    /// A printer must have all of these.
    pub tags: Vec<String>,
    /// Where it stands.
    pub state: JobState,
    /// The printer it is on (or was last on).
    pub printer: Option<PrinterId>,
    /// The job this one re-runs, if it was requeued.
    pub retry_of: Option<JobId>,
    /// Times this job's print was retried (for the new job, its predecessor's count + 1).
    pub attempt: u32,
    /// Progress while printing (not persisted on every change).
    pub progress_pct: Option<f64>,
    /// Unix ms.
    pub submitted_at_ms: u64,
    /// When it was assigned.
    pub assigned_at_ms: Option<u64>,
    /// When printing started.
    pub started_at_ms: Option<u64>,
    /// When it ended.
    pub ended_at_ms: Option<u64>,
    /// Why it failed, was interrupted or timed out.
    pub reason: Option<String>,
}

impl JobRecord {
    /// Whether the job is still the queue's business (not done, not cancelled).
    pub fn is_open(&self) -> bool {
        !matches!(self.state, JobState::Done | JobState::Cancelled)
    }
}

/// What the supervisor remembers of a printer across restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrinterRecord {
    /// The printer.
    pub printer_id: PrinterId,
    /// Tags from its last `meta`.
    pub tags: Vec<String>,
    /// Held out of dispatch by the circuit breaker until an operator releases it.
    pub held: bool,
    /// Jobs failed in a row.
    pub consecutive_failures: u32,
    /// The job the supervisor gave it and has not seen end (at most one).
    pub assigned: Option<JobId>,
    /// First seen (Unix ms).
    pub first_seen_ms: u64,
    /// A start command sent and not yet answered. Durable so that a restarted supervisor
    /// still knows the printer may have accepted the job, and never moves it meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_sent: Option<StartSent>,
}

/// A `start_job` on its way to a printer (see [`PrinterRecord::start_sent`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartSent {
    /// The job.
    pub job: JobId,
    /// The command's id.
    pub command: CommandId,
    /// When the command expires (Unix ms): after it the printer refuses it.
    pub expires_at_ms: u64,
}

/// A stored G-code file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Its digest (and name).
    pub sha256: Sha256Hex,
    /// Its size.
    pub size_bytes: u64,
    /// When it was stored.
    pub stored_at_ms: u64,
}

/// A change to the supervisor's durable state; one batch is one transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum Mutation {
    /// The supervisor's epoch (+1 on every start).
    SetEpoch(u64),
    /// The next job number.
    SetNextJob(u64),
    /// Insert or replace a job.
    PutJob(JobRecord),
    /// Forget an ended job (archived by the shell first).
    RemoveJob(JobId),
    /// Insert or replace a printer.
    PutPrinter(PrinterRecord),
    /// Forget a decommissioned printer.
    RemovePrinter(PrinterId),
    /// A file is stored.
    PutFile(FileRecord),
    /// Remember the answer to an API request (by `<client>/<id>`), for retried requests.
    PutRequest {
        /// `<client>/<id>`.
        key: String,
        /// The encoded response.
        response: Vec<u8>,
        /// When (for pruning).
        at_ms: u64,
    },
    /// A webhook event waiting for delivery (`crate::http::webhooks::OutboxEntry`, encoded).
    PutOutbox {
        /// Its place in the outbox (delivery order).
        seq: u64,
        /// The entry.
        entry: Vec<u8>,
    },
    /// Delivered to every webhook that wanted it.
    RemoveOutbox(u64),
}

/// Everything the supervisor needs at start-up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The last epoch (0 when new).
    pub epoch: u64,
    /// The next job number (1 when new).
    pub next_job: u64,
    /// Every job (open and ended).
    pub jobs: Vec<JobRecord>,
    /// Every printer seen.
    pub printers: Vec<PrinterRecord>,
    /// Every stored file.
    pub files: Vec<FileRecord>,
    /// Remembered API answers (`key`, response).
    pub requests: Vec<(String, Vec<u8>)>,
}
