//! The file cache on disk: `<data_dir>/files/<sha256>` (verified) and `<sha256>.part` (being
//! received). Plain blocking IO, called from the shell only.

use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use protocol::Sha256Hex;
use sha2::Digest as _;

/// The cache directory.
#[derive(Debug, Clone)]
pub struct FileCache {
    dir: PathBuf,
}

impl FileCache {
    /// Uses (and creates) `dir`.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The verified file's path.
    pub fn path(&self, sha: &Sha256Hex) -> PathBuf {
        self.dir.join(sha.as_str())
    }

    fn part(&self, sha: &Sha256Hex) -> PathBuf {
        self.dir.join(format!("{sha}.part"))
    }

    /// The length of the partial file of `sha`, if there is one.
    pub fn part_len(&self, sha: &Sha256Hex) -> Option<u64> {
        std::fs::metadata(self.part(sha)).ok().map(|m| m.len())
    }

    /// Writes a verified chunk at `offset` of the partial file; with `sync`, makes the file
    /// durable up to the chunk's end (the machine syncs every few MiB, not every chunk).
    pub fn store_chunk(
        &self,
        sha: &Sha256Hex,
        offset: u64,
        data: &[u8],
        sync: bool,
    ) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.part(sha))?;
        f.seek(SeekFrom::Start(offset))?;
        f.write_all(data)?;
        // Drop anything past the chunk (a longer file from an earlier attempt).
        f.set_len(offset + data.len() as u64)?;
        if sync {
            f.sync_data()?;
        }
        Ok(())
    }

    /// Hashes the received file; when it matches its name it becomes the verified file.
    /// Returns the number of G-code lines (comments and blank lines stripped).
    pub fn check(&self, sha: &Sha256Hex) -> Result<u64, String> {
        let src = if self.part(sha).exists() {
            self.part(sha)
        } else {
            self.path(sha)
        };
        let mut f = std::fs::File::open(&src).map_err(|e| format!("{}: {e}", src.display()))?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| format!("{}: {e}", src.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let got = Sha256Hex::from_digest(&hasher.finalize().into());
        if &got != sha {
            return Err(format!("content hashes to {got}, not {sha}"));
        }
        if src != self.path(sha) {
            std::fs::rename(&src, self.path(sha)).map_err(|e| format!("rename: {e}"))?;
        }
        count_lines(&self.path(sha))
    }

    /// Deletes a file (verified or partial). Missing files are fine.
    pub fn remove(&self, sha: &Sha256Hex) {
        for p in [self.path(sha), self.part(sha)] {
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), error = %e, "could not remove cached file");
                }
            }
        }
    }

    /// Free bytes on the cache's file system.
    pub fn free_bytes(&self) -> Option<u64> {
        let st = nix::sys::statvfs::statvfs(&self.dir).ok()?;
        Some(st.blocks_available() as u64 * st.fragment_size() as u64)
    }
}

/// The longest line of a G-code file read into memory (comments included: slicers write long
/// configuration comments). Longer lines make the file unprintable, whatever they hold.
pub const MAX_FILE_LINE: usize = 1 << 20;

/// Reads one line (with its `\n`, if any) into `buf`, at most [`MAX_FILE_LINE`] bytes: a longer
/// line is an `InvalidData` error instead of an unbounded allocation. Returns the bytes read
/// (0 at the end).
pub fn read_gcode_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    buf.clear();
    let read = reader
        .take(MAX_FILE_LINE as u64 + 1)
        .read_until(b'\n', buf)?;
    if read > MAX_FILE_LINE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a line longer than {MAX_FILE_LINE} bytes"),
        ));
    }
    Ok(read)
}

/// Counts the G-code lines a host sends for a file (what the link's `gcode_lines` yields), and
/// checks that the printer can take every one of them: a file with a command the link would
/// refuse fails its check, before anything is printed, instead of stopping mid-print.
fn count_lines(path: &Path) -> Result<u64, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut n = 0u64;
    let mut reader = std::io::BufReader::new(f);
    let mut line = Vec::new();
    let mut at = 0u64;
    loop {
        at += 1;
        let read =
            read_gcode_line(&mut reader, &mut line).map_err(|e| format!("line {at}: {e}"))?;
        if read == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        if protocol::marlin::strip_comment(&text).is_some() {
            crate::link::check_command(&text).map_err(|e| format!("line {at}: {e}"))?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_resume_and_verify() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = FileCache::open(dir.path()).expect("open");
        let file = b"; comment\nG28\n\nG1 X1 ; move\nM104 S0\n";
        let sha = Sha256Hex::digest(file);
        cache
            .store_chunk(&sha, 0, &file[..10], true)
            .expect("chunk");
        // A retried chunk at the same offset overwrites, it does not append.
        cache
            .store_chunk(&sha, 0, &file[..10], false)
            .expect("chunk again");
        cache
            .store_chunk(&sha, 10, &file[10..], true)
            .expect("rest");
        assert_eq!(cache.check(&sha), Ok(3));
        assert!(cache.path(&sha).exists());
        // Checking again works from the verified file.
        assert_eq!(cache.check(&sha), Ok(3));
        let other = Sha256Hex::digest(b"other");
        cache
            .store_chunk(&other, 0, b"not other", true)
            .expect("chunk");
        assert!(cache
            .check(&other)
            .expect_err("mismatch")
            .contains("hashes to"));
        cache.remove(&other);
        assert!(cache.free_bytes().is_some_and(|b| b > 0));
    }

    fn check_of(file: &[u8]) -> Result<u64, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = FileCache::open(dir.path()).expect("open");
        let sha = Sha256Hex::digest(file);
        cache.store_chunk(&sha, 0, file, true).expect("chunk");
        cache.check(&sha)
    }

    #[test]
    fn a_command_the_printer_cannot_take_fails_the_check_naming_its_line() {
        let long = format!("G28\nM117 {}\nG1 X1\n", "x".repeat(200));
        let err = check_of(long.as_bytes()).expect_err("refused");
        assert!(err.starts_with("line 2: command too long"), "{err}");
        // A long comment is fine: slicers write those.
        let comment = format!("; {}\nG28 ; {}\n", "c".repeat(5000), "d".repeat(5000));
        assert_eq!(check_of(comment.as_bytes()), Ok(1));
    }

    #[test]
    fn a_line_past_the_memory_bound_fails_the_check() {
        let mut file = b"G28\n; ".to_vec();
        file.resize(MAX_FILE_LINE + 100, b'x');
        let err = check_of(&file).expect_err("refused");
        assert!(
            err.contains("line 2") && err.contains("longer than"),
            "{err}"
        );
    }
}
