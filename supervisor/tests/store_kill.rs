//! `kill -9` at a random moment never leaves torn state: a child process (this test binary,
//! re-executed) applies batches in a loop and is SIGKILLed; the parent reopens the file and
//! checks that every batch is there entirely or not at all.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use protocol::api::JobState;
use protocol::{JobId, Sha256Hex};
use supervisor::model::{JobRecord, Mutation};
use supervisor::store::Store;

/// Set in the child's environment: the store's path.
const CHILD_ENV: &str = "PRINTLOOP_STORE_KILL_CHILD";
/// Few, so that pruning runs in the child too.
const REQUEST_LIMIT: usize = 8;
/// What the child prints once its store is open.
const READY: &str = "store-kill-child-ready";

/// Job `n` as the child writes it: big enough to span pages, fully determined by `n`.
fn job(n: u64, state: JobState) -> JobRecord {
    JobRecord {
        job_id: JobId::new(format!("j-{n:06}")).expect("job id"),
        name: format!("{n}-").repeat(300),
        sha256: Sha256Hex::digest(&n.to_be_bytes()),
        size_bytes: n * 1000,
        priority: (n % 5) as i32 - 2,
        seq: n,
        tags: vec![format!("t{}", n % 3)],
        state,
        printer: None,
        retry_of: None,
        attempt: 0,
        progress_pct: None,
        submitted_at_ms: n,
        assigned_at_ms: None,
        started_at_ms: None,
        ended_at_ms: (state == JobState::Done).then_some(n + 1),
        reason: None,
    }
}

/// The batch that adds job `n`: it also ends job `n - 1` and remembers a request.
fn batch(n: u64) -> Vec<Mutation> {
    let mut b = vec![
        Mutation::PutJob(job(n, JobState::Queued)),
        Mutation::SetNextJob(n + 1),
        Mutation::PutRequest {
            key: format!("cli/r{n}"),
            response: vec![n as u8; 2000],
            at_ms: n,
        },
    ];
    if n > 1 {
        b.push(Mutation::PutJob(job(n - 1, JobState::Done)));
    }
    b
}

/// Not a test on its own: the child's body, a no-op unless [`CHILD_ENV`] is set.
#[test]
fn child_writer() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let mut store = Store::open(Path::new(&path)).expect("child: open");
    store.set_request_limit(REQUEST_LIMIT);
    let mut n = store.load().expect("child: load").next_job;
    // The harness prints "test child_writer ... " on the same line.
    println!("{READY}");
    // Bounded, in case the parent dies without killing us.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        store.apply(&batch(n)).expect("child: apply");
        n += 1;
    }
}

/// Kills the child if the parent panics first.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn random_below(n: u64) -> u64 {
    RandomState::new().build_hasher().finish() % n
}

/// Checks the invariants of a store written only by [`batch`]; returns the number of jobs.
fn check(path: &Path) -> u64 {
    let store = Store::open(path).expect("reopen after kill");
    let snap = store.load().expect("every record decodes");
    let count = snap.next_job - 1;
    assert_eq!(snap.jobs.len() as u64, count, "next_job and the jobs agree");
    let mut jobs = snap.jobs.clone();
    jobs.sort_by_key(|j| j.seq);
    for (i, j) in jobs.iter().enumerate() {
        let n = i as u64 + 1;
        let state = if n == count {
            JobState::Queued
        } else {
            JobState::Done
        };
        assert_eq!(*j, job(n, state), "job {n} is complete and current");
    }
    let want: Vec<String> = (count.saturating_sub(REQUEST_LIMIT as u64) + 1..=count)
        .map(|n| format!("cli/r{n}"))
        .collect();
    let got: Vec<String> = snap.requests.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(
        got, want,
        "the newest requests, pruned in the same transaction"
    );
    assert!(snap
        .requests
        .iter()
        .zip(count.saturating_sub(REQUEST_LIMIT as u64) + 1..)
        .all(|((_, r), n)| *r == vec![n as u8; 2000]));
    assert_eq!(
        store.jobs_page(true, usize::MAX).expect("page"),
        snap.jobs,
        "the index agrees with the table"
    );
    assert_eq!(
        store.jobs_page(false, usize::MAX).expect("page").len() as u64,
        count.min(1),
        "only the newest job is open"
    );
    count
}

#[test]
fn sigkill_mid_write_leaves_whole_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sv.redb");
    let exe = std::env::current_exe().expect("test binary");
    let mut last = 0;
    for round in 0..5 {
        let child = Command::new(&exe)
            .args(["child_writer", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let mut child = KillOnDrop(child);
        let stdout = child.0.stdout.take().expect("child stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains(READY) {
                    let _ = tx.send(());
                    break;
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("child opened the store");
        std::thread::sleep(Duration::from_millis(20 + random_below(200)));
        child.0.kill().expect("SIGKILL");
        let status = child.0.wait().expect("wait");
        assert!(
            !status.success(),
            "round {round}: child was killed, {status}"
        );
        let count = check(&path);
        eprintln!("round {round}: killed with {count} jobs stored");
        assert!(count >= last, "round {round}: {count} jobs after {last}");
        last = count;
    }
    assert!(last > 0, "the child committed something");
}
