//! Reports and reconciliation: what a printer says (status, meta, state, events, command
//! results) against what the supervisor believes. The printer's report wins for what happened on
//! the printer; a job ends only by the word of the printer it was placed on.

use protocol::web::{WebhookEvent, WebhookKind};

use super::*;

impl Supervisor {
    pub(super) fn on_status(&mut self, now: Now, id: PrinterId, s: Status, out: &mut Vec<Output>) {
        let p = self.printer_mut(now, &id, out);
        if s.epoch < p.status_epoch {
            tracing::debug!(printer = %id, epoch = s.epoch, "late status of an older epoch ignored");
            return;
        }
        if s.presence == Presence::Offline && s.epoch < p.status_epoch {
            return;
        }
        let was = p.presence;
        p.status_epoch = s.epoch;
        p.presence = s.presence;
        if was != s.presence {
            let text = match s.presence {
                Presence::Online => "online",
                Presence::Offline => "offline",
            };
            p.activity.push(now.unix_ms, "presence", text.to_owned());
        }
        match s.presence {
            Presence::Online => {
                p.online_since_mono = now.mono_ms;
                if was != Presence::Online {
                    tracing::info!(printer = %id, epoch = s.epoch, "printer online");
                }
            }
            Presence::Offline => {
                p.silent_since_mono.get_or_insert(now.mono_ms);
                if was != Presence::Offline {
                    tracing::warn!(printer = %id, epoch = s.epoch, "printer offline");
                }
            }
        }
        self.queue_dirty = true;
    }

    pub(super) fn on_meta(&mut self, now: Now, id: PrinterId, m: Meta, out: &mut Vec<Output>) {
        let p = self.printer_mut(now, &id, out);
        if p.rec.tags != m.tags {
            p.rec.tags = m.tags.clone();
            let rec = p.rec.clone();
            out.push(Output::Persist(vec![Mutation::PutPrinter(rec)]));
        }
        if p.meta.as_ref() != Some(&m) {
            p.meta = Some(m);
            self.ha_dirty.insert(id);
        }
    }

    pub(super) fn on_state(
        &mut self,
        now: Now,
        id: PrinterId,
        s: StateSnapshot,
        out: &mut Vec<Output>,
    ) {
        let p = self.printer_mut(now, &id, out);
        let not_newer = p
            .state
            .as_ref()
            .is_some_and(|have| (s.epoch, s.seq) <= (have.epoch, have.seq));
        let below_offline = s.epoch < p.status_epoch && p.presence == Presence::Offline;
        if not_newer || below_offline {
            // A duplicate, an old retained copy, a late report of a dead connection — or the
            // live printer, below a mark that was forged (a `state` with a huge `seq`, an
            // `offline` with a huge epoch) or is otherwise impossible. A stream of them is the
            // live printer: follow it again, without a restart.
            if !p.behind_is_live(&s, now) {
                if not_newer {
                    return;
                }
            } else {
                tracing::warn!(
                    printer = %id,
                    epoch = s.epoch,
                    seq = s.seq,
                    held_epoch = p.state.as_ref().map_or(p.status_epoch, |h| h.epoch).max(p.status_epoch),
                    "this printer's live reports are below what was taken for its latest (a forged or \
                     impossible epoch or seq): following the live reports again"
                );
                self.counters.report_resets += 1;
                let p = self.printers.get_mut(&id).expect("known");
                p.behind = None;
                p.state = None;
                p.status_epoch = s.epoch;
                p.presence = Presence::Online;
                p.online_since_mono = now.mono_ms;
                p.last_event = p.last_event.min((s.epoch, s.seq));
            }
        }
        let p = self.printers.get_mut(&id).expect("known");
        if !not_newer && !below_offline {
            p.behind = None;
        }
        if s.epoch > p.status_epoch {
            // A state of a newer connection is proof of life even before its status arrives.
            p.status_epoch = s.epoch;
            p.presence = Presence::Online;
        }
        if p.stale {
            tracing::info!(printer = %id, "printer is reporting again");
        }
        p.stale = false;
        p.silent_since_mono = None;
        p.last_state_mono = Some(now.mono_ms);
        let was = p.phase();
        p.state = Some(s.clone());
        if s.phase == PrinterPhase::Halted && was != Some(PrinterPhase::Halted) {
            let mut n = notice(WebhookKind::PrinterHalted, s.at_ms, &id, None);
            // Stable across a restart that reads the same report again.
            n.id = format!("printer.halted:{id}:{}:{}", s.epoch, s.seq);
            n.reason = s.error.clone();
            out.push(Output::Notify(n));
        }
        // A refused start is settled by the first report made after the refusal.
        if let Some(x) = &p.pending {
            if x.refused
                .is_some_and(|(e, at)| (s.epoch, s.at_ms) > (e, at))
            {
                let shows = s.job.as_ref().is_some_and(|j| j.job_id == x.job)
                    || s.recent_jobs.iter().any(|e| e.job_id == x.job);
                if !shows {
                    p.pending = None;
                }
            }
        }
        self.reconcile(now, &id, &s, out);
        self.queue_dirty = true;
    }

    pub(super) fn on_event(&mut self, now: Now, id: PrinterId, e: Event, out: &mut Vec<Output>) {
        let p = self.printer_mut(now, &id, out);
        if (e.epoch, e.seq) <= p.last_event {
            return; // a duplicate (QoS 1 redelivery or an outbox re-send)
        }
        p.last_event = (e.epoch, e.seq);
        p.activity.push(
            e.at_ms,
            "event",
            super::dashboard::describe("kind", &e.event),
        );
        match e.event {
            EventKind::JobEnded {
                job_id,
                outcome,
                line,
                reason,
            } => {
                tracing::info!(printer = %id, job = %job_id, ?outcome, line, "job ended (event)");
                self.apply_outcome(now, &id, &job_id, outcome, reason, Some(e.at_ms), out);
            }
            EventKind::JobStarted { job_id } => {
                let mut muts = Vec::new();
                if let Some(j) = self.jobs.get_mut(&job_id) {
                    if matches!(
                        j.state,
                        JobState::Assigned
                            | JobState::Transferring
                            | JobState::Starting
                            | JobState::TimedOut
                    ) && j.printer.as_ref() == Some(&id)
                    {
                        j.state = JobState::Printing;
                        j.started_at_ms = Some(e.at_ms);
                        muts.push(Mutation::PutJob(j.clone()));
                        let n = notice(WebhookKind::JobStarted, e.at_ms, &id, Some(j));
                        out.push(Output::Notify(n));
                    }
                }
                if !muts.is_empty() {
                    out.push(Output::Persist(muts));
                    self.queue_dirty = true;
                }
            }
            EventKind::PrinterError { message, fatal } => {
                tracing::warn!(printer = %id, fatal, %message, "printer error");
            }
            _ => {}
        }
    }

    pub(super) fn on_result(
        &mut self,
        now: Now,
        id: PrinterId,
        r: CommandResult,
        out: &mut Vec<Output>,
    ) {
        let Some(p) = self.printers.get_mut(&id) else {
            return;
        };
        let what = match (&r.reason, r.code) {
            (Some(why), Some(code)) => format!("{} {:?}: {why} ({code:?})", r.id, r.status),
            (Some(why), None) => format!("{} {:?}: {why}", r.id, r.status),
            _ => format!("{} {:?}", r.id, r.status),
        };
        p.activity.push(r.at_ms, "command", what.to_lowercase());
        let Some(pending) = p.pending.clone() else {
            return;
        };
        let latest = pending.command == r.id;
        if !latest && !pending.earlier.contains(&r.id) {
            return;
        }
        match r.status {
            // Refusals of earlier sends say nothing: the latest one is still on its way.
            ResultStatus::Expired | ResultStatus::Error if !latest => {}
            ResultStatus::Ok => {
                tracing::info!(printer = %id, job = %pending.job, "start accepted");
                p.pending = None;
                let mut muts = Vec::new();
                if let Some(j) = self.jobs.get_mut(&pending.job) {
                    if j.state == JobState::Assigned {
                        j.state = JobState::Transferring;
                        muts.push(Mutation::PutJob(j.clone()));
                    }
                }
                if !muts.is_empty() {
                    out.push(Output::Persist(muts));
                }
            }
            ResultStatus::Duplicate => {}
            ResultStatus::Busy => {
                // Nothing happened on the printer: send it again when it says.
                self.counters.busy_commands += 1;
                if latest {
                    let wait = r.retry_after_ms.unwrap_or(1_000).clamp(10, 60_000);
                    if let Some(x) = p.pending.as_mut() {
                        x.busy_retry_mono = Some(now.mono_ms + wait);
                    }
                }
            }
            ResultStatus::Expired | ResultStatus::Error => {
                tracing::warn!(printer = %id, job = %pending.job, status = ?r.status, code = ?r.code, reason = r.reason.as_deref().unwrap_or(""), "start refused");
                // The printer's next report tells the truth (an earlier send may have been
                // accepted; a job that already ran shows in its ledger): until it comes, the
                // start stays pending, so the job is not moved. Then it is sent again when
                // the printer is ready, or moved if the printer shows it does not have it.
                if let Some(x) = p.pending.as_mut() {
                    x.refused = Some((r.epoch, r.at_ms));
                }
            }
        }
        self.queue_dirty = true;
    }

    /// Compares a printer's report with what the supervisor believes, and converges.
    pub(super) fn reconcile(
        &mut self,
        now: Now,
        id: &PrinterId,
        s: &StateSnapshot,
        out: &mut Vec<Output>,
    ) {
        // 0. A job recorded finished that is no longer on the printer's bed was harvested there
        // (its bed was cleared by a command this supervisor could not judge, e.g. one sent
        // while it had no state of the printer): it is done.
        let on_bed = s.job.as_ref().map(|j| &j.job_id);
        let mut harvested = Vec::new();
        for entry in &s.recent_jobs {
            if entry.outcome != JobStage::Finished || on_bed == Some(&entry.job_id) {
                continue;
            }
            if let Some(j) = self.jobs.get_mut(&entry.job_id) {
                if j.state == JobState::Finished && j.printer.as_ref() == Some(id) {
                    j.state = JobState::Done;
                    harvested.push(Mutation::PutJob(j.clone()));
                }
            }
        }
        if !harvested.is_empty() {
            self.counters.reconciliations += 1;
            out.push(Output::Persist(harvested));
            self.queue_dirty = true;
        }
        // 1. Jobs that ended on this printer while nobody listened.
        for entry in s.recent_jobs.iter().rev() {
            let Some(j) = self.jobs.get(&entry.job_id) else {
                continue;
            };
            // A cancelled job too: the printer's outcome is recorded and frees the printer.
            let open = active(j.state) || j.state == JobState::Cancelled;
            if open && j.printer.as_ref() == Some(id) {
                self.counters.reconciliations += 1;
                tracing::info!(printer = %id, job = %entry.job_id, outcome = ?entry.outcome, "reconciled: the job ended while we were apart");
                self.apply_outcome(
                    now,
                    id,
                    &entry.job_id.clone(),
                    entry.outcome,
                    None,
                    Some(entry.ended_at_ms),
                    out,
                );
            }
        }
        // 2. The job on the printer now.
        if let Some(pj) = &s.job {
            match self.jobs.get(&pj.job_id).cloned() {
                Some(j) if pj.stage.is_terminal() => {
                    if active(j.state) {
                        self.counters.reconciliations += 1;
                        self.apply_outcome(
                            now,
                            id,
                            &pj.job_id,
                            pj.stage,
                            pj.reason.clone(),
                            pj.ended_at_ms,
                            out,
                        );
                    }
                }
                Some(j) => {
                    if matches!(j.state, JobState::Cancelled) {
                        // The operator cancelled it while the printer could not hear us.
                        self.send(
                            now,
                            id,
                            CommandAction::Cancel(JobRef {
                                job_id: Some(pj.job_id.clone()),
                            }),
                            None,
                            out,
                        );
                    } else if j.state == JobState::Done
                        || j.printer.as_ref() != Some(id) && j.printer.is_some()
                        || j.printer.is_none() && !self.is_enrolled(id)
                    {
                        self.note_foreign(id, &pj.job_id);
                    } else {
                        let state = job_state_of(pj.stage);
                        let starts = matches!(state, JobState::Printing | JobState::Paused)
                            && matches!(
                                j.state,
                                JobState::Assigned
                                    | JobState::Transferring
                                    | JobState::Starting
                                    | JobState::TimedOut
                            );
                        let mut rec = j.clone();
                        let changed = rec.state != state || rec.printer.as_ref() != Some(id);
                        if rec.state != state
                            && !(rec.state == JobState::Assigned && state == JobState::Transferring)
                        {
                            self.counters.reconciliations +=
                                u64::from(rec.state == JobState::TimedOut);
                        }
                        rec.state = state;
                        rec.printer = Some(id.clone());
                        rec.progress_pct = Some(pj.progress_pct);
                        rec.started_at_ms = pj.started_at_ms.or(rec.started_at_ms);
                        rec.reason = None;
                        self.jobs.insert(rec.job_id.clone(), rec.clone());
                        let p = self.printers.get_mut(id).expect("known");
                        if p.pending.as_ref().is_some_and(|x| x.job == rec.job_id) {
                            p.pending = None;
                        }
                        let mut muts = vec![];
                        if changed {
                            muts.push(Mutation::PutJob(rec.clone()));
                        }
                        if starts {
                            // Its `job_started` event is not in (yet, or ever): the report says
                            // it prints.
                            let at = rec.started_at_ms.unwrap_or(now.unix_ms);
                            out.push(Output::Notify(notice(
                                WebhookKind::JobStarted,
                                at,
                                id,
                                Some(&rec),
                            )));
                        }
                        if p.rec.assigned.as_ref() != Some(&rec.job_id) {
                            p.rec.assigned = Some(rec.job_id.clone());
                            muts.push(Mutation::PutPrinter(p.rec.clone()));
                        }
                        if !muts.is_empty() {
                            out.push(Output::Persist(muts));
                        }
                    }
                }
                None => {
                    tracing::warn!(printer = %id, job = %pj.job_id, "printer runs a job this supervisor does not know");
                }
            }
        }
        // 3. A job we assigned that the printer does not show: start it when it is ready.
        // One flagged timed-out before it ever started (the printer went silent with the start
        // unanswered) is assigned again: the printer is back and does not have it, and it never
        // runs a job id twice, so sending the start again is safe.
        let shows = |job: &JobId| {
            s.job.as_ref().is_some_and(|pj| &pj.job_id == job)
                || s.recent_jobs.iter().any(|e| &e.job_id == job)
        };
        // A printer still holding a job that has ended in the supervisor's books (cancelled
        // while the printer could not hear of it, before it ever had it) and that its current
        // report does not show: nothing will ever end it there, so the printer is free again.
        let p = self.printers.get_mut(id).expect("known");
        if let Some(job) = p.rec.assigned.clone() {
            let ended = self.jobs.get(&job).is_none_or(|j| !active(j.state));
            if ended
                && p.pending.as_ref().is_none_or(|x| x.job != job)
                && Self::surely_without(p, &job)
            {
                tracing::info!(printer = %id, job = %job, "reconciled: the printer never had the ended job; it is free");
                p.rec.assigned = None;
                self.counters.reconciliations += 1;
                out.push(Output::Persist(vec![Mutation::PutPrinter(p.rec.clone())]));
                self.queue_dirty = true;
            }
        }
        let p = &self.printers[id];
        if let Some(job) = p.rec.assigned.clone() {
            let stuck = p.reachable()
                && p.pending.as_ref().is_none_or(|x| x.job != job)
                && !shows(&job)
                && self.jobs.get(&job).is_some_and(|j| {
                    j.state == JobState::TimedOut
                        && j.started_at_ms.is_none()
                        && j.printer.as_ref() == Some(id)
                });
            if stuck {
                let j = self.jobs.get_mut(&job).expect("checked");
                j.state = JobState::Assigned;
                j.reason = None;
                self.counters.reconciliations += 1;
                tracing::info!(printer = %id, job = %job, "reconciled: the timed-out job never started; it is assigned again");
                out.push(Output::Persist(vec![Mutation::PutJob(j.clone())]));
                self.queue_dirty = true;
            }
        }
        self.push_start(now, id, out);
    }

    pub(super) fn is_enrolled(&self, id: &PrinterId) -> bool {
        self.enrolled.as_ref().is_none_or(|s| s.contains(id))
    }

    /// A printer reports a job that was not placed on it: counted and logged once per pair.
    pub(super) fn note_foreign(&mut self, printer: &PrinterId, job: &JobId) {
        if self.foreign.insert((printer.clone(), job.clone())) {
            self.counters.foreign_jobs += 1;
            tracing::error!(printer = %printer, job = %job, "a printer reports a job the supervisor placed elsewhere (a replayed start or a forged report?); ignored, counted in printloop_foreign_jobs_total");
        }
    }

    /// Records how a job ended on `printer`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn apply_outcome(
        &mut self,
        now: Now,
        printer: &PrinterId,
        job_id: &JobId,
        stage: JobStage,
        reason: Option<String>,
        ended_at: Option<u64>,
        out: &mut Vec<Output>,
    ) {
        let Some(j) = self.jobs.get_mut(job_id) else {
            return;
        };
        if !active(j.state) && j.state != JobState::Cancelled {
            return;
        }
        if j.printer.as_ref() != Some(printer) {
            // Only the printer a job was placed on says how it ended: an outcome from any other
            // (a forged `job_ended`, an invented printer) changes nothing.
            self.note_foreign(printer, job_id);
            return;
        }
        let new_state = job_state_of(stage);
        if j.state == new_state {
            // Already recorded (an operator's cancel, confirmed now by the printer): the
            // printer is free again all the same.
            if let Some(p) = self.printers.get_mut(printer) {
                if p.rec.assigned.as_ref() == Some(job_id) {
                    p.rec.assigned = None;
                    p.pending = None;
                    out.push(Output::Persist(vec![Mutation::PutPrinter(p.rec.clone())]));
                    self.queue_dirty = true;
                }
            }
            return;
        }
        j.state = new_state;
        j.printer = Some(printer.clone());
        j.ended_at_ms = ended_at;
        if stage == JobStage::Finished {
            j.progress_pct = Some(100.0);
        }
        j.reason = reason;
        let rec = j.clone();
        let kind = match stage {
            JobStage::Finished => Some(WebhookKind::JobFinished),
            JobStage::Failed | JobStage::Interrupted => Some(WebhookKind::JobFailed),
            _ => None,
        };
        let at_ms = ended_at.unwrap_or(now.unix_ms);
        if let Some(kind) = kind {
            out.push(Output::Notify(notice(kind, at_ms, printer, Some(&rec))));
        }
        out.push(Output::Notify(notice(
            WebhookKind::AwaitingBedClear,
            at_ms,
            printer,
            Some(&rec),
        )));
        let mut muts = vec![Mutation::PutJob(rec)];
        if let Some(p) = self.printers.get_mut(printer) {
            if p.rec.assigned.as_ref() == Some(job_id) {
                p.rec.assigned = None;
            }
            if p.pending.as_ref().is_some_and(|x| &x.job == job_id) {
                p.pending = None;
            }
            match stage {
                JobStage::Finished => p.rec.consecutive_failures = 0,
                JobStage::Failed | JobStage::Interrupted => {
                    p.rec.consecutive_failures += 1;
                    if p.rec.consecutive_failures >= self.cfg.breaker_threshold && !p.rec.held {
                        p.rec.held = true;
                        tracing::error!(printer = %printer, failures = p.rec.consecutive_failures, "circuit breaker: printer held out of dispatch until an operator releases it");
                    }
                }
                _ => {}
            }
            muts.push(Mutation::PutPrinter(p.rec.clone()));
        }
        out.push(Output::Persist(muts));
        self.queue_dirty = true;
    }

    pub(super) fn printer_mut(
        &mut self,
        now: Now,
        id: &PrinterId,
        out: &mut Vec<Output>,
    ) -> &mut PrinterView {
        if !self.printers.contains_key(id) {
            let rec = PrinterRecord {
                printer_id: id.clone(),
                tags: vec![],
                held: false,
                consecutive_failures: 0,
                assigned: None,
                first_seen_ms: now.unix_ms,
                start_sent: None,
            };
            out.push(Output::Persist(vec![Mutation::PutPrinter(rec.clone())]));
            let mut view = PrinterView::new(rec, now);
            view.enrolled = self.enrolled.as_ref().is_none_or(|s| s.contains(id));
            if view.enrolled {
                tracing::info!(printer = %id, "new printer");
            } else {
                tracing::warn!(printer = %id, "a printer that is not in the client registry reports: it gets no work (`printloop printers add` enrols it)");
            }
            self.ha_dirty.insert(id.clone());
            self.printers.insert(id.clone(), view);
        }
        self.printers.get_mut(id).expect("inserted above")
    }
}

/// A webhook event about `printer` (and `job`), with an id made from what it is about: a job
/// starts and ends once, so a repeat of the same event has the same id.
fn notice(
    kind: WebhookKind,
    at_ms: u64,
    printer: &PrinterId,
    job: Option<&JobRecord>,
) -> WebhookEvent {
    let id = match job {
        Some(j) => format!("{}:{}", kind.as_str(), j.job_id),
        None => format!("{}:{printer}:{at_ms}", kind.as_str()),
    };
    WebhookEvent {
        id,
        kind,
        at_ms,
        printer_id: printer.clone(),
        job_id: job.map(|j| j.job_id.clone()),
        job_name: job.map(|j| j.name.clone()),
        reason: job.and_then(|j| j.reason.clone()),
    }
}
