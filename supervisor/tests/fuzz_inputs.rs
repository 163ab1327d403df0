//! Fuzzing what the supervisor reads from outside besides MQTT payloads (those are fuzzed in
//! `protocol/tests/fuzz_payloads.rs`): its TOML configuration and its redb database file.
//!
//! - A config file, mutated (huge, negative and odd values, unknown keys, broken TOML), gives
//!   settings or a [`ConfigError`] that names the problem, never a panic.
//! - A database file that is garbage, truncated or has flipped bytes gives a store or a
//!   [`StoreError`], never a panic; a store that opens also loads or fails with a typed error.
//!
//! Cases: `FUZZ_CASES` (or `PROPTEST_CASES`); `PROPTEST_RNG_SEED` replays a run.

use std::path::Path;

use clap::Parser;
use proptest::prelude::*;
use proptest::test_runner::Config;
use supervisor::cli::{settings, ConfigError, SupervisorArgs};
use supervisor::store::Store;
use transport::settings::ConfigError as SettingsError;

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

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: SupervisorArgs,
}

/// Resolves settings from `toml` (written to a file in `dir`) as `printloop supervisor` would.
fn resolve(dir: &Path, toml: &str, external: bool) -> Result<(), ConfigError> {
    let path = dir.join("supervisor.toml");
    std::fs::write(&path, toml).expect("write config");
    let mut argv = vec![
        "supervisor".to_owned(),
        "--config".into(),
        path.display().to_string(),
    ];
    if external {
        argv.extend(["--broker".into(), "mqtt://127.0.0.1:1".into()]);
    } else {
        // The embedded broker's file: missing, so a typed error once the rest is valid.
        argv.extend([
            "--embedded".into(),
            dir.join("none.toml").display().to_string(),
        ]);
    }
    let cli = Cli::try_parse_from(argv).expect("flags parse");
    settings(&cli.args).map(drop)
}

const EXAMPLE: &str = r#"data_dir = "/var/lib/printloop"
topic_root = "printloop/v1"

[broker]
url = "mqtt://127.0.0.1:1883"
username = "supervisor"

[metrics]
listen = "127.0.0.1:9464"

[timing]
step_timeout_s = 300
command_retry_s = 15
command_ttl_s = 120
stale_heartbeats = 3
breaker_threshold = 3
"#;

fn arb_toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("9223372036854775807".to_owned()),
        Just("-9223372036854775808".to_owned()),
        Just("18446744073709551615".to_owned()),
        Just("4294967296".to_owned()),
        Just("-1".to_owned()),
        Just("0".to_owned()),
        Just("1.5e300".to_owned()),
        Just("nan".to_owned()),
        Just("inf".to_owned()),
        Just("true".to_owned()),
        Just("[]".to_owned()),
        Just("{}".to_owned()),
        Just("\"\"".to_owned()),
        Just("\"off\"".to_owned()),
        Just("\"$SYS/x\"".to_owned()),
        Just("\"a//b\"".to_owned()),
        Just("\"[::1]:0\"".to_owned()),
        Just("\"mqtt://\"".to_owned()),
        Just("1979-05-27T07:32:00Z".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        "\"[ -~]{0,40}\"",
    ]
}

/// The example with one value replaced, a key added, or bytes edited.
fn arb_config() -> impl Strategy<Value = String> {
    let lines: Vec<String> = EXAMPLE.lines().map(str::to_owned).collect();
    let n = lines.len();
    (
        proptest::collection::vec((0..n, arb_toml_value()), 1..4),
        any::<Option<(usize, String)>>(),
        any::<Option<usize>>(),
    )
        .prop_map(move |(edits, insert, cut)| {
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
            if let Some(c) = cut {
                let mut c = c % (text.len() + 1);
                while !text.is_char_boundary(c) {
                    c -= 1;
                }
                text.truncate(c);
            }
            text
        })
}

/// A real database file, made once.
fn real_store() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sv.redb");
        let store = Store::open(&path).expect("open a new store");
        store.load().expect("load a new store");
        drop(store);
        std::fs::read(&path).expect("read the store")
    })
}

fn open_and_load(dir: &Path, bytes: &[u8]) {
    let path = dir.join("sv.redb");
    std::fs::write(&path, bytes).expect("write");
    if let Ok(store) = Store::open(&path) {
        let _ = store.load();
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn config_files(toml in arb_config(), external in any::<bool>()) {
        let dir = tempfile::tempdir().expect("tempdir");
        match resolve(dir.path(), &toml, external) {
            Ok(()) => {}
            Err(ConfigError::Settings(SettingsError::Invalid { key, message })) => {
                prop_assert!(!key.is_empty() && !message.is_empty());
            }
            Err(ConfigError::Settings(SettingsError::Parse { message, .. })) => {
                prop_assert!(!message.is_empty())
            }
            Err(ConfigError::Broker(_)) => prop_assert!(!external),
            Err(e @ ConfigError::Settings(SettingsError::Read { .. })) => {
                return Err(TestCaseError::fail(format!("{e}")))
            }
        }
    }

    /// A damaged database file: flipped bytes, truncated, or both.
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
}

/// Timing values that overflow when turned into milliseconds are refused, naming the key.
#[test]
fn huge_timing_values_name_their_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    for key in ["step_timeout_s", "command_retry_s", "command_ttl_s"] {
        let toml = format!("[timing]\n{key} = 9223372036854775807\n");
        match resolve(dir.path(), &toml, true) {
            Err(ConfigError::Settings(SettingsError::Invalid { key: k, .. })) => {
                assert_eq!(k, format!("timing.{key}"))
            }
            other => panic!("{key}: {other:?}"),
        }
    }
    // The longest accepted is a year (`transport::settings::MAX_SECONDS`); a second more is not.
    let max = transport::settings::MAX_SECONDS;
    let ok = format!("[timing]\nstep_timeout_s = {max}\n");
    assert!(resolve(dir.path(), &ok, true).is_ok());
    let over = format!("[timing]\nstep_timeout_s = {}\n", max + 1);
    assert!(resolve(dir.path(), &over, true).is_err());
}

/// A store file cut anywhere is refused or opens; it never panics (every 512th length).
#[test]
fn truncated_store_files() {
    let real = real_store();
    let dir = tempfile::tempdir().expect("tempdir");
    for len in (0..real.len()).step_by(512) {
        open_and_load(dir.path(), &real[..len]);
    }
}
