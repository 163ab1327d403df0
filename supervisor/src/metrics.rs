//! Prometheus metrics: rendered from the machine once a second, served by a tiny HTTP task
//! that never touches the machine.

use std::fmt::Write as _;

use protocol::api::JobState;
use protocol::presence::Presence;
use protocol::state::PrinterPhase;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::machine::{Now, Supervisor};

/// Dispatch latency histogram bucket bounds, seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The metrics state kept between renders.
#[derive(Debug, Default)]
pub struct Metrics {
    counts: [u64; BUCKETS.len()],
    total: u64,
    sum_s: f64,
}

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

impl Metrics {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds dispatch latency samples (milliseconds).
    pub fn observe(&mut self, samples_ms: Vec<u64>) {
        for ms in samples_ms {
            let s = ms as f64 / 1000.0;
            self.total += 1;
            self.sum_s += s;
            for (i, b) in BUCKETS.iter().enumerate() {
                if s <= *b {
                    self.counts[i] += 1;
                }
            }
        }
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self, sup: &Supervisor, now: Now) -> String {
        let mut o = String::new();
        let printers = sup.printer_summaries();
        let _ = writeln!(
            o,
            "# HELP printloop_printers Printers by presence (stale: online but silent)."
        );
        let _ = writeln!(o, "# TYPE printloop_printers gauge");
        for (label, f) in [
            (
                "online",
                &(|p: &protocol::api::PrinterSummary| p.presence == Presence::Online && !p.stale)
                    as &dyn Fn(&protocol::api::PrinterSummary) -> bool,
            ),
            ("stale", &|p: &protocol::api::PrinterSummary| {
                p.presence == Presence::Online && p.stale
            }),
            ("offline", &|p: &protocol::api::PrinterSummary| {
                p.presence == Presence::Offline
            }),
        ] {
            let n = printers.iter().filter(|p| f(p)).count();
            let _ = writeln!(o, "printloop_printers{{presence=\"{label}\"}} {n}");
        }
        let _ = writeln!(o, "# HELP printloop_printers_phase Printers by phase.");
        let _ = writeln!(o, "# TYPE printloop_printers_phase gauge");
        for (phase, label) in PHASES {
            let n = printers.iter().filter(|p| p.phase == phase).count();
            let _ = writeln!(o, "printloop_printers_phase{{phase=\"{label}\"}} {n}");
        }
        let _ = writeln!(
            o,
            "# HELP printloop_printers_held Printers held out of dispatch by the circuit breaker."
        );
        let _ = writeln!(o, "# TYPE printloop_printers_held gauge");
        let _ = writeln!(
            o,
            "printloop_printers_held {}",
            printers.iter().filter(|p| p.held).count()
        );
        let _ = writeln!(o, "# HELP printloop_jobs Jobs by state.");
        let _ = writeln!(o, "# TYPE printloop_jobs gauge");
        for (state, label) in STATES {
            let n = sup.jobs().filter(|j| j.state == state).count();
            let _ = writeln!(o, "printloop_jobs{{state=\"{label}\"}} {n}");
        }
        let _ = writeln!(
            o,
            "# HELP printloop_dispatch_latency_seconds From queued to start command sent."
        );
        let _ = writeln!(o, "# TYPE printloop_dispatch_latency_seconds histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "printloop_dispatch_latency_seconds_bucket{{le=\"{b}\"}} {}",
                self.counts[i]
            );
        }
        let _ = writeln!(
            o,
            "printloop_dispatch_latency_seconds_bucket{{le=\"+Inf\"}} {}",
            self.total
        );
        let _ = writeln!(o, "printloop_dispatch_latency_seconds_sum {}", self.sum_s);
        let _ = writeln!(o, "printloop_dispatch_latency_seconds_count {}", self.total);
        let c = sup.counters();
        for (name, help, v) in [
            (
                "printloop_reconciliations_total",
                "Reconciliations that changed the supervisor's view.",
                c.reconciliations,
            ),
            (
                "printloop_command_retries_total",
                "Start commands sent again.",
                c.command_retries,
            ),
            (
                "printloop_starts_total",
                "Start commands sent.",
                c.starts_sent,
            ),
            (
                "printloop_rebirths_total",
                "Rebirth requests sent.",
                c.rebirths,
            ),
            (
                "printloop_rejected_messages_total",
                "Messages that failed to decode.",
                c.rejected_messages,
            ),
            (
                "printloop_refused_file_requests_total",
                "File requests from a printer with no job waiting for that file.",
                c.refused_pulls,
            ),
            (
                "printloop_foreign_jobs_total",
                "Jobs seen running on a printer other than the one they were placed on.",
                c.foreign_jobs,
            ),
            (
                "printloop_busy_requests_total",
                "API requests answered busy: their client sent more than its rate.",
                c.busy_requests,
            ),
            (
                "printloop_busy_commands_total",
                "Commands a gateway answered busy (sent again when it said).",
                c.busy_commands,
            ),
            (
                "printloop_report_resets_total",
                "Printers whose reports were followed again after a forged or impossible epoch or seq.",
                c.report_resets,
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} counter");
            let _ = writeln!(o, "{name} {v}");
        }
        let _ = writeln!(
            o,
            "# HELP printloop_supervisor_epoch The supervisor's connection epoch."
        );
        let _ = writeln!(o, "# TYPE printloop_supervisor_epoch gauge");
        let _ = writeln!(o, "printloop_supervisor_epoch {}", sup.epoch());
        let _ = now;
        o
    }
}

/// Serves `GET /metrics` (anything else: 404) from the latest rendering.
pub async fn serve(listener: tokio::net::TcpListener, rendered: watch::Receiver<String>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let body = rendered.borrow().clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let head = String::from_utf8_lossy(&buf[..n]);
            let ok = head.starts_with("GET /metrics ");
            let (status, body) = if ok {
                ("200 OK", body)
            } else {
                ("404 Not Found", "only /metrics is here\n".to_owned())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
