//! A job's file: pulled from the file server in chunks, a window of them in flight (sized to
//! the link: it grows while chunks arrive and halves when they stop), each chunk verified before
//! it is written and written in order, the whole file hashed before it prints, with bounded
//! retries; the cache is kept under its limits by evicting the least recently used files not in
//! use.

use protocol::files::{verify_chunk, FileChunkRequest, FileChunkResponse};
use protocol::state::{EventKind, JobStage};
use protocol::{CommandId, Payload, Sha256Hex, Topic, Version};
use transport::outgoing::Lane;

use crate::store::{FileRecord, Mutation};

use super::{Asked, Gateway, Now, Output, Publish, Transfer};

/// Bytes written between two durable marks: the partial file is synced and its length
/// recorded every this many bytes (and at its end), so a restart resumes at most this far back
/// and a fast link is not held to one disk sync per chunk.
pub(super) const SYNC_EVERY: u64 = 4 * 1024 * 1024;

/// Chunks in flight when a transfer starts. Each chunk stored widens the window by one (so it
/// doubles every round trip, as TCP's slow start) up to `chunk_window`; a timeout halves it.
pub(super) const START_WINDOW: u32 = 2;

impl Gateway {
    pub(super) fn evictable_bytes(&self, keep: &Sha256Hex) -> u64 {
        let in_use = self.current.as_ref().map(|j| &j.file_sha256);
        self.files
            .values()
            .filter(|f| &f.sha256 != keep && Some(&f.sha256) != in_use)
            .map(|f| f.received_bytes)
            .sum()
    }

    pub(super) fn begin_transfer(
        &mut self,
        now: Now,
        sha: &Sha256Hex,
        size: u64,
        out: &mut Vec<Output>,
    ) {
        let received = self
            .files
            .get(sha)
            .filter(|f| f.size_bytes == size)
            .map_or(0, |f| f.received_bytes);
        // Make room: evict least recently used files not in use until the new one fits.
        let mut cached: Vec<FileRecord> = self
            .files
            .values()
            .filter(|f| &f.sha256 != sha)
            .cloned()
            .collect();
        cached.sort_by_key(|f| f.last_used_ms);
        let mut total: u64 = cached.iter().map(|f| f.received_bytes).sum();
        let mut muts = Vec::new();
        for f in cached {
            let over_cache = total + size > self.cfg.cache_max_bytes;
            let over_disk = self
                .disk_free
                .is_some_and(|free| size.saturating_sub(received) > free);
            if !(over_cache || over_disk) {
                break;
            }
            total -= f.received_bytes;
            if let Some(free) = &mut self.disk_free {
                *free += f.received_bytes;
            }
            self.files.remove(&f.sha256);
            muts.push(Mutation::RemoveFile(f.sha256.clone()));
            out.push(Output::RemoveFile { sha256: f.sha256 });
        }
        let record = FileRecord {
            sha256: sha.clone(),
            size_bytes: size,
            received_bytes: received,
            verified: false,
            last_used_ms: now.unix_ms,
        };
        self.files.insert(sha.clone(), record.clone());
        muts.push(Mutation::PutFile(record));
        out.push(Output::Persist(muts));
        self.transfer = Some(Transfer::new(sha.clone(), size, received));
        if received >= size {
            self.transfer = None;
            self.check_file(sha, out);
        } else if self.connected {
            self.fill_window(now, out);
        }
    }

    /// Asks for chunks until the window is full or every byte has been asked for.
    pub(super) fn fill_window(&mut self, now: Now, out: &mut Vec<Output>) {
        let Some(t) = &self.transfer else { return };
        let mut wanted = Vec::new();
        let (mut next, mut in_flight) = (t.next, t.in_flight.len() as u32);
        while in_flight < t.window && next < t.size {
            let len = (t.size - next).min(u64::from(self.cfg.chunk_len)) as u32;
            wanted.push((next, len));
            next += u64::from(len);
            in_flight += 1;
        }
        if let Some(t) = &mut self.transfer {
            if t.in_flight.is_empty() && !wanted.is_empty() {
                t.deadline_ms = now.mono_ms + self.cfg.chunk_timeout_ms();
            }
            t.next = next;
        }
        for (offset, len) in wanted {
            self.ask(offset, len, out);
        }
    }

    /// Publishes a request for `len` bytes at `offset`, under a new id (an answer to an older
    /// request for the same bytes is stale from now on).
    fn ask(&mut self, offset: u64, len: u32, out: &mut Vec<Output>) {
        let Some(t) = &mut self.transfer else { return };
        t.requests += 1;
        let id = CommandId::new(format!(
            "{}-e{}-f{}",
            self.cfg.printer_id, self.epoch, t.requests
        ))
        .expect("a printer id and numbers always form a valid command id");
        t.in_flight.insert(
            offset,
            Asked {
                id: id.clone(),
                len,
            },
        );
        let req = FileChunkRequest {
            v: Version,
            request_id: id,
            sha256: t.sha256.clone(),
            offset,
            len,
        };
        out.push(Output::Publish(Publish {
            topic: self
                .cfg
                .topics
                .format(&Topic::FileRequest(self.cfg.printer_id.clone())),
            payload: req.encode(),
            retain: false,
            outbox_key: None,
            lane: Lane::Answer,
        }));
    }

    /// Back in touch with the broker. When it kept our session, the requests in flight and
    /// their answers are still queued there: wait for them (the chunk timer still runs). When it
    /// did not, they are gone: ask for them again now.
    pub(super) fn resume_transfer(
        &mut self,
        now: Now,
        session_present: bool,
        out: &mut Vec<Output>,
    ) {
        let Some(t) = &mut self.transfer else { return };
        t.deadline_ms = now.mono_ms + self.cfg.chunk_timeout_ms();
        if !session_present {
            let again: Vec<(u64, u32)> = t.in_flight.iter().map(|(&o, a)| (o, a.len)).collect();
            for (offset, len) in again {
                self.ask(offset, len, out);
            }
        }
        self.fill_window(now, out);
    }

    pub(super) fn on_chunk_timeout(&mut self, now: Now, out: &mut Vec<Output>) {
        self.retry_chunks(now, None, "file chunk timed out", out);
    }

    /// Asks again for the chunk at `only` (an answer to it was unusable), or for every chunk in
    /// flight (nothing came in time: the window halves too); or fails the job once
    /// `chunk_attempts` went wrong with no chunk stored in between: a server that keeps
    /// answering wrongly must not keep the printer `preparing` for ever.
    fn retry_chunks(&mut self, now: Now, only: Option<u64>, why: &str, out: &mut Vec<Output>) {
        let Some(t) = &mut self.transfer else { return };
        t.attempts += 1;
        if t.attempts >= self.cfg.chunk_attempts {
            let (offset, attempts) = (t.stored, t.attempts);
            self.transfer = None;
            self.end_job(
                now,
                JobStage::Failed,
                Some(format!(
                    "file transfer stalled at byte {offset} after {attempts} attempts ({why})"
                )),
                out,
            );
            return;
        }
        tracing::warn!(printer = %self.cfg.printer_id, sha = %t.sha256, offset = t.stored, attempt = t.attempts, "{why}; asking again");
        if only.is_none() {
            t.window = (t.window / 2).max(1);
        }
        t.deadline_ms = now.mono_ms + self.cfg.chunk_timeout_ms();
        let again: Vec<(u64, u32)> = t
            .in_flight
            .iter()
            .filter(|(&o, _)| only.is_none_or(|x| x == o))
            .map(|(&o, a)| (o, a.len))
            .collect();
        for (offset, len) in again {
            self.ask(offset, len, out);
        }
    }

    pub(super) fn on_chunk(&mut self, now: Now, payload: &[u8], out: &mut Vec<Output>) {
        let resp = match FileChunkResponse::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "malformed file chunk dropped");
                return;
            }
        };
        let Some(t) = &mut self.transfer else {
            tracing::debug!("file chunk with no transfer under way dropped");
            return;
        };
        let Some(asked_at) = t
            .in_flight
            .iter()
            .find(|(_, a)| &a.id == resp.request_id())
            .map(|(&o, _)| o)
        else {
            tracing::debug!(request = %resp.request_id(), "stale file chunk dropped");
            return;
        };
        match resp {
            FileChunkResponse::Error { code, message, .. } => {
                self.transfer = None;
                self.end_job(
                    now,
                    JobStage::Failed,
                    Some(format!("file unavailable ({code:?}): {message}").to_lowercase()),
                    out,
                );
            }
            FileChunkResponse::Ok {
                sha256,
                offset,
                total_size,
                chunk_sha256,
                data_b64,
                ..
            } => {
                if sha256 == t.sha256 && total_size != t.size {
                    // The file server knows the file; the command's size was wrong. Asking
                    // again cannot help.
                    let reason = format!(
                        "the file is {total_size} bytes, not the {} bytes start_job said",
                        t.size
                    );
                    self.transfer = None;
                    self.end_job(now, JobStage::Failed, Some(reason), out);
                    return;
                }
                if sha256 != t.sha256 || offset != asked_at {
                    tracing::debug!(%offset, expected = asked_at, "file chunk does not match the request");
                    self.retry_chunks(
                        now,
                        Some(asked_at),
                        "file chunk does not match the request",
                        out,
                    );
                    return;
                }
                let asked_len = t.in_flight.get(&asked_at).map_or(0, |a| a.len);
                match verify_chunk(offset, total_size, &chunk_sha256, &data_b64) {
                    Ok(data) if data.len() == asked_len as usize => {
                        t.in_flight.remove(&asked_at);
                        t.deadline_ms = now.mono_ms + self.cfg.chunk_timeout_ms();
                        t.ahead.insert(offset, data);
                        self.write_ready(out);
                        self.fill_window(now, out);
                    }
                    Ok(data) => {
                        let why = format!(
                            "chunk at offset {offset} has {} bytes, not the {asked_len} asked for",
                            data.len()
                        );
                        self.retry_chunks(now, Some(asked_at), &why, out);
                    }
                    Err(e) => {
                        self.retry_chunks(
                            now,
                            Some(asked_at),
                            &format!("corrupt file chunk ({e})"),
                            out,
                        );
                    }
                }
            }
        }
    }

    /// Hands the shell every verified chunk that continues what it has written, in order. A
    /// write that takes the file [`SYNC_EVERY`] bytes past the last durable mark (or to its end)
    /// is synced, and its answer moves the mark.
    fn write_ready(&mut self, out: &mut Vec<Output>) {
        let Some(t) = &mut self.transfer else { return };
        while let Some(data) = t.ahead.remove(&t.writing) {
            let offset = t.writing;
            t.writing += data.len() as u64;
            let sync = t.writing - t.synced_mark >= SYNC_EVERY || t.writing == t.size;
            if sync {
                t.synced_mark = t.writing;
            }
            out.push(Output::StoreChunk {
                sha256: t.sha256.clone(),
                offset,
                data,
                sync,
            });
        }
    }

    pub(super) fn on_chunk_stored(
        &mut self,
        now: Now,
        sha: Sha256Hex,
        offset: u64,
        len: u64,
        synced: bool,
        out: &mut Vec<Output>,
    ) {
        let Some(t) = &mut self.transfer else { return };
        if t.sha256 != sha || offset != t.stored {
            return;
        }
        t.attempts = 0;
        t.stored += len;
        t.window = (t.window + 1).min(self.cfg.chunk_window.max(1));
        let (stored, size) = (t.stored, t.size);
        self.state_dirty = true;
        if synced {
            // Durable up to here: a restart resumes from this byte.
            if let Some(f) = self.files.get_mut(&sha) {
                f.received_bytes = stored;
                out.push(Output::Persist(vec![Mutation::PutFile(f.clone())]));
            }
        }
        if stored >= size {
            self.transfer = None;
            self.check_file(&sha, out);
        } else if self.connected {
            self.fill_window(now, out);
        }
    }

    pub(super) fn check_file(&mut self, sha: &Sha256Hex, out: &mut Vec<Output>) {
        self.checking = Some(sha.clone());
        out.push(Output::CheckFile {
            sha256: sha.clone(),
        });
    }

    pub(super) fn on_file_checked(
        &mut self,
        now: Now,
        sha: Sha256Hex,
        result: Result<u64, String>,
        out: &mut Vec<Output>,
    ) {
        if self.checking.as_ref() != Some(&sha) {
            return;
        }
        self.checking = None;
        let Some(job) = &self.current else { return };
        if job.file_sha256 != sha || job.stage != JobStage::Transferring {
            return;
        }
        let job_id = job.job_id.clone();
        match result {
            Ok(lines) => {
                if let Some(f) = self.files.get_mut(&sha) {
                    f.verified = true;
                    f.received_bytes = f.size_bytes;
                    out.push(Output::Persist(vec![Mutation::PutFile(f.clone())]));
                }
                if let Some(job) = &mut self.current {
                    job.total_lines = lines;
                    job.stage = JobStage::Starting;
                }
                self.event(
                    now,
                    EventKind::FileVerified {
                        job_id,
                        sha256: sha,
                    },
                    out,
                );
                self.start_stream(now, out);
            }
            Err(reason) => {
                self.files.remove(&sha);
                out.push(Output::Persist(vec![Mutation::RemoveFile(sha.clone())]));
                out.push(Output::RemoveFile { sha256: sha });
                self.end_job(
                    now,
                    JobStage::Failed,
                    Some(format!("file failed verification: {reason}")),
                    out,
                );
            }
        }
    }
}
