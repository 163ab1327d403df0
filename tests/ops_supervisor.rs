//! The operator commands against the real `printloop supervisor` (a child process on
//! Mosquitto): upload + submit, the list, refusals and the watcher's queue line.

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use rumqttc::QoS;
use testkit::{Mosquitto, TestClient};

const RUN_LIMIT: Duration = Duration::from_secs(30);

/// The supervisor process, killed on drop.
struct Supervisor(Child);

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn printloop(port: u16, args: &[&str]) -> Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_printloop"))
        .args(args)
        .env("PRINTLOOP_BROKER", format!("mqtt://127.0.0.1:{port}"))
        .env_remove("PRINTLOOP_TOPIC_ROOT")
        .env_remove("RUST_BACKTRACE")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(RUN_LIMIT, run).await {
        Ok(output) => output.expect("printloop starts"),
        Err(_) => panic!("printloop {args:?} did not exit within {RUN_LIMIT:?}"),
    }
}

fn stdout(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn operator_commands_work_with_the_real_supervisor() {
    let broker = Mosquitto::start().expect("mosquitto starts");
    let port = broker.port();
    let dir = tempfile::tempdir().expect("tempdir");

    // Wait for the supervisor's retained birth before asking it anything.
    let mut probe = TestClient::connect(port, "probe").await.expect("connect");
    probe
        .subscribe("printloop/v1/supervisor/status", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let log = std::fs::File::create(dir.path().join("supervisor.log")).expect("log file");
    let _supervisor = Supervisor(
        Command::new(env!("CARGO_BIN_EXE_printloop"))
            .args([
                "supervisor",
                "--broker",
                &format!("mqtt://127.0.0.1:{port}"),
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--metrics", "off", "--http", "off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone"))
            .stderr(log)
            .spawn()
            .expect("supervisor starts"),
    );
    let birth = probe.expect_message("the supervisor's birth").await;
    assert!(
        String::from_utf8_lossy(&birth.payload).contains("online"),
        "{birth:?}"
    );

    let gcode = dir.path().join("cube.gcode");
    let mut text = String::from("; test part\nG28\nM104 S215\n");
    for i in 0..20_000 {
        text.push_str(&format!("G1 X{} Y{} E{i}\n", i % 200, (i * 3) % 200));
    }
    std::fs::write(&gcode, &text).expect("write gcode");
    let path = gcode.to_str().expect("utf-8");

    let out = printloop(port, &["jobs", "add", path, "--copies", "2"]).await;
    let ids: Vec<String> = stdout(&out, "jobs add")
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    // The same file again: the supervisor already holds it.
    let out = printloop(port, &["jobs", "add", path, "--name", "again"]).await;
    assert_eq!(stdout(&out, "jobs add again").lines().count(), 1);

    let out = printloop(port, &["jobs", "list"]).await;
    let table = stdout(&out, "jobs list");
    assert_eq!(table.lines().count(), 4, "{table}");
    for id in &ids {
        assert!(table.contains(id.as_str()), "{table}");
    }
    assert!(
        table.contains("again") && table.contains("queued"),
        "{table}"
    );

    let out = printloop(port, &["jobs", "cancel", &ids[0]]).await;
    assert_eq!(stdout(&out, "cancel"), format!("{}: cancelled\n", ids[0]));

    let out = printloop(port, &["bed-clear", "p9"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(r#"unknown printer "p9""#), "{stderr}");

    let out = printloop(port, &["watch", "--once"]).await;
    let frame = stdout(&out, "watch --once");
    assert!(frame.starts_with("queue: 2 queued,"), "{frame}");

    // Issue #10, item 12: a job name with a line break and terminal escapes forged lines in
    // the supervisor's log. Now every control character is escaped, in the log and on the
    // terminal.
    let evil = "evil\n2026-01-01T00:00:00.000000Z ERROR forged: printer p0 on fire\x1b[2J\r";
    let out = printloop(port, &["jobs", "add", path, "--name", evil]).await;
    assert_eq!(stdout(&out, "jobs add evil").lines().count(), 1);
    let out = printloop(port, &["jobs", "list"]).await;
    let table = stdout(&out, "jobs list");
    assert!(!table.contains(['\x1b', '\r']), "{table:?}");
    assert!(
        !table.lines().any(|l| l.starts_with("2026-01-01")),
        "{table}"
    );
    let log = std::fs::read_to_string(dir.path().join("supervisor.log")).expect("log");
    assert!(
        log.contains("evil\\n2026-01-01"),
        "the name is in the log, escaped:\n{log}"
    );
    for line in log.lines() {
        assert!(
            !line.starts_with("2026-01-01"),
            "a forged log line: {line:?}"
        );
        assert!(
            !line.contains(['\x1b', '\r']),
            "a control character in the log: {line:?}"
        );
    }
}
