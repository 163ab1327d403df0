//! Log output shared by printloop's binaries: `tracing` to stderr, text or JSON, and every
//! line made safe to show.
//!
//! Outside text reaches the log all the time: job names, MQTT topics, client ids, firmware
//! lines, error reasons. `tracing-subscriber` escapes ANSI escapes in field values but not line
//! breaks, so a job name with `\n` could forge whole log lines (issue #10). [`SafeLines`]
//! escapes every control character of an event except its final newline, whatever field or
//! message it came from, and in dependencies' events too.

use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;

/// Starts logging to stderr (`RUST_LOG` filters; `info` by default). Colours only on a
/// terminal: journald, log files and the Pi's console get plain text.
pub fn init(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = io::IsTerminal::is_terminal(&io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(SafeLines::stderr(ansi))
        .with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A [`MakeWriter`] whose writers escape control characters (see [`escape_controls`]).
#[derive(Debug, Clone, Copy)]
pub struct SafeLines {
    /// The formatter's own colour codes are let through (ESC only; field values have theirs
    /// escaped by `tracing-subscriber`).
    keep_esc: bool,
}

impl SafeLines {
    /// For stderr; `ansi`: colours are on.
    pub fn stderr(ansi: bool) -> Self {
        Self { keep_esc: ansi }
    }
}

impl<'a> MakeWriter<'a> for SafeLines {
    type Writer = SafeWriter<io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        SafeWriter {
            inner: io::stderr(),
            keep_esc: self.keep_esc,
        }
    }
}

/// Writes each buffer (the formatter writes one event per call) with its control characters
/// escaped.
#[derive(Debug)]
pub struct SafeWriter<W> {
    inner: W,
    keep_esc: bool,
}

impl<W: Write> SafeWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W, keep_esc: bool) -> Self {
        Self { inner, keep_esc }
    }
}

impl<W: Write> Write for SafeWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write_all(&escape_controls(buf, self.keep_esc))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `buf` with every control character escaped except tabs and a final newline: `\n` and `\r`
/// become `\n` and `\r`, other C0 bytes and DEL `\xNN`, C1 characters (U+0080–U+009F)
/// `\u{NN}`. ESC is kept when `keep_esc` (the formatter's colours on a terminal). Bytes that
/// are not UTF-8 pass through.
pub fn escape_controls(buf: &[u8], keep_esc: bool) -> Vec<u8> {
    let (body, end) = match buf.split_last() {
        Some((b'\n', body)) => (body, &b"\n"[..]),
        _ => (buf, &b""[..]),
    };
    let mut out = Vec::with_capacity(buf.len() + 8);
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        match b {
            b'\t' => out.push(b),
            0x1b if keep_esc => out.push(b),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            0x00..=0x1f | 0x7f => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            0xc2 if body.get(i + 1).is_some_and(|c| (0x80..=0x9f).contains(c)) => {
                out.extend_from_slice(format!("\\u{{{:x}}}", body[i + 1]).as_bytes());
                i += 1;
            }
            _ => out.push(b),
        }
        i += 1;
    }
    out.extend_from_slice(end);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(s: &str) -> String {
        String::from_utf8(escape_controls(s.as_bytes(), false)).expect("utf-8")
    }

    #[test]
    fn line_breaks_and_escapes_cannot_forge_lines() {
        assert_eq!(
            esc("job ended name=cube\n2026 INFO forged\r\n"),
            "job ended name=cube\\n2026 INFO forged\\r\n"
        );
        assert_eq!(
            esc("a\x1b[2Jb\x07\x7f\u{9b}c\u{e9}\t\n"),
            "a\\x1b[2Jb\\x07\\x7f\\u{9b}c\u{e9}\t\n"
        );
        assert_eq!(esc(""), "");
        assert_eq!(
            escape_controls(b"\x1b[1mINFO\x1b[0m\n", true),
            b"\x1b[1mINFO\x1b[0m\n"
        );
        assert_eq!(escape_controls(b"\xff\xfe\n", false), b"\xff\xfe\n");
    }

    #[test]
    fn the_writer_escapes_whole_events() {
        let mut w = SafeWriter::new(Vec::new(), false);
        w.write_all(b"one\ntwo\n").expect("write");
        w.write_all(b"three\n").expect("write");
        assert_eq!(w.inner, b"one\\ntwo\nthree\n");
    }
}
