//! `printloop watch` as a user runs it: the real binary against a real broker holding retained
//! `state`, `status` and `queue` messages (as gateways and the supervisor leave them).

use std::process::{Output, Stdio};
use std::time::Duration;

use rumqttc::QoS;
use testkit::{BrokerKind, TestBroker, TestClient};
use tokio::io::{AsyncBufReadExt as _, BufReader};

const RUN_LIMIT: Duration = Duration::from_secs(30);

const SHA: &str = "03ab417c94be0b5209793ee0a79f9d843017afaba4ca8807e1763652aa8fcb37";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

fn status(presence: &str, epoch: u64) -> String {
    format!(
        r#"{{"v":1,"presence":"{presence}","epoch":{epoch},"at_ms":{}}}"#,
        now_ms()
    )
}

fn printing(seq: u64, pct: f64) -> String {
    format!(
        r#"{{"v":1,"epoch":7,"seq":{seq},"at_ms":{},"heartbeat_s":10,"phase":"printing","bed_clear":false,
        "job":{{"job_id":"j-000042","file_sha256":"{SHA}","name":"cube20.gcode","stage":"printing",
        "line":3120,"total_lines":7160,"progress_pct":{pct},"remaining_s":660,"size_bytes":186847}}}}"#,
        now_ms()
    )
}

fn idle(epoch: u64) -> String {
    format!(
        r#"{{"v":1,"epoch":{epoch},"seq":1,"at_ms":{},"heartbeat_s":10,"phase":"idle","bed_clear":false}}"#,
        now_ms()
    )
}

fn interrupted() -> String {
    format!(
        r#"{{"v":1,"epoch":8,"seq":1,"at_ms":{},"heartbeat_s":10,"phase":"finished","bed_clear":false,
        "job":{{"job_id":"j-000040","file_sha256":"{SHA}","name":"gear.gcode","stage":"interrupted",
        "line":3188,"total_lines":7160,"progress_pct":44.5,"size_bytes":186847,
        "reason":"gateway restarted during the print"}}}}"#,
        now_ms()
    )
}

const QUEUE: &str = r#"{"v":1,"epoch":3,"seq":88,"at_ms":1795000123000,
  "counts":{"queued":4,"starting":0,"printing":1,"awaiting_harvest":1,"attention":0},
  "jobs":[],"truncated":false}"#;

async fn retain(client: &mut TestClient, topic: &str, payload: String) {
    client
        .publish(topic, QoS::AtLeastOnce, true, payload.into_bytes())
        .await
        .expect("retained publish");
}

async fn printloop(port: u16, args: &[&str]) -> Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_printloop"))
        .args(args)
        .env("PRINTLOOP_BROKER", format!("mqtt://127.0.0.1:{port}"))
        .env_remove("PRINTLOOP_TOPIC_ROOT")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(RUN_LIMIT, run).await {
        Ok(output) => output.expect("printloop starts"),
        Err(_) => panic!("printloop {args:?} did not exit within {RUN_LIMIT:?}"),
    }
}

fn stdout_of(out: &Output) -> String {
    assert!(
        out.status.success(),
        "watch failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8")
}

async fn fleet(kind: BrokerKind) {
    let broker = TestBroker::start(kind).expect("broker starts");
    let port = broker.port();
    let mut gw = TestClient::connect(port, "fake-gateways")
        .await
        .expect("connect");
    let root = "printloop/v1";
    retain(
        &mut gw,
        &format!("{root}/printers/p0/status"),
        status("online", 7),
    )
    .await;
    retain(
        &mut gw,
        &format!("{root}/printers/p0/state"),
        printing(5, 43.6),
    )
    .await;
    retain(
        &mut gw,
        &format!("{root}/printers/p1/status"),
        status("online", 2),
    )
    .await;
    retain(&mut gw, &format!("{root}/printers/p1/state"), idle(2)).await;
    retain(
        &mut gw,
        &format!("{root}/printers/p2/status"),
        status("offline", 8),
    )
    .await;
    retain(&mut gw, &format!("{root}/printers/p2/state"), interrupted()).await;
    retain(&mut gw, &format!("{root}/queue"), QUEUE.to_owned()).await;
    // Another farm on the same broker: not shown.
    retain(&mut gw, "farm-b/printloop/v1/printers/x9/state", idle(1)).await;

    let out = printloop(port, &["watch", "--once", "--timeout", "5"]).await;
    let text = stdout_of(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert_eq!(
        lines[0],
        "queue: 4 queued, 0 starting, 1 printing, 1 awaiting harvest, 0 need attention"
    );
    assert_eq!(
        lines[1],
        "p0  online   printing      [#########-----------]   43.6%  j-000042  cube20.gcode  11m left"
    );
    assert_eq!(lines[2], "p1  online   idle          bed not cleared");
    assert!(
        lines[3].starts_with("p2  offline  finished      [#########-----------]   44.5%  j-000040  gear.gcode  (interrupted)")
            && lines[3].contains("gateway restarted during the print")
            && lines[3].contains("clear the bed"),
        "{}",
        lines[3]
    );
    assert!(
        !text.contains('\x1b'),
        "no escapes when stdout is not a terminal"
    );

    let out = printloop(
        port,
        &[
            "watch",
            "--once",
            "--timeout",
            "5",
            "--topic-root",
            "farm-b/printloop/v1",
        ],
    )
    .await;
    let text = stdout_of(&out);
    assert!(
        text.contains("x9  unknown  idle") && !text.contains("p0"),
        "{text}"
    );
}

#[tokio::test]
async fn watch_once_prints_the_retained_fleet_on_rumqttd() {
    fleet(BrokerKind::Embedded).await;
}

#[tokio::test]
async fn watch_once_prints_the_retained_fleet_on_mosquitto() {
    fleet(BrokerKind::Mosquitto).await;
}

/// rumqttd gives a QoS 1 wildcard subscription at most 100 retained messages; watch subscribes
/// at QoS 0 and sees every printer.
#[tokio::test]
async fn watch_once_sees_more_than_100_printers_on_rumqttd() {
    let broker = TestBroker::start(BrokerKind::Embedded).expect("broker starts");
    let port = broker.port();
    let mut gw = TestClient::connect(port, "fake-gateways")
        .await
        .expect("connect");
    for i in 0..150 {
        retain(
            &mut gw,
            &format!("printloop/v1/printers/p{i:03}/state"),
            idle(1),
        )
        .await;
    }
    let out = printloop(port, &["watch", "--once", "--timeout", "10"]).await;
    let text = stdout_of(&out);
    let printers = text.lines().filter(|l| l.starts_with('p')).count();
    assert_eq!(printers, 150, "{text}");
}

#[tokio::test]
async fn watch_without_a_terminal_prints_a_line_when_a_printer_changes() {
    let broker = TestBroker::start(BrokerKind::Embedded).expect("broker starts");
    let port = broker.port();
    let mut gw = TestClient::connect(port, "fake-gateway")
        .await
        .expect("connect");
    retain(
        &mut gw,
        "printloop/v1/printers/p0/status",
        status("online", 7),
    )
    .await;
    retain(&mut gw, "printloop/v1/printers/p0/state", printing(5, 43.6)).await;

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_printloop"))
        .args(["watch", "--broker", &format!("mqtt://127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("watch starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    let mut until = async |what: &str, seen: &mut Vec<String>| loop {
        match tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                let done = line.contains(what);
                seen.push(line);
                if done {
                    return;
                }
            }
            other => panic!("no line with {what:?} ({other:?}); saw {seen:?}"),
        }
    };
    until("43.6%", &mut seen).await;
    assert!(
        seen[0].starts_with("printloop watch  mqtt://127.0.0.1:"),
        "{seen:?}"
    );
    retain(&mut gw, "printloop/v1/printers/p0/state", printing(6, 50.0)).await;
    until("50.0%", &mut seen).await;
    let p0_lines = seen.iter().filter(|l| l.starts_with("p0 ")).count();
    assert_eq!(p0_lines, 2, "one line per change: {seen:?}");
    assert!(seen.iter().all(|l| !l.contains('\x1b')), "{seen:?}");
    child.start_kill().expect("kill watch");
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
}
