//! The operator API: requests on `api/request`, answers on `api/response/<client>`. Each client
//! is admitted at its rate; a request id is answered once (a repeat gets the same answer);
//! refusals are typed (`Refusal`), with a stable wire code and a message for people.

use super::*;

impl Supervisor {
    pub(super) fn answer(
        &mut self,
        now: Now,
        caller: &Caller,
        id: &CommandId,
        result: Result<ApiResult, Refusal>,
        remember: bool,
        out: &mut Vec<Output>,
    ) {
        let resp = match result {
            Ok(r) => ApiResponse {
                v: Version,
                id: id.clone(),
                ok: true,
                result: Some(r),
                error: None,
                code: None,
                retry_after_ms: None,
            },
            Err(e) => ApiResponse {
                v: Version,
                id: id.clone(),
                ok: false,
                result: None,
                error: Some(e.message),
                code: Some(e.code),
                retry_after_ms: None,
            },
        };
        let payload = resp.encode();
        if remember {
            let key = caller.answer_key(id);
            self.remember_answer(key.clone(), payload.clone());
            out.push(Output::Persist(vec![Mutation::PutRequest {
                key,
                response: payload.clone(),
                at_ms: now.unix_ms,
            }]));
        }
        self.deliver(caller, Lane::Answer, resp, payload, out);
    }

    /// Keeps an answer for a repeat of its request: the newest [`crate::store::REQUEST_MEMORY`],
    /// as the store does (the map had kept every answer until a restart: each operator
    /// submission's list of job ids, for ever).
    fn remember_answer(&mut self, key: String, payload: Vec<u8>) {
        if self.answers.insert(key.clone(), payload).is_none() {
            self.answer_order.push_back(key);
        }
        while self.answers.len() > crate::store::REQUEST_MEMORY {
            let Some(oldest) = self.answer_order.pop_front() else {
                break;
            };
            self.answers.remove(&oldest);
        }
    }

    /// Sends an answer where its caller waits: a publish on `api/response/<client>`, or a
    /// reply to the HTTP shell.
    fn deliver(
        &mut self,
        caller: &Caller,
        lane: Lane,
        resp: ApiResponse,
        payload: Vec<u8>,
        out: &mut Vec<Output>,
    ) {
        match caller {
            Caller::Mqtt(client) => self.publish_in(
                lane,
                out,
                self.topic(Topic::ApiResponse(client.clone())),
                payload,
                false,
            ),
            Caller::Http(client) => out.push(Output::Reply {
                client: client.clone(),
                response: resp,
            }),
        }
    }

    /// Admits a request of `caller`, or answers it busy (nothing done, nothing stored, in the
    /// lowest lane) and says no.
    ///
    /// Upload chunks have a rate of their own ([`super::config::UPLOAD_RATE`]): a file is
    /// hundreds of them, and what they cost the loop is one decode each (the writing is done
    /// off the loop), so they are admitted faster than other requests and do not use up the
    /// client's allowance for those.
    pub(super) fn admit_api(
        &mut self,
        now: Now,
        caller: &Caller,
        id: &CommandId,
        upload: bool,
        out: &mut Vec<Output>,
    ) -> bool {
        let client = caller.client();
        let (limiter, rate) = if upload {
            (&mut self.upload_limiter, self.cfg.upload_rate)
        } else {
            (&mut self.api_limiter, self.cfg.api_rate)
        };
        let Err(busy) = limiter.admit(client.as_str(), now.mono_ms) else {
            return true;
        };
        self.counters.busy_requests += 1;
        if self.counters.busy_requests.is_power_of_two() {
            tracing::warn!(%client, refused = self.counters.busy_requests, "API requests over their client's rate are answered busy and not carried out");
        }
        let resp = ApiResponse {
            v: Version,
            id: id.clone(),
            ok: false,
            result: None,
            error: Some(format!(
                "busy: client {client} sends more than {} requests a second; nothing was done, \
                 retry after {} ms",
                rate.per_s, busy.retry_after_ms
            )),
            code: Some(ApiErrorCode::Busy),
            retry_after_ms: Some(busy.retry_after_ms),
        };
        let payload = resp.encode();
        self.deliver(caller, Lane::Refusal, resp, payload, out);
        false
    }

    /// A request over HTTP: decoded and checked by the HTTP shell already (its client is the
    /// API token's name); admitted at the same rate and carried out like any other.
    pub(super) fn on_http(&mut self, now: Now, req: ApiRequest, out: &mut Vec<Output>) {
        let caller = Caller::Http(req.client.clone());
        let upload = matches!(req.op, ApiOp::UploadChunk(_));
        if self.admit_api(now, &caller, &req.id, upload, out) {
            self.run_request(now, caller, req, out);
        }
    }

    pub(super) fn on_api(&mut self, now: Now, payload: &[u8], out: &mut Vec<Output>) {
        let req = match ApiRequest::decode(payload) {
            Ok(r)
                if !self.admit_api(
                    now,
                    &Caller::Mqtt(r.client.clone()),
                    &r.id,
                    matches!(r.op, ApiOp::UploadChunk(_)),
                    out,
                ) =>
            {
                return
            }
            Err(ApiReject {
                client: Some(client),
                id: Some(id),
                ..
            }) if !self.admit_api(now, &Caller::Mqtt(client.clone()), &id, false, out) => return,
            Ok(r) if r.client.as_str() == HA_CLIENT => {
                // Home Assistant's presses are requests of this client with ids made from the
                // printer's state; one from the network could claim such an id first and make
                // the real press look like a repeat.
                self.counters.rejected_messages += 1;
                tracing::warn!(id = %r.id, "API request under Home Assistant's reserved client name refused");
                let why = Refusal::new(
                    ApiErrorCode::ReservedClient,
                    format!("the client name {HA_CLIENT:?} is reserved for Home Assistant's buttons; choose another"),
                );
                self.answer(now, &Caller::Mqtt(r.client), &r.id, Err(why), false, out);
                return;
            }
            Ok(r) => r,
            Err(reject) => {
                self.counters.rejected_messages += 1;
                match (reject.client, reject.id) {
                    (Some(client), Some(id)) => self.answer(
                        now,
                        &Caller::Mqtt(client),
                        &id,
                        Err(Refusal::new(
                            ApiErrorCode::Invalid,
                            reject.error.to_string(),
                        )),
                        false,
                        out,
                    ),
                    _ => {
                        tracing::warn!(error = %reject.error, "API request without a readable id and client dropped")
                    }
                }
                return;
            }
        };
        self.run_request(now, Caller::Mqtt(req.client.clone()), req, out);
    }

    /// Carries out a decoded request (from `api/request`, or made from a button press) and
    /// answers it; a request id seen before gets its first answer again and nothing happens.
    pub(super) fn run_request(
        &mut self,
        now: Now,
        caller: Caller,
        req: ApiRequest,
        out: &mut Vec<Output>,
    ) {
        if let Some(prev) = self.answers.get(&caller.answer_key(&req.id)).cloned() {
            // A retried request gets the same answer, and nothing happens twice.
            match ApiResponse::decode(&prev) {
                Ok(resp) => self.deliver(&caller, Lane::Answer, resp, prev, out),
                Err(e) => tracing::error!(error = %e, "a remembered answer does not decode"),
            }
            return;
        }
        let span = tracing::info_span!("api", client = %req.client, id = %req.id);
        let _e = span.enter();
        let id = req.id.clone();
        let (result, remember) = match req.op {
            ApiOp::UploadChunk(chunk) => {
                out.push(Output::StoreUpload { caller, id, chunk });
                return;
            }
            ApiOp::SubmitJob(s) => (self.api_submit(now, s, out), true),
            ApiOp::CancelJob(a) => (self.api_cancel(now, &a.job_id, out), true),
            ApiOp::RequeueJob(a) => (
                self.api_requeue(now, &a.job_id, out)
                    .map(|j| ApiResult::Submitted { job_ids: vec![j] }),
                true,
            ),
            ApiOp::SetPriority(a) => (self.api_priority(&a.job_id, a.priority, out), true),
            ApiOp::ListJobs(l) => (Ok(self.api_list(&l)), false),
            ApiOp::ListPrinters(_) => (
                Ok(ApiResult::Printers {
                    printers: self.printer_summaries(),
                }),
                false,
            ),
            ApiOp::BedClear(b) => (self.api_bed_clear(now, b, out), true),
            ApiOp::ReleasePrinter(a) => (self.api_release(&a.printer_id, out), true),
            ApiOp::PausePrinter(a) => (self.api_pause_resume(now, &a.printer_id, true, out), true),
            ApiOp::ResumePrinter(a) => {
                (self.api_pause_resume(now, &a.printer_id, false, out), true)
            }
            ApiOp::ForgetPrinter(a) => (self.api_forget(&a.printer_id, out), true),
        };
        if let Err(e) = &result {
            tracing::warn!(error = %e, "request refused");
        }
        self.answer(now, &caller, &id, result, remember, out);
        self.queue_dirty = true;
    }

    pub(super) fn on_uploaded(
        &mut self,
        now: Now,
        caller: Caller,
        id: CommandId,
        outcome: UploadOutcome,
        out: &mut Vec<Output>,
    ) {
        let result = match outcome {
            UploadOutcome::Progress {
                received,
                total_size,
                complete,
            } => {
                if let Some(f) = complete {
                    if !self.files.contains_key(&f.sha256) {
                        tracing::info!(sha256 = %f.sha256, size = f.size_bytes, "file stored");
                        out.push(Output::Persist(vec![Mutation::PutFile(f.clone())]));
                        self.files.insert(f.sha256.clone(), f);
                    }
                }
                Ok(ApiResult::Uploaded {
                    received,
                    total_size,
                })
            }
            UploadOutcome::Failed(e) => Err(Refusal::new(ApiErrorCode::UploadRefused, e)),
        };
        self.answer(now, &caller, &id, result, false, out);
    }

    pub(super) fn api_submit(
        &mut self,
        now: Now,
        s: SubmitJob,
        out: &mut Vec<Output>,
    ) -> Result<ApiResult, Refusal> {
        let Some(file) = self.files.get(&s.sha256).cloned() else {
            return Err(Refusal::new(
                ApiErrorCode::FileNotStored,
                format!(
                    "file {} is not stored: upload it first (printloop jobs add does)",
                    s.sha256
                ),
            ));
        };
        if s.copies == 0 || s.copies > 1000 {
            return Err(Refusal::new(
                ApiErrorCode::Invalid,
                format!("copies must be 1 to 1000, not {}", s.copies),
            ));
        }
        if s.name.trim().is_empty() || s.name.len() > 200 {
            return Err(Refusal::new(
                ApiErrorCode::Invalid,
                "name must be 1 to 200 characters",
            ));
        }
        let mut ids = Vec::new();
        let mut muts = Vec::new();
        for _ in 0..s.copies {
            let n = self.next_job;
            self.next_job += 1;
            let job_id = JobId::new(format!("j-{n:06}")).expect("digits form a valid id");
            let rec = JobRecord {
                job_id: job_id.clone(),
                name: s.name.clone(),
                sha256: s.sha256.clone(),
                size_bytes: file.size_bytes,
                priority: s.priority,
                seq: n,
                tags: s.tags.clone(),
                state: JobState::Queued,
                printer: None,
                retry_of: None,
                attempt: 0,
                progress_pct: None,
                submitted_at_ms: now.unix_ms,
                assigned_at_ms: None,
                started_at_ms: None,
                ended_at_ms: None,
                reason: None,
            };
            self.queued_since_mono.insert(job_id.clone(), now.mono_ms);
            self.jobs.insert(job_id.clone(), rec.clone());
            muts.push(Mutation::PutJob(rec));
            ids.push(job_id);
        }
        muts.push(Mutation::SetNextJob(self.next_job));
        out.push(Output::Persist(muts));
        tracing::info!(jobs = ?ids.iter().map(JobId::as_str).collect::<Vec<_>>(), name = %s.name, "jobs queued");
        Ok(ApiResult::Submitted { job_ids: ids })
    }

    pub(super) fn api_cancel(
        &mut self,
        now: Now,
        job: &JobId,
        out: &mut Vec<Output>,
    ) -> Result<ApiResult, Refusal> {
        let j = self
            .jobs
            .get(job)
            .cloned()
            .ok_or_else(|| unknown_job(job))?;
        match j.state {
            JobState::Queued => {}
            s if active(s) => {
                let printer = j.printer.clone().ok_or_else(|| {
                    Refusal::new(ApiErrorCode::Internal, "active job without a printer")
                })?;
                // Tell the printer (queued in its session if it is away).
                self.send(
                    now,
                    &printer,
                    CommandAction::Cancel(JobRef {
                        job_id: Some(job.clone()),
                    }),
                    None,
                    out,
                );
                if let Some(p) = self.printers.get_mut(&printer) {
                    if p.rec.assigned.as_ref() == Some(job) && s == JobState::Assigned {
                        p.rec.assigned = None;
                        p.pending = None;
                        out.push(Output::Persist(vec![Mutation::PutPrinter(p.rec.clone())]));
                    }
                }
            }
            other => {
                return Err(Refusal::new(
                    ApiErrorCode::JobEnded,
                    format!("job {job} already ended ({})", state_name(other)),
                ))
            }
        }
        let j = self.jobs.get_mut(job).expect("checked");
        j.state = JobState::Cancelled;
        j.ended_at_ms.get_or_insert(now.unix_ms);
        j.reason = Some("cancelled by an operator".into());
        out.push(Output::Persist(vec![Mutation::PutJob(j.clone())]));
        self.queued_since_mono.remove(job);
        Ok(ApiResult::Done {})
    }

    pub(super) fn api_requeue(
        &mut self,
        now: Now,
        job: &JobId,
        out: &mut Vec<Output>,
    ) -> Result<JobId, Refusal> {
        let j = self
            .jobs
            .get(job)
            .cloned()
            .ok_or_else(|| unknown_job(job))?;
        if !matches!(
            j.state,
            JobState::Failed
                | JobState::Interrupted
                | JobState::TimedOut
                | JobState::Cancelled
                | JobState::Finished
        ) {
            return Err(Refusal::new(
                ApiErrorCode::NotRequeueable,
                format!(
                    "job {job} is {}: only an ended or timed-out job can be requeued",
                    state_name(j.state)
                ),
            ));
        }
        let base = j.retry_of.clone().unwrap_or_else(|| j.job_id.clone());
        let attempt = j.attempt + 1;
        let new_id = JobId::new(format!("{base}.r{attempt}"))
            .map_err(|e| Refusal::new(ApiErrorCode::Invalid, e.to_string()))?;
        if self.jobs.contains_key(&new_id) {
            return Err(Refusal::new(
                ApiErrorCode::AlreadyRequeued,
                format!("job {job} was already requeued as {new_id}"),
            ));
        }
        let n = self.next_job;
        self.next_job += 1;
        let rec = JobRecord {
            job_id: new_id.clone(),
            state: JobState::Queued,
            printer: None,
            retry_of: Some(base),
            attempt,
            progress_pct: None,
            seq: n,
            submitted_at_ms: now.unix_ms,
            assigned_at_ms: None,
            started_at_ms: None,
            ended_at_ms: None,
            reason: None,
            ..j.clone()
        };
        let mut old = j;
        let mut muts = vec![
            Mutation::PutJob(rec.clone()),
            Mutation::SetNextJob(self.next_job),
        ];
        if old.state == JobState::Finished {
            old.state = JobState::Failed;
            old.reason = Some("marked failed by an operator".into());
            muts.push(Mutation::PutJob(old.clone()));
            self.jobs.insert(old.job_id.clone(), old);
        }
        self.queued_since_mono.insert(new_id.clone(), now.mono_ms);
        self.jobs.insert(new_id.clone(), rec);
        out.push(Output::Persist(muts));
        tracing::info!(job = %job, new = %new_id, "requeued");
        Ok(new_id)
    }

    pub(super) fn api_priority(
        &mut self,
        job: &JobId,
        priority: i32,
        out: &mut Vec<Output>,
    ) -> Result<ApiResult, Refusal> {
        let j = self.jobs.get_mut(job).ok_or_else(|| unknown_job(job))?;
        if j.state != JobState::Queued {
            return Err(Refusal::new(
                ApiErrorCode::NotQueued,
                format!("job {job} is not queued"),
            ));
        }
        j.priority = priority;
        out.push(Output::Persist(vec![Mutation::PutJob(j.clone())]));
        Ok(ApiResult::Done {})
    }

    pub(super) fn api_list(&self, l: &ListJobs) -> ApiResult {
        let limit = l.limit.unwrap_or(100).clamp(1, 1000) as usize;
        // Only the jobs answered are sorted and summarised: a farm holds tens of thousands
        // (the queue and the retained history) and the dashboard asks every second.
        let mut open: Vec<&JobRecord> = self.jobs.values().filter(|j| j.is_open()).collect();
        first_sorted(&mut open, limit, |j| {
            (j.state != JobState::Queued, -j.priority, j.seq)
        });
        let mut jobs: Vec<JobSummary> = open.into_iter().map(summary).collect();
        if l.include_ended && jobs.len() < limit {
            let mut rest: Vec<&JobRecord> = self.jobs.values().filter(|j| !j.is_open()).collect();
            first_sorted(&mut rest, limit - jobs.len(), |j| {
                std::cmp::Reverse((j.ended_at_ms.unwrap_or(j.submitted_at_ms), j.seq))
            });
            jobs.extend(rest.into_iter().map(summary));
        }
        ApiResult::Jobs { jobs }
    }

    pub(super) fn api_bed_clear(
        &mut self,
        now: Now,
        b: BedClear,
        out: &mut Vec<Output>,
    ) -> Result<ApiResult, Refusal> {
        let p = self.known(&b.printer_id)?;
        // The job the printer last reported, and whether it has ended: by the printer's own
        // state, or by its `job_ended` event, which can arrive before the next (rate-limited)
        // state does.
        let reported = p.state.as_ref().and_then(|s| s.job.as_ref());
        let ended_by_event = reported
            .and_then(|j| self.jobs.get(&j.job_id))
            .is_some_and(|j| {
                matches!(
                    j.state,
                    JobState::Finished
                        | JobState::Failed
                        | JobState::Interrupted
                        | JobState::Cancelled
                        | JobState::Done
                )
            });
        if let Some(phase) = p.phase() {
            let busy = matches!(
                phase,
                PrinterPhase::Preparing | PrinterPhase::Printing | PrinterPhase::Paused
            );
            if busy && !ended_by_event {
                return Err(Refusal::new(
                    ApiErrorCode::PrinterNotDone,
                    format!(
                        "printer {} is {}: it is not done",
                        b.printer_id,
                        phase_name(phase)
                    ),
                ));
            }
        }
        // Judge the print that is on the bed.
        let on_bed = reported
            .filter(|j| j.stage.is_terminal() || ended_by_event)
            .map(|j| j.job_id.clone());
        if let Some(job) = on_bed {
            if let Some(j) = self.jobs.get(&job).cloned() {
                match (j.state, b.failed) {
                    (JobState::Finished, false) => {
                        let j = self.jobs.get_mut(&job).expect("known");
                        j.state = JobState::Done;
                        out.push(Output::Persist(vec![Mutation::PutJob(j.clone())]));
                    }
                    (JobState::Finished | JobState::Failed | JobState::Interrupted, _) => {
                        // A job an operator already requeued stays requeued once: the bed
                        // is cleared all the same (refusing would leave the printer stuck).
                        if let Err(e) = self.api_requeue(now, &job, out) {
                            tracing::info!(job = %job, reason = %e, "not requeued again");
                        }
                        if let Some(p) = self.printers.get_mut(&b.printer_id) {
                            if b.failed && j.state == JobState::Finished {
                                p.rec.consecutive_failures += 1;
                                if p.rec.consecutive_failures >= self.cfg.breaker_threshold {
                                    p.rec.held = true;
                                }
                                out.push(Output::Persist(vec![Mutation::PutPrinter(
                                    p.rec.clone(),
                                )]));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        tracing::info!(printer = %b.printer_id, failed = b.failed, "operator cleared the bed");
        self.send(
            now,
            &b.printer_id,
            CommandAction::BedCleared(Empty {}),
            Some(self.cfg.command_ttl_ms()),
            out,
        );
        Ok(ApiResult::Done {})
    }

    pub(super) fn api_release(
        &mut self,
        printer: &PrinterId,
        out: &mut Vec<Output>,
    ) -> Result<ApiResult, Refusal> {
        let p = self.known_mut(printer)?;
        p.rec.held = false;
        p.rec.consecutive_failures = 0;
        out.push(Output::Persist(vec![Mutation::PutPrinter(p.rec.clone())]));
        tracing::info!(printer = %printer, "released by an operator");
        Ok(ApiResult::Done {})
    }

    /// The printer, or the API's "unknown printer" error.
    pub(super) fn known(&self, printer: &PrinterId) -> Result<&PrinterView, Refusal> {
        self.printers
            .get(printer)
            .ok_or_else(|| unknown_printer(printer))
    }

    pub(super) fn known_mut(&mut self, printer: &PrinterId) -> Result<&mut PrinterView, Refusal> {
        self.printers
            .get_mut(printer)
            .ok_or_else(|| unknown_printer(printer))
    }

    /// `pause_printer` / `resume_printer`: checked against the printer's last state, then a
    /// `pause`/`resume` command for its current job (the gateway checks again).
    pub(super) fn api_pause_resume(
        &mut self,
        now: Now,
        printer: &PrinterId,
        pause: bool,
        out: &mut Vec<Output>,
    ) -> Result<ApiResult, Refusal> {
        let p = self.known(printer)?;
        let (wanted, verb) = if pause {
            (PrinterPhase::Printing, "pause")
        } else {
            (PrinterPhase::Paused, "resume")
        };
        if !p.reachable() {
            return Err(Refusal::new(
                ApiErrorCode::PrinterUnreachable,
                format!("printer {printer} is offline or silent: cannot {verb}"),
            ));
        }
        let phase = p.phase().unwrap_or(PrinterPhase::Disconnected);
        if phase != wanted {
            return Err(Refusal::new(
                ApiErrorCode::WrongPhase,
                format!(
                    "printer {printer} is {}: only a {} printer can be told to {verb}",
                    phase_name(phase),
                    phase_name(wanted)
                ),
            ));
        }
        let job_id = p
            .state
            .as_ref()
            .and_then(|s| s.job.as_ref())
            .map(|j| j.job_id.clone());
        let action = if pause {
            CommandAction::Pause(JobRef {
                job_id: job_id.clone(),
            })
        } else {
            CommandAction::Resume(JobRef {
                job_id: job_id.clone(),
            })
        };
        let cmd = self.send(now, printer, action, Some(self.cfg.command_ttl_ms()), out);
        tracing::info!(printer = %printer, job = ?job_id.as_ref().map(JobId::as_str), command = %cmd, "{verb} sent");
        Ok(ApiResult::Done {})
    }

    /// `forget_printer`: a decommissioned printer leaves the supervisor, Home Assistant and
    /// the broker's retained topics.
    pub(super) fn api_forget(
        &mut self,
        printer: &PrinterId,
        out: &mut Vec<Output>,
    ) -> Result<ApiResult, Refusal> {
        let p = self.known(printer)?;
        if p.presence == Presence::Online && !p.stale {
            return Err(Refusal::new(
                ApiErrorCode::PrinterOnline,
                format!("printer {printer} is online: stop its gateway before forgetting it"),
            ));
        }
        if let Some(job) = p.rec.assigned.as_ref().and_then(|j| self.jobs.get(j)) {
            if active(job.state) && job.state != JobState::TimedOut {
                return Err(Refusal::new(
                    ApiErrorCode::PrinterHasJob,
                    format!(
                        "printer {printer} has job {} ({}): cancel it first",
                        job.job_id,
                        state_name(job.state)
                    ),
                ));
            }
        }
        self.printers.remove(printer);
        self.ha_dirty.remove(printer);
        out.push(Output::Persist(vec![Mutation::RemovePrinter(
            printer.clone(),
        )]));
        if self.cfg.ha.enabled {
            for topic in ha::printer_config_topics(&self.cfg.ha, &self.cfg.topics, printer) {
                self.publish(out, topic, Vec::new(), true);
            }
        }
        // An empty retained message deletes the retained one: nothing of it stays.
        for t in [
            Topic::Status(printer.clone()),
            Topic::Meta(printer.clone()),
            Topic::State(printer.clone()),
        ] {
            self.publish(out, self.topic(t), Vec::new(), true);
        }
        tracing::info!(printer = %printer, "printer forgotten (decommissioned)");
        Ok(ApiResult::Done {})
    }
}

/// A refused request: its stable code for programs and its message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What programs match on.
    pub code: ApiErrorCode,
    /// What people read.
    pub message: String,
}

impl Refusal {
    /// A refusal with this code and message.
    pub fn new(code: ApiErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn unknown_job(job: &JobId) -> Refusal {
    Refusal::new(ApiErrorCode::UnknownJob, format!("unknown job {job:?}"))
}

fn unknown_printer(printer: &PrinterId) -> Refusal {
    Refusal::new(
        ApiErrorCode::UnknownPrinter,
        format!("unknown printer {:?}", printer.as_str()),
    )
}

/// How a phase reads in a message: `printing`, `paused`…
pub(super) fn phase_name(phase: PrinterPhase) -> String {
    format!("{phase:?}").to_lowercase()
}

/// How a job state reads in a message: `queued`, `timedout`…
fn state_name(state: JobState) -> String {
    format!("{state:?}").to_lowercase()
}
