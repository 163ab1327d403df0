//! Home Assistant: discovery publishing, `homeassistant/status`, button presses, the
//! pause/resume/forget operations.

use super::*;
use protocol::presence::Meta;

fn meta(p: &str, name: &str, epoch: u64) -> Vec<u8> {
    Meta {
        v: Version,
        printer_id: pid(p),
        epoch,
        name: name.into(),
        model: "printloop-sim".into(),
        firmware: None,
        build_volume: None,
        tags: vec![],
        gateway_version: "0.1.0".into(),
    }
    .encode()
}

fn retained_under<'a>(out: &'a [Output], prefix: &str) -> Vec<&'a Publish> {
    out.iter()
        .filter_map(|o| match o {
            Output::Publish(p) if p.topic.starts_with(prefix) => Some(p),
            _ => None,
        })
        .collect()
}

/// A message, then time for the next round of discovery configs.
fn msg_and_round(h: &mut H, topic: &str, payload: Vec<u8>) -> Vec<Output> {
    let mut out = h.msg(topic, payload);
    out.extend(h.advance(crate::machine::HA_ROUND_MS));
    out
}

fn press(h: &mut H, p: &str, payload: &[u8]) -> Vec<Output> {
    h.msg(&format!("ha/printers/{p}/press"), payload.to_vec())
}

fn ha_answers(out: &[Output]) -> Vec<ApiResponse> {
    published::<ApiResponse>(out, "/api/response/homeassistant")
}

/// p0 online, printing job j (returned), with its meta published.
fn printing(h: &mut H) -> JobId {
    h.online("p0", 1);
    h.msg("printers/p0/meta", meta("p0", "Left", 1));
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
    assert_eq!(h.job(&j).state, JobState::Printing);
    j
}

#[test]
fn connect_subscribes_to_home_assistant_and_publishes_the_fleet_device() {
    let mut s = Supervisor::new(
        SupervisorConfig::default(),
        Snapshot::default(),
        Now {
            mono_ms: 0,
            unix_ms: 5,
        },
    );
    let now = Now {
        mono_ms: 0,
        unix_ms: 5,
    };
    let _ = s.prepare_connect(now);
    let out = s.handle(now, Input::Connected);
    assert!(out.contains(&Output::Subscribe {
        filter: "homeassistant/status".into(),
        qos0: true
    }));
    assert!(out.contains(&Output::Subscribe {
        filter: "printloop/v1/ha/printers/+/press".into(),
        qos0: true
    }));
    let fleet = retained_under(&out, "homeassistant/");
    assert_eq!(
        fleet.len(),
        3,
        "queue length, jobs printing, supervisor online"
    );
    assert!(fleet.iter().all(|p| p.retain && !p.payload.is_empty()));

    // Turned off: no subscription, nothing published.
    let mut cfg = SupervisorConfig::default();
    cfg.ha.enabled = false;
    let mut s = Supervisor::new(cfg, Snapshot::default(), now);
    let _ = s.prepare_connect(now);
    let mut out = s.handle(now, Input::Connected);
    for m in [
        (
            "printloop/v1/printers/p0/status",
            Status::online(1, 0).encode(),
        ),
        ("printloop/v1/printers/p0/meta", meta("p0", "Left", 1)),
        ("homeassistant/status", b"online".to_vec()),
    ] {
        out.extend(s.handle(
            now,
            Input::Message {
                topic: m.0.into(),
                payload: m.1,
            },
        ));
    }
    out.extend(s.handle(
        Now {
            mono_ms: 60_000,
            unix_ms: 60_005,
        },
        Input::Tick,
    ));
    assert!(retained_under(&out, "homeassistant").is_empty());
    assert!(!out
        .iter()
        .any(|o| matches!(o, Output::Subscribe { filter, .. } if filter.contains("homeassistant") || filter.contains("/ha/"))));
}

#[test]
fn a_printer_is_discovered_once_its_meta_names_it_and_again_only_when_that_changes() {
    let mut h = H::new();
    let out = h.online("p0", 1);
    assert!(
        retained_under(&out, "homeassistant/").is_empty(),
        "waits for meta"
    );
    let out = msg_and_round(&mut h, "printers/p0/meta", meta("p0", "Left", 1));
    let configs = retained_under(&out, "homeassistant/");
    assert_eq!(configs.len(), 13);
    assert!(configs.iter().all(|p| p.retain));
    assert!(configs
        .iter()
        .any(|p| p.topic == "homeassistant/sensor/printloop_p0/nozzle_temp/config"));
    // A reconnect of the gateway (new epoch, same meta otherwise): nothing new to say.
    h.online("p0", 2);
    let out = msg_and_round(&mut h, "printers/p0/meta", meta("p0", "Left", 2));
    assert!(retained_under(&out, "homeassistant/").is_empty());
    // Renamed: the configs (device name) are published again, same unique ids.
    let out = msg_and_round(&mut h, "printers/p0/meta", meta("p0", "Right", 3));
    let again = retained_under(&out, "homeassistant/");
    assert_eq!(again.len(), 13);
    let v: serde_json::Value = serde_json::from_slice(&again[0].payload).expect("JSON");
    assert_eq!(v["device"]["name"], "Right");
    assert_eq!(v["unique_id"], "printloop_p0_phase");
}

#[test]
fn home_assistant_online_brings_every_config_again_after_a_bounded_jitter() {
    let mut h = H::new();
    h.online("p0", 1);
    h.msg("printers/p0/meta", meta("p0", "Left", 1));
    h.online("p1", 1);
    h.msg("printers/p1/meta", meta("p1", "Right", 1));
    assert_eq!(
        retained_under(&h.advance(crate::machine::HA_ROUND_MS), "homeassistant/").len(),
        26,
        "both printers' configs, in the next round"
    );
    let out = h.input(Input::Message {
        topic: "homeassistant/status".into(),
        payload: b"online".to_vec(),
    });
    assert!(
        retained_under(&out, "homeassistant/").is_empty(),
        "not at once"
    );
    let due = h.s.next_deadline().expect("a deadline");
    assert!(due <= h.now.mono_ms + 5_000, "jitter is bounded: {due}");
    // `offline` and a second `online` do not push the re-publish later.
    h.input(Input::Message {
        topic: "homeassistant/status".into(),
        payload: b"offline".to_vec(),
    });
    let mut out = Vec::new();
    let mut waited = 0;
    while waited <= 5_000 {
        out.extend(h.advance(250));
        waited += 250;
    }
    let configs = retained_under(&out, "homeassistant/");
    assert_eq!(configs.len(), 3 + 13 + 13, "fleet + two printers, once");
    // And only once.
    assert!(retained_under(&h.advance(10_000), "homeassistant/").is_empty());
}

#[test]
fn pause_press_pauses_once_and_a_long_pause_never_times_the_job_out() {
    let mut h = H::new();
    let j = printing(&mut h);
    let out = press(&mut h, "p0", b"pause");
    let cmds = commands(&out, "p0");
    assert_eq!(cmds.len(), 1, "{out:?}");
    assert!(matches!(&cmds[0].action, CommandAction::Pause(r) if r.job_id.as_ref() == Some(&j)));
    assert!(cmds[0].expires_at.is_some());
    assert!(ha_answers(&out)[0].ok);
    // The same press delivered again before the printer reported: nothing happens twice.
    let out = press(&mut h, "p0", b"pause");
    assert!(commands(&out, "p0").is_empty(), "{out:?}");
    // The printer pauses and stays paused far longer than the step timeout, heartbeating.
    h.report(
        "p0",
        state(PrinterPhase::Paused, Some((j.as_str(), JobStage::Paused))),
    );
    assert_eq!(h.job(&j).state, JobState::Paused);
    let step = h.s.cfg.step_timeout_ms();
    let mut waited = 0;
    while waited < step * 3 {
        h.advance(10_000);
        waited += 10_000;
        h.report(
            "p0",
            state(PrinterPhase::Paused, Some((j.as_str(), JobStage::Paused))),
        );
    }
    assert_eq!(h.job(&j).state, JobState::Paused, "paused is not silent");
    assert_eq!(h.s.printers[&pid("p0")].rec.assigned.as_ref(), Some(&j));
    // Pause again while paused: refused, answered, no command.
    let out = press(&mut h, "p0", b"pause");
    assert!(commands(&out, "p0").is_empty());
    let answer = &ha_answers(&out)[0];
    assert!(!answer.ok);
    assert_eq!(answer.code, Some(ApiErrorCode::WrongPhase), "{answer:?}");
    // Resume.
    let out = press(&mut h, "p0", b"resume");
    assert!(matches!(
        commands(&out, "p0")[..],
        [Command {
            action: CommandAction::Resume(_),
            ..
        }]
    ));
    h.report(
        "p0",
        state(
            PrinterPhase::Printing,
            Some((j.as_str(), JobStage::Printing)),
        ),
    );
    assert_eq!(h.job(&j).state, JobState::Printing);
    // Pause, resume, pause: the second pause is a new press (the printer moved on).
    let out = press(&mut h, "p0", b"pause");
    assert_eq!(commands(&out, "p0").len(), 1);
}

#[test]
fn presses_that_make_no_sense_are_refused_with_a_reason_and_never_panic() {
    let mut h = H::new();
    h.online("p0", 1);
    h.msg("printers/p0/meta", meta("p0", "Left", 1));
    h.report("p0", state(PrinterPhase::Ready, None));
    for (action, why) in [
        (&b"pause"[..], "ready"),
        (b"resume", "ready"),
        (b"cancel", "no job"),
        (b"bed_cleared", "idle or finished"),
    ] {
        let out = press(&mut h, "p0", action);
        assert!(commands(&out, "p0").is_empty(), "{out:?}");
        let a = ha_answers(&out);
        assert_eq!(a.len(), 1);
        assert!(!a[0].ok);
        let e = a[0].error.clone().unwrap_or_default();
        assert!(e.contains(why), "{e}");
    }
    // Unknown printer: refused with a reason.
    let out = press(&mut h, "p9", b"pause");
    assert!(ha_answers(&out)[0]
        .error
        .as_deref()
        .unwrap_or("")
        .contains("unknown printer"));
    // Garbage: logged and counted, nothing published.
    let before = h.s.counters().rejected_messages;
    for garbage in [&b""[..], b"\xff\x00", b"{\"v\":1}", &[b'x'; 10_000]] {
        let out = press(&mut h, "p0", garbage);
        assert!(out.iter().all(|o| !matches!(o, Output::Publish(p) if p.topic.contains("/cmd") || p.topic.contains("response"))));
    }
    assert_eq!(h.s.counters().rejected_messages, before + 4);
    // A press topic with a bad printer id is a rejected topic, not a panic.
    let out = h.msg("ha/printers/P0!/press", b"pause".to_vec());
    assert!(commands(&out, "P0!").is_empty());
}

#[test]
fn cancel_and_bed_cleared_presses_do_what_the_operator_api_does() {
    let mut h = H::new();
    let j = printing(&mut h);
    let out = press(&mut h, "p0", b"cancel");
    assert!(
        matches!(&commands(&out, "p0")[..], [Command { action: CommandAction::Cancel(r), .. }] if r.job_id.as_ref() == Some(&j))
    );
    assert_eq!(h.job(&j).state, JobState::Cancelled);
    h.report(
        "p0",
        state(
            PrinterPhase::Finished,
            Some((j.as_str(), JobStage::Cancelled)),
        ),
    );
    let out = press(&mut h, "p0", b"bed_cleared");
    assert!(matches!(
        &commands(&out, "p0")[..],
        [Command {
            action: CommandAction::BedCleared(_),
            ..
        }]
    ));
    assert!(ha_answers(&out)[0].ok);
}

#[test]
fn pause_and_resume_operations_check_the_phase() {
    let mut h = H::new();
    let j = printing(&mut h);
    let (r, out) = h.api(ApiOp::ResumePrinter(protocol::api::PrinterArgs {
        printer_id: pid("p0"),
    }));
    assert!(!r.ok && commands(&out, "p0").is_empty(), "{r:?}");
    let (r, out) = h.api(ApiOp::PausePrinter(protocol::api::PrinterArgs {
        printer_id: pid("p0"),
    }));
    assert!(r.ok, "{r:?}");
    assert!(
        matches!(&commands(&out, "p0")[..], [Command { action: CommandAction::Pause(r), .. }] if r.job_id.as_ref() == Some(&j))
    );
    let (r, _) = h.api(ApiOp::PausePrinter(protocol::api::PrinterArgs {
        printer_id: pid("p8"),
    }));
    assert_eq!(r.code, Some(ApiErrorCode::UnknownPrinter));
    // An offline printer cannot be paused through the supervisor.
    h.msg("printers/p0/status", Status::offline(1, 0, None).encode());
    let (r, _) = h.api(ApiOp::PausePrinter(protocol::api::PrinterArgs {
        printer_id: pid("p0"),
    }));
    assert_eq!(r.code, Some(ApiErrorCode::PrinterUnreachable));
}

#[test]
fn forget_removes_the_printer_its_entities_and_its_retained_topics() {
    let mut h = H::new();
    h.online("p0", 1);
    h.msg("printers/p0/meta", meta("p0", "Left", 1));
    h.report("p0", state(PrinterPhase::Idle, None));
    let forget = || {
        ApiOp::ForgetPrinter(protocol::api::PrinterArgs {
            printer_id: pid("p0"),
        })
    };
    let (r, out) = h.api(forget());
    assert_eq!(r.code, Some(ApiErrorCode::PrinterOnline));
    assert!(!out.iter().any(
        |o| matches!(o, Output::Persist(m) if m.contains(&Mutation::RemovePrinter(pid("p0"))))
    ));
    // The gateway is stopped (its will), then the printer is forgotten.
    h.msg("printers/p0/status", Status::offline(1, 0, None).encode());
    let (r, out) = h.api(forget());
    assert!(r.ok, "{r:?}");
    assert!(out.iter().any(
        |o| matches!(o, Output::Persist(m) if m.contains(&Mutation::RemovePrinter(pid("p0"))))
    ));
    let cleared = retained_under(&out, "homeassistant/");
    assert_eq!(cleared.len(), 13);
    assert!(cleared.iter().all(|p| p.retain && p.payload.is_empty()));
    for t in ["status", "meta", "state"] {
        let topic = format!("printloop/v1/printers/p0/{t}");
        assert!(
            out.iter().any(|o| matches!(o, Output::Publish(p) if p.topic == topic && p.retain && p.payload.is_empty())),
            "{topic} cleared"
        );
    }
    assert!(h.s.printer_summaries().is_empty());
    // The cleared retained topics coming back are ignored (no new printer).
    h.msg("printers/p0/status", Vec::new());
    assert!(h.s.printer_summaries().is_empty());
    let (r, _) = h.api(forget());
    assert_eq!(r.code, Some(ApiErrorCode::UnknownPrinter));
}

#[test]
fn forget_is_refused_while_a_job_runs_on_the_printer() {
    let mut h = H::new();
    let j = printing(&mut h);
    h.msg("printers/p0/status", Status::offline(1, 0, None).encode());
    let (r, _) = h.api(ApiOp::ForgetPrinter(protocol::api::PrinterArgs {
        printer_id: pid("p0"),
    }));
    assert_eq!(r.code, Some(ApiErrorCode::PrinterHasJob));
    let e = r.error.unwrap_or_default();
    assert!(e.contains(j.as_str()) && e.contains("cancel"), "{e}");
}

#[test]
fn a_large_fleet_is_discovered_in_bounded_rounds() {
    let mut h = H::new();
    let n = 60;
    let mut out = Vec::new();
    for i in 0..n {
        let p = format!("q{i}");
        out.extend(h.online(&p, 1));
        out.extend(h.msg(&format!("printers/{p}/meta"), meta(&p, &p, 1)));
    }
    let mut rounds = vec![retained_under(&out, "homeassistant/").len()];
    for _ in 0..10 {
        let due = h.s.next_deadline().expect("a deadline while configs wait");
        let wait = due.saturating_sub(h.now.mono_ms).max(1);
        rounds.push(retained_under(&h.advance(wait), "homeassistant/").len());
    }
    assert!(
        rounds.iter().all(|&r| r <= 25 * 13),
        "a round is at most 25 printers: {rounds:?}"
    );
    assert_eq!(rounds.iter().sum::<usize>(), n * 13, "{rounds:?}");
}

#[test]
fn an_invented_printer_gets_no_home_assistant_device_until_it_is_enrolled() {
    let mut h = H::new();
    h.input(Input::Enrolled(Some([pid("p0")].into_iter().collect())));
    let (ha_cfg, topics) = (h.s.cfg.ha.clone(), h.s.cfg.topics.clone());
    let devices = |out: &[Output], p: &str| {
        let mine = crate::ha::printer_config_topics(&ha_cfg, &topics, &pid(p));
        retained_under(out, "homeassistant/")
            .into_iter()
            .filter(|x| mine.contains(&x.topic))
            .map(|x| !x.payload.is_empty())
            .collect::<Vec<bool>>()
    };
    let out = msg_and_round(&mut h, "printers/ghost/meta", meta("ghost", "Ghost", 1));
    assert!(devices(&out, "ghost").is_empty(), "no device for ghost");
    let out = msg_and_round(&mut h, "printers/p0/meta", meta("p0", "P0", 1));
    assert!(!devices(&out, "p0").is_empty() && devices(&out, "p0").iter().all(|c| *c));
    // Enrolled: its device appears; revoked again: its configs are deleted.
    let mut out = h.input(Input::Enrolled(Some(
        [pid("p0"), pid("ghost")].into_iter().collect(),
    )));
    out.extend(h.advance(crate::machine::HA_ROUND_MS));
    assert!(!devices(&out, "ghost").is_empty() && devices(&out, "ghost").iter().all(|c| *c));
    let out = h.input(Input::Enrolled(Some([pid("p0")].into_iter().collect())));
    let ghost = devices(&out, "ghost");
    assert!(
        !ghost.is_empty() && ghost.iter().all(|c| !*c),
        "configs deleted: {out:?}"
    );
}
