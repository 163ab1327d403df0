//! Fuzzing the Marlin host driver with what a printer (or a noisy cable) can send: random byte
//! streams made of real firmware lines, fragments, garbage, invalid UTF-8 and endless lines,
//! cut at random points, interleaved with timers and the gateway's own calls.
//!
//! After every step: no panic, the line buffer and every queue stay bounded, every line written
//! to the printer is a valid numbered line within Marlin's `MAX_CMD_SIZE`, and the
//! acknowledgements are consistent (each print line acked at most once, in order).
//!
//! Cases: `FUZZ_CASES` (or `PROPTEST_CASES`), default small for `cargo test`;
//! `PROPTEST_RNG_SEED` replays a run. `scripts/fuzz.sh` runs a longer one.

use std::time::{Duration, Instant};

use gateway::link::{LineFramer, Link, LinkConfig, LinkEvent, StreamMode, OVERLONG};
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

/// What the serial task uses (`ShellConfig::max_line`).
const MAX_LINE: usize = 512;
/// Marlin's `MAX_CMD_SIZE`: a numbered line and its `\n` must fit.
const MAX_CMD_SIZE: usize = 96;
/// Most distinct capabilities a firmware reports (Marlin 2.1 has about 30).
const MAX_CAPABILITIES: usize = 64;

fn firmware_line() -> impl Strategy<Value = Vec<u8>> {
    let n = prop_oneof![0u32..40, Just(u32::MAX), any::<u32>()];
    let text = prop_oneof![
        Just("ok".to_owned()),
        (n.clone(), 0u32..20, 0u32..20).prop_map(|(n, p, b)| format!("ok N{n} P{p} B{b}")),
        Just("ok T:210.3 /215.0 B:59.8 /60.0 @:127 B@:0".to_owned()),
        n.clone().prop_map(|n| format!("Resend: {n}")),
        n.clone().prop_map(|n| format!("rs N{n}")),
        n.clone()
            .prop_map(|n| format!("Error:checksum mismatch, Last Line: {n}")),
        n.prop_map(|n| format!("Error:Line Number is not Last Line Number+1, Last Line: {n}")),
        Just("Error:Printer halted. kill() called!".to_owned()),
        Just("Error:Thermal Runaway, system stopped! Heater_ID: 0".to_owned()),
        Just("start".to_owned()),
        Just("echo:busy: processing".to_owned()),
        Just("echo:Unknown command: \"M999\"".to_owned()),
        Just("Cap:AUTOREPORT_TEMP:1".to_owned()),
        "[A-Z_]{1,20}".prop_map(|c| format!("Cap:{c}:1")),
        Just(
            "FIRMWARE_NAME:Marlin 2.1.2.1 (sim) SOURCE_CODE_URL:github.com PROTOCOL_VERSION:1.0 UUID:x"
                .to_owned()
        ),
        Just(" T:25.00 /0.00 B:60.00 /60.00 @:0 B@:0".to_owned()),
        Just("//action:pause".to_owned()),
        "[ -~]{0,60}",
        any::<String>(),
    ];
    let ending = prop_oneof![
        4 => Just(&b"\n"[..]),
        1 => Just(&b"\r\n"[..]),
        1 => Just(&b""[..]),
    ];
    prop_oneof![
        8 => (text, ending).prop_map(|(t, e)| {
            let mut v = t.into_bytes();
            v.extend_from_slice(e);
            v
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..40),
        // An endless line (no `\n` for longer than the buffer).
        1 => (MAX_LINE - 2..MAX_LINE * 3).prop_map(|n| vec![b'T'; n]),
    ]
}

#[derive(Debug, Clone)]
enum Step {
    /// Bytes from the printer, in one read.
    Read(Vec<u8>),
    /// Time passes (ms), then the timer fires if due.
    Wait(u64),
    Submit(String),
    SendNow(String),
    Pause,
    Resume,
    Clear,
    Stop,
    Close,
    Open,
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        10 => proptest::collection::vec(firmware_line(), 1..4).prop_map(|v| Step::Read(v.concat())),
        3 => prop_oneof![0u64..50, 900u64..1200, 9_000u64..12_000, Just(1_800_000)].prop_map(Step::Wait),
        4 => prop_oneof![
            Just("G1 X10 Y10 E0.5".to_owned()),
            Just("M109 S215".to_owned()),
            Just("G28".to_owned()),
            Just("M105".to_owned()),
            "[ -~]{0,100}",
        ].prop_map(Step::Submit),
        1 => prop_oneof![Just("M105".to_owned()), Just("M117 hi".to_owned()), "[ -~]{0,20}"].prop_map(Step::SendNow),
        1 => Just(Step::Pause),
        1 => Just(Step::Resume),
        1 => Just(Step::Clear),
        1 => Just(Step::Stop),
        1 => Just(Step::Close),
        1 => Just(Step::Open),
    ]
}

fn link_config() -> impl Strategy<Value = LinkConfig> {
    (
        prop_oneof![Just(StreamMode::Auto), Just(StreamMode::PingPong)],
        prop_oneof![Just(0usize), 1usize..8, Just(16)],
        prop_oneof![Just(0usize), 8usize..64],
        0u32..3,
        prop_oneof![Just(Duration::ZERO), Just(Duration::from_secs(2))],
    )
        .prop_map(
            |(mode, max_in_flight, history, probe_retries, temps)| LinkConfig {
                mode,
                max_in_flight,
                history,
                probe_retries,
                temperature_interval: temps,
                ..LinkConfig::default()
            },
        )
}

struct Harness {
    link: Link,
    framer: LineFramer,
    now: Instant,
    submitted: u64,
    last_acked: u64,
}

impl Harness {
    fn drain(&mut self) -> Result<(), TestCaseError> {
        let mut writes = 0;
        while let Some(bytes) = self.link.poll_transmit() {
            writes += 1;
            prop_assert!(writes <= 10_000, "poll_transmit does not run dry");
            prop_assert!(bytes.ends_with(b"\n"), "unterminated write {bytes:?}");
            prop_assert!(
                bytes.len() <= MAX_CMD_SIZE,
                "write longer than MAX_CMD_SIZE: {bytes:?}"
            );
            if bytes != b"M112\n" {
                let text = std::str::from_utf8(&bytes).expect("the link writes ASCII");
                let line = marlin::parse_host_line(text).expect("a numbered line");
                prop_assert!(
                    line.number.is_some() && line.checksum_ok == Some(true),
                    "{text:?}"
                );
            }
        }
        let mut events = 0;
        while let Some(ev) = self.link.poll_event() {
            events += 1;
            prop_assert!(events <= 10_000, "poll_event does not run dry");
            let text_len = match &ev {
                LinkEvent::Acked { seq } => {
                    prop_assert!(
                        *seq > self.last_acked && *seq <= self.submitted,
                        "ack {seq} after {} of {}",
                        self.last_acked,
                        self.submitted
                    );
                    self.last_acked = *seq;
                    0
                }
                LinkEvent::Message(t) | LinkEvent::Action(t) => t.len(),
                LinkEvent::FirmwareError { message }
                | LinkEvent::Fatal { message }
                | LinkEvent::LinkError { message } => message.len(),
                LinkEvent::Garbage { line } => line.len(),
                _ => 0,
            };
            prop_assert!(text_len <= MAX_LINE + 100, "event text of {text_len} bytes");
        }
        Ok(())
    }

    fn check_bounds(&self) -> Result<(), TestCaseError> {
        let cfg = self.link.config();
        prop_assert!(self.framer.buffered() <= MAX_LINE);
        // The window, plus handshake lines and probes that are written whatever the window.
        let bound = cfg.max_in_flight.max(1) + cfg.probe_retries as usize + 4;
        prop_assert!(
            self.link.in_flight() <= bound,
            "{} lines in flight (bound {bound})",
            self.link.in_flight()
        );
        prop_assert!(self.link.acked_count() <= self.submitted);
        let fw = self.link.firmware();
        prop_assert!(
            fw.capabilities.len() <= MAX_CAPABILITIES,
            "{} capabilities kept",
            fw.capabilities.len()
        );
        let field_bytes: usize = fw.fields.iter().map(|(k, v)| k.len() + v.len()).sum();
        prop_assert!(
            field_bytes <= MAX_LINE,
            "{field_bytes} bytes of firmware info kept"
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn random_printer_output(cfg in link_config(), steps in proptest::collection::vec(arb_step(), 1..120)) {
        let start = Instant::now();
        let mut h = Harness {
            link: Link::new(cfg),
            framer: LineFramer::new(MAX_LINE),
            now: start,
            submitted: 0,
            last_acked: 0,
        };
        h.link.on_open(h.now);
        h.drain()?;
        for step in steps {
            match step {
                Step::Read(bytes) => {
                    let (link, now) = (&mut h.link, h.now);
                    h.framer.push(&bytes, |line| link.on_line(now, line));
                }
                Step::Wait(ms) => {
                    h.now += Duration::from_millis(ms);
                    if h.link.next_deadline().is_some_and(|d| d <= h.now) {
                        h.link.on_timeout(h.now);
                    }
                }
                Step::Submit(line) => {
                    if h.link.submit(&line).is_ok() {
                        h.submitted += 1;
                    }
                }
                Step::SendNow(cmd) => {
                    let _ = h.link.send_now(&cmd);
                }
                Step::Pause => h.link.pause_stream(),
                Step::Resume => h.link.resume_stream(),
                Step::Clear => {
                    h.link.clear();
                }
                Step::Stop => h.link.emergency_stop(),
                Step::Close => {
                    h.link.on_close();
                    h.framer.clear();
                }
                Step::Open => h.link.on_open(h.now),
            }
            h.drain()?;
            h.check_bounds()?;
        }
    }

    /// The framer alone: whatever the bytes and however they are cut into reads, the lines are
    /// those of the whole stream, and no buffer outgrows the limit.
    #[test]
    fn framing_does_not_depend_on_read_boundaries(
        bytes in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'o'), Just(b'k'), any::<u8>()], 0..3000),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        max in prop_oneof![Just(1usize), 2usize..40, Just(MAX_LINE)],
    ) {
        let whole = lines_of(&bytes, &[], max)?;
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        at.sort_unstable();
        prop_assert_eq!(lines_of(&bytes, &at, max)?, whole);
    }
}

fn lines_of(bytes: &[u8], cuts: &[usize], max: usize) -> Result<Vec<String>, TestCaseError> {
    let mut f = LineFramer::new(max);
    let mut out = Vec::new();
    let mut from = 0;
    for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
        f.push(&bytes[from..c], |l| out.push(l.to_owned()));
        prop_assert!(f.buffered() <= max);
        from = c;
    }
    for l in &out {
        prop_assert!(
            l == OVERLONG || l.len() <= max * 3,
            "line of {} bytes",
            l.len()
        );
    }
    Ok(out)
}

/// A printer that prints forever without a line break costs at most the line limit, and the
/// next real line after the break is handled normally.
#[test]
fn an_endless_line_is_bounded_and_reported_once() {
    let mut link = Link::new(LinkConfig::default());
    let mut framer = LineFramer::new(MAX_LINE);
    let now = Instant::now();
    link.on_open(now);
    let block = vec![b'x'; 4096];
    for _ in 0..2_000 {
        // 8 MiB without a newline.
        framer.push(&block, |l| link.on_line(now, l));
        assert!(framer.buffered() <= MAX_LINE);
    }
    framer.push(b"\nstart\n", |l| link.on_line(now, l));
    let events: Vec<LinkEvent> = std::iter::from_fn(|| link.poll_event()).collect();
    let garbage = events
        .iter()
        .filter(|e| matches!(e, LinkEvent::Garbage { .. }))
        .count();
    assert_eq!(garbage, 1, "{events:?}");
    assert_eq!(link.stats().garbage_lines, 1);
    // `start` was understood: the handshake began.
    let first = link.poll_transmit().expect("handshake line");
    assert!(first.starts_with(b"N0 M110 N0*"), "{first:?}");
}

/// A printer that reports a new capability on every line (garbled `Cap:` lines, a hostile
/// device) does not grow the gateway's memory without bound.
#[test]
fn capabilities_are_bounded() {
    let mut link = Link::new(LinkConfig::default());
    let now = Instant::now();
    link.on_open(now);
    for i in 0..10_000 {
        link.on_line(now, &format!("Cap:X{i}:1"));
    }
    link.on_line(now, "Cap:AUTOREPORT_TEMP:1");
    assert!(link.firmware().capabilities.len() <= MAX_CAPABILITIES);
}
