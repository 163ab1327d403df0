//! The queue snapshot: the retained `supervisor/queue` message, rate-limited, and the job
//! summaries it and the API list are made of.

use super::*;

impl Supervisor {
    /// Publishes the retained queue snapshot (timer `Queue`: at most once per
    /// `queue_min_interval_ms`, when something changed).
    pub(super) fn publish_queue(&mut self, now: Now, out: &mut Vec<Output>) {
        self.queue_seq += 1;
        let snap = self.queue_snapshot(now);
        self.publish(out, self.topic(Topic::Queue), snap.encode(), true);
        self.queue_dirty = false;
        self.last_queue_mono = Some(now.mono_ms);
    }

    /// The queue snapshot as it is now.
    pub fn queue_snapshot(&self, now: Now) -> QueueSnapshot {
        let counts = self.queue_counts();
        let mut open: Vec<&JobRecord> = self.jobs.values().filter(|j| j.is_open()).collect();
        open.sort_by_key(|j| (j.state != JobState::Queued, -j.priority, j.seq));
        let truncated = open.len() > 100;
        QueueSnapshot {
            v: Version,
            epoch: self.epoch,
            seq: self.queue_seq,
            at_ms: now.unix_ms,
            counts,
            jobs: open.into_iter().take(100).map(summary).collect(),
            truncated,
        }
    }

    /// Job counts by state, over every job that is not done or cancelled.
    pub fn queue_counts(&self) -> QueueCounts {
        let mut counts = QueueCounts::default();
        for j in self.jobs.values().filter(|j| j.is_open()) {
            match j.state {
                JobState::Queued => counts.queued += 1,
                JobState::Assigned | JobState::Transferring | JobState::Starting => {
                    counts.starting += 1
                }
                JobState::Printing | JobState::Paused => counts.printing += 1,
                JobState::Finished => counts.awaiting_harvest += 1,
                JobState::Failed | JobState::Interrupted | JobState::TimedOut => {
                    counts.attention += 1
                }
                JobState::Done | JobState::Cancelled => {}
            }
        }
        counts
    }

    // ----- operator API -----

    pub(super) fn summary(&self, p: &PrinterView) -> PrinterSummary {
        let job = p.state.as_ref().and_then(|s| s.job.as_ref());
        PrinterSummary {
            printer_id: p.rec.printer_id.clone(),
            presence: p.presence,
            stale: p.stale,
            phase: p.phase().unwrap_or(PrinterPhase::Disconnected),
            job_id: job
                .map(|j| j.job_id.clone())
                .or_else(|| p.rec.assigned.clone()),
            progress_pct: job.map(|j| j.progress_pct),
            held: p.rec.held,
            consecutive_failures: p.rec.consecutive_failures,
            enrolled: p.enrolled,
        }
    }
}

/// Keeps the `k` first of `v` by `key`, in order: a partial selection, then a sort of only
/// those (the keys end in a job's unique `seq`, so the order is total).
pub(super) fn first_sorted<T, K: Ord>(v: &mut Vec<T>, k: usize, mut key: impl FnMut(&T) -> K) {
    if k == 0 {
        v.clear();
        return;
    }
    if v.len() > k {
        v.select_nth_unstable_by_key(k - 1, &mut key);
        v.truncate(k);
    }
    v.sort_unstable_by_key(key);
}

pub(super) fn summary(j: &JobRecord) -> JobSummary {
    JobSummary {
        job_id: j.job_id.clone(),
        name: j.name.clone(),
        sha256: j.sha256.clone(),
        state: j.state,
        priority: j.priority,
        printer_id: j.printer.clone(),
        progress_pct: j.progress_pct,
        submitted_at_ms: j.submitted_at_ms,
        started_at_ms: j.started_at_ms,
        ended_at_ms: j.ended_at_ms,
        reason: j.reason.clone(),
    }
}

#[cfg(test)]
mod first_sorted_tests {
    use super::first_sorted;

    #[test]
    fn keeps_the_k_smallest_in_order_whatever_k() {
        // A shuffled 0..200 (a multiplier coprime with 200).
        let all: Vec<u32> = (0..200u32).map(|i| (i * 77) % 200).collect();
        for k in [0, 1, 2, 50, 199, 200, 500] {
            let mut v = all.clone();
            first_sorted(&mut v, k, |x| *x);
            let want: Vec<u32> = (0..200u32).take(k).collect();
            assert_eq!(v, want, "k = {k}");
        }
        let mut v = all.clone();
        first_sorted(&mut v, 3, |x| std::cmp::Reverse(*x));
        assert_eq!(v, vec![199, 198, 197]);
    }
}
