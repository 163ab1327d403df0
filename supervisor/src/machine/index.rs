//! Indexes over the fleet, kept up to date from what the tables say changed
//! ([`super::tracked`]), so that the passes made after every batch cost what the batch
//! changed, not the fleet's size (issue #13: at 10 000 printers the per-printer timer scans
//! alone were 56 % of the supervisor's CPU).
//!
//! - **Timers**: each printer's earliest armed timer, ordered by when.
//! - **Dispatch**: the queued jobs in dispatch order (priority, then submission) and how many
//!   ask for each list of tags, the assigned jobs (the only ones that can be orphaned), and the printers free now and free
//!   once their bed is cleared.
//! - **Pending starts** to mirror into the printers' records.
//!
//! A printer's timers read its assigned job and three fleet-wide values (connected, and the
//! rebirth pacing); a change of the job re-indexes the printer, a change of those values
//! re-indexes everyone. Debug builds check every answer against a full scan.

use super::tracked::Changed;
use super::*;

/// The fleet-wide values printer timers read.
type TimerContext = (bool, u32, u64);

#[derive(Debug, Default)]
pub(super) struct Indexes {
    /// Each printer's earliest armed timer (monotonic ms), and the same ordered by when.
    due: HashMap<PrinterId, u64>,
    by_due: BTreeSet<(u64, PrinterId)>,
    /// The job each printer's timers read (its assigned job), and back.
    reads: HashMap<PrinterId, JobId>,
    read_by: HashMap<JobId, BTreeSet<PrinterId>>,
    /// The fleet-wide values the timers were computed with.
    context: Option<TimerContext>,
    /// Queued jobs in dispatch order: (-priority, seq, id).
    pub(super) queued: BTreeSet<(i32, u64, JobId)>,
    queued_key: HashMap<JobId, (i32, u64, Vec<String>)>,
    /// How many queued jobs ask for each list of tags: dispatch skips the lists no free
    /// printer accepts, and stops once no job it could place is left.
    pub(super) queued_tags: BTreeMap<Vec<String>, usize>,
    /// Jobs in state `Assigned`.
    pub(super) assigned: BTreeSet<JobId>,
    /// Printers that can take a job now / once their bed is cleared ([`Supervisor::is_free`]).
    pub(super) free_now: BTreeSet<PrinterId>,
    pub(super) free_later: BTreeSet<PrinterId>,
    /// Printers whose pending start may differ from their record's (changed since the last
    /// `persist_pending_starts`); `None`: all.
    pub(super) unpersisted: Option<BTreeSet<PrinterId>>,
}

impl Indexes {
    /// The printers whose record holds `job` as assigned.
    pub(super) fn printers_holding<'a>(
        &'a self,
        job: &JobId,
    ) -> impl Iterator<Item = &'a PrinterId> + 'a {
        self.read_by.get(job).into_iter().flatten()
    }
}

impl Supervisor {
    /// Brings the indexes up to date with the tables' changes.
    pub(super) fn refresh_indexes(&mut self) {
        let printers = self.printers.take_changed();
        let jobs = self.jobs.take_changed();
        match &jobs {
            Changed::All => {
                self.idx.queued.clear();
                self.idx.queued_key.clear();
                self.idx.queued_tags.clear();
                self.idx.assigned.clear();
                let ids: Vec<JobId> = self.jobs.keys().cloned().collect();
                for id in &ids {
                    self.reindex_job(id);
                }
            }
            Changed::Some(ids) => {
                for id in ids {
                    self.reindex_job(id);
                }
            }
        }
        let context = (
            self.connected,
            self.rebirths_in_slot,
            self.rebirth_slot_mono,
        );
        let everyone = matches!(printers, Changed::All)
            || matches!(jobs, Changed::All)
            || self.idx.context != Some(context);
        if everyone {
            self.idx.due.clear();
            self.idx.by_due.clear();
            self.idx.reads.clear();
            self.idx.read_by.clear();
            self.idx.free_now.clear();
            self.idx.free_later.clear();
            let ids: Vec<PrinterId> = self.printers.keys().cloned().collect();
            for id in &ids {
                self.reindex_printer(id);
            }
            self.idx.unpersisted = None;
        } else {
            let (Changed::Some(mut todo), Changed::Some(job_ids)) = (printers, jobs) else {
                unreachable!("`everyone` covers All");
            };
            for job in &job_ids {
                if let Some(ps) = self.idx.read_by.get(job) {
                    todo.extend(ps.iter().cloned());
                }
            }
            for id in &todo {
                self.reindex_printer(id);
            }
            if let Some(u) = self.idx.unpersisted.as_mut() {
                u.extend(todo);
            }
        }
        self.idx.context = Some(context);
    }

    fn reindex_job(&mut self, id: &JobId) {
        if let Some((prio, seq, tags)) = self.idx.queued_key.remove(id) {
            self.idx.queued.remove(&(prio, seq, id.clone()));
            if let Some(n) = self.idx.queued_tags.get_mut(&tags) {
                *n -= 1;
                if *n == 0 {
                    self.idx.queued_tags.remove(&tags);
                }
            }
        }
        self.idx.assigned.remove(id);
        let Some(j) = self.jobs.get(id) else {
            return;
        };
        match j.state {
            JobState::Queued => {
                let (prio, seq) = (-j.priority, j.seq);
                self.idx.queued.insert((prio, seq, id.clone()));
                *self.idx.queued_tags.entry(j.tags.clone()).or_default() += 1;
                self.idx
                    .queued_key
                    .insert(id.clone(), (prio, seq, j.tags.clone()));
            }
            JobState::Assigned => {
                self.idx.assigned.insert(id.clone());
            }
            _ => {}
        }
    }

    fn reindex_printer(&mut self, id: &PrinterId) {
        if let Some(due) = self.idx.due.remove(id) {
            self.idx.by_due.remove(&(due, id.clone()));
        }
        if let Some(job) = self.idx.reads.remove(id) {
            if let Some(ps) = self.idx.read_by.get_mut(&job) {
                ps.remove(id);
                if ps.is_empty() {
                    self.idx.read_by.remove(&job);
                }
            }
        }
        self.idx.free_now.remove(id);
        self.idx.free_later.remove(id);
        let Some(p) = self.printers.get(id) else {
            return;
        };
        let due = self.printer_timer_due(p);
        let reads = p.rec.assigned.clone();
        let (now, later) = (Self::is_free(p, true), Self::is_free(p, false));
        if let Some(due) = due {
            self.idx.due.insert(id.clone(), due);
            self.idx.by_due.insert((due, id.clone()));
        }
        if let Some(job) = reads {
            self.idx
                .read_by
                .entry(job.clone())
                .or_default()
                .insert(id.clone());
            self.idx.reads.insert(id.clone(), job);
        }
        if now {
            self.idx.free_now.insert(id.clone());
        }
        if later {
            self.idx.free_later.insert(id.clone());
        }
    }

    /// Whether the indexes are current (no change since the last refresh).
    pub(super) fn indexes_current(&self) -> bool {
        !self.printers.has_changes()
            && !self.jobs.has_changes()
            && self.idx.context
                == Some((
                    self.connected,
                    self.rebirths_in_slot,
                    self.rebirth_slot_mono,
                ))
    }

    /// The earliest armed printer timer of the fleet (indexes current).
    pub(super) fn first_printer_due(&self) -> Option<u64> {
        self.idx.by_due.first().map(|(due, _)| *due)
    }

    /// Printers with a timer due at `mono_ms` (indexes current), in id order.
    pub(super) fn printers_due(&self, mono_ms: u64) -> Vec<PrinterId> {
        let mut ids: Vec<PrinterId> = self
            .idx
            .by_due
            .iter()
            .take_while(|(due, _)| *due <= mono_ms)
            .map(|(_, id)| id.clone())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Checks the indexes against full scans (debug builds: every test and simulation).
    #[cfg(debug_assertions)]
    pub(super) fn check_indexes(&self) {
        if !self.indexes_current() {
            return;
        }
        let mut queued: Vec<(i32, u64, JobId)> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Queued)
            .map(|j| (-j.priority, j.seq, j.job_id.clone()))
            .collect();
        queued.sort();
        assert_eq!(
            queued,
            self.idx.queued.iter().cloned().collect::<Vec<_>>(),
            "queued index"
        );
        let mut tags: BTreeMap<Vec<String>, usize> = BTreeMap::new();
        for j in self.jobs.values().filter(|j| j.state == JobState::Queued) {
            *tags.entry(j.tags.clone()).or_default() += 1;
        }
        assert_eq!(tags, self.idx.queued_tags, "queued tags index");
        let assigned: BTreeSet<JobId> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Assigned)
            .map(|j| j.job_id.clone())
            .collect();
        assert_eq!(assigned, self.idx.assigned, "assigned index");
        for (id, p) in self.printers.iter() {
            assert_eq!(
                self.printer_timer_due(p),
                self.idx.due.get(id).copied(),
                "timer index of {id}"
            );
            assert_eq!(
                Self::is_free(p, true),
                self.idx.free_now.contains(id),
                "free-now index of {id}"
            );
            assert_eq!(
                Self::is_free(p, false),
                self.idx.free_later.contains(id),
                "free-later index of {id}"
            );
        }
        assert_eq!(self.idx.due.len(), self.idx.by_due.len());
    }
}
