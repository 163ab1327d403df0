//! A diligent operator, as a pure model: given the dashboard (the API's printer and job lists),
//! what a careful person at the farm does next. It releases printers the circuit breaker holds,
//! clears every bed that is done (a print whose job did not finish, or a printer that halted, is
//! judged failed, so its job is requeued), and keeps a few jobs waiting. `printloop demo`,
//! `printloop chaos` / `adversary` and the deterministic simulation all run this one model; each
//! only carries the acts out over its own channel. It never acts twice on the same sight within
//! [`Diligent::PAUSE_MS`] (the dashboard lags the acts).

use std::collections::HashMap;

use protocol::api::{ApiOp, BedClear, JobState, JobSummary, PrinterArgs, PrinterSummary};
use protocol::presence::Presence;
use protocol::state::PrinterPhase;
use protocol::{JobId, PrinterId};

/// One thing the operator does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Act {
    /// Releases a printer the circuit breaker holds.
    Release(PrinterId),
    /// Takes the print off the bed (or confirms it empty), judging it.
    ClearBed {
        /// The printer.
        printer: PrinterId,
        /// The print is bad: its job is requeued.
        failed: bool,
        /// The job whose print comes off, if any.
        job: Option<JobId>,
    },
}

impl Act {
    /// The API request that carries the act out.
    pub fn op(&self) -> ApiOp {
        match self {
            Act::Release(p) => ApiOp::ReleasePrinter(PrinterArgs {
                printer_id: p.clone(),
            }),
            Act::ClearBed {
                printer, failed, ..
            } => ApiOp::BedClear(BedClear {
                printer_id: printer.clone(),
                failed: *failed,
            }),
        }
    }

    /// The printer it is about.
    pub fn printer(&self) -> &PrinterId {
        match self {
            Act::Release(p) | Act::ClearBed { printer: p, .. } => p,
        }
    }
}

/// The operator's memory: what it acted on, and when (milliseconds on any monotonic clock).
#[derive(Debug, Clone, Default)]
pub struct Diligent {
    acted: HashMap<(PrinterId, PrinterPhase, Option<JobId>, bool), u64>,
}

impl Diligent {
    /// The operator does not act again on the same sight (printer, phase, job) this soon.
    pub const PAUSE_MS: u64 = 3_000;

    /// A new operator.
    pub fn new() -> Self {
        Self::default()
    }

    /// What to do now, given the dashboard. Only printers that are online and reporting are
    /// looked at: a person does not clear a bed they are not told about.
    pub fn round(
        &mut self,
        now_ms: u64,
        printers: &[PrinterSummary],
        jobs: &[JobSummary],
    ) -> Vec<Act> {
        self.round_with(now_ms, printers, |id| {
            jobs.iter().find(|j| &j.job_id == id).map(|j| j.state)
        })
    }

    /// [`Diligent::round`] with the jobs' states from `state_of`.
    pub fn round_with(
        &mut self,
        now_ms: u64,
        printers: &[PrinterSummary],
        state_of: impl Fn(&JobId) -> Option<JobState>,
    ) -> Vec<Act> {
        let mut acts = Vec::new();
        for p in printers {
            if p.presence != Presence::Online || p.stale {
                continue;
            }
            if p.held && self.fresh(now_ms, p, true) {
                acts.push(Act::Release(p.printer_id.clone()));
            }
            let failed = match p.phase {
                PrinterPhase::Idle => false,
                PrinterPhase::Finished => {
                    p.job_id.as_ref().and_then(&state_of) != Some(JobState::Finished)
                }
                PrinterPhase::Halted | PrinterPhase::Error => true,
                _ => continue,
            };
            if self.fresh(now_ms, p, false) {
                acts.push(Act::ClearBed {
                    printer: p.printer_id.clone(),
                    failed,
                    job: p.job_id.clone(),
                });
            }
        }
        acts
    }

    /// How many jobs to submit so that `waiting` are queued or assigned.
    pub fn to_submit(jobs: &[JobSummary], waiting: usize) -> usize {
        let queued = jobs
            .iter()
            .filter(|j| matches!(j.state, JobState::Queued | JobState::Assigned))
            .count();
        waiting.saturating_sub(queued)
    }

    /// Not acted on this sight within the pause; if so, remembers acting now.
    fn fresh(&mut self, now_ms: u64, p: &PrinterSummary, release: bool) -> bool {
        let key = (p.printer_id.clone(), p.phase, p.job_id.clone(), release);
        if self
            .acted
            .get(&key)
            .is_some_and(|t| now_ms < t + Self::PAUSE_MS)
        {
            return false;
        }
        self.acted.insert(key, now_ms);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn printer(id: &str, phase: PrinterPhase, job: Option<&str>, held: bool) -> PrinterSummary {
        PrinterSummary {
            printer_id: PrinterId::new(id).expect("id"),
            presence: Presence::Online,
            stale: false,
            phase,
            job_id: job.map(|j| JobId::new(j).expect("id")),
            progress_pct: None,
            held,
            consecutive_failures: 0,
            enrolled: true,
        }
    }

    fn job(id: &str, state: JobState) -> JobSummary {
        JobSummary {
            job_id: JobId::new(id).expect("id"),
            name: "f".into(),
            sha256: protocol::Sha256Hex::digest(b"x"),
            state,
            priority: 0,
            printer_id: None,
            progress_pct: None,
            submitted_at_ms: 0,
            started_at_ms: None,
            ended_at_ms: None,
            reason: None,
        }
    }

    #[test]
    fn clears_done_beds_judging_them_releases_held_printers_and_waits_between_acts() {
        let mut op = Diligent::new();
        let printers = vec![
            printer("p0", PrinterPhase::Finished, Some("j1"), false),
            printer("p1", PrinterPhase::Finished, Some("j2"), true),
            printer("p2", PrinterPhase::Printing, Some("j3"), false),
            printer("p3", PrinterPhase::Halted, None, false),
        ];
        let jobs = vec![
            job("j1", JobState::Finished),
            job("j2", JobState::Interrupted),
            job("j3", JobState::Printing),
            job("j4", JobState::Queued),
        ];
        let acts = op.round(0, &printers, &jobs);
        let cleared: Vec<(&str, bool)> = acts
            .iter()
            .filter_map(|a| match a {
                Act::ClearBed {
                    printer, failed, ..
                } => Some((printer.as_str(), *failed)),
                Act::Release(_) => None,
            })
            .collect();
        assert_eq!(cleared, vec![("p0", false), ("p1", true), ("p3", true)]);
        assert!(acts.contains(&Act::Release(PrinterId::new("p1").expect("id"))));
        assert!(
            op.round(1_000, &printers, &jobs).is_empty(),
            "not twice at once"
        );
        assert_eq!(op.round(3_000, &printers, &jobs).len(), acts.len());
        assert_eq!(Diligent::to_submit(&jobs, 3), 2);
        let mut away = printers[0].clone();
        away.stale = true;
        assert!(Diligent::new().round(0, &[away], &jobs).is_empty());
    }
}
