//! Prometheus metrics (`GET /metrics`), kept with the `prometheus-client` crate: the loop sets
//! them from the machine once a second; a scrape encodes them and never touches the machine.
//! Names are stable (`docs/supervisor.md`); the exposition is OpenMetrics text.

use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use protocol::api::JobState;
use protocol::presence::Presence;
use protocol::state::PrinterPhase;

use super::App;
use crate::machine::Supervisor;

/// Dispatch latency histogram bucket bounds, seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

const PHASES: [(PrinterPhase, &str); 9] = [
    (PrinterPhase::Disconnected, "disconnected"),
    (PrinterPhase::Idle, "idle"),
    (PrinterPhase::Ready, "ready"),
    (PrinterPhase::Preparing, "preparing"),
    (PrinterPhase::Printing, "printing"),
    (PrinterPhase::Paused, "paused"),
    (PrinterPhase::Finished, "finished"),
    (PrinterPhase::Error, "error"),
    (PrinterPhase::Halted, "halted"),
];

const STATES: [(JobState, &str); 12] = [
    (JobState::Queued, "queued"),
    (JobState::Assigned, "assigned"),
    (JobState::Transferring, "transferring"),
    (JobState::Starting, "starting"),
    (JobState::Printing, "printing"),
    (JobState::Paused, "paused"),
    (JobState::Finished, "finished"),
    (JobState::Failed, "failed"),
    (JobState::Cancelled, "cancelled"),
    (JobState::Interrupted, "interrupted"),
    (JobState::TimedOut, "timed_out"),
    (JobState::Done, "done"),
];

type Labels = Vec<(&'static str, &'static str)>;

/// The supervisor's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    printers: Family<Labels, Gauge>,
    phases: Family<Labels, Gauge>,
    held: Gauge,
    jobs: Family<Labels, Gauge>,
    dispatch: Histogram,
    counters: [Counter; 11],
    epoch: Gauge,
}

/// The counters, in the order of `Metrics::counters` (names without `_total`, which the
/// exposition adds).
const COUNTERS: [(&str, &str); 11] = [
    (
        "printloop_reconciliations",
        "Reconciliations that changed the supervisor's view.",
    ),
    ("printloop_command_retries", "Start commands sent again."),
    ("printloop_starts", "Start commands sent."),
    ("printloop_rebirths", "Rebirth requests sent."),
    (
        "printloop_rejected_messages",
        "Messages that failed to decode.",
    ),
    (
        "printloop_refused_file_requests",
        "File requests from a printer with no job waiting for that file.",
    ),
    (
        "printloop_foreign_jobs",
        "Jobs seen running on a printer other than the one they were placed on.",
    ),
    (
        "printloop_busy_requests",
        "API requests answered busy: their client sent more than its rate.",
    ),
    (
        "printloop_busy_commands",
        "Commands a gateway answered busy (sent again when it said).",
    ),
    (
        "printloop_report_resets",
        "Printers whose reports were followed again after a forged or impossible epoch or seq.",
    ),
    (
        "printloop_jobs_archived",
        "Ended jobs archived out of the database (history retention).",
    ),
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registered, all zero.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let printers = Family::<Labels, Gauge>::default();
        registry.register(
            "printloop_printers",
            "Printers by presence (stale: online but silent)",
            printers.clone(),
        );
        let phases = Family::<Labels, Gauge>::default();
        registry.register(
            "printloop_printers_phase",
            "Printers by phase",
            phases.clone(),
        );
        let held = Gauge::default();
        registry.register(
            "printloop_printers_held",
            "Printers held out of dispatch by the circuit breaker",
            held.clone(),
        );
        let jobs = Family::<Labels, Gauge>::default();
        registry.register("printloop_jobs", "Jobs by state", jobs.clone());
        let dispatch = Histogram::new(BUCKETS);
        registry.register(
            "printloop_dispatch_latency_seconds",
            "From queued to start command sent",
            dispatch.clone(),
        );
        let counters: [Counter; 11] = Default::default();
        for ((name, help), c) in COUNTERS.iter().zip(&counters) {
            registry.register(*name, help.trim_end_matches('.'), c.clone());
        }
        let epoch = Gauge::default();
        registry.register(
            "printloop_supervisor_epoch",
            "The supervisor's connection epoch",
            epoch.clone(),
        );
        Self {
            registry,
            printers,
            phases,
            held,
            jobs,
            dispatch,
            counters,
            epoch,
        }
    }

    /// Sets every metric from the machine; `latencies_ms` are new dispatch samples.
    pub fn update(&self, sup: &Supervisor, latencies_ms: Vec<u64>) {
        let printers = sup.printer_summaries();
        let count = |f: &dyn Fn(&protocol::api::PrinterSummary) -> bool| {
            printers.iter().filter(|p| f(p)).count() as i64
        };
        for (label, n) in [
            (
                "online",
                count(&|p| p.presence == Presence::Online && !p.stale),
            ),
            (
                "stale",
                count(&|p| p.presence == Presence::Online && p.stale),
            ),
            ("offline", count(&|p| p.presence == Presence::Offline)),
        ] {
            self.printers
                .get_or_create(&vec![("presence", label)])
                .set(n);
        }
        for (phase, label) in PHASES {
            self.phases
                .get_or_create(&vec![("phase", label)])
                .set(count(&|p| p.phase == phase));
        }
        self.held.set(count(&|p| p.held));
        for (state, label) in STATES {
            let n = sup.jobs().filter(|j| j.state == state).count() as i64;
            self.jobs.get_or_create(&vec![("state", label)]).set(n);
        }
        for ms in latencies_ms {
            self.dispatch.observe(ms as f64 / 1000.0);
        }
        let c = sup.counters();
        let values = [
            c.reconciliations,
            c.command_retries,
            c.starts_sent,
            c.rebirths,
            c.rejected_messages,
            c.refused_pulls,
            c.foreign_jobs,
            c.busy_requests,
            c.busy_commands,
            c.report_resets,
            c.jobs_archived,
        ];
        for (counter, v) in self.counters.iter().zip(values) {
            counter
                .inner()
                .store(v, std::sync::atomic::Ordering::Relaxed);
        }
        self.epoch.set(sup.epoch() as i64);
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics do not encode");
        }
        out
    }
}

/// `GET /metrics`: open on a loopback listener (Prometheus on the same host), a viewer's token
/// beyond it.
pub(crate) async fn serve(State(app): State<App>, req: Request) -> Response {
    if !app.loopback {
        let (parts, _) = req.into_parts();
        if let Err(e) = super::auth::principal(&app, &parts) {
            return e.into_response();
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}
