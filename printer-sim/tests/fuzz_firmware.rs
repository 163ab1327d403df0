//! Fuzzing the simulated firmware's host side: whatever a host writes (valid numbered lines of
//! odd G-code with huge, negative and fractional parameters, bad checksums, garbage, endless
//! lines), the board never panics, keeps answering, and its output stays bounded.
//!
//! Cases: `FUZZ_CASES` (or `PROPTEST_CASES`); `PROPTEST_RNG_SEED` replays a run.

use std::time::Duration;

use printer_sim::{Firmware, SimConfig};
use proptest::prelude::*;
use proptest::test_runner::Config;
use protocol::marlin;

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

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("1e308".to_owned()),
        Just("-1e308".to_owned()),
        Just("99999999999999999999".to_owned()),
        Just("-0".to_owned()),
        Just("0".to_owned()),
        Just("0.0000001".to_owned()),
        Just("nan".to_owned()),
        Just("inf".to_owned()),
        Just(String::new()),
        (-1000.0f64..1000.0).prop_map(|f| format!("{f:.3}")),
        any::<i64>().prop_map(|n| n.to_string()),
    ]
}

fn gcode() -> impl Strategy<Value = String> {
    let word = prop_oneof![
        Just("G0"),
        Just("G1"),
        Just("G4"),
        Just("G28"),
        Just("G90"),
        Just("G91"),
        Just("G92"),
        Just("M82"),
        Just("M83"),
        Just("M104"),
        Just("M105"),
        Just("M106"),
        Just("M108"),
        Just("M109"),
        Just("M110"),
        Just("M112"),
        Just("M114"),
        Just("M115"),
        Just("M140"),
        Just("M155"),
        Just("M190"),
        Just("M220"),
        Just("M400"),
        Just("M410"),
        Just("M999"),
        Just("T0"),
        Just("X"),
    ];
    let param = (
        prop_oneof![
            Just('X'),
            Just('Y'),
            Just('Z'),
            Just('E'),
            Just('F'),
            Just('S'),
            Just('P'),
            Just('R'),
            Just('N'),
            Just('T')
        ],
        number(),
    )
        .prop_map(|(c, n)| format!("{c}{n}"));
    (word, proptest::collection::vec(param, 0..4)).prop_map(|(w, ps)| {
        let mut s = w.to_owned();
        for p in ps {
            s.push(' ');
            s.push_str(&p);
        }
        s
    })
}

#[derive(Debug, Clone)]
enum Step {
    /// A well-formed numbered line (the number may be out of sequence).
    Line(u32, String),
    /// Raw bytes.
    Raw(Vec<u8>),
    /// Time passes (ms).
    Wait(u64),
    /// The host closes and opens the port.
    Reopen,
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (prop_oneof![0u32..50, any::<u32>()], gcode()).prop_map(|(n, g)| Step::Line(n, g)),
        2 => prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            gcode().prop_map(|g| format!("{g}\n").into_bytes()),
            gcode().prop_map(|g| format!("N3 {g}*999\n").into_bytes()),
            (90usize..400).prop_map(|n| vec![b'G'; n]),
        ].prop_map(Step::Raw),
        3 => prop_oneof![0u64..20, 100u64..2_000, Just(600_000)].prop_map(Step::Wait),
        1 => Just(Step::Reopen),
    ]
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn random_host_input(
        advanced_ok in any::<bool>(),
        emergency_parser in any::<bool>(),
        steps in proptest::collection::vec(arb_step(), 1..60),
    ) {
        let cfg = SimConfig { advanced_ok, emergency_parser, speed: 1000.0, ..SimConfig::default() };
        let mut fw = Firmware::new(cfg).expect("valid config");
        let mut now = Duration::ZERO;
        fw.host_opened(now);
        let mut pending: Vec<u8> = Vec::new();
        for step in steps {
            match step {
                Step::Line(n, g) => {
                    pending.extend_from_slice(marlin::format_line(n, &g).as_bytes());
                    pending.push(b'\n');
                }
                Step::Raw(bytes) => pending.extend_from_slice(&bytes),
                Step::Wait(ms) => now += Duration::from_millis(ms),
                Step::Reopen => {
                    fw.host_closed(now);
                    fw.host_opened(now);
                    pending.clear();
                }
            }
            let took = fw.receive(now, &pending);
            pending.drain(..took);
            prop_assert!(pending.len() <= 64 * 1024, "the board stopped reading");
            // Let the board run up to `now`, a bounded number of events.
            let mut out = 0usize;
            for _ in 0..10_000 {
                match fw.poll_output(now) {
                    Some(bytes) => out += bytes.len(),
                    None => break,
                }
            }
            prop_assert!(out <= 1024 * 1024, "{out} bytes of output in one step");
            if let Some(d) = fw.next_deadline() {
                prop_assert!(d >= now || d + Duration::from_secs(1) >= now);
            }
        }
    }
}

/// Found by `random_host_input`: `M110 N9223372036854775807` followed by any numbered line
/// overflowed the expected line number (a panic in debug builds). The board now answers with a
/// line-number error, as Marlin's wrapping `long` arithmetic does.
#[test]
fn line_number_at_i64_max_does_not_overflow() {
    let mut fw = Firmware::new(SimConfig::default()).expect("valid config");
    let mut now = Duration::ZERO;
    fw.host_opened(now);
    let mut input = Vec::new();
    for line in [
        marlin::format_line(0, "M110 N9223372036854775807"),
        marlin::format_line(1, "G1 X1"),
        "N9223372036854775807 G1 X2*0".to_owned(),
    ] {
        input.extend_from_slice(line.as_bytes());
        input.push(b'\n');
    }
    let mut out = Vec::new();
    for _ in 0..100 {
        let took = fw.receive(now, &input);
        input.drain(..took);
        now += Duration::from_millis(50);
        while let Some(bytes) = fw.poll_output(now) {
            out.extend_from_slice(&bytes);
        }
    }
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("Resend:"), "{text}");
}
