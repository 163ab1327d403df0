//! Splits the bytes read from the serial port into lines for [`super::Link::on_line`], with a
//! bounded buffer: a line longer than the limit (a printer that never sends `\n`, a baud-rate
//! mismatch) is reported once as [`OVERLONG`] and skipped up to the next line break.

/// What [`LineFramer`] hands on in place of a line that exceeded the limit. It holds U+FFFD,
/// so the link counts it as a garbled line.
pub const OVERLONG: &str = "\u{fffd}<overlong line>";

/// Bytes in, lines out; memory bounded by `max_line` whatever arrives.
#[derive(Debug)]
pub struct LineFramer {
    line: Vec<u8>,
    max_line: usize,
    overlong: bool,
}

impl LineFramer {
    /// A framer that keeps at most `max_line` bytes of a line (at least 1).
    pub fn new(max_line: usize) -> Self {
        let max_line = max_line.max(1);
        Self {
            line: Vec::with_capacity(max_line.min(4096)),
            max_line,
            overlong: false,
        }
    }

    /// Feeds bytes; calls `on_line` with each complete line (without its `\n`; invalid UTF-8
    /// is replaced by U+FFFD).
    pub fn push(&mut self, bytes: &[u8], mut on_line: impl FnMut(&str)) {
        for &b in bytes {
            if b == b'\n' {
                if self.overlong {
                    self.overlong = false;
                    on_line(OVERLONG);
                } else {
                    on_line(&String::from_utf8_lossy(&self.line));
                }
                self.line.clear();
            } else if !self.overlong {
                if self.line.len() >= self.max_line {
                    self.overlong = true;
                    self.line.clear();
                } else {
                    self.line.push(b);
                }
            }
        }
    }

    /// Bytes of the current, unfinished line held (never more than `max_line`).
    pub fn buffered(&self) -> usize {
        self.line.len()
    }

    /// Forgets the unfinished line (the port was closed).
    pub fn clear(&mut self) {
        self.line.clear();
        self.overlong = false;
    }
}
