//! The supervisor's and the gateways' shells around the real machines, with the chunk server
//! and the gateways' file check. Mirror each run.rs: persist before anything after it, the
//! supervisor's batch of inputs through one `handle_batch`, its mutations in one transaction.

use std::collections::VecDeque;

use base64::Engine as _;
use gateway::machine::{CoreConfig, Gateway, Input as GIn, Output as GOut};
use protocol::files::{ChunkErrorCode, FileChunkRequest, FileChunkResponse};
use protocol::{Payload, PrinterId, Sha256Hex, Topic, Version};
use supervisor::machine::{Input as SIn, Output as SOut, Supervisor, SupervisorConfig};
use supervisor::model::Mutation as SupMut;

use crate::disk::{GatewayDisk, SupervisorDisk};
use crate::network::Up;
use crate::printers::{gcode_lines, PrinterModel};
use crate::world::{Ev, World, SUP};

pub(crate) struct Gw {
    pub(crate) id: PrinterId,
    pub(crate) cfg: CoreConfig,
    pub(crate) machine: Option<Gateway>,
    pub(crate) disk: GatewayDisk,
    pub(crate) printer: PrinterModel,
    /// The gateway process's streamer (its printer side), lost with the process.
    pub(crate) streamer: gateway::streamer::Streamer,
    pub(crate) pending: VecDeque<GIn>,
}

/// Most broker messages the supervisor handles in one batch (`MAX_BATCH` in
/// supervisor/src/run.rs).
const MAX_BATCH: usize = 512;

pub(crate) struct Sup {
    pub(crate) cfg: SupervisorConfig,
    pub(crate) machine: Option<Supervisor>,
    pub(crate) disk: SupervisorDisk,
    /// Broker events that arrived at this instant, not yet handled (run.rs's `pending`).
    pub(crate) pending: VecDeque<SIn>,
    /// An [`Ev::SupBatch`] is queued for this instant.
    pub(crate) batch_queued: bool,
}

impl World {
    /// A broker event for the supervisor (`Connected`, a message). Like run.rs, which takes
    /// every event already waiting in its channel into one batch, the simulation hands every
    /// event that arrives at the same simulated instant to one `handle_batch`: the batch runs
    /// after everything already queued for this instant.
    pub(crate) fn sup_arrived(&mut self, input: SIn) {
        if self.sup.machine.is_none() {
            return;
        }
        self.sup.pending.push_back(input);
        if !self.sup.batch_queued {
            self.sup.batch_queued = true;
            let inc = self.procs[SUP].inc;
            self.at(0, Ev::SupBatch { inc });
        }
    }

    /// The batch of this instant (queued by [`World::sup_arrived`]).
    pub(crate) fn sup_batch(&mut self, inc: u64) {
        if self.procs[SUP].inc != inc {
            return; // the process died since: what it had not handled is lost
        }
        self.sup.batch_queued = false;
        self.sup_run();
    }

    /// An input run.rs handles at once (a timer tick; the connection lost, with what
    /// arrived before it): in one batch with anything still waiting.
    pub(crate) fn sup_input(&mut self, input: SIn) {
        if self.sup.machine.is_none() {
            return;
        }
        self.sup.pending.push_back(input);
        self.sup_run();
    }

    /// Everything waiting through `handle_batch`, at most [`MAX_BATCH`] at a time, each
    /// batch's outputs carried out before the next; then the next timer.
    fn sup_run(&mut self) {
        while !self.sup.pending.is_empty() {
            let n = self.sup.pending.len().min(MAX_BATCH);
            let inputs: Vec<SIn> = self.sup.pending.drain(..n).collect();
            let now = self.snow();
            let Some(m) = self.sup.machine.as_mut() else {
                return;
            };
            let outs = m.handle_batch(now, inputs);
            self.sup_exec(outs);
            if !self.procs[SUP].alive {
                return;
            }
        }
        self.schedule_tick(SUP);
    }

    pub(crate) fn sup_exec(&mut self, outs: Vec<SOut>) {
        // run.rs: every Persist of the batch in one transaction first, then the rest in order.
        if self.crash_point(SUP) {
            return;
        }
        let muts: Vec<SupMut> = outs
            .iter()
            .filter_map(|o| match o {
                SOut::Persist(m) => Some(m.iter().cloned()),
                _ => None,
            })
            .flatten()
            .collect();
        // run.rs: the archive is appended (and synced) before the transaction.
        for o in &outs {
            if let SOut::Archive(jobs) = o {
                for j in jobs {
                    self.sup.disk.archive.insert(j.job_id.clone(), j.clone());
                }
            }
        }
        if !muts.is_empty() {
            self.sup.disk.apply(&muts);
            self.check_sup_disk();
        }
        for o in outs {
            if !matches!(o, SOut::Persist(_)) && self.crash_point(SUP) {
                return;
            }
            match o {
                // No webhooks in the simulated farm (their delivery is tested for real).
                SOut::Persist(_) | SOut::Notify(_) | SOut::Archive(_) => {}
                SOut::Subscribe { filter, qos0 } => self.client_send(
                    SUP,
                    Up::Subscribe {
                        filter,
                        qos1: !qos0,
                    },
                ),
                SOut::Publish(p) => self.client_send(
                    SUP,
                    Up::Publish {
                        topic: p.topic,
                        payload: p.payload,
                        retain: p.retain,
                    },
                ),
                SOut::ServeChunk { printer, request } => {
                    // The chunk server is its own task behind a bounded queue.
                    let d = self.rng.range(2, 80);
                    let inc = self.procs[SUP].inc;
                    self.at(
                        d,
                        Ev::ServeChunk {
                            inc,
                            printer,
                            request,
                        },
                    );
                }
                SOut::StoreUpload { .. } => {
                    self.violate("the simulation uploads nothing, yet an upload was stored".into())
                }
                SOut::Reply { .. } => self
                    .violate("the simulation makes no HTTP request, yet one was answered".into()),
            }
        }
    }

    pub(crate) fn serve_chunk(&mut self, inc: u64, printer: PrinterId, r: FileChunkRequest) {
        if !self.procs[SUP].alive || self.procs[SUP].inc != inc {
            return;
        }
        let faults = !self.healing;
        if faults && self.rng.chance(0.03) {
            return; // the server queue was full: dropped, the gateway asks again
        }
        let resp = match self.library.get(&r.sha256) {
            None => FileChunkResponse::Error {
                v: Version,
                request_id: r.request_id.clone(),
                sha256: r.sha256.clone(),
                code: ChunkErrorCode::NotFound,
                message: "not found".into(),
            },
            Some(bytes) if r.offset >= bytes.len() as u64 || r.len == 0 => {
                FileChunkResponse::Error {
                    v: Version,
                    request_id: r.request_id.clone(),
                    sha256: r.sha256.clone(),
                    code: ChunkErrorCode::BadRange,
                    message: "bad range".into(),
                }
            }
            Some(bytes) => {
                let start = r.offset as usize;
                let end = (start + r.len as usize).min(bytes.len());
                let mut data = bytes[start..end].to_vec();
                let mut resp = FileChunkResponse::chunk(
                    r.request_id.clone(),
                    r.sha256.clone(),
                    r.offset,
                    bytes.len() as u64,
                    &data,
                );
                if faults && self.rng.chance(0.03) {
                    // Corrupted in transit: the chunk's own digest no longer matches.
                    let i = self.rng.index(data.len());
                    data[i] ^= 0x20;
                    if let FileChunkResponse::Ok { data_b64, .. } = &mut resp {
                        *data_b64 = base64::engine::general_purpose::STANDARD.encode(&data);
                    }
                } else if faults && self.rng.chance(0.01) {
                    // Corrupted at the source, digest and all: only the whole-file check
                    // can catch it.
                    let i = self.rng.index(data.len());
                    data[i] ^= 0x20;
                    resp = FileChunkResponse::chunk(
                        r.request_id.clone(),
                        r.sha256.clone(),
                        r.offset,
                        bytes.len() as u64,
                        &data,
                    );
                }
                resp
            }
        };
        let topic = self.topics.format(&Topic::FileChunk(printer));
        self.client_send(
            SUP,
            Up::Publish {
                topic,
                payload: resp.encode(),
                retain: false,
            },
        );
    }

    /// The gateway's file-check task answers: the whole file's sha256 over what is on disk.
    pub(crate) fn file_checked(&mut self, g: usize, inc: u64, sha: Sha256Hex) {
        if self.procs[g + 1].alive && self.procs[g + 1].inc == inc {
            let result = match self.gws[g].disk.blobs.get(&sha) {
                Some(b) if Sha256Hex::digest(b) == sha => Ok(gcode_lines(b)),
                Some(_) => Err("content does not match its sha256".to_owned()),
                None => Err("file missing".to_owned()),
            };
            self.gw_input(
                g,
                GIn::FileChecked {
                    sha256: sha,
                    result,
                },
            );
        }
    }

    pub(crate) fn gw_input(&mut self, g: usize, input: GIn) {
        if self.gws[g].machine.is_none() {
            return;
        }
        self.gws[g].pending.push_back(input);
        self.gw_drain(g);
    }

    pub(crate) fn gw_drain(&mut self, g: usize) {
        let c = g + 1;
        while let Some(input) = self.gws[g].pending.pop_front() {
            let now = self.gnow(c);
            let Some(m) = self.gws[g].machine.as_mut() else {
                return;
            };
            let outs = m.handle(now, input);
            self.gw_exec(g, outs);
            if !self.procs[c].alive {
                return;
            }
        }
        self.schedule_tick(c);
    }

    pub(crate) fn gw_exec(&mut self, g: usize, outs: Vec<GOut>) {
        let c = g + 1;
        for o in outs {
            if self.crash_point(c) {
                return;
            }
            match o {
                GOut::Persist(m) => self.gws[g].disk.apply(&m),
                GOut::Subscribe(filter) => {
                    self.client_send(c, Up::Subscribe { filter, qos1: true })
                }
                GOut::Publish(p) => self.client_send(
                    c,
                    Up::Publish {
                        topic: p.topic,
                        payload: p.payload,
                        retain: p.retain,
                    },
                ),
                GOut::Printer(cmd) => self.printer_cmd(g, cmd),
                GOut::StoreChunk {
                    sha256,
                    offset,
                    data,
                    sync,
                } => {
                    if !self.healing && self.rng.chance(0.01) {
                        self.gws[g].pending.push_back(GIn::ChunkStoreFailed {
                            sha256,
                            reason: "simulated IO error".into(),
                        });
                        continue;
                    }
                    let blob = self.gws[g].disk.blobs.entry(sha256.clone()).or_default();
                    let start = offset as usize;
                    if blob.len() < start {
                        blob.resize(start, 0);
                    }
                    blob.truncate(start);
                    blob.extend_from_slice(&data);
                    self.gws[g].pending.push_back(GIn::ChunkStored {
                        sha256,
                        offset,
                        len: data.len() as u64,
                        synced: sync,
                    });
                }
                GOut::CheckFile { sha256 } => {
                    let d = self.rng.range(5, 200);
                    let inc = self.procs[c].inc;
                    self.at(
                        d,
                        Ev::FileChecked {
                            g,
                            inc,
                            sha: sha256,
                        },
                    );
                }
                GOut::RemoveFile { sha256 } => {
                    self.gws[g].disk.blobs.remove(&sha256);
                    self.gws[g]
                        .pending
                        .push_back(GIn::DiskFree { bytes: 1 << 40 });
                }
            }
        }
    }
}
