//! The gateway's durable state, in one redb file on the Pi.
//!
//! What is kept, and why:
//! - `epoch`: +1 on every broker connect; births and wills carry it.
//! - the **job ledger**: every job id ever accepted and how it ended. A job id in the ledger never
//!   starts again, whatever arrives later.
//! - the **current job**: file, stage, the line reached (checkpointed), started at.
//! - flags that survive restarts: the bed is clear, maintenance.
//! - the **file index**: which files (by sha256) are on disk, verified or partial.
//! - **recent command ids** with their answers: a duplicate gets the same answer, not a second run.
//! - the **outbox**: events not yet handed to the broker, in order; published after reconnect.
//!
//! Every write is one redb transaction committed with immediate durability before the caller
//! reports anything, so a `kill -9` at any moment leaves either the old or the new state.

use std::path::Path;

use protocol::state::{JobStage, LedgerEntry};
use protocol::{CommandId, JobId, Sha256Hex};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const LEDGER: TableDefinition<&str, &[u8]> = TableDefinition::new("ledger");
const FILES: TableDefinition<&str, &[u8]> = TableDefinition::new("files");
const COMMANDS: TableDefinition<&str, &[u8]> = TableDefinition::new("commands");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");

const KEY_EPOCH: &str = "epoch";
const KEY_CURRENT: &str = "current_job";
const KEY_FLAGS: &str = "flags";
const KEY_FORMAT: &str = "format";
const FORMAT_VERSION: u64 = 1;

/// How many command ids are remembered for de-duplication.
pub const COMMAND_MEMORY: usize = 1024;

/// What went wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed (IO, corruption, …).
    #[error("state database {op}: {source}")]
    Db {
        /// What was being done.
        op: &'static str,
        /// redb's error.
        source: Box<redb::Error>,
    },
    /// A record did not decode: the file was written by something else, or is damaged.
    #[error("state database record {key:?} is unreadable: {message}")]
    Corrupt {
        /// The record.
        key: String,
        /// Why.
        message: String,
    },
    /// The file was written by a newer gateway.
    #[error(
        "state database format {found} is newer than this gateway understands ({FORMAT_VERSION})"
    )]
    Format {
        /// The format found.
        found: u64,
    },
}

fn db<E: Into<redb::Error>>(op: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Db {
        op,
        source: Box::new(e.into()),
    }
}

/// Flags that survive restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Flags {
    /// An operator confirmed the bed is clear since the last job.
    pub bed_clear: bool,
    /// Held out of work by its operator.
    pub maintenance: bool,
}

/// The job on the printer (running, or ended and not yet harvested).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurrentJob {
    /// The job.
    pub job_id: JobId,
    /// Its file.
    pub file_sha256: Sha256Hex,
    /// Its name.
    pub name: String,
    /// File size.
    pub size_bytes: u64,
    /// Where it stands.
    pub stage: JobStage,
    /// Last checkpointed line acknowledged by the firmware.
    pub line: u64,
    /// Lines in the file (0 until known).
    pub total_lines: u64,
    /// When it was accepted.
    pub accepted_at_ms: u64,
    /// When printing started.
    pub started_at_ms: Option<u64>,
    /// When it ended.
    pub ended_at_ms: Option<u64>,
    /// Why it failed or was interrupted.
    pub reason: Option<String>,
}

/// One job in the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerRecord {
    /// The job.
    pub job_id: JobId,
    /// `None` while it runs; the terminal stage once it ended.
    pub outcome: Option<JobStage>,
    /// Line reached when it ended.
    pub line: u64,
    /// When it was accepted.
    pub accepted_at_ms: u64,
    /// When it ended.
    pub ended_at_ms: Option<u64>,
}

/// A file in the local cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// The file.
    pub sha256: Sha256Hex,
    /// Its full size.
    pub size_bytes: u64,
    /// Bytes received and verified chunk by chunk, contiguous from 0.
    pub received_bytes: u64,
    /// The whole file was verified against its sha256.
    pub verified: bool,
    /// Last time it was used (for eviction).
    pub last_used_ms: u64,
}

/// The answer given to a command, remembered by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRecord {
    /// When it was handled.
    pub at_ms: u64,
    /// `ok`, `error`, … as answered.
    pub status: protocol::command::ResultStatus,
    /// The reason given.
    pub reason: Option<String>,
}

/// A change to the durable state, applied atomically with the others of one [`Store::apply`].
#[derive(Debug, Clone, PartialEq)]
pub enum Mutation {
    /// Set the epoch.
    SetEpoch(u64),
    /// Set or clear the current job.
    SetCurrent(Option<CurrentJob>),
    /// Set the flags.
    SetFlags(Flags),
    /// Insert or replace a ledger record.
    PutLedger(LedgerRecord),
    /// Insert or replace a file record.
    PutFile(FileRecord),
    /// Forget a file.
    RemoveFile(Sha256Hex),
    /// Remember a command's answer.
    PutCommand(CommandId, CommandRecord),
    /// Append an event (already encoded) to the outbox under `key`.
    PushOutbox(u64, Vec<u8>),
    /// Remove outbox entries up to and including `key`.
    AckOutbox(u64),
}

/// Everything the gateway needs at start-up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The last epoch used (0 when new).
    pub epoch: u64,
    /// The current job.
    pub current: Option<CurrentJob>,
    /// The flags.
    pub flags: Flags,
    /// The newest ledger records (ended jobs first by end time, newest first), at most 16.
    pub recent_jobs: Vec<LedgerEntry>,
    /// The outbox, in order.
    pub outbox: Vec<(u64, Vec<u8>)>,
    /// Cached files.
    pub files: Vec<FileRecord>,
    /// Every job id in the ledger, with its outcome (`None`: accepted, not ended).
    pub ledger: Vec<(JobId, Option<JobStage>)>,
    /// Remembered command ids and their answers.
    pub commands: Vec<(CommandId, CommandRecord)>,
}

/// The redb file.
pub struct Store {
    db: Database,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        message: e.to_string(),
    })
}

impl Store {
    /// Opens (or creates) the state database at `path`. A damaged file is an error that names
    /// it; the gateway never silently starts from empty state over a damaged one.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // The integrity check turns a damaged file into an error here; without it redb can
        // panic later ("Malformed allocator state") on a file with flipped bytes.
        // redb caches up to 1 GiB by default; a Pi Zero 2 W has 512 MB in all, and this
        // database (ledger, outbox, transfers) is a few hundred KiB.
        let db = Database::builder()
            .set_check_integrity_on_open(true)
            .set_cache_size(16 * 1024 * 1024)
            .create(path)
            .map_err(db("open"))?;
        let store = Self { db };
        store.init()?;
        Ok(store)
    }

    fn init(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db("begin"))?;
        {
            let mut meta = tx.open_table(META).map_err(db("open meta"))?;
            let found = meta
                .get(KEY_FORMAT)
                .map_err(db("read format"))?
                .map(|v| decode::<u64>(KEY_FORMAT, v.value()))
                .transpose()?;
            match found {
                Some(f) if f > FORMAT_VERSION => return Err(StoreError::Format { found: f }),
                Some(_) => {}
                None => {
                    meta.insert(KEY_FORMAT, encode(&FORMAT_VERSION).as_slice())
                        .map_err(db("write format"))?;
                }
            }
            tx.open_table(LEDGER).map_err(db("open ledger"))?;
            tx.open_table(FILES).map_err(db("open files"))?;
            tx.open_table(COMMANDS).map_err(db("open commands"))?;
            tx.open_table(OUTBOX).map_err(db("open outbox"))?;
        }
        tx.commit().map_err(db("commit"))?;
        Ok(())
    }

    /// Reads everything the gateway needs at start-up.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let tx = self.db.begin_read().map_err(db("begin read"))?;
        let meta = tx.open_table(META).map_err(db("open meta"))?;
        let get = |key: &str| -> Result<Option<Vec<u8>>, StoreError> {
            Ok(meta
                .get(key)
                .map_err(db("read meta"))?
                .map(|v| v.value().to_vec()))
        };
        let epoch = get(KEY_EPOCH)?
            .map(|b| decode::<u64>(KEY_EPOCH, &b))
            .transpose()?
            .unwrap_or(0);
        let current = get(KEY_CURRENT)?
            .map(|b| decode::<Option<CurrentJob>>(KEY_CURRENT, &b))
            .transpose()?
            .flatten();
        let flags = get(KEY_FLAGS)?
            .map(|b| decode::<Flags>(KEY_FLAGS, &b))
            .transpose()?
            .unwrap_or_default();

        let ledger = tx.open_table(LEDGER).map_err(db("open ledger"))?;
        let mut ended = Vec::new();
        let mut all_jobs = Vec::new();
        for row in ledger.iter().map_err(db("scan ledger"))? {
            let (k, v) = row.map_err(db("read ledger"))?;
            let rec: LedgerRecord = decode(k.value(), v.value())?;
            all_jobs.push((rec.job_id.clone(), rec.outcome));
            if let (Some(outcome), Some(ended_at_ms)) = (rec.outcome, rec.ended_at_ms) {
                ended.push(LedgerEntry {
                    job_id: rec.job_id,
                    outcome,
                    line: rec.line,
                    ended_at_ms,
                });
            }
        }
        ended.sort_by(|a, b| {
            b.ended_at_ms
                .cmp(&a.ended_at_ms)
                .then(b.job_id.cmp(&a.job_id))
        });
        ended.truncate(16);

        let outbox_t = tx.open_table(OUTBOX).map_err(db("open outbox"))?;
        let mut outbox = Vec::new();
        for row in outbox_t.iter().map_err(db("scan outbox"))? {
            let (k, v) = row.map_err(db("read outbox"))?;
            outbox.push((k.value(), v.value().to_vec()));
        }

        let files_t = tx.open_table(FILES).map_err(db("open files"))?;
        let mut files = Vec::new();
        for row in files_t.iter().map_err(db("scan files"))? {
            let (k, v) = row.map_err(db("read files"))?;
            files.push(decode::<FileRecord>(k.value(), v.value())?);
        }
        let commands_t = tx.open_table(COMMANDS).map_err(db("open commands"))?;
        let mut commands = Vec::new();
        for row in commands_t.iter().map_err(db("scan commands"))? {
            let (k, v) = row.map_err(db("read commands"))?;
            let id = CommandId::new(k.value()).map_err(|e| StoreError::Corrupt {
                key: k.value().to_owned(),
                message: e.to_string(),
            })?;
            commands.push((id, decode::<CommandRecord>(k.value(), v.value())?));
        }
        Ok(Snapshot {
            epoch,
            current,
            flags,
            recent_jobs: ended,
            outbox,
            files,
            ledger: all_jobs,
            commands,
        })
    }

    /// Looks up a job in the ledger.
    pub fn ledger(&self, job: &JobId) -> Result<Option<LedgerRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db("begin read"))?;
        let t = tx.open_table(LEDGER).map_err(db("open ledger"))?;
        t.get(job.as_str())
            .map_err(db("read ledger"))?
            .map(|v| decode(job.as_str(), v.value()))
            .transpose()
    }

    /// Looks up a command id.
    pub fn command(&self, id: &CommandId) -> Result<Option<CommandRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db("begin read"))?;
        let t = tx.open_table(COMMANDS).map_err(db("open commands"))?;
        t.get(id.as_str())
            .map_err(db("read commands"))?
            .map(|v| decode(id.as_str(), v.value()))
            .transpose()
    }

    /// Applies `mutations` in one durable transaction.
    pub fn apply(&self, mutations: &[Mutation]) -> Result<(), StoreError> {
        if mutations.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(db("begin write"))?;
        {
            let mut meta = tx.open_table(META).map_err(db("open meta"))?;
            let mut ledger = tx.open_table(LEDGER).map_err(db("open ledger"))?;
            let mut files = tx.open_table(FILES).map_err(db("open files"))?;
            let mut commands = tx.open_table(COMMANDS).map_err(db("open commands"))?;
            let mut outbox = tx.open_table(OUTBOX).map_err(db("open outbox"))?;
            let mut pruned_commands = false;
            for m in mutations {
                match m {
                    Mutation::SetEpoch(e) => {
                        meta.insert(KEY_EPOCH, encode(e).as_slice())
                            .map_err(db("write epoch"))?;
                    }
                    Mutation::SetCurrent(c) => {
                        meta.insert(KEY_CURRENT, encode(c).as_slice())
                            .map_err(db("write current job"))?;
                    }
                    Mutation::SetFlags(f) => {
                        meta.insert(KEY_FLAGS, encode(f).as_slice())
                            .map_err(db("write flags"))?;
                    }
                    Mutation::PutLedger(r) => {
                        ledger
                            .insert(r.job_id.as_str(), encode(r).as_slice())
                            .map_err(db("write ledger"))?;
                    }
                    Mutation::PutFile(f) => {
                        files
                            .insert(f.sha256.as_str(), encode(f).as_slice())
                            .map_err(db("write file record"))?;
                    }
                    Mutation::RemoveFile(sha) => {
                        files
                            .remove(sha.as_str())
                            .map_err(db("remove file record"))?;
                    }
                    Mutation::PutCommand(id, r) => {
                        commands
                            .insert(id.as_str(), encode(r).as_slice())
                            .map_err(db("write command id"))?;
                        pruned_commands = true;
                    }
                    Mutation::PushOutbox(k, bytes) => {
                        outbox
                            .insert(*k, bytes.as_slice())
                            .map_err(db("write outbox"))?;
                    }
                    Mutation::AckOutbox(upto) => {
                        outbox.retain(|k, _| k > *upto).map_err(db("trim outbox"))?;
                    }
                }
            }
            if pruned_commands
                && commands.len().map_err(db("count commands"))? > COMMAND_MEMORY as u64
            {
                // Forget the oldest ids beyond the bound (by the time they were handled).
                let mut all = Vec::new();
                for row in commands.iter().map_err(db("scan commands"))? {
                    let (k, v) = row.map_err(db("read commands"))?;
                    let at = decode::<CommandRecord>(k.value(), v.value())
                        .map(|r| r.at_ms)
                        .unwrap_or(0);
                    all.push((at, k.value().to_owned()));
                }
                all.sort();
                let excess = all.len().saturating_sub(COMMAND_MEMORY);
                for (_, k) in all.into_iter().take(excess) {
                    commands.remove(k.as_str()).map_err(db("prune commands"))?;
                }
            }
        }
        tx.commit().map_err(db("commit"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::command::ResultStatus;

    fn job(id: &str) -> JobId {
        JobId::new(id).expect("valid")
    }

    fn current(id: &str) -> CurrentJob {
        CurrentJob {
            job_id: job(id),
            file_sha256: Sha256Hex::digest(b"x"),
            name: "x.gcode".into(),
            size_bytes: 1,
            stage: JobStage::Printing,
            line: 10,
            total_lines: 100,
            accepted_at_ms: 1,
            started_at_ms: Some(2),
            ended_at_ms: None,
            reason: None,
        }
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gw.redb");
        {
            let s = Store::open(&path).expect("open");
            assert_eq!(s.load().expect("load"), Snapshot::default());
            s.apply(&[
                Mutation::SetEpoch(3),
                Mutation::SetCurrent(Some(current("j1"))),
                Mutation::SetFlags(Flags {
                    bed_clear: true,
                    maintenance: false,
                }),
                Mutation::PutLedger(LedgerRecord {
                    job_id: job("j0"),
                    outcome: Some(JobStage::Finished),
                    line: 100,
                    accepted_at_ms: 0,
                    ended_at_ms: Some(5),
                }),
                Mutation::PutLedger(LedgerRecord {
                    job_id: job("j1"),
                    outcome: None,
                    line: 0,
                    accepted_at_ms: 1,
                    ended_at_ms: None,
                }),
                Mutation::PushOutbox(1, b"a".to_vec()),
                Mutation::PushOutbox(2, b"b".to_vec()),
                Mutation::PushOutbox(3, b"c".to_vec()),
                Mutation::AckOutbox(1),
            ])
            .expect("apply");
        }
        let s = Store::open(&path).expect("reopen");
        let snap = s.load().expect("load");
        assert_eq!(snap.ledger.len(), 2);
        assert_eq!(snap.epoch, 3);
        assert_eq!(snap.current, Some(current("j1")));
        assert!(snap.flags.bed_clear);
        assert_eq!(snap.recent_jobs.len(), 1, "only ended jobs are recent");
        assert_eq!(snap.recent_jobs[0].job_id, job("j0"));
        assert_eq!(snap.outbox, vec![(2, b"b".to_vec()), (3, b"c".to_vec())]);
        assert!(s.ledger(&job("j1")).expect("read").is_some());
        assert!(s.ledger(&job("j9")).expect("read").is_none());
    }

    #[test]
    fn command_ids_are_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("gw.redb")).expect("open");
        let muts: Vec<Mutation> = (0..COMMAND_MEMORY as u64 + 10)
            .map(|i| {
                Mutation::PutCommand(
                    CommandId::new(format!("c{i}")).expect("id"),
                    CommandRecord {
                        at_ms: i,
                        status: ResultStatus::Ok,
                        reason: None,
                    },
                )
            })
            .collect();
        s.apply(&muts).expect("apply");
        assert!(s
            .command(&CommandId::new("c0").expect("id"))
            .expect("read")
            .is_none());
        let last = CommandId::new(format!("c{}", COMMAND_MEMORY + 9)).expect("id");
        assert!(s.command(&last).expect("read").is_some());
    }

    #[test]
    fn garbage_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gw.redb");
        std::fs::write(&path, b"this is not a redb file at all, just some bytes").expect("write");
        let err = Store::open(&path).err().expect("must fail");
        assert!(err.to_string().contains("state database"), "{err}");
    }
}
