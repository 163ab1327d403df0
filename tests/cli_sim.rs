//! `printloop sim --link PATH` as a user runs it: a real process, a real pty, a host that
//! opens the device and speaks the Marlin protocol.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Sim(Child);

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Opens the device in raw mode and returns a writer and a receiver of whole lines.
fn open_host(path: &std::path::Path) -> (std::fs::File, mpsc::Receiver<String>) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut t = nix::sys::termios::tcgetattr(file.as_fd()).expect("tcgetattr");
    nix::sys::termios::cfmakeraw(&mut t);
    nix::sys::termios::tcsetattr(file.as_fd(), nix::sys::termios::SetArg::TCSANOW, &t)
        .expect("tcsetattr");
    let mut reader = file.try_clone().expect("clone");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        let mut line = Vec::new();
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                return;
            }
            for &b in &buf[..n] {
                if b == b'\n' {
                    let s = String::from_utf8_lossy(&line).trim_end().to_owned();
                    line.clear();
                    if tx.send(s).is_err() {
                        return;
                    }
                } else {
                    line.push(b);
                }
            }
        }
    });
    (file, rx)
}

/// Lines until one satisfies `f` (bounded by 10 s); returns all lines read.
fn until(rx: &mpsc::Receiver<String>, what: &str, f: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let done = f(&l);
                seen.push(l);
                if done {
                    return seen;
                }
            }
            Err(_) => panic!("timed out waiting for {what}; got {seen:?}"),
        }
    }
}

#[test]
fn printloop_sim_answers_m110_and_requests_a_resend_on_a_bad_checksum() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("p0");
    let _sim = Sim(Command::new(env!("CARGO_BIN_EXE_printloop"))
        .args(["sim", "--link"])
        .arg(&link)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("printloop sim starts"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !link.exists() {
        assert!(Instant::now() < deadline, "the link never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (mut host, rx) = open_host(&link);
    until(&rx, "the start banner", |l| l == "start");

    host.write_all(b"N0 M110 N0*125\n").expect("write");
    until(&rx, "ok for M110", |l| l.starts_with("ok"));

    // Checksum of "N1 M105" is 38; send 40.
    assert_eq!(protocol::marlin::checksum(b"N1 M105"), 38);
    host.write_all(b"N1 M105*40\n").expect("write");
    let lines = until(&rx, "a resend request", |l| l.starts_with("Resend:"));
    assert!(
        lines.iter().any(|l| l.contains("checksum mismatch")),
        "{lines:?}"
    );
    assert!(lines.last().is_some_and(|l| l == "Resend: 1"), "{lines:?}");

    // The resent line with the right checksum is accepted.
    host.write_all(format!("{}\n", protocol::marlin::format_line(1, "M105")).as_bytes())
        .expect("write");
    until(&rx, "temperatures", |l| l.starts_with("ok T:"));
}
