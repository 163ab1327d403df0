//! Fuzzing what the gateway reads from outside besides MQTT payloads and serial lines: its TOML
//! configuration and flags, the broker URL, its redb state file, and G-code lines.
//!
//! Cases: `FUZZ_CASES` (or `PROPTEST_CASES`); `PROPTEST_RNG_SEED` replays a run.

use std::path::Path;
use std::process::Command;

use gateway::config::{broker_url, FileConfig};
use gateway::link::{check_command, gcode_lines, SubmitError};
use gateway::store::{Flags, Mutation, Store};
use proptest::prelude::*;
use proptest::test_runner::Config;

fn config(default: u32) -> Config {
    let env = |k: &str| std::env::var(k).ok()?.parse::<u32>().ok();
    // FUZZ_CASES fixes the count; FUZZ_SCALE multiplies this test's default.
    let cases = env("FUZZ_CASES")
        .or_else(|| env("PROPTEST_CASES"))
        .unwrap_or_else(|| default.saturating_mul(env("FUZZ_SCALE").unwrap_or(1)));
    Config {
        cases,
        max_shrink_time: 20_000,
        ..Config::default()
    }
}

const EXAMPLE: &str = r#"id = "p0"
name = "MK3S left"
model = "Prusa MK3S"
tags = ["pla", "0.4mm"]
data_dir = "/var/lib/printloop"
topic_root = "printloop/v1"

[broker]
url = "mqtt://127.0.0.1:1883"
username = "p0"
keepalive_s = 15

[serial]
port = "/dev/ttyUSB0"
baud = 250000
mode = "auto"

[timing]
heartbeat_s = 10
state_min_interval_ms = 500
chunk_timeout_s = 30
"#;

fn arb_config() -> impl Strategy<Value = String> {
    let lines: Vec<String> = EXAMPLE.lines().map(str::to_owned).collect();
    let n = lines.len();
    let value = prop_oneof![
        Just("9223372036854775807".to_owned()),
        Just("-1".to_owned()),
        Just("4294967296".to_owned()),
        Just("1e400".to_owned()),
        Just("nan".to_owned()),
        Just("[1, \"a\"]".to_owned()),
        Just("{ a = 1 }".to_owned()),
        Just("\"\\u0000\"".to_owned()),
        "\"[ -~]{0,30}\"",
        any::<i64>().prop_map(|n| n.to_string()),
    ];
    (
        proptest::collection::vec((0..n, value), 1..4),
        any::<Option<(usize, String)>>(),
    )
        .prop_map(move |(edits, insert)| {
            let mut lines = lines.clone();
            for (i, v) in edits {
                if let Some((k, _)) = lines[i].split_once(" = ") {
                    lines[i] = format!("{k} = {v}");
                }
            }
            let mut text = lines.join("\n");
            if let Some((at, s)) = insert {
                let mut at = at % (text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text.insert_str(at, &s);
            }
            text
        })
}

fn real_store() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway.redb");
        let store = Store::open(&path).expect("open a new store");
        store
            .apply(&[
                Mutation::SetEpoch(7),
                Mutation::SetFlags(Flags::default()),
                Mutation::PushOutbox(1, br#"{"v":1}"#.to_vec()),
                Mutation::PushOutbox(2, vec![0xff; 300]),
            ])
            .expect("apply");
        store.load().expect("load");
        drop(store);
        std::fs::read(&path).expect("read the store")
    })
}

fn open_and_load(dir: &Path, bytes: &[u8]) {
    let path = dir.join("gateway.redb");
    std::fs::write(&path, bytes).expect("write");
    if let Ok(store) = Store::open(&path) {
        let _ = store.load();
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn config_text(text in arb_config()) {
        if let Err(message) = FileConfig::parse(&text) {
            prop_assert!(!message.is_empty());
        }
    }

    #[test]
    fn broker_urls(url in prop_oneof![
        "(mqtts?|tcp|ws)://[a-z0-9.:@\\[\\]/-]{0,30}",
        any::<String>(),
        Just("mqtt://[::1]:99999".to_owned()),
        Just("mqtt://h:".to_owned()),
    ]) {
        if let Err(e) = broker_url(&url) {
            prop_assert!(e.to_string().contains("broker.url"));
        }
    }

    #[test]
    fn damaged_store_files(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..6),
        cut in any::<Option<prop::sample::Index>>(),
    ) {
        let mut bytes = real_store().to_vec();
        for (i, x) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= x;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len() + 1));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        open_and_load(dir.path(), &bytes);
    }

    #[test]
    fn garbage_store_files(bytes in proptest::collection::vec(any::<u8>(), 0..8192)) {
        let dir = tempfile::tempdir().expect("tempdir");
        open_and_load(dir.path(), &bytes);
    }

    /// G-code text: every line the streamer would submit is comment-free and non-empty, and
    /// the link either takes it or refuses it with a typed error.
    #[test]
    fn gcode_text(text in prop_oneof![
        "([GMT][0-9]{1,3}( [XYZEFS]-?[0-9.]{1,8}){0,4}( ?;[ -~]{0,20})?\r?\n){0,20}",
        any::<String>(),
        (80usize..400).prop_map(|n| format!("G1 X{}\n", "1".repeat(n))),
    ]) {
        for line in gcode_lines(&text) {
            prop_assert!(!line.is_empty() && !line.contains(';') && line.trim() == line);
            match check_command(line) {
                Ok(cmd) => prop_assert_eq!(cmd, line),
                Err(SubmitError::TooLong(n)) => prop_assert_eq!(n, line.len()),
                Err(SubmitError::LineBreak) => prop_assert!(line.contains('\r')),
                Err(e @ SubmitError::Empty) => return Err(TestCaseError::fail(format!("{e} for {line:?}"))),
            }
        }
    }
}

#[test]
fn truncated_store_files() {
    let real = real_store();
    let dir = tempfile::tempdir().expect("tempdir");
    for len in (0..real.len()).step_by(512) {
        open_and_load(dir.path(), &real[..len]);
    }
}

/// Values that overflow when turned into milliseconds (and a time scale so small the scaled
/// timeouts overflow a `Duration`) are refused by the binary with an error naming the key,
/// not a panic (exit code 101).
#[test]
fn huge_values_are_refused_by_the_binary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, &[&str], &str); 6] = [
        (
            "[timing]\nheartbeat_s = 9223372036854775807\n",
            &[],
            "timing.heartbeat_s",
        ),
        // Zero is refused too, the supervisor's way, never raised to 1.
        ("[timing]\nheartbeat_s = 0\n", &[], "timing.heartbeat_s"),
        (
            "[timing]\nchunk_timeout_s = 0\n",
            &[],
            "timing.chunk_timeout_s",
        ),
        ("[broker]\nkeepalive_s = 0\n", &[], "broker.keepalive_s"),
        (
            "[timing]\nchunk_timeout_s = 9223372036854775807\n",
            &[],
            "timing.chunk_timeout_s",
        ),
        ("", &["--time-scale", "1e-300"], "time-scale"),
    ];
    for (extra, flags, key) in cases {
        let path = dir.path().join("gateway.toml");
        let data = dir.path().join("data");
        std::fs::write(
            &path,
            format!(
                "id = \"p0\"\ndata_dir = {:?}\n[serial]\nport = \"/nonexistent/tty\"\n{extra}",
                data.display().to_string()
            ),
        )
        .expect("write config");
        let out = Command::new(env!("CARGO_BIN_EXE_printloop-gateway"))
            .arg("--config")
            .arg(&path)
            .args(flags)
            .output()
            .expect("run printloop-gateway");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // 78 = EX_CONFIG: the packaged unit does not restart a gateway with a bad config.
        assert_eq!(out.status.code(), Some(78), "{key}: {stderr}");
        assert!(stderr.contains(key), "{key}: {stderr}");
        assert!(!stderr.contains("panicked"), "{key}: {stderr}");
    }
}
