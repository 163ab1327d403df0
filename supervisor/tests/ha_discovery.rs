//! Home Assistant discovery through a real broker (the embedded rumqttd): the supervisor
//! publishes retained configs once a printer's meta is known, publishes them again when
//! `homeassistant/status` turns `online`, turns a button press into a `pause` command, and
//! deletes everything of a printer it is told to forget.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use protocol::api::{ApiOp, ApiRequest, ApiResponse, PrinterArgs};
use protocol::command::{Command, CommandAction};
use protocol::presence::{Meta, Status};
use protocol::state::{JobProgress, JobStage, PrinterPhase, StateSnapshot};
use protocol::{ClientId, CommandId, JobId, Payload as _, PrinterId, Sha256Hex, Version};
use rumqttc::QoS;
use supervisor::ha::HaConfig;
use supervisor::machine::SupervisorConfig;
use supervisor::run::{BrokerTarget, Settings};
use testkit::{EmbeddedBroker, TestClient};

const ROOT: &str = "printloop/v1";
const WAIT: Duration = Duration::from_secs(15);

fn p0() -> PrinterId {
    PrinterId::new("p0").expect("id")
}

fn meta() -> Vec<u8> {
    Meta {
        v: Version,
        printer_id: p0(),
        epoch: 1,
        name: "Left".into(),
        model: "printloop-sim".into(),
        firmware: None,
        build_volume: None,
        tags: vec![],
        gateway_version: "0.1.0".into(),
    }
    .encode()
}

fn printing_state() -> Vec<u8> {
    StateSnapshot {
        v: Version,
        epoch: 1,
        seq: 5,
        at_ms: 1,
        heartbeat_s: 60,
        phase: PrinterPhase::Printing,
        bed_clear: false,
        maintenance: false,
        job: Some(JobProgress {
            job_id: JobId::new("j-x").expect("id"),
            file_sha256: Sha256Hex::digest(b"g"),
            name: "cube.gcode".into(),
            stage: JobStage::Printing,
            line: 1,
            total_lines: 10,
            progress_pct: 10.0,
            remaining_s: Some(100),
            transferred_bytes: None,
            size_bytes: 1,
            started_at_ms: Some(1),
            ended_at_ms: None,
            reason: None,
        }),
        temps: None,
        last_command: None,
        recent_jobs: vec![],
        error: None,
    }
    .encode()
}

/// Receives until `done(seen)` holds (topic → last payload), bounded by `WAIT`.
async fn collect_until(
    c: &mut TestClient,
    seen: &mut BTreeMap<String, Vec<u8>>,
    what: &str,
    done: impl Fn(&BTreeMap<String, Vec<u8>>) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    while !done(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out waiting for {what}; saw {:?}",
            seen.keys()
        );
        if let Some(p) = c.recv(left.min(Duration::from_millis(500))).await {
            seen.insert(p.topic.clone(), p.payload.to_vec());
        }
    }
}

fn printer_configs(seen: &BTreeMap<String, Vec<u8>>) -> usize {
    seen.iter()
        .filter(|(t, v)| t.contains("/printloop_p0/") && !v.is_empty())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_republish_press_and_forget_on_a_real_broker() {
    let broker = EmbeddedBroker::start().expect("broker");
    let port = broker.v4_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = Settings {
        machine: SupervisorConfig {
            ha: HaConfig {
                republish_jitter_ms: 300,
                ..HaConfig::default()
            },
            ..SupervisorConfig::default()
        },
        broker: BrokerTarget::External(transport::BrokerAddr::loopback(port)),
        data_dir: dir.path().to_path_buf(),
        metrics: None,
        http: None,
        keepalive: Duration::from_secs(5),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let sup = tokio::spawn(supervisor::run::run(
        settings,
        async move {
            let _ = stop_rx.await;
        },
        Some(ready_tx),
    ));
    tokio::time::timeout(WAIT, ready_rx)
        .await
        .expect("supervisor starts in time")
        .expect("supervisor ready");

    // Home Assistant's view: everything under the discovery prefix.
    let mut ha = TestClient::connect(port, "ha-watcher").await.expect("ha");
    ha.subscribe("homeassistant/#", QoS::AtMostOnce)
        .await
        .expect("subscribe");
    let mut seen = BTreeMap::new();
    collect_until(&mut ha, &mut seen, "the fleet device's 3 configs", |s| {
        s.keys().filter(|t| t.contains("__fleet/")).count() == 3
    })
    .await;

    // A gateway's birth: meta, state, status (retained), and it listens for commands.
    let mut gw = TestClient::connect(port, "gw-p0").await.expect("gateway");
    gw.subscribe(&format!("{ROOT}/printers/p0/cmd"), QoS::AtLeastOnce)
        .await
        .expect("subscribe cmd");
    for (t, payload) in [
        ("meta", meta()),
        ("state", printing_state()),
        ("status", Status::online(1, 1).encode()),
    ] {
        gw.publish(
            &format!("{ROOT}/printers/p0/{t}"),
            QoS::AtLeastOnce,
            true,
            payload,
        )
        .await
        .expect("publish");
    }
    collect_until(&mut ha, &mut seen, "p0's 13 configs", |s| {
        printer_configs(s) == 13
    })
    .await;
    let phase: serde_json::Value =
        serde_json::from_slice(&seen["homeassistant/sensor/printloop_p0/phase/config"])
            .expect("JSON config");
    assert_eq!(phase["state_topic"], "printloop/v1/printers/p0/state");
    assert_eq!(phase["unique_id"], "printloop_p0_phase");

    // Retained: a subscriber that comes later (Home Assistant restarting) gets them all.
    let mut late = TestClient::connect(port, "ha-late").await.expect("late");
    late.subscribe("homeassistant/#", QoS::AtMostOnce)
        .await
        .expect("subscribe");
    let mut late_seen = BTreeMap::new();
    collect_until(&mut late, &mut late_seen, "the retained configs", |s| {
        s.len() == 16
    })
    .await;
    assert!(late_seen.keys().all(|t| t.ends_with("/config")));
    late.disconnect().await.expect("disconnect");

    // Home Assistant's birth: every config again, after the (short) jitter.
    seen.clear();
    ha.publish("homeassistant/status", QoS::AtMostOnce, false, "online")
        .await
        .expect("birth");
    collect_until(&mut ha, &mut seen, "the re-published configs", |s| {
        s.keys().filter(|t| t.ends_with("/config")).count() == 16
    })
    .await;

    // The pause button: a QoS 0 press becomes a pause command for the printer's job.
    let press = format!("{ROOT}/ha/printers/p0/press");
    let deadline = Instant::now() + WAIT;
    let cmd = loop {
        assert!(Instant::now() < deadline, "no pause command arrived");
        ha.publish(&press, QoS::AtMostOnce, false, "pause")
            .await
            .expect("press");
        if let Some(p) = gw.recv(Duration::from_millis(700)).await {
            break Command::decode(&p.payload).expect("a command");
        }
    };
    assert!(
        matches!(&cmd.action, CommandAction::Pause(r) if r.job_id.as_ref().map(JobId::as_str) == Some("j-x")),
        "{cmd:?}"
    );

    // Decommission: the gateway goes away (its will), then `forget_printer`.
    gw.publish(
        &format!("{ROOT}/printers/p0/status"),
        QoS::AtLeastOnce,
        true,
        Status::offline(1, 1, None).encode(),
    )
    .await
    .expect("offline");
    let mut op = TestClient::connect(port, "op").await.expect("operator");
    op.subscribe(&format!("{ROOT}/api/response/op"), QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let deadline = Instant::now() + WAIT;
    let mut n = 0;
    loop {
        assert!(Instant::now() < deadline, "forget was never accepted");
        n += 1;
        let req = ApiRequest {
            v: Version,
            id: CommandId::new(format!("f{n}")).expect("id"),
            client: ClientId::new("op").expect("id"),
            op: ApiOp::ForgetPrinter(PrinterArgs { printer_id: p0() }),
        };
        op.publish(
            &format!("{ROOT}/api/request"),
            QoS::AtLeastOnce,
            false,
            req.encode(),
        )
        .await
        .expect("request");
        let answer = op.expect_message("the answer to forget_printer").await;
        let answer = ApiResponse::decode(&answer.payload).expect("response");
        if answer.ok {
            break;
        }
        // The offline status may not have been handled yet.
        assert!(
            answer.code == Some(protocol::api::ApiErrorCode::PrinterOnline),
            "{answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    collect_until(&mut ha, &mut seen, "p0's configs deleted", |s| {
        printer_configs(s) == 0
    })
    .await;
    // Nothing of p0 is retained any more; the fleet device stays.
    let mut after = TestClient::connect(port, "after").await.expect("after");
    after
        .subscribe("homeassistant/#", QoS::AtMostOnce)
        .await
        .expect("subscribe");
    after
        .subscribe(&format!("{ROOT}/printers/p0/#"), QoS::AtMostOnce)
        .await
        .expect("subscribe");
    let retained = after
        .collect_until_quiet(Duration::from_millis(800), WAIT)
        .await;
    let topics: Vec<&str> = retained.iter().map(|p| p.topic.as_str()).collect();
    assert_eq!(topics.len(), 3, "only the fleet device is left: {topics:?}");
    assert!(topics.iter().all(|t| t.contains("__fleet/")), "{topics:?}");

    let _ = stop_tx.send(());
    tokio::time::timeout(WAIT, sup)
        .await
        .expect("supervisor stops")
        .expect("task")
        .expect("supervisor ran cleanly");
}
