//! The sans-IO core under virtual time: protocol, timing model, faults. Fast and deterministic.
mod common;

use std::time::Duration;

use common::bench::{ms, secs, Bench};
use printer_sim::{EmergencyCommand, EmergencyEffect, Fault, Firmware, Phase, SimConfig, Stats};
use proptest::prelude::*;
use protocol::marlin::{self, parse_response, Response};

fn cfg() -> SimConfig {
    SimConfig::default()
}

/// Motion and heating a million times faster than the wire.
fn instant_motion() -> SimConfig {
    SimConfig {
        motion_speed: Some(1e6),
        ..SimConfig::default()
    }
}

/// `M110 N0` until it is acknowledged without a resend (fault knobs may corrupt it).
fn handshake(b: &mut Bench) {
    for _ in 0..20 {
        let got = b.command(0, "M110 N0");
        if got.len() == 1 {
            assert!(got[0].starts_with("ok"), "{got:?}");
            return;
        }
    }
    panic!("handshake never succeeded");
}

#[test]
fn banner_on_open_and_m110_ok() {
    let mut b = Bench::new(cfg());
    let banner: Vec<String> = b.lines.iter().map(|l| l.text.clone()).collect();
    assert_eq!(banner[0], "start");
    assert_eq!(banner[1], "echo:Marlin 2.1.2.1");
    assert!(banner.iter().any(|l| l.starts_with("echo: Last Updated:")));
    assert!(banner.iter().any(|l| l.starts_with("echo: Free Memory:")));
    assert_eq!(parse_response(&banner[0]), Response::Start);
    // The canonical handshake line.
    b.send_raw(b"N0 M110 N0*125\n");
    assert_eq!(b.expect(secs(1.0), |l| l == "ok"), vec!["ok"]);
    assert_eq!(b.fw.stats().last_line, 0);
}

#[test]
fn checksum_mismatch_requests_resend() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    b.send_raw(b"N1 G28*0\n");
    let got = b.expect(secs(1.0), |l| l == "ok");
    assert_eq!(
        got,
        vec!["Error:checksum mismatch, Last Line: 0", "Resend: 1", "ok"]
    );
    assert_eq!(parse_response(&got[1]), Response::Resend(1));
    // The resent line is accepted.
    assert_eq!(b.command(1, "G90"), vec!["ok"]);
    let s = b.fw.stats();
    assert_eq!(
        (s.checksum_errors, s.resends_requested, s.last_line),
        (1, 1, 1)
    );
}

#[test]
fn line_number_gap_requests_resend() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    b.command(1, "G90");
    b.send_line(3, "G91");
    assert_eq!(
        b.expect(secs(1.0), |l| l == "ok"),
        vec![
            "Error:Line Number is not Last Line Number+1, Last Line: 1",
            "Resend: 2",
            "ok"
        ]
    );
    assert_eq!(b.fw.stats().line_number_errors, 1);
}

#[test]
fn numbered_line_without_checksum_requests_resend() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    b.send_raw(b"N1 G90\n");
    assert_eq!(
        b.expect(secs(1.0), |l| l == "ok"),
        vec![
            "Error:No Checksum with line number, Last Line: 0",
            "Resend: 1",
            "ok"
        ]
    );
}

#[test]
fn m110_resets_numbering_and_unnumbered_lines_are_accepted() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    for n in 1..=3 {
        b.command(n, "G90");
    }
    assert_eq!(b.fw.stats().last_line, 3);
    // M110 may carry any leading N; its own N wins.
    assert_eq!(b.command(4, "M110 N100"), vec!["ok"]);
    assert_eq!(b.fw.stats().last_line, 100);
    assert_eq!(b.command(101, "G90"), vec!["ok"]);
    assert_eq!(b.command(0, "M110 N0"), vec!["ok"]);
    assert_eq!(b.command(1, "G91"), vec!["ok"]);
    // No N: no numbering, no checksum check, like Marlin.
    b.send_plain("G90");
    assert_eq!(b.expect(secs(1.0), |l| l.starts_with("ok")), vec!["ok"]);
    b.send_plain("M105");
    let got = b.expect(secs(1.0), |l| l.starts_with("ok"));
    assert!(got[0].starts_with("ok T:20.00 /0.00 B:20.00 /0.00 @:0 B@:0"));
    assert_eq!(b.fw.stats().last_line, 1);
}

#[test]
fn unknown_command_is_echoed_then_ok() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    assert_eq!(
        b.command(1, "M4242 S1"),
        vec!["echo:Unknown command: \"M4242 S1\"", "ok"]
    );
    assert_eq!(b.fw.stats().unknown_commands, 1);
}

#[test]
fn m105_reports_temperatures_in_marlin_format() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    let got = b.command(1, "M105");
    let Response::Ok { temps: Some(t), .. } = parse_response(&got[0]) else {
        panic!("{got:?}");
    };
    assert_eq!(
        t.hotend.map(|r| (r.actual, r.target)),
        Some((20.0, Some(0.0)))
    );
    assert_eq!(t.bed.map(|r| r.actual), Some(20.0));
}

#[test]
fn advanced_ok_reports_planner_and_buffer_space_and_planner_backpressure_delays_ok() {
    let mut b = Bench::new(SimConfig {
        advanced_ok: true,
        ..cfg()
    });
    assert_eq!(b.command(0, "M110 N0"), vec!["ok N0 P15 B3"]);
    // Each move is 100 mm at 100 mm/s = 1 s: the planner fills, one block per ok.
    b.command(1, "G1 X0 F6000");
    let mut x = 0;
    for n in 2..=16u32 {
        x = if x == 0 { 100 } else { 0 };
        let got = b.command(n, &format!("G1 X{x}"));
        let expected_free = 16 - n;
        assert_eq!(
            got,
            vec![format!("ok N{n} P{expected_free} B3")],
            "line {n}"
        );
    }
    // Planner full (P0). Three lines at once: the first waits for a slot; the other two wait
    // in the command buffer, which the B field shows.
    let t0 = b.now;
    let mut burst = String::new();
    for n in 17..=19u32 {
        x = if x == 0 { 100 } else { 0 };
        burst.push_str(&marlin::format_line(n, &format!("G1 X{x}")));
        burst.push('\n');
    }
    b.send_raw(burst.as_bytes());
    let oks: Vec<_> = (0..3)
        .map(|_| {
            b.wait_for("ok", secs(10.0), |l| l.starts_with("ok"))
                .pop()
                .expect("line")
        })
        .collect();
    let texts: Vec<&str> = oks.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, vec!["ok N17 P0 B3", "ok N18 P0 B2", "ok N19 P0 B3"]);
    // The ok for a move waits until a block leaves the planner: ~1 s per block.
    let first = oks[0].at - t0;
    assert!(first > ms(900) && first < ms(1100), "{first:?}");
    let second = oks[1].at - oks[0].at;
    assert!(second > ms(990) && second < ms(1010), "{second:?}");
    assert_eq!(b.fw.stats().phase, Phase::Moving);
    // M400 waits until everything has moved: 15 blocks of 1 s.
    let t1 = b.now;
    b.command(20, "M400");
    let waited = b.now - t1;
    assert!(waited > secs(14.0) && waited < secs(15.5), "{waited:?}");
    // The first move (X0 → X0) is empty and plans no block.
    assert_eq!(b.fw.stats().moves_executed, 18);
}

#[test]
fn m109_blocks_with_busy_and_temperature_lines_until_target() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    let t0 = b.now;
    b.send_line(1, "M109 S215");
    let got = b.wait_for("ok", secs(300.0), |l| l.starts_with("ok"));
    let took = b.now - t0;
    // First-order model: 20 → 214 °C in roughly 45 s at full power.
    assert!(took > secs(30.0) && took < secs(60.0), "{took:?}");
    let busy = got
        .iter()
        .filter(|l| l.text == "echo:busy: processing")
        .count();
    let expected_busy = (took.as_secs_f64() / 2.0).floor() as usize;
    assert!(busy.abs_diff(expected_busy) <= 1, "{busy} busy in {took:?}");
    let temps: Vec<f64> = got
        .iter()
        .filter_map(|l| match parse_response(&l.text) {
            Response::Temperature(t) => t.hotend.map(|r| r.actual),
            _ => None,
        })
        .collect();
    assert!(
        temps.len() as f64 >= took.as_secs_f64() - 1.5,
        "{} temps",
        temps.len()
    );
    assert!(
        temps.windows(2).all(|w| w[1] > w[0]),
        "not rising: {temps:?}"
    );
    let s = b.fw.stats();
    assert!(
        s.hotend.actual >= 214.0 && s.hotend.actual <= 215.0,
        "{:?}",
        s.hotend
    );
    assert_eq!(s.hotend.target, 215.0);
    assert_eq!(s.hotend.power, 127);
    // Regulation holds the target afterwards.
    b.run_for(secs(30.0));
    assert_eq!(b.fw.stats().hotend.actual, 215.0);
    let ok_line = got.last().map(|l| l.text.clone());
    assert_eq!(ok_line.as_deref(), Some("ok"));
}

#[test]
fn m190_and_m109_r_wait_for_cooling_too() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    b.command(1, "M190 S60");
    assert!(b.fw.stats().bed.actual >= 59.0);
    let t0 = b.now;
    b.command(2, "M190 R40");
    let s = b.fw.stats();
    assert!(s.bed.actual <= 41.0 && s.bed.actual >= 39.0, "{:?}", s.bed);
    assert!(b.now - t0 > secs(10.0));
    // M109 S below the current temperature does not wait.
    b.command(3, "M104 S200");
    b.run_for(secs(120.0));
    let t1 = b.now;
    b.command(4, "M109 S150");
    assert!(b.now - t1 < ms(10));
}

#[test]
fn m155_auto_reports_at_the_requested_period() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    b.command(1, "M155 S2");
    let t0 = b.now;
    b.run_for(secs(10.5));
    let reports: Vec<_> = b
        .lines
        .iter()
        .filter(|l| l.at > t0 && l.text.starts_with(" T:"))
        .collect();
    assert_eq!(reports.len(), 5, "{reports:?}");
    for w in reports.windows(2) {
        let gap = w[1].at - w[0].at;
        assert!(gap > ms(1990) && gap < ms(2010), "{gap:?}");
    }
    assert!(matches!(
        parse_response(&reports[0].text),
        Response::Temperature(_)
    ));
    b.command(2, "M155 S0");
    let before = b.lines.len();
    b.run_for(secs(5.0));
    assert_eq!(b.lines.len(), before);
}

#[test]
fn m115_reports_firmware_and_capabilities_with_seeded_uuid() {
    let mut b = Bench::new(SimConfig { seed: 7, ..cfg() });
    handshake(&mut b);
    let got = b.command(1, "M115");
    let Response::FirmwareInfo(info) = parse_response(&got[0]) else {
        panic!("{got:?}");
    };
    assert_eq!(info.name(), Some("Marlin 2.1.2.1 (printloop-sim)"));
    assert_eq!(info.get("MACHINE_TYPE"), Some("printloop-sim"));
    assert_eq!(info.get("EXTRUDER_COUNT"), Some("1"));
    assert_eq!(info.get("PROTOCOL_VERSION"), Some("1.0"));
    let uuid = info.get("UUID").expect("uuid").to_owned();
    assert_eq!(uuid.len(), 36);
    let caps: Vec<(String, bool)> = got
        .iter()
        .filter_map(|l| match parse_response(l) {
            Response::Capability { name, enabled } => Some((name, enabled)),
            _ => None,
        })
        .collect();
    for cap in [
        "AUTOREPORT_TEMP",
        "EEPROM",
        "PROGRESS",
        "PRINT_JOB",
        "HOST_ACTION_COMMANDS",
        "EMERGENCY_PARSER",
    ] {
        assert!(caps.contains(&(cap.to_owned(), true)), "{cap} missing");
    }
    assert_eq!(got.last().map(String::as_str), Some("ok"));
    // Same seed, same UUID; another seed, another UUID.
    let same = Firmware::new(SimConfig { seed: 7, ..cfg() }).expect("config");
    let other = Firmware::new(SimConfig { seed: 8, ..cfg() }).expect("config");
    assert_eq!(same.uuid(), uuid);
    assert_ne!(other.uuid(), uuid);
}

#[test]
fn m27_m73_m114_m118() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    assert_eq!(b.command(1, "M27"), vec!["Not SD printing", "ok"]);
    b.command(2, "M73 P42 R17");
    let p = b.fw.stats().progress;
    assert_eq!((p.percent, p.remaining_minutes), (Some(42), Some(17)));
    b.command(3, "G1 X10 Y5 F6000");
    assert_eq!(
        b.command(4, "M114")[0],
        "X:10.00 Y:5.00 Z:0.00 E:0.00 Count X:800 Y:400 Z:0"
    );
    let got = b.command(5, "M118 A1 action:pause");
    assert_eq!(parse_response(&got[0]), Response::Action("pause".into()));
}

#[test]
fn rx_overflow_loses_bytes_and_causes_a_resend() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    // The dwell blocks the main loop; the host ignores flow control and sends 10 lines.
    b.send_line(1, "G4 P1000");
    let mut burst = String::new();
    for n in 2..=21 {
        burst.push_str(&marlin::format_line(n, "G1 X1.234 Y5.678"));
        burst.push('\n');
    }
    assert!(burst.len() > 128 + 4 * 30);
    b.send_raw(burst.as_bytes());
    b.run_for(secs(3.0));
    // What fitted into the 128-byte RX buffer ran; the rest was lost, leaving half a line
    // in the buffer. The next line the host sends completes it into a corrupt one.
    let s = b.fw.stats();
    assert!(s.rx_overflow_bytes > 0, "{s:?}");
    assert!(s.lines_accepted < 1 + 21);
    b.send_line(22, "G1 X1");
    b.run_for(secs(1.0));
    let s = b.fw.stats();
    assert!(s.resends_requested >= 1);
    let lines = b.take();
    assert!(lines.iter().any(|l| l.starts_with("Resend: ")), "{lines:?}");
}

#[test]
fn injected_checksum_errors_at_lines_fire_once() {
    let mut b = Bench::new(SimConfig {
        checksum_error_lines: vec![2, 4],
        ..cfg()
    });
    handshake(&mut b);
    assert_eq!(b.command(1, "G90"), vec!["ok"]);
    assert_eq!(
        b.command(2, "G90"),
        vec!["Error:checksum mismatch, Last Line: 1", "Resend: 2", "ok"]
    );
    assert_eq!(b.command(2, "G90"), vec!["ok"]);
    assert_eq!(b.command(3, "G90"), vec!["ok"]);
    assert_eq!(b.command(4, "G90")[1], "Resend: 4");
    assert_eq!(b.command(4, "G90"), vec!["ok"]);
    let s = b.fw.stats();
    assert_eq!((s.checksum_errors, s.injected_checksum_errors), (2, 2));
}

#[test]
fn checksum_error_rate_is_roughly_honoured() {
    let mut b = Bench::new(SimConfig {
        checksum_error_rate: 0.2,
        seed: 3,
        ..instant_motion()
    });
    handshake(&mut b);
    let mut n = 1;
    let mut sent = 0;
    while n <= 500 {
        let got = b.command(n, "G1 X1");
        sent += 1;
        if !got.iter().any(|l| l.starts_with("Resend:")) {
            n += 1;
        }
    }
    let errors = b.fw.stats().injected_checksum_errors;
    let rate = errors as f64 / sent as f64;
    assert!((0.15..0.25).contains(&rate), "{errors} of {sent}");
}

#[test]
fn faults_thermal_runaway_reset_hang() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    b.command(1, "M104 S200");
    // Hang: nothing answered, bytes discarded.
    b.fw.inject(b.now, Fault::Hang);
    b.send_line(2, "M105");
    b.run_for(secs(5.0));
    assert!(b.take().is_empty());
    assert_eq!(b.fw.stats().phase, Phase::Hung);
    b.fw.inject(b.now, Fault::Unhang);
    assert!(b.command(2, "M105")[0].starts_with("ok T:"));
    // Thermal runaway: two errors, then silence.
    b.fw.inject(b.now, Fault::ThermalRunaway);
    let got = b.expect(secs(1.0), |l| l.contains("kill()"));
    assert_eq!(
        got,
        vec![
            "Error:Thermal Runaway, system stopped! Heater_ID: 0",
            "Error:Printer halted. kill() called!"
        ]
    );
    assert!(got.iter().all(|l| parse_response(l).is_fatal()));
    b.send_line(3, "M105");
    b.run_for(secs(5.0));
    assert!(b.take().is_empty());
    let s = b.fw.stats();
    assert_eq!((s.phase, s.hotend.target), (Phase::Halted, 0.0));
    // A reset brings it back, numbering from scratch.
    b.fw.inject(b.now, Fault::Reset);
    assert_eq!(b.expect(secs(1.0), |l| l == "start"), vec!["start"]);
    b.run_for(ms(50));
    b.take();
    assert_eq!(b.fw.stats().last_line, 0);
    assert_eq!(b.fw.stats().resets, 2);
    b.send_line(5, "G90");
    assert_eq!(b.expect(secs(1.0), |l| l == "ok")[1], "Resend: 1");
}

#[test]
fn reopen_resets_state_and_drops_a_running_print() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    b.command(1, "G1 X100 F600");
    b.command(2, "M73 P10");
    assert_eq!(b.fw.stats().phase, Phase::Moving);
    b.fw.host_closed(b.now);
    b.run_for(ms(10));
    b.fw.host_opened(b.now);
    let got = b.expect(secs(1.0), |l| l.starts_with("echo:V86"));
    assert_eq!(got[0], "start");
    let s = b.fw.stats();
    assert_eq!(
        (s.phase, s.planner_queued, s.last_line),
        (Phase::Idle, 0, 0)
    );
    assert_eq!(s.progress.percent, None);
}

#[test]
fn output_while_closed_is_dropped() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    b.command(1, "M155 S1");
    b.fw.host_closed(b.now);
    b.run_for(secs(5.0));
    assert!(b.take().is_empty());
}

#[test]
fn boot_time_delays_banner_and_loses_early_bytes() {
    let mut fw = Firmware::new(SimConfig {
        boot_time: ms(1500),
        ..cfg()
    })
    .expect("config");
    fw.host_opened(Duration::ZERO);
    fw.receive(Duration::ZERO, b"N0 M110 N0*125\n");
    assert_eq!(fw.stats().phase, Phase::Booting);
    assert!(fw.poll_output(ms(1400)).is_none());
    let out = fw.poll_output(ms(1600)).expect("banner");
    assert!(out.starts_with(b"start\n"));
    assert_eq!(fw.stats().bytes_ignored, 15);
}

#[test]
fn moves_take_distance_over_feedrate_and_arcs_are_segmented() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    let t0 = b.now;
    b.command(1, "G1 X60 F3600"); // 60 mm at 60 mm/s = 1 s
    b.command(2, "G1 Z5"); // Z limited to 5 mm/s = 1 s
    b.command(3, "M400");
    let took = b.now - t0;
    assert!(took > ms(1990) && took < ms(2050), "{took:?}");
    // Half circle of radius 10 around (70, 0): 31.4 mm in ~31 planner blocks.
    let before = b.fw.stats().moves_executed;
    b.command(4, "G2 X80 Y0 I10 J0 F600");
    b.command(5, "M400");
    let segments = b.fw.stats().moves_executed - before;
    assert!((28..=32).contains(&segments), "{segments}");
    assert!(b.command(6, "G3 X60 Y0 R10")[0] == "ok");
    let homing = b.command(7, "G28");
    assert_eq!(homing.last().map(String::as_str), Some("ok"));
    assert!(homing[..homing.len() - 1]
        .iter()
        .all(|l| l == "echo:busy: processing"));
    assert_eq!(b.fw.stats().position[..3], [0.0, 0.0, 0.0]);
}

#[test]
fn wire_delivers_bytes_at_the_baud_rate() {
    for baud in [250_000u32, 115_200] {
        let mut b = Bench::new(SimConfig {
            baud,
            ..instant_motion()
        });
        handshake(&mut b);
        let before = b.fw.stats();
        let mut burst = String::new();
        for n in 1..=400 {
            burst.push_str(&marlin::format_line(n, "G4 P0"));
            burst.push('\n');
        }
        let t0 = b.now;
        b.send_raw(burst.as_bytes());
        b.run_for(secs(5.0));
        let s = b.fw.stats();
        assert_eq!(s.bytes_in - before.bytes_in, burst.len() as u64);
        let span = s.last_byte_in_at.expect("bytes arrived") - t0;
        let expected = Duration::from_secs_f64(burst.len() as f64 * 10.0 / f64::from(baud));
        let error = span.abs_diff(expected);
        assert!(
            error < Duration::from_micros(1),
            "{baud}: {span:?} vs {expected:?}"
        );
        // The firmware keeps up with the wire: nothing lost, every line acknowledged.
        assert_eq!(s.rx_overflow_bytes, 0);
        assert_eq!(s.lines_accepted - before.lines_accepted, 400);
        assert_eq!(b.take().iter().filter(|l| *l == "ok").count(), 400);
    }
}

#[test]
fn every_command_of_the_prusaslicer_samples_is_accepted() {
    // `../shared` sits beside the repository (on CI too).
    let dir = std::env::var("PRINTLOOP_GCODE_DIR").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/gcode").to_owned()
    });
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("sample G-code in {dir}: {e} (set PRINTLOOP_GCODE_DIR)"))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "gcode"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    for path in files {
        let text = std::fs::read_to_string(&path).expect("read sample");
        let mut b = Bench::new(SimConfig {
            advanced_ok: true,
            ..instant_motion()
        });
        handshake(&mut b);
        let mut n = 0u32;
        for line in text.lines() {
            let Some(cmd) = marlin::strip_comment(line) else {
                continue;
            };
            n += 1;
            let got = b.command(n, cmd);
            assert!(
                got.iter()
                    .all(|l| !l.contains("Unknown command") && !l.starts_with("Error")),
                "{}: {cmd} → {got:?}",
                path.display()
            );
        }
        let s = b.fw.stats();
        assert_eq!(s.unknown_commands, 0);
        assert_eq!(s.lines_accepted, u64::from(n) + 1, "{}", path.display());
        assert_eq!(s.progress.percent, Some(100), "{}", path.display());
    }
}

// ---- emergency parser (Marlin EMERGENCY_PARSER) ------------------------------------------

fn without_parser() -> SimConfig {
    SimConfig {
        emergency_parser: false,
        ..cfg()
    }
}

/// Sends numbered moves from line `first` on while the main loop is blocked, until the 128-byte
/// RX buffer has overflowed.
fn fill_rx(b: &mut Bench, first: u32) {
    let mut burst = String::new();
    for n in first..first + 16 {
        burst.push_str(&marlin::format_line(n, "G1 X1.234 Y5.678"));
        burst.push('\n');
    }
    assert!(burst.len() > 2 * 128);
    b.send_raw(burst.as_bytes());
    b.run_for(ms(50));
    assert!(
        b.fw.stats().rx_overflow_bytes > 0,
        "the RX buffer is not full"
    );
}

/// kill() happened: heaters off, nothing planned or queued, silent.
fn assert_killed(s: &Stats) {
    assert_eq!(s.phase, Phase::Halted);
    assert_eq!((s.hotend.target, s.bed.target), (0.0, 0.0));
    assert_eq!((s.planner_queued, s.commands_queued), (0, 0));
}

#[test]
fn m112_kills_at_once_during_a_dwell_with_lines_queued_and_the_rx_buffer_full() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    b.command(1, "M104 S200");
    b.command(2, "M140 S60");
    b.command(3, "G1 X50 F600"); // 5 s; the dwell first waits for it
    b.send_line(4, "G4 S900");
    fill_rx(&mut b, 5);
    b.run_for(secs(2.0));
    let s = b.fw.stats();
    assert_eq!((s.phase, s.planner_queued), (Phase::Waiting, 1));
    assert_eq!((s.hotend.target, s.bed.target), (200.0, 60.0));
    let lost = s.rx_overflow_bytes;
    let t0 = b.now;
    b.send_plain("M112");
    let got = b.wait_for("kill", ms(10), |l| l.contains("kill()"));
    let kill = got.last().expect("line");
    assert_eq!(kill.text, "Error:Printer halted. kill() called!");
    assert!(kill.at - t0 < ms(2), "{:?}", kill.at - t0);
    let s = b.fw.stats();
    assert_killed(&s);
    // The whole line fell on a full buffer: only the parser saw it.
    assert_eq!(s.rx_overflow_bytes, lost + 5);
    assert_eq!(s.emergency_m112, 1);
    let a = s.last_emergency.expect("logged");
    // The '\n' arrives 5 bytes (200 µs) after the write; the kill follows at that instant.
    assert_eq!(a.at - t0, ms(0) + Duration::from_micros(200));
    assert_eq!(
        (a.command, a.by_parser, a.received),
        (EmergencyCommand::M112, true, a.at)
    );
    assert_eq!(
        a.effect,
        EmergencyEffect::Killed {
            hotend_target: 0.0,
            bed_target: 0.0
        }
    );
    let expected = format!(
        "emergency parser: M112 at {:.3} s: heaters off (hotend target 0, bed target 0), motion \
         stopped",
        a.at.as_secs_f64()
    );
    assert!(a.to_string().starts_with(&expected), "{a}");
    assert_eq!(b.fw.poll_emergency(), Some(a));
    assert_eq!(b.fw.poll_emergency(), None);
    // Silent until a reset.
    b.run_for(secs(5.0));
    assert!(b.take().is_empty());
}

#[test]
fn m108_ends_an_m109_wait_and_the_next_queued_command_runs() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    b.send_line(1, "M109 S260");
    b.send_line(2, "M104 S0");
    b.run_for(secs(5.0));
    let s = b.fw.stats();
    assert_eq!((s.phase, s.hotend.target), (Phase::Heating, 260.0));
    assert!(s.hotend.actual < 100.0, "{:?}", s.hotend);
    let t0 = b.now;
    b.send_plain("M108");
    // M109's ok at once, then M104 S0 runs, then the M108 line itself is a no-op with its ok.
    let oks: Vec<_> = (0..3)
        .map(|_| {
            b.wait_for("ok", ms(20), |l| l.starts_with("ok"))
                .pop()
                .expect("line")
        })
        .collect();
    assert!(oks[0].at - t0 < ms(1), "{:?}", oks[0].at - t0);
    assert!(oks[2].at - t0 < ms(5), "{:?}", oks[2].at - t0);
    let s = b.fw.stats();
    assert_eq!((s.phase, s.hotend.target), (Phase::Idle, 0.0));
    assert!(
        s.hotend.actual < 100.0,
        "long before 260 °C: {:?}",
        s.hotend
    );
    assert_eq!((s.emergency_m108, s.lines_accepted), (1, 4));
    assert_eq!(
        s.last_emergency.expect("logged").effect,
        EmergencyEffect::HeatWaitEnded {
            bed: false,
            target: 260.0
        }
    );
}

#[test]
fn m410_stops_a_long_move_where_the_head_is() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    b.command(1, "G1 X300 F60"); // 1 mm/s: 300 s, acknowledged once planned
    b.run_for(secs(10.0));
    assert_eq!(b.fw.stats().phase, Phase::Moving);
    let t0 = b.now;
    b.send_plain("M410");
    b.run_for(ms(1));
    let s = b.fw.stats();
    assert_eq!(s.planner_queued, 0);
    assert_ne!(s.phase, Phase::Moving);
    let x = s.position[0];
    assert!((10.0..10.001).contains(&x), "stopped at X {x}, not at 300");
    assert_eq!(s.emergency_m410, 1);
    let a = s.last_emergency.expect("logged");
    assert!(a.at - t0 < ms(1));
    assert_eq!(
        a.effect,
        EmergencyEffect::QuickStop {
            stopped_at: s.position,
            dropped_blocks: 1
        }
    );
    assert!(a.to_string().contains("motion stopped at X:10.000"), "{a}");
    // quickstop_stepper() holds the main loop for a second; then the M410 line is read and,
    // the parser having acted, is a no-op.
    let ok = b
        .wait_for("ok of the M410 line", secs(2.0), |l| l.starts_with("ok"))
        .pop()
        .expect("line");
    let held = ok.at - t0;
    assert!(held > ms(1000) && held < ms(1005), "{held:?}");
    assert_eq!(b.fw.stats().emergency_m410, 1);
    // The head stays put and the position says so; the next move starts from there.
    b.run_for(secs(5.0));
    assert_eq!(b.fw.stats().position[0], x);
    let t1 = b.now;
    assert_eq!(
        b.command(2, "M114")[0],
        "X:10.00 Y:0.00 Z:0.00 E:0.00 Count X:800 Y:0 Z:0"
    );
    assert!(b.now - t1 < ms(10), "no second hold");
    let t2 = b.now;
    b.command(3, "G1 X20 F600");
    b.command(4, "M400");
    let took = b.now - t2;
    assert!(took > ms(990) && took < ms(1010), "{took:?}");
    let s = b.fw.stats();
    assert_eq!((s.position[0], s.moves_executed), (20.0, 1));
}

#[test]
fn m410_lets_the_move_waiting_for_a_slot_run_from_where_the_head_stopped() {
    // One block fits: the second move waits for the slot, without its ok.
    let mut b = Bench::new(SimConfig {
        planner_blocks: 2,
        ..cfg()
    });
    handshake(&mut b);
    b.command(1, "G1 X100 F600"); // 10 mm/s: 10 s
    b.send_line(2, "G1 X0");
    b.run_for(secs(2.0));
    assert!(b.take().is_empty());
    let t0 = b.now;
    b.send_plain("M410");
    b.run_for(ms(1));
    let s = b.fw.stats();
    assert_eq!((s.phase, s.planner_queued), (Phase::Waiting, 0));
    let Some(EmergencyEffect::QuickStop { stopped_at, .. }) = s.last_emergency.map(|a| a.effect)
    else {
        panic!("no quick stop");
    };
    assert!((stopped_at[0] - 20.0).abs() < 0.01, "{stopped_at:?}");
    // Marlin's buffer_line() gets its slot once quickstop_stepper() returns, a second later:
    // the move runs from X20 back to X0 (2 s at 10 mm/s), not from X100.
    let ok = b
        .wait_for("ok of the waiting move", secs(2.0), |l| l.starts_with("ok"))
        .pop()
        .expect("line");
    let held = ok.at - t0;
    assert!(held > ms(1000) && held < ms(1005), "{held:?}");
    assert_eq!(b.fw.stats().phase, Phase::Moving);
    b.wait_for("ok of the M410 line", ms(10), |l| l.starts_with("ok"));
    b.command(3, "M400");
    let took = b.now - t0;
    assert!(took > ms(2990) && took < ms(3020), "{took:?}");
    let s = b.fw.stats();
    assert_eq!((s.position[0], s.moves_executed), (0.0, 1));
}

#[test]
fn m410_in_the_middle_of_an_arc_stops_on_the_arc() {
    // Clockwise quarter circles from (0, 0) around (10, 0) to (10, 10), 15.7 mm at 1 mm/s, as
    // I/J and as R: stopped half way, the head is on the circle, at about 135°.
    for arc in ["G2 X10 Y10 I10 J0 F60", "G2 X10 Y10 R10 F60"] {
        let mut b = Bench::new(cfg());
        handshake(&mut b);
        assert_eq!(b.command(1, arc), vec!["ok"]);
        b.run_for(ms(7850));
        b.send_plain("M410");
        b.run_for(ms(1));
        let s = b.fw.stats();
        assert_eq!(s.planner_queued, 0, "{arc}");
        let [x, y, ..] = s.position;
        let r = (x - 10.0).hypot(y);
        assert!(
            (9.98..10.001).contains(&r),
            "{arc}: ({x}, {y}) is {r} from the centre"
        );
        assert!(
            (x - 2.93).abs() < 0.5 && (y - 7.07).abs() < 0.5,
            "{arc}: ({x}, {y})"
        );
    }
}

#[test]
fn numbered_m112_with_a_checksum_kills_during_a_dwell() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    b.command(1, "M104 S200");
    b.send_line(2, "G4 S900");
    b.run_for(secs(1.0));
    assert_eq!(b.fw.stats().phase, Phase::Waiting);
    let t0 = b.now;
    // N7 is out of sequence (the queue would ask for a resend): the parser does not care.
    let line = format!("{}\n", marlin::format_line(7, "M112"));
    assert!(line.starts_with("N7 M112*"), "{line}");
    b.send_raw(line.as_bytes());
    let kill = b
        .wait_for("kill", ms(10), |l| l.contains("kill()"))
        .pop()
        .expect("line");
    assert!(kill.at - t0 < ms(2), "{:?}", kill.at - t0);
    assert_killed(&b.fw.stats());
}

#[test]
fn without_the_emergency_parser_m112_waits_until_the_dwell_ends() {
    let mut b = Bench::new(without_parser());
    handshake(&mut b);
    assert!(b
        .command(1, "M115")
        .contains(&"Cap:EMERGENCY_PARSER:0".to_owned()));
    b.command(2, "M104 S200");
    b.send_line(3, "G4 S5");
    b.run_for(ms(100));
    let t0 = b.now;
    b.send_plain("M112");
    b.run_for(secs(2.0));
    let s = b.fw.stats();
    assert_eq!((s.phase, s.hotend.target), (Phase::Waiting, 200.0));
    // The main loop reads the line once the dwell is over, then kills.
    let kill = b
        .wait_for("kill", secs(10.0), |l| l.contains("kill()"))
        .pop()
        .expect("line");
    let waited = kill.at - t0;
    assert!(waited > ms(4800) && waited < secs(5.0), "{waited:?}");
    let s = b.fw.stats();
    assert_killed(&s);
    assert_eq!(s.emergency_m112, 0);
    let a = s.last_emergency.expect("logged");
    assert!(!a.by_parser);
    assert!(a
        .to_string()
        .starts_with("serial reader (no emergency parser): M112"));
}

#[test]
fn a_line_lost_to_rx_overflow_is_still_parsed() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    b.send_line(1, "M109 S260");
    b.run_for(secs(1.0));
    fill_rx(&mut b, 2);
    let lost = b.fw.stats().rx_overflow_bytes;
    let t0 = b.now;
    b.send_plain("M108");
    let ok = b
        .wait_for("M109's ok", ms(10), |l| l.starts_with("ok"))
        .pop()
        .expect("line");
    assert!(ok.at - t0 < ms(1), "{:?}", ok.at - t0);
    let s = b.fw.stats();
    assert_eq!(s.rx_overflow_bytes, lost + 5, "all of M108\\n was dropped");
    assert_eq!((s.emergency_m108, s.hotend.target), (1, 260.0));
}

#[test]
fn m108_and_m410_do_not_cut_a_dwell_short() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    let t0 = b.now;
    b.send_line(1, "G4 S5");
    b.run_for(secs(1.0));
    b.send_plain("M108");
    b.run_for(secs(1.0));
    b.send_plain("M410");
    let ok = b
        .wait_for("the dwell's ok", secs(10.0), |l| l.starts_with("ok"))
        .pop()
        .expect("line");
    let took = ok.at - t0;
    assert!(took > secs(5.0) && took < ms(5010), "{took:?}");
    let s = b.fw.stats();
    assert_eq!((s.emergency_m108, s.emergency_m410), (1, 1));
    let effects: Vec<_> = std::iter::from_fn(|| b.fw.poll_emergency())
        .map(|a| a.effect)
        .collect();
    assert_eq!(
        effects,
        vec![
            EmergencyEffect::NoHeatWait,
            EmergencyEffect::QuickStop {
                stopped_at: [0.0; 4],
                dropped_blocks: 0
            }
        ]
    );
}

#[test]
fn while_hung_m112_is_parsed_but_acts_when_the_loop_runs_again() {
    let mut b = Bench::new(cfg());
    handshake(&mut b);
    b.command(1, "M104 S200");
    b.fw.inject(b.now, Fault::Hang);
    let t0 = b.now;
    b.send_plain("M112");
    b.run_for(secs(2.0));
    let s = b.fw.stats();
    assert_eq!((s.phase, s.hotend.target), (Phase::Hung, 200.0));
    assert_eq!((s.emergency_m112, s.last_emergency), (1, None));
    let t1 = b.now;
    b.fw.inject(t1, Fault::Unhang);
    let s = b.fw.stats();
    assert_killed(&s);
    let a = s.last_emergency.expect("logged");
    assert_eq!(a.at, t1);
    assert_eq!(a.received, t0 + Duration::from_micros(200));
    assert!(a.to_string().contains("(line received at"), "{a}");
    assert_eq!(
        b.expect(ms(10), |l| l.contains("kill()")),
        vec!["Error:Printer halted. kill() called!"]
    );
}

fn scripted_run(seed: u64) -> Vec<u8> {
    let mut b = Bench::new(SimConfig {
        seed,
        checksum_error_rate: 0.1,
        garble_rate: 0.1,
        advanced_ok: true,
        ..cfg()
    });
    b.send_line(0, "M110 N0");
    b.send_line(1, "M155 S1");
    b.send_line(2, "M104 S200");
    b.run_for(secs(1.0));
    for n in 3..40 {
        b.send_line(n, &format!("G1 X{n} Y{} F3000", n * 2));
        b.run_for(ms(50));
    }
    b.send_line(40, "M115");
    b.run_for(secs(5.0));
    b.raw.clone()
}

#[test]
fn same_seed_same_bytes() {
    let a = scripted_run(11);
    assert_eq!(a, scripted_run(11));
    assert_ne!(a, scripted_run(12));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Arbitrary bytes never panic the core, and it still answers afterwards.
    #[test]
    fn garbage_input_never_wedges_the_core(garbage in proptest::collection::vec(any::<u8>(), 0..600), seed in any::<u64>()) {
        let mut b = Bench::new(SimConfig { seed, garble_rate: 0.0, ..instant_motion() });
        b.send_raw(&garbage);
        b.run_for(secs(2.0));
        b.send_raw(b"\n");
        b.run_for(secs(1.0));
        b.take();
        // Garbage may have been a kill (M112); a reset always brings the board back.
        if b.fw.stats().phase == Phase::Halted {
            b.fw.inject(b.now, Fault::Reset);
            b.run_for(ms(50));
            b.take();
        }
        b.send_raw(b"M105\n");
        let got = b.expect(secs(5.0), |l| l.starts_with("ok T:"));
        prop_assert!(!got.is_empty());
    }
}
