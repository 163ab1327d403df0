//! The HTTP API's own shapes (`/api/v1/…`, `docs/http.md`): what the dashboard reads (tiles,
//! the fleet view, a printer's page, history) and the errors every endpoint answers with. The
//! operations themselves reuse the MQTT API's types ([`crate::api`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::api::{ApiErrorCode, JobSummary, QueueCounts};
use crate::ids::{JobId, PrinterId, Sha256Hex};
use crate::presence::Presence;
use crate::state::{JobStage, PrinterPhase, Temperatures};

/// One printer as the dashboard shows it. Rounded for the screen (progress to whole percents,
/// temperatures to whole degrees, time left to whole minutes, or 10 s under a minute), so a
/// tile changes when what a person sees changes; exact values are in `list_printers` and
/// `list_jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tile {
    /// The printer.
    pub printer_id: PrinterId,
    /// Its presence.
    pub presence: Presence,
    /// Online but silent for 3 heartbeats.
    pub stale: bool,
    /// Its phase (`disconnected` until it reports).
    pub phase: PrinterPhase,
    /// Held out of dispatch by the circuit breaker until an operator releases it.
    pub held: bool,
    /// In the farm's client registry (only then does it get work).
    pub enrolled: bool,
    /// Held out of work by its own operator (maintenance).
    pub maintenance: bool,
    /// The bed must be cleared (by an operator) before the printer takes the next job.
    pub awaiting_bed_clear: bool,
    /// Its tags (a job with tags only goes to printers that have them all).
    pub tags: Vec<String>,
    /// The job on it (running, or ended and still on the bed).
    pub job: Option<TileJob>,
    /// Its temperatures, once reported.
    pub temps: Option<Temperatures>,
    /// Why it is in `error`, `halted` or `disconnected`.
    pub error: Option<String>,
    /// Jobs failed in a row (the breaker holds the printer at its threshold).
    pub consecutive_failures: u32,
    /// Changes whenever anything else in the tile does.
    pub version: u64,
}

/// The job on a tile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TileJob {
    /// The job.
    pub job_id: JobId,
    /// Its name.
    pub name: String,
    /// Where it stands on the printer.
    pub stage: JobStage,
    /// Progress, percent.
    pub progress_pct: f64,
    /// Estimated seconds left, when the printer can tell.
    pub remaining_s: Option<u64>,
    /// When it started printing (Unix ms).
    pub started_at_ms: Option<u64>,
}

/// Printers by what they are doing, for the dashboard's summary line. A printer counts in
/// every line that applies (a held, stale printer counts as both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FleetCounts {
    /// All printers.
    pub total: u32,
    /// Printing (or preparing).
    pub printing: u32,
    /// Paused.
    pub paused: u32,
    /// Idle or ready, online.
    pub idle: u32,
    /// Waiting for an operator to clear the bed.
    pub awaiting_bed_clear: u32,
    /// In `error` or `halted`.
    pub error: u32,
    /// Held by the circuit breaker.
    pub held: u32,
    /// Offline.
    pub offline: u32,
    /// Online but silent.
    pub stale: u32,
}

/// Active and queued jobs, in dispatch order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueView {
    /// Counts over every job that is not done or cancelled.
    pub counts: QueueCounts,
    /// At most 200 jobs.
    pub jobs: Vec<JobSummary>,
    /// Whether `jobs` was cut.
    pub truncated: bool,
}

/// The dashboard's first paint (`GET /api/v1/fleet`; the stream's `fleet` event).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FleetView {
    /// When it was built (Unix ms).
    pub at_ms: u64,
    /// Every printer, by id.
    pub printers: Vec<Tile>,
    /// The summary line.
    pub counts: FleetCounts,
    /// The queue board.
    pub queue: QueueView,
    /// The most recently ended jobs, newest first (at most 50).
    pub ended: Vec<JobSummary>,
}

/// Something that happened on a printer, for its page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Activity {
    /// When (Unix ms; the printer's clock for its events).
    pub at_ms: u64,
    /// `event`, `command` (a command's result) or `presence`.
    pub kind: String,
    /// What, for people.
    pub text: String,
}

/// A printer's page (`GET /api/v1/printers/{printer_id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PrinterDetail {
    /// Its tile.
    pub tile: Tile,
    /// Its recent events, command results and presence changes, newest first.
    pub events: Vec<Activity>,
    /// Its jobs, newest first (at most 50).
    pub jobs: Vec<JobSummary>,
}

/// One printer's use over a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Utilisation {
    /// The printer.
    pub printer_id: PrinterId,
    /// Jobs that finished (printed to the end) in the window.
    pub jobs_finished: u32,
    /// Jobs that failed, were interrupted or timed out in the window.
    pub jobs_failed: u32,
    /// Seconds spent printing in the window.
    pub printing_s: u64,
    /// The window, seconds: the last 24 hours, or since the printer was first seen.
    pub window_s: u64,
    /// `printing_s` over `window_s`, percent.
    pub utilisation_pct: f64,
}

/// History (`GET /api/v1/history`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct History {
    /// Ended jobs, newest first.
    pub jobs: Vec<JobSummary>,
    /// Per-printer use over the last 24 hours.
    pub utilisation: Vec<Utilisation>,
}

/// An upload's progress (`GET /api/v1/files/{sha256}`): where to resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileStatus {
    /// The file.
    pub sha256: Sha256Hex,
    /// Bytes stored, contiguous from 0: send the next chunk at this offset.
    pub received: u64,
    /// Stored whole and verified: submit it.
    pub complete: bool,
}

/// A signed-in caller (`/api/v1/session`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionInfo {
    /// The API token's name.
    pub name: String,
    /// What it may do.
    pub role: Role,
}

/// What an API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read everything, change nothing.
    Viewer,
    /// Read and act: submit, cancel, clear beds, pause, resume, release, forget.
    Operator,
}

/// Sign in (`POST /api/v1/session`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    /// An API token (`printloop tokens add`).
    pub token: String,
}

/// Why an HTTP request failed. Every 4xx and 5xx answer of `/api/v1` carries one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// For people.
    pub error: String,
    /// For programs: match on this, never on `error`.
    pub code: ErrorCode,
    /// With `busy`: nothing was done; retry after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// An HTTP error's code: the MQTT API's refusals, and the HTTP layer's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ErrorCode {
    /// A refusal of the operation itself (the same as over MQTT).
    Api(ApiErrorCode),
    /// The HTTP layer's.
    Http(HttpErrorCode),
}

/// Refusals of the HTTP layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HttpErrorCode {
    /// No token, or one that is not known (401).
    Unauthorized,
    /// The token's role may not do this, or a cookie-signed request lacks `X-Printloop: 1` (403).
    Forbidden,
    /// No such path, printer or job (404).
    NotFound,
    /// The body is larger than this endpoint takes (413).
    TooLarge,
    /// The file is not G-code (415).
    NotGcode,
    /// The supervisor is stopping or overloaded; try again (503).
    Unavailable,
}

/// What a webhook tells (`docs/http.md`, "Webhooks").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum WebhookKind {
    /// A job started printing.
    #[serde(rename = "job.started")]
    JobStarted,
    /// A job printed to the end.
    #[serde(rename = "job.finished")]
    JobFinished,
    /// A job failed, was interrupted (its printer restarted) or timed out.
    #[serde(rename = "job.failed")]
    JobFailed,
    /// A printer's job ended: its bed waits for a person to clear it.
    #[serde(rename = "printer.awaiting_bed_clear")]
    AwaitingBedClear,
    /// A printer halted (its firmware stopped: it needs a person).
    #[serde(rename = "printer.halted")]
    PrinterHalted,
}

impl WebhookKind {
    /// Every kind, for filters.
    pub const ALL: [WebhookKind; 5] = [
        WebhookKind::JobStarted,
        WebhookKind::JobFinished,
        WebhookKind::JobFailed,
        WebhookKind::AwaitingBedClear,
        WebhookKind::PrinterHalted,
    ];

    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookKind::JobStarted => "job.started",
            WebhookKind::JobFinished => "job.finished",
            WebhookKind::JobFailed => "job.failed",
            WebhookKind::AwaitingBedClear => "printer.awaiting_bed_clear",
            WebhookKind::PrinterHalted => "printer.halted",
        }
    }
}

/// A webhook's body: POSTed as JSON, signed (`X-Printloop-Signature`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookEvent {
    /// Stable for the event: a repeat delivery carries the same id (deduplicate on it).
    pub id: String,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: WebhookKind,
    /// When (Unix ms).
    pub at_ms: u64,
    /// The printer.
    pub printer_id: PrinterId,
    /// The job, for job events and a bed to clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    /// Its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// Why it failed, or the printer's error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
