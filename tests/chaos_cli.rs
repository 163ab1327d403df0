//! `printloop chaos` as an operator runs it: a short run with real processes on rumqttd passes
//! with faults injected and reports one JSON line; a run whose stores hold a forged ledger
//! entry fails with the violation named.
//!
//! The runner starts `printloop-gateway` from beside the `printloop` binary: `cargo test` at
//! the root builds every workspace binary (the `gateway` package is a default member).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

fn gateway_beside_printloop() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_printloop")).with_file_name("printloop-gateway");
    assert!(
        bin.is_file(),
        "{} not found: run `cargo build --workspace` (or `cargo test` at the root) first",
        bin.display()
    );
    bin
}

/// Runs `printloop chaos ARGS` (bounded) and returns its exit code, its one JSON line and its
/// stderr.
fn chaos(args: &[&str], limit: Duration) -> (Option<i32>, Value, String) {
    gateway_beside_printloop();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_printloop"))
        .arg("chaos")
        .args(args)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("printloop chaos starts");
    // Bounded: poll for the exit, kill the run if it overstays.
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "printloop chaos did not finish within {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one line on stdout, got {stdout:?}; stderr:\n{stderr}"
    );
    let report: Value = serde_json::from_str(lines[0])
        .unwrap_or_else(|e| panic!("{e}: {}\nstderr:\n{stderr}", lines[0]));
    (out.status.code(), report, stderr)
}

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a count in {v}"))
}

#[test]
fn a_short_chaos_run_on_rumqttd_passes() {
    let (code, report, stderr) = chaos(
        &[
            "--printers",
            "2",
            "--duration",
            "15",
            "--seed",
            "3",
            "--broker",
            "rumqttd",
        ],
        Duration::from_secs(150),
    );
    assert_eq!(code, Some(0), "report: {report}\nstderr:\n{stderr}");
    assert_eq!(report["violations"], Value::Array(vec![]), "{report}");
    assert_eq!(report["seed"], 3);
    assert_eq!(report["broker"], "rumqttd");
    assert_eq!(report["printers"], 2);
    assert_eq!(report["duration_s"], 15);
    // Faults: at least three, of which the counts by kind add up to the total.
    let total = num(&report, "faults_total");
    assert!(total >= 3, "{report}");
    let by_kind: u64 = report["faults"]
        .as_object()
        .expect("faults by kind")
        .values()
        .map(|v| v.as_u64().expect("count"))
        .sum();
    assert_eq!(by_kind, total, "{report}");
    // Work was done and every job ended (nothing is left queued after settling).
    let jobs = &report["jobs"];
    for key in [
        "submitted",
        "finished",
        "failed",
        "interrupted",
        "cancelled",
        "queued",
    ] {
        num(jobs, key);
    }
    assert!(num(jobs, "submitted") >= 2, "{report}");
    assert!(num(jobs, "finished") >= 1, "{report}");
    assert_eq!(num(jobs, "queued"), 0, "{report}");
    let worst = report["worst_converge_s"].as_f64().expect("a number");
    assert!((0.0..30.0).contains(&worst), "{report}");
    // A passing run cleans up after itself.
    assert!(report.get("data_dir").is_none(), "{report}");
}

#[test]
fn a_forged_ledger_entry_fails_the_run() {
    let (code, report, stderr) = chaos(
        &[
            "--printers",
            "1",
            "--duration",
            "1",
            "--seed",
            "9",
            "--inject-violation",
        ],
        Duration::from_secs(120),
    );
    assert_eq!(code, Some(1), "report: {report}\nstderr:\n{stderr}");
    let violations = report["violations"].as_array().expect("a list");
    assert!(
        violations
            .iter()
            .any(|v| v.as_str().is_some_and(|s| s.contains("chaos-forged"))),
        "{report}"
    );
    assert!(stderr.contains("VIOLATION"), "{stderr}");
    // A failing run keeps its directory and says where.
    let dir = report["data_dir"].as_str().expect("the kept directory");
    assert!(Path::new(dir).join("logs").is_dir(), "{dir}");
    let _ = std::fs::remove_dir_all(dir);
}
