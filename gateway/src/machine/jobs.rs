//! A job's life after its acceptance: its stage, its start on the printer, and its end recorded in
//! the ledger (which `cmd_start` consults: a job never runs twice) and in `recent_jobs`. Every
//! change is persisted before the event that reports it (persist, then publish).

use protocol::state::{EventKind, JobStage, LedgerEntry};

use crate::store::{LedgerRecord, Mutation};

use super::{Gateway, LinkState, Now, Output, PrinterCommand};

/// Upper bound of `recent_jobs` in the state snapshot.
const RECENT_JOBS: usize = 16;

impl Gateway {
    pub(super) fn set_stage(&mut self, stage: JobStage) -> Vec<Mutation> {
        let Some(job) = &mut self.current else {
            return vec![];
        };
        job.stage = stage;
        self.state_dirty = true;
        vec![Mutation::SetCurrent(Some(job.clone()))]
    }

    /// Ends the current job with `outcome`: ledger, current job and event, durably.
    pub(super) fn end_job(
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

    pub(super) fn printing(&self) -> bool {
        self.current
            .as_ref()
            .is_some_and(|j| matches!(j.stage, JobStage::Printing | JobStage::Paused))
    }

    pub(super) fn start_stream(&mut self, now: Now, out: &mut Vec<Output>) {
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
}
