//! `printloop demo` runs the supervisor and every gateway in one process: each log line must be
//! attributed to its own part. Spans used to be entered across `.await`s, so whatever a thread
//! polled next logged under them: the supervisor's lines carried
//! `gateway{printer=p0}:gateway{printer=p1}` (issue #11, item 7).

use std::time::Duration;

const RUN_LIMIT: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_demo_log_line_names_its_own_printer_or_the_supervisor() {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_printloop"))
        .args(["demo", "--printers", "3", "--jobs", "3", "--speed", "100"])
        .args(["--exit-when-done", "--timeout", "200"])
        .env("RUST_LOG", "info")
        .env_remove("RUST_BACKTRACE")
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(RUN_LIMIT, run).await {
        Ok(output) => output.expect("printloop starts"),
        Err(_) => panic!("printloop demo did not exit within {RUN_LIMIT:?}"),
    };
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the demo failed:\n{log}");
    let (mut supervisor, mut gateway) = (0, 0);
    for line in log.lines() {
        // `<time> <LEVEL> <spans>: <target>: <message>`; the spans are absent for some lines.
        let Some((head, _)) = line.split_once(": ") else {
            continue;
        };
        let rest = &line[head.len() + 2..];
        let target = rest.split(": ").next().unwrap_or("");
        let gateways_named = head.matches("gateway{printer=").count();
        if target.starts_with("supervisor::") {
            supervisor += 1;
            assert_eq!(
                gateways_named, 0,
                "a supervisor line under a gateway's span: {line}"
            );
        }
        if target.starts_with("gateway::") || target.starts_with("transport") {
            assert!(
                gateways_named <= 1,
                "a line under two gateways' spans: {line}"
            );
        }
        if target.starts_with("gateway::run") || target.starts_with("gateway::machine") {
            gateway += 1;
            assert_eq!(
                gateways_named, 1,
                "a gateway line that names no printer: {line}"
            );
        }
    }
    assert!(supervisor > 0 && gateway > 0, "no lines to check:\n{log}");
}
