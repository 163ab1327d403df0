//! Script-driven tests of the driver with virtual time.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use protocol::marlin;

use super::*;

/// A link plus a virtual clock and what it wrote / reported.
struct H {
    link: Link,
    t0: Instant,
    now: Duration,
}

const M115_NO_AUTOREPORT: &[&str] = &[
    "FIRMWARE_NAME:Marlin 2.0.9 (Github) SOURCE_CODE_URL:github.com/MarlinFirmware/Marlin PROTOCOL_VERSION:1.0 MACHINE_TYPE:Ender-3 EXTRUDER_COUNT:1 UUID:cede2a2f-41a2-4748-9b12-c55c62f367ff",
    "Cap:SERIAL_XON_XOFF:0",
    "Cap:EEPROM:1",
    "Cap:AUTOREPORT_TEMP:0",
    "Cap:HOST_ACTION_COMMANDS:1",
];

impl H {
    fn new(cfg: LinkConfig) -> Self {
        Self {
            link: Link::new(cfg),
            t0: Instant::now(),
            now: Duration::ZERO,
        }
    }

    fn at(&self) -> Instant {
        self.t0 + self.now
    }

    fn open(&mut self) {
        let at = self.at();
        self.link.on_open(at);
    }

    fn recv(&mut self, line: &str) {
        let at = self.at();
        self.link.on_line(at, line);
    }

    /// Lets `d` pass, firing the timer whenever it is due.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(deadline) = self.link.next_deadline() {
            let due = deadline.saturating_duration_since(self.t0);
            if due > end {
                break;
            }
            self.now = self.now.max(due);
            let at = self.at();
            self.link.on_timeout(at);
        }
        self.now = end;
    }

    /// Lines written since the last call, without `\n`.
    fn sent(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(bytes) = self.link.poll_transmit() {
            out.push(String::from_utf8_lossy(&bytes).trim_end().to_owned());
        }
        out
    }

    /// Commands written since the last call (numbers and checksums checked and removed).
    fn sent_cmds(&mut self) -> Vec<(u32, String)> {
        self.sent()
            .into_iter()
            .map(|l| {
                let h = marlin::parse_host_line(&l).expect("well-formed line");
                assert_eq!(h.checksum_ok, Some(true), "{l}");
                (h.number.expect("numbered"), h.command)
            })
            .collect()
    }

    fn events(&mut self) -> Vec<LinkEvent> {
        std::iter::from_fn(|| self.link.poll_event()).collect()
    }

    /// Opens and answers the handshake like a board with or without ADVANCED_OK and
    /// auto-report.
    fn handshake(&mut self, advanced: bool, autoreport: bool) -> FirmwareInfo {
        self.open();
        self.recv("start");
        self.recv("echo:Marlin 2.1.2.1");
        assert_eq!(self.sent_cmds(), vec![(0, "M110 N0".to_owned())]);
        if advanced {
            self.recv("ok N0 P15 B3");
        } else {
            self.recv("ok");
        }
        assert_eq!(self.sent_cmds(), vec![(1, "M115".to_owned())]);
        for l in M115_NO_AUTOREPORT {
            if autoreport && l.starts_with("Cap:AUTOREPORT_TEMP") {
                self.recv("Cap:AUTOREPORT_TEMP:1");
            } else {
                self.recv(l);
            }
        }
        if advanced {
            self.recv("ok N1 P15 B3");
        } else {
            self.recv("ok");
        }
        if autoreport {
            assert_eq!(self.sent_cmds(), vec![(2, "M155 S2".to_owned())]);
            self.ok(2);
        }
        let ready: Vec<_> = self
            .events()
            .into_iter()
            .filter_map(|e| match e {
                LinkEvent::Ready { firmware } => Some(firmware),
                _ => None,
            })
            .collect();
        assert_eq!(ready.len(), 1, "one Ready");
        ready.into_iter().next().expect("ready")
    }

    /// `ok` as the firmware would print it for line `n`.
    fn ok(&mut self, n: u32) {
        if self.link.firmware().advanced_ok {
            self.recv(&format!("ok N{n} P15 B3"));
        } else {
            self.recv("ok");
        }
    }

    fn acked(&mut self) -> Vec<u64> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                LinkEvent::Acked { seq } => Some(seq),
                _ => None,
            })
            .collect()
    }

    fn submit_moves(&mut self, n: usize) {
        for i in 0..n {
            self.link
                .submit(&format!("G1 X{i} Y{i}"))
                .expect("valid line");
        }
    }
}

fn cfg() -> LinkConfig {
    LinkConfig {
        temperature_interval: Duration::ZERO,
        ..LinkConfig::default()
    }
}

#[test]
fn gcode_lines_strip_comments_and_blanks() {
    let text = "; header\nG28 ; home\n\n  G1 X5 \n;LAYER_CHANGE\nM104 S200\n";
    assert_eq!(
        gcode_lines(text).collect::<Vec<_>>(),
        vec!["G28", "G1 X5", "M104 S200"]
    );
    let mut link = Link::new(cfg());
    assert_eq!(link.submit("  ; only a comment"), Err(SubmitError::Empty));
    assert_eq!(link.submit("G1 X1\nG1 X2"), Err(SubmitError::LineBreak));
    assert!(matches!(
        link.submit(&"G1 X1 ".repeat(30)),
        Err(SubmitError::TooLong(_))
    ));
    assert_eq!(link.submit("G1 X1 ; move"), Ok(1));
    assert_eq!(link.submit("G1 X2"), Ok(2));
    assert_eq!(link.queued(), 2);
}

#[test]
fn m115_is_parsed_into_firmware_info() {
    let mut h = H::new(cfg());
    let fw = h.handshake(false, false);
    assert_eq!(fw.name(), Some("Marlin 2.0.9 (Github)"));
    assert_eq!(fw.get("MACHINE_TYPE"), Some("Ender-3"));
    assert_eq!(fw.get("UUID"), Some("cede2a2f-41a2-4748-9b12-c55c62f367ff"));
    assert!(fw.has("EEPROM"));
    assert!(fw.has("HOST_ACTION_COMMANDS"));
    assert!(!fw.has("AUTOREPORT_TEMP"));
    assert!(!fw.has("NO_SUCH_CAP"));
    assert_eq!(fw.capabilities.get("SERIAL_XON_XOFF"), Some(&false));
    assert!(!fw.advanced_ok);
}

#[test]
fn no_banner_handshakes_after_boot_timeout() {
    let mut h = H::new(cfg());
    h.open();
    h.advance(Duration::from_millis(1999));
    assert!(h.sent().is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(h.sent_cmds(), vec![(0, "M110 N0".to_owned())]);
}

#[test]
fn autoreport_uses_m155_else_m105_polling() {
    let mut h = H::new(LinkConfig::default());
    h.handshake(false, true);
    h.advance(Duration::from_secs(10));
    assert!(h.sent().is_empty(), "no polling with auto-report");

    let mut h = H::new(LinkConfig::default());
    h.handshake(false, false);
    assert!(h.sent().is_empty());
    h.advance(Duration::from_secs(2));
    assert_eq!(h.sent_cmds(), vec![(2, "M105".to_owned())]);
    // A second poll is not stacked while the first is unanswered.
    h.advance(Duration::from_secs(2));
    assert!(h.sent().is_empty());
    h.recv("ok T:20.00 /0.00 B:21.00 /0.00 @:0 B@:0");
    let temps: Vec<_> = h
        .events()
        .into_iter()
        .filter(|e| matches!(e, LinkEvent::Temperatures(_)))
        .collect();
    assert_eq!(temps.len(), 1);
    h.advance(Duration::from_secs(2));
    assert_eq!(h.sent_cmds(), vec![(3, "M105".to_owned())]);
}

#[test]
fn pingpong_keeps_one_line_in_flight() {
    let mut h = H::new(cfg());
    h.handshake(false, false);
    h.submit_moves(5);
    for i in 0..5u32 {
        let sent = h.sent_cmds();
        assert_eq!(sent, vec![(2 + i, format!("G1 X{i} Y{i}"))]);
        assert_eq!(h.link.in_flight(), 1);
        h.recv("ok");
        assert_eq!(h.acked(), vec![u64::from(i) + 1]);
    }
    assert_eq!(h.link.acked_count(), 5);
    assert_eq!(h.link.in_flight(), 0);
}

#[test]
fn pingpong_mode_ignores_advanced_ok_for_the_window() {
    let mut h = H::new(LinkConfig {
        mode: StreamMode::PingPong,
        ..cfg()
    });
    h.handshake(true, false);
    h.submit_moves(4);
    assert_eq!(h.sent_cmds().len(), 1);
    h.recv("ok N2 P15 B3");
    assert_eq!(h.sent_cmds().len(), 1);
}

#[test]
fn sendahead_respects_buffer_slots_and_rx_bytes() {
    let mut h = H::new(cfg());
    h.handshake(true, false);
    // B3 on the M115 ok ⇒ 4 slots.
    h.submit_moves(20);
    let sent = h.sent_cmds();
    assert_eq!(sent.len(), 4, "{sent:?}");
    assert_eq!(h.link.in_flight(), 4);
    h.recv("ok N2 P15 B3");
    assert_eq!(h.sent_cmds().len(), 1);
    // A cumulative ok frees several slots at once.
    h.recv("ok N5 P15 B3");
    assert_eq!(h.sent_cmds().len(), 3);

    // Long lines: the RX byte budget binds before the slots do.
    let mut h = H::new(LinkConfig {
        rx_buffer: 128,
        ..cfg()
    });
    h.handshake(true, false);
    h.recv("ok N1 P15 B7"); // learns 8 slots (a stale ok for line 1 acks nothing new)
    for i in 0..10 {
        h.link
            .submit(&format!("G1 X{i}.12345 Y{i}.12345 Z0.3 E{i}.12345 F1800"))
            .expect("valid");
    }
    let sent = h.sent();
    let bytes: usize = sent.iter().map(|l| l.len() + 1).sum();
    assert!(bytes <= 128, "{bytes} bytes in flight");
    assert!(sent.len() < 8, "{} lines", sent.len());
    assert!(sent.len() >= 2);
}

#[test]
fn resend_storm_in_pingpong_resends_exactly() {
    let mut h = H::new(cfg());
    h.handshake(false, false);
    h.submit_moves(3);
    assert_eq!(h.sent_cmds(), vec![(2, "G1 X0 Y0".to_owned())]);
    // The same line fails five times in a row.
    for _ in 0..5 {
        h.recv("Error:checksum mismatch, Last Line: 1");
        h.recv("Resend: 2");
        h.recv("ok");
        assert_eq!(h.sent_cmds(), vec![(2, "G1 X0 Y0".to_owned())]);
        assert!(
            h.acked().is_empty(),
            "the ok after a resend acknowledges nothing"
        );
    }
    h.recv("ok");
    assert_eq!(h.acked(), vec![1]);
    assert_eq!(h.sent_cmds(), vec![(3, "G1 X1 Y1".to_owned())]);
    // `rs` form, and a Resend: whose Error line was garbled away.
    h.recv("rs 3");
    h.recv("ok");
    assert_eq!(h.sent_cmds(), vec![(3, "G1 X1 Y1".to_owned())]);
    h.recv("ok");
    assert_eq!(h.acked(), vec![2]);
    assert_eq!(h.link.stats().resend_requests, 6);
}

#[test]
fn sendahead_resend_rewinds_and_ignores_stale_requests() {
    let mut h = H::new(cfg());
    h.handshake(true, false);
    h.submit_moves(10);
    let first: Vec<u32> = h.sent_cmds().into_iter().map(|(n, _)| n).collect();
    assert_eq!(first, vec![2, 3, 4, 5]);
    h.recv("ok N2 P15 B3");
    assert_eq!(h.sent_cmds().len(), 1); // line 6
                                        // Line 3 arrived corrupted; 4, 5 and 6 were already on the wire.
    h.recv("Error:checksum mismatch, Last Line: 2");
    h.recv("Resend: 3");
    h.recv("ok");
    assert_eq!(
        h.sent_cmds(),
        vec![(3, "G1 X1 Y1".to_owned())],
        "one line at a time"
    );
    // The lines already on the wire provoke the same request; they are not re-sent again.
    for _ in 0..3 {
        h.recv("Error:Line Number is not Last Line Number+1, Last Line: 2");
        h.recv("Resend: 3");
        h.recv("ok");
        assert!(h.sent().is_empty());
    }
    h.recv("ok N3 P15 B3");
    assert_eq!(h.acked(), vec![1, 2]);
    let again: Vec<u32> = h.sent_cmds().into_iter().map(|(n, _)| n).collect();
    assert_eq!(again, vec![4, 5, 6, 7], "send-ahead again after recovery");
    assert_eq!(h.link.stats().stale_resend_requests, 3);
}

#[test]
fn resend_beyond_history_is_a_link_error() {
    let mut h = H::new(LinkConfig {
        history: 8,
        ..cfg()
    });
    h.handshake(false, false);
    h.submit_moves(20);
    for _ in 0..20 {
        h.sent();
        h.recv("ok");
    }
    h.events();
    h.submit_moves(1);
    h.sent();
    h.recv("Resend: 3");
    let ev = h.events();
    assert!(
        ev.iter().any(|e| matches!(e, LinkEvent::LinkError { .. })),
        "{ev:?}"
    );
    h.recv("ok");
    h.submit_moves(1);
    assert!(h.sent().is_empty(), "no streaming after a link error");
}

#[test]
fn busy_keeps_a_blocking_command_alive_but_silence_times_out() {
    let cfg = LinkConfig {
        response_timeout: Duration::from_secs(10),
        probe_retries: 2,
        ..cfg()
    };
    let mut h = H::new(cfg.clone());
    h.handshake(false, false);
    h.link.submit("M109 S215").expect("valid");
    assert_eq!(h.sent_cmds().len(), 1);
    // Five minutes of heating, kept alive by busy and wait-loop temperature lines.
    for i in 0..300 {
        h.advance(Duration::from_secs(1));
        if i % 2 == 0 {
            h.recv("echo:busy: processing");
        } else {
            h.recv(" T:150.00 /215.00 B:60.00 /60.00 @:127 B@:0 W:?");
        }
    }
    assert!(h.sent().is_empty(), "no probe while heating");
    assert!(!h
        .events()
        .iter()
        .any(|e| matches!(e, LinkEvent::Timeout { .. })));
    h.recv("ok");
    assert_eq!(h.acked(), vec![1]);

    // Dead link: nothing at all comes back.
    h.link.submit("G1 X5").expect("valid");
    h.sent();
    h.advance(Duration::from_secs(10));
    assert_eq!(h.sent_cmds(), vec![(4, "M105".to_owned())], "first probe");
    h.advance(Duration::from_secs(10));
    assert_eq!(h.sent_cmds(), vec![(5, "M105".to_owned())], "second probe");
    assert!(h.events().is_empty());
    h.advance(Duration::from_secs(10));
    assert_eq!(
        h.events(),
        vec![LinkEvent::Timeout {
            kind: TimeoutKind::Silent
        }]
    );
    assert_eq!(h.link.next_deadline(), None);
}

#[test]
fn temperature_reports_do_not_keep_a_normal_command_alive() {
    let mut h = H::new(LinkConfig {
        probe_retries: 0,
        ..LinkConfig::default()
    });
    h.handshake(false, true);
    h.link.submit("G1 X5").expect("valid");
    h.sent();
    for _ in 0..10 {
        h.advance(Duration::from_secs(1));
        h.recv(" T:20.00 /0.00 B:20.00 /0.00 @:0 B@:0");
    }
    let ev = h.events();
    assert!(
        ev.contains(&LinkEvent::Timeout {
            kind: TimeoutKind::NoAck
        }),
        "{ev:?}"
    );
}

#[test]
fn probe_recovers_a_lost_ok_and_a_lost_line() {
    // Lost ok: the probe's `ok T:` acknowledges everything before it.
    let mut h = H::new(cfg());
    h.handshake(false, false);
    h.submit_moves(2);
    h.sent();
    h.advance(Duration::from_secs(10));
    assert_eq!(h.sent_cmds(), vec![(3, "M105".to_owned())]);
    h.recv("ok T:20.00 /0.00 B:20.00 /0.00 @:0 B@:0");
    assert_eq!(h.acked(), vec![1]);
    assert_eq!(h.sent_cmds(), vec![(4, "G1 X1 Y1".to_owned())]);

    // Lost line: the probe provokes a resend request.
    let mut h = H::new(cfg());
    h.handshake(false, false);
    h.submit_moves(2);
    h.sent();
    h.advance(Duration::from_secs(10));
    assert_eq!(h.sent_cmds(), vec![(3, "M105".to_owned())]);
    h.recv("Error:Line Number is not Last Line Number+1, Last Line: 1");
    h.recv("Resend: 2");
    h.recv("ok");
    assert_eq!(h.sent_cmds(), vec![(2, "G1 X0 Y0".to_owned())]);
    h.recv("ok");
    assert_eq!(h.acked(), vec![1]);
    assert_eq!(h.sent_cmds(), vec![(3, "M105".to_owned())]);
}

#[test]
fn start_banner_mid_print_is_a_reset() {
    let mut h = H::new(cfg());
    h.handshake(false, false);
    h.submit_moves(10);
    h.sent();
    h.recv("ok");
    h.sent();
    h.events();
    h.recv("start");
    let ev = h.events();
    assert_eq!(ev, vec![LinkEvent::Reset { dropped: 9 }]);
    assert_eq!(h.link.queued(), 0);
    // The link handshakes again on its own.
    assert_eq!(h.sent_cmds(), vec![(0, "M110 N0".to_owned())]);
    assert!(!h.link.is_ready());
}

#[test]
fn thermal_runaway_is_fatal_and_stops_streaming() {
    let mut h = H::new(cfg());
    h.handshake(false, false);
    h.submit_moves(10);
    h.sent();
    h.recv("Error:Thermal Runaway, system stopped! Heater_ID: 0");
    h.recv("Error:Printer halted. kill() called!");
    let fatal: Vec<_> = h
        .events()
        .into_iter()
        .filter(|e| matches!(e, LinkEvent::Fatal { .. }))
        .collect();
    assert_eq!(fatal.len(), 2);
    assert!(
        matches!(&fatal[0], LinkEvent::Fatal { message } if message.contains("Thermal Runaway"))
    );
    h.recv("ok");
    assert!(h.sent().is_empty());
    assert_eq!(
        h.link.next_deadline(),
        None,
        "a halted printer is not probed"
    );
}

#[test]
fn messages_actions_errors_and_garbage() {
    let mut h = H::new(cfg());
    h.handshake(false, false);
    h.recv("//action:pause");
    h.recv("echo:Unknown command: \"G999\"");
    h.recv("Error:Printer not homed");
    h.recv("o\u{fffd}\u{1}k");
    assert_eq!(
        h.events(),
        vec![
            LinkEvent::Action("pause".into()),
            LinkEvent::Message("Unknown command: \"G999\"".into()),
            LinkEvent::FirmwareError {
                message: "Printer not homed".into()
            },
            LinkEvent::Garbage {
                line: "o\u{fffd}\u{1}k".into()
            },
        ]
    );
}

#[test]
fn send_now_jumps_the_queue_and_pause_holds_print_lines() {
    let mut h = H::new(cfg());
    h.handshake(false, false);
    h.submit_moves(3);
    h.sent();
    h.link.send_now("M117 hello").expect("valid");
    h.recv("ok");
    assert_eq!(h.sent_cmds(), vec![(3, "M117 hello".to_owned())]);
    h.link.pause_stream();
    h.recv("ok");
    assert!(h.sent().is_empty());
    h.link.send_now("M105").expect("valid");
    assert_eq!(h.sent_cmds(), vec![(4, "M105".to_owned())]);
    h.recv("ok T:20.00 /0.00");
    h.link.resume_stream();
    assert_eq!(h.sent_cmds(), vec![(5, "G1 X1 Y1".to_owned())]);
    assert_eq!(h.link.clear(), 1);
    h.recv("ok");
    assert!(h.sent().is_empty());
    assert_eq!(h.link.acked_count(), 2);
    h.link.emergency_stop();
    assert_eq!(h.sent(), vec!["M112".to_owned()]);
}

#[test]
fn close_drops_the_print_and_reopen_handshakes_again() {
    let mut h = H::new(cfg());
    h.handshake(false, false);
    h.submit_moves(5);
    h.sent();
    assert_eq!(h.link.on_close(), 5);
    assert_eq!(h.link.queued(), 0);
    h.handshake(false, false);
}

// ---- property: random firmware output ------------------------------------------------------

#[derive(Debug, Clone)]
enum Input {
    Ok,
    OkN(u32),
    OkTemps,
    Resend(u32),
    LineError(u32),
    Busy,
    Temps,
    Start,
    Garbage(Vec<u8>),
    Text(String),
    Wait(u64),
    Submit(u8),
    SendNow,
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        6 => Just(Input::Ok),
        4 => (0u32..40).prop_map(Input::OkN),
        1 => Just(Input::OkTemps),
        2 => (0u32..40).prop_map(Input::Resend),
        2 => (0u32..40).prop_map(Input::LineError),
        1 => Just(Input::Busy),
        1 => Just(Input::Temps),
        1 => Just(Input::Start),
        1 => prop::collection::vec(any::<u8>(), 0..40).prop_map(Input::Garbage),
        1 => "[ -~]{0,30}"
            .prop_filter("no protocol keywords", |t| {
                let t = t.trim();
                !(t.starts_with("rs") || t.starts_with("Resend") || t.starts_with("start") || t.contains("Last Line"))
            })
            .prop_map(Input::Text),
        2 => (0u64..15_000).prop_map(Input::Wait),
        3 => (0u8..8).prop_map(Input::Submit),
        1 => Just(Input::SendNow),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever the printer says, the driver does not panic, keeps its window, and never
    /// writes a numbered line a second time unless a resend request (or a new session)
    /// asked for it.
    #[test]
    fn random_responses_never_panic_nor_duplicate(
        mode in prop_oneof![Just(StreamMode::Auto), Just(StreamMode::PingPong)],
        script in prop::collection::vec(input(), 0..200),
    ) {
        let mut h = H::new(LinkConfig { mode, history: 16, max_in_flight: 8, ..LinkConfig::default() });
        h.open();
        h.recv("start");
        // For each number: how many times it may still be written.
        let mut allowed: HashMap<u32, u32> = HashMap::new();
        let mut written: Vec<u32> = Vec::new();
        let check = |h: &mut H, allowed: &mut HashMap<u32, u32>, written: &mut Vec<u32>| -> Result<(), TestCaseError> {
            for line in h.sent() {
                if line == "M112" { continue; }
                let parsed = marlin::parse_host_line(&line).expect("well-formed");
                prop_assert_eq!(parsed.checksum_ok, Some(true));
                let n = parsed.number.expect("numbered");
                if written.contains(&n) {
                    let a = allowed.entry(n).or_insert(0);
                    prop_assert!(*a > 0, "line {} written again without a resend request", n);
                    *a -= 1;
                } else {
                    written.push(n);
                }
            }
            prop_assert!(h.link.in_flight() <= 8);
            let _ = h.events();
            Ok(())
        };
        check(&mut h, &mut allowed, &mut written)?;
        for step in script {
            match step {
                Input::Ok => h.recv("ok"),
                Input::OkN(n) => h.recv(&format!("ok N{n} P15 B3")),
                Input::OkTemps => h.recv("ok T:20.0 /0.0 B:20.0 /0.0 @:0 B@:0"),
                Input::Resend(n) | Input::LineError(n) => {
                    // A request from `n` allows one more write of every line from `n`.
                    for m in written.iter().copied().filter(|m| *m >= n) {
                        *allowed.entry(m).or_insert(0) += 1;
                    }
                    match step {
                        Input::Resend(_) => h.recv(&format!("Resend: {n}")),
                        _ => h.recv(&format!("Error:checksum mismatch, Last Line: {}", n.wrapping_sub(1))),
                    }
                }
                Input::Busy => h.recv("echo:busy: processing"),
                Input::Temps => h.recv(" T:20.0 /0.0 B:20.0 /0.0 @:0 B@:0"),
                Input::Start => {
                    // A new session numbers from 0 again.
                    h.recv("start");
                    written.clear();
                    allowed.clear();
                }
                Input::Garbage(bytes) => {
                    let text = String::from_utf8_lossy(&bytes).into_owned();
                    h.recv(&text);
                }
                Input::Text(t) => h.recv(&t),
                Input::Wait(ms) => h.advance(Duration::from_millis(ms)),
                Input::Submit(k) => h.submit_moves(usize::from(k)),
                Input::SendNow => { let _ = h.link.send_now("M114"); }
            }
            check(&mut h, &mut allowed, &mut written)?;
        }
    }
}
