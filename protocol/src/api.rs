//! The supervisor's operator API (`api/request` → `api/response/<client>`) and the retained
//! queue snapshot (`queue`).
//!
//! Request/response over plain MQTT 3.1.1: a request names its correlation `id` and the
//! `client` whose response topic gets the answer (the supervisor never publishes to a topic a
//! client names freely).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::codec::{decode_envelope, DecodeError, EnvelopeError, EnvelopeSpec, Payload, Version};
use crate::ids::{ClientId, CommandId, JobId, PrinterId, Sha256Hex};
use crate::presence::Presence;
use crate::state::PrinterPhase;

/// What an operator asks the supervisor. Serialised as `"op"` + `"args"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "op", content = "args", rename_all = "snake_case")]
pub enum ApiOp {
    /// Store part of a G-code file (content-addressed) before submitting it.
    UploadChunk(UploadChunk),
    /// Queue a job for a stored file.
    SubmitJob(SubmitJob),
    /// Cancel a job (queued: removed; running: the printer is told to cancel).
    CancelJob(JobArgs),
    /// Put an ended job back in the queue (a new attempt with a new job id).
    RequeueJob(JobArgs),
    /// Change a queued job's priority.
    SetPriority(SetPriority),
    /// List jobs.
    ListJobs(ListJobs),
    /// List printers.
    ListPrinters(NoArgs),
    /// An operator confirms a printer's bed is clear; `failed` marks its last print failed.
    BedClear(BedClear),
    /// Let a printer held by the circuit breaker take work again.
    ReleasePrinter(PrinterArgs),
    /// Pause the job printing on a printer (refused unless it is printing).
    PausePrinter(PrinterArgs),
    /// Resume a paused printer's job (refused unless it is paused).
    ResumePrinter(PrinterArgs),
    /// Decommission a printer: the supervisor forgets it, deletes its Home Assistant entities
    /// and clears its retained topics. Refused while its gateway is online or a job runs on it.
    ForgetPrinter(PrinterArgs),
}

/// Arguments of `upload_chunk`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UploadChunk {
    /// The whole file's digest.
    pub sha256: Sha256Hex,
    /// Where this chunk starts.
    pub offset: u64,
    /// The whole file's size.
    pub total_size: u64,
    /// The chunk, standard base64 (at most 64 KiB decoded).
    pub data_b64: String,
}

/// Arguments of `submit_job`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitJob {
    /// A name for people (usually the file name).
    pub name: String,
    /// The stored file.
    pub sha256: Sha256Hex,
    /// How many copies (each is its own job).
    #[serde(default = "one")]
    pub copies: u32,
    /// Higher runs first; equal priorities run in submission order.
    #[serde(default)]
    pub priority: i32,
    /// Only printers with all these tags may take it.
    #[serde(default)]
    pub tags: Vec<String>,
}

fn one() -> u32 {
    1
}

/// Arguments naming a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobArgs {
    /// The job.
    pub job_id: JobId,
}

/// Arguments of `set_priority`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPriority {
    /// The job.
    pub job_id: JobId,
    /// The new priority.
    pub priority: i32,
}

/// Arguments of `list_jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListJobs {
    /// Include ended jobs (history), newest first.
    #[serde(default)]
    pub include_ended: bool,
    /// At most this many (default 100, at most 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// Arguments naming a printer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PrinterArgs {
    /// The printer.
    pub printer_id: PrinterId,
}

/// Arguments of `bed_clear`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BedClear {
    /// The printer.
    pub printer_id: PrinterId,
    /// The last print was bad: its job goes back to the queue.
    #[serde(default)]
    pub failed: bool,
}

/// No arguments.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// A request to the supervisor. QoS 1, not retained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("unevaluatedProperties" = false))]
pub struct ApiRequest {
    /// Protocol version.
    pub v: Version,
    /// Correlation id, echoed in the response; also de-duplicates retried requests.
    pub id: CommandId,
    /// The answer goes to `api/response/<client>`.
    pub client: ClientId,
    /// The operation (`op` and `args`).
    #[serde(flatten)]
    pub op: ApiOp,
}

/// Every operation this build understands.
pub const API_OPS: [&str; 12] = [
    "upload_chunk",
    "submit_job",
    "cancel_job",
    "requeue_job",
    "set_priority",
    "list_jobs",
    "list_printers",
    "bed_clear",
    "release_printer",
    "pause_printer",
    "resume_printer",
    "forget_printer",
];

const API_SPEC: EnvelopeSpec = EnvelopeSpec {
    tag: "op",
    kinds: &API_OPS,
    fields: &["id", "client"],
};

/// Why a request was rejected, with what is needed to answer it (when it could be read).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct ApiReject {
    /// The request's id, if valid.
    pub id: Option<CommandId>,
    /// The client to answer, if valid.
    pub client: Option<ClientId>,
    /// What was wrong.
    pub error: EnvelopeError,
}

impl ApiRequest {
    /// Strictly decodes a request, keeping its id and client when anything else is wrong.
    pub fn decode(bytes: &[u8]) -> Result<ApiRequest, ApiReject> {
        decode_envelope::<ApiRequest, ApiOp>(bytes, Self::MAX_LEN, &API_SPEC).map_err(
            |(map, error)| {
                let (id, client) = crate::codec::correlation(map.as_ref());
                ApiReject { id, client, error }
            },
        )
    }
}

impl Payload for ApiRequest {
    const SCHEMA: &'static str = "api-request";
    /// Upload chunks make requests larger than control messages.
    const MAX_LEN: usize = crate::codec::MAX_CHUNK_PAYLOAD;

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        ApiRequest::decode(bytes).map_err(|r| match r.error {
            EnvelopeError::Decode(d) => d,
            other => DecodeError::Invalid(other.to_string()),
        })
    }
}

/// Where a job stands in the fleet (the supervisor's job state machine).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a printer.
    Queued,
    /// Given to a printer; the start command is on its way or waiting for the bed.
    Assigned,
    /// The printer is pulling the file.
    Transferring,
    /// The printer is preparing.
    Starting,
    /// Printing.
    Printing,
    /// Paused.
    Paused,
    /// Printed; waiting for the operator to clear the bed and judge it.
    Finished,
    /// Ended in an error.
    Failed,
    /// Cancelled.
    Cancelled,
    /// The printer restarted mid-print.
    Interrupted,
    /// No report from its printer within the step timeout; flagged for an operator.
    TimedOut,
    /// Harvested and judged good: the end.
    Done,
}

/// A job as the operator sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSummary {
    /// The job.
    pub job_id: JobId,
    /// Its name.
    pub name: String,
    /// Its file.
    pub sha256: Sha256Hex,
    /// Where it stands.
    pub state: JobState,
    /// Its priority.
    pub priority: i32,
    /// The printer it is (or was last) on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub printer_id: Option<PrinterId>,
    /// Progress in percent, while printing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_pct: Option<f64>,
    /// When it was submitted (Unix ms).
    pub submitted_at_ms: u64,
    /// When it started printing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at_ms: Option<u64>,
    /// Why it failed, was interrupted or timed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A printer as the operator sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PrinterSummary {
    /// The printer.
    pub printer_id: PrinterId,
    /// Its presence.
    pub presence: Presence,
    /// No heartbeat for 3 periods.
    pub stale: bool,
    /// Its phase, from its last state.
    pub phase: PrinterPhase,
    /// The job on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    /// Progress of that job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_pct: Option<f64>,
    /// Held out of dispatch by the circuit breaker until an operator releases it.
    pub held: bool,
    /// Jobs failed in a row.
    pub consecutive_failures: u32,
    /// In the farm's client registry (always, when the farm has none). A printer that is not
    /// gets no work: its messages may come from anyone.
    #[serde(default = "yes")]
    pub enrolled: bool,
}

fn yes() -> bool {
    true
}

/// What a successful request returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ApiResult {
    /// The request was carried out; nothing to return.
    Done {},
    /// An upload chunk was stored; the file is complete when `received == total_size`.
    Uploaded {
        /// Bytes stored so far (contiguous from 0).
        received: u64,
        /// The file's size.
        total_size: u64,
    },
    /// Jobs were queued.
    Submitted {
        /// One id per copy.
        job_ids: Vec<JobId>,
    },
    /// A list of jobs.
    Jobs {
        /// The jobs.
        jobs: Vec<JobSummary>,
    },
    /// A list of printers.
    Printers {
        /// The printers.
        printers: Vec<PrinterSummary>,
    },
}

/// Why a request was refused: a stable code for programs (match on it, never on `error`'s
/// wording, which is for people and may change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApiErrorCode {
    /// The request cannot be read, or an argument is out of range (copies, name, ids).
    Invalid,
    /// The client name is reserved (Home Assistant's buttons).
    ReservedClient,
    /// The client sent more than its rate allows; nothing was done: retry after
    /// `retry_after_ms`.
    Busy,
    /// The file is not stored: upload it first.
    FileNotStored,
    /// An upload chunk was refused (offset, size or digest does not match, or storage failed).
    UploadRefused,
    /// No job has this id.
    UnknownJob,
    /// No printer has this id.
    UnknownPrinter,
    /// The job already ended: there is nothing to cancel.
    JobEnded,
    /// Only an ended or timed-out job can be requeued.
    NotRequeueable,
    /// The job was requeued before (its retry exists).
    AlreadyRequeued,
    /// Only a queued job can change priority.
    NotQueued,
    /// The printer is still working on its job: its bed cannot be cleared yet.
    PrinterNotDone,
    /// The printer is offline or silent.
    PrinterUnreachable,
    /// The printer is in a phase where this cannot be done (pause a printer that is not
    /// printing, resume one that is not paused, cancel on a printer without a job…).
    WrongPhase,
    /// The printer is online: stop its gateway before forgetting it.
    PrinterOnline,
    /// The printer holds an active job: cancel it first.
    PrinterHasJob,
    /// The supervisor found its own state inconsistent; nothing was done (a bug: report it).
    Internal,
}

/// The answer to a request, on `api/response/<client>`. QoS 1, not retained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiResponse {
    /// Protocol version.
    pub v: Version,
    /// The request's id.
    pub id: CommandId,
    /// `ok` with a result, or `error` with a reason.
    pub ok: bool,
    /// What the request returned, when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ApiResult>,
    /// Why it failed, when not `ok`: for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why it failed, when not `ok`: for programs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ApiErrorCode>,
    /// Set when the request was refused because its client sent more than its rate allows
    /// (`docs/protocol.md`, "Rate limits"): nothing was done; send it again (a new id is fine)
    /// after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl Payload for ApiResponse {
    const SCHEMA: &'static str = "api-response";
    const MAX_LEN: usize = 1024 * 1024;
}

/// Job counts by state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueCounts {
    /// Waiting for a printer.
    pub queued: u32,
    /// Assigned, transferring or starting.
    pub starting: u32,
    /// Printing or paused.
    pub printing: u32,
    /// Finished, waiting for harvest.
    pub awaiting_harvest: u32,
    /// Needing an operator: failed, interrupted, timed out.
    pub attention: u32,
}

/// The retained queue snapshot for dashboards. QoS 1, retained, published on change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueSnapshot {
    /// Protocol version.
    pub v: Version,
    /// The supervisor's epoch.
    pub epoch: u64,
    /// Sequence within the epoch.
    pub seq: u64,
    /// When it was built (Unix ms).
    pub at_ms: u64,
    /// Counts over every job that is not done or cancelled.
    pub counts: QueueCounts,
    /// Active and queued jobs in dispatch order (at most 100).
    pub jobs: Vec<JobSummary>,
    /// Whether `jobs` was cut at 100.
    pub truncated: bool,
}

impl Payload for QueueSnapshot {
    const SCHEMA: &'static str = "queue";
    const MAX_LEN: usize = 1024 * 1024;
}
