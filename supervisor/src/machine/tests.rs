//! Script-driven tests of the reactive loop: messages in, decisions out. No IO.

use super::*;
use protocol::command::CommandErrorCode;
use protocol::state::{JobProgress, LedgerEntry};

const FILE: &[u8] = b"G28\nG1 X10\n";

struct H {
    s: Supervisor,
    now: Now,
    seq: HashMap<String, u64>,
    n: u64,
}

fn pid(s: &str) -> PrinterId {
    PrinterId::new(s).expect("valid")
}

fn sha() -> Sha256Hex {
    Sha256Hex::digest(FILE)
}

fn state(phase: PrinterPhase, job: Option<(&str, JobStage)>) -> StateSnapshot {
    StateSnapshot {
        v: Version,
        epoch: 1,
        seq: 0,
        at_ms: 0,
        heartbeat_s: 10,
        phase,
        bed_clear: phase == PrinterPhase::Ready,
        maintenance: false,
        job: job.map(|(id, stage)| JobProgress {
            job_id: JobId::new(id).expect("valid"),
            file_sha256: sha(),
            name: "f".into(),
            stage,
            line: 1,
            total_lines: 2,
            progress_pct: 50.0,
            remaining_s: None,
            transferred_bytes: None,
            size_bytes: FILE.len() as u64,
            started_at_ms: Some(1),
            ended_at_ms: stage.is_terminal().then_some(2),
            reason: None,
        }),
        temps: None,
        last_command: None,
        recent_jobs: vec![],
        error: None,
    }
}

impl H {
    fn new() -> Self {
        Self::from(Snapshot::default())
    }

    fn from(snap: Snapshot) -> Self {
        let now = Now {
            mono_ms: 1_000,
            unix_ms: 1_795_000_000_000,
        };
        let mut s = Supervisor::new(SupervisorConfig::default(), snap, now);
        let _ = s.prepare_connect(now);
        let mut h = Self {
            s,
            now,
            seq: HashMap::new(),
            n: 0,
        };
        h.input(Input::Connected);
        h
    }

    fn input(&mut self, i: Input) -> Vec<Output> {
        self.s.handle(self.now, i)
    }

    fn advance(&mut self, ms: u64) -> Vec<Output> {
        self.now.mono_ms += ms;
        self.now.unix_ms += ms;
        let out = self.input(Input::Tick);
        // A deadline that is due right after its tick would wake the shell again at once, for
        // ever: a busy loop. Every timer either acts or moves its deadline on.
        if let Some(d) = self.s.next_deadline() {
            assert!(
                d > self.now.mono_ms,
                "next deadline {d} is not after the tick at {} (a busy loop)",
                self.now.mono_ms
            );
        }
        out
    }

    fn msg(&mut self, topic: &str, payload: Vec<u8>) -> Vec<Output> {
        self.input(Input::Message {
            topic: format!("printloop/v1/{topic}"),
            payload,
        })
    }

    fn online(&mut self, p: &str, epoch: u64) -> Vec<Output> {
        self.msg(
            &format!("printers/{p}/status"),
            Status::online(epoch, 0).encode(),
        )
    }

    fn report(&mut self, p: &str, mut st: StateSnapshot) -> Vec<Output> {
        let seq = self.seq.entry(p.to_owned()).or_insert(0);
        *seq += 1;
        st.seq = *seq;
        self.msg(&format!("printers/{p}/state"), st.encode())
    }

    fn api(&mut self, op: ApiOp) -> (ApiResponse, Vec<Output>) {
        self.n += 1;
        let id = format!("r{}", self.n);
        self.api_with_id(&id, op)
    }

    fn api_with_id(&mut self, id: &str, op: ApiOp) -> (ApiResponse, Vec<Output>) {
        let req = ApiRequest {
            v: Version,
            id: CommandId::new(id).expect("id"),
            client: ClientId::new("cli").expect("id"),
            op,
        };
        let out = self.msg("api/request", req.encode());
        let resp = published::<ApiResponse>(&out, "/api/response/cli")
            .pop()
            .expect("an answer");
        (resp, out)
    }

    fn store_file(&mut self) {
        self.input(Input::Uploaded {
            caller: Caller::Mqtt(ClientId::new("cli").expect("id")),
            id: CommandId::new("u").expect("id"),
            outcome: UploadOutcome::Progress {
                received: FILE.len() as u64,
                total_size: FILE.len() as u64,
                complete: Some(FileRecord {
                    sha256: sha(),
                    size_bytes: FILE.len() as u64,
                    stored_at_ms: 0,
                }),
            },
        });
    }

    fn submit(&mut self, copies: u32) -> (Vec<JobId>, Vec<Output>) {
        let (resp, out) = self.api(ApiOp::SubmitJob(SubmitJob {
            name: "f.gcode".into(),
            sha256: sha(),
            copies,
            priority: 0,
            tags: vec![],
        }));
        match resp.result {
            Some(ApiResult::Submitted { job_ids }) => (job_ids, out),
            other => panic!("submit failed: {other:?} {:?}", resp.error),
        }
    }

    fn job(&self, id: &JobId) -> JobRecord {
        self.s.jobs.get(id).cloned().expect("job exists")
    }
}

fn published<T: Payload>(out: &[Output], suffix: &str) -> Vec<T> {
    out.iter()
        .filter_map(|o| match o {
            Output::Publish(p) if p.topic.ends_with(suffix) => {
                Some(T::decode(&p.payload).expect("own payloads decode"))
            }
            _ => None,
        })
        .collect()
}

fn commands(out: &[Output], printer: &str) -> Vec<Command> {
    out.iter()
        .filter_map(|o| match o {
            Output::Publish(p) if p.topic == format!("printloop/v1/printers/{printer}/cmd") => {
                Some(Command::decode(&p.payload).expect("own commands decode"))
            }
            _ => None,
        })
        .collect()
}

fn starts(out: &[Output], printer: &str) -> Vec<StartJob> {
    commands(out, printer)
        .into_iter()
        .filter_map(|c| match c.action {
            CommandAction::StartJob(s) => Some(s),
            _ => None,
        })
        .collect()
}

#[test]
fn connect_subscribes_snapshots_at_qos0_then_births() {
    let mut s = Supervisor::new(
        SupervisorConfig::default(),
        Snapshot::default(),
        Now {
            mono_ms: 0,
            unix_ms: 5,
        },
    );
    let (muts, will_topic, _) = s.prepare_connect(Now {
        mono_ms: 0,
        unix_ms: 5,
    });
    assert_eq!(muts, vec![Mutation::SetEpoch(1)]);
    assert_eq!(will_topic, "printloop/v1/supervisor/status");
    let out = s.handle(
        Now {
            mono_ms: 0,
            unix_ms: 5,
        },
        Input::Connected,
    );
    let first_publish = out
        .iter()
        .position(|o| matches!(o, Output::Publish(_)))
        .expect("birth");
    let last_subscribe = out
        .iter()
        .rposition(|o| matches!(o, Output::Subscribe { .. }))
        .expect("subs");
    assert!(
        last_subscribe < first_publish,
        "subscribe first, then the birth"
    );
    assert!(out.contains(&Output::Subscribe {
        filter: "printloop/v1/printers/+/state".into(),
        qos0: true
    }));
    assert!(out.contains(&Output::Subscribe {
        filter: "printloop/v1/api/request".into(),
        qos0: false
    }));
    let birth = published::<Status>(&out, "supervisor/status")
        .pop()
        .expect("birth");
    assert_eq!((birth.presence, birth.epoch), (Presence::Online, 1));
}

#[test]
fn nominal_dispatch_print_harvest() {
    let mut h = H::new();
    h.online("p0", 1);
    h.report("p0", state(PrinterPhase::Ready, None));
    h.store_file();
    let (jobs, out) = h.submit(1);
    let j = &jobs[0];
    // Assigned, persisted, then the start leaves.
    let persist = out
        .iter()
        .position(|o| matches!(o, Output::Persist(m) if m.iter().any(|m| matches!(m, Mutation::PutJob(r) if r.state == JobState::Assigned))))
        .expect("assignment persisted");
    let start = out
        .iter()
        .position(|o| matches!(o, Output::Publish(p) if p.topic.ends_with("/p0/cmd")))
        .expect("start published");
    assert!(persist < start);
    let s = starts(&out, "p0");
    assert_eq!(s.len(), 1);
    assert_eq!(&s[0].job_id, j);
    assert!(
        commands(&out, "p0")[0].expires_at.is_some(),
        "starts expire"
    );

    h.report(
        "p0",
        state(
            PrinterPhase::Printing,
            Some((j.as_str(), JobStage::Printing)),
        ),
    );
    assert_eq!(h.job(j).state, JobState::Printing);
    h.report(
        "p0",
        state(
            PrinterPhase::Finished,
            Some((j.as_str(), JobStage::Finished)),
        ),
    );
    assert_eq!(h.job(j).state, JobState::Finished);

    let (r, out) = h.api(ApiOp::BedClear(BedClear {
        printer_id: pid("p0"),
        failed: false,
    }));
    assert!(r.ok, "{r:?}");
    assert_eq!(h.job(j).state, JobState::Done);
    assert!(commands(&out, "p0")
        .iter()
        .any(|c| matches!(c.action, CommandAction::BedCleared(_))));
}

#[test]
fn deferred_start_waits_for_the_bed_then_starts() {
    let mut h = H::new();
    h.online("p0", 1);
    h.report("p0", state(PrinterPhase::Idle, None));
    h.store_file();
    let (jobs, out) = h.submit(1);
    assert!(
        starts(&out, "p0").is_empty(),
        "no start while the bed is not clear"
    );
    assert_eq!(h.job(&jobs[0]).state, JobState::Assigned, "deferred on p0");
    let out = h.report("p0", state(PrinterPhase::Ready, None));
    assert_eq!(
        starts(&out, "p0").len(),
        1,
        "starts once the bed is confirmed clear"
    );
}

#[test]
fn a_deferred_job_moves_to_a_printer_that_is_ready_first() {
    let mut h = H::new();
    h.online("p0", 1);
    h.report("p0", state(PrinterPhase::Idle, None));
    h.store_file();
    let (jobs, _) = h.submit(1);
    assert_eq!(h.job(&jobs[0]).printer, Some(pid("p0")));
    h.online("p1", 1);
    let out = h.report("p1", state(PrinterPhase::Ready, None));
    assert_eq!(starts(&out, "p1").len(), 1);
    assert_eq!(h.job(&jobs[0]).printer, Some(pid("p1")));
}

#[test]
fn restart_reconciles_a_job_that_finished_while_apart_without_starting_it_again() {
    let mut h = H::new();
    h.online("p0", 1);
    h.report("p0", state(PrinterPhase::Ready, None));
    h.store_file();
    let (jobs, _) = h.submit(1);
    let j = jobs[0].clone();
    h.report(
        "p0",
        state(
            PrinterPhase::Printing,
            Some((j.as_str(), JobStage::Printing)),
        ),
    );
    // The supervisor restarts from its store (what it had persisted).
    let mut h2 = H::from(durable(&h));
    // The retained state: the job ended while the supervisor was down and the bed was cleared.
    let mut st = state(PrinterPhase::Ready, None);
    st.epoch = 2;
    st.recent_jobs = vec![LedgerEntry {
        job_id: j.clone(),
        outcome: JobStage::Finished,
        line: 2,
        ended_at_ms: 9,
    }];
    h2.online("p0", 2);
    let out = h2.report("p0", st);
    assert_eq!(
        h2.job(&j).state,
        JobState::Finished,
        "recorded finished, not lost or interrupted"
    );
    assert!(
        starts(&out, "p0").iter().all(|s| s.job_id != j),
        "never started twice"
    );
    assert!(h2.s.counters().reconciliations >= 1);
}

#[test]
fn a_silent_printer_keeps_its_job_which_times_out_and_is_never_moved() {
    let mut h = H::new();
    for p in ["p0", "p1"] {
        h.online(p, 1);
    }
    h.report("p0", state(PrinterPhase::Ready, None));
    h.store_file();
    let (jobs, _) = h.submit(1);
    let j = jobs[0].clone();
    h.report(
        "p0",
        state(
            PrinterPhase::Printing,
            Some((j.as_str(), JobStage::Printing)),
        ),
    );
    h.msg("printers/p0/status", Status::offline(1, 0, None).encode());
    h.report("p1", state(PrinterPhase::Ready, None));
    let mut all = Vec::new();
    for _ in 0..40 {
        all.extend(h.advance(10_000));
        h.report("p1", state(PrinterPhase::Ready, None));
    }
    assert_eq!(h.job(&j).state, JobState::TimedOut);
    assert_eq!(h.job(&j).printer, Some(pid("p0")));
    assert!(
        starts(&all, "p1").is_empty(),
        "the job is never moved to another printer"
    );
    // The printer comes back and reports: the view converges.
    h.online("p0", 2);
    let mut st = state(
        PrinterPhase::Printing,
        Some((j.as_str(), JobStage::Printing)),
    );
    st.epoch = 2;
    h.seq.insert("p0".into(), 0);
    h.report("p0", st);
    assert_eq!(h.job(&j).state, JobState::Printing);
}

#[test]
fn late_will_of_an_older_epoch_is_ignored() {
    let mut h = H::new();
    h.online("p0", 2);
    h.msg("printers/p0/status", Status::offline(1, 0, None).encode());
    assert_eq!(h.s.printer_summaries()[0].presence, Presence::Online);
    h.msg("printers/p0/status", Status::offline(2, 0, None).encode());
    assert_eq!(h.s.printer_summaries()[0].presence, Presence::Offline);
}

#[test]
fn circuit_breaker_holds_a_failing_printer_until_released() {
    let mut h = H::new();
    h.online("p0", 1);
    h.store_file();
    h.submit(1);
    for i in 0..3 {
        h.report("p0", state(PrinterPhase::Ready, None));
        // Each failed attempt is requeued when the bed is cleared and comes back to p0.
        let j = h.s.printers[&pid("p0")]
            .rec
            .assigned
            .clone()
            .unwrap_or_else(|| panic!("round {i}: nothing assigned"));
        assert_eq!(h.job(&j).attempt, i);
        h.report(
            "p0",
            state(PrinterPhase::Finished, Some((j.as_str(), JobStage::Failed))),
        );
        assert_eq!(h.job(&j).state, JobState::Failed);
        h.api(ApiOp::BedClear(BedClear {
            printer_id: pid("p0"),
            failed: false,
        }));
    }
    assert!(h.s.printer_summaries()[0].held);
    let out = h.report("p0", state(PrinterPhase::Ready, None));
    assert!(starts(&out, "p0").is_empty(), "held: no dispatch");
    let (r, out) = h.api(ApiOp::ReleasePrinter(protocol::api::PrinterArgs {
        printer_id: pid("p0"),
    }));
    assert!(r.ok);
    assert_eq!(starts(&out, "p0").len(), 1, "released: work again at once");
}

#[test]
fn a_retried_request_gets_the_same_answer_and_queues_nothing_twice() {
    let mut h = H::new();
    h.store_file();
    let op = ApiOp::SubmitJob(SubmitJob {
        name: "f".into(),
        sha256: sha(),
        copies: 2,
        priority: 0,
        tags: vec![],
    });
    let (a, _) = h.api_with_id("same", op.clone());
    let (b, _) = h.api_with_id("same", op);
    assert_eq!(a, b);
    assert_eq!(h.s.jobs.len(), 2);
}

#[test]
fn bad_requests_get_clear_errors() {
    let mut h = H::new();
    let (r, _) = h.api(ApiOp::SubmitJob(SubmitJob {
        name: "f".into(),
        sha256: sha(),
        copies: 1,
        priority: 0,
        tags: vec![],
    }));
    assert!(
        !r.ok && r.code == Some(ApiErrorCode::FileNotStored),
        "{r:?}"
    );
    let (r, _) = h.api(ApiOp::BedClear(BedClear {
        printer_id: pid("nope"),
        failed: false,
    }));
    assert!(
        !r.ok && r.code == Some(ApiErrorCode::UnknownPrinter),
        "{r:?}"
    );
    let out = h.msg(
        "api/request",
        br#"{"v":1,"id":"x","client":"cli","op":"format_disk","args":{}}"#.to_vec(),
    );
    let r = published::<ApiResponse>(&out, "/api/response/cli")
        .pop()
        .expect("answer");
    assert!(
        !r.ok
            && r.code == Some(ApiErrorCode::Invalid)
            && r.error.as_deref().unwrap_or("").contains("unknown op"),
        "{r:?}"
    );
    // Garbage on printer topics is counted and ignored.
    h.msg("printers/p0/state", b"{garbage".to_vec());
    assert_eq!(h.s.counters().rejected_messages, 2);
}

#[test]
fn a_start_with_no_sign_of_life_is_sent_again_with_a_new_command_id() {
    let mut h = H::new();
    h.online("p0", 1);
    h.report("p0", state(PrinterPhase::Ready, None));
    h.store_file();
    let (_, out) = h.submit(1);
    let first = commands(&out, "p0");
    let mut later = Vec::new();
    for _ in 0..4 {
        later.extend(h.advance(5_000));
        h.report("p0", state(PrinterPhase::Ready, None));
    }
    let again = commands(&later, "p0");
    assert!(!again.is_empty(), "re-sent");
    assert_ne!(again[0].id, first[0].id);
    assert_eq!(
        starts(&later, "p0")[0].job_id,
        starts(&out, "p0")[0].job_id,
        "same job id: the gateway's ledger makes it idempotent"
    );
    assert!(h.s.counters().command_retries >= 1);
}

/// What a restart would load: the machine's durable records.
fn durable(h: &H) -> Snapshot {
    Snapshot {
        epoch: h.s.epoch,
        next_job: h.s.next_job,
        jobs: h.s.jobs.values().cloned().collect(),
        printers: h.s.printers.values().map(|p| p.rec.clone()).collect(),
        files: h.s.files.values().cloned().collect(),
        requests: vec![],
    }
}

#[test]
fn a_start_sent_before_a_restart_is_not_moved_until_it_has_surely_expired() {
    // Found by the simulation (seed 952): the supervisor sent a start, the printer accepted it,
    // and the supervisor restarted before hearing so. It must not give the job to a second
    // printer while the first may be printing it.
    let mut h = H::new();
    h.online("p0", 1);
    h.report("p0", state(PrinterPhase::Ready, None));
    h.store_file();
    let (jobs, out) = h.submit(1);
    let j = jobs[0].clone();
    assert_eq!(starts(&out, "p0").len(), 1);
    let snap = durable(&h);
    assert!(
        snap.printers
            .iter()
            .any(|p| p.start_sent.as_ref().is_some_and(|s| s.job == j)),
        "the start is recorded as sent"
    );
    let mut h2 = H::from(snap);
    // p0's report predates the start (its next one is on the way); p1 is ready.
    let mut idle = state(PrinterPhase::Idle, None);
    idle.epoch = 2;
    h2.online("p0", 2);
    h2.report("p0", idle.clone());
    h2.online("p1", 1);
    let mut all = h2.report("p1", state(PrinterPhase::Ready, None));
    for _ in 0..24 {
        all.extend(h2.advance(5_000));
        all.extend(h2.report("p0", idle.clone()));
        all.extend(h2.report("p1", state(PrinterPhase::Ready, None)));
    }
    assert!(
        starts(&all, "p1").is_empty(),
        "not moved while the start may still be accepted"
    );
    assert_eq!(h2.job(&j).printer, Some(pid("p0")));
    // Expired (plus the clock-skew allowance) and p0 still does not have it: it may move.
    for _ in 0..4 {
        all.extend(h2.advance(5_000));
        all.extend(h2.report("p0", idle.clone()));
        all.extend(h2.report("p1", state(PrinterPhase::Ready, None)));
    }
    assert_eq!(starts(&all, "p1").len(), 1, "moved once surely refused");
    assert_eq!(h2.job(&j).printer, Some(pid("p1")));
    let p0 = &h2.s.printers[&pid("p0")].rec;
    assert_eq!(p0.start_sent, None, "the given-up start is cleared durably");
}

#[test]
fn a_deferred_job_stays_until_its_printer_reports_that_it_does_not_have_it() {
    // Found by the simulation (seeds 1374, 4806): after a restart, a deferred job was moved
    // from a printer whose report had not come in yet, while that printer had accepted it.
    let mut h = H::new();
    h.online("p0", 1);
    h.report("p0", state(PrinterPhase::Idle, None));
    h.store_file();
    let (jobs, _) = h.submit(1);
    let j = jobs[0].clone();
    assert_eq!(h.job(&j).printer, Some(pid("p0")), "deferred on p0");
    let mut h2 = H::from(durable(&h));
    h2.online("p1", 1);
    let out = h2.report("p1", state(PrinterPhase::Ready, None));
    assert!(starts(&out, "p1").is_empty(), "p0 has not reported yet");
    assert_eq!(h2.job(&j).printer, Some(pid("p0")));
    h2.online("p0", 2);
    let mut idle = state(PrinterPhase::Idle, None);
    idle.epoch = 2;
    let out = h2.report("p0", idle);
    assert_eq!(
        starts(&out, "p1").len(),
        1,
        "moved once p0 shows it has not"
    );
}

fn refusal(id: &CommandId, at_ms: u64) -> Vec<u8> {
    CommandResult {
        v: Version,
        id: id.clone(),
        status: ResultStatus::Error,
        reason: Some("job is already on this printer".into()),
        code: Some(CommandErrorCode::AlreadyAccepted),
        epoch: 1,
        at_ms,
        retry_after_ms: None,
    }
    .encode()
}

/// A start sent twice to p0 (no answer to the first): returns the job and the retry's id.
fn start_sent_twice(h: &mut H) -> (JobId, CommandId) {
    h.online("p0", 1);
    h.report("p0", state(PrinterPhase::Ready, None));
    h.store_file();
    let (jobs, out) = h.submit(1);
    let first = commands(&out, "p0")[0].id.clone();
    let mut later = Vec::new();
    for _ in 0..4 {
        later.extend(h.advance(5_000));
        h.report("p0", state(PrinterPhase::Ready, None));
    }
    let retry = commands(&later, "p0")
        .last()
        .expect("sent again")
        .id
        .clone();
    assert_ne!(retry, first);
    (jobs[0].clone(), retry)
}

#[test]
fn a_refused_retry_does_not_free_the_job_until_a_later_report() {
    // p0 accepted the first send; its refusal of the retry ("already on this printer") comes
    // in before the report that shows the job. The job must not move meanwhile.
    let mut h = H::new();
    let (j, retry) = start_sent_twice(&mut h);
    h.online("p1", 1);
    let mut out = h.msg("printers/p0/cmd/result", refusal(&retry, 1_000));
    out.extend(h.report("p1", state(PrinterPhase::Ready, None)));
    // A report made before the refusal (at_ms 0): it cannot say whether p0 has the job.
    out.extend(h.report("p0", state(PrinterPhase::Idle, None)));
    assert!(
        starts(&out, "p1").is_empty(),
        "not moved on a refusal alone"
    );
    assert_eq!(h.job(&j).printer, Some(pid("p0")));
    let mut st = state(
        PrinterPhase::Preparing,
        Some((j.as_str(), JobStage::Transferring)),
    );
    st.at_ms = 1_001;
    h.report("p0", st);
    assert_eq!(h.job(&j).state, JobState::Transferring);
    assert_eq!(h.job(&j).printer, Some(pid("p0")));
}

#[test]
fn a_refused_start_frees_the_job_once_a_later_report_shows_the_printer_without_it() {
    let mut h = H::new();
    let (j, retry) = start_sent_twice(&mut h);
    h.online("p1", 1);
    h.msg("printers/p0/cmd/result", refusal(&retry, 1_000));
    let mut idle = state(PrinterPhase::Idle, None);
    idle.at_ms = 1_001;
    h.report("p0", idle);
    let out = h.report("p1", state(PrinterPhase::Ready, None));
    assert_eq!(
        starts(&out, "p1").len(),
        1,
        "moved: p0 said it does not have it"
    );
    assert_eq!(h.job(&j).printer, Some(pid("p1")));
}

#[test]
fn a_job_that_timed_out_before_it_started_starts_when_its_printer_is_back() {
    // Found by the simulation (seeds 209, 235): the job stayed timed out forever.
    let mut h = H::new();
    h.online("p0", 1);
    h.report("p0", state(PrinterPhase::Idle, None));
    h.store_file();
    let (jobs, _) = h.submit(1);
    let j = jobs[0].clone();
    assert_eq!(
        h.job(&j).state,
        JobState::Assigned,
        "deferred: the bed is not clear"
    );
    h.msg("printers/p0/status", Status::offline(1, 0, None).encode());
    for _ in 0..40 {
        h.advance(10_000);
    }
    assert_eq!(h.job(&j).state, JobState::TimedOut);
    h.online("p0", 2);
    let mut st = state(PrinterPhase::Ready, None);
    st.epoch = 2;
    h.seq.insert("p0".into(), 0);
    let out = h.report("p0", st);
    assert_eq!(h.job(&j).state, JobState::Assigned);
    assert_eq!(starts(&out, "p0").len(), 1, "started where it was placed");
}

#[test]
fn a_printer_whose_job_was_cancelled_before_it_had_it_is_freed_when_it_reports() {
    // Found by the simulation's long mode (seeds 22880, 25124, …): a deferred job on a silent
    // printer timed out and was cancelled; the printer came back without it and stayed
    // assigned to the cancelled job for ever, taking no more work.
    let mut h = H::new();
    h.online("p0", 1);
    h.report("p0", state(PrinterPhase::Idle, None));
    h.store_file();
    let (jobs, _) = h.submit(1);
    let j = jobs[0].clone();
    h.msg("printers/p0/status", Status::offline(1, 0, None).encode());
    for _ in 0..40 {
        h.advance(10_000);
    }
    assert_eq!(h.job(&j).state, JobState::TimedOut);
    let (resp, _) = h.api(ApiOp::CancelJob(JobArgs { job_id: j.clone() }));
    assert!(resp.error.is_none(), "{:?}", resp.error);
    h.online("p0", 2);
    let mut st = state(PrinterPhase::Ready, None);
    st.epoch = 2;
    h.seq.insert("p0".into(), 0);
    h.report("p0", st);
    assert_eq!(h.s.printers[&pid("p0")].rec.assigned, None, "free again");
    let (more, _) = h.submit(1);
    assert_eq!(
        h.job(&more[0]).printer,
        Some(pid("p0")),
        "and takes new work"
    );
}

#[test]
fn an_assigned_job_no_printer_holds_goes_back_to_the_queue() {
    // Found by the simulation (seeds 130, 289, 757, 883): a job stayed assigned to a printer
    // that had been found running another job, and nothing would ever start it.
    let mut h = H::new();
    h.online("p0", 1);
    h.report("p0", state(PrinterPhase::Idle, None));
    h.store_file();
    let (jobs, _) = h.submit(1);
    let j = jobs[0].clone();
    assert_eq!(h.job(&j).printer, Some(pid("p0")));
    // p0 no longer holds it (as after it was found running another job).
    h.s.printers.get_mut(&pid("p0")).expect("p0").rec.assigned = None;
    h.online("p1", 1);
    let out = h.report("p1", state(PrinterPhase::Ready, None));
    assert_eq!(starts(&out, "p1").len(), 1);
    assert_eq!(h.job(&j).printer, Some(pid("p1")));
}

#[test]
fn bed_clear_with_failed_requeues_a_new_attempt() {
    let mut h = H::new();
    h.online("p0", 1);
    h.report("p0", state(PrinterPhase::Ready, None));
    h.store_file();
    let (jobs, _) = h.submit(1);
    let j = jobs[0].clone();
    h.report(
        "p0",
        state(
            PrinterPhase::Finished,
            Some((j.as_str(), JobStage::Finished)),
        ),
    );
    let (r, _) = h.api(ApiOp::BedClear(BedClear {
        printer_id: pid("p0"),
        failed: true,
    }));
    assert!(r.ok);
    assert_eq!(h.job(&j).state, JobState::Failed);
    let retry = JobId::new(format!("{j}.r1")).expect("id");
    assert_eq!(
        h.job(&retry).state,
        JobState::Assigned,
        "a new attempt, straight back to work"
    );
}

#[test]
fn bed_clear_right_after_the_job_ended_event_is_accepted() {
    let mut h = H::new();
    h.online("p0", 1);
    h.report("p0", state(PrinterPhase::Ready, None));
    h.store_file();
    let (jobs, _) = h.submit(1);
    let j = jobs[0].clone();
    h.report(
        "p0",
        state(
            PrinterPhase::Printing,
            Some((j.as_str(), JobStage::Printing)),
        ),
    );
    // The event arrives before the next state (states are rate-limited).
    let ev = Event {
        v: Version,
        epoch: 1,
        seq: 100,
        at_ms: 5,
        event: EventKind::JobEnded {
            job_id: j.clone(),
            outcome: JobStage::Finished,
            line: 2,
            reason: None,
        },
    };
    h.msg("printers/p0/events", ev.encode());
    assert_eq!(h.job(&j).state, JobState::Finished);
    let (r, out) = h.api(ApiOp::BedClear(BedClear {
        printer_id: pid("p0"),
        failed: false,
    }));
    assert!(r.ok, "{r:?}");
    assert_eq!(h.job(&j).state, JobState::Done);
    assert!(commands(&out, "p0")
        .iter()
        .any(|c| matches!(c.action, CommandAction::BedCleared(_))));
    // A printer that is really still printing is refused.
    let (jobs, _) = h.submit(1);
    let k = jobs[0].clone();
    h.report(
        "p0",
        state(
            PrinterPhase::Printing,
            Some((k.as_str(), JobStage::Printing)),
        ),
    );
    let (r, _) = h.api(ApiOp::BedClear(BedClear {
        printer_id: pid("p0"),
        failed: false,
    }));
    assert!(
        !r.ok && r.code == Some(ApiErrorCode::PrinterNotDone),
        "{r:?}"
    );
}

mod ha;

fn notices(out: &[Output]) -> Vec<String> {
    out.iter()
        .filter_map(|o| match o {
            Output::Notify(n) => Some(n.id.clone()),
            _ => None,
        })
        .collect()
}

/// Webhooks (issue #12): a print tells started, finished and a bed to clear, each once,
/// whether the printer says so by report (reconciliation) or by event, or both, repeated.
#[test]
fn a_print_notifies_started_finished_and_bed_to_clear_once_each() {
    let mut h = H::new();
    h.online("p0", 1);
    h.report("p0", state(PrinterPhase::Ready, None));
    h.store_file();
    let (jobs, out) = h.submit(1);
    let j = jobs[0].clone();
    let mut all = notices(&out);
    let printing = state(
        PrinterPhase::Printing,
        Some((j.as_str(), JobStage::Printing)),
    );
    all.extend(notices(&h.report("p0", printing.clone())));
    all.extend(notices(&h.report("p0", printing)));
    let started = Event {
        v: Version,
        epoch: 1,
        seq: 1000,
        at_ms: 5,
        event: EventKind::JobStarted { job_id: j.clone() },
    };
    all.extend(notices(&h.msg("printers/p0/events", started.encode())));
    let ended = Event {
        v: Version,
        epoch: 1,
        seq: 1001,
        at_ms: 6,
        event: EventKind::JobEnded {
            job_id: j.clone(),
            outcome: JobStage::Finished,
            line: 2,
            reason: None,
        },
    };
    all.extend(notices(&h.msg("printers/p0/events", ended.encode())));
    all.extend(notices(&h.report(
        "p0",
        state(
            PrinterPhase::Finished,
            Some((j.as_str(), JobStage::Finished)),
        ),
    )));
    assert_eq!(
        all,
        vec![
            format!("job.started:{j}"),
            format!("job.finished:{j}"),
            format!("printer.awaiting_bed_clear:{j}"),
        ]
    );
}

/// Issue #10, item 10: any client could pull any stored G-code by asking under any printer's
/// name. A file is served only to a printer with a job on its way that uses it.
#[test]
fn files_are_served_only_to_the_printer_whose_job_uses_them() {
    let mut h = H::new();
    h.online("p0", 1);
    h.online("p1", 1);
    h.report("p0", state(PrinterPhase::Ready, None));
    h.store_file();
    let request = |id: &str| FileChunkRequest {
        v: Version,
        request_id: CommandId::new(id).expect("id"),
        sha256: sha(),
        offset: 0,
        len: 16,
    };
    let served = |out: &[Output]| out.iter().any(|o| matches!(o, Output::ServeChunk { .. }));
    // Stored, but no job: refused, with an answer.
    let out = h.msg("printers/p0/file/request", request("r1").encode());
    assert!(!served(&out));
    let refusal = published::<FileChunkResponse>(&out, "/p0/file/chunk")
        .pop()
        .expect("an answer");
    assert!(matches!(
        refusal,
        FileChunkResponse::Error {
            code: ChunkErrorCode::NotFound,
            ..
        }
    ));
    let (jobs, _) = h.submit(1);
    assert_eq!(h.job(&jobs[0]).printer, Some(pid("p0")));
    assert!(served(
        &h.msg("printers/p0/file/request", request("r2").encode())
    ));
    // Another printer (or a stranger using its name) gets nothing.
    let out = h.msg("printers/p1/file/request", request("r3").encode());
    assert!(!served(&out));
    // Once the job prints, the file is not served again.
    h.report(
        "p0",
        state(
            PrinterPhase::Printing,
            Some((jobs[0].as_str(), JobStage::Printing)),
        ),
    );
    assert!(!served(
        &h.msg("printers/p0/file/request", request("r4").encode())
    ));
}

/// Issue #10, item 6: command ids were `sup-<epoch>-<n>`, so a client could send the next one
/// first and the real start was answered `duplicate`. Now the id ends with a keyed digest.
#[test]
fn command_ids_cannot_be_guessed() {
    let first_start = || {
        let mut h = H::new();
        h.online("p0", 1);
        h.report("p0", state(PrinterPhase::Ready, None));
        h.store_file();
        let (_, out) = h.submit(1);
        commands(&out, "p0").pop().expect("a start").id
    };
    let (a, b) = (first_start(), first_start());
    assert_ne!(a, b, "two supervisors (two keys) never send the same ids");
    let parts: Vec<&str> = a.as_str().split('-').collect();
    assert_eq!(parts[..3], ["sup", "1", "1"], "{a}");
    assert!(
        parts[3].len() == 10 && parts[3].chars().all(|c| c.is_ascii_hexdigit()),
        "{a}"
    );
}

/// Home Assistant's presses are API requests of a reserved client whose ids come from the
/// printer's state: a network client may not use that name (it could claim a press's id first).
#[test]
fn api_requests_under_home_assistants_reserved_client_are_refused() {
    let mut h = H::new();
    let req = ApiRequest {
        v: Version,
        id: CommandId::new("ha-p0-pause-7-1042").expect("id"),
        client: ClientId::new(HA_CLIENT).expect("id"),
        op: ApiOp::ListJobs(ListJobs::default()),
    };
    let out = h.msg("api/request", req.encode());
    let resp = published::<ApiResponse>(&out, "/api/response/homeassistant")
        .pop()
        .expect("an answer");
    assert!(!resp.ok);
    assert_eq!(resp.code, Some(ApiErrorCode::ReservedClient));
}

/// Issue #10, item 9: retained messages for an invented printer `ghost` made the supervisor
/// dispatch a real job to it. With a client registry, only enrolled printers get work; the
/// others are listed, flagged.
#[test]
fn only_enrolled_printers_get_work() {
    let mut h = H::new();
    h.input(Input::Enrolled(Some([pid("p0")].into_iter().collect())));
    h.online("ghost", 1);
    h.report("ghost", state(PrinterPhase::Ready, None));
    h.store_file();
    let (jobs, out) = h.submit(1);
    assert!(
        starts(&out, "ghost").is_empty(),
        "no work for a printer nobody enrolled"
    );
    assert_eq!(h.job(&jobs[0]).state, JobState::Queued);
    let (resp, _) = h.api(ApiOp::ListPrinters(Default::default()));
    let Some(ApiResult::Printers { printers }) = resp.result else {
        panic!("{resp:?}")
    };
    assert_eq!(printers.len(), 1);
    assert!(!printers[0].enrolled);
    // The real printer gets the job.
    h.online("p0", 1);
    let out = h.report("p0", state(PrinterPhase::Ready, None));
    assert_eq!(starts(&out, "p0").len(), 1);
    // Enrolling the other one later (`printloop printers add ghost`) lets it work too.
    h.input(Input::Enrolled(Some(
        [pid("p0"), pid("ghost")].into_iter().collect(),
    )));
    let (_, out) = h.submit(1);
    assert_eq!(starts(&out, "ghost").len(), 1);
}

#[test]
fn a_burst_of_requests_is_answered_in_full_with_busy_beyond_the_clients_rate() {
    let mut h = H::new();
    let (mut ok, mut busy) = (0, 0);
    for i in 0..1_000 {
        let (r, out) = h.api_with_id(&format!("b{i}"), ApiOp::ListJobs(Default::default()));
        if r.ok {
            ok += 1;
        } else {
            assert!(r.code == Some(ApiErrorCode::Busy), "{r:?}");
            assert!(r.retry_after_ms.is_some_and(|ms| ms > 0));
            assert!(out.iter().all(|o| match o {
                Output::Publish(p) => p.lane == Lane::Refusal,
                Output::Persist(_) => false,
                _ => true,
            }));
            busy += 1;
        }
    }
    assert_eq!(ok, API_RATE.burst as usize);
    assert_eq!(ok + busy, 1_000, "every request is answered");
    // Another client is served as usual.
    let req = ApiRequest {
        v: Version,
        id: CommandId::new("o1").expect("id"),
        client: ClientId::new("other").expect("id"),
        op: ApiOp::ListJobs(Default::default()),
    };
    let out = h.msg("api/request", req.encode());
    assert!(published::<ApiResponse>(&out, "/api/response/other")[0].ok);
    // A malformed request with a readable id and client counts too (and is answered busy).
    let out = h.msg(
        "api/request",
        br#"{"v":1,"id":"m1","client":"cli","op":"nope"}"#.to_vec(),
    );
    let r = published::<ApiResponse>(&out, "/api/response/cli");
    assert_eq!(r[0].code, Some(ApiErrorCode::Busy));
    assert_eq!(h.s.counters.busy_requests, busy as u64 + 1);
}

/// Issue #13: an upload is hundreds of chunks; under the API rate it was held to 6.5 MB/s and
/// used up the client's allowance for everything else. Upload chunks have a rate of their own:
/// a burst of them is taken up to `UPLOAD_RATE`'s burst (to the writers, nothing answered on
/// the loop), and the same client's other requests are still admitted.
#[test]
fn upload_chunks_have_a_rate_of_their_own() {
    let mut h = H::new();
    let chunk = |i: u64| {
        ApiOp::UploadChunk(protocol::api::UploadChunk {
            sha256: Sha256Hex::digest(FILE),
            offset: i,
            total_size: 1 << 30,
            data_b64: "RzI4Cg==".into(),
        })
    };
    let (mut taken, mut busy) = (0usize, 0usize);
    for i in 0..1_000u64 {
        let req = ApiRequest {
            v: Version,
            id: CommandId::new(format!("u{i}")).expect("id"),
            client: ClientId::new("cli").expect("id"),
            op: chunk(i),
        };
        let out = h.msg("api/request", req.encode());
        if out.iter().any(|o| matches!(o, Output::StoreUpload { .. })) {
            taken += 1;
        } else {
            let r = published::<ApiResponse>(&out, "/api/response/cli");
            assert_eq!(r[0].code, Some(ApiErrorCode::Busy), "{r:?}");
            busy += 1;
        }
    }
    assert!(
        taken as f64 >= super::config::UPLOAD_RATE.burst && taken > API_RATE.burst as usize,
        "{taken} upload chunks taken"
    );
    assert_eq!(taken + busy, 1_000);
    // The uploads did not use up this client's allowance for other requests.
    let (r, _) = h.api_with_id("list", ApiOp::ListJobs(Default::default()));
    assert!(r.ok, "{r:?}");
}

#[test]
fn a_start_answered_busy_is_sent_again_when_the_gateway_says() {
    let mut h = H::new();
    h.online("p0", 1);
    h.report("p0", state(PrinterPhase::Ready, None));
    h.store_file();
    let (_, out) = h.submit(1);
    let first = commands(&out, "p0").pop().expect("start");
    assert_eq!(
        first.client.as_ref().map(|c| c.as_str()),
        Some("supervisor")
    );
    let busy = CommandResult {
        v: Version,
        id: first.id.clone(),
        status: ResultStatus::Busy,
        reason: None,
        code: Some(CommandErrorCode::Busy),
        epoch: 1,
        at_ms: 0,
        retry_after_ms: Some(300),
    };
    h.msg("printers/p0/cmd/result", busy.encode());
    assert!(starts(&h.advance(299), "p0").is_empty());
    let again = starts(&h.advance(1), "p0");
    assert_eq!(
        again.len(),
        1,
        "sent again after 300 ms, not after command_retry_ms"
    );
    assert_eq!(h.s.counters.busy_commands, 1);
}

#[test]
fn a_forged_job_ended_or_state_from_another_printer_changes_no_job() {
    let mut h = H::new();
    h.input(Input::Enrolled(Some([pid("p0")].into_iter().collect())));
    h.online("p0", 1);
    h.report("p0", state(PrinterPhase::Ready, None));
    h.store_file();
    let (jobs, _) = h.submit(2);
    let (placed, queued) = (&jobs[0], &jobs[1]);
    h.report(
        "p0",
        state(
            PrinterPhase::Printing,
            Some((placed.as_str(), JobStage::Printing)),
        ),
    );
    assert_eq!(h.job(placed).state, JobState::Printing);
    // An invented printer says the placed job ended there, and runs the queued one.
    let ended = Event {
        v: Version,
        epoch: 1,
        seq: 1,
        at_ms: 0,
        event: EventKind::JobEnded {
            job_id: placed.clone(),
            outcome: JobStage::Finished,
            line: 2,
            reason: None,
        },
    };
    h.msg("printers/ghost/events", ended.encode());
    h.report(
        "ghost",
        state(
            PrinterPhase::Finished,
            Some((placed.as_str(), JobStage::Finished)),
        ),
    );
    h.report(
        "ghost",
        state(
            PrinterPhase::Printing,
            Some((queued.as_str(), JobStage::Printing)),
        ),
    );
    assert_eq!(h.job(placed).state, JobState::Printing);
    assert_eq!(h.job(placed).printer, Some(pid("p0")));
    assert_eq!(h.job(queued).state, JobState::Queued);
    assert_eq!(h.job(queued).printer, None);
    assert!(h.s.counters.foreign_jobs >= 2);
}

#[test]
fn the_live_printer_is_followed_again_after_a_forged_seq_or_offline_epoch() {
    let mut h = H::new();
    h.online("p0", 5);
    let live = |seq: u64| StateSnapshot {
        epoch: 5,
        seq,
        ..state(PrinterPhase::Ready, None)
    };
    h.msg("printers/p0/state", live(1).encode());
    // A forged state with an impossible seq, then the live printer's heartbeats.
    let forged = StateSnapshot {
        seq: u64::MAX,
        phase: PrinterPhase::Error,
        ..live(0)
    };
    h.msg("printers/p0/state", forged.encode());
    assert_eq!(
        h.s.printers[&pid("p0")].state.as_ref().map(|s| s.phase),
        Some(PrinterPhase::Error)
    );
    // A lone old copy repeated is not a live stream.
    for _ in 0..5 {
        h.advance(5_000);
        h.msg("printers/p0/state", live(1).encode());
    }
    assert_eq!(h.s.counters.report_resets, 0);
    for seq in 2..=4 {
        h.advance(5_000);
        h.msg("printers/p0/state", live(seq).encode());
    }
    let p = &h.s.printers[&pid("p0")];
    assert_eq!(
        p.state.as_ref().map(|s| (s.seq, s.phase)),
        Some((4, PrinterPhase::Ready))
    );
    assert_eq!(h.s.counters.report_resets, 1);
    assert!(!p.stale);

    // A forged offline status with a huge epoch: the printer is offline, then followed again.
    h.msg(
        "printers/p0/status",
        Status::offline(1_000, 0, None).encode(),
    );
    assert_eq!(h.s.printers[&pid("p0")].presence, Presence::Offline);
    for seq in 5..=7 {
        h.advance(5_000);
        h.msg("printers/p0/state", live(seq).encode());
    }
    let p = &h.s.printers[&pid("p0")];
    assert_eq!(p.presence, Presence::Online);
    assert_eq!(p.status_epoch, 5);
    assert_eq!(h.s.counters.report_resets, 2);
    // The real online status of that epoch is taken again.
    h.online("p0", 5);
    assert_eq!(h.s.printers[&pid("p0")].presence, Presence::Online);
}

#[test]
fn a_forged_supervisor_status_is_corrected_at_most_once_a_second() {
    let mut h = H::new();
    let status = |out: &[Output]| published::<Status>(out, "/supervisor/status");
    // Our echo is fine.
    let epoch = h.s.epoch();
    let out = h.msg("supervisor/status", Status::online(epoch, 0).encode());
    assert!(status(&[out, h.advance(2_000)].concat()).is_empty());
    let mut sent = Vec::new();
    for _ in 0..20 {
        sent.extend(status(&h.msg(
            "supervisor/status",
            Status::offline(epoch + 9, 0, None).encode(),
        )));
        sent.extend(status(&h.advance(100)));
    }
    // Two seconds of forgeries every 100 ms: corrected at once, then once a second.
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert!(sent.windows(2).all(|w| w[1].at_ms >= w[0].at_ms + 1_000));
    assert!(sent
        .iter()
        .all(|s| s.presence == Presence::Online && s.epoch == epoch));
}

/// History's utilisation: time printing over the window, which starts when the printer was
/// first seen if that is within the last day.
#[test]
fn utilisation_counts_printing_time_since_the_printer_was_first_seen() {
    let mut h = H::new();
    h.online("p0", 1);
    h.report("p0", state(PrinterPhase::Ready, None));
    h.store_file();
    let (jobs, _) = h.submit(1);
    let j = jobs[0].clone();
    let t0 = h.now.unix_ms;
    let mut printing = state(
        PrinterPhase::Printing,
        Some((j.as_str(), JobStage::Printing)),
    );
    printing.job.as_mut().expect("job").started_at_ms = Some(t0);
    h.report("p0", printing);
    let first_seen = h.s.utilisation(t0);
    assert_eq!(first_seen[0].printing_s, 0);
    let u = h.s.utilisation(t0 + 100_000);
    assert_eq!((u[0].window_s, u[0].printing_s), (100, 100), "{u:?}");
    assert_eq!(u[0].utilisation_pct, 100.0);
    assert_eq!((u[0].jobs_finished, u[0].jobs_failed), (0, 0));
}

fn ended_job(id: &str, state: JobState, ended_at_ms: u64) -> JobRecord {
    JobRecord {
        job_id: JobId::new(id).expect("id"),
        name: id.into(),
        sha256: Sha256Hex::digest(FILE),
        size_bytes: FILE.len() as u64,
        priority: 0,
        seq: ended_at_ms,
        tags: Vec::new(),
        state,
        printer: Some(pid("p0")),
        retry_of: None,
        attempt: 0,
        progress_pct: None,
        submitted_at_ms: ended_at_ms - 1,
        assigned_at_ms: None,
        started_at_ms: None,
        ended_at_ms: Some(ended_at_ms),
        reason: None,
    }
}

/// Issue #13: the job table grew for ever. Retention archives the ended jobs beyond the newest
/// `keep_jobs` and those older than `keep_days`, oldest first, and removes them from the store
/// in the same batch — but never a job a printer still holds or an open job re-runs, and never
/// an open or finished one.
#[test]
fn retention_archives_the_oldest_ended_jobs_and_keeps_what_is_in_use() {
    let day = 86_400_000;
    let now_unix = 1_795_000_000_000;
    let mut jobs: Vec<JobRecord> = (0..150)
        .map(|i| ended_job(&format!("d{i:03}"), JobState::Done, now_unix - day + i))
        .collect();
    // Old: past keep_days.
    jobs.push(ended_job("old", JobState::Cancelled, now_unix - 100 * day));
    // Old too, but a printer holds it, and another is re-run by an open job.
    jobs.push(ended_job("held", JobState::Failed, now_unix - 200 * day));
    jobs.push(ended_job("rerun", JobState::Failed, now_unix - 200 * day));
    let mut retry = ended_job("rerun.r1", JobState::Queued, now_unix);
    (retry.ended_at_ms, retry.retry_of) = (None, Some(JobId::new("rerun").expect("id")));
    jobs.push(retry);
    // Finished (awaiting a bed clear): not ended.
    jobs.push(ended_job(
        "harvest",
        JobState::Finished,
        now_unix - 200 * day,
    ));
    let snap = Snapshot {
        jobs,
        printers: vec![PrinterRecord {
            printer_id: pid("p0"),
            tags: Vec::new(),
            held: false,
            consecutive_failures: 0,
            assigned: Some(JobId::new("held").expect("id")),
            first_seen_ms: 0,
            start_sent: None,
        }],
        ..Snapshot::default()
    };
    let now = Now {
        mono_ms: 1_000,
        unix_ms: now_unix,
    };
    let mut cfg = SupervisorConfig::default();
    cfg.history.keep_jobs = 100;
    let mut s = Supervisor::new(cfg, snap, now);
    assert!(
        !s.handle(now, Input::Tick)
            .iter()
            .any(|o| matches!(o, Output::Archive(_))),
        "not at start: a minute later"
    );
    let now = Now {
        mono_ms: now.mono_ms + 60_000,
        unix_ms: now_unix,
    };
    let out = s.handle(now, Input::Tick);
    let archived: Vec<String> = out
        .iter()
        .filter_map(|o| match o {
            Output::Archive(jobs) => Some(jobs.iter().map(|j| j.job_id.to_string())),
            _ => None,
        })
        .flatten()
        .collect();
    let removed: Vec<String> = out
        .iter()
        .filter_map(|o| match o {
            Output::Persist(m) => Some(m.iter().filter_map(|m| match m {
                Mutation::RemoveJob(id) => Some(id.to_string()),
                _ => None,
            })),
            _ => None,
        })
        .flatten()
        .collect();
    let mut expected = vec!["old".to_string()];
    expected.extend((0..50).map(|i| format!("d{i:03}")));
    assert_eq!(archived, expected, "the oldest first: 151 ended, 100 kept");
    assert_eq!(removed, archived, "what is archived leaves the store");
    let archive_at = out.iter().position(|o| matches!(o, Output::Archive(_)));
    let remove_at = out.iter().position(
        |o| matches!(o, Output::Persist(m) if m.iter().any(|m| matches!(m, Mutation::RemoveJob(_)))),
    );
    assert!(archive_at < remove_at, "archived before removed");
    for kept in ["held", "rerun", "rerun.r1", "harvest", "d050", "d149"] {
        assert!(
            s.jobs().any(|j| j.job_id.as_str() == kept),
            "{kept} is kept"
        );
    }
    assert_eq!(s.jobs().count(), 104);
    // A minute later there is nothing more to do; before that, retention does not run.
    let out = s.handle(
        Now {
            mono_ms: now.mono_ms + 120_000,
            unix_ms: now_unix + 60_000,
        },
        Input::Tick,
    );
    assert!(!out.iter().any(|o| matches!(o, Output::Archive(_))));
}

/// Issue #13: after a broker restart every printer whose state has not come back is due a
/// rebirth at the same moment; 10 000 of them at once flooded the supervisor, the broker and the
/// farm's Wi-Fi with full births. Rebirths are paced fleet-wide: at most `REBIRTHS_PER_S` a
/// second, the rest in the seconds after, every printer asked in the end.
#[test]
fn rebirths_after_a_mass_reconnect_are_paced() {
    let mut h = H::new();
    let n = 250;
    for i in 0..n {
        h.online(&format!("q{i}"), 1);
    }
    let rebirths = |out: &[Output]| {
        out.iter()
            .filter(|o| matches!(o, Output::Publish(p) if p.topic.ends_with("/cmd")
                && Command::decode(&p.payload).is_ok_and(|c| matches!(c.action, CommandAction::Rebirth(_)))))
            .count()
    };
    let mut per_second = Vec::new();
    let start = h.now.mono_ms;
    let mut sent = 0;
    while sent < n && h.now.mono_ms < start + 60_000 {
        let out = h.advance(
            h.s.next_deadline()
                .map_or(1_000, |d| d.saturating_sub(h.now.mono_ms).max(1)),
        );
        let k = rebirths(&out);
        if k > 0 {
            per_second.push((h.now.mono_ms, k));
        }
        sent += k;
    }
    assert_eq!(sent, n, "every printer is asked: {per_second:?}");
    let first = per_second[0].0;
    for (_, k) in &per_second {
        assert!(
            *k <= super::timers::REBIRTHS_PER_S as usize,
            "{per_second:?}"
        );
    }
    let in_first_second: usize = per_second
        .iter()
        .filter(|(at, _)| *at < first + 1_000)
        .map(|(_, k)| k)
        .sum();
    assert_eq!(
        in_first_second,
        super::timers::REBIRTHS_PER_S as usize,
        "{per_second:?}"
    );
}

/// Found on RabbitMQ (issue #13): it sends no retained messages to wildcard subscriptions, so a
/// supervisor started after a printer's birth got its live `state` (heartbeats) but never its
/// `meta`, and Home Assistant never got a device for it. A printer online without a `meta` is
/// asked for a rebirth like one without a current `state`; once its `meta` came, it is not.
#[test]
fn a_printer_without_meta_is_asked_for_a_rebirth() {
    let mut h = H::new();
    h.online("p0", 1);
    h.report("p0", state(PrinterPhase::Idle, None));
    let rebirths = |out: &[Output]| {
        commands(out, "p0")
            .iter()
            .filter(|c| matches!(c.action, CommandAction::Rebirth(_)))
            .count()
    };
    let after = h.s.cfg.rebirth_after_ms();
    let out = h.advance(after + 1);
    assert_eq!(rebirths(&out), 1, "state but no meta: asked");
    // Its birth brings the meta: no more rebirths.
    h.msg(
        "printers/p0/meta",
        Meta {
            v: Version,
            printer_id: pid("p0"),
            epoch: 1,
            name: "p0".into(),
            model: "m".into(),
            firmware: None,
            build_volume: None,
            tags: vec![],
            gateway_version: "t".into(),
        }
        .encode(),
    );
    let out = h.advance(after * 8);
    assert_eq!(rebirths(&out), 0);
}

#[test]
fn a_job_list_is_open_jobs_by_priority_then_ended_newest_first_cut_at_the_limit() {
    let mut h = H::new();
    h.store_file();
    let submit = |h: &mut H, priority: i32| -> JobId {
        let (resp, _) = h.api(ApiOp::SubmitJob(SubmitJob {
            name: "f.gcode".into(),
            sha256: sha(),
            copies: 1,
            priority,
            tags: vec![],
        }));
        match resp.result {
            Some(ApiResult::Submitted { mut job_ids }) => job_ids.remove(0),
            other => panic!("submit failed: {other:?}"),
        }
    };
    let a = submit(&mut h, 0);
    let b = submit(&mut h, 0);
    let c = submit(&mut h, 0);
    let d = submit(&mut h, 5);
    let e = submit(&mut h, 5);
    for j in [&b, &d] {
        let (r, _) = h.api(ApiOp::CancelJob(JobArgs { job_id: j.clone() }));
        assert!(r.ok, "{r:?}");
    }
    let list = |h: &mut H, include_ended: bool, limit: u32| -> Vec<JobId> {
        let (r, _) = h.api(ApiOp::ListJobs(ListJobs {
            include_ended,
            limit: Some(limit),
        }));
        match r.result {
            Some(ApiResult::Jobs { jobs }) => jobs.into_iter().map(|j| j.job_id).collect(),
            other => panic!("list failed: {other:?}"),
        }
    };
    assert_eq!(
        list(&mut h, false, 100),
        vec![e.clone(), a.clone(), c.clone()]
    );
    assert_eq!(list(&mut h, false, 2), vec![e.clone(), a.clone()]);
    assert_eq!(
        list(&mut h, true, 100),
        vec![e.clone(), a.clone(), c.clone(), d.clone(), b.clone()]
    );
    assert_eq!(list(&mut h, true, 4), vec![e, a, c, d]);
}

#[test]
fn remembered_answers_are_bounded_like_the_store_and_the_newest_still_repeat() {
    let mut h = H::new();
    h.store_file();
    let submit = || {
        ApiOp::SubmitJob(SubmitJob {
            name: "f.gcode".into(),
            sha256: sha(),
            copies: 1,
            priority: 0,
            tags: vec![],
        })
    };
    let n = crate::store::REQUEST_MEMORY + 50;
    for i in 0..n {
        // Within the client's API rate: a busy answer is not remembered. (Reads, such as
        // lists, are not remembered at all.)
        h.advance(20);
        let (r, _) = h.api_with_id(&format!("q{i}"), submit());
        assert!(r.ok, "{r:?}");
    }
    assert_eq!(h.s.answers.len(), crate::store::REQUEST_MEMORY);
    assert_eq!(h.s.answer_order.len(), crate::store::REQUEST_MEMORY);
    assert!(!h.s.answers.contains_key(
        &Caller::Mqtt(ClientId::new("cli").expect("id"))
            .answer_key(&CommandId::new("q0").expect("id"))
    ));
    // A repeat of a remembered request gets its first answer again, and does nothing.
    let last = format!("q{}", n - 1);
    let held = h.s.jobs.len();
    h.advance(20);
    let (again, out) = h.api_with_id(&last, submit());
    assert!(again.ok, "{again:?}");
    assert!(
        !out.iter().any(|o| matches!(o, Output::Persist(_))),
        "{out:?}"
    );
    assert_eq!(h.s.jobs.len(), held);
}

/// Tags: a job goes only to a printer with all its tags, however many queued jobs ahead of it
/// no free printer accepts (dispatch passes over those without looking at the printers); and
/// a printer with the first jobs' tags still gets the first of them.
#[test]
fn a_tagged_job_behind_jobs_no_free_printer_takes_goes_to_the_printer_with_its_tags() {
    let mut h = H::new();
    h.store_file();
    let submit = |h: &mut H, copies: u32, tag: &str| -> Vec<JobId> {
        let (r, _) = h.api(ApiOp::SubmitJob(SubmitJob {
            name: "f.gcode".into(),
            sha256: sha(),
            copies,
            priority: 0,
            tags: vec![tag.into()],
        }));
        match r.result {
            Some(ApiResult::Submitted { job_ids }) => job_ids,
            other => panic!("submit failed: {other:?} {:?}", r.error),
        }
    };
    let pla = submit(&mut h, 100, "pla");
    let tagged = |h: &mut H, p: &str, tag: &str| {
        let meta = protocol::presence::Meta {
            v: Version,
            printer_id: pid(p),
            epoch: 1,
            name: p.into(),
            model: "printloop-sim".into(),
            firmware: None,
            build_volume: None,
            tags: vec![tag.into()],
            gateway_version: "0.1.0".into(),
        };
        h.msg(&format!("printers/{p}/meta"), meta.encode());
        h.online(p, 1);
        h.report(p, state(PrinterPhase::Ready, None))
    };
    let out = tagged(&mut h, "p0", "petg");
    assert!(starts(&out, "p0").is_empty(), "no PETG job yet");
    let petg = submit(&mut h, 1, "petg");
    assert_eq!(h.job(&petg[0]).state, JobState::Assigned);
    assert_eq!(h.job(&petg[0]).printer, Some(pid("p0")));
    assert!(pla.iter().all(|j| h.job(j).state == JobState::Queued));

    let out = tagged(&mut h, "p1", "pla");
    let s = starts(&out, "p1");
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0].job_id, pla[0], "the first PLA job");
    assert_eq!(
        pla.iter()
            .filter(|j| h.job(j).state == JobState::Queued)
            .count(),
        99
    );
}
