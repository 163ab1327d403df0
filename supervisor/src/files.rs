//! Content-addressed G-code storage: uploads in (from the operator API), chunks out (to
//! gateways).
//!
//! On disk, under the directory given to [`FileStore::open`]:
//! - `files/<sha256>`: complete files whose content hashed to their name. Never modified.
//! - `uploads/<sha256>.part`: uploads in progress, contiguous from offset 0. The file's length
//!   **is** the progress, so an upload resumes after a restart with no other bookkeeping; the
//!   whole file is hashed again before it moves to `files/`, so a partial damaged by a crash is
//!   caught there.
//!
//! Everything streams through bounded buffers: no call reads a whole file into memory.
//! Plain blocking IO and no clock reads: the shell passes the time in and runs these calls
//! where blocking is fine, from any number of threads: uploads of the same file take turns
//! (a duplicate request racing its original cannot interleave writes or verify twice).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use protocol::files::{ChunkErrorCode, MAX_CHUNK_LEN};
use protocol::Sha256Hex;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::model::FileRecord;

/// Largest upload chunk, in bytes (decoded): the API's `upload_chunk` carries at most 64 KiB.
pub const MAX_UPLOAD_CHUNK: usize = 64 * 1024;

/// Default largest file accepted: 512 MiB.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 512 * 1024 * 1024;

/// Default free space kept on the file system beyond a whole upload: 64 MiB (for the database
/// and the logs that share it).
pub const DEFAULT_MIN_FREE_BYTES: u64 = 64 * 1024 * 1024;

/// An upload in progress is synced to disk each time it crosses a multiple of this.
const UPLOAD_SYNC_EVERY: u64 = 8 * 1024 * 1024;

/// Size of the buffer used when hashing a file.
const HASH_BUF: usize = 256 * 1024;

/// Upload locks, picked by the digest's first byte.
const LOCK_STRIPES: usize = 16;

/// Limits of the file store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileStoreConfig {
    /// Largest file accepted, in bytes.
    pub max_file_size: u64,
    /// An upload is refused unless the rest of it fits with this many bytes left free.
    pub min_free_bytes: u64,
}

impl Default for FileStoreConfig {
    fn default() -> Self {
        Self {
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
        }
    }
}

/// Where an upload stands after a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadProgress {
    /// Bytes stored so far, contiguous from 0.
    pub received: u64,
    /// The file's size.
    pub total_size: u64,
    /// Set once the whole file is stored and verified: the record to persist. For a file that
    /// was already complete before this call, `stored_at_ms` is this call's time too; keep the
    /// earlier record if there is one.
    pub complete: Option<FileRecord>,
}

/// A complete file on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    /// Its digest (and name).
    pub sha256: Sha256Hex,
    /// Its size.
    pub size_bytes: u64,
}

/// What went wrong with a file operation. Messages are meant for the operator.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// No complete file with that digest.
    #[error("file {sha} is not stored")]
    NotFound {
        /// The file.
        sha: Sha256Hex,
    },
    /// A chunk of 0 bytes or over the limit.
    #[error("a chunk must hold 1 to {max} bytes, not {len}")]
    ChunkLength {
        /// The length asked for or sent.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A range outside the file.
    #[error("bytes {offset}..+{len} are outside file {sha} of {total_size} bytes")]
    OutOfRange {
        /// The file.
        sha: Sha256Hex,
        /// Where the range starts.
        offset: u64,
        /// Its length.
        len: u64,
        /// The file's size.
        total_size: u64,
    },
    /// A chunk past the bytes received so far: chunks go in order.
    #[error(
        "upload of {sha}: chunk at offset {got} leaves a gap; {expected} bytes are stored, \
         send the chunk at offset {expected}"
    )]
    Gap {
        /// The file.
        sha: Sha256Hex,
        /// The offset that would be accepted: the bytes stored so far.
        expected: u64,
        /// The chunk's offset.
        got: u64,
    },
    /// A chunk that contradicts what was already stored; the partial upload is gone.
    #[error(
        "upload of {sha}: {reason}; the partial upload was discarded, send the file again from \
         offset 0"
    )]
    Conflict {
        /// The file.
        sha: Sha256Hex,
        /// What disagreed.
        reason: String,
    },
    /// Over the configured size limit.
    #[error("file {sha} of {total_size} bytes is larger than the limit of {max} bytes")]
    TooLarge {
        /// The file.
        sha: Sha256Hex,
        /// Its announced size.
        total_size: u64,
        /// The limit.
        max: u64,
    },
    /// The file is stored, with another size than announced.
    #[error("file {sha} is stored with {stored} bytes, not {total_size}")]
    SizeMismatch {
        /// The file.
        sha: Sha256Hex,
        /// The announced size.
        total_size: u64,
        /// The stored size.
        stored: u64,
    },
    /// Not enough free disk space for the rest of the upload.
    #[error(
        "no room for file {sha}: {needed} more bytes and {reserve} kept free are needed, \
         {free} bytes are free"
    )]
    NoSpace {
        /// The file.
        sha: Sha256Hex,
        /// Bytes still to be written.
        needed: u64,
        /// Bytes kept free.
        reserve: u64,
        /// Bytes free.
        free: u64,
    },
    /// The complete upload does not hash to its name; the partial upload is gone.
    #[error(
        "upload of {expected}: the received content hashes to {actual}; the partial upload was \
         discarded"
    )]
    Mismatch {
        /// The announced digest.
        expected: Sha256Hex,
        /// The digest of what was received.
        actual: Sha256Hex,
    },
    /// The supervisor's own disk failed.
    #[error("file store: {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

impl FileError {
    /// The code of a `file/chunk` error answer to a gateway.
    pub fn chunk_code(&self) -> ChunkErrorCode {
        match self {
            Self::NotFound { .. } => ChunkErrorCode::NotFound,
            Self::ChunkLength { .. } | Self::OutOfRange { .. } => ChunkErrorCode::BadRange,
            _ => ChunkErrorCode::Unavailable,
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The store: `files/` and `uploads/` under one directory. Clones share the upload locks.
#[derive(Debug, Clone)]
pub struct FileStore {
    files: PathBuf,
    uploads: PathBuf,
    config: FileStoreConfig,
    upload_locks: Arc<[Mutex<()>; LOCK_STRIPES]>,
}

impl FileStore {
    /// Uses (and creates) `dir/files` and `dir/uploads`, with the default limits.
    pub fn open(dir: &Path) -> io::Result<Self> {
        Self::open_with(dir, FileStoreConfig::default())
    }

    /// Uses (and creates) `dir/files` and `dir/uploads`, with `config`'s limits.
    pub fn open_with(dir: &Path, config: FileStoreConfig) -> io::Result<Self> {
        let files = dir.join("files");
        let uploads = dir.join("uploads");
        std::fs::create_dir_all(&files)?;
        std::fs::create_dir_all(&uploads)?;
        Ok(Self {
            files,
            uploads,
            config,
            upload_locks: Arc::new(std::array::from_fn(|_| Mutex::new(()))),
        })
    }

    /// The limits in force.
    pub fn config(&self) -> FileStoreConfig {
        self.config
    }

    /// The path of the complete file (whether or not it exists).
    pub fn path(&self, sha: &Sha256Hex) -> PathBuf {
        self.files.join(sha.as_str())
    }

    fn part(&self, sha: &Sha256Hex) -> PathBuf {
        self.uploads.join(format!("{sha}.part"))
    }

    /// Whether the complete, verified file is stored.
    pub fn has(&self, sha: &Sha256Hex) -> bool {
        self.path(sha).is_file()
    }

    /// Every complete file, by digest. Entries whose name is not a digest are skipped.
    pub fn list(&self) -> io::Result<Vec<StoredFile>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.files)? {
            let entry = entry?;
            let Some(sha) = entry
                .file_name()
                .to_str()
                .and_then(|n| Sha256Hex::new(n).ok())
            else {
                continue;
            };
            let meta = entry.metadata()?;
            if meta.is_file() {
                out.push(StoredFile {
                    sha256: sha,
                    size_bytes: meta.len(),
                });
            }
        }
        out.sort_by(|a, b| a.sha256.cmp(&b.sha256));
        Ok(out)
    }

    /// Where whole-file uploads wait while they arrive (same file system as the store).
    pub fn incoming_dir(&self) -> PathBuf {
        self.uploads.clone()
    }

    /// Bytes of an upload in progress stored so far (0 when there is none).
    pub fn upload_received(&self, sha: &Sha256Hex) -> Result<u64, FileError> {
        let part = self.part(sha);
        match std::fs::metadata(&part) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_err("reading", &part)(e)),
        }
    }

    /// Stores one chunk of an upload. Chunks must be contiguous: `offset` is the number of
    /// bytes stored so far (a chunk sent again at an earlier offset is accepted when it matches
    /// what is stored). When the last byte arrives the file is hashed; if it matches `sha` it
    /// becomes a complete file (the answer carries its record, stored at `now_ms`), otherwise
    /// the partial upload is discarded and the answer is [`FileError::Mismatch`].
    pub fn upload_chunk(
        &self,
        sha: &Sha256Hex,
        offset: u64,
        total_size: u64,
        data: &[u8],
        now_ms: u64,
    ) -> Result<UploadProgress, FileError> {
        let len = data.len() as u64;
        if data.is_empty() || data.len() > MAX_UPLOAD_CHUNK {
            return Err(FileError::ChunkLength {
                len,
                max: MAX_UPLOAD_CHUNK as u64,
            });
        }
        let end = match offset.checked_add(len) {
            Some(end) if end <= total_size => end,
            _ => {
                return Err(FileError::OutOfRange {
                    sha: sha.clone(),
                    offset,
                    len,
                    total_size,
                })
            }
        };
        if total_size > self.config.max_file_size {
            return Err(FileError::TooLarge {
                sha: sha.clone(),
                total_size,
                max: self.config.max_file_size,
            });
        }
        let first = sha.as_str().bytes().next().unwrap_or(0);
        let stripe = usize::from(first) % LOCK_STRIPES;
        // A panic while holding it left no state behind that the next call does not re-read.
        let _turn = self.upload_locks[stripe]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(stored) = self.complete_size(sha)? {
            if stored != total_size {
                return Err(FileError::SizeMismatch {
                    sha: sha.clone(),
                    total_size,
                    stored,
                });
            }
            return Ok(UploadProgress {
                received: total_size,
                total_size,
                complete: Some(FileRecord {
                    sha256: sha.clone(),
                    size_bytes: total_size,
                    stored_at_ms: now_ms,
                }),
            });
        }

        let part_path = self.part(sha);
        // Only a chunk at offset 0 starts an upload.
        let part = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(offset == 0)
            .truncate(false)
            .open(&part_path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(FileError::Gap {
                    sha: sha.clone(),
                    expected: 0,
                    got: offset,
                })
            }
            Err(e) => return Err(io_err("opening", &part_path)(e)),
        };
        let received = part
            .metadata()
            .map_err(io_err("reading", &part_path))?
            .len();
        if received > total_size {
            self.discard(sha);
            return Err(FileError::Conflict {
                sha: sha.clone(),
                reason: format!(
                    "{received} bytes were already stored, more than the total size {total_size}"
                ),
            });
        }
        if offset > received {
            return Err(FileError::Gap {
                sha: sha.clone(),
                expected: received,
                got: offset,
            });
        }
        if offset < received {
            // A chunk sent again: what overlaps must match what is stored.
            let overlap = (received.min(end) - offset) as usize;
            let mut stored = vec![0u8; overlap];
            part.read_exact_at(&mut stored, offset)
                .map_err(io_err("reading", &part_path))?;
            if stored != data[..overlap] {
                self.discard(sha);
                return Err(FileError::Conflict {
                    sha: sha.clone(),
                    reason: format!(
                        "the chunk at offset {offset} differs from the bytes already stored there"
                    ),
                });
            }
        }
        if end > received {
            let fresh = &data[(received - offset) as usize..];
            if let Err(e) = self.check_space(sha, total_size - received) {
                if received == 0 {
                    self.discard(sha);
                }
                return Err(e);
            }
            part.write_all_at(fresh, received)
                .map_err(io_err("writing", &part_path))?;
            // Synced every few MiB, not every chunk (a sync per 64 KiB held uploads to the
            // disk's sync rate); the whole file is synced and hashed before it counts, so a
            // crash that loses unsynced bytes costs a resend, never a wrong file.
            if received / UPLOAD_SYNC_EVERY != end / UPLOAD_SYNC_EVERY {
                part.sync_data().map_err(io_err("syncing", &part_path))?;
            }
        }
        let received = received.max(end);
        if received < total_size {
            return Ok(UploadProgress {
                received,
                total_size,
                complete: None,
            });
        }
        drop(part);
        self.finish(sha, total_size, now_ms)
    }

    /// Hashes a fully received upload and moves it into `files/`, or discards it.
    fn finish(
        &self,
        sha: &Sha256Hex,
        total_size: u64,
        now_ms: u64,
    ) -> Result<UploadProgress, FileError> {
        let part_path = self.part(sha);
        File::open(&part_path)
            .and_then(|f| f.sync_all())
            .map_err(io_err("syncing", &part_path))?;
        let actual = hash_file(&part_path)?;
        if &actual != sha {
            self.discard(sha);
            return Err(FileError::Mismatch {
                expected: sha.clone(),
                actual,
            });
        }
        let dest = self.path(sha);
        std::fs::rename(&part_path, &dest).map_err(io_err("storing", &dest))?;
        // Make the rename durable before the upload is reported complete.
        File::open(&self.files)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing", &self.files))?;
        Ok(UploadProgress {
            received: total_size,
            total_size,
            complete: Some(FileRecord {
                sha256: sha.clone(),
                size_bytes: total_size,
                stored_at_ms: now_ms,
            }),
        })
    }

    fn complete_size(&self, sha: &Sha256Hex) -> Result<Option<u64>, FileError> {
        let path = self.path(sha);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    }

    fn check_space(&self, sha: &Sha256Hex, needed: u64) -> Result<(), FileError> {
        let st = nix::sys::statvfs::statvfs(&self.uploads).map_err(|e| FileError::Io {
            op: "checking free space of",
            path: self.uploads.clone(),
            source: e.into(),
        })?;
        #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
        let free = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
        let reserve = self.config.min_free_bytes;
        if free < needed.saturating_add(reserve) {
            return Err(FileError::NoSpace {
                sha: sha.clone(),
                needed,
                reserve,
                free,
            });
        }
        Ok(())
    }

    /// Removes a partial upload; a missing one is fine, a failure is logged.
    fn discard(&self, sha: &Sha256Hex) {
        let part = self.part(sha);
        if let Err(e) = std::fs::remove_file(&part) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %part.display(), error = %e, "could not remove partial upload");
            }
        }
    }

    /// Reads `len` bytes (fewer at the end of the file) of a complete file from `offset`, for a
    /// gateway's `file/request`. Returns the bytes and the file's size.
    pub fn read_chunk(
        &self,
        sha: &Sha256Hex,
        offset: u64,
        len: u32,
    ) -> Result<(Vec<u8>, u64), FileError> {
        if len == 0 || len > MAX_CHUNK_LEN {
            return Err(FileError::ChunkLength {
                len: u64::from(len),
                max: u64::from(MAX_CHUNK_LEN),
            });
        }
        let path = self.path(sha);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(FileError::NotFound { sha: sha.clone() })
            }
            Err(e) => return Err(io_err("opening", &path)(e)),
        };
        let total = file.metadata().map_err(io_err("reading", &path))?.len();
        if offset >= total {
            return Err(FileError::OutOfRange {
                sha: sha.clone(),
                offset,
                len: u64::from(len),
                total_size: total,
            });
        }
        let n = u64::from(len).min(total - offset) as usize;
        let mut buf = vec![0u8; n];
        file.read_exact_at(&mut buf, offset)
            .map_err(io_err("reading", &path))?;
        Ok((buf, total))
    }
}

/// The sha256 of a file, read through a bounded buffer.
fn hash_file(path: &Path) -> Result<Sha256Hex, FileError> {
    let mut f = File::open(path).map_err(io_err("opening", path))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; HASH_BUF];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("hashing", path)(e)),
        };
        hasher.update(&buf[..n]);
    }
    Ok(Sha256Hex::from_digest(&hasher.finalize().into()))
}
