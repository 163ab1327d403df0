//! The world and its event loop: one queue keyed by (time, sequence), one simulated clock, one
//! seeded generator; `run` takes the events in order and hands each to the module that owns it.
//! Keeps the replay promise: no wall clock, no thread, no hash order — one seed, one run.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use gateway::link::LinkEvent;
use gateway::machine::{CoreConfig, Now as GNow};
use protocol::api::JobState;
use protocol::files::FileChunkRequest;
use protocol::{JobId, PrinterId, Sha256Hex, Topics};
use supervisor::machine::{Now as SNow, SupervisorConfig};
use supervisor::model::FileRecord as SupFile;

use crate::broker::{Broker, Delivery};
use crate::disk::{GatewayDisk, SupervisorDisk};
use crate::network::Up;
use crate::operator::Operator;
use crate::printers::{gcode, PrinterModel};
use crate::procs::Proc;
use crate::rng::Rng;
use crate::shells::{Gw, Sup};

/// Unix time of simulated time 0.
pub(crate) const UNIX_BASE: u64 = 1_750_000_000_000;
/// The supervisor is process 0.
pub(crate) const SUP: usize = 0;

/// The knobs of one run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The seed.
    pub seed: u64,
    /// Print every step to stderr.
    pub verbose: bool,
    /// Length of the phase with faults (simulated ms).
    pub fault_ms: u64,
    /// How long after the last fault the views must have converged (simulated ms).
    pub converge_ms: u64,
    /// Mean gap between two faults (simulated ms).
    pub fault_gap_ms: u64,
    /// Abort a run that takes more steps than this (a livelock is a failure too).
    pub max_steps: u64,
}

impl SimConfig {
    /// The defaults for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            verbose: false,
            fault_ms: 180_000,
            converge_ms: 900_000,
            fault_gap_ms: 8_000,
            max_steps: 400_000,
        }
    }
}

/// What a passing run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The seed.
    pub seed: u64,
    /// Steps (events handled).
    pub steps: u64,
    /// Simulated time at the end (ms).
    pub sim_ms: u64,
    /// Printers.
    pub printers: usize,
    /// Jobs the supervisor knows at the end (submitted and requeued).
    pub jobs: usize,
    /// Jobs that ended `done` (printed and harvested).
    pub done: usize,
    /// Faults injected.
    pub faults: u64,
    /// Simulated ms from the end of the faults to convergence.
    pub converged_after_ms: u64,
    /// A digest of the whole run (same seed ⇒ same digest).
    pub digest: u64,
}

#[derive(Debug, Clone)]
pub(crate) enum Ev {
    ConnectAttempt(usize),
    ConnAck {
        c: usize,
        conn: u64,
        session_present: bool,
    },
    Deliver(Delivery),
    Arrive {
        c: usize,
        conn: u64,
        id: u64,
        up: Up,
    },
    ClientNotice {
        c: usize,
        conn: u64,
    },
    BrokerNotice {
        c: usize,
        conn: u64,
    },
    WillFire {
        topic: String,
        payload: Vec<u8>,
    },
    PartitionEnd(usize),
    BrokerUp,
    Tick {
        c: usize,
        inc: u64,
        at: u64,
    },
    Restart(usize),
    PrinterDue {
        g: usize,
        gen: u64,
        ev: LinkEvent,
    },
    PrinterStep {
        g: usize,
        gen: u64,
    },
    PrinterTimeout {
        g: usize,
        gen: u64,
    },
    Replug(usize),
    /// The supervisor handles what arrived at this instant (see `World::sup_arrived`).
    SupBatch {
        inc: u64,
    },
    FileChecked {
        g: usize,
        inc: u64,
        sha: Sha256Hex,
    },
    ServeChunk {
        inc: u64,
        printer: PrinterId,
        request: FileChunkRequest,
    },
    Fault,
    SlowEnd,
    Operator,
    OperatorRetry,
    Heal,
    HealCheck,
}

impl Ev {
    pub(crate) fn kind(&self) -> u64 {
        match self {
            Ev::ConnectAttempt(_) => 1,
            Ev::ConnAck { .. } => 2,
            Ev::Deliver(_) => 3,
            Ev::Arrive { .. } => 4,
            Ev::ClientNotice { .. } => 5,
            Ev::BrokerNotice { .. } => 6,
            Ev::WillFire { .. } => 7,
            Ev::PartitionEnd(_) => 8,
            Ev::BrokerUp => 9,
            Ev::Tick { .. } => 10,
            Ev::Restart(_) => 11,
            Ev::PrinterDue { .. } => 12,
            Ev::PrinterStep { .. } => 13,
            Ev::PrinterTimeout { .. } => 14,
            Ev::Replug(_) => 15,
            Ev::FileChecked { .. } => 16,
            Ev::ServeChunk { .. } => 17,
            Ev::Fault => 18,
            Ev::SlowEnd => 19,
            Ev::Operator => 20,
            Ev::OperatorRetry => 21,
            Ev::Heal => 22,
            Ev::HealCheck => 23,
            Ev::SupBatch { .. } => 24,
        }
    }
}

/// The world.
pub struct World {
    pub(crate) cfg: SimConfig,
    pub(crate) rng: Rng,
    pub(crate) now: u64,
    pub(crate) seq: u64,
    pub(crate) queue: BTreeMap<(u64, u64), Ev>,
    pub(crate) topics: Topics,
    pub(crate) broker: Broker,
    pub(crate) procs: Vec<Proc>,
    pub(crate) sup: Sup,
    pub(crate) gws: Vec<Gw>,
    pub(crate) op: Operator,
    /// The supervisor's file store (content-addressed G-code).
    pub(crate) library: BTreeMap<Sha256Hex, Vec<u8>>,
    pub(crate) files: Vec<Sha256Hex>,
    pub(crate) slow: bool,
    pub(crate) healing: bool,
    pub(crate) heal_at: u64,
    pub(crate) faults: u64,
    pub(crate) faults_replayed: u64,
    pub(crate) steps: u64,
    pub(crate) digest: u64,
    /// Job ids whose print started somewhere (`check_start`: never runs twice).
    pub(crate) started: BTreeSet<JobId>,
    /// The `job_started` / `file_verified` events the broker took, for the shared checker.
    pub(crate) observed: invariants::Observed,
    /// `start_job` commands delivered to gateways (gateway, job, topic, payload), for the
    /// stale-start fault.
    pub(crate) starts_seen: Vec<(usize, JobId, String, Vec<u8>)>,
    pub(crate) violation: Option<String>,
    pub(crate) converged_at: Option<u64>,
    pub(crate) submit_budget: u64,
}

impl World {
    /// Builds the world for `cfg.seed`: 2–5 printers, 3–8 jobs, 2–3 files.
    pub fn new(cfg: SimConfig) -> Self {
        let mut rng = Rng::new(cfg.seed);
        let n_printers = rng.range(2, 5) as usize;
        let topics = Topics::default();
        let mut library = BTreeMap::new();
        let mut files = Vec::new();
        let mut sup_disk = SupervisorDisk::default();
        for n in 0..rng.range(2, 3) as usize {
            let bytes = gcode(&mut rng, n);
            let sha = Sha256Hex::digest(&bytes);
            sup_disk.files.insert(
                sha.clone(),
                SupFile {
                    sha256: sha.clone(),
                    size_bytes: bytes.len() as u64,
                    stored_at_ms: UNIX_BASE,
                },
            );
            library.insert(sha.clone(), bytes);
            files.push(sha);
        }
        let sup_cfg = SupervisorConfig {
            topics: topics.clone(),
            step_timeout: Duration::from_millis(60_000),
            // Command ids from the seed, so that a seed replays exactly.
            command_key: u128::from(cfg.seed).to_le_bytes(),
            ..SupervisorConfig::default()
        };
        let mut procs = vec![Proc::default()];
        let mut gws = Vec::new();
        for i in 0..n_printers {
            let id = PrinterId::new(format!("p{i}")).expect("valid printer id");
            let mut core = CoreConfig::new(id.clone());
            core.topics = topics.clone();
            core.chunk_len = 512;
            core.chunk_timeout = Duration::from_millis(3_000);
            core.checkpoint_lines = 20;
            core.gateway_version = "sim".into();
            gws.push(Gw {
                id,
                cfg: core,
                machine: None,
                disk: GatewayDisk::default(),
                printer: PrinterModel {
                    plugged: true,
                    hung: false,
                    halted: false,
                    gen: 0,
                    ready: false,
                    stream: None,
                    link_seq: 0,
                },
                streamer: gateway::streamer::Streamer::new(),
                pending: VecDeque::new(),
            });
            procs.push(Proc {
                skew_ms: rng.range(0, 1_000),
                ..Proc::default()
            });
        }
        procs.push(Proc::default()); // the operator
        let mut w = Self {
            cfg,
            rng,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            topics,
            broker: Broker::new(),
            procs,
            sup: Sup {
                cfg: sup_cfg,
                machine: None,
                disk: sup_disk,
                pending: VecDeque::new(),
                batch_queued: false,
            },
            gws,
            op: Operator::default(),
            library,
            files,
            slow: false,
            healing: false,
            heal_at: 0,
            faults: 0,
            faults_replayed: 0,
            steps: 0,
            digest: 0xcbf2_9ce4_8422_2325,
            observed: invariants::Observed::default(),
            started: BTreeSet::new(),
            starts_seen: Vec::new(),
            violation: None,
            converged_at: None,
            submit_budget: 0,
        };
        for c in 0..w.procs.len() {
            w.procs[c].link.up = true;
            let at = w.rng.range(0, 2_000);
            w.at(at, Ev::Restart(c));
        }
        let n_jobs = w.rng.range(3, 8);
        for _ in 0..n_jobs {
            let at = w.rng.range(1_000, 20_000);
            w.at(at, Ev::Operator);
        }
        w.at(3_000, Ev::Fault);
        w.at(10_000, Ev::OperatorRetry);
        let heal = w.cfg.fault_ms;
        w.at(heal, Ev::Heal);
        w.submit_budget = n_jobs;
        w
    }

    pub(crate) fn gw_of(c: usize) -> usize {
        c - 1
    }

    pub(crate) fn is_gw(&self, c: usize) -> bool {
        c >= 1 && c <= self.gws.len()
    }

    pub(crate) fn op_ix(&self) -> usize {
        self.gws.len() + 1
    }

    pub(crate) fn name(&self, c: usize) -> String {
        if c == SUP {
            "sup".into()
        } else if self.is_gw(c) {
            self.gws[Self::gw_of(c)].id.to_string()
        } else {
            "op".into()
        }
    }

    pub(crate) fn at(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((self.now + delay, self.seq), ev);
    }

    pub(crate) fn log(&mut self, line: impl FnOnce() -> String) {
        if self.cfg.verbose {
            eprintln!("[{:>9} ms] {}", self.now, line());
        }
    }

    pub(crate) fn violate(&mut self, what: String) {
        if self.violation.is_none() {
            self.violation = Some(what);
        }
    }

    pub(crate) fn gnow(&self, c: usize) -> GNow {
        GNow {
            mono_ms: self.now,
            unix_ms: UNIX_BASE + self.now + self.procs[c].skew_ms,
        }
    }

    pub(crate) fn snow(&self) -> SNow {
        SNow {
            mono_ms: self.now,
            unix_ms: UNIX_BASE + self.now,
        }
    }

    // ----- the run -----

    /// Runs to convergence (Ok) or to the first broken invariant (Err with what broke).
    pub fn run(mut self) -> Result<Summary, String> {
        while let Some((&(t, s), _)) = self.queue.first_key_value() {
            let ev = self.queue.remove(&(t, s)).expect("first key exists");
            self.now = t;
            self.steps += 1;
            self.digest = (self.digest ^ t.wrapping_mul(31).wrapping_add(ev.kind()))
                .wrapping_mul(0x0100_0000_01b3);
            self.step(ev);
            if let Some(v) = self.violation.take() {
                return Err(format!("t={} ms step {}: {v}", self.now, self.steps));
            }
            self.check_step()?;
            if let Some(at) = self.converged_at {
                // The shared checker, on what the run left behind.
                let broken = invariants::violations(&self.evidence());
                if !broken.is_empty() {
                    return Err(format!(
                        "t={} ms, converged: {}",
                        self.now,
                        broken.join("; ")
                    ));
                }
                let sup = &self.sup.disk;
                return Ok(Summary {
                    seed: self.cfg.seed,
                    steps: self.steps,
                    sim_ms: self.now,
                    printers: self.gws.len(),
                    jobs: sup.jobs.len(),
                    done: sup
                        .jobs
                        .values()
                        .filter(|j| j.state == JobState::Done)
                        .count(),
                    faults: self.faults,
                    converged_after_ms: at - self.heal_at,
                    digest: self.digest,
                });
            }
            if self.steps >= self.cfg.max_steps {
                return Err(format!(
                    "t={} ms: no convergence after {} steps (livelock?)",
                    self.now, self.steps
                ));
            }
        }
        Err("the event queue ran dry".into())
    }

    pub(crate) fn step(&mut self, ev: Ev) {
        if self.cfg.verbose {
            let line = match &ev {
                Ev::Deliver(d) => format!(
                    "deliver to {} {} {}",
                    self.name(d.client),
                    d.msg.topic,
                    String::from_utf8_lossy(&d.msg.payload)
                ),
                Ev::Arrive { c, up, .. } => format!("from {}: {up:?}", self.name(*c))
                    .chars()
                    .take(400)
                    .collect(),
                Ev::Tick { .. } | Ev::PrinterStep { .. } | Ev::SupBatch { .. } => String::new(),
                other => format!("{other:?}").chars().take(300).collect(),
            };
            if !line.is_empty() {
                self.log(|| line);
            }
        }
        match ev {
            Ev::ConnectAttempt(c) => self.connect_attempt(c),
            Ev::ConnAck {
                c,
                conn,
                session_present,
            } => self.conn_ack(c, conn, session_present),
            Ev::Deliver(d) => self.deliver(d),
            Ev::Arrive { c, conn, id, up } => self.arrive(c, conn, id, up),
            Ev::ClientNotice { c, conn } => self.client_notice(c, conn),
            Ev::BrokerNotice { c, conn } => self.broker_notice(c, conn),
            Ev::WillFire { topic, payload } => self.will_fire(topic, payload),
            Ev::PartitionEnd(c) => self.partition_end(c),
            Ev::BrokerUp => self.broker.up = true,
            Ev::Tick { c, inc, at } => self.tick(c, inc, at),
            Ev::Restart(c) => self.restart(c),
            Ev::PrinterDue { g, gen, ev } => self.printer_due(g, gen, ev),
            Ev::PrinterStep { g, gen } => self.printer_step(g, gen),
            Ev::PrinterTimeout { g, gen } => self.printer_timeout(g, gen),
            Ev::Replug(g) => self.replug(g),
            Ev::FileChecked { g, inc, sha } => self.file_checked(g, inc, sha),
            Ev::SupBatch { inc } => self.sup_batch(inc),
            Ev::ServeChunk {
                inc,
                printer,
                request,
            } => self.serve_chunk(inc, printer, request),
            Ev::Fault => self.fault(),
            Ev::SlowEnd => self.slow = false,
            Ev::Operator => self.operator(),
            Ev::OperatorRetry => self.operator_retry(),
            Ev::Heal => self.heal(),
            Ev::HealCheck => self.heal_check(),
        }
    }
}
