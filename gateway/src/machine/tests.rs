//! Script-driven tests of the gateway state machine: inputs in, outputs checked. No IO.

use super::*;
use protocol::command::{
    Command, CommandAction, CommandErrorCode, CommandResult, Empty, JobRef, ResultStatus, StartJob,
};
use protocol::files::{FileChunkRequest, FileChunkResponse};
use protocol::presence::{Meta, Presence};
use protocol::state::{Event, EventKind, StateSnapshot};
use protocol::Version;

const FILE: &[u8] = b"G28\nG1 X10 F3000\nG1 X20\n";

struct H {
    g: Gateway,
    now: Now,
    n: u64,
}

fn pid() -> PrinterId {
    PrinterId::new("p0").expect("valid")
}

fn jid(s: &str) -> JobId {
    JobId::new(s).expect("valid")
}

fn sha() -> Sha256Hex {
    Sha256Hex::digest(FILE)
}

fn cfg() -> CoreConfig {
    CoreConfig {
        chunk_len: 10,
        ..CoreConfig::new(pid())
    }
}

fn firmware() -> Firmware {
    Firmware {
        name: "Marlin 2.1.2.1".into(),
        protocol_version: None,
        machine_type: None,
        capabilities: vec![],
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
        let (g, _) = Gateway::new(cfg(), snap, now);
        Self { g, now, n: 0 }
    }

    /// Connected, the printer's link up and the bed cleared: `ready` for a job.
    fn ready() -> Self {
        let mut h = Self::new();
        h.connect();
        h.ready_printer();
        h.cmd(CommandAction::BedCleared(Empty {}));
        h
    }

    fn advance(&mut self, ms: u64) -> Vec<Output> {
        self.now.mono_ms += ms;
        self.now.unix_ms += ms;
        let out = self.g.handle(self.now, Input::Tick);
        // A deadline due right after its tick wakes the shell again at once, for ever.
        if let Some(d) = self.g.next_deadline() {
            assert!(
                d > self.now.mono_ms,
                "next deadline {d} is not after the tick at {} (a busy loop)",
                self.now.mono_ms
            );
        }
        out
    }

    fn input(&mut self, i: Input) -> Vec<Output> {
        self.g.handle(self.now, i)
    }

    fn connect(&mut self) -> Vec<Output> {
        let _ = self.g.prepare_connect(self.now);
        self.input(Input::MqttConnected {
            session_present: false,
        })
    }

    fn ready_printer(&mut self) {
        self.input(Input::Printer(PrinterEvent::Ready {
            firmware: firmware(),
        }));
    }

    fn cmd(&mut self, action: CommandAction) -> (CommandResult, Vec<Output>) {
        self.n += 1;
        let c = Command::new(CommandId::new(format!("c{}", self.n)).expect("id"), action);
        self.raw_cmd(&c.encode())
    }

    fn raw_cmd(&mut self, payload: &[u8]) -> (CommandResult, Vec<Output>) {
        let out = self.input(Input::Message {
            topic: "printloop/v1/printers/p0/cmd".into(),
            payload: payload.to_vec(),
        });
        let result = results(&out).pop().expect("a command result");
        (result, out)
    }

    fn start(&mut self, job: &str) -> (CommandResult, Vec<Output>) {
        self.cmd(CommandAction::StartJob(start_args(job)))
    }

    /// Serves every chunk request in `out` (and the ones that follow, a window of them at a
    /// time, answered in the order asked) until the file is stored and checked.
    fn serve_file(&mut self, out: Vec<Output>) -> Vec<Output> {
        let mut all = Vec::new();
        let mut queue: std::collections::VecDeque<Output> = out.into();
        for _ in 0..1000 {
            let Some(o) = queue.pop_front() else { break };
            all.push(o.clone());
            let next = match o {
                Output::Publish(p) if p.topic.ends_with("file/request") => {
                    let req = FileChunkRequest::decode(&p.payload).expect("a request");
                    let start = req.offset as usize;
                    let end = (start + req.len as usize).min(FILE.len());
                    let resp = FileChunkResponse::chunk(
                        req.request_id,
                        req.sha256,
                        req.offset,
                        FILE.len() as u64,
                        &FILE[start..end],
                    );
                    self.input(Input::Message {
                        topic: "printloop/v1/printers/p0/file/chunk".into(),
                        payload: resp.encode(),
                    })
                }
                Output::StoreChunk {
                    sha256,
                    offset,
                    data,
                    sync,
                } => self.input(Input::ChunkStored {
                    sha256,
                    offset,
                    len: data.len() as u64,
                    synced: sync,
                }),
                Output::CheckFile { sha256 } => self.input(Input::FileChecked {
                    sha256,
                    result: Ok(3),
                }),
                _ => vec![],
            };
            queue.extend(next);
        }
        all
    }

    fn state(&self) -> StateSnapshot {
        self.g.snapshot(self.now)
    }
}

/// A `start_job` of [`FILE`] on this printer.
fn start_args(job: &str) -> StartJob {
    StartJob {
        job_id: jid(job),
        printer_id: pid(),
        file_sha256: sha(),
        size_bytes: FILE.len() as u64,
        name: "f.gcode".into(),
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

fn results(out: &[Output]) -> Vec<CommandResult> {
    published(out, "/cmd/result")
}

fn events(out: &[Output]) -> Vec<EventKind> {
    published::<Event>(out, "/events")
        .into_iter()
        .map(|e| e.event)
        .collect()
}

fn persisted(out: &[Output]) -> Vec<Mutation> {
    out.iter()
        .filter_map(|o| match o {
            Output::Persist(m) => Some(m.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Index of the first output matching `f`.
fn pos(out: &[Output], f: impl Fn(&Output) -> bool) -> usize {
    out.iter().position(f).expect("output present")
}

#[test]
fn connect_bumps_epoch_and_births_in_order() {
    let mut h = H::new();
    let (muts, will_topic, will) = h.g.prepare_connect(h.now);
    assert_eq!(muts, vec![Mutation::SetEpoch(1)]);
    assert_eq!(will_topic, "printloop/v1/printers/p0/status");
    let will = Status::decode(&will).expect("will decodes");
    assert_eq!((will.presence, will.epoch), (Presence::Offline, 1));

    let out = h.input(Input::MqttConnected {
        session_present: false,
    });
    let topics: Vec<&str> = out
        .iter()
        .filter_map(|o| match o {
            Output::Subscribe(t) => Some(t.as_str()),
            Output::Publish(p) => Some(p.topic.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        topics,
        [
            "printloop/v1/printers/p0/cmd",
            "printloop/v1/printers/p0/file/chunk",
            "printloop/v1/printers/p0/events",
            "printloop/v1/printers/p0/status",
            "printloop/v1/printers/p0/meta",
            "printloop/v1/printers/p0/state",
            "printloop/v1/printers/p0/meta",
            "printloop/v1/printers/p0/state",
            "printloop/v1/printers/p0/status",
        ]
    );
    let status = published::<Status>(&out, "/status").pop().expect("birth");
    assert_eq!((status.presence, status.epoch), (Presence::Online, 1));
    assert!(out
        .iter()
        .all(|o| !matches!(o, Output::Publish(p) if p.topic.ends_with("/cmd") && p.retain)));

    // Reconnecting: epoch 2, seq restarts.
    h.input(Input::MqttDisconnected);
    let (muts, _, _) = h.g.prepare_connect(h.now);
    assert_eq!(muts, vec![Mutation::SetEpoch(2)]);
    let out = h.input(Input::MqttConnected {
        session_present: true,
    });
    let st = published::<StateSnapshot>(&out, "/state")
        .pop()
        .expect("state");
    assert_eq!((st.epoch, st.seq), (2, 1));
}

#[test]
fn nominal_job_from_idle_to_finished_to_ready() {
    let mut h = H::new();
    h.connect();
    h.ready_printer();
    assert_eq!(h.g.phase(), PrinterPhase::Idle);

    let (r, _) = h.start("j1");
    assert_eq!(r.status, ResultStatus::Error);
    assert_eq!(r.code, Some(CommandErrorCode::NotReady), "{r:?}");
    assert_eq!(
        h.g.phase(),
        PrinterPhase::Idle,
        "a refused start changes nothing"
    );

    let (r, _) = h.cmd(CommandAction::BedCleared(Empty {}));
    assert_eq!(r.status, ResultStatus::Ok);
    assert_eq!(h.g.phase(), PrinterPhase::Ready);

    let (r, out) = h.start("j1");
    assert_eq!(r.status, ResultStatus::Ok);
    assert_eq!(h.g.phase(), PrinterPhase::Preparing);
    // The acceptance is persisted before its event and its result are published.
    let persist = pos(
        &out,
        |o| matches!(o, Output::Persist(m) if m.iter().any(|m| matches!(m, Mutation::PutLedger(_)))),
    );
    let first_pub = pos(&out, |o| matches!(o, Output::Publish(_)));
    assert!(persist < first_pub);
    assert_eq!(
        events(&out),
        vec![EventKind::JobAccepted { job_id: jid("j1") }]
    );

    let all = h.serve_file(out);
    assert_eq!(
        all.iter()
            .filter(|o| matches!(o, Output::StoreChunk { .. }))
            .count(),
        3,
        "25 bytes in 10-byte chunks"
    );
    assert!(all
        .iter()
        .any(|o| matches!(o, Output::Printer(PrinterCommand::StartStream { .. }))));
    assert_eq!(h.g.phase(), PrinterPhase::Printing);
    assert!(!h.state().bed_clear);

    h.input(Input::Printer(PrinterEvent::LinesAcked { count: 2 }));
    assert_eq!(h.state().job.expect("job").line, 2);
    let out = h.input(Input::Printer(PrinterEvent::LinesAcked { count: 3 }));
    assert_eq!(h.g.phase(), PrinterPhase::Finished);
    assert!(events(&out).contains(&EventKind::JobEnded {
        job_id: jid("j1"),
        outcome: JobStage::Finished,
        line: 3,
        reason: None
    }));
    let st = h.state();
    assert_eq!(st.job.as_ref().map(|j| j.progress_pct), Some(100.0));
    assert_eq!(st.recent_jobs[0].job_id, jid("j1"));

    // A new job waits until the bed is cleared.
    assert_eq!(h.start("j2").0.status, ResultStatus::Error);
    h.cmd(CommandAction::BedCleared(Empty {}));
    assert_eq!(h.g.phase(), PrinterPhase::Ready);
    assert!(h.state().job.is_none());
}

#[test]
fn duplicate_expired_malformed_and_unknown_commands() {
    let mut h = H::new();
    h.connect();
    h.ready_printer();
    let c = Command::new(
        CommandId::new("same").expect("id"),
        CommandAction::BedCleared(Empty {}),
    );
    let (r1, out1) = h.raw_cmd(&c.encode());
    assert_eq!(r1.status, ResultStatus::Ok);
    assert_eq!(events(&out1).len(), 1);
    let (r2, out2) = h.raw_cmd(&c.encode());
    assert_eq!(r2.status, ResultStatus::Duplicate);
    assert_eq!(
        (r1.code, r2.code),
        (None, None),
        "only refusals carry a code"
    );
    assert!(events(&out2).is_empty(), "a duplicate does nothing again");
    assert!(persisted(&out2).is_empty(), "a duplicate writes nothing");

    let mut late = Command::new(
        CommandId::new("late").expect("id"),
        CommandAction::Rebirth(Empty {}),
    );
    late.expires_at = Some(h.now.unix_ms - 1);
    let (r, out) = h.raw_cmd(&late.encode());
    assert_eq!(r.status, ResultStatus::Expired);
    assert_eq!(r.code, None);
    assert!(
        published::<Meta>(&out, "/meta").is_empty(),
        "an expired rebirth does nothing"
    );

    let (r, _) = h.raw_cmd(br#"{"v":1,"id":"u1","kind":"launch","args":{}}"#);
    assert_eq!(r.status, ResultStatus::Error);
    assert_eq!(r.code, Some(CommandErrorCode::UnknownKind), "{r:?}");

    let (r, _) = h.raw_cmd(br#"{"v":1,"id":"m1","kind":"start_job","args":{"job_id":"x"}}"#);
    assert_eq!(r.status, ResultStatus::Error);
    assert_eq!(r.code, Some(CommandErrorCode::Invalid), "{r:?}");

    // No readable id: nothing to answer, nothing published, no panic.
    for junk in [
        &b"\xff\x00garbage"[..],
        b"{}",
        b"[]",
        b"{\"v\":1,\"kind\":\"pause\"}",
    ] {
        let out = h.input(Input::Message {
            topic: "printloop/v1/printers/p0/cmd".into(),
            payload: junk.to_vec(),
        });
        assert!(results(&out).is_empty());
    }
}

/// Every refusal answers `error` with its code (programs match codes) and its message for
/// people; the ones not covered by the scenarios above and below.
#[test]
fn each_refusal_carries_its_code() {
    use CommandErrorCode as Code;
    let check = |r: CommandResult, code: Code, says: &str| {
        assert_eq!(r.status, ResultStatus::Error, "{r:?}");
        assert_eq!(r.code, Some(code), "{r:?}");
        assert!(r.reason.as_deref().unwrap_or("").contains(says), "{r:?}");
    };
    // Nothing to pause, resume or cancel; a bed cleared under a job.
    let mut h = H::ready();
    let (r, _) = h.cmd(CommandAction::Pause(JobRef::default()));
    check(r, Code::NoJob, "no job on this printer");
    let (r, _) = h.cmd(CommandAction::Cancel(JobRef::default()));
    check(r, Code::NoJob, "no job on this printer");
    let (r, _) = h.cmd(CommandAction::StartJob(StartJob {
        size_bytes: 0,
        ..start_args("j0")
    }));
    check(r, Code::Invalid, "file is empty");
    let (_, out) = h.start("j1");
    let (r, _) = h.start("j1");
    check(r, Code::AlreadyAccepted, "already on this printer");
    let (r, _) = h.cmd(CommandAction::Pause(JobRef::default()));
    check(r, Code::WrongStage, "job is transferring, not printing");
    let (r, _) = h.cmd(CommandAction::BedCleared(Empty {}));
    check(r, Code::PrinterHasJob, "cancel it first");
    let (r, _) = h.start("j2");
    check(r, Code::NotReady, "phase preparing");
    h.serve_file(out);
    let (r, _) = h.cmd(CommandAction::Resume(JobRef {
        job_id: Some(jid("j0")),
    }));
    check(r, Code::NotCurrentJob, "not the current job");
    let (r, _) = h.cmd(CommandAction::Resume(JobRef::default()));
    assert_eq!((r.status, r.code), (ResultStatus::Ok, None), "a no-op");
    h.cmd(CommandAction::Pause(JobRef::default()));
    assert_eq!(h.g.phase(), PrinterPhase::Paused);
    // Not reachable through inputs today (a lost link interrupts a paused job), still guarded.
    h.g.link = LinkState::Down {
        reason: "test".into(),
    };
    let (r, _) = h.cmd(CommandAction::Resume(JobRef::default()));
    check(r, Code::LinkNotReady, "link is not ready");
    h.g.link = LinkState::Ready;
    h.cmd(CommandAction::Cancel(JobRef::default()));
    let (r, _) = h.cmd(CommandAction::Cancel(JobRef::default()));
    check(r, Code::JobEnded, "already ended");

    // Maintenance.
    let mut h = H::from(Snapshot {
        flags: Flags {
            bed_clear: true,
            maintenance: true,
        },
        ..Snapshot::default()
    });
    h.connect();
    h.ready_printer();
    let (r, _) = h.start("j1");
    check(r, Code::Maintenance, "maintenance");

    // Refused by the decoder, with an id to answer.
    let pad = "x".repeat(protocol::codec::MAX_CONTROL_PAYLOAD);
    let big = format!(r#"{{"v":1,"id":"big","kind":"pause","pad":"{pad}"}}"#);
    let (r, _) = h.raw_cmd(big.as_bytes());
    check(r, Code::TooLarge, "exceeds");
    let (r, _) = h.raw_cmd(br#"{"v":9,"id":"v9","kind":"pause"}"#);
    check(r, Code::UnsupportedVersion, "unsupported protocol version");
}

#[test]
fn an_ended_job_id_never_runs_again() {
    let mut h = H::ready();
    let (_, out) = h.start("j1");
    h.serve_file(out);
    h.input(Input::Printer(PrinterEvent::LinesAcked { count: 3 }));
    h.cmd(CommandAction::BedCleared(Empty {}));
    assert_eq!(h.g.phase(), PrinterPhase::Ready);
    // The same job id, with a new command id (a supervisor that forgot it sent it).
    let (r, out) = h.start("j1");
    assert_eq!(r.status, ResultStatus::Error);
    assert_eq!(r.code, Some(CommandErrorCode::AlreadyRan), "{r:?}");
    assert!(!out.iter().any(|o| matches!(o, Output::Printer(_))));
    assert_eq!(h.g.phase(), PrinterPhase::Ready);
}

#[test]
fn restart_mid_print_reports_interrupted_and_never_restarts() {
    let job = CurrentJob {
        job_id: jid("j7"),
        file_sha256: sha(),
        name: "f".into(),
        size_bytes: 25,
        stage: JobStage::Printing,
        line: 2,
        total_lines: 3,
        accepted_at_ms: 1,
        started_at_ms: Some(2),
        ended_at_ms: None,
        reason: None,
    };
    let snap = Snapshot {
        epoch: 4,
        current: Some(job),
        ledger: vec![(jid("j7"), None)],
        ..Snapshot::default()
    };
    let now = Now {
        mono_ms: 0,
        unix_ms: 1_795_000_000_000,
    };
    let (mut g, out) = Gateway::new(cfg(), snap, now);
    let muts = persisted(&out);
    assert!(muts.iter().any(|m| matches!(m, Mutation::PutLedger(r) if r.outcome == Some(JobStage::Interrupted) && r.line == 2)));
    assert!(
        !out.iter().any(|o| matches!(o, Output::Printer(_))),
        "never restarts a print"
    );
    let (_, _, _) = g.prepare_connect(now);
    let out = g.handle(
        now,
        Input::MqttConnected {
            session_present: false,
        },
    );
    // The journaled event goes out before the birth.
    let ev = pos(
        &out,
        |o| matches!(o, Output::Publish(p) if p.topic.ends_with("/events")),
    );
    let birth = pos(
        &out,
        |o| matches!(o, Output::Publish(p) if p.topic.ends_with("/status")),
    );
    assert!(ev < birth);
    let e = published::<Event>(&out, "/events").pop().expect("event");
    assert!(matches!(
        e.event,
        EventKind::JobEnded {
            outcome: JobStage::Interrupted,
            line: 2,
            ..
        }
    ));
    let st = published::<StateSnapshot>(&out, "/state")
        .pop()
        .expect("state");
    assert_eq!(
        st.job.as_ref().map(|j| j.stage),
        Some(JobStage::Interrupted)
    );
    // The restart journals the interruption in an epoch of its own (5), then connects in 6.
    assert_eq!(e.epoch, 5);
    assert_eq!(st.epoch, 6);
}

#[test]
fn events_while_offline_are_journaled_and_published_in_order_after_reconnect() {
    let mut h = H::ready();
    let (_, out) = h.start("j1");
    h.serve_file(out);
    h.input(Input::MqttDisconnected);
    let out = h.input(Input::Printer(PrinterEvent::LinesAcked { count: 3 }));
    assert!(
        out.iter().all(|o| !matches!(o, Output::Publish(_))),
        "offline: nothing published"
    );
    assert!(persisted(&out)
        .iter()
        .any(|m| matches!(m, Mutation::PushOutbox(..))));
    assert_eq!(
        h.g.phase(),
        PrinterPhase::Finished,
        "the print finished without the broker"
    );

    let out = h.connect();
    let evs = published::<Event>(&out, "/events");
    let kinds: Vec<&str> = evs
        .iter()
        .map(|e| match e.event {
            EventKind::JobAccepted { .. } => "accepted",
            EventKind::FileVerified { .. } => "verified",
            EventKind::JobStarted { .. } => "started",
            EventKind::JobEnded { .. } => "ended",
            EventKind::BedCleared {} => "bed",
            EventKind::PrinterConnected { .. } => "connected",
            _ => "other",
        })
        .collect();
    // Unacknowledged events are all re-sent, in their original order (the broker may have
    // them already: readers de-duplicate by (epoch, seq)).
    assert_eq!(kinds.last(), Some(&"ended"));
    let seqs: Vec<(u64, u64)> = evs.iter().map(|e| (e.epoch, e.seq)).collect();
    let mut sorted = seqs.clone();
    sorted.sort();
    assert_eq!(seqs, sorted, "in order");

    // When the broker echoes the last one back, all of them leave the outbox.
    let last = out
        .iter()
        .rev()
        .find_map(|o| match o {
            Output::Publish(p) if p.outbox_key.is_some() => Some(p.clone()),
            _ => None,
        })
        .expect("events");
    let out = h.input(Input::Message {
        topic: last.topic.clone(),
        payload: last.payload.clone(),
    });
    assert_eq!(
        persisted(&out),
        vec![Mutation::AckOutbox(last.outbox_key.expect("key"))]
    );
    h.input(Input::MqttDisconnected);
    let out = h.connect();
    assert!(published::<Event>(&out, "/events").is_empty());
}

#[test]
fn chunk_timeouts_retry_then_fail_the_job() {
    let mut h = H::ready();
    let (_, out) = h.start("j1");
    let first = published::<FileChunkRequest>(&out, "file/request");
    // A window of requests from the first byte on; each timeout asks for all of them again.
    let offsets: Vec<u64> = first.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, vec![0, 10], "two chunks in flight to start with");
    let mut requests = first.len();
    let mut failed = false;
    for _ in 0..50 {
        let out = h.advance(h.g.cfg.chunk_timeout_ms());
        requests += published::<FileChunkRequest>(&out, "file/request").len();
        if events(&out).iter().any(|e| {
            matches!(
                e,
                EventKind::JobEnded {
                    outcome: JobStage::Failed,
                    ..
                }
            )
        }) {
            failed = true;
            break;
        }
    }
    assert!(failed, "the job fails after bounded retries");
    assert_eq!(requests as u32, 2 * h.g.cfg.chunk_attempts);
    // Nothing was printed, so the printer is ready again without a bed clear.
    assert_eq!(h.g.phase(), PrinterPhase::Ready);
}

#[test]
fn corrupt_and_stale_chunks_are_not_stored() {
    let mut h = H::ready();
    let (_, out) = h.start("j1");
    let req = published::<FileChunkRequest>(&out, "file/request")
        .into_iter()
        .find(|r| r.offset == 0)
        .expect("request");
    // Right request id, wrong bytes for the claimed digest.
    let total = FILE.len() as u64;
    let mut bad = FileChunkResponse::chunk(req.request_id.clone(), sha(), 0, total, &FILE[..10]);
    if let FileChunkResponse::Ok { data_b64, .. } = &mut bad {
        *data_b64 = "QUFBQUFBQUFBQQ==".into();
    }
    let out = h.input(Input::Message {
        topic: "printloop/v1/printers/p0/file/chunk".into(),
        payload: bad.encode(),
    });
    assert!(!out.iter().any(|o| matches!(o, Output::StoreChunk { .. })));
    let again = published::<FileChunkRequest>(&out, "file/request")
        .pop()
        .expect("asks again");
    assert_eq!(again.offset, 0);
    // An answer to the old request id is stale.
    let stale = FileChunkResponse::chunk(req.request_id, sha(), 0, total, &FILE[..10]);
    let out = h.input(Input::Message {
        topic: "printloop/v1/printers/p0/file/chunk".into(),
        payload: stale.encode(),
    });
    assert!(out.iter().all(|o| !matches!(o, Output::StoreChunk { .. })));
}

fn chunk_answer(req: &FileChunkRequest) -> Input {
    let start = req.offset as usize;
    let end = (start + req.len as usize).min(FILE.len());
    Input::Message {
        topic: "printloop/v1/printers/p0/file/chunk".into(),
        payload: FileChunkResponse::chunk(
            req.request_id.clone(),
            req.sha256.clone(),
            req.offset,
            FILE.len() as u64,
            &FILE[start..end],
        )
        .encode(),
    }
}

fn writes(out: &[Output]) -> Vec<(u64, usize, bool)> {
    out.iter()
        .filter_map(|o| match o {
            Output::StoreChunk {
                offset, data, sync, ..
            } => Some((*offset, data.len(), *sync)),
            _ => None,
        })
        .collect()
}

/// Issue #13: a window of chunks in flight. Chunks answered out of order are held and
/// written in order; each chunk stored widens the window; only the write that ends the file
/// (or crosses a sync mark) is synced, and only a synced write moves the durable mark.
#[test]
fn a_window_of_chunks_is_written_in_order_and_synced_at_the_end() {
    let mut h = H::ready();
    let (_, out) = h.start("j1");
    let reqs = published::<FileChunkRequest>(&out, "file/request");
    assert_eq!(reqs.iter().map(|r| r.offset).collect::<Vec<_>>(), [0, 10]);

    // The second chunk first: verified, held, not written.
    let out = h.input(chunk_answer(&reqs[1]));
    assert!(writes(&out).is_empty());
    // The window has room again: the third chunk is asked for.
    let more = published::<FileChunkRequest>(&out, "file/request");
    assert_eq!(more.iter().map(|r| r.offset).collect::<Vec<_>>(), [20]);

    // The first: both written, in order, neither synced (the file is not complete).
    let out = h.input(chunk_answer(&reqs[0]));
    assert_eq!(writes(&out), [(0, 10, false), (10, 10, false)]);
    let out = h.input(Input::ChunkStored {
        sha256: sha(),
        offset: 0,
        len: 10,
        synced: false,
    });
    assert!(
        !persisted(&out)
            .iter()
            .any(|m| matches!(m, Mutation::PutFile(_))),
        "an unsynced write does not move the durable mark"
    );
    h.input(Input::ChunkStored {
        sha256: sha(),
        offset: 10,
        len: 10,
        synced: false,
    });
    assert_eq!(h.state().job.and_then(|j| j.transferred_bytes), Some(20));

    // The last chunk ends the file: synced, the mark recorded, the whole file checked.
    let out = h.input(chunk_answer(&more[0]));
    assert_eq!(writes(&out), [(20, 4, true)]);
    let out = h.input(Input::ChunkStored {
        sha256: sha(),
        offset: 20,
        len: 4,
        synced: true,
    });
    assert!(persisted(&out)
        .iter()
        .any(|m| matches!(m, Mutation::PutFile(f) if f.received_bytes == 24)));
    assert!(out.iter().any(|o| matches!(o, Output::CheckFile { .. })));
}

/// Issue #13: after a cut, a broker that kept the session still holds the requests in flight
/// and their answers: nothing is asked again (no chunk crosses the link twice). A broker that
/// lost it (a restart) lost them too: everything in flight is asked for again at once.
#[test]
fn a_reconnect_asks_again_only_when_the_broker_lost_the_session() {
    let mut h = H::ready();
    let (_, out) = h.start("j1");
    let reqs = published::<FileChunkRequest>(&out, "file/request");
    assert_eq!(reqs.len(), 2);
    h.input(Input::MqttDisconnected);
    let out = h.input(Input::MqttConnected {
        session_present: true,
    });
    assert!(published::<FileChunkRequest>(&out, "file/request").is_empty());
    // The answers queued in the kept session still count.
    let out = h.input(chunk_answer(&reqs[0]));
    assert_eq!(writes(&out), [(0, 10, false)]);

    h.input(Input::MqttDisconnected);
    let out = h.input(Input::MqttConnected {
        session_present: false,
    });
    let again = published::<FileChunkRequest>(&out, "file/request");
    assert_eq!(
        again.iter().map(|r| r.offset).collect::<Vec<_>>(),
        [10, 20],
        "everything in flight (the third chunk was asked for when the first came), under new ids"
    );
    // An answer to the lost session's request is stale now.
    let out = h.input(chunk_answer(&reqs[1]));
    assert!(writes(&out).is_empty());
}

#[test]
fn transfer_resumes_from_the_last_stored_chunk_after_a_restart() {
    let job = CurrentJob {
        job_id: jid("j1"),
        file_sha256: sha(),
        name: "f".into(),
        size_bytes: 25,
        stage: JobStage::Transferring,
        line: 0,
        total_lines: 0,
        accepted_at_ms: 1,
        started_at_ms: None,
        ended_at_ms: None,
        reason: None,
    };
    let snap = Snapshot {
        current: Some(job),
        ledger: vec![(jid("j1"), None)],
        files: vec![FileRecord {
            sha256: sha(),
            size_bytes: 25,
            received_bytes: 20,
            verified: false,
            last_used_ms: 0,
        }],
        flags: Flags {
            bed_clear: true,
            maintenance: false,
        },
        ..Snapshot::default()
    };
    let mut h = H::from(snap);
    let out = h.connect();
    let req = published::<FileChunkRequest>(&out, "file/request")
        .pop()
        .expect("request");
    assert_eq!((req.offset, req.len), (20, 5));
}

#[test]
fn stale_cancel_does_not_hit_the_next_job_and_fatal_errors_halt() {
    let mut h = H::ready();
    let (_, out) = h.start("j2");
    h.serve_file(out);
    let (r, out) = h.cmd(CommandAction::Cancel(JobRef {
        job_id: Some(jid("j1")),
    }));
    assert_eq!(r.status, ResultStatus::Error);
    assert!(!out.iter().any(|o| matches!(o, Output::Printer(_))));
    assert_eq!(h.g.phase(), PrinterPhase::Printing);

    let (r, out) = h.cmd(CommandAction::Pause(JobRef::default()));
    assert_eq!(r.status, ResultStatus::Ok);
    assert!(out.contains(&Output::Printer(PrinterCommand::PauseStream)));
    assert_eq!(h.g.phase(), PrinterPhase::Paused);
    h.cmd(CommandAction::Resume(JobRef::default()));
    assert_eq!(h.g.phase(), PrinterPhase::Printing);

    let out = h.input(Input::Printer(PrinterEvent::Fatal {
        message: "Thermal Runaway, system stopped! Heater_ID: 0".into(),
    }));
    assert_eq!(h.g.phase(), PrinterPhase::Halted);
    assert!(events(&out).iter().any(|e| matches!(
        e,
        EventKind::JobEnded {
            outcome: JobStage::Failed,
            ..
        }
    )));
    assert_eq!(h.start("j3").0.status, ResultStatus::Error);
    // The operator looks, clears the bed: the printer is reset.
    let (_, out) = h.cmd(CommandAction::BedCleared(Empty {}));
    assert!(out.contains(&Output::Printer(PrinterCommand::ResetPrinter)));
}

#[test]
fn heartbeat_and_rate_limit() {
    let mut h = H::new();
    h.connect();
    let hb = h.g.cfg.heartbeat_ms();
    let out = h.advance(hb - 1);
    assert!(published::<StateSnapshot>(&out, "/state").is_empty());
    let out = h.advance(1);
    assert_eq!(
        published::<StateSnapshot>(&out, "/state").len(),
        1,
        "heartbeat"
    );
    // Two changes in quick succession: one publish now, the next after the minimum interval.
    h.ready_printer();
    let out = h.input(Input::Printer(PrinterEvent::Progress {
        percent: 5.0,
        remaining_min: Some(3),
    }));
    assert!(published::<StateSnapshot>(&out, "/state").is_empty());
    let out = h.advance(h.g.cfg.state_min_interval_ms());
    assert_eq!(published::<StateSnapshot>(&out, "/state").len(), 1);
}

#[test]
fn the_cache_evicts_least_recently_used_files_and_refuses_what_cannot_fit() {
    let old = |name: &[u8], used: u64| FileRecord {
        sha256: Sha256Hex::digest(name),
        size_bytes: 40,
        received_bytes: 40,
        verified: true,
        last_used_ms: used,
    };
    let snap = Snapshot {
        files: vec![old(b"a", 1), old(b"b", 2)],
        flags: Flags {
            bed_clear: true,
            maintenance: false,
        },
        ..Snapshot::default()
    };
    let mut h = H::from(snap);
    h.g.cfg.cache_max_bytes = 100;
    h.connect();
    h.ready_printer();
    // 25 more bytes do not fit beside 80: the least recently used file goes.
    let (r, out) = h.start("j1");
    assert_eq!(r.status, ResultStatus::Ok);
    let removed: Vec<&Sha256Hex> = out
        .iter()
        .filter_map(|o| match o {
            Output::RemoveFile { sha256 } => Some(sha256),
            _ => None,
        })
        .collect();
    assert_eq!(removed, vec![&Sha256Hex::digest(b"a")]);

    // A file larger than the whole cache is refused before anything is downloaded.
    let mut h = H::new();
    h.g.cfg.cache_max_bytes = 10;
    h.connect();
    h.ready_printer();
    h.cmd(CommandAction::BedCleared(Empty {}));
    let (r, out) = h.start("j2");
    assert_eq!(r.status, ResultStatus::Error);
    assert_eq!(r.code, Some(CommandErrorCode::FileTooLarge), "{r:?}");
    assert!(published::<FileChunkRequest>(&out, "file/request").is_empty());

    // Not enough free disk either.
    let mut h = H::ready();
    h.input(Input::DiskFree { bytes: 5 });
    let (r, _) = h.start("j3");
    assert_eq!(r.status, ResultStatus::Error);
    assert_eq!(r.code, Some(CommandErrorCode::NoDiskSpace), "{r:?}");
    assert_eq!(
        h.g.phase(),
        PrinterPhase::Ready,
        "a refused start changes nothing"
    );
}

/// Issue #10, item 4: a job that ends (here: the file server has no such file) must be in the
/// next state within the minimum interval, even when temperatures arrive in between. They used
/// to clear the pending change, so `preparing` stayed retained until the heartbeat.
#[test]
fn a_refused_start_is_published_within_the_minimum_interval_despite_temperatures() {
    let mut h = H::ready();
    let (_, out) = h.start("j1");
    let req = published::<FileChunkRequest>(&out, "file/request")
        .pop()
        .expect("request");
    let missing = FileChunkResponse::Error {
        v: Version,
        request_id: req.request_id,
        sha256: sha(),
        code: protocol::files::ChunkErrorCode::NotFound,
        message: "no such file".into(),
    };
    let mut out = h.input(Input::Message {
        topic: "printloop/v1/printers/p0/file/chunk".into(),
        payload: missing.encode(),
    });
    assert!(
        published::<StateSnapshot>(&out, "/state").is_empty(),
        "rate limited: the start's own state just went out"
    );
    out.extend(h.input(Input::Printer(PrinterEvent::Temperatures(
        Temperatures::default(),
    ))));
    out.extend(h.advance(h.g.cfg.state_min_interval_ms()));
    let states = published::<StateSnapshot>(&out, "/state");
    assert_eq!(states.len(), 1, "published after the minimum interval");
    assert_eq!(states[0].phase, PrinterPhase::Ready);
}

/// Issue #10, item 3: a `start_job` whose `size_bytes` is wrong looped for ever on "file chunk
/// does not match the request". The file server's size wins: the job fails at once, saying
/// why. Other wrong answers (another offset, another file) are retried a bounded number of times.
#[test]
fn a_wrong_size_fails_the_job_and_wrong_chunks_are_retried_a_bounded_number_of_times() {
    let mut h = H::ready();
    let (_, out) = h.cmd(CommandAction::StartJob(StartJob {
        job_id: jid("j1"),
        printer_id: pid(),
        file_sha256: sha(),
        size_bytes: 1,
        name: "f.gcode".into(),
    }));
    let req = published::<FileChunkRequest>(&out, "file/request")
        .pop()
        .expect("request");
    let resp = FileChunkResponse::chunk(req.request_id, sha(), 0, FILE.len() as u64, &FILE[..1]);
    let out = h.input(Input::Message {
        topic: "printloop/v1/printers/p0/file/chunk".into(),
        payload: resp.encode(),
    });
    let ended = events(&out).into_iter().find_map(|e| match e {
        EventKind::JobEnded {
            outcome: JobStage::Failed,
            reason,
            ..
        } => reason,
        _ => None,
    });
    let reason = ended.expect("the job fails at once");
    assert!(reason.contains("not the 1 bytes"), "{reason}");
    assert_eq!(h.g.phase(), PrinterPhase::Ready);

    // A server that always answers with the wrong offset: bounded.
    let (_, mut out) = h.start("j2");
    let mut answers = 0;
    while let Some(req) = published::<FileChunkRequest>(&out, "file/request").pop() {
        answers += 1;
        assert!(answers < 100, "the transfer gives up");
        let wrong =
            FileChunkResponse::chunk(req.request_id, sha(), 3, FILE.len() as u64, &FILE[3..6]);
        out = h.input(Input::Message {
            topic: "printloop/v1/printers/p0/file/chunk".into(),
            payload: wrong.encode(),
        });
    }
    assert_eq!(answers, h.g.cfg.chunk_attempts);
    assert_eq!(h.g.phase(), PrinterPhase::Ready);
}

/// Issue #10, item 7: the supervisor's `start_job` for p0, replayed on p1's `cmd` under a new
/// id, printed the job a second time on p1. A start names its printer; any other refuses it.
#[test]
fn a_start_for_another_printer_is_refused() {
    let mut h = H::ready();
    let (r, out) = h.cmd(CommandAction::StartJob(StartJob {
        job_id: jid("j1"),
        printer_id: PrinterId::new("p1").expect("id"),
        file_sha256: sha(),
        size_bytes: FILE.len() as u64,
        name: "f.gcode".into(),
    }));
    assert_eq!(r.status, ResultStatus::Error);
    assert_eq!(r.code, Some(CommandErrorCode::WrongPrinter), "{r:?}");
    assert!(published::<FileChunkRequest>(&out, "file/request").is_empty());
    assert_eq!(h.g.phase(), PrinterPhase::Ready);
    // The job can still run where it belongs (nothing was recorded for it here).
    assert_eq!(h.start("j1").0.status, ResultStatus::Ok);
}

fn as_client(c: Command, client: &str) -> Vec<u8> {
    c.from_client(protocol::ClientId::new(client).expect("client"))
        .encode()
}

#[test]
fn a_client_over_its_rate_is_answered_busy_without_a_write_and_others_are_served() {
    let mut h = H::ready();
    let mut busy = 0;
    let mut ok = 0;
    // A careless client: 1 000 harmless commands within 100 ms.
    for i in 0..1_000 {
        h.now.mono_ms += i % 10 / 9; // 100 ms in all
        let c = Command::new(
            CommandId::new(format!("flood-{i}")).expect("id"),
            CommandAction::Rebirth(Empty {}),
        );
        let (r, out) = h.raw_cmd(&as_client(c, "careless"));
        match r.status {
            ResultStatus::Busy => {
                busy += 1;
                assert!(r.retry_after_ms.is_some_and(|ms| ms > 0 && ms <= 100));
                assert_eq!(r.code, Some(CommandErrorCode::Busy));
                assert!(persisted(&out).is_empty(), "a refusal writes nothing");
                assert!(
                    published::<StateSnapshot>(&out, "/state").is_empty(),
                    "a refusal publishes no state"
                );
                assert!(out.iter().all(|o| match o {
                    Output::Publish(p) => p.lane == Lane::Refusal,
                    _ => true,
                }));
            }
            ResultStatus::Ok => {
                ok += 1;
                assert_eq!(r.code, None);
            }
            other => panic!("{other:?}"),
        }
    }
    assert!((20..=22).contains(&ok), "{ok} admitted");
    assert_eq!(busy + ok, 1_000, "every command is answered");
    // The supervisor is not slowed down by it.
    let c = Command::new(
        CommandId::new("sup-1").expect("id"),
        CommandAction::Rebirth(Empty {}),
    );
    let (r, _) = h.raw_cmd(&as_client(c, "supervisor"));
    assert_eq!(r.status, ResultStatus::Ok);
    // A malformed flood with a readable id is limited the same way (an `error` answer is a
    // durable write).
    let (r, out) = h.raw_cmd(br#"{"v":1,"id":"bad-1","client":"careless","kind":"nope"}"#);
    assert_eq!(r.status, ResultStatus::Busy);
    assert!(persisted(&out).is_empty());
    // After the wait it asked for, the careless client is admitted again.
    h.advance(r.retry_after_ms.expect("retry after"));
    let c = Command::new(
        CommandId::new("late-1").expect("id"),
        CommandAction::Rebirth(Empty {}),
    );
    assert_eq!(
        h.raw_cmd(&as_client(c, "careless")).0.status,
        ResultStatus::Ok
    );
}

fn own(h: &mut H, kind: &str, payload: &[u8]) -> Vec<Output> {
    h.input(Input::Message {
        topic: format!("printloop/v1/printers/p0/{kind}"),
        payload: payload.to_vec(),
    })
}

#[test]
fn forged_retained_status_state_and_meta_are_corrected_at_most_once_a_second() {
    let mut h = H::ready();
    h.advance(2_000);
    let epoch = h.g.epoch();
    // Our own echoes are not contradictions.
    let mine = h.g.snapshot(h.now).encode();
    assert!(own(&mut h, "state", &mine).is_empty());
    let online = Status::online(epoch, h.now.unix_ms).encode();
    own(&mut h, "status", &online);
    let meta = h.g.meta().encode();
    own(&mut h, "meta", &meta);
    assert!(h
        .advance(500)
        .iter()
        .all(|o| !matches!(o, Output::Publish(p) if p.topic.ends_with("/status"))));

    // A forged offline status with a huge epoch: the truth is published again.
    let forged = Status::offline(epoch + 1_000, h.now.unix_ms, None).encode();
    let out = own(&mut h, "status", &forged);
    let out = [out, h.advance(0)].concat();
    let st = published::<Status>(&out, "/status");
    assert_eq!(st.len(), 1, "{out:?}");
    assert_eq!((st[0].presence, st[0].epoch), (Presence::Online, epoch));
    assert_eq!(published::<Meta>(&out, "/meta").len(), 1);
    assert_eq!(published::<StateSnapshot>(&out, "/state").len(), 1);

    // A state with an impossible seq and a meta that is not ours, at once: one more birth, a
    // second later, not one per message.
    let mut state = h.g.snapshot(h.now);
    state.seq = u64::MAX;
    let mut meta = h.g.meta();
    meta.name = "evil".into();
    let mut births = 0;
    let mut metas = Vec::new();
    for _ in 0..50 {
        let out = [
            own(&mut h, "state", &state.encode()),
            own(&mut h, "meta", &meta.encode()),
            own(&mut h, "status", b""),
            h.advance(20),
        ]
        .concat();
        births += published::<Status>(&out, "/status").len();
        metas.extend(published::<Meta>(&out, "/meta"));
    }
    assert_eq!(births, 1, "re-asserted once in the second");
    assert_eq!(metas.len(), 1);
    assert_eq!(metas[0].name, "p0");
    // Nothing more is contradicted: nothing more is published.
    let out = h.advance(1_000);
    assert!(published::<Meta>(&out, "/meta").is_empty());
}

#[test]
fn an_event_the_broker_never_echoed_is_published_again() {
    let mut h = H::ready();
    let (_, out) = h.start("j1");
    h.serve_file(out);
    let ev = h.g.outbox.len();
    assert!(ev > 0, "job_started is journaled");
    // No echo comes back (the broker lost it): it is sent again after the resend period.
    let out = h.advance(cfg().outbox_resend_ms() - 1);
    assert!(events(&out).is_empty());
    let out = h.advance(1);
    assert_eq!(events(&out).len(), ev);
    assert!(out.iter().all(|o| match o {
        Output::Publish(p) if p.topic.ends_with("/events") => p.lane == Lane::Control,
        _ => true,
    }));
}
