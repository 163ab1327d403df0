//! A minimal serial client over the simulator's pty, the way a host program opens a port:
//! open the device, raw mode, poll with a timeout before every read.
#![allow(dead_code)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};

pub struct Client {
    pub file: File,
    partial: Vec<u8>,
}

/// What a bounded read saw.
#[derive(Debug, PartialEq)]
pub enum Read1 {
    Line(String),
    Timeout,
    /// End of file or an IO error: the device went away.
    Gone,
}

impl Client {
    pub fn open(path: &Path) -> io::Result<Client> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc_o_noctty())
            .open(path)?;
        let mut t = tcgetattr(&file).map_err(io::Error::from)?;
        cfmakeraw(&mut t);
        tcsetattr(&file, SetArg::TCSANOW, &t).map_err(io::Error::from)?;
        Ok(Client {
            file,
            partial: Vec::new(),
        })
    }

    pub fn send(&mut self, text: &str) -> io::Result<()> {
        self.file.write_all(text.as_bytes())
    }

    pub fn send_line(&mut self, n: u32, cmd: &str) -> io::Result<()> {
        self.send(&format!("{}\n", protocol::marlin::format_line(n, cmd)))
    }

    /// The next line, waiting at most `timeout`.
    pub fn read_line(&mut self, timeout: Duration) -> Read1 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.partial.drain(..=i).collect();
                let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                return Read1::Line(text);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Read1::Timeout;
            }
            let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return Read1::Gone,
            }
            let mut buf = [0u8; 4096];
            match self.file.read(&mut buf) {
                Ok(0) => return Read1::Gone,
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Read1::Gone,
            }
        }
    }

    /// Lines up to and including the first matching `pred`; panics on timeout or EOF.
    pub fn expect(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_line(left) {
                Read1::Line(l) => {
                    let done = pred(&l);
                    got.push(l);
                    if done {
                        return got;
                    }
                }
                other => panic!("expected a line, got {other:?} after {got:?}"),
            }
        }
    }

    /// Reads the `start` banner through its last line.
    pub fn banner(&mut self) -> Vec<String> {
        let got = self.expect(Duration::from_secs(5), |l| l.starts_with("echo:V86"));
        assert_eq!(got.first().map(String::as_str), Some("start"), "{got:?}");
        got
    }

    /// Sends a numbered line and returns the lines through its `ok`.
    pub fn command(&mut self, n: u32, cmd: &str) -> Vec<String> {
        self.send_line(n, cmd).expect("write");
        self.expect(Duration::from_secs(5), |l| l.starts_with("ok"))
    }
}

fn libc_o_noctty() -> i32 {
    nix::fcntl::OFlag::O_NOCTTY.bits()
}
