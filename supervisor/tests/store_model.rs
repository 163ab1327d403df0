//! Property test: random batches of mutations applied to the store and to a reference model made
//! of hash maps give the same `load()` and the same `jobs_page` answers, across reopens.

use std::cmp::Reverse;
use std::collections::HashMap;

use proptest::prelude::*;
use protocol::api::JobState;
use protocol::{JobId, PrinterId, Sha256Hex};
use supervisor::model::{FileRecord, JobRecord, Mutation, PrinterRecord, Snapshot};
use supervisor::store::Store;

/// Small, so that pruning happens often.
const REQUEST_LIMIT: usize = 4;

const STATES: [JobState; 12] = [
    JobState::Queued,
    JobState::Assigned,
    JobState::Transferring,
    JobState::Starting,
    JobState::Printing,
    JobState::Paused,
    JobState::Finished,
    JobState::Failed,
    JobState::Cancelled,
    JobState::Interrupted,
    JobState::TimedOut,
    JobState::Done,
];

fn arb_job() -> impl Strategy<Value = JobRecord> {
    (
        (0..6u32, -2..3i32, 0..8u64, 0..STATES.len(), 0..4u64),
        (
            proptest::option::of(0..6u64),
            proptest::option::of(0.0..100.0f64),
            "[a-z ]{0,12}",
            proptest::collection::vec("[a-z]{1,4}", 0..3),
            proptest::option::of("[a-z ]{0,10}"),
        ),
    )
        .prop_map(
            |((id, priority, seq, state, submitted), (ended, progress, name, tags, reason))| {
                JobRecord {
                    job_id: JobId::new(format!("j{id}")).expect("job id"),
                    name,
                    sha256: Sha256Hex::digest(&[id as u8]),
                    size_bytes: u64::from(id) * 1000,
                    priority,
                    seq,
                    tags,
                    state: STATES[state],
                    printer: None,
                    retry_of: None,
                    attempt: id,
                    progress_pct: progress,
                    submitted_at_ms: submitted,
                    assigned_at_ms: None,
                    started_at_ms: None,
                    ended_at_ms: ended,
                    reason,
                }
            },
        )
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => (0..5u64).prop_map(Mutation::SetEpoch),
        1 => (1..50u64).prop_map(Mutation::SetNextJob),
        3 => arb_job().prop_map(Mutation::PutJob),
        1 => (0..6u32).prop_map(|j| Mutation::RemoveJob(JobId::new(format!("j{j}")).expect("job id"))),
        1 => (0..3u8, any::<bool>(), 0..4u32, proptest::option::of(0..6u32)).prop_map(
            |(p, held, fails, assigned)| Mutation::PutPrinter(PrinterRecord {
                printer_id: PrinterId::new(format!("p{p}")).expect("printer id"),
                tags: vec![],
                held,
                consecutive_failures: fails,
                assigned: assigned.map(|j| JobId::new(format!("j{j}")).expect("job id")),
                first_seen_ms: u64::from(p),
                start_sent: None,
            })
        ),
        1 => (0..3u8).prop_map(|p| Mutation::RemovePrinter(
            PrinterId::new(format!("p{p}")).expect("printer id")
        )),
        1 => (0..3u8, 1..100u64, 0..10u64).prop_map(|(f, size, at)| Mutation::PutFile(FileRecord {
            sha256: Sha256Hex::digest(&[f]),
            size_bytes: size,
            stored_at_ms: at,
        })),
        3 => (0..7u8, proptest::collection::vec(any::<u8>(), 0..8), 0..6u64).prop_map(
            |(k, response, at_ms)| Mutation::PutRequest {
                key: format!("cli/r{k}"),
                response,
                at_ms,
            }
        ),
        2 => (0..6u64, proptest::collection::vec(any::<u8>(), 0..8))
            .prop_map(|(seq, entry)| Mutation::PutOutbox { seq, entry }),
        1 => (0..6u64).prop_map(Mutation::RemoveOutbox),
    ]
}

#[derive(Default)]
struct Reference {
    epoch: u64,
    next_job: Option<u64>,
    jobs: HashMap<JobId, JobRecord>,
    printers: HashMap<PrinterId, PrinterRecord>,
    files: HashMap<Sha256Hex, FileRecord>,
    requests: HashMap<String, (u64, Vec<u8>)>,
    outbox: std::collections::BTreeMap<u64, Vec<u8>>,
}

impl Reference {
    fn apply(&mut self, batch: &[Mutation]) {
        let mut any_request = false;
        for m in batch {
            match m.clone() {
                Mutation::SetEpoch(e) => self.epoch = e,
                Mutation::SetNextJob(n) => self.next_job = Some(n),
                Mutation::PutJob(j) => {
                    self.jobs.insert(j.job_id.clone(), j);
                }
                Mutation::RemoveJob(id) => {
                    self.jobs.remove(&id);
                }
                Mutation::PutPrinter(p) => {
                    self.printers.insert(p.printer_id.clone(), p);
                }
                Mutation::RemovePrinter(id) => {
                    self.printers.remove(&id);
                }
                Mutation::PutFile(f) => {
                    self.files.insert(f.sha256.clone(), f);
                }
                Mutation::PutRequest {
                    key,
                    response,
                    at_ms,
                } => {
                    self.requests.insert(key, (at_ms, response));
                    any_request = true;
                }
                Mutation::PutOutbox { seq, entry } => {
                    self.outbox.insert(seq, entry);
                }
                Mutation::RemoveOutbox(seq) => {
                    self.outbox.remove(&seq);
                }
            }
        }
        if any_request {
            while self.requests.len() > REQUEST_LIMIT {
                let oldest = self
                    .requests
                    .iter()
                    .map(|(k, (at, _))| (*at, k.clone()))
                    .min()
                    .map(|(_, k)| k);
                if let Some(k) = oldest {
                    self.requests.remove(&k);
                }
            }
        }
    }

    /// Open jobs by (priority desc, seq asc), then ended jobs by (end desc, seq desc); ids last.
    fn jobs(&self, include_ended: bool) -> Vec<JobRecord> {
        let mut open: Vec<_> = self
            .jobs
            .values()
            .filter(|j| j.is_open())
            .cloned()
            .collect();
        open.sort_by_key(|j| (Reverse(j.priority), j.seq, j.job_id.clone()));
        if include_ended {
            let mut ended: Vec<_> = self
                .jobs
                .values()
                .filter(|j| !j.is_open())
                .cloned()
                .collect();
            ended.sort_by_key(|j| {
                (
                    Reverse(j.ended_at_ms.unwrap_or(j.submitted_at_ms)),
                    Reverse(j.seq),
                    j.job_id.clone(),
                )
            });
            open.extend(ended);
        }
        open
    }

    fn snapshot(&self) -> Snapshot {
        let mut printers: Vec<_> = self.printers.values().cloned().collect();
        printers.sort_by(|a, b| a.printer_id.cmp(&b.printer_id));
        let mut files: Vec<_> = self.files.values().cloned().collect();
        files.sort_by(|a, b| a.sha256.cmp(&b.sha256));
        let mut requests: Vec<_> = self
            .requests
            .iter()
            .map(|(k, (at, r))| (*at, k.clone(), r.clone()))
            .collect();
        requests.sort();
        Snapshot {
            epoch: self.epoch,
            next_job: self.next_job.unwrap_or(1),
            jobs: self.jobs(true),
            printers,
            files,
            requests: requests.into_iter().map(|(_, k, r)| (k, r)).collect(),
        }
    }
}

fn open(path: &std::path::Path) -> Store {
    let mut s = Store::open(path).expect("open");
    s.set_request_limit(REQUEST_LIMIT);
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_reference(
        batches in proptest::collection::vec(
            (proptest::collection::vec(arb_mutation(), 0..8), any::<bool>(), 0..8usize),
            1..8,
        )
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sv.redb");
        let mut store = open(&path);
        let mut reference = Reference::default();
        for (batch, reopen, limit) in &batches {
            store.apply(batch).expect("apply");
            reference.apply(batch);
            if *reopen {
                drop(store);
                store = open(&path);
            }
            prop_assert_eq!(store.load().expect("load"), reference.snapshot());
            let outbox: Vec<(u64, Vec<u8>)> = reference.outbox.clone().into_iter().collect();
            prop_assert_eq!(store.outbox(usize::MAX).expect("outbox"), outbox);
            for include_ended in [false, true] {
                let mut want = reference.jobs(include_ended);
                want.truncate(*limit);
                prop_assert_eq!(store.jobs_page(include_ended, *limit).expect("page"), want);
            }
        }
    }
}
