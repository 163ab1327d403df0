//! The shell's log over a real pseudo-terminal: one INFO line per emergency action, stamped with
//! the simulated time, for tests that watch a simulator from outside. Its own test binary,
//! because it installs the process-wide tracing subscriber.
mod common;

use std::io::{self, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common::client::Client;
use printer_sim::{SimConfig, Simulator};

const LIMIT: Duration = Duration::from_secs(5);

/// Collects everything the subscriber writes.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emergency_stop_is_logged_with_the_simulated_time() {
    let capture = Capture::default();
    tracing_subscriber::fmt()
        .with_writer(capture.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("printer0");
    let sim = Simulator::start(SimConfig::default(), Some(&link)).expect("simulator starts");
    let mut c = Client::open(&link).expect("open the device");
    c.banner();
    c.command(0, "M110 N0");
    c.command(1, "M104 S200");
    c.send_line(2, "G4 S60").expect("write");
    c.send("M112\n").expect("write");
    let got = c.expect(LIMIT, |l| l.contains("kill()"));
    assert_eq!(
        got.last().map(String::as_str),
        Some("Error:Printer halted. kill() called!")
    );
    // The shell logs an action in the same turn in which the core carried it out, before the
    // kill line can have reached the host.
    let action = sim
        .stats()
        .firmware
        .last_emergency
        .expect("an emergency action");
    let expected = format!(
        "emergency parser: M112 at {:.3} s: heaters off (hotend target 0, bed target 0), motion \
         stopped",
        action.at.as_secs_f64()
    );
    let log = capture.text();
    let line = log
        .lines()
        .find(|l| l.contains("emergency parser:"))
        .unwrap_or_else(|| panic!("no emergency line in the log:\n{log}"));
    assert!(line.contains(" INFO "), "{line}");
    assert!(line.contains(&expected), "{line}\nexpected: {expected}");
    assert_eq!(log.matches("emergency parser:").count(), 1, "{log}");
    sim.shutdown().await.expect("clean shutdown");
}
