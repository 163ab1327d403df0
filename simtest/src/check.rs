//! Invariants. At the end of every seed, the shared checker ([`invariants::violations`], the one
//! `printloop chaos` runs over real stores) on the evidence the simulated disks and broker hold;
//! on every step, the simulation-only rules below, which need the whole history; convergence.

use std::collections::BTreeMap;

use invariants::{Evidence, GatewayLedger};
use protocol::api::JobState;
use protocol::presence::Presence;
use protocol::state::{Event, EventKind};
use protocol::{JobId, Payload as _, PrinterId, Sha256Hex, Topic};

use crate::world::World;

impl World {
    // ----- the shared checker, at the end of a seed -----

    /// What the run left behind, as the chaos runner reads it from the real stores: the
    /// supervisor's durable jobs, every gateway's durable ledger, current job and verified files,
    /// the job ids the operator was told were accepted, the events the broker carried.
    pub(crate) fn evidence(&self) -> Evidence {
        Evidence {
            submitted: self.op.accepted.iter().cloned().collect(),
            jobs: self.sup.disk.jobs.values().cloned().collect(),
            gateways: self
                .gws
                .iter()
                .map(|g| GatewayLedger {
                    printer: g.id.to_string(),
                    ledger: g
                        .disk
                        .ledger
                        .values()
                        .map(|r| (r.job_id.clone(), r.outcome))
                        .collect(),
                    current: g
                        .disk
                        .current
                        .as_ref()
                        .map(|c| (c.job_id.clone(), c.file_sha256.clone())),
                    verified_files: g
                        .disk
                        .files
                        .values()
                        .filter(|f| f.verified)
                        .map(|f| f.sha256.clone())
                        .collect(),
                })
                .collect(),
            observed: self.observed.clone(),
        }
    }

    /// A publish the broker takes: its `job_started` and `file_verified` events are evidence
    /// (what the chaos runner's observer collects from the real broker).
    pub(crate) fn observe(&mut self, topic: &str, payload: &[u8]) {
        let Ok(Topic::Events(printer)) = self.topics.parse(topic) else {
            return;
        };
        let Ok(e) = Event::decode(payload) else {
            return;
        };
        let o = &mut self.observed;
        match e.event {
            EventKind::JobStarted { job_id } => {
                o.starts.push((printer.to_string(), job_id, e.epoch, e.seq))
            }
            EventKind::FileVerified { job_id, sha256 } => {
                o.verified.push((printer.to_string(), job_id, sha256))
            }
            _ => {}
        }
    }

    // ----- simulation-only, on every step -----
    //
    // Each rule here is about a moment the evidence (an end state and some events) cannot
    // show: the shared checker would miss a breach that later steps paper over.

    /// Simulation-only: an accepted job is durable at *every* step, so an answer is never
    /// published before its job is persisted (the end state cannot tell a job lost and made
    /// again under the same id by a retried request).
    pub(crate) fn check_step(&self) -> Result<(), String> {
        for j in &self.op.accepted {
            if !self.sup.disk.jobs.contains_key(j) {
                return Err(format!(
                    "t={} ms: job {j} was accepted but the supervisor's store lost it",
                    self.now
                ));
            }
        }
        Ok(())
    }

    /// Simulation-only: the supervisor never assigns one job to two printers, at any commit (the
    /// evidence holds only each job's last printer).
    pub(crate) fn check_sup_disk(&mut self) {
        let mut seen: BTreeMap<&JobId, &PrinterId> = BTreeMap::new();
        let mut bad = None;
        for p in self.sup.disk.printers.values() {
            if let Some(j) = &p.assigned {
                if let Some(other) = seen.insert(j, &p.printer_id) {
                    bad = Some(format!(
                        "the supervisor assigned job {j} to both {other} and {}",
                        p.printer_id
                    ));
                }
            }
        }
        if let Some(b) = bad {
            self.violate(b);
        }
    }

    /// Simulation-only, at the moment a printer is told to print: the job never started before
    /// anywhere, and the file is verified in the gateway's store and its bytes on disk hash to
    /// the job's sha256 (the evidence sees `job_started` events, which a crash can lose, and
    /// the files only at the end).
    pub(crate) fn check_start(&mut self, g: usize, job_id: &JobId, sha256: &Sha256Hex) {
        if !self.started.insert(job_id.clone()) {
            self.violate(format!(
                "job {job_id} started a second time (on {})",
                self.gws[g].id
            ));
        }
        let gw = &self.gws[g];
        let verified = gw.disk.files.get(sha256).is_some_and(|f| f.verified);
        let intact = gw
            .disk
            .blobs
            .get(sha256)
            .is_some_and(|b| Sha256Hex::digest(b) == *sha256);
        if !(verified && intact) {
            let id = gw.id.clone();
            self.violate(format!(
                "job {job_id} started on {id} from a file that is not verified on disk"
            ));
        }
    }

    // ----- convergence -----

    /// Convergence: everyone up, no job open, and the supervisor's view of each printer equal
    /// to the gateway's. (That every ledger entry agrees with the supervisor's record, both
    /// ways, is the shared checker's rule, checked once converged.)
    pub(crate) fn converged(&self) -> Result<(), String> {
        for (c, p) in self.procs.iter().enumerate() {
            if !p.alive || !p.link.connected {
                return Err(format!("{} is not connected", self.name(c)));
            }
        }
        let sup = self.sup.machine.as_ref().ok_or("the supervisor is down")?;
        for j in sup.jobs() {
            if !matches!(
                j.state,
                JobState::Done | JobState::Cancelled | JobState::Failed | JobState::Interrupted
            ) {
                return Err(format!("job {} is still {:?}", j.job_id, j.state));
            }
        }
        let summaries = sup.printer_summaries();
        for (g, gw) in self.gws.iter().enumerate() {
            let m = gw.machine.as_ref().ok_or("a gateway is down")?;
            let snap = m.snapshot(self.gnow(g + 1));
            let s = summaries
                .iter()
                .find(|s| s.printer_id == gw.id)
                .ok_or_else(|| format!("the supervisor does not know {}", gw.id))?;
            if s.presence != Presence::Online || s.stale {
                return Err(format!(
                    "{} is {:?} (stale {}) for the supervisor",
                    gw.id, s.presence, s.stale
                ));
            }
            if s.phase != snap.phase {
                return Err(format!(
                    "{}: the supervisor sees {:?}, the gateway is {:?}",
                    gw.id, s.phase, snap.phase
                ));
            }
            let gj = snap.job.as_ref().map(|j| j.job_id.clone());
            if s.job_id != gj {
                return Err(format!(
                    "{}: the supervisor sees job {:?}, the gateway has {:?}",
                    gw.id, s.job_id, gj
                ));
            }
        }
        Ok(())
    }
}
