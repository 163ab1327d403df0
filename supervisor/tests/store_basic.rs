//! The supervisor's redb store: reopen, listing order, request pruning, and refusing files it
//! must not use.

use std::path::Path;

use protocol::api::JobState;
use protocol::{JobId, PrinterId, Sha256Hex};
use redb::{Database, TableDefinition};
use supervisor::model::{FileRecord, JobRecord, Mutation, PrinterRecord, Snapshot};
use supervisor::store::{Store, StoreError, FORMAT_VERSION, REQUEST_MEMORY};

fn job(n: u64, priority: i32, state: JobState) -> JobRecord {
    JobRecord {
        job_id: JobId::new(format!("j-{n:06}")).expect("job id"),
        name: format!("part-{n}.gcode"),
        sha256: Sha256Hex::digest(b"cube"),
        size_bytes: 1234,
        priority,
        seq: n,
        tags: vec!["pla".into()],
        state,
        printer: None,
        retry_of: None,
        attempt: 0,
        progress_pct: None,
        submitted_at_ms: 1000 + n,
        assigned_at_ms: None,
        started_at_ms: None,
        ended_at_ms: None,
        reason: None,
    }
}

fn ended(n: u64, state: JobState, at: u64) -> JobRecord {
    JobRecord {
        ended_at_ms: Some(at),
        ..job(n, 0, state)
    }
}

fn ids(jobs: &[JobRecord]) -> Vec<&str> {
    jobs.iter().map(|j| j.job_id.as_str()).collect()
}

fn open(path: &Path) -> Store {
    Store::open(path).expect("open store")
}

#[test]
fn new_store_is_empty_with_next_job_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(&dir.path().join("sv.redb"));
    let snap = s.load().expect("load");
    assert_eq!(
        snap,
        Snapshot {
            next_job: 1,
            ..Snapshot::default()
        }
    );
    assert!(s.jobs_page(true, 10).expect("page").is_empty());
}

#[test]
fn survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sv.redb");
    let printer = PrinterRecord {
        printer_id: PrinterId::new("p0").expect("printer id"),
        tags: vec!["pla".into(), "0.4".into()],
        held: true,
        consecutive_failures: 3,
        assigned: Some(JobId::new("j-000002").expect("job id")),
        first_seen_ms: 7,
        start_sent: None,
    };
    let file = FileRecord {
        sha256: Sha256Hex::digest(b"cube"),
        size_bytes: 1234,
        stored_at_ms: 99,
    };
    let mut printing = job(2, 5, JobState::Printing);
    printing.progress_pct = Some(43.625);
    printing.printer = Some(printer.printer_id.clone());
    let before = {
        let s = open(&path);
        s.apply(&[
            Mutation::SetEpoch(4),
            Mutation::SetNextJob(4),
            Mutation::PutJob(job(1, 0, JobState::Queued)),
            Mutation::PutJob(printing.clone()),
            Mutation::PutJob(ended(3, JobState::Done, 5000)),
            Mutation::PutPrinter(printer.clone()),
            Mutation::PutFile(file.clone()),
            Mutation::PutRequest {
                key: "cli/r1".into(),
                response: b"{\"ok\":true}".to_vec(),
                at_ms: 10,
            },
        ])
        .expect("apply");
        s.load().expect("load")
    };
    let s = open(&path);
    let after = s.load().expect("load after reopen");
    assert_eq!(after, before);
    assert_eq!(after.epoch, 4);
    assert_eq!(after.next_job, 4);
    assert_eq!(ids(&after.jobs), ["j-000002", "j-000001", "j-000003"]);
    assert_eq!(after.jobs[0], printing);
    assert_eq!(after.printers, vec![printer]);
    assert_eq!(after.files, vec![file]);
    assert_eq!(
        after.requests,
        vec![("cli/r1".to_owned(), b"{\"ok\":true}".to_vec())]
    );
    assert_eq!(
        s.request("cli/r1").expect("request"),
        Some(b"{\"ok\":true}".to_vec())
    );
    assert_eq!(
        s.job(&JobId::new("j-000002").expect("id")).expect("job"),
        Some(printing)
    );
    assert_eq!(s.job(&JobId::new("j-9").expect("id")).expect("job"), None);
}

#[test]
fn jobs_page_lists_dispatch_order_then_history_newest_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(&dir.path().join("sv.redb"));
    s.apply(&[
        Mutation::PutJob(job(1, 0, JobState::Queued)),
        Mutation::PutJob(job(2, 10, JobState::Queued)),
        Mutation::PutJob(job(3, -3, JobState::Queued)),
        Mutation::PutJob(job(4, 10, JobState::Printing)),
        Mutation::PutJob(job(5, 0, JobState::Failed)), // still the queue's business
        Mutation::PutJob(ended(6, JobState::Done, 300)),
        Mutation::PutJob(ended(7, JobState::Cancelled, 900)),
        Mutation::PutJob(ended(8, JobState::Done, 600)),
    ])
    .expect("apply");
    let open_ids = ["j-000002", "j-000004", "j-000001", "j-000005", "j-000003"];
    assert_eq!(ids(&s.jobs_page(false, 100).expect("page")), open_ids);
    let all = s.jobs_page(true, 100).expect("page");
    assert_eq!(
        ids(&all),
        [&open_ids[..], &["j-000007", "j-000008", "j-000006"]].concat()
    );
    assert_eq!(
        ids(&s.jobs_page(true, 2).expect("page")),
        ["j-000002", "j-000004"]
    );
    assert_eq!(
        ids(&s.jobs_page(true, 6).expect("page")),
        [&open_ids[..], &["j-000007"]].concat()
    );
    assert!(s.jobs_page(true, 0).expect("page").is_empty());

    // Changing a job moves it: a new priority reorders the queue, an end moves it to history.
    s.apply(&[
        Mutation::PutJob(job(3, 20, JobState::Queued)),
        Mutation::PutJob(ended(2, JobState::Cancelled, 1000)),
    ])
    .expect("apply");
    assert_eq!(
        ids(&s.jobs_page(true, 100).expect("page")),
        [
            "j-000003", "j-000004", "j-000001", "j-000005", "j-000002", "j-000007", "j-000008",
            "j-000006"
        ]
    );
    assert_eq!(
        s.load().expect("load").jobs.len(),
        8,
        "no duplicate index entries"
    );
}

#[test]
fn remembered_requests_are_bounded_newest_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(&dir.path().join("sv.redb"));
    let extra = 10u64;
    // Out of time order, over two transactions.
    let muts: Vec<Mutation> = (0..REQUEST_MEMORY as u64 + extra)
        .rev()
        .map(|i| Mutation::PutRequest {
            key: format!("cli/r{i}"),
            response: i.to_be_bytes().to_vec(),
            at_ms: i,
        })
        .collect();
    let (a, b) = muts.split_at(100);
    s.apply(b).expect("apply");
    s.apply(a).expect("apply");
    let snap = s.load().expect("load");
    assert_eq!(snap.requests.len(), REQUEST_MEMORY);
    assert_eq!(snap.requests[0].0, format!("cli/r{extra}"), "oldest kept");
    assert_eq!(
        snap.requests.last().map(|r| r.0.clone()),
        Some(format!("cli/r{}", REQUEST_MEMORY as u64 + extra - 1))
    );
    for i in 0..extra {
        assert_eq!(s.request(&format!("cli/r{i}")).expect("read"), None);
    }
    // Re-answering an old key moves it to its new time, without leaving the old entry behind.
    s.apply(&[Mutation::PutRequest {
        key: format!("cli/r{extra}"),
        response: b"again".to_vec(),
        at_ms: 1_000_000,
    }])
    .expect("apply");
    let snap = s.load().expect("load");
    assert_eq!(snap.requests.len(), REQUEST_MEMORY);
    assert_eq!(
        snap.requests.last(),
        Some(&(format!("cli/r{extra}"), b"again".to_vec()))
    );
    assert_eq!(snap.requests[0].0, format!("cli/r{}", extra + 1));
}

#[test]
fn garbage_file_is_a_clear_error_and_is_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sv.redb");
    let junk = b"this is not a redb file at all, just some bytes".repeat(100);
    std::fs::write(&path, &junk).expect("write");
    let err = Store::open(&path).expect_err("must fail");
    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("supervisor database"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert_eq!(std::fs::read(&path).expect("read"), junk, "file untouched");
}

#[test]
fn damaged_redb_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sv.redb");
    {
        let s = open(&path);
        let muts: Vec<Mutation> = (1..200)
            .map(|n| Mutation::PutJob(job(n, 0, JobState::Queued)))
            .collect();
        s.apply(&muts).expect("apply");
    }
    let pristine = std::fs::read(&path).expect("read");
    // Scribble over 512 bytes at a time, all through the file, each in its own copy.
    let mut refused = 0;
    for (i, at) in (0..pristine.len()).step_by(8192).enumerate() {
        let mut bytes = pristine.clone();
        let end = (at + 512).min(bytes.len());
        for b in &mut bytes[at..end] {
            *b ^= 0x5a;
        }
        let copy = dir.path().join(format!("damaged-{i}.redb"));
        std::fs::write(&copy, &bytes).expect("write");
        match Store::open(&copy).and_then(|s| s.load()) {
            Err(e) => {
                refused += 1;
                assert!(e.to_string().contains(&copy.display().to_string()), "{e}");
            }
            // The scribble hit free space only: then everything must still be there.
            Ok(snap) => assert_eq!(snap.jobs.len(), 199, "at {at}"),
        }
        std::fs::remove_file(&copy).expect("remove");
    }
    assert!(refused > 0, "some damage was detected");
}

#[test]
fn newer_format_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sv.redb");
    drop(open(&path));
    {
        const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
        let db = Database::create(&path).expect("raw open");
        let tx = db.begin_write().expect("begin");
        {
            let mut meta = tx.open_table(META).expect("meta");
            let newer = (FORMAT_VERSION + 1).to_string();
            meta.insert("format", newer.as_bytes()).expect("insert");
        }
        tx.commit().expect("commit");
    }
    let err = Store::open(&path).expect_err("must refuse");
    assert!(
        matches!(err, StoreError::Format { found, .. } if found == FORMAT_VERSION + 1),
        "{err:?}"
    );
    assert!(err.to_string().contains("newer"), "{err}");
}

#[test]
fn a_redb_file_of_something_else_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.redb");
    {
        // What a gateway's store looks like: a meta table with a format, and a ledger.
        const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
        const LEDGER: TableDefinition<&str, &[u8]> = TableDefinition::new("ledger");
        let db = Database::create(&path).expect("raw open");
        let tx = db.begin_write().expect("begin");
        tx.open_table(META)
            .expect("meta")
            .insert("format", b"1".as_slice())
            .expect("insert");
        tx.open_table(LEDGER).expect("ledger");
        tx.commit().expect("commit");
    }
    let err = Store::open(&path).expect_err("must refuse");
    assert!(matches!(err, StoreError::Foreign { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("not written by a printloop supervisor"),
        "{err}"
    );
}

#[test]
fn undecodable_record_is_corrupt_naming_table_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sv.redb");
    {
        let s = open(&path);
        s.apply(&[Mutation::PutJob(job(1, 0, JobState::Queued))])
            .expect("apply");
    }
    {
        const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
        let db = Database::create(&path).expect("raw open");
        let tx = db.begin_write().expect("begin");
        tx.open_table(JOBS)
            .expect("jobs")
            .insert("j-000001", b"{\"job_id\": 12".as_slice())
            .expect("insert");
        tx.commit().expect("commit");
    }
    let s = open(&path);
    let err = s.load().expect_err("must fail");
    match &err {
        StoreError::Corrupt { table, key, .. } => {
            assert_eq!(*table, "jobs");
            assert_eq!(key, "j-000001");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(err.to_string().contains("j-000001"), "{err}");
    // The record can still be replaced: the index does not need the old value.
    s.apply(&[Mutation::PutJob(job(1, 0, JobState::Cancelled))])
        .expect("overwrite");
    assert_eq!(s.load().expect("load").jobs.len(), 1);
}

#[test]
fn a_second_open_of_the_same_file_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sv.redb");
    let _first = open(&path);
    let err = Store::open(&path).expect_err("locked");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn progress_reads_back_bit_for_bit() {
    // serde_json's default float parser is not exact; the store enables `float_roundtrip`.
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(&dir.path().join("sv.redb"));
    let mut j = job(1, 0, JobState::Printing);
    for p in [93.33494154907319, 0.1 + 0.2, 1e-300, 99.99999999999999] {
        j.progress_pct = Some(p);
        s.apply(&[Mutation::PutJob(j.clone())]).expect("apply");
        assert_eq!(s.load().expect("load").jobs, vec![j.clone()]);
    }
}
