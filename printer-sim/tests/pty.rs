//! The simulator over a real pseudo-terminal, opened the way a host opens a serial port.
//! Each test runs a few seconds at most; every wait is bounded.
mod common;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::client::{Client, Read1};
use printer_sim::{SimConfig, SimHandle, Simulator};
use protocol::marlin::{self, parse_response, Response};

const LIMIT: Duration = Duration::from_secs(5);

struct Setup {
    _dir: tempfile::TempDir,
    link: PathBuf,
    sim: SimHandle,
}

fn start(config: SimConfig) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("printer0");
    let sim = Simulator::start(config, Some(&link)).expect("simulator starts");
    assert_eq!(sim.path(), link);
    Setup {
        _dir: dir,
        link,
        sim,
    }
}

async fn wait_host_open(sim: &SimHandle, open: bool) {
    sim.wait_for(LIMIT, |s| s.firmware.host_open == open)
        .await
        .expect("the simulator sees the open/close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn banner_handshake_and_checksum_resend() {
    let s = start(SimConfig::default());
    let mut c = Client::open(&s.link).expect("open the device");
    let banner = c.banner();
    assert_eq!(banner[1], "echo:Marlin 2.1.2.1");
    c.send("N0 M110 N0*125\n").expect("write");
    assert_eq!(c.expect(LIMIT, |l| l.starts_with("ok")), vec!["ok"]);
    c.send("N1 M105*99\n").expect("write");
    let got = c.expect(LIMIT, |l| l.starts_with("ok"));
    assert_eq!(
        got,
        vec!["Error:checksum mismatch, Last Line: 0", "Resend: 1", "ok"]
    );
    assert_eq!(parse_response(&got[1]), Response::Resend(1));
    let got = c.command(1, "M105");
    assert!(matches!(
        parse_response(&got[0]),
        Response::Ok { temps: Some(_), .. }
    ));
    let stats = s.sim.stats();
    assert_eq!(stats.firmware.checksum_errors, 1);
    assert_eq!(stats.firmware.last_line, 1);
    assert!(stats.device.starts_with("/dev/pts"));
    s.sim.shutdown().await.expect("clean shutdown");
    assert!(std::fs::symlink_metadata(&s.link).is_err(), "link removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_resets_with_a_new_banner_and_no_stale_output() {
    let s = start(SimConfig::default());
    let mut c = Client::open(&s.link).expect("open");
    c.banner();
    c.command(0, "M110 N0");
    c.command(1, "G1 X50 F600");
    // Ask for a long answer and hang up without reading it.
    c.send_line(2, "M115").expect("write");
    s.sim
        .wait_for(LIMIT, |st| st.firmware.lines_accepted >= 3)
        .await
        .expect("M115 arrived");
    drop(c);
    wait_host_open(&s.sim, false).await;
    let mut c = Client::open(&s.link).expect("reopen");
    // The first thing the new client sees is the banner, not the old M115 answer.
    c.banner();
    let st = s.sim.stats();
    assert_eq!(st.firmware.resets, 2);
    assert_eq!(st.firmware.last_line, 0);
    assert_eq!(st.firmware.planner_queued, 0, "the print was lost");
    assert_eq!(c.command(0, "M110 N0"), vec!["ok"]);
    s.sim.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cable_pull_fails_the_client_and_replug_serves_a_fresh_device() {
    let s = start(SimConfig::default());
    let mut c = Client::open(&s.link).expect("open");
    c.banner();
    c.command(0, "M110 N0");
    let old_device = s.sim.stats().device;
    s.sim.control().cable_pull().await.expect("pull");
    assert_eq!(c.read_line(LIMIT), Read1::Gone);
    assert!(c.file.write_all(b"N1 M105*39\n").is_err(), "write fails");
    assert!(!s.link.exists(), "the device node disappears");
    assert!(!s.sim.stats().plugged);
    assert!(s.sim.control().cable_pull().await.is_err());
    s.sim.control().replug().await.expect("replug");
    assert!(s.sim.stats().plugged);
    let mut c = Client::open(&s.link).expect("open after replug");
    c.banner();
    assert_eq!(c.command(0, "M110 N0"), vec!["ok"]);
    // The pty number may be reused by the kernel; what matters is that the link works.
    let _ = old_device;
    s.sim.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thermal_runaway_then_silence_until_reopen() {
    let s = start(SimConfig::default());
    let mut c = Client::open(&s.link).expect("open");
    c.banner();
    c.command(0, "M110 N0");
    c.command(1, "M104 S200");
    s.sim.control().thermal_runaway().await.expect("fault");
    let got = c.expect(LIMIT, |l| l.contains("kill() called"));
    assert_eq!(
        got,
        vec![
            "Error:Thermal Runaway, system stopped! Heater_ID: 0",
            "Error:Printer halted. kill() called!"
        ]
    );
    assert!(got.iter().all(|l| parse_response(l).is_fatal()));
    c.send_line(2, "M105").expect("write");
    assert_eq!(c.read_line(Duration::from_millis(500)), Read1::Timeout);
    drop(c);
    wait_host_open(&s.sim, false).await;
    let mut c = Client::open(&s.link).expect("reopen");
    c.banner();
    assert_eq!(c.command(0, "M110 N0"), vec!["ok"]);
    s.sim.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_and_reset_faults() {
    let s = start(SimConfig::default());
    let mut c = Client::open(&s.link).expect("open");
    c.banner();
    c.command(0, "M110 N0");
    let ctl = s.sim.control();
    ctl.hang().await.expect("hang");
    c.send_line(1, "M105").expect("write");
    assert_eq!(c.read_line(Duration::from_millis(500)), Read1::Timeout);
    ctl.unhang().await.expect("unhang");
    assert!(c.command(1, "M105")[0].starts_with("ok T:"));
    ctl.reset().await.expect("reset");
    c.banner();
    // Numbering starts over: N5 is out of sequence now.
    assert_eq!(c.command(5, "G90")[1], "Resend: 1");
    s.sim.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_link_is_replaced_and_a_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("ttyPRINTER");
    std::os::unix::fs::symlink("/dev/pts/does-not-exist", &link).expect("stale link");
    let sim = Simulator::start(SimConfig::default(), Some(&link)).expect("replaces the stale link");
    let mut c = Client::open(&link).expect("open through the new link");
    c.banner();
    drop(c);
    sim.shutdown().await.expect("shutdown");
    let file = dir.path().join("regular");
    std::fs::write(&file, b"keep me").expect("file");
    assert!(Simulator::start(SimConfig::default(), Some(&file)).is_err());
    assert_eq!(std::fs::read(&file).expect("still there"), b"keep me");
    // Without a link, path() is the slave device itself.
    let sim = Simulator::start(SimConfig::default(), None).expect("start");
    assert!(sim.path().starts_with("/dev/pts"));
    let mut c = Client::open(&sim.path()).expect("open the slave");
    c.banner();
    sim.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speed_scales_firmware_time() {
    let s = start(SimConfig {
        speed: 50.0,
        ..SimConfig::default()
    });
    let mut c = Client::open(&s.link).expect("open");
    c.banner();
    c.command(0, "M110 N0");
    // About 45 s of heating in the model: under a second at 50×.
    let t0 = Instant::now();
    let got = c.command(1, "M109 S215");
    let took = t0.elapsed();
    assert!(
        took > Duration::from_millis(500) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(got.iter().any(|l| l == "echo:busy: processing"));
    assert!(s.sim.stats().firmware.hotend.actual >= 214.0);
    // A 5 s dwell: 100 ms.
    let t0 = Instant::now();
    c.command(2, "G4 S5");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(95) && took < Duration::from_millis(600),
        "{took:?}"
    );
    s.sim.shutdown().await.expect("shutdown");
}

/// Streams short commands as fast as the host can write them (motion instant, so the firmware
/// is never the bottleneck) and measures, on the host's clock, the rate at which they are
/// acknowledged. Returns (host bytes/s, the sim's own arrival span in bytes/s).
async fn measure_throughput(baud: u32, seconds: f64) -> (f64, f64) {
    let s = start(SimConfig {
        baud,
        motion_speed: Some(1e6),
        ..SimConfig::default()
    });
    let mut c = Client::open(&s.link).expect("open");
    c.banner();
    // No handshake: after a reset Marlin expects N1 next, and the burst is then the only
    // traffic, so the sim's first/last arrival stamps span exactly the burst.
    let target_bytes = (f64::from(baud) / 10.0 * seconds) as usize;
    let mut burst = String::new();
    let mut n = 0u32;
    while burst.len() < target_bytes {
        n += 1;
        let x = if n % 2 == 0 { "G1 X1" } else { "G1 X0" };
        burst.push_str(&marlin::format_line(n, x));
        burst.push('\n');
    }
    let before = s.sim.stats().firmware;
    let mut writer = c.file.try_clone().expect("clone fd");
    let bytes = burst.into_bytes();
    let len = bytes.len();
    let t0 = Instant::now();
    let write = std::thread::spawn(move || writer.write_all(&bytes));
    let mut oks = 0;
    let limit = Duration::from_secs_f64(seconds * 3.0 + 2.0);
    while oks < n {
        match c.read_line(limit.saturating_sub(t0.elapsed())) {
            Read1::Line(l) if l == "ok" => oks += 1,
            Read1::Line(l) => panic!("unexpected {l:?} after {oks} oks"),
            other => panic!("{other:?} after {oks} of {n} oks"),
        }
    }
    let took = t0.elapsed();
    write.join().expect("writer").expect("write");
    let after = s
        .sim
        .wait_for(LIMIT, |st| {
            st.firmware.bytes_in - before.bytes_in >= len as u64
        })
        .await
        .expect("stats catch up")
        .firmware;
    assert_eq!(after.rx_overflow_bytes, 0);
    assert_eq!(after.bytes_in - before.bytes_in, len as u64);
    // The sim's own model timestamps (virtual time = real time at speed 1).
    let first = after.first_byte_in_at.expect("bytes");
    let last = after.last_byte_in_at.expect("bytes");
    let span = last - first;
    s.sim.shutdown().await.expect("shutdown");
    (
        len as f64 / took.as_secs_f64(),
        (len - 1) as f64 / span.as_secs_f64(),
    )
}

fn check_rate(baud: u32, host: f64, model: f64) {
    let expected = f64::from(baud) / 10.0;
    let host_err = (host - expected) / expected;
    let model_err = (model - expected) / expected;
    eprintln!(
        "baud {baud}: expected {expected:.0} B/s, host measured {host:.0} B/s ({:+.2} %), sim arrival span {model:.0} B/s ({:+.3} %)",
        host_err * 100.0,
        model_err * 100.0
    );
    assert!(
        host_err.abs() < 0.05,
        "host-measured rate off by {:.2} %",
        host_err * 100.0
    );
    assert!(model_err.abs() < 0.05);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_rate_at_250000_baud_is_within_5_percent() {
    let (host, model) = measure_throughput(250_000, 1.2).await;
    check_rate(250_000, host, model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_rate_at_115200_baud_is_within_5_percent() {
    let (host, model) = measure_throughput(115_200, 1.2).await;
    check_rate(115_200, host, model);
}
