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

//!
//! Where each concern lives: `io` (inputs, outputs), `config`, `views` (printer views),
//! `reports` (reports and reconciliation), `dispatch` (dispatch and starts), `timers` (the timer
//! table), `api` (the operator API and its typed refusals), `queue` (the queue snapshot),
//! `history` (retention of ended jobs), `home_assistant` (discovery and buttons).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use protocol::api::{
    ApiErrorCode, ApiOp, ApiReject, ApiRequest, ApiResponse, ApiResult, BedClear, JobArgs,
    JobState, JobSummary, ListJobs, PrinterArgs, PrinterSummary, QueueCounts, QueueSnapshot,
    SubmitJob, UploadChunk,
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

mod api;
mod config;
mod dashboard;
mod dispatch;
mod history;
mod home_assistant;
mod index;
mod io;
mod queue;
mod reports;
mod timers;
mod tracked;
mod views;

use api::phase_name;
pub use api::Refusal;
pub use config::{HistoryConfig, SupervisorConfig, API_RATE};
pub use dashboard::UTILISATION_WINDOW_MS;
pub(crate) use home_assistant::HA_ROUND_MS;
pub use io::{Caller, Input, Output, Publish, UploadOutcome};
pub use protocol::Now;
use queue::{first_sorted, summary};
use timers::Timer;
use views::{PendingStart, PrinterView, START_EXPIRY_SKEW_MS};

/// Counters for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// Reconciliations that changed the supervisor's view.
    pub reconciliations: u64,
    /// Ended jobs archived out of the store (retention).
    pub jobs_archived: u64,
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
    jobs: tracked::Tracked<JobId, JobRecord>,
    printers: tracked::Tracked<PrinterId, PrinterView>,
    /// Indexes over both, kept from their changes (`index`).
    idx: index::Indexes,
    files: HashMap<Sha256Hex, FileRecord>,
    answers: HashMap<String, Vec<u8>>,
    /// `answers`' keys, oldest first (the newest `REQUEST_MEMORY` are kept).
    answer_order: std::collections::VecDeque<String>,
    queued_since_mono: HashMap<JobId, u64>,
    /// When retention last looked at the jobs.
    history_checked_mono: Option<u64>,
    /// The second rebirth requests are counted in (monotonic ms), and how many went in it.
    rebirth_slot_mono: u64,
    rebirths_in_slot: u32,
    /// `next_deadline`'s answer while the machine has not changed since.
    deadline_cache: std::cell::Cell<Option<Option<u64>>>,
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
    upload_limiter: Limiter,
    /// When our retained status was last re-asserted after a contradiction.
    status_reasserted_mono: Option<u64>,
    /// A contradiction of our status waits for its re-assertion.
    status_reassert_due: bool,
}

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
        let (api_rate, upload_rate) = (cfg.api_rate, cfg.upload_rate);
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
            answer_order: snap.requests.iter().map(|(k, _)| k.clone()).collect(),
            answers: snap.requests.into_iter().collect(),
            queued_since_mono: queued_since,
            // The first look a minute after start (a start is busy enough).
            history_checked_mono: Some(now.mono_ms),
            deadline_cache: std::cell::Cell::new(None),
            idx: index::Indexes::default(),
            rebirth_slot_mono: 0,
            rebirths_in_slot: 0,
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
            upload_limiter: Limiter::new(upload_rate),
            status_reasserted_mono: None,
            status_reassert_due: false,
        }
    }

    /// Before connecting: the next epoch (persist it first) and the will carrying it.
    pub fn prepare_connect(&mut self, now: Now) -> (Vec<Mutation>, String, Vec<u8>) {
        self.deadline_cache.set(None);
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

    /// How many printers the supervisor knows.
    pub fn printer_count(&self) -> usize {
        self.printers.len()
    }

    /// Every printer as operators see it.
    pub fn printer_summaries(&self) -> Vec<PrinterSummary> {
        self.printers.values().map(|p| self.summary(p)).collect()
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
        self.deadline_cache.set(None);
        let mut out = Vec::new();
        for input in inputs {
            self.apply(now, input, &mut out);
        }
        self.on_time(now, Timer::BEFORE_DISPATCH, &mut out);
        self.dispatch(now, &mut out);
        self.on_time(now, Timer::AFTER_DISPATCH, &mut out);
        self.refresh_indexes();
        self.persist_pending_starts(&mut out);
        self.refresh_indexes();
        #[cfg(debug_assertions)]
        self.check_indexes();
        debug_assert!(
            self.next_deadline().is_none_or(|d| d > now.mono_ms),
            "a timer is still due after the batch (a busy loop)"
        );
        out
    }

    fn apply(&mut self, now: Now, input: Input, out: &mut Vec<Output>) {
        match input {
            Input::Connected => self.on_connected(now, out),
            Input::Disconnected => self.connected = false,
            Input::Message { topic, payload } => self.on_message(now, &topic, &payload, out),
            Input::Http(req) => self.on_http(now, req, out),
            Input::Uploaded {
                caller,
                id,
                outcome,
            } => self.on_uploaded(now, caller, id, outcome, out),
            Input::Tick => {}
            Input::Enrolled(set) => self.on_enrolled(set, out),
        }
    }

    /// Only enrolled printers get work and a Home Assistant device (issue #10: retained
    /// messages for an invented printer `ghost` made the supervisor dispatch a real job to it).
    /// Others are listed, flagged.
    fn on_enrolled(&mut self, set: Option<BTreeSet<PrinterId>>, out: &mut Vec<Output>) {
        let mut withdrawn = Vec::new();
        for (id, p) in self.printers.iter_mut() {
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
}

#[cfg(test)]
mod tests;
