//! Commands on `cmd`: per-client admission (`busy`), duplicates and expiry, then start, pause,
//! resume, cancel, bed-cleared and rebirth with their refusals. Every answer but `busy` and
//! `duplicate` is recorded durably, and persisted before the result is published. Refusals are
//! typed (`Refusal`): a stable code for programs beside the message for people.

use protocol::command::{
    Command, CommandAction, CommandErrorCode, CommandResult, JobRef, ResultStatus, StartJob,
};
use protocol::state::{EventKind, JobStage, LastCommand, PrinterPhase};
use protocol::{CommandId, Payload, Topic, Version};
use transport::outgoing::Lane;

use crate::store::{CommandRecord, CurrentJob, LedgerRecord, Mutation};

use super::{Gateway, LinkState, Now, Output, PrinterCommand, Publish};

/// A refused command: its stable code for programs and its message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refusal {
    /// What programs match on.
    code: CommandErrorCode,
    /// What people read (`reason`).
    message: String,
}

impl Refusal {
    fn new(code: CommandErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// How a command is answered (`busy` aside: that answer is not recorded).
enum Answer {
    /// Carried out.
    Ok,
    /// Handled before, with why; nothing happens again.
    Duplicate(String),
    /// Past its `expires_at`, with why; nothing happens.
    Expired(String),
    /// Refused; nothing changed.
    Refused(Refusal),
}

impl Gateway {
    fn answer(
        &mut self,
        now: Now,
        id: CommandId,
        answer: Answer,
        mut mutations: Vec<Mutation>,
        out: &mut Vec<Output>,
    ) {
        let (status, reason, code) = match answer {
            Answer::Ok => (ResultStatus::Ok, None, None),
            Answer::Duplicate(why) => (ResultStatus::Duplicate, Some(why), None),
            Answer::Expired(why) => (ResultStatus::Expired, Some(why), None),
            Answer::Refused(r) => (ResultStatus::Error, Some(r.message), Some(r.code)),
        };
        let record = CommandRecord {
            at_ms: now.unix_ms,
            status,
            reason: reason.clone(),
        };
        if status != ResultStatus::Duplicate {
            mutations.push(Mutation::PutCommand(id.clone(), record.clone()));
            self.commands.insert(id.clone(), record);
            if self.commands.len() > crate::store::COMMAND_MEMORY {
                if let Some(oldest) = self
                    .commands
                    .iter()
                    .min_by_key(|(_, r)| r.at_ms)
                    .map(|(k, _)| k.clone())
                {
                    self.commands.remove(&oldest);
                }
            }
        }
        if !mutations.is_empty() {
            out.push(Output::Persist(mutations));
        }
        self.last_command = Some(LastCommand {
            id: id.clone(),
            status,
        });
        self.state_dirty = true;
        match status {
            ResultStatus::Error => {
                tracing::warn!(command = %id, ?code, reason = reason.as_deref().unwrap_or(""), "command refused")
            }
            _ => tracing::info!(command = %id, ?status, "command answered"),
        }
        let result = CommandResult {
            v: Version,
            id,
            status,
            reason,
            code,
            epoch: self.epoch,
            at_ms: now.unix_ms,
            retry_after_ms: None,
        };
        if self.connected {
            out.push(Output::Publish(Publish {
                topic: self.topic(Topic::CmdResult(self.cfg.printer_id.clone())),
                payload: result.encode(),
                retain: false,
                outbox_key: None,
                lane: Lane::Answer,
            }));
        }
    }

    /// Answers `busy` to a command over its client's rate: nothing is carried out or stored
    /// (a flood costs no disk write and no state publish), and the answer waits in the lowest
    /// lane, behind state, events and real answers.
    fn refuse_busy(
        &mut self,
        now: Now,
        id: CommandId,
        client: &str,
        busy: protocol::limit::Busy,
        out: &mut Vec<Output>,
    ) {
        self.refused_commands += 1;
        if self.refused_commands.is_power_of_two() {
            tracing::warn!(
                client = %client,
                refused = self.refused_commands,
                "commands over their client's rate are answered busy and not carried out"
            );
        }
        if !self.connected {
            return;
        }
        let result = CommandResult {
            v: Version,
            id,
            status: ResultStatus::Busy,
            reason: Some(format!(
                "client {client} sends more than {} commands a second: retry after {} ms",
                self.cfg.command_rate.per_s, busy.retry_after_ms
            )),
            code: Some(CommandErrorCode::Busy),
            epoch: self.epoch,
            at_ms: now.unix_ms,
            retry_after_ms: Some(busy.retry_after_ms),
        };
        out.push(Output::Publish(Publish {
            topic: self.topic(Topic::CmdResult(self.cfg.printer_id.clone())),
            payload: result.encode(),
            retain: false,
            outbox_key: None,
            lane: Lane::Refusal,
        }));
    }

    /// Admits a command from `client` (`anonymous` when it names none), or answers `busy`.
    fn admit(
        &mut self,
        now: Now,
        id: &CommandId,
        client: Option<&protocol::ClientId>,
        out: &mut Vec<Output>,
    ) -> bool {
        let client = client.map_or("anonymous", |c| c.as_str());
        match self.limiter.admit(client, now.mono_ms) {
            Ok(()) => true,
            Err(busy) => {
                let client = client.to_owned();
                self.refuse_busy(now, id.clone(), &client, busy, out);
                false
            }
        }
    }

    pub(super) fn on_command(&mut self, now: Now, payload: &[u8], out: &mut Vec<Output>) {
        let cmd = match Command::decode(payload) {
            Ok(c) => c,
            Err(reject) => {
                let why = Refusal::new(reject.code(), reject.error.to_string());
                match reject.id {
                    Some(id) if !self.admit(now, &id, reject.client.as_ref(), out) => {}
                    Some(id) => self.answer(now, id, Answer::Refused(why), vec![], out),
                    None => {
                        tracing::warn!(error = %reject.error, "command without a readable id dropped")
                    }
                }
                return;
            }
        };
        if !self.admit(now, &cmd.id, cmd.client.as_ref(), out) {
            return;
        }
        if let Some(prev) = self.commands.get(&cmd.id) {
            let why = format!("command already handled ({:?})", prev.status).to_lowercase();
            self.answer(now, cmd.id, Answer::Duplicate(why), vec![], out);
            return;
        }
        if cmd.expired(now.unix_ms) {
            let why = format!(
                "expired at {} (now {})",
                cmd.expires_at.unwrap_or_default(),
                now.unix_ms
            );
            self.answer(now, cmd.id, Answer::Expired(why), vec![], out);
            return;
        }
        let span = tracing::info_span!("command", printer = %self.cfg.printer_id, id = %cmd.id, kind = cmd.action.kind());
        let _enter = span.enter();
        let result = match cmd.action {
            CommandAction::StartJob(s) => self.cmd_start(now, s, out),
            CommandAction::Pause(r) => self.cmd_pause_resume(now, r, true, out),
            CommandAction::Resume(r) => self.cmd_pause_resume(now, r, false, out),
            CommandAction::Cancel(r) => self.cmd_cancel(now, r, out),
            CommandAction::BedCleared(_) => self.cmd_bed_cleared(now, out),
            CommandAction::Rebirth(_) => {
                if self.connected {
                    self.birth(now, out);
                }
                Ok(vec![])
            }
        };
        match result {
            Ok(muts) => self.answer(now, cmd.id, Answer::Ok, muts, out),
            Err(why) => self.answer(now, cmd.id, Answer::Refused(why), vec![], out),
        }
    }

    fn check_job_ref(&self, r: &JobRef) -> Result<&CurrentJob, Refusal> {
        let job = self
            .current
            .as_ref()
            .ok_or_else(|| Refusal::new(CommandErrorCode::NoJob, "no job on this printer"))?;
        if let Some(want) = &r.job_id {
            if *want != job.job_id {
                return Err(Refusal::new(
                    CommandErrorCode::NotCurrentJob,
                    format!("job {want} is not the current job ({})", job.job_id),
                ));
            }
        }
        Ok(job)
    }

    fn cmd_start(
        &mut self,
        now: Now,
        s: StartJob,
        out: &mut Vec<Output>,
    ) -> Result<Vec<Mutation>, Refusal> {
        use CommandErrorCode as Code;
        if s.printer_id != self.cfg.printer_id {
            return Err(Refusal::new(
                Code::WrongPrinter,
                format!(
                    "this start_job is for printer {}, not {}",
                    s.printer_id, self.cfg.printer_id
                ),
            ));
        }
        if let Some(outcome) = self.ledger.get(&s.job_id) {
            return Err(match outcome {
                Some(o) => Refusal::new(
                    Code::AlreadyRan,
                    format!(
                        "job {} already ran on this printer ({o:?}); it never runs again",
                        s.job_id
                    )
                    .to_lowercase(),
                ),
                None => Refusal::new(
                    Code::AlreadyAccepted,
                    format!("job {} is already on this printer", s.job_id),
                ),
            });
        }
        match self.phase() {
            PrinterPhase::Ready => {}
            PrinterPhase::Idle if self.flags.maintenance => {
                return Err(Refusal::new(Code::Maintenance, "printer is in maintenance"))
            }
            PrinterPhase::Idle => {
                return Err(Refusal::new(
                    Code::NotReady,
                    "printer is idle: the bed must be cleared first",
                ))
            }
            other => {
                return Err(Refusal::new(
                    Code::NotReady,
                    format!("printer is not ready (phase {other:?})").to_lowercase(),
                ))
            }
        }
        if s.size_bytes == 0 {
            return Err(Refusal::new(Code::Invalid, "file is empty"));
        }
        let cached = self.files.get(&s.file_sha256).is_some_and(|f| f.verified);
        if !cached {
            if s.size_bytes > self.cfg.cache_max_bytes {
                return Err(Refusal::new(
                    Code::FileTooLarge,
                    format!(
                        "file of {} bytes is larger than the cache ({} bytes)",
                        s.size_bytes, self.cfg.cache_max_bytes
                    ),
                ));
            }
            let evictable: u64 = self.evictable_bytes(&s.file_sha256);
            if let Some(free) = self.disk_free {
                if s.size_bytes > free + evictable {
                    return Err(Refusal::new(
                        Code::NoDiskSpace,
                        format!(
                            "not enough disk space: {} bytes needed, {} free",
                            s.size_bytes,
                            free + evictable
                        ),
                    ));
                }
            }
        }
        let job = CurrentJob {
            job_id: s.job_id.clone(),
            file_sha256: s.file_sha256.clone(),
            name: s.name.clone(),
            size_bytes: s.size_bytes,
            stage: JobStage::Transferring,
            line: 0,
            total_lines: 0,
            accepted_at_ms: now.unix_ms,
            started_at_ms: None,
            ended_at_ms: None,
            reason: None,
        };
        self.ledger.insert(s.job_id.clone(), None);
        self.current = Some(job.clone());
        self.progress_pct = None;
        self.remaining_s = None;
        self.last_checkpoint_line = 0;
        let muts = vec![
            Mutation::PutLedger(LedgerRecord {
                job_id: s.job_id.clone(),
                outcome: None,
                line: 0,
                accepted_at_ms: now.unix_ms,
                ended_at_ms: None,
            }),
            Mutation::SetCurrent(Some(job)),
        ];
        // The acceptance is durable before anything else happens.
        out.push(Output::Persist(muts));
        self.event(
            now,
            EventKind::JobAccepted {
                job_id: s.job_id.clone(),
            },
            out,
        );
        if cached {
            self.check_file(&s.file_sha256, out);
        } else {
            self.begin_transfer(now, &s.file_sha256, s.size_bytes, out);
        }
        Ok(vec![])
    }

    /// Pause (`pause`) or resume the current job; the other one of the pair is a no-op.
    fn cmd_pause_resume(
        &mut self,
        now: Now,
        r: JobRef,
        pause: bool,
        out: &mut Vec<Output>,
    ) -> Result<Vec<Mutation>, Refusal> {
        let (from, to, command, wanted) = if pause {
            (
                JobStage::Printing,
                JobStage::Paused,
                PrinterCommand::PauseStream,
                "printing",
            )
        } else {
            (
                JobStage::Paused,
                JobStage::Printing,
                PrinterCommand::ResumeStream,
                "paused",
            )
        };
        let job = self.check_job_ref(&r)?;
        if job.stage == to {
            return Ok(vec![]);
        }
        if job.stage != from {
            return Err(Refusal::new(
                CommandErrorCode::WrongStage,
                format!("job is {:?}, not {wanted}", job.stage).to_lowercase(),
            ));
        }
        if !pause && self.link != LinkState::Ready {
            return Err(Refusal::new(
                CommandErrorCode::LinkNotReady,
                "printer link is not ready",
            ));
        }
        let job_id = job.job_id.clone();
        out.push(Output::Printer(command));
        let muts = self.set_stage(to);
        out.push(Output::Persist(muts));
        let kind = if pause {
            EventKind::JobPaused { job_id }
        } else {
            EventKind::JobResumed { job_id }
        };
        self.event(now, kind, out);
        Ok(vec![])
    }

    fn cmd_cancel(
        &mut self,
        now: Now,
        r: JobRef,
        out: &mut Vec<Output>,
    ) -> Result<Vec<Mutation>, Refusal> {
        let job = self.check_job_ref(&r)?;
        if job.stage.is_terminal() {
            return Err(Refusal::new(
                CommandErrorCode::JobEnded,
                format!("job already ended ({:?})", job.stage).to_lowercase(),
            ));
        }
        if matches!(job.stage, JobStage::Printing | JobStage::Paused) {
            out.push(Output::Printer(PrinterCommand::CancelStream));
        }
        self.transfer = None;
        self.end_job(
            now,
            JobStage::Cancelled,
            Some("cancelled by command".into()),
            out,
        );
        Ok(vec![])
    }

    fn cmd_bed_cleared(
        &mut self,
        now: Now,
        out: &mut Vec<Output>,
    ) -> Result<Vec<Mutation>, Refusal> {
        match self.phase() {
            PrinterPhase::Preparing | PrinterPhase::Printing | PrinterPhase::Paused => {
                return Err(Refusal::new(
                    CommandErrorCode::PrinterHasJob,
                    "a job is on the printer; cancel it first",
                ))
            }
            PrinterPhase::Halted => {
                // The operator has looked at the printer: reset it (reopening the port resets
                // the board) and start from a clear bed.
                out.push(Output::Printer(PrinterCommand::ResetPrinter));
            }
            _ => {}
        }
        self.error = None;
        let mut muts = Vec::new();
        if self.current.as_ref().is_some_and(|j| j.stage.is_terminal()) {
            self.current = None;
            muts.push(Mutation::SetCurrent(None));
        }
        self.flags.bed_clear = true;
        muts.push(Mutation::SetFlags(self.flags));
        out.push(Output::Persist(muts));
        self.event(now, EventKind::BedCleared {}, out);
        Ok(vec![])
    }
}
