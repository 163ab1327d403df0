//! History retention benchmark (issue #13): a farm that has ended 100 000 jobs.
//!
//! `cargo bench -p supervisor --bench history -- [--jobs 100000] [--keep 10000]`
//!
//! The jobs end the way the supervisor records them (one `PutJob` per job, a commit per batch
//! of 1 000, into a real redb store) and retention runs as it does in production: the real
//! machine, loaded from that store, gets its once-a-minute tick; its `Archive` is appended to
//! the real archive and its `RemoveJob`s are committed, as the shell does. A second store
//! takes the same jobs with retention off, for comparison in the same run. Printed: jobs kept,
//! store size, archive lines, and how long `jobs list --all` (the API's `list_jobs` with
//! `include_ended`, the machine's work, median of 21) takes on each.

use std::time::Instant;

use protocol::api::{ApiOp, ApiRequest, JobState, ListJobs};
use protocol::{ClientId, CommandId, JobId, Now, Payload, PrinterId, Sha256Hex, Version};
use supervisor::machine::{Input, Output, Supervisor, SupervisorConfig};
use supervisor::model::{JobRecord, Mutation};
use supervisor::store::Store;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const DAY_MS: u64 = 86_400_000;

fn arg(name: &str, default: usize) -> usize {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn job(n: usize, ended_at_ms: u64) -> JobRecord {
    let state = match n % 20 {
        0 => JobState::Failed,
        1 => JobState::Cancelled,
        _ => JobState::Done,
    };
    JobRecord {
        job_id: JobId::new(format!("j{n}")).expect("id"),
        name: format!("part-{}.gcode", n % 97),
        sha256: Sha256Hex::digest(&(n % 97).to_le_bytes()),
        size_bytes: 1_000_000,
        priority: 0,
        seq: n as u64,
        tags: Vec::new(),
        state,
        printer: Some(PrinterId::new(format!("p{}", n % 500)).expect("id")),
        retry_of: None,
        attempt: 0,
        progress_pct: None,
        submitted_at_ms: ended_at_ms - 3_600_000,
        assigned_at_ms: Some(ended_at_ms - 3_500_000),
        started_at_ms: Some(ended_at_ms - 3_400_000),
        ended_at_ms: Some(ended_at_ms),
        reason: (state == JobState::Failed).then(|| "thermal runaway".to_string()),
    }
}

/// `jobs list --all`: the machine's answer to `list_jobs` with ended jobs, median of 21.
fn list_all_ms(s: &mut Supervisor, now: Now) -> f64 {
    let mut times: Vec<f64> = (0..21)
        .map(|i| {
            let req = ApiRequest {
                v: Version,
                id: CommandId::new(format!("list-{i}")).expect("id"),
                client: ClientId::new("bench").expect("id"),
                op: ApiOp::ListJobs(ListJobs {
                    include_ended: true,
                    limit: Some(1000),
                }),
            };
            let t = Instant::now();
            let out = s.handle(
                now,
                Input::Message {
                    topic: "printloop/v1/api/request".into(),
                    payload: req.encode(),
                },
            );
            let took = t.elapsed().as_secs_f64() * 1e3;
            assert!(
                out.iter().any(|o| matches!(o, Output::Publish(_))),
                "list_jobs answered"
            );
            took
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[10] * 100.0).round() / 100.0
}

fn main() -> Result<(), BoxError> {
    let total = arg("--jobs", 100_000);
    let keep = arg("--keep", 10_000);
    let dir = tempfile::tempdir()?;
    let (kept_db, all_db) = (dir.path().join("kept.redb"), dir.path().join("all.redb"));
    let archive = dir.path().join("history");
    let kept = Store::open(&kept_db)?;
    let all = Store::open(&all_db)?;
    let mut cfg = SupervisorConfig::default();
    cfg.history.keep_jobs = keep;
    // A job ends every ~26 s: 100 000 jobs over a month.
    let start_unix = 1_795_000_000_000u64;
    let step_ms = 30 * DAY_MS / total.max(1) as u64;
    let mut mono = 1_000u64;
    let t0 = Instant::now();
    let mut archived = 0usize;
    for batch in 0..total.div_ceil(1000) {
        let muts: Vec<Mutation> = (batch * 1000..((batch + 1) * 1000).min(total))
            .map(|n| Mutation::PutJob(job(n, start_unix + n as u64 * step_ms)))
            .collect();
        kept.apply(&muts)?;
        all.apply(&muts)?;
        // Retention's minute, every 10 000 jobs: the machine as the shell runs it.
        if (batch + 1) % 10 == 0 || (batch + 1) * 1000 >= total {
            let unix = start_unix + ((batch + 1) * 1000) as u64 * step_ms;
            let now = Now {
                mono_ms: mono,
                unix_ms: unix,
            };
            let mut s = Supervisor::new(cfg.clone(), kept.load()?, now);
            mono += 60_000;
            let out = s.handle(
                Now {
                    mono_ms: mono,
                    unix_ms: unix,
                },
                Input::Tick,
            );
            for o in &out {
                if let Output::Archive(jobs) = o {
                    supervisor::history::append(&archive, jobs)?;
                    archived += jobs.len();
                }
            }
            let removals: Vec<Mutation> = out
                .into_iter()
                .filter_map(|o| match o {
                    Output::Persist(m) => Some(m),
                    _ => None,
                })
                .flatten()
                .collect();
            kept.apply(&removals)?;
        }
    }
    let fill = t0.elapsed();
    let now = Now {
        mono_ms: mono + 1,
        unix_ms: start_unix + total as u64 * step_ms,
    };
    let kept_snap = kept.load()?;
    let all_snap = all.load()?;
    let (kept_jobs, all_jobs) = (kept_snap.jobs.len(), all_snap.jobs.len());
    let connected = |mut s: Supervisor| {
        let _ = s.prepare_connect(now);
        let _ = s.handle(now, Input::Connected);
        s
    };
    let mut with = connected(Supervisor::new(cfg.clone(), kept_snap, now));
    let mut without = connected(Supervisor::new(cfg, all_snap, now));
    let (list_kept, list_all) = (list_all_ms(&mut with, now), list_all_ms(&mut without, now));
    let (archive_jobs, bad) = supervisor::history::read(&archive)?;
    let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let archive_bytes: u64 = std::fs::read_dir(&archive)?
        .filter_map(Result::ok)
        .map(|e| size(&e.path()))
        .sum();
    println!(
        "history: {total} jobs ended in {:.1} s; retention keeps {kept_jobs} (limit {keep}), archived {archived} ({} in the archive, {bad} unreadable lines, {:.1} MB)",
        fill.as_secs_f64(),
        archive_jobs.len(),
        archive_bytes as f64 / 1e6
    );
    println!(
        "history: store {:.1} MB with retention vs {:.1} MB without; jobs list --all (1000 newest) {list_kept} ms vs {list_all} ms (median of 21)",
        size(&kept_db) as f64 / 1e6,
        size(&all_db) as f64 / 1e6,
    );
    let ok = kept_jobs <= keep && archive_jobs.len() + kept_jobs == total && list_kept < 100.0;
    println!(
        "{}",
        serde_json::json!({
            "jobs_ended": total,
            "keep_jobs": keep,
            "jobs_in_store": kept_jobs,
            "jobs_in_store_without_retention": all_jobs,
            "archived": archive_jobs.len(),
            "store_bytes": size(&kept_db),
            "store_bytes_without_retention": size(&all_db),
            "archive_bytes": archive_bytes,
            "list_all_ms": list_kept,
            "list_all_ms_without_retention": list_all,
            "bound_holds": ok,
        })
    );
    if ok {
        Ok(())
    } else {
        Err("the history bound does not hold".into())
    }
}
