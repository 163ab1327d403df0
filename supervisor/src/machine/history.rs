//! History retention: ended jobs are archived and leave the store once there are more than
//! `keep_jobs` of them or they ended more than `keep_days` ago, so the store, the machine's
//! memory and every scan of the jobs stay bounded however long a farm runs. Archived jobs are
//! not lost: the shell appends them to `<data_dir>/history/<YYYY-MM>.jsonl` (one job per line)
//! **before** it commits their removal.

use super::*;

/// How often retention looks at the jobs (monotonic ms): it scans every job, and a farm ends a
/// few jobs a minute.
pub(super) const HISTORY_EVERY_MS: u64 = 60_000;

impl Supervisor {
    /// Archives and removes the ended jobs beyond the retention: the oldest first (by when
    /// they ended). A job stays while anything still refers to it: a printer's assignment, the
    /// printer's current report, or an open job that re-runs it.
    pub(super) fn prune_history(&mut self, now: Now, out: &mut Vec<Output>) {
        self.history_checked_mono = Some(now.mono_ms);
        let keep = &self.cfg.history;
        let in_use: BTreeSet<&JobId> = self
            .printers
            .values()
            .flat_map(|p| {
                let reported = p
                    .state
                    .as_ref()
                    .and_then(|s| s.job.as_ref())
                    .map(|j| &j.job_id);
                p.rec.assigned.iter().chain(reported)
            })
            .chain(
                self.jobs
                    .values()
                    .filter(|j| !ended(j.state))
                    .filter_map(|j| j.retry_of.as_ref()),
            )
            .collect();
        let mut candidates: Vec<(u64, &JobId)> = self
            .jobs
            .values()
            .filter(|j| ended(j.state) && !in_use.contains(&j.job_id))
            .map(|j| (j.ended_at_ms.unwrap_or(j.submitted_at_ms), &j.job_id))
            .collect();
        let over = candidates.len().saturating_sub(keep.keep_jobs);
        let cutoff = now
            .unix_ms
            .saturating_sub(u64::from(keep.keep_days) * 86_400_000);
        candidates.sort_unstable();
        let gone: Vec<JobId> = candidates
            .iter()
            .enumerate()
            .take_while(|(i, (at, _))| *i < over || *at < cutoff)
            .map(|(_, (_, id))| (*id).clone())
            .collect();
        if gone.is_empty() {
            return;
        }
        let kept = candidates.len() - gone.len();
        let archived: Vec<JobRecord> = gone.iter().filter_map(|id| self.jobs.remove(id)).collect();
        for id in &gone {
            self.queued_since_mono.remove(id);
        }
        self.counters.jobs_archived += archived.len() as u64;
        tracing::info!(jobs = archived.len(), kept, "ended jobs archived");
        out.push(Output::Archive(archived));
        out.push(Output::Persist(
            gone.into_iter().map(Mutation::RemoveJob).collect(),
        ));
    }
}

/// A job whose story is over: nothing in the fleet will change it again unless an operator
/// requeues it (a finished job is not: its printer waits for a bed clear).
fn ended(s: JobState) -> bool {
    matches!(
        s,
        JobState::Done
            | JobState::Cancelled
            | JobState::Failed
            | JobState::Interrupted
            | JobState::TimedOut
    )
}
