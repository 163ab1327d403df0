//! The supervisor's durable state, in one redb file.
//!
//! What is kept, and why:
//! - `meta`: the format version, what wrote the file (`kind`), the epoch and the next job number.
//! - `jobs`: every job ever accepted, by job id, as JSON ([`JobRecord`]).
//! - `job_order` + `job_order_key`: an index that makes listing cheap. `job_order` maps a sort key
//!   to the job id — open jobs (prefix `0`) in dispatch order (priority desc, seq asc), then ended
//!   jobs (prefix `1`) newest first — and `job_order_key` maps each job id to its current sort
//!   key, so replacing a job never needs to decode the old record.
//! - `printers`, `files`: by id / sha256, as JSON.
//! - `requests` + `request_time`: remembered API answers by `<client>/<id>`, with an index by
//!   time so that keeping only the newest [`REQUEST_MEMORY`] is cheap.
//!
//! Every [`Store::apply`] is one redb write transaction committed with immediate durability, so
//! a `kill -9` at any moment leaves either the old or the new state; the shell applies a batch
//! before it publishes anything that follows it.
//!
//! The file is opened with redb's integrity check on, so a file damaged outside redb is an
//! error naming the file, never a panic and never a silent fresh start.

use std::path::{Path, PathBuf};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    TableHandle,
};
use serde::{de::DeserializeOwned, Serialize};

use crate::model::{FileRecord, JobRecord, Mutation, PrinterRecord, Snapshot};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const JOB_ORDER: TableDefinition<&[u8], &str> = TableDefinition::new("job_order");
const JOB_ORDER_KEY: TableDefinition<&str, &[u8]> = TableDefinition::new("job_order_key");
const PRINTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("printers");
const FILES: TableDefinition<&str, &[u8]> = TableDefinition::new("files");
/// `<client>/<id>` → (`at_ms`, encoded response).
const REQUESTS: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("requests");
/// (`at_ms`, `<client>/<id>`) → (), oldest first.
const REQUEST_TIME: TableDefinition<(u64, &str), ()> = TableDefinition::new("request_time");
/// Webhook events waiting for delivery, in order (`Mutation::PutOutbox`).
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");

const KEY_FORMAT: &str = "format";
const KEY_KIND: &str = "kind";
const KEY_EPOCH: &str = "epoch";
const KEY_NEXT_JOB: &str = "next_job";
const KIND: &str = "printloop-supervisor";

/// The format this code writes and understands.
pub const FORMAT_VERSION: u64 = 1;

/// How many API answers are remembered (the newest by `at_ms`).
pub const REQUEST_MEMORY: usize = 4096;

/// Sort-key prefix of open jobs in `job_order`.
const OPEN: u8 = 0;
/// Sort-key prefix of ended jobs in `job_order`.
const ENDED: u8 = 1;

/// What went wrong with the store. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened as a redb database (not a redb file, damaged, locked, …).
    #[error("supervisor database {}: cannot open: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// redb's error.
        source: Box<redb::Error>,
    },
    /// redb failed while reading or writing.
    #[error("supervisor database {}: {op}: {source}", path.display())]
    Db {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// redb's error.
        source: Box<redb::Error>,
    },
    /// A record did not decode: the file was damaged or written by something else.
    #[error(
        "supervisor database {}: record {key:?} in table {table} is unreadable: {message}",
        path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The table.
        table: &'static str,
        /// The record's key.
        key: String,
        /// Why.
        message: String,
    },
    /// The file was written by a newer supervisor.
    #[error(
        "supervisor database {}: format {found} is newer than this supervisor understands \
         ({FORMAT_VERSION}); upgrade printloop or use another file",
        path.display()
    )]
    Format {
        /// The file.
        path: PathBuf,
        /// The format found.
        found: u64,
    },
    /// The file is a redb database, but not a supervisor's (a gateway's, say).
    #[error(
        "supervisor database {}: this redb file was not written by a printloop supervisor \
         ({found}); refusing to use it",
        path.display()
    )]
    Foreign {
        /// The file.
        path: PathBuf,
        /// What was found instead.
        found: String,
    },
}

impl StoreError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Open { path, .. }
            | Self::Db { path, .. }
            | Self::Corrupt { path, .. }
            | Self::Format { path, .. }
            | Self::Foreign { path, .. } => path,
        }
    }
}

/// The redb file.
pub struct Store {
    db: Database,
    path: PathBuf,
    request_limit: usize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("request_limit", &self.request_limit)
            .finish_non_exhaustive()
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // The model's types are plain data (strings, numbers, options, vectors); serde_json cannot
    // fail on them. A failure would be a bug in the model, not bad input.
    serde_json::to_vec(value).unwrap_or_default()
}

/// The order-preserving image of an `i32` in `u32` (`i32::MIN` → 0).
fn ordered_i32(v: i32) -> u32 {
    (v as u32) ^ 0x8000_0000
}

/// The key of a job in `job_order`: open jobs in dispatch order, then ended jobs newest first.
fn order_key(job: &JobRecord) -> Vec<u8> {
    let id = job.job_id.as_str().as_bytes();
    let mut key = Vec::with_capacity(1 + 4 + 8 + 8 + id.len());
    if job.is_open() {
        key.push(OPEN);
        key.extend_from_slice(&(!ordered_i32(job.priority)).to_be_bytes());
        key.extend_from_slice(&job.seq.to_be_bytes());
    } else {
        key.push(ENDED);
        let ended = job.ended_at_ms.unwrap_or(job.submitted_at_ms);
        key.extend_from_slice(&(!ended).to_be_bytes());
        key.extend_from_slice(&(!job.seq).to_be_bytes());
    }
    key.extend_from_slice(id);
    key
}

/// redb's page cache. Its default is a 1 GiB ceiling, which a long-running supervisor fills
/// page by page as jobs are written and archived. The supervisor reads its store only at
/// start (everything lives in the machine); the cache serves the writes' B-tree pages, and
/// the kernel's page cache the rest.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

impl Store {
    /// Opens (or creates) the supervisor's database at `path` and checks its integrity.
    ///
    /// A file that is not a redb database, is damaged, was written by a newer supervisor or by
    /// something else than a supervisor is an error naming the file; nothing is overwritten.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::builder()
            .set_check_integrity_on_open(true)
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| StoreError::Open {
                path: path.to_owned(),
                source: Box::new(e.into()),
            })?;
        let store = Self {
            db,
            path: path.to_owned(),
            request_limit: REQUEST_MEMORY,
        };
        store.init()?;
        Ok(store)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes how many API answers are kept (default [`REQUEST_MEMORY`]); applies from the next
    /// [`Store::apply`] that remembers one. Small values are for tests.
    pub fn set_request_limit(&mut self, limit: usize) {
        self.request_limit = limit;
    }

    fn db<E: Into<redb::Error>>(&self, op: &'static str) -> impl FnOnce(E) -> StoreError + '_ {
        move |e| StoreError::Db {
            path: self.path.clone(),
            op,
            source: Box::new(e.into()),
        }
    }

    fn decode<T: DeserializeOwned>(
        &self,
        table: &'static str,
        key: &str,
        bytes: &[u8],
    ) -> Result<T, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| self.corrupt(table, key, e.to_string()))
    }

    fn corrupt(&self, table: &'static str, key: &str, message: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            table,
            key: key.to_owned(),
            message,
        }
    }

    fn init(&self) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().map_err(self.db("begin"))?;
        tx.set_durability(Durability::Immediate)
            .map_err(self.db("set durability"))?;
        let existing: Vec<String> = tx
            .list_tables()
            .map_err(self.db("list tables"))?
            .map(|t| t.name().to_owned())
            .collect();
        {
            let mut meta = tx.open_table(META).map_err(self.db("open meta"))?;
            let kind = meta
                .get(KEY_KIND)
                .map_err(self.db("read kind"))?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned());
            let format = meta
                .get(KEY_FORMAT)
                .map_err(self.db("read format"))?
                .map(|v| self.decode::<u64>(META.name(), KEY_FORMAT, v.value()))
                .transpose();
            match (kind, format) {
                (Some(k), Ok(Some(f))) if k == KIND => {
                    if f > FORMAT_VERSION {
                        return Err(StoreError::Format {
                            path: self.path.clone(),
                            found: f,
                        });
                    }
                }
                (None, Ok(None)) if existing.is_empty() => {
                    meta.insert(KEY_KIND, KIND.as_bytes())
                        .map_err(self.db("write kind"))?;
                    meta.insert(KEY_FORMAT, encode(&FORMAT_VERSION).as_slice())
                        .map_err(self.db("write format"))?;
                }
                (Some(k), Ok(None)) if k == KIND => {
                    return Err(self.corrupt(META.name(), KEY_FORMAT, "missing".into()));
                }
                (Some(k), _) if k != KIND => {
                    return Err(StoreError::Foreign {
                        path: self.path.clone(),
                        found: format!("kind {k:?}"),
                    });
                }
                (_, Err(e)) => return Err(e),
                _ => {
                    return Err(StoreError::Foreign {
                        path: self.path.clone(),
                        found: format!("tables {}", existing.join(", ")),
                    });
                }
            }
            tx.open_table(JOBS).map_err(self.db("open jobs"))?;
            tx.open_table(JOB_ORDER)
                .map_err(self.db("open job order"))?;
            tx.open_table(JOB_ORDER_KEY)
                .map_err(self.db("open job order keys"))?;
            tx.open_table(PRINTERS).map_err(self.db("open printers"))?;
            tx.open_table(FILES).map_err(self.db("open files"))?;
            tx.open_table(REQUESTS).map_err(self.db("open requests"))?;
            tx.open_table(REQUEST_TIME)
                .map_err(self.db("open request times"))?;
            tx.open_table(OUTBOX).map_err(self.db("open outbox"))?;
        }
        tx.commit().map_err(self.db("commit"))?;
        Ok(())
    }

    /// Reads everything the supervisor needs at start-up.
    ///
    /// Jobs come in [`Store::jobs_page`] order (open jobs in dispatch order, then ended jobs
    /// newest first); printers and files by id; requests oldest first.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let tx = self.db.begin_read().map_err(self.db("begin read"))?;
        let meta = tx.open_table(META).map_err(self.db("open meta"))?;
        let get_u64 = |key: &'static str| -> Result<Option<u64>, StoreError> {
            meta.get(key)
                .map_err(self.db("read meta"))?
                .map(|v| self.decode::<u64>(META.name(), key, v.value()))
                .transpose()
        };
        let epoch = get_u64(KEY_EPOCH)?.unwrap_or(0);
        let next_job = get_u64(KEY_NEXT_JOB)?.unwrap_or(1);

        let jobs = self.jobs_in(&tx, true, usize::MAX)?;

        let printers_t = tx.open_table(PRINTERS).map_err(self.db("open printers"))?;
        let mut printers = Vec::new();
        for row in printers_t.iter().map_err(self.db("scan printers"))? {
            let (k, v) = row.map_err(self.db("read printers"))?;
            printers.push(self.decode::<PrinterRecord>(PRINTERS.name(), k.value(), v.value())?);
        }

        let files_t = tx.open_table(FILES).map_err(self.db("open files"))?;
        let mut files = Vec::new();
        for row in files_t.iter().map_err(self.db("scan files"))? {
            let (k, v) = row.map_err(self.db("read files"))?;
            files.push(self.decode::<FileRecord>(FILES.name(), k.value(), v.value())?);
        }

        let requests_t = tx.open_table(REQUESTS).map_err(self.db("open requests"))?;
        let times_t = tx
            .open_table(REQUEST_TIME)
            .map_err(self.db("open request times"))?;
        let mut requests = Vec::new();
        for row in times_t.iter().map_err(self.db("scan request times"))? {
            let (k, _) = row.map_err(self.db("read request times"))?;
            let (at_ms, key) = k.value();
            let value = requests_t
                .get(key)
                .map_err(self.db("read requests"))?
                .ok_or_else(|| {
                    self.corrupt(
                        REQUEST_TIME.name(),
                        key,
                        "indexed request has no answer".into(),
                    )
                })?;
            let (stored_at, response) = value.value();
            if stored_at != at_ms {
                return Err(self.corrupt(
                    REQUESTS.name(),
                    key,
                    format!("stored at {stored_at}, indexed at {at_ms}"),
                ));
            }
            requests.push((key.to_owned(), response.to_vec()));
        }
        if requests.len() as u64 != requests_t.len().map_err(self.db("count requests"))? {
            return Err(self.corrupt(
                REQUESTS.name(),
                "*",
                "request index and answers disagree".into(),
            ));
        }

        Ok(Snapshot {
            epoch,
            next_job,
            jobs,
            printers,
            files,
            requests,
        })
    }

    /// Up to `limit` jobs: open jobs in dispatch order (priority desc, then seq asc), then — when
    /// `include_ended` — ended jobs (done, cancelled) newest first (by `ended_at_ms`, or
    /// `submitted_at_ms` when that is unset; then seq desc). Reads only the jobs it returns.
    pub fn jobs_page(
        &self,
        include_ended: bool,
        limit: usize,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(self.db("begin read"))?;
        self.jobs_in(&tx, include_ended, limit)
    }

    /// One job by id.
    pub fn job(&self, job_id: &protocol::JobId) -> Result<Option<JobRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(self.db("begin read"))?;
        let jobs = tx.open_table(JOBS).map_err(self.db("open jobs"))?;
        jobs.get(job_id.as_str())
            .map_err(self.db("read jobs"))?
            .map(|v| self.decode(JOBS.name(), job_id.as_str(), v.value()))
            .transpose()
    }

    /// A remembered API answer by `<client>/<id>`.
    pub fn request(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(self.db("begin read"))?;
        let t = tx.open_table(REQUESTS).map_err(self.db("open requests"))?;
        Ok(t.get(key)
            .map_err(self.db("read requests"))?
            .map(|v| v.value().1.to_vec()))
    }

    fn jobs_in(
        &self,
        tx: &redb::ReadTransaction,
        include_ended: bool,
        limit: usize,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let order = tx
            .open_table(JOB_ORDER)
            .map_err(self.db("open job order"))?;
        let jobs = tx.open_table(JOBS).map_err(self.db("open jobs"))?;
        let end: &[u8] = if include_ended {
            &[ENDED + 1]
        } else {
            &[ENDED]
        };
        let start: &[u8] = &[OPEN];
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        for row in order.range(start..end).map_err(self.db("scan job order"))? {
            let (_, id) = row.map_err(self.db("read job order"))?;
            let id = id.value();
            let value = jobs.get(id).map_err(self.db("read jobs"))?.ok_or_else(|| {
                self.corrupt(JOB_ORDER.name(), id, "indexed job is missing".into())
            })?;
            out.push(self.decode::<JobRecord>(JOBS.name(), id, value.value())?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The webhook outbox, in order (at most `limit` entries).
    pub fn outbox(&self, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(self.db("begin read"))?;
        let table = match tx.open_table(OUTBOX) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.db("open outbox")(e)),
        };
        let mut out = Vec::new();
        for row in table.iter().map_err(self.db("read outbox"))? {
            let (k, v) = row.map_err(self.db("read outbox"))?;
            out.push((k.value(), v.value().to_vec()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Applies `mutations` in one durable transaction (nothing of it if it fails).
    pub fn apply(&self, mutations: &[Mutation]) -> Result<(), StoreError> {
        if mutations.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin_write().map_err(self.db("begin write"))?;
        tx.set_durability(Durability::Immediate)
            .map_err(self.db("set durability"))?;
        {
            let mut meta = tx.open_table(META).map_err(self.db("open meta"))?;
            let mut jobs = tx.open_table(JOBS).map_err(self.db("open jobs"))?;
            let mut order = tx
                .open_table(JOB_ORDER)
                .map_err(self.db("open job order"))?;
            let mut order_keys = tx
                .open_table(JOB_ORDER_KEY)
                .map_err(self.db("open job order keys"))?;
            let mut printers = tx.open_table(PRINTERS).map_err(self.db("open printers"))?;
            let mut files = tx.open_table(FILES).map_err(self.db("open files"))?;
            let mut requests = tx.open_table(REQUESTS).map_err(self.db("open requests"))?;
            let mut times = tx
                .open_table(REQUEST_TIME)
                .map_err(self.db("open request times"))?;
            let mut outbox = tx.open_table(OUTBOX).map_err(self.db("open outbox"))?;
            let mut added_request = false;
            for m in mutations {
                match m {
                    Mutation::SetEpoch(e) => {
                        meta.insert(KEY_EPOCH, encode(e).as_slice())
                            .map_err(self.db("write epoch"))?;
                    }
                    Mutation::SetNextJob(n) => {
                        meta.insert(KEY_NEXT_JOB, encode(n).as_slice())
                            .map_err(self.db("write next job"))?;
                    }
                    Mutation::PutJob(job) => {
                        let id = job.job_id.as_str();
                        let key = order_key(job);
                        let old = order_keys
                            .insert(id, key.as_slice())
                            .map_err(self.db("write job order key"))?
                            .map(|v| v.value().to_vec());
                        if let Some(old) = old {
                            if old != key {
                                order
                                    .remove(old.as_slice())
                                    .map_err(self.db("remove job order"))?;
                            }
                        }
                        order
                            .insert(key.as_slice(), id)
                            .map_err(self.db("write job order"))?;
                        jobs.insert(id, encode(job).as_slice())
                            .map_err(self.db("write job"))?;
                    }
                    Mutation::RemoveJob(id) => {
                        let key = order_keys
                            .remove(id.as_str())
                            .map_err(self.db("remove job order key"))?
                            .map(|v| v.value().to_vec());
                        if let Some(key) = key {
                            order
                                .remove(key.as_slice())
                                .map_err(self.db("remove job order"))?;
                        }
                        jobs.remove(id.as_str()).map_err(self.db("remove job"))?;
                    }
                    Mutation::PutPrinter(p) => {
                        printers
                            .insert(p.printer_id.as_str(), encode(p).as_slice())
                            .map_err(self.db("write printer"))?;
                    }
                    Mutation::RemovePrinter(id) => {
                        printers
                            .remove(id.as_str())
                            .map_err(self.db("remove printer"))?;
                    }
                    Mutation::PutFile(f) => {
                        files
                            .insert(f.sha256.as_str(), encode(f).as_slice())
                            .map_err(self.db("write file"))?;
                    }
                    Mutation::PutRequest {
                        key,
                        response,
                        at_ms,
                    } => {
                        let old = requests
                            .insert(key.as_str(), (*at_ms, response.as_slice()))
                            .map_err(self.db("write request"))?
                            .map(|v| v.value().0);
                        if let Some(old_at) = old {
                            times
                                .remove((old_at, key.as_str()))
                                .map_err(self.db("remove request time"))?;
                        }
                        times
                            .insert((*at_ms, key.as_str()), ())
                            .map_err(self.db("write request time"))?;
                        added_request = true;
                    }
                    Mutation::PutOutbox { seq, entry } => {
                        outbox
                            .insert(*seq, entry.as_slice())
                            .map_err(self.db("write outbox"))?;
                    }
                    Mutation::RemoveOutbox(seq) => {
                        outbox.remove(*seq).map_err(self.db("remove outbox"))?;
                    }
                }
            }
            if added_request {
                let count = times.len().map_err(self.db("count requests"))?;
                let excess = count.saturating_sub(self.request_limit as u64);
                for _ in 0..excess {
                    let oldest = times
                        .pop_first()
                        .map_err(self.db("prune request times"))?
                        .map(|(k, _)| k.value().1.to_owned());
                    if let Some(key) = oldest {
                        requests
                            .remove(key.as_str())
                            .map_err(self.db("prune requests"))?;
                    }
                }
            }
        }
        tx.commit().map_err(self.db("commit"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_keys_sort_priorities_across_zero() {
        let mut ps = [i32::MIN, -5, -1, 0, 1, 7, i32::MAX];
        ps.sort_by_key(|p| ordered_i32(*p));
        assert_eq!(ps, [i32::MIN, -5, -1, 0, 1, 7, i32::MAX]);
    }
}
