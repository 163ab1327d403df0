//! A job's file: pulled from the file server chunk by chunk, each chunk verified before it is
//! stored and the whole file hashed before it prints, with bounded retries; the cache is kept
//! under its limits by evicting the least recently used files not in use.

use protocol::files::{verify_chunk, FileChunkRequest, FileChunkResponse};
use protocol::state::{EventKind, JobStage};
use protocol::{CommandId, Payload, Sha256Hex, Topic, Version};
use transport::outgoing::Lane;

use crate::store::{FileRecord, Mutation};

use super::{Gateway, Now, Output, Publish, Transfer};

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
        self.transfer = Some(Transfer {
            sha256: sha.clone(),
            size,
            received,
            request_id: None,
            deadline_ms: 0,
            attempts: 0,
            requests: 0,
            storing: false,
        });
        if received >= size {
            self.transfer = None;
            self.check_file(sha, out);
        } else if self.connected {
            self.request_chunk(now, sha, size, out);
        }
    }

    pub(super) fn request_chunk(
        &mut self,
        now: Now,
        sha: &Sha256Hex,
        size: u64,
        out: &mut Vec<Output>,
    ) {
        let Some(t) = &mut self.transfer else { return };
        t.requests += 1;
        let id = CommandId::new(format!(
            "{}-e{}-f{}",
            self.cfg.printer_id, self.epoch, t.requests
        ))
        .expect("a printer id and numbers always form a valid command id");
        let len = (size - t.received).min(u64::from(self.cfg.chunk_len)) as u32;
        let req = FileChunkRequest {
            v: Version,
            request_id: id.clone(),
            sha256: sha.clone(),
            offset: t.received,
            len,
        };
        t.request_id = Some(id);
        t.deadline_ms = now.mono_ms + self.cfg.chunk_timeout_ms();
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

    pub(super) fn on_chunk_timeout(&mut self, now: Now, out: &mut Vec<Output>) {
        self.retry_chunk(now, "file chunk timed out", out);
    }

    /// Asks for the current chunk again, or fails the job once `chunk_attempts` in a row went
    /// wrong (timed out, corrupt, or not the chunk asked for): a server that keeps answering
    /// wrongly must not keep the printer `preparing` for ever.
    fn retry_chunk(&mut self, now: Now, why: &str, out: &mut Vec<Output>) {
        let Some(t) = &mut self.transfer else { return };
        t.attempts += 1;
        if t.attempts >= self.cfg.chunk_attempts {
            let (offset, attempts) = (t.received, t.attempts);
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
        let (sha, size) = (t.sha256.clone(), t.size);
        tracing::warn!(printer = %self.cfg.printer_id, sha = %sha, offset = t.received, attempt = t.attempts, "{why}; asking again");
        self.request_chunk(now, &sha, size, out);
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
        if t.request_id.as_ref() != Some(resp.request_id()) || t.storing {
            tracing::debug!(request = %resp.request_id(), "stale file chunk dropped");
            return;
        }
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
                if sha256 != t.sha256 || offset != t.received {
                    tracing::debug!(%offset, expected = t.received, "file chunk does not match the request");
                    self.retry_chunk(now, "file chunk does not match the request", out);
                    return;
                }
                match verify_chunk(offset, total_size, &chunk_sha256, &data_b64) {
                    Ok(data) => {
                        t.storing = true;
                        out.push(Output::StoreChunk {
                            sha256,
                            offset,
                            data,
                        });
                    }
                    Err(e) => {
                        self.retry_chunk(now, &format!("corrupt file chunk ({e})"), out);
                    }
                }
            }
        }
    }

    pub(super) fn on_chunk_stored(
        &mut self,
        now: Now,
        sha: Sha256Hex,
        offset: u64,
        len: u64,
        out: &mut Vec<Output>,
    ) {
        let Some(t) = &mut self.transfer else { return };
        if t.sha256 != sha || offset != t.received {
            return;
        }
        t.storing = false;
        t.attempts = 0;
        t.received += len;
        t.request_id = None;
        let (received, size) = (t.received, t.size);
        if let Some(f) = self.files.get_mut(&sha) {
            f.received_bytes = received;
            out.push(Output::Persist(vec![Mutation::PutFile(f.clone())]));
        }
        self.state_dirty = true;
        if received >= size {
            self.transfer = None;
            self.check_file(&sha, out);
        } else if self.connected {
            self.request_chunk(now, &sha, size, out);
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
