//! Content-addressed file storage: chunked uploads (in order, resent, resumed, wrong), serving
//! chunks to gateways, and a large file that is never held in memory whole.

use protocol::files::{ChunkErrorCode, MAX_CHUNK_LEN};
use protocol::Sha256Hex;
use sha2::Digest as _;
use supervisor::files::{
    FileError, FileStore, FileStoreConfig, StoredFile, UploadProgress, MAX_UPLOAD_CHUNK,
};
use supervisor::model::FileRecord;

/// Some G-code-like bytes.
fn gcode(lines: usize) -> Vec<u8> {
    (0..lines)
        .map(|i| {
            format!(
                "G1 X{} Y{} E{:.3}\n",
                i % 200,
                (i * 7) % 200,
                i as f64 * 0.01
            )
        })
        .collect::<String>()
        .into_bytes()
}

fn sha(data: &[u8]) -> Sha256Hex {
    Sha256Hex::digest(data)
}

fn parts(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir.join("uploads"))
        .expect("uploads dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

/// Uploads `data` from `from` in chunks of `chunk`; returns the last answer.
fn upload_from(
    fs: &FileStore,
    data: &[u8],
    from: usize,
    chunk: usize,
    now: u64,
) -> Result<UploadProgress, FileError> {
    let digest = sha(data);
    let mut last = None;
    let mut off = from;
    while off < data.len() {
        let end = (off + chunk).min(data.len());
        last =
            Some(fs.upload_chunk(&digest, off as u64, data.len() as u64, &data[off..end], now)?);
        off = end;
    }
    Ok(last.expect("at least one chunk"))
}

#[test]
fn chunks_out_of_order_are_refused_then_in_order_complete_and_verified() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = FileStore::open(dir.path()).expect("open");
    let data = gcode(10_000);
    assert!(data.len() > 3 * 4096);
    let digest = sha(&data);
    let total = data.len() as u64;

    // The second chunk first: nothing is stored yet, so offset 0 is expected.
    let err = fs
        .upload_chunk(&digest, 4096, total, &data[4096..8192], 1)
        .expect_err("gap");
    assert!(
        matches!(
            err,
            FileError::Gap {
                expected: 0,
                got: 4096,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("send the chunk at offset 0"),
        "{err}"
    );
    assert!(
        parts(dir.path()).is_empty(),
        "a refused chunk leaves nothing"
    );

    let p = fs
        .upload_chunk(&digest, 0, total, &data[..4096], 1)
        .expect("first");
    assert_eq!(
        p,
        UploadProgress {
            received: 4096,
            total_size: total,
            complete: None
        }
    );
    // Skipping a chunk says where to continue.
    let err = fs
        .upload_chunk(&digest, 8192, total, &data[8192..12288], 1)
        .expect_err("gap");
    assert!(
        matches!(
            err,
            FileError::Gap {
                expected: 4096,
                got: 8192,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(fs.upload_received(&digest).expect("received"), 4096);
    assert!(!fs.has(&digest));

    let done = upload_from(&fs, &data, 4096, 4096, 77).expect("rest");
    assert_eq!(
        done,
        UploadProgress {
            received: total,
            total_size: total,
            complete: Some(FileRecord {
                sha256: digest.clone(),
                size_bytes: total,
                stored_at_ms: 77,
            }),
        }
    );
    assert!(fs.has(&digest));
    assert!(
        parts(dir.path()).is_empty(),
        "the partial moved into files/"
    );
    assert_eq!(std::fs::read(fs.path(&digest)).expect("read"), data);
    assert_eq!(
        fs.list().expect("list"),
        vec![StoredFile {
            sha256: digest.clone(),
            size_bytes: total,
        }]
    );

    // Uploading a file that is already stored answers complete at once.
    let again = fs
        .upload_chunk(&digest, 0, total, &data[..100], 99)
        .expect("already stored");
    assert_eq!(again.received, total);
    assert_eq!(again.complete.map(|r| r.size_bytes), Some(total));
    let err = fs
        .upload_chunk(&digest, 0, total + 1, &data[..100], 99)
        .expect_err("wrong size");
    assert!(matches!(err, FileError::SizeMismatch { .. }), "{err:?}");
}

#[test]
fn a_resent_chunk_is_accepted_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = FileStore::open(dir.path()).expect("open");
    let data = gcode(2000);
    let digest = sha(&data);
    let total = data.len() as u64;
    fs.upload_chunk(&digest, 0, total, &data[..1000], 1)
        .expect("first");
    fs.upload_chunk(&digest, 1000, total, &data[1000..2000], 1)
        .expect("second");
    // The answer to the second chunk was lost; the client sends it again.
    let p = fs
        .upload_chunk(&digest, 1000, total, &data[1000..2000], 1)
        .expect("resent");
    assert_eq!(p.received, 2000, "not appended twice");
    // An earlier chunk that overlaps the end adds only the new bytes.
    let p = fs
        .upload_chunk(&digest, 1500, total, &data[1500..3000], 1)
        .expect("overlapping");
    assert_eq!(p.received, 3000);
    let done = upload_from(&fs, &data, 3000, 1000, 5).expect("rest");
    assert!(done.complete.is_some());
    assert_eq!(std::fs::read(fs.path(&digest)).expect("read"), data);
    // The last chunk sent again after completion: still complete.
    let last = data.len() - 10;
    let p = fs
        .upload_chunk(&digest, last as u64, total, &data[last..], 6)
        .expect("resent last");
    assert!(p.complete.is_some());
}

#[test]
fn a_resent_chunk_that_differs_discards_the_partial() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = FileStore::open(dir.path()).expect("open");
    let data = gcode(2000);
    let digest = sha(&data);
    let total = data.len() as u64;
    fs.upload_chunk(&digest, 0, total, &data[..1000], 1)
        .expect("first");
    let mut other = data[..1000].to_vec();
    other[500] ^= 1;
    let err = fs
        .upload_chunk(&digest, 0, total, &other, 1)
        .expect_err("conflict");
    assert!(matches!(err, FileError::Conflict { .. }), "{err:?}");
    assert!(err.to_string().contains("from offset 0"), "{err}");
    assert_eq!(fs.upload_received(&digest).expect("received"), 0);
    // Starting over works.
    assert!(upload_from(&fs, &data, 0, 1000, 2)
        .expect("again")
        .complete
        .is_some());
}

#[test]
fn wrong_content_is_rejected_and_the_partial_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = FileStore::open(dir.path()).expect("open");
    let data = gcode(3000);
    let claimed = sha(b"something else entirely");
    let total = data.len() as u64;
    let mut off = 0;
    let mut result = None;
    while off < data.len() {
        let end = (off + 8192).min(data.len());
        result = Some(fs.upload_chunk(&claimed, off as u64, total, &data[off..end], 1));
        off = end;
        if off < data.len() {
            assert!(result.as_ref().is_some_and(|r| r.is_ok()));
        }
    }
    let err = result.expect("sent").expect_err("mismatch");
    match &err {
        FileError::Mismatch { expected, actual } => {
            assert_eq!(expected, &claimed);
            assert_eq!(actual, &sha(&data));
        }
        other => panic!("expected Mismatch, got {other:?}"),
    }
    assert!(err.to_string().contains("discarded"), "{err}");
    assert!(parts(dir.path()).is_empty());
    assert!(!fs.has(&claimed));
    assert!(fs.list().expect("list").is_empty());
}

#[test]
fn uploads_resume_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = gcode(5000);
    let digest = sha(&data);
    let total = data.len() as u64;
    {
        let fs = FileStore::open(dir.path()).expect("open");
        fs.upload_chunk(&digest, 0, total, &data[..10_000], 1)
            .expect("first");
        fs.upload_chunk(&digest, 10_000, total, &data[10_000..20_000], 1)
            .expect("second");
    }
    let fs = FileStore::open(dir.path()).expect("reopen");
    assert_eq!(fs.upload_received(&digest).expect("received"), 20_000);
    let err = fs
        .upload_chunk(&digest, 0, total, &data[..10], 2)
        .map(|p| p.received);
    assert_eq!(err.expect("an old chunk is still fine"), 20_000);
    let done = upload_from(&fs, &data, 20_000, 10_000, 3).expect("rest");
    assert_eq!(done.complete.map(|r| r.stored_at_ms), Some(3));
    assert_eq!(std::fs::read(fs.path(&digest)).expect("read"), data);
}

#[test]
fn a_partial_completed_before_a_crash_is_verified_by_the_next_chunk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = gcode(1000);
    let digest = sha(&data);
    // As if the process died after writing the last bytes but before verifying them.
    std::fs::create_dir_all(dir.path().join("uploads")).expect("mkdir");
    std::fs::write(
        dir.path().join("uploads").join(format!("{digest}.part")),
        &data,
    )
    .expect("write");
    let fs = FileStore::open(dir.path()).expect("open");
    let last = data.len() - 100;
    let p = fs
        .upload_chunk(&digest, last as u64, data.len() as u64, &data[last..], 9)
        .expect("last chunk again");
    assert!(p.complete.is_some());
    assert!(fs.has(&digest));
}

#[test]
fn bad_chunks_and_limits_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = FileStore::open_with(
        dir.path(),
        FileStoreConfig {
            max_file_size: 1000,
            ..FileStoreConfig::default()
        },
    )
    .expect("open");
    let digest = sha(b"x");
    let big = vec![b'G'; MAX_UPLOAD_CHUNK + 1];
    for (offset, total, data, what) in [
        (0, 10, &b""[..], "empty chunk"),
        (0, 1 << 20, &big[..], "chunk over 64 KiB"),
        (5, 10, &b"0123456789"[..], "past total"),
        (u64::MAX, u64::MAX, &b"12"[..], "offset overflow"),
    ] {
        let err = fs
            .upload_chunk(&digest, offset, total, data, 1)
            .expect_err(what);
        assert!(
            matches!(
                err,
                FileError::ChunkLength { .. } | FileError::OutOfRange { .. }
            ),
            "{what}: {err:?}"
        );
    }
    let err = fs
        .upload_chunk(&digest, 0, 1001, b"x", 1)
        .expect_err("too large");
    assert!(
        matches!(
            err,
            FileError::TooLarge {
                total_size: 1001,
                max: 1000,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(parts(dir.path()).is_empty());

    // Not enough room once the kept-free reserve is counted.
    let fs = FileStore::open_with(
        dir.path(),
        FileStoreConfig {
            max_file_size: u64::MAX,
            min_free_bytes: u64::MAX / 2,
        },
    )
    .expect("open");
    let err = fs
        .upload_chunk(&digest, 0, 10, b"0123", 1)
        .expect_err("no space");
    assert!(
        matches!(err, FileError::NoSpace { needed: 10, .. }),
        "{err:?}"
    );
    assert!(parts(dir.path()).is_empty(), "nothing left behind");
}

#[test]
fn read_chunk_serves_ranges_and_maps_errors_to_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = FileStore::open(dir.path()).expect("open");
    let data = gcode(10_000);
    let digest = sha(&data);
    let total = data.len() as u64;
    upload_from(&fs, &data, 0, MAX_UPLOAD_CHUNK, 1).expect("upload");

    let (chunk, t) = fs.read_chunk(&digest, 0, 100).expect("start");
    assert_eq!((chunk.as_slice(), t), (&data[..100], total));
    let (chunk, _) = fs.read_chunk(&digest, 1234, MAX_CHUNK_LEN).expect("middle");
    assert_eq!(chunk, &data[1234..1234 + MAX_CHUNK_LEN as usize]);
    let (chunk, _) = fs
        .read_chunk(&digest, total - 10, MAX_CHUNK_LEN)
        .expect("short at the end");
    assert_eq!(chunk, &data[data.len() - 10..]);

    let code = |r: Result<(Vec<u8>, u64), FileError>| r.expect_err("must fail").chunk_code();
    assert_eq!(
        code(fs.read_chunk(&digest, total, 1)),
        ChunkErrorCode::BadRange
    );
    assert_eq!(
        code(fs.read_chunk(&digest, u64::MAX, 1)),
        ChunkErrorCode::BadRange
    );
    assert_eq!(code(fs.read_chunk(&digest, 0, 0)), ChunkErrorCode::BadRange);
    assert_eq!(
        code(fs.read_chunk(&digest, 0, MAX_CHUNK_LEN + 1)),
        ChunkErrorCode::BadRange
    );
    assert_eq!(
        code(fs.read_chunk(&sha(b"not stored"), 0, 1)),
        ChunkErrorCode::NotFound
    );
    // A partial upload is not served.
    let partial = gcode(100);
    let psha = sha(&partial);
    fs.upload_chunk(&psha, 0, partial.len() as u64, &partial[..10], 1)
        .expect("partial");
    assert_eq!(code(fs.read_chunk(&psha, 0, 1)), ChunkErrorCode::NotFound);
    // The store's own disk failing is `unavailable`.
    std::fs::create_dir(fs.path(&sha(b"a directory"))).expect("mkdir");
    let err = fs
        .read_chunk(&sha(b"a directory"), 0, 1)
        .expect_err("a directory is not a file");
    assert_eq!(err.chunk_code(), ChunkErrorCode::Unavailable, "{err:?}");
    assert!(!fs.has(&sha(b"a directory")));
}

/// A deterministic 20 MB file, produced one chunk at a time.
struct Big {
    total: u64,
}

impl Big {
    fn chunk(&self, offset: u64, len: usize) -> Vec<u8> {
        (offset..(offset + len as u64).min(self.total))
            .map(|i| {
                let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 59;
                b"G01XYZEF0123456789 ;\n.-+"[x as usize % 24]
            })
            .collect()
    }

    fn sha(&self) -> Sha256Hex {
        let mut h = sha2::Sha256::new();
        let mut off = 0;
        while off < self.total {
            h.update(self.chunk(off, 1 << 20));
            off += 1 << 20;
        }
        Sha256Hex::from_digest(&h.finalize().into())
    }
}

#[test]
fn twenty_megabytes_round_trip_chunk_by_chunk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = FileStore::open(dir.path()).expect("open");
    let big = Big {
        total: 20 * 1000 * 1000 + 17,
    };
    let digest = big.sha();
    let mut off = 0u64;
    let mut last = None;
    while off < big.total {
        let data = big.chunk(off, MAX_UPLOAD_CHUNK);
        let p = fs
            .upload_chunk(&digest, off, big.total, &data, 42)
            .expect("chunk");
        off += data.len() as u64;
        assert_eq!(p.received, off);
        last = Some(p);
    }
    assert_eq!(
        last.and_then(|p| p.complete),
        Some(FileRecord {
            sha256: digest.clone(),
            size_bytes: big.total,
            stored_at_ms: 42,
        })
    );

    // Served back the way a gateway pulls it, and hashed as it comes.
    let mut h = sha2::Sha256::new();
    let mut off = 0u64;
    while off < big.total {
        let (chunk, total) = fs.read_chunk(&digest, off, MAX_CHUNK_LEN).expect("read");
        assert_eq!(total, big.total);
        assert!(!chunk.is_empty() && chunk.len() <= MAX_CHUNK_LEN as usize);
        if off % (4 << 20) == 0 {
            assert_eq!(chunk, big.chunk(off, chunk.len()), "at {off}");
        }
        h.update(&chunk);
        off += chunk.len() as u64;
    }
    assert_eq!(Sha256Hex::from_digest(&h.finalize().into()), digest);
}

#[test]
fn duplicate_uploads_racing_from_many_threads_all_succeed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = FileStore::open(dir.path()).expect("open");
    let data = gcode(40_000);
    let digest = sha(&data);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let fs = fs.clone();
                let data = &data;
                // Each thread sends every chunk in order, as a client whose answers were lost
                // would: behind the others its chunks are resends, never gaps.
                scope.spawn(move || upload_from(&fs, data, 0, 16 * 1024, 1))
            })
            .collect();
        for h in handles {
            let last = h.join().expect("thread").expect("every chunk accepted");
            assert!(last.complete.is_some());
        }
    });
    assert_eq!(std::fs::read(fs.path(&digest)).expect("read"), data);
    assert!(parts(dir.path()).is_empty());
}
