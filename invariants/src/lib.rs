//! The one state checker: the invariants every harness judges a run by, checked on what the
//! run left behind — the supervisor's durable jobs, every gateway's durable ledger, the job ids
//! the operator was told were accepted, and the `job_started` / `file_verified` events the
//! broker carried. Pure: [`Evidence`] in, [`violations`] out, one sentence each.
//!
//! Used by the real-process chaos runner (`printloop chaos`, which reads the redb stores after
//! the run), the adversarial suite, and the deterministic simulation (`simtest`, which builds the
//! evidence from its simulated disks and broker at the end of every seed). Rules that need the
//! whole history (a start from an unverified file at the moment it starts, a supervisor that
//! assigns one job twice at some step) stay in the simulation, which alone sees every step.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use protocol::api::JobState;
use protocol::state::JobStage;
use protocol::{JobId, Sha256Hex};
use supervisor::model::JobRecord;

/// The reason the supervisor writes when an operator judges a finished print bad.
const OPERATOR_FAILED: &str = "marked failed by an operator";

/// What one gateway's store holds at the end.
#[derive(Debug, Clone, Default)]
pub struct GatewayLedger {
    /// The printer.
    pub printer: String,
    /// Every job id it ever accepted and how it ended (`None`: not ended).
    pub ledger: Vec<(JobId, Option<JobStage>)>,
    /// The job on the printer (running, or ended and not yet harvested), with its file.
    pub current: Option<(JobId, Sha256Hex)>,
    /// Files in its cache whose whole sha256 was verified.
    pub verified_files: BTreeSet<Sha256Hex>,
}

/// What the harness saw on the broker (non-retained events; a gap only hides, never invents).
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// `job_started` events: (printer, job, epoch, seq).
    pub starts: Vec<(String, JobId, u64, u64)>,
    /// `file_verified` events: (printer, job, sha256).
    pub verified: Vec<(String, JobId, Sha256Hex)>,
}

/// Everything the checker reads.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// Job ids the supervisor told the operator it accepted (`submitted` answers).
    pub submitted: Vec<JobId>,
    /// Every job in the supervisor's store.
    pub jobs: Vec<JobRecord>,
    /// Every gateway's store.
    pub gateways: Vec<GatewayLedger>,
    /// Events seen.
    pub observed: Observed,
}

/// Whether a supervisor state is settled: ended, or waiting in the queue (never on a printer).
pub fn settled(state: JobState) -> bool {
    matches!(
        state,
        JobState::Queued
            | JobState::Finished
            | JobState::Done
            | JobState::Failed
            | JobState::Cancelled
            | JobState::Interrupted
    )
}

/// The supervisor states that agree with a gateway's outcome.
fn agrees(stage: JobStage, job: &JobRecord) -> bool {
    match stage {
        JobStage::Finished => {
            matches!(job.state, JobState::Finished | JobState::Done)
                || (job.state == JobState::Failed && job.reason.as_deref() == Some(OPERATOR_FAILED))
        }
        JobStage::Failed => job.state == JobState::Failed,
        JobStage::Interrupted => job.state == JobState::Interrupted,
        JobStage::Cancelled => job.state == JobState::Cancelled,
        JobStage::Transferring | JobStage::Starting | JobStage::Printing | JobStage::Paused => {
            false
        }
    }
}

/// The gateway outcome a supervisor state says the printer reported, if it says one.
fn reported_outcome(job: &JobRecord) -> Option<JobStage> {
    match job.state {
        JobState::Finished | JobState::Done => Some(JobStage::Finished),
        JobState::Failed if job.reason.as_deref() == Some(OPERATOR_FAILED) => {
            Some(JobStage::Finished)
        }
        JobState::Failed => Some(JobStage::Failed),
        JobState::Interrupted => Some(JobStage::Interrupted),
        _ => None,
    }
}

/// Every invariant violation in `ev`, one sentence each (empty: the run kept them all).
pub fn violations(ev: &Evidence) -> Vec<String> {
    let mut out = Vec::new();
    let jobs: BTreeMap<&JobId, &JobRecord> = ev.jobs.iter().map(|j| (&j.job_id, j)).collect();

    // 1. An accepted job is never lost: it is in the store, ended or queued.
    for id in &ev.submitted {
        if !jobs.contains_key(id) {
            out.push(format!(
                "job {id} was accepted but the supervisor's store does not have it"
            ));
        }
    }
    for j in &ev.jobs {
        if !settled(j.state) {
            out.push(format!(
                "job {} is still {:?} (printer {:?}) after the system settled",
                j.job_id,
                j.state,
                j.printer.as_ref().map(|p| p.as_str())
            ));
        }
        if let Some(parent) = &j.retry_of {
            if !jobs.contains_key(parent) {
                out.push(format!(
                    "job {} retries {parent}, which the store does not have",
                    j.job_id
                ));
            }
        }
    }

    // 2. A job is never on two printers.
    let mut holders: BTreeMap<&JobId, Vec<&str>> = BTreeMap::new();
    for g in &ev.gateways {
        for (id, _) in &g.ledger {
            holders.entry(id).or_default().push(&g.printer);
        }
    }
    for (id, printers) in &holders {
        if printers.len() > 1 {
            out.push(format!(
                "job {id} is in the ledgers of several printers: {printers:?}"
            ));
        }
    }

    // 3. A job id runs at most once: one distinct `job_started` per job.
    let mut starts: BTreeMap<&JobId, BTreeSet<(&str, u64, u64)>> = BTreeMap::new();
    for (p, id, epoch, seq) in &ev.observed.starts {
        starts.entry(id).or_default().insert((p, *epoch, *seq));
    }
    for (id, s) in &starts {
        if s.len() > 1 {
            out.push(format!("job {id} was started {} times: {s:?}", s.len()));
        }
    }

    // 4. The supervisor's outcomes agree with the gateways' ledgers, both ways.
    let mut in_ledger: HashSet<(&str, &JobId)> = HashSet::new();
    for g in &ev.gateways {
        for (id, outcome) in &g.ledger {
            in_ledger.insert((&g.printer, id));
            let Some(job) = jobs.get(id) else {
                out.push(format!(
                    "printer {} ran job {id}, which the supervisor does not know",
                    g.printer
                ));
                continue;
            };
            if job.printer.as_ref().map(|p| p.as_str()) != Some(g.printer.as_str()) {
                out.push(format!(
                    "job {id} ran on {} but the supervisor has it on {:?}",
                    g.printer,
                    job.printer.as_ref().map(|p| p.as_str())
                ));
            }
            match outcome {
                None => out.push(format!(
                    "job {id} has not ended in {}'s ledger after the system settled (supervisor: {:?})",
                    g.printer, job.state
                )),
                Some(stage) if !agrees(*stage, job) => out.push(format!(
                    "job {id}: {}'s ledger says {stage:?}, the supervisor says {:?}",
                    g.printer, job.state
                )),
                Some(_) => {}
            }
        }
    }
    for j in &ev.jobs {
        let Some(expected) = reported_outcome(j) else {
            continue;
        };
        match &j.printer {
            None => out.push(format!(
                "job {} is {:?} in the supervisor but on no printer",
                j.job_id, j.state
            )),
            Some(p) if !in_ledger.contains(&(p.as_str(), &j.job_id)) => out.push(format!(
                "job {} is {:?} in the supervisor (a {expected:?} on {p}) but {p}'s ledger does not have it",
                j.job_id, j.state
            )),
            Some(_) => {}
        }
    }

    // 5. Every print ran from the file the job names, verified on the printer.
    for g in &ev.gateways {
        if let Some((id, sha)) = &g.current {
            if let Some(job) = jobs.get(id) {
                if &job.sha256 != sha {
                    out.push(format!(
                        "{} holds job {id} with file {sha}, the job's file is {}",
                        g.printer, job.sha256
                    ));
                }
            }
        }
        for (id, outcome) in &g.ledger {
            if *outcome != Some(JobStage::Finished) {
                continue;
            }
            if let Some(job) = jobs.get(id) {
                // Verified in the cache at the end, or verified for this job on the way (a
                // verified file can leave the cache later: evicted for a bigger one, or removed
                // when a later job's check of it failed).
                let seen = ev
                    .observed
                    .verified
                    .iter()
                    .any(|(p, j, sha)| p == &g.printer && j == id && sha == &job.sha256);
                if !g.verified_files.contains(&job.sha256) && !seen {
                    out.push(format!(
                        "job {id} finished on {} but its file {} is not verified there",
                        g.printer, job.sha256
                    ));
                }
            }
        }
    }
    for (p, id, sha) in &ev.observed.verified {
        if let Some(job) = jobs.get(id) {
            if &job.sha256 != sha {
                out.push(format!(
                    "{p} verified file {sha} for job {id}, whose file is {}",
                    job.sha256
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::PrinterId;

    fn sha(c: char) -> Sha256Hex {
        Sha256Hex::new(c.to_string().repeat(64)).expect("sha")
    }

    fn id(s: &str) -> JobId {
        JobId::new(s).expect("job id")
    }

    fn job(name: &str, state: JobState, printer: Option<&str>) -> JobRecord {
        JobRecord {
            job_id: id(name),
            name: name.into(),
            sha256: sha('a'),
            size_bytes: 10,
            priority: 0,
            seq: 1,
            tags: vec![],
            state,
            printer: printer.map(|p| PrinterId::new(p).expect("printer id")),
            retry_of: None,
            attempt: 0,
            progress_pct: None,
            submitted_at_ms: 1,
            assigned_at_ms: None,
            started_at_ms: None,
            ended_at_ms: None,
            reason: None,
        }
    }

    fn gw(printer: &str, ledger: &[(&str, Option<JobStage>)]) -> GatewayLedger {
        GatewayLedger {
            printer: printer.into(),
            ledger: ledger.iter().map(|(j, o)| (id(j), *o)).collect(),
            current: None,
            verified_files: [sha('a')].into(),
        }
    }

    /// A consistent end state: a done job, a failed one requeued and done elsewhere, a queued
    /// one, a cancelled one that never ran.
    fn good() -> Evidence {
        let mut retry = job("j2.r1", JobState::Done, Some("p0"));
        retry.retry_of = Some(id("j2"));
        Evidence {
            submitted: vec![id("j1"), id("j2"), id("j3"), id("j4")],
            jobs: vec![
                job("j1", JobState::Done, Some("p0")),
                job("j2", JobState::Interrupted, Some("p1")),
                retry,
                job("j3", JobState::Queued, None),
                job("j4", JobState::Cancelled, None),
            ],
            gateways: vec![
                gw(
                    "p0",
                    &[
                        ("j1", Some(JobStage::Finished)),
                        ("j2.r1", Some(JobStage::Finished)),
                    ],
                ),
                gw("p1", &[("j2", Some(JobStage::Interrupted))]),
            ],
            observed: Observed {
                starts: vec![
                    ("p0".into(), id("j1"), 1, 5),
                    ("p0".into(), id("j1"), 1, 5), // a QoS 1 duplicate
                    ("p1".into(), id("j2"), 2, 9),
                ],
                verified: vec![("p0".into(), id("j1"), sha('a'))],
            },
        }
    }

    fn expect_one(ev: &Evidence, needle: &str) {
        let v = violations(ev);
        assert!(
            v.iter().any(|s| s.contains(needle)),
            "expected a violation containing {needle:?}, got {v:#?}"
        );
    }

    #[test]
    fn a_consistent_end_state_has_no_violation() {
        assert_eq!(violations(&good()), Vec::<String>::new());
    }

    #[test]
    fn a_lost_job_is_found() {
        let mut ev = good();
        ev.jobs.retain(|j| j.job_id.as_str() != "j3");
        expect_one(&ev, "job j3 was accepted but");
    }

    #[test]
    fn a_job_left_on_a_printer_is_found() {
        let mut ev = good();
        ev.jobs[3].state = JobState::Printing;
        expect_one(&ev, "job j3 is still Printing");
    }

    #[test]
    fn a_job_on_two_printers_is_found() {
        let mut ev = good();
        ev.gateways[1]
            .ledger
            .push((id("j1"), Some(JobStage::Interrupted)));
        expect_one(&ev, "job j1 is in the ledgers of several printers");
    }

    #[test]
    fn a_job_started_twice_is_found() {
        let mut ev = good();
        ev.observed.starts.push(("p0".into(), id("j1"), 2, 1));
        expect_one(&ev, "job j1 was started 2 times");
    }

    #[test]
    fn disagreeing_outcomes_are_found() {
        let mut ev = good();
        ev.gateways[0].ledger[0].1 = Some(JobStage::Failed);
        expect_one(
            &ev,
            "job j1: p0's ledger says Failed, the supervisor says Done",
        );

        let mut ev = good();
        ev.gateways[1].ledger.clear();
        expect_one(&ev, "but p1's ledger does not have it");

        let mut ev = good();
        ev.gateways[0].ledger[0].1 = None;
        expect_one(&ev, "job j1 has not ended in p0's ledger");

        let mut ev = good();
        ev.gateways[0]
            .ledger
            .push((id("ghost"), Some(JobStage::Finished)));
        expect_one(
            &ev,
            "printer p0 ran job ghost, which the supervisor does not know",
        );

        let mut ev = good();
        ev.jobs[0].printer = Some(PrinterId::new("p1").expect("id"));
        expect_one(
            &ev,
            "job j1 ran on p0 but the supervisor has it on Some(\"p1\")",
        );
    }

    #[test]
    fn an_operator_judged_failure_agrees_with_a_finished_print() {
        let mut ev = good();
        ev.jobs[0].state = JobState::Failed;
        ev.jobs[0].reason = Some(OPERATOR_FAILED.into());
        assert_eq!(violations(&ev), Vec::<String>::new());
    }

    #[test]
    fn a_wrong_file_is_found() {
        let mut ev = good();
        ev.observed.verified.push(("p1".into(), id("j2"), sha('b')));
        expect_one(&ev, "p1 verified file");

        // Evicted from the cache after it was verified for the job: fine.
        let mut ev = good();
        ev.gateways[0].verified_files.clear();
        ev.observed
            .verified
            .push(("p0".into(), id("j2.r1"), sha('a')));
        assert_eq!(violations(&ev), Vec::<String>::new());
        // Neither in the cache nor verified for the job on the way.
        ev.observed.verified.clear();
        expect_one(&ev, "job j1 finished on p0 but its file");

        let mut ev = good();
        ev.gateways[0].current = Some((id("j1"), sha('c')));
        expect_one(&ev, "p0 holds job j1 with file");
    }
}
