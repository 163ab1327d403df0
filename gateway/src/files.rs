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

    /// Writes a verified chunk at `offset` of the partial file and syncs it to disk.
    pub fn store_chunk(&self, sha: &Sha256Hex, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.part(sha))?;
        f.seek(SeekFrom::Start(offset))?;
        f.write_all(data)?;
        // Drop anything past the chunk (a longer file from an earlier attempt).
        f.set_len(offset + data.len() as u64)?;
        f.sync_data()
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

/// Counts the G-code lines a host sends for a file (what the link's `gcode_lines` yields).
fn count_lines(path: &Path) -> Result<u64, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut n = 0u64;
    let mut reader = std::io::BufReader::new(f);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if read == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        if protocol::marlin::strip_comment(&text).is_some() {
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
        cache.store_chunk(&sha, 0, &file[..10]).expect("chunk");
        // A retried chunk at the same offset overwrites, it does not append.
        cache
            .store_chunk(&sha, 0, &file[..10])
            .expect("chunk again");
        cache.store_chunk(&sha, 10, &file[10..]).expect("rest");
        assert_eq!(cache.check(&sha), Ok(3));
        assert!(cache.path(&sha).exists());
        // Checking again works from the verified file.
        assert_eq!(cache.check(&sha), Ok(3));
        let other = Sha256Hex::digest(b"other");
        cache.store_chunk(&other, 0, b"not other").expect("chunk");
        assert!(cache
            .check(&other)
            .expect_err("mismatch")
            .contains("hashes to"));
        cache.remove(&other);
        assert!(cache.free_bytes().is_some_and(|b| b > 0));
    }
}
