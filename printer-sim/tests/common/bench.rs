//! A virtual-time test bench around the sans-IO core: a host that writes bytes and reads lines,
//! with the clock advanced from deadline to deadline. No sleeps, no IO.
#![allow(dead_code)]

use std::time::Duration;

use printer_sim::{Firmware, SimConfig};
use protocol::marlin;

/// A line the host received, with the virtual time its `\n` arrived.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Duration,
    pub text: String,
}

pub struct Bench {
    pub fw: Firmware,
    pub now: Duration,
    partial: Vec<u8>,
    pub raw: Vec<u8>,
    pub lines: Vec<Received>,
    cursor: usize,
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn secs(n: f64) -> Duration {
    Duration::from_secs_f64(n)
}

impl Bench {
    /// A board with `cfg`, opened by the host at t=0, banner consumed.
    pub fn new(cfg: SimConfig) -> Bench {
        let fw = Firmware::new(cfg).expect("valid config");
        let mut b = Bench {
            fw,
            now: Duration::ZERO,
            partial: Vec::new(),
            raw: Vec::new(),
            lines: Vec::new(),
            cursor: 0,
        };
        b.fw.host_opened(Duration::ZERO);
        b.wait_for("start banner", secs(5.0), |l| l.starts_with("echo:V86"));
        b
    }

    fn collect(&mut self) {
        if let Some(bytes) = self.fw.poll_output(self.now) {
            self.raw.extend_from_slice(&bytes);
            for b in bytes {
                if b == b'\n' {
                    let text = String::from_utf8_lossy(&self.partial).into_owned();
                    self.partial.clear();
                    self.lines.push(Received { at: self.now, text });
                } else {
                    self.partial.push(b);
                }
            }
        }
    }

    /// Advances to the next deadline (at most `limit`); false when nothing is scheduled.
    fn step_until(&mut self, limit: Duration) -> bool {
        match self.fw.next_deadline() {
            Some(t) if t <= limit => {
                self.now = t.max(self.now);
                self.collect();
                true
            }
            _ => false,
        }
    }

    /// Writes raw bytes at the current time (waiting while the host-side buffer is full).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let mut off = 0;
        let mut guard = 0;
        while off < bytes.len() {
            off += self.fw.receive(self.now, &bytes[off..]);
            if off < bytes.len() {
                let limit = self.now + secs(3600.0);
                assert!(self.step_until(limit), "wire stuck");
            }
            guard += 1;
            assert!(guard < 10_000_000, "send_raw does not progress");
        }
    }

    /// Writes `N<n> <cmd>*<cs>\n`.
    pub fn send_line(&mut self, n: u32, cmd: &str) {
        let line = format!("{}\n", marlin::format_line(n, cmd));
        self.send_raw(line.as_bytes());
    }

    /// Writes an unnumbered command.
    pub fn send_plain(&mut self, cmd: &str) {
        self.send_raw(format!("{cmd}\n").as_bytes());
    }

    /// Lets virtual time run for `d`.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        let mut guard = 0u64;
        while self.step_until(end) {
            guard += 1;
            assert!(guard < 50_000_000, "run_for does not progress");
        }
        self.now = end;
        self.collect();
    }

    /// Runs until a not-yet-consumed line satisfies `pred`; returns the new lines up to and
    /// including it (and consumes them). Panics after `limit` of virtual time.
    pub fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Vec<Received> {
        let end = self.now + limit;
        let mut guard = 0u64;
        loop {
            if let Some(i) = self.lines[self.cursor..].iter().position(|l| pred(&l.text)) {
                let upto = self.cursor + i + 1;
                let got = self.lines[self.cursor..upto].to_vec();
                self.cursor = upto;
                return got;
            }
            if !self.step_until(end) {
                panic!(
                    "no line matching {what} within {limit:?}; got {:?}",
                    self.lines[self.cursor..]
                        .iter()
                        .map(|l| l.text.as_str())
                        .collect::<Vec<_>>()
                );
            }
            guard += 1;
            assert!(guard < 50_000_000, "wait_for does not progress");
        }
    }

    /// Texts of `wait_for`.
    pub fn expect(&mut self, limit: Duration, pred: impl Fn(&str) -> bool) -> Vec<String> {
        self.wait_for("expected line", limit, pred)
            .into_iter()
            .map(|l| l.text)
            .collect()
    }

    /// Sends a numbered line and returns the lines up to its `ok`.
    pub fn command(&mut self, n: u32, cmd: &str) -> Vec<String> {
        self.send_line(n, cmd);
        self.expect(secs(600.0), |l| l.starts_with("ok"))
    }

    /// New lines not consumed yet (consumes them).
    pub fn take(&mut self) -> Vec<String> {
        let got = self.lines[self.cursor..]
            .iter()
            .map(|l| l.text.clone())
            .collect();
        self.cursor = self.lines.len();
        got
    }
}
