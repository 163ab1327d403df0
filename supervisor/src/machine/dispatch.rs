//! Dispatch and starts: queued jobs onto free, enrolled, bed-clear printers, and the start
//! commands that carry them. Persist, then publish: an assignment and its pending start are
//! durable before the start leaves; a start is re-sent freely (the gateway's ledger runs a job once).

use std::collections::VecDeque;

use super::*;

impl Supervisor {
    /// `sup-<epoch>-<n>-<tag>`: readable, unique, and not guessable from the ids seen so far
    /// (the tag is a keyed digest of epoch and n).
    pub(super) fn next_command_id(&mut self) -> CommandId {
        use sha2::Digest as _;
        self.commands_sent += 1;
        let (epoch, n) = (self.epoch, self.commands_sent);
        let mut h = sha2::Sha256::new();
        h.update(self.cfg.command_key);
        h.update(epoch.to_le_bytes());
        h.update(n.to_le_bytes());
        let tag: String = h.finalize()[..5]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        CommandId::new(format!("sup-{epoch}-{n}-{tag}")).expect("digits form a valid id")
    }

    pub(super) fn send(
        &mut self,
        now: Now,
        printer: &PrinterId,
        action: CommandAction,
        expires: Option<u64>,
        out: &mut Vec<Output>,
    ) -> CommandId {
        let id = self.next_command_id();
        let cmd = Command {
            expires_at: expires.map(|ttl| now.unix_ms + ttl),
            client: Some(ClientId::new(SUPERVISOR_CLIENT).expect("a valid client id")),
            ..Command::new(id.clone(), action)
        };
        self.publish(
            out,
            self.topic(Topic::Cmd(printer.clone())),
            cmd.encode(),
            false,
        );
        id
    }

    /// Sends the start of the printer's assigned job when the printer is ready for it.
    pub(super) fn push_start(&mut self, now: Now, id: &PrinterId, out: &mut Vec<Output>) {
        let Some(p) = self.printers.get(id) else {
            return;
        };
        let Some(job_id) = p.rec.assigned.clone() else {
            return;
        };
        let Some(job) = self.jobs.get(&job_id).cloned() else {
            return;
        };
        if job.state != JobState::Assigned
            || !p.reachable()
            || p.phase() != Some(PrinterPhase::Ready)
        {
            return;
        }
        if let Some(pending) = &p.pending {
            if pending.job == job_id && now.mono_ms < pending.retry_at(self.cfg.command_retry_ms())
            {
                return; // on its way
            }
            self.counters.command_retries += 1;
        }
        if !self.connected {
            return;
        }
        let action = CommandAction::StartJob(StartJob {
            job_id: job.job_id.clone(),
            printer_id: id.clone(),
            file_sha256: job.sha256.clone(),
            size_bytes: job.size_bytes,
            name: job.name.clone(),
        });
        let cmd = self.send(now, id, action, Some(self.cfg.command_ttl_ms()), out);
        self.counters.starts_sent += 1;
        if let Some(q) = self.queued_since_mono.remove(&job_id) {
            self.counters
                .dispatch_latency_ms
                .push(now.mono_ms.saturating_sub(q));
        }
        tracing::info!(printer = %id, job = %job_id, command = %cmd, "start sent");
        let p = self.printers.get_mut(id).expect("known");
        let mut earlier = match p.pending.take() {
            Some(old) if old.job == job_id => {
                let mut e = old.earlier;
                e.push(old.command);
                e
            }
            _ => Vec::new(),
        };
        if earlier.len() > 16 {
            earlier.remove(0);
        }
        p.pending = Some(PendingStart {
            job: job_id,
            command: cmd,
            earlier,
            sent_mono: now.mono_ms,
            expires_unix: now.unix_ms + self.cfg.command_ttl_ms(),
            expires_mono: now.mono_ms + self.cfg.command_ttl_ms(),
            refused: None,
            busy_retry_mono: None,
        });
    }

    /// Gives queued jobs to printers. Ready printers first; otherwise a job waits, assigned,
    /// on an online printer whose bed is not yet cleared (deferred start).
    ///
    /// The free printers are listed once per call (in id order, as a per-job scan would find
    /// them) and the jobs are only collected when some printer is free: with thousands of
    /// printers and queued jobs this runs after every message.
    pub(super) fn dispatch(&mut self, now: Now, out: &mut Vec<Output>) {
        // From the indexes (`index`): free printers, queued and assigned jobs are not looked
        // for in the whole fleet after every batch.
        self.refresh_indexes();
        // Deques: a job takes the first printer that suits it (in id order).
        let mut ready_free: VecDeque<PrinterId> = self.idx.free_now.iter().cloned().collect();
        if ready_free.is_empty() && self.idx.free_later.is_empty() {
            return; // nothing can be placed: no job needs looking at
        }
        // An assigned job that its printer no longer holds (the printer was found running
        // another job, or forgotten), with no start on its way and not shown by the printer:
        // nobody will ever start it where it is, so it goes back to the queue.
        let orphans: Vec<JobId> = self
            .idx
            .assigned
            .iter()
            .filter(|id| self.jobs.get(*id).is_some_and(|j| self.orphaned(j)))
            .cloned()
            .collect();
        for job in orphans {
            let j = self.jobs.get_mut(&job).expect("listed");
            tracing::warn!(job = %job, printer = ?j.printer, "assigned job held by no printer: back to the queue");
            j.state = JobState::Queued;
            j.printer = None;
            out.push(Output::Persist(vec![Mutation::PutJob(j.clone())]));
            self.queue_dirty = true;
        }
        // A deferred job (assigned, not started, printer not ready) moves to a ready printer.
        let deferred: Vec<(PrinterId, JobId)> = if ready_free.is_empty() {
            Vec::new()
        } else {
            // The printers holding an assigned job (`read_by`: their `rec.assigned`).
            self.idx
                .assigned
                .iter()
                .flat_map(|j| {
                    self.idx
                        .printers_holding(j)
                        .filter_map(|id| self.printers.get(id))
                        .map(move |p| (p, j))
                })
                .filter(|(p, j)| {
                    // Only when the printer's current report shows it does not have the job
                    // (a start it accepted may not have been heard of yet).
                    p.pending.is_none()
                        && p.phase() != Some(PrinterPhase::Ready)
                        && Self::surely_without(p, j)
                })
                .map(|(p, j)| (p.rec.printer_id.clone(), j.clone()))
                .collect()
        };
        for (printer, job) in deferred {
            if self.pick(&ready_free, &job).is_some() {
                let p = self.printers.get_mut(&printer).expect("known");
                p.rec.assigned = None;
                let rec = p.rec.clone();
                let j = self.jobs.get_mut(&job).expect("known");
                j.state = JobState::Queued;
                j.printer = None;
                out.push(Output::Persist(vec![
                    Mutation::PutPrinter(rec),
                    Mutation::PutJob(j.clone()),
                ]));
            }
        }
        // The moves above are in the indexes now: the queue in dispatch order, and a printer
        // that gave its job back may take another.
        self.refresh_indexes();
        ready_free = self.idx.free_now.iter().cloned().collect();
        let mut later_free: VecDeque<PrinterId> = self.idx.free_later.iter().cloned().collect();
        // The lists of tags some free printer accepts, with how many queued jobs ask for each:
        // a job whose tags no free printer has is passed over without looking at the printers,
        // and the pass ends once no job it could place is left (idle PETG printers beside a
        // long PLA queue used to cost a look at every free printer for every queued job,
        // after every batch).
        let accepts = |tags: &[String], free: &VecDeque<PrinterId>| {
            free.iter().any(|id| {
                self.printers
                    .get(id)
                    .is_some_and(|p| tags.iter().all(|t| p.rec.tags.contains(t)))
            })
        };
        let mut placeable: HashMap<Vec<String>, usize> = self
            .idx
            .queued_tags
            .iter()
            .filter(|(tags, _)| accepts(tags, &ready_free) || accepts(tags, &later_free))
            .map(|(tags, n)| (tags.clone(), *n))
            .collect();
        let mut left: usize = placeable.values().sum();
        // The queue is read a page at a time: most batches place a job or two, and a farm's
        // queue can hold thousands.
        const PAGE: usize = 64;
        let mut after: Option<(i32, u64, JobId)> = None;
        'pages: loop {
            let page: Vec<(i32, u64, JobId)> = match &after {
                None => self.idx.queued.iter().take(PAGE).cloned().collect(),
                Some(k) => self
                    .idx
                    .queued
                    .range((
                        std::ops::Bound::Excluded(k.clone()),
                        std::ops::Bound::Unbounded,
                    ))
                    .take(PAGE)
                    .cloned()
                    .collect(),
            };
            let Some(last) = page.last() else {
                break;
            };
            after = Some(last.clone());
            for (_, _, job_id) in page {
                if left == 0 || (ready_free.is_empty() && later_free.is_empty()) {
                    break 'pages;
                }
                let tags = self
                    .jobs
                    .get(&job_id)
                    .map(|j| j.tags.as_slice())
                    .unwrap_or_default();
                let Some(n) = placeable.get_mut(tags) else {
                    continue; // no free printer has its tags
                };
                *n -= 1;
                left -= 1;
                let ready = self.pick(&ready_free, &job_id);
                let deferred = ready.is_none();
                let printer = match ready.and_then(|i| ready_free.remove(i)) {
                    Some(p) => p,
                    None => match self
                        .pick(&later_free, &job_id)
                        .and_then(|i| later_free.remove(i))
                    {
                        Some(p) => p,
                        None => {
                            // The printers that had these tags are taken: free lists only
                            // shrink in a pass, so the rest of its jobs are passed over too.
                            if let Some(rest) = placeable.remove(tags) {
                                left -= rest;
                            }
                            continue;
                        }
                    },
                };
                let j = self.jobs.get_mut(&job_id).expect("queued job exists");
                j.state = JobState::Assigned;
                j.printer = Some(printer.clone());
                j.assigned_at_ms = Some(now.unix_ms);
                let jrec = j.clone();
                let p = self.printers.get_mut(&printer).expect("known");
                p.rec.assigned = Some(job_id.clone());
                let prec = p.rec.clone();
                // Persist the assignment before the start command can leave.
                out.push(Output::Persist(vec![
                    Mutation::PutJob(jrec),
                    Mutation::PutPrinter(prec),
                ]));
                tracing::info!(printer = %printer, job = %job_id, deferred, "job assigned");
                self.queue_dirty = true;
                self.push_start(now, &printer, out);
            }
        }
    }

    /// Whether an `assigned` job is held by no printer: its printer does not list it as its
    /// job, has no start of it on the way, and does not show it in its last report.
    pub(super) fn orphaned(&self, j: &JobRecord) -> bool {
        let Some(p) = j.printer.as_ref().and_then(|id| self.printers.get(id)) else {
            return true;
        };
        p.rec.assigned.as_ref() != Some(&j.job_id)
            && p.pending.as_ref().is_none_or(|x| x.job != j.job_id)
            && Self::surely_without(p, &j.job_id)
    }

    /// Whether the printer's current report says it does not have `job` (neither on its bed
    /// nor in its recent ledger). No current report (unknown, stale, or of an older epoch than
    /// its status): not sure, so false.
    pub(super) fn surely_without(p: &PrinterView, job: &JobId) -> bool {
        let Some(s) = p
            .state
            .as_ref()
            .filter(|s| p.reachable() && s.epoch >= p.status_epoch)
        else {
            return false;
        };
        !(s.job.as_ref().is_some_and(|pj| &pj.job_id == job)
            || s.recent_jobs.iter().any(|e| &e.job_id == job))
    }

    /// The first of `free` whose tags `job` accepts (its index).
    pub(super) fn pick(&self, free: &VecDeque<PrinterId>, job: &JobId) -> Option<usize> {
        let j = self.jobs.get(job)?;
        free.iter().position(|id| {
            self.printers
                .get(id)
                .is_some_and(|p| j.tags.iter().all(|t| p.rec.tags.contains(t)))
        })
    }

    /// A printer that can take a job now (`ready`), or that will once its bed is cleared.
    pub(super) fn is_free(p: &PrinterView, ready: bool) -> bool {
        if !(p.enrolled
            && p.reachable()
            && !p.rec.held
            && p.rec.assigned.is_none()
            && p.pending.is_none())
        {
            return false;
        }
        let Some(s) = p.state.as_ref() else {
            return false;
        };
        if s.maintenance {
            return false;
        }
        if ready {
            s.phase == PrinterPhase::Ready
        } else {
            matches!(s.phase, PrinterPhase::Idle | PrinterPhase::Finished)
                && s.job.as_ref().is_none_or(|pj| pj.stage.is_terminal())
        }
    }

    /// Mirrors each printer's in-memory pending start into its durable record: a start command
    /// is committed as sent (in the same transaction as the batch, before anything of the batch
    /// is published), and its answer, expiry or refusal clears it. Without this a supervisor
    /// restarted between sending a start and hearing the answer would see the job as merely
    /// assigned and could move it to a second printer while the first one prints it.
    pub(super) fn persist_pending_starts(&mut self, out: &mut Vec<Output>) {
        let mut muts = Vec::new();
        // Only the printers changed since the last look (`index`), or all of them.
        let check: Vec<PrinterId> = match self.idx.unpersisted.replace(BTreeSet::new()) {
            Some(changed) => changed.into_iter().collect(),
            None => self.printers.keys().cloned().collect(),
        };
        let same = |p: &PrinterView| match (&p.pending, &p.rec.start_sent) {
            (None, None) => true,
            (Some(x), Some(s)) => {
                x.expires_unix == s.expires_at_ms && x.job == s.job && x.command == s.command
            }
            _ => false,
        };
        for id in check {
            if self.printers.get(&id).is_none_or(same) {
                continue;
            }
            let p = self.printers.get_mut(&id).expect("checked");
            p.rec.start_sent = p.pending.as_ref().map(|x| StartSent {
                job: x.job.clone(),
                command: x.command.clone(),
                expires_at_ms: x.expires_unix,
            });
            muts.push(Mutation::PutPrinter(p.rec.clone()));
        }
        if !muts.is_empty() {
            out.push(Output::Persist(muts));
        }
    }

    /// Whether printer `p` may pull file `sha`: only for a job of its own that is on its way
    /// to the printer (issue #10: any client could pull any stored G-code by asking under any
    /// printer's name).
    ///
    /// Asked for every chunk (hundreds a second while files move): the printer's assigned job
    /// answers it without a scan; only a request that does not match it looks further.
    pub(super) fn may_pull(&self, p: &PrinterId, sha: &Sha256Hex) -> bool {
        let waiting = |j: &JobRecord| {
            j.printer.as_ref() == Some(p)
                && &j.sha256 == sha
                && matches!(
                    j.state,
                    JobState::Assigned | JobState::Transferring | JobState::Starting
                )
        };
        let assigned = self
            .printers
            .get(p)
            .and_then(|v| v.rec.assigned.as_ref())
            .and_then(|id| self.jobs.get(id));
        if assigned.is_some_and(waiting) {
            return true;
        }
        self.jobs.values().any(|j| {
            j.printer.as_ref() == Some(p)
                && &j.sha256 == sha
                && matches!(
                    j.state,
                    JobState::Assigned | JobState::Transferring | JobState::Starting
                )
        })
    }

    pub(super) fn refuse_pull(
        &mut self,
        p: PrinterId,
        request: FileChunkRequest,
        out: &mut Vec<Output>,
    ) {
        self.counters.refused_pulls += 1;
        tracing::warn!(printer = %p, sha = %request.sha256, "file request refused: no job of this printer is waiting for that file");
        let refusal = FileChunkResponse::Error {
            v: Version,
            request_id: request.request_id,
            sha256: request.sha256,
            code: ChunkErrorCode::NotFound,
            message: "no job of this printer is waiting for that file".into(),
        };
        let topic = self.cfg.topics.format(&Topic::FileChunk(p));
        self.publish(out, topic, refusal.encode(), false);
    }
}
