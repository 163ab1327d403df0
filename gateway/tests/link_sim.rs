//! The serial link against the printer simulator over a real pseudo-terminal.
//!
//! Each test runs a `printer_sim::Simulator` on a pty (linked into a temp dir), drives it
//! with `SerialLink`, and checks both sides: the link's events and the simulated firmware's
//! counters. The simulator runs faster than real time (`speed`), motion and heating are made
//! practically instant (`motion_speed`), and every wait is bounded.
use std::path::PathBuf;
use std::time::Duration;

use gateway::link::{gcode_lines, LinkConfig, LinkEvent, StreamMode, TimeoutKind};
use gateway::serial::{LinkStatus, SerialLink, ShellConfig};
use printer_sim::{SimConfig, SimHandle, Simulator};
use tokio::sync::mpsc;

/// Time scale of the simulator in these tests.
const SPEED: f64 = 20.0;
const BAUD: u32 = 250_000;
/// Longest a single test waits for anything.
const LIMIT: Duration = Duration::from_secs(60);

fn gcode(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/gcode")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn sim_config(advanced_ok: bool) -> SimConfig {
    SimConfig {
        seed: 7,
        baud: BAUD,
        speed: SPEED,
        motion_speed: Some(1e6),
        advanced_ok,
        ..SimConfig::default()
    }
}

fn link_config(mode: StreamMode) -> LinkConfig {
    LinkConfig {
        mode,
        ..LinkConfig::default()
    }
    .scaled(1.0 / SPEED)
}

struct Rig {
    sim: SimHandle,
    link: SerialLink,
    events: mpsc::Receiver<LinkEvent>,
    /// Print lines submitted so far (the last sequence number handed out).
    submitted: u64,
    _dir: tempfile::TempDir,
}

impl Rig {
    async fn start(sim: SimConfig, link: LinkConfig) -> Rig {
        let dir = tempfile::tempdir().expect("temp dir");
        let dev = dir.path().join("printer");
        let sim = Simulator::start(sim, Some(&dev)).expect("simulator starts");
        let shell = ShellConfig {
            reconnect_min: Duration::from_millis(20),
            reconnect_max: Duration::from_millis(200),
            printer: "test".into(),
            ..ShellConfig::default()
        };
        let (link, events) = SerialLink::spawn_with(sim.path(), BAUD, link, shell);
        let mut rig = Rig {
            sim,
            link,
            events,
            submitted: 0,
            _dir: dir,
        };
        rig.wait_ready().await;
        rig
    }

    /// The next event matching `pred`, skipping others (bounded).
    async fn wait_event(
        &mut self,
        what: &str,
        mut pred: impl FnMut(&LinkEvent) -> bool,
    ) -> LinkEvent {
        let fut = async {
            loop {
                match self.events.recv().await {
                    Some(e) if pred(&e) => return e,
                    Some(_) => {}
                    None => panic!("event channel closed while waiting for {what}"),
                }
            }
        };
        tokio::time::timeout(LIMIT, fut)
            .await
            .unwrap_or_else(|_| panic!("no {what} within {LIMIT:?}"))
    }

    async fn wait_ready(&mut self) {
        self.wait_event("Ready", |e| matches!(e, LinkEvent::Ready { .. }))
            .await;
    }

    /// Submits `lines` from a separate task (the submission is back-pressured) and waits
    /// until every one of them is acknowledged, failing on any fatal event.
    async fn print(&mut self, lines: Vec<String>) -> u64 {
        let total = self.submitted + lines.len() as u64;
        self.submitted = total;
        let handle_lines = lines;
        let submitter = {
            // The handle's submit takes &self; run it concurrently with the event loop.
            let link = &self.link;
            async move {
                for chunk in handle_lines.chunks(64) {
                    link.submit(chunk.to_vec()).await.expect("submit");
                }
            }
        };
        let events = &mut self.events;
        let consume = async {
            loop {
                match events.recv().await {
                    Some(LinkEvent::Acked { seq }) if seq >= total => return seq,
                    Some(
                        e @ (LinkEvent::Fatal { .. }
                        | LinkEvent::Reset { .. }
                        | LinkEvent::Timeout { .. }
                        | LinkEvent::LinkError { .. }
                        | LinkEvent::Disconnected { .. }),
                    ) => panic!("unexpected {e:?}"),
                    Some(_) => {}
                    None => panic!("event channel closed"),
                }
            }
        };
        let run = async {
            let ((), seq) = tokio::join!(submitter, consume);
            seq
        };
        tokio::time::timeout(LIMIT, run)
            .await
            .unwrap_or_else(|_| panic!("print not acknowledged within {LIMIT:?}"))
    }

    async fn submit(&mut self, lines: Vec<String>) {
        self.submitted += lines.len() as u64;
        self.link.submit(lines).await.expect("submit");
    }

    fn status(&self) -> LinkStatus {
        self.link.status().borrow().clone()
    }

    /// Waits until the firmware has executed everything it accepted.
    async fn settle(&self) -> printer_sim::SimStats {
        self.sim
            .wait_for(LIMIT, |s| {
                s.firmware.commands_executed == s.firmware.lines_accepted
                    && s.firmware.commands_queued == 0
            })
            .await
            .expect("firmware drains")
    }

    async fn shutdown(self) {
        tokio::time::timeout(LIMIT, self.link.close())
            .await
            .expect("link closes in time")
            .expect("link task ends");
        tokio::time::timeout(LIMIT, self.sim.shutdown())
            .await
            .expect("sim stops in time")
            .expect("sim stops");
    }
}

fn file_lines(name: &str, max: usize) -> Vec<String> {
    gcode_lines(&gcode(name))
        .take(max)
        .map(str::to_owned)
        .collect()
}

/// Every line the link numbered was accepted exactly once, and executed.
fn assert_exact(status: &LinkStatus, sim: &printer_sim::SimStats) {
    let distinct = status.stats.lines_sent - status.stats.lines_resent;
    let fw = &sim.firmware;
    assert_eq!(
        fw.lines_accepted, distinct,
        "firmware accepted {} lines, the link numbered {distinct} ({status:?})",
        fw.lines_accepted
    );
    assert_eq!(fw.last_line as u64 + 1, distinct, "line numbers contiguous");
    assert_eq!(
        fw.commands_executed, fw.lines_accepted,
        "nothing executed twice"
    );
    assert_eq!(fw.rx_overflow_bytes, 0, "no RX overflow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_prints_cube20_exactly_pingpong() {
    let mut rig = Rig::start(sim_config(false), link_config(StreamMode::Auto)).await;
    let lines = file_lines("cube20.gcode", usize::MAX);
    let n = lines.len() as u64;
    assert!(n > 5000, "cube20 has {n} lines");
    assert_eq!(rig.print(lines).await, n);
    let sim = rig.settle().await;
    let status = rig.status();
    assert_eq!(status.acked, n);
    assert_eq!(status.stats.resend_requests, 0);
    assert_exact(&status, &sim);
    // Ping-pong: one line in flight (a timeout probe, if a loaded machine provoked one, is
    // the only thing that may overlap it).
    assert!(
        status.stats.peak_in_flight <= 1 + status.stats.probes as usize,
        "{status:?}"
    );
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_prints_cube20_exactly_sendahead() {
    let mut rig = Rig::start(sim_config(true), link_config(StreamMode::Auto)).await;
    let lines = file_lines("cube20.gcode", usize::MAX);
    let n = lines.len() as u64;
    assert_eq!(rig.print(lines).await, n);
    let sim = rig.settle().await;
    let status = rig.status();
    assert_eq!(status.acked, n);
    assert_exact(&status, &sim);
    assert!(status.stats.peak_in_flight > 1, "sent ahead: {status:?}");
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_checksum_errors_are_resent_exactly() {
    let sim = SimConfig {
        checksum_error_rate: 0.05,
        ..sim_config(false)
    };
    let mut rig = Rig::start(sim, link_config(StreamMode::Auto)).await;
    let lines = file_lines("cube20.gcode", 3000);
    let n = lines.len() as u64;
    assert_eq!(rig.print(lines).await, n);
    let sim = rig.settle().await;
    let status = rig.status();
    assert!(
        sim.firmware.injected_checksum_errors > 50,
        "{} errors injected",
        sim.firmware.injected_checksum_errors
    );
    assert_eq!(
        status.stats.resend_requests, sim.firmware.resends_requested,
        "every resend request acted upon"
    );
    assert_exact(&status, &sim);
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_checksum_errors_while_sending_ahead() {
    let sim = SimConfig {
        checksum_error_rate: 0.05,
        ..sim_config(true)
    };
    let mut rig = Rig::start(sim, link_config(StreamMode::Auto)).await;
    let lines = file_lines("cube20.gcode", 3000);
    let n = lines.len() as u64;
    assert_eq!(rig.print(lines).await, n);
    let sim = rig.settle().await;
    let status = rig.status();
    eprintln!("{status:#?}\n{sim:#?}");
    assert_exact(&status, &sim);
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cable_pull_disconnects_and_replug_reconnects() {
    let mut rig = Rig::start(sim_config(false), link_config(StreamMode::Auto)).await;
    let lines = file_lines("cube20.gcode", 600);
    assert_eq!(rig.print(lines[..300].to_vec()).await, 300);
    // Pull the cable while lines stream.
    let ctl = rig.sim.control();
    rig.submit(lines[300..].to_vec()).await;
    rig.wait_event(
        "Acked",
        |e| matches!(e, LinkEvent::Acked { seq } if *seq > 310),
    )
    .await;
    ctl.cable_pull().await.expect("pull");
    let e = rig
        .wait_event("Disconnected", |e| {
            matches!(e, LinkEvent::Disconnected { .. })
        })
        .await;
    assert!(matches!(e, LinkEvent::Disconnected { .. }));
    assert!(!rig.status().ready);
    ctl.replug().await.expect("replug");
    rig.wait_ready().await;
    let status = rig.status();
    assert_eq!(status.sessions, 2);
    assert_eq!(status.queued, 0, "the interrupted print was dropped");
    // The new session streams.
    let acked = status.acked;
    assert!((310..600).contains(&acked), "{acked}");
    let more = file_lines("cube20.gcode", 100);
    assert_eq!(rig.print(more).await, 700, "sequence numbers go on");
    assert_eq!(rig.status().acked, acked + 100);
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_thermal_runaway_is_fatal() {
    let mut rig = Rig::start(sim_config(false), link_config(StreamMode::Auto)).await;
    rig.submit(file_lines("cube20.gcode", 2000)).await;
    rig.wait_event(
        "Acked",
        |e| matches!(e, LinkEvent::Acked { seq } if *seq > 100),
    )
    .await;
    rig.sim.control().thermal_runaway().await.expect("fault");
    let e = rig
        .wait_event("Fatal", |e| matches!(e, LinkEvent::Fatal { .. }))
        .await;
    let LinkEvent::Fatal { message } = e else {
        unreachable!()
    };
    assert!(message.contains("Thermal Runaway"), "{message}");
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_reset_mid_print_is_reported() {
    let mut rig = Rig::start(sim_config(false), link_config(StreamMode::Auto)).await;
    rig.submit(file_lines("cube20.gcode", 3000)).await;
    rig.wait_event(
        "Acked",
        |e| matches!(e, LinkEvent::Acked { seq } if *seq > 100),
    )
    .await;
    rig.sim.control().reset().await.expect("fault");
    let e = rig
        .wait_event("Reset", |e| matches!(e, LinkEvent::Reset { .. }))
        .await;
    let LinkEvent::Reset { dropped } = e else {
        unreachable!()
    };
    assert!(dropped > 0);
    // The link handshakes again by itself.
    rig.wait_ready().await;
    assert_eq!(rig.status().queued, 0);
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_hang_times_out() {
    let cfg = LinkConfig {
        probe_retries: 1,
        ..link_config(StreamMode::Auto)
    };
    let mut rig = Rig::start(sim_config(false), cfg).await;
    rig.submit(file_lines("cube20.gcode", 3000)).await;
    rig.wait_event(
        "Acked",
        |e| matches!(e, LinkEvent::Acked { seq } if *seq > 100),
    )
    .await;
    rig.sim.control().hang().await.expect("fault");
    let e = rig
        .wait_event("Timeout", |e| matches!(e, LinkEvent::Timeout { .. }))
        .await;
    assert_eq!(
        e,
        LinkEvent::Timeout {
            kind: TimeoutKind::Silent
        }
    );
    rig.shutdown().await;
}
