//! Is a file plain-text G-code? One streaming pass that also hashes it (sha256).
//!
//! [`Scanner`] is pure (bytes in, verdict out); [`inspect`] feeds it a file in 64 KiB blocks.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use protocol::marlin::strip_comment;
use protocol::Sha256Hex;
use sha2::{Digest as _, Sha256};

use super::OpsError;

/// The sample files built into the binary, which the demo and the chaos and adversarial runners
/// print (real slicer output, `assets/gcode/`).
pub const SAMPLES: [(&str, &[u8]); 2] = [
    (
        "cube20.gcode",
        include_bytes!("../../assets/gcode/cube20.gcode"),
    ),
    (
        "cylinder30.gcode",
        include_bytes!("../../assets/gcode/cylinder30.gcode"),
    ),
];

/// Bytes of each line kept to look for a command (G-code commands are short; the rest of a long
/// line is a comment or garbage and only scanned for NUL bytes).
const LINE_HEAD: usize = 256;

/// A G-code file, checked and hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcodeFile {
    /// Where it is.
    pub path: PathBuf,
    /// Its file name, the job's default name.
    pub name: String,
    /// Its SHA-256.
    pub sha256: Sha256Hex,
    /// Its size in bytes.
    pub size: u64,
    /// Lines with a command after stripping comments (what a printer would be sent).
    pub command_lines: u64,
}

/// Why bytes are not plain-text G-code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotGcode {
    /// No bytes at all.
    Empty,
    /// Prusa's binary G-code.
    BinaryGcode,
    /// A NUL byte: a binary file (or UTF-16 text, which no printer reads).
    Binary {
        /// Offset of the first NUL byte.
        offset: u64,
    },
    /// Text, but not one `G…` or `M…` command in it.
    NoCommands,
}

impl std::fmt::Display for NotGcode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotGcode::Empty => write!(f, "the file is empty"),
            NotGcode::BinaryGcode => write!(
                f,
                "it is binary G-code (.bgcode); export plain-text G-code instead"
            ),
            NotGcode::Binary { offset } => {
                write!(f, "it is a binary file (NUL byte at offset {offset})")
            }
            NotGcode::NoCommands => write!(
                f,
                "no G or M command in it (only comments, blank lines or other text)"
            ),
        }
    }
}

/// Streaming check: feed any split of the bytes, then [`finish`](Scanner::finish).
#[derive(Debug, Default)]
pub struct Scanner {
    offset: u64,
    head: Vec<u8>,
    magic: Vec<u8>,
    nul_at: Option<u64>,
    command_lines: u64,
    gm_lines: u64,
}

impl Scanner {
    /// Feeds the next bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.magic.len() < 4 {
            let want = (4 - self.magic.len()).min(bytes.len());
            self.magic.extend_from_slice(&bytes[..want]);
        }
        if self.nul_at.is_none() {
            if let Some(i) = bytes.iter().position(|&b| b == 0) {
                self.nul_at = Some(self.offset + i as u64);
            }
        }
        self.offset += bytes.len() as u64;
        if self.nul_at.is_some() {
            return;
        }
        let mut rest = bytes;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.push_head(&rest[..i]);
            self.end_line();
            rest = &rest[i + 1..];
        }
        self.push_head(rest);
    }

    fn push_head(&mut self, bytes: &[u8]) {
        let room = LINE_HEAD.saturating_sub(self.head.len());
        self.head.extend_from_slice(&bytes[..room.min(bytes.len())]);
    }

    fn end_line(&mut self) {
        let text = String::from_utf8_lossy(&self.head);
        if let Some(code) = strip_comment(&text) {
            self.command_lines += 1;
            if is_g_or_m(code) {
                self.gm_lines += 1;
            }
        }
        self.head.clear();
    }

    /// The verdict: the number of command lines, or why this is not G-code.
    pub fn finish(mut self) -> Result<u64, NotGcode> {
        if self.offset == 0 {
            return Err(NotGcode::Empty);
        }
        if self.magic == b"GCDE" {
            return Err(NotGcode::BinaryGcode);
        }
        if let Some(offset) = self.nul_at {
            return Err(NotGcode::Binary { offset });
        }
        if !self.head.is_empty() {
            self.end_line();
        }
        if self.gm_lines == 0 {
            return Err(NotGcode::NoCommands);
        }
        Ok(self.command_lines)
    }
}

/// `G28`, `g1 X5`, `M104 S200`, `N12 G1 X1`: a G or M letter followed by a number.
fn is_g_or_m(code: &str) -> bool {
    let code = match code.strip_prefix(['N', 'n']) {
        Some(rest) if rest.starts_with(|c: char| c.is_ascii_digit()) => rest
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start(),
        _ => code,
    };
    let mut chars = code.chars();
    matches!(chars.next(), Some('G' | 'g' | 'M' | 'm'))
        && chars.next().is_some_and(|c| c.is_ascii_digit())
}

/// Reads `path` once: checks it is plain-text G-code and hashes it.
pub fn inspect(path: &Path) -> Result<GcodeFile, OpsError> {
    let io = |source| OpsError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    if file.metadata().map_err(io)?.is_dir() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "it is a directory",
        )));
    }
    let mut hasher = Sha256::new();
    let mut scanner = Scanner::default();
    let mut size = 0u64;
    let mut buf = vec![0u8; super::CHUNK_SIZE];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        hasher.update(&buf[..n]);
        scanner.feed(&buf[..n]);
        size += n as u64;
    }
    let command_lines = scanner.finish().map_err(|why| OpsError::NotGcode {
        path: path.to_owned(),
        reason: why.to_string(),
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    Ok(GcodeFile {
        path: path.to_owned(),
        name,
        sha256: Sha256Hex::from_digest(&hasher.finalize().into()),
        size,
        command_lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(bytes: &[u8]) -> Result<u64, NotGcode> {
        let mut s = Scanner::default();
        s.feed(bytes);
        s.finish()
    }

    #[test]
    fn verdicts() {
        let cases: &[(&[u8], Result<u64, NotGcode>)] = &[
            (b"G28\nG1 X1", Ok(2)),
            (b"; generated\n\nM104 S200 ; heat\n  g1 x5\r\nT0\n", Ok(3)),
            (b"N10 G28*12\n", Ok(1)),
            (b"", Err(NotGcode::Empty)),
            (b"; only a comment\n\n", Err(NotGcode::NoCommands)),
            (b"hello world\nGx\n", Err(NotGcode::NoCommands)),
            (b"; G28 in a comment\n", Err(NotGcode::NoCommands)),
            (b"G28\n\x00\x01", Err(NotGcode::Binary { offset: 4 })),
            (b"GCDE\x01\x00\x00\x00", Err(NotGcode::BinaryGcode)),
            (
                b"\x89PNG\r\n\x1a\n\x00\x00",
                Err(NotGcode::Binary { offset: 8 }),
            ),
            (
                b"\xff\xfeG\x002\x008\x00",
                Err(NotGcode::Binary { offset: 3 }),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(&scan(input), want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn any_split_gives_the_same_verdict() {
        let text = b"; header\nG28 ; home\nM104 S215\n;end\nG1 X10 Y10 E1.5";
        let whole = scan(text);
        for cut in 0..text.len() {
            let mut s = Scanner::default();
            s.feed(&text[..cut]);
            s.feed(&text[cut..]);
            assert_eq!(s.finish(), whole, "split at {cut}");
        }
    }

    #[test]
    fn long_lines_are_bounded_and_still_checked() {
        let mut text = vec![b';'; 10_000];
        text.extend_from_slice(b"\nG28\n");
        assert_eq!(scan(&text), Ok(1));
        let mut s = Scanner::default();
        s.feed(&[b'x'; 100_000]);
        assert!(s.head.len() <= LINE_HEAD);
    }
}
