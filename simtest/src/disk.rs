//! The durable stores, in memory: what a `kill -9` leaves behind.
//!
//! Each mirrors its redb store (`gateway/src/store.rs`, `supervisor/src/store.rs`): a batch of
//! mutations is applied at once (one transaction) and `load` builds the snapshot a restarting
//! process starts from, exactly as the real `Store::load` does.

use std::collections::BTreeMap;

use gateway::store::{
    CommandRecord, CurrentJob, FileRecord as GwFile, Flags, LedgerRecord, Mutation as GwMut,
    Snapshot as GwSnap, COMMAND_MEMORY,
};
use protocol::state::LedgerEntry;
use protocol::{CommandId, JobId, PrinterId, Sha256Hex};
use supervisor::model::{
    FileRecord as SupFile, JobRecord, Mutation as SupMut, PrinterRecord, Snapshot as SupSnap,
};

/// A gateway's redb file plus its file cache directory.
#[derive(Debug, Clone, Default)]
pub struct GatewayDisk {
    /// Last epoch.
    pub epoch: u64,
    /// Current job.
    pub current: Option<CurrentJob>,
    /// Flags.
    pub flags: Flags,
    /// The job ledger.
    pub ledger: BTreeMap<JobId, LedgerRecord>,
    /// The file index.
    pub files: BTreeMap<Sha256Hex, GwFile>,
    /// Remembered command answers.
    pub commands: BTreeMap<CommandId, CommandRecord>,
    /// Events not yet acknowledged by their echo.
    pub outbox: BTreeMap<u64, Vec<u8>>,
    /// The cached files' bytes (the `files/` directory; written chunk by chunk, not
    /// transactional, exactly like the real cache).
    pub blobs: BTreeMap<Sha256Hex, Vec<u8>>,
}

impl GatewayDisk {
    /// Applies one transaction.
    pub fn apply(&mut self, muts: &[GwMut]) {
        let mut pruned = false;
        for m in muts {
            match m {
                GwMut::SetEpoch(e) => self.epoch = *e,
                GwMut::SetCurrent(c) => self.current = c.clone(),
                GwMut::SetFlags(f) => self.flags = *f,
                GwMut::PutLedger(r) => {
                    self.ledger.insert(r.job_id.clone(), r.clone());
                }
                GwMut::PutFile(f) => {
                    self.files.insert(f.sha256.clone(), f.clone());
                }
                GwMut::RemoveFile(sha) => {
                    self.files.remove(sha);
                }
                GwMut::PutCommand(id, r) => {
                    self.commands.insert(id.clone(), r.clone());
                    pruned = true;
                }
                GwMut::PushOutbox(k, bytes) => {
                    self.outbox.insert(*k, bytes.clone());
                }
                GwMut::AckOutbox(upto) => self.outbox.retain(|k, _| k > upto),
            }
        }
        if pruned && self.commands.len() > COMMAND_MEMORY {
            let mut all: Vec<(u64, CommandId)> = self
                .commands
                .iter()
                .map(|(k, r)| (r.at_ms, k.clone()))
                .collect();
            all.sort();
            let excess = all.len() - COMMAND_MEMORY;
            for (_, k) in all.into_iter().take(excess) {
                self.commands.remove(&k);
            }
        }
    }

    /// What `Store::load` returns.
    pub fn load(&self) -> GwSnap {
        let mut ended: Vec<LedgerEntry> = self
            .ledger
            .values()
            .filter_map(|r| {
                Some(LedgerEntry {
                    job_id: r.job_id.clone(),
                    outcome: r.outcome?,
                    line: r.line,
                    ended_at_ms: r.ended_at_ms?,
                })
            })
            .collect();
        ended.sort_by(|a, b| {
            b.ended_at_ms
                .cmp(&a.ended_at_ms)
                .then(b.job_id.cmp(&a.job_id))
        });
        ended.truncate(16);
        GwSnap {
            epoch: self.epoch,
            current: self.current.clone(),
            flags: self.flags,
            recent_jobs: ended,
            outbox: self.outbox.iter().map(|(k, v)| (*k, v.clone())).collect(),
            files: self.files.values().cloned().collect(),
            ledger: self
                .ledger
                .values()
                .map(|r| (r.job_id.clone(), r.outcome))
                .collect(),
            commands: self
                .commands
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// The supervisor's redb file (its G-code store is [`crate::world`]'s file library).
#[derive(Debug, Clone, Default)]
pub struct SupervisorDisk {
    /// Last epoch.
    pub epoch: u64,
    /// Next job number.
    pub next_job: u64,
    /// Every job.
    pub jobs: BTreeMap<JobId, JobRecord>,
    /// Every printer.
    pub printers: BTreeMap<PrinterId, PrinterRecord>,
    /// Stored files.
    pub files: BTreeMap<Sha256Hex, SupFile>,
    /// Remembered API answers.
    pub requests: BTreeMap<String, Vec<u8>>,
    /// The history archive: ended jobs that left `jobs` (retention).
    pub archive: BTreeMap<JobId, JobRecord>,
}

impl SupervisorDisk {
    /// Applies one transaction.
    pub fn apply(&mut self, muts: &[SupMut]) {
        for m in muts {
            match m {
                SupMut::SetEpoch(e) => self.epoch = *e,
                SupMut::SetNextJob(n) => self.next_job = *n,
                SupMut::PutJob(j) => {
                    self.jobs.insert(j.job_id.clone(), j.clone());
                }
                SupMut::RemoveJob(id) => {
                    self.jobs.remove(id);
                }
                SupMut::PutPrinter(p) => {
                    self.printers.insert(p.printer_id.clone(), p.clone());
                }
                SupMut::RemovePrinter(id) => {
                    self.printers.remove(id);
                }
                SupMut::PutFile(f) => {
                    self.files.insert(f.sha256.clone(), f.clone());
                }
                SupMut::PutRequest { key, response, .. } => {
                    self.requests.insert(key.clone(), response.clone());
                }
                // The simulated farm registers no webhooks: its shell never fills the outbox.
                SupMut::PutOutbox { .. } | SupMut::RemoveOutbox(_) => {}
            }
        }
    }

    /// What `Store::load` returns.
    pub fn load(&self) -> SupSnap {
        SupSnap {
            epoch: self.epoch,
            next_job: self.next_job.max(1),
            jobs: self.jobs.values().cloned().collect(),
            printers: self.printers.values().cloned().collect(),
            files: self.files.values().cloned().collect(),
            requests: self
                .requests
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}
