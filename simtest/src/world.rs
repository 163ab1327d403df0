//! The simulated world: a supervisor, a few gateways with their printers, an operator, and the
//! broker between them, all driven from one event queue by one seeded generator.
//!
//! Every process is the real pure state machine (`gateway::machine::Gateway`,
//! `supervisor::machine::Supervisor`) inside a small shell that mirrors its `run.rs`: persist
//! before anything after it, a new epoch (persisted) before every connection attempt, a
//! restart from the durable snapshot after a crash.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use base64::Engine as _;
use gateway::machine::{
    CoreConfig, Gateway, Input as GIn, Now as GNow, Output as GOut, PrinterCommand, PrinterEvent,
};
use protocol::api::{
    ApiOp, ApiRequest, ApiResponse, ApiResult, BedClear, JobArgs, JobState, PrinterArgs, SubmitJob,
};
use protocol::command::{Command, CommandAction};
use protocol::files::{ChunkErrorCode, FileChunkRequest, FileChunkResponse};
use protocol::presence::{Firmware, Presence};
use protocol::state::{JobStage, PrinterPhase};
use protocol::{ClientId, CommandId, JobId, Payload, PrinterId, Sha256Hex, Topic, Topics, Version};
use supervisor::machine::{
    Input as SIn, Now as SNow, Output as SOut, Supervisor, SupervisorConfig,
};
use supervisor::model::{FileRecord as SupFile, Mutation as SupMut};

use crate::broker::{Broker, Delivery, Msg};
use crate::disk::{GatewayDisk, SupervisorDisk};
use crate::rng::Rng;

/// Unix time of simulated time 0.
const UNIX_BASE: u64 = 1_750_000_000_000;
/// The supervisor is process 0.
const SUP: usize = 0;

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

/// Something the broker is asked by a client.
#[derive(Debug, Clone)]
enum Up {
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    },
    Subscribe {
        filter: String,
        qos1: bool,
    },
}

#[derive(Debug, Clone)]
enum PrinterFault {
    Hang,
    CablePull,
    ThermalRunaway,
    Reset,
    FirmwareError,
}

#[derive(Debug, Clone)]
enum Ev {
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
        ev: PrinterEvent,
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
    fn kind(&self) -> u64 {
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
        }
    }
}

/// A client's side of its broker connection.
#[derive(Debug, Default)]
struct Link {
    /// Not partitioned.
    up: bool,
    /// The connection the client uses (connecting or connected).
    conn: Option<u64>,
    /// The ConnAck arrived.
    connected: bool,
    will: Option<(String, Vec<u8>)>,
    /// Publishes and subscribes not acknowledged by the broker: sent again after a reconnect
    /// (rumqttc does), which is how a broker sees late duplicates.
    unacked: BTreeMap<u64, Up>,
    next_up: u64,
    attempt_pending: bool,
    up_fifo: u64,
    down_fifo: u64,
}

#[derive(Debug, Default)]
struct Proc {
    alive: bool,
    inc: u64,
    tick_at: Option<u64>,
    /// A crash armed to happen after this many more outputs are carried out.
    crash_after: Option<u32>,
    link: Link,
    skew_ms: u64,
}

#[derive(Debug)]
struct Stream {
    job: JobId,
    total: u64,
    acked: u64,
    paused: bool,
}

/// The printer at the end of a gateway's serial cable, at the level of `PrinterEvent`s.
#[derive(Debug)]
struct PrinterModel {
    plugged: bool,
    hung: bool,
    halted: bool,
    gen: u64,
    ready: bool,
    stream: Option<Stream>,
}

struct Gw {
    id: PrinterId,
    cfg: CoreConfig,
    machine: Option<Gateway>,
    disk: GatewayDisk,
    printer: PrinterModel,
    pending: VecDeque<GIn>,
}

struct Sup {
    cfg: SupervisorConfig,
    machine: Option<Supervisor>,
    disk: SupervisorDisk,
}

#[derive(Default)]
struct Operator {
    next: u64,
    /// Requests without an answer yet: id → (payload, tries).
    pending: BTreeMap<CommandId, (Vec<u8>, u32, Option<PrinterId>)>,
    /// Jobs the supervisor confirmed it accepted.
    accepted: BTreeSet<JobId>,
}

/// The world.
pub struct World {
    cfg: SimConfig,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    topics: Topics,
    broker: Broker,
    procs: Vec<Proc>,
    sup: Sup,
    gws: Vec<Gw>,
    op: Operator,
    /// The supervisor's file store (content-addressed G-code).
    library: BTreeMap<Sha256Hex, Vec<u8>>,
    files: Vec<Sha256Hex>,
    slow: bool,
    healing: bool,
    heal_at: u64,
    faults: u64,
    faults_replayed: u64,
    steps: u64,
    digest: u64,
    /// Job id → the gateway that accepted it (for "never on two printers").
    accepted_on: BTreeMap<JobId, usize>,
    /// Job ids whose print started somewhere (for "never runs twice").
    started: BTreeSet<JobId>,
    /// `start_job` commands delivered to gateways (gateway, job, topic, payload), for the
    /// stale-start fault.
    starts_seen: Vec<(usize, JobId, String, Vec<u8>)>,
    violation: Option<String>,
    converged_at: Option<u64>,
    submit_budget: u64,
}

fn gcode(rng: &mut Rng, n: usize) -> Vec<u8> {
    let lines = rng.range(20, 90) as usize;
    let mut s = format!("; sim file {n}\nG28\nM104 S200\nM140 S60\nM190 S60\nM109 S200\n");
    for i in 0..lines {
        if i % 10 == 0 {
            s.push_str(&format!("M73 P{} R{}\n", i * 100 / lines, lines - i));
        }
        s.push_str(&format!(
            "G1 X{} Y{} E{}.{} F1800 ; move {i}\n",
            rng.range(0, 200),
            rng.range(0, 200),
            i,
            rng.range(0, 9)
        ));
    }
    s.push_str("M104 S0\nM140 S0\nM84\n");
    s.into_bytes()
}

fn gcode_lines(bytes: &[u8]) -> u64 {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter(|l| protocol::marlin::strip_comment(l).is_some())
        .count() as u64
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
            step_timeout_ms: 60_000,
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
            core.chunk_timeout_ms = 3_000;
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
                },
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
            accepted_on: BTreeMap::new(),
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

    fn gw_of(c: usize) -> usize {
        c - 1
    }

    fn is_gw(&self, c: usize) -> bool {
        c >= 1 && c <= self.gws.len()
    }

    fn op_ix(&self) -> usize {
        self.gws.len() + 1
    }

    fn name(&self, c: usize) -> String {
        if c == SUP {
            "sup".into()
        } else if self.is_gw(c) {
            self.gws[Self::gw_of(c)].id.to_string()
        } else {
            "op".into()
        }
    }

    fn at(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((self.now + delay, self.seq), ev);
    }

    fn log(&mut self, line: impl FnOnce() -> String) {
        if self.cfg.verbose {
            eprintln!("[{:>9} ms] {}", self.now, line());
        }
    }

    fn violate(&mut self, what: String) {
        if self.violation.is_none() {
            self.violation = Some(what);
        }
    }

    fn gnow(&self, c: usize) -> GNow {
        GNow {
            mono_ms: self.now,
            unix_ms: UNIX_BASE + self.now + self.procs[c].skew_ms,
        }
    }

    fn snow(&self) -> SNow {
        SNow {
            mono_ms: self.now,
            unix_ms: UNIX_BASE + self.now,
        }
    }

    fn latency(&mut self) -> u64 {
        if self.slow {
            self.rng.range(200, 3_000)
        } else {
            self.rng.range(1, 30)
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

    fn step(&mut self, ev: Ev) {
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
                Ev::Tick { .. } | Ev::PrinterStep { .. } => String::new(),
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
            Ev::BrokerNotice { c, conn } => {
                if let Some((topic, payload)) = self.broker.drop_conn(c, conn) {
                    self.fire_will(topic, payload);
                }
            }
            Ev::WillFire { topic, payload } => {
                if self.broker.up {
                    let ds = self.broker.publish(&topic, &payload, true);
                    self.send_all(ds);
                }
            }
            Ev::PartitionEnd(c) => {
                self.procs[c].link.up = true;
                self.schedule_connect(c, 0);
            }
            Ev::BrokerUp => {
                self.broker.up = true;
            }
            Ev::Tick { c, inc, at } => {
                let p = &mut self.procs[c];
                if p.alive && p.inc == inc && p.tick_at == Some(at) {
                    p.tick_at = None;
                    if c == SUP {
                        self.sup_input(SIn::Tick);
                    } else {
                        self.gw_input(Self::gw_of(c), GIn::Tick);
                    }
                }
            }
            Ev::Restart(c) => self.restart(c),
            Ev::PrinterDue { g, gen, ev } => {
                if self.gws[g].printer.gen == gen {
                    if matches!(ev, PrinterEvent::Ready { .. }) {
                        self.gws[g].printer.ready = true;
                    }
                    self.printer_event(g, ev);
                }
            }
            Ev::PrinterStep { g, gen } => self.printer_step(g, gen),
            Ev::PrinterTimeout { g, gen } => {
                let p = &self.gws[g].printer;
                if p.gen == gen && p.hung && self.procs[g + 1].alive {
                    self.printer_event(g, PrinterEvent::Timeout);
                    // printer.rs closes and reopens a silent port (which resets the board).
                    self.open_port(g);
                }
            }
            Ev::Replug(g) => {
                if self.gws[g].printer.plugged {
                    return; // plugged back already (the heal does it)
                }
                self.gws[g].printer.plugged = true;
                if self.procs[g + 1].alive {
                    self.open_port(g);
                }
            }
            Ev::FileChecked { g, inc, sha } => {
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

    // ----- connections -----

    fn schedule_connect(&mut self, c: usize, delay: u64) {
        let p = &mut self.procs[c];
        if p.alive && !p.link.attempt_pending && p.link.conn.is_none() {
            p.link.attempt_pending = true;
            self.at(delay, Ev::ConnectAttempt(c));
        }
    }

    fn connect_attempt(&mut self, c: usize) {
        self.procs[c].link.attempt_pending = false;
        let p = &self.procs[c];
        if !p.alive || p.link.conn.is_some() {
            return;
        }
        if !p.link.up || !self.broker.up {
            let backoff = self.rng.range(500, 5_000);
            self.schedule_connect(c, backoff);
            return;
        }
        let will = self.procs[c].link.will.clone();
        let (conn, present, old_will, waiting) = self.broker.connect(c, will);
        self.procs[c].link.conn = Some(conn);
        if let Some((topic, payload)) = old_will {
            if self.rng.chance(0.5) {
                self.fire_will(topic, payload);
            }
        }
        let lat = self.latency();
        let t = (self.now + lat).max(self.procs[c].link.down_fifo);
        self.procs[c].link.down_fifo = t;
        self.seq += 1;
        self.queue.insert(
            (t, self.seq),
            Ev::ConnAck {
                c,
                conn,
                session_present: present,
            },
        );
        self.send_all(waiting);
    }

    fn fire_will(&mut self, topic: String, payload: Vec<u8>) {
        // Usually at once; sometimes late (after the client's next birth): the design says a
        // will older than the latest birth is ignored.
        let delay = if self.rng.chance(0.3) {
            self.rng.range(500, 10_000)
        } else {
            0
        };
        self.at(delay, Ev::WillFire { topic, payload });
    }

    fn conn_ack(&mut self, c: usize, conn: u64, session_present: bool) {
        let p = &self.procs[c];
        if !p.alive || p.link.conn != Some(conn) || !p.link.up {
            return;
        }
        if self.broker.conn_of(c) != Some(conn) {
            return;
        }
        self.procs[c].link.connected = true;
        // rumqttc sends what was never acknowledged first.
        let again: Vec<(u64, Up)> = self.procs[c]
            .link
            .unacked
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (id, up) in again {
            self.uplink(c, id, up);
        }
        if c == SUP {
            self.sup_input(SIn::Connected);
        } else if self.is_gw(c) {
            self.gw_input(Self::gw_of(c), GIn::MqttConnected { session_present });
        } else {
            let filter = self
                .topics
                .format(&Topic::ApiResponse(ClientId::new("op").expect("valid")));
            self.client_send(c, Up::Subscribe { filter, qos1: true });
        }
    }

    fn client_notice(&mut self, c: usize, conn: u64) {
        if !self.procs[c].alive || self.procs[c].link.conn != Some(conn) {
            return;
        }
        self.procs[c].link.conn = None;
        self.procs[c].link.connected = false;
        // What run.rs does on `MqttEvent::Down`.
        if c == SUP {
            self.sup_input(SIn::Disconnected);
            let now = self.snow();
            if let Some(m) = self.sup.machine.as_mut() {
                let (muts, topic, will) = m.prepare_connect(now);
                self.sup.disk.apply(&muts);
                self.procs[c].link.will = Some((topic, will));
            }
        } else if self.is_gw(c) {
            let g = Self::gw_of(c);
            self.gw_input(g, GIn::MqttDisconnected);
            let now = self.gnow(c);
            if let Some(m) = self.gws[g].machine.as_mut() {
                let (muts, topic, will) = m.prepare_connect(now);
                self.gws[g].disk.apply(&muts);
                self.procs[c].link.will = Some((topic, will));
            }
        }
        let backoff = self.rng.range(200, 5_000);
        self.schedule_connect(c, backoff);
    }

    /// A client hands something to its MQTT client library.
    fn client_send(&mut self, c: usize, up: Up) {
        let link = &mut self.procs[c].link;
        if !link.connected {
            return; // no session to queue it in: dropped (the machines re-send what matters)
        }
        link.next_up += 1;
        let id = link.next_up;
        link.unacked.insert(id, up.clone());
        self.uplink(c, id, up);
    }

    fn uplink(&mut self, c: usize, id: u64, up: Up) {
        let link = &self.procs[c].link;
        let (Some(conn), true) = (link.conn, link.up) else {
            return; // the bytes go nowhere; sent again after the next connect
        };
        let lat = self.latency();
        let t = (self.now + lat).max(self.procs[c].link.up_fifo);
        self.procs[c].link.up_fifo = t;
        self.seq += 1;
        self.queue
            .insert((t, self.seq), Ev::Arrive { c, conn, id, up });
    }

    fn arrive(&mut self, c: usize, conn: u64, id: u64, up: Up) {
        if self.broker.conn_of(c) != Some(conn) {
            return;
        }
        let ds = match up {
            Up::Publish {
                topic,
                payload,
                retain,
            } => self.broker.publish(&topic, &payload, retain),
            Up::Subscribe { filter, qos1 } => self.broker.subscribe(c, &filter, qos1),
        };
        self.send_all(ds);
        // The acknowledgement reaches the client unless the link fails first (or, rarely, it
        // is lost): then the client sends the message again after its next connect.
        let p = &mut self.procs[c];
        if p.alive && p.link.conn == Some(conn) && p.link.up && !self.rng.chance(0.03) {
            self.procs[c].link.unacked.remove(&id);
        }
    }

    fn send_all(&mut self, ds: Vec<Delivery>) {
        for d in ds {
            let lat = self.latency();
            let c = d.client;
            let t = (self.now + lat).max(self.procs[c].link.down_fifo);
            self.procs[c].link.down_fifo = t;
            self.seq += 1;
            self.queue.insert((t, self.seq), Ev::Deliver(d));
        }
    }

    fn deliver(&mut self, d: Delivery) {
        let c = d.client;
        let p = &self.procs[c];
        let ok = p.alive
            && p.link.conn == Some(d.conn)
            && p.link.connected
            && p.link.up
            && self.broker.conn_of(c) == Some(d.conn);
        if !ok {
            return; // stays in flight (QoS 1) and comes again after a reconnect
        }
        if !d.qos1 && self.rng.chance(0.01) {
            return; // QoS 0 may be lost
        }
        if d.qos1 && !self.rng.chance(0.03) {
            self.broker.ack(c, d.conn, d.msg.id);
        }
        let Msg { topic, payload, .. } = d.msg;
        if self.is_gw(c) && self.starts_seen.len() < 64 {
            if let Ok(cmd) = Command::decode(&payload) {
                if let CommandAction::StartJob(st) = &cmd.action {
                    let g = Self::gw_of(c);
                    self.starts_seen
                        .push((g, st.job_id.clone(), topic.clone(), payload.clone()));
                }
            }
        }
        if c == SUP {
            self.sup_input(SIn::Message { topic, payload });
        } else if self.is_gw(c) {
            self.gw_input(Self::gw_of(c), GIn::Message { topic, payload });
        } else {
            self.operator_message(&payload);
        }
    }

    fn schedule_tick(&mut self, c: usize) {
        let deadline = if c == SUP {
            self.sup
                .machine
                .as_ref()
                .and_then(Supervisor::next_deadline)
        } else {
            self.gws[Self::gw_of(c)]
                .machine
                .as_ref()
                .and_then(Gateway::next_deadline)
        };
        let Some(d) = deadline else { return };
        let t = if d > self.now { d } else { self.now + 250 };
        let p = &mut self.procs[c];
        if p.tick_at.is_none_or(|x| t < x) {
            p.tick_at = Some(t);
            let inc = p.inc;
            self.seq += 1;
            self.queue.insert((t, self.seq), Ev::Tick { c, inc, at: t });
        }
    }

    // ----- processes -----

    fn restart(&mut self, c: usize) {
        if self.procs[c].alive {
            return;
        }
        self.procs[c].alive = true;
        self.procs[c].inc += 1;
        self.procs[c].crash_after = None;
        self.procs[c].link.unacked.clear();
        self.procs[c].link.conn = None;
        self.procs[c].link.connected = false;
        self.log(|| "process starts from its disk".into());
        if c == SUP {
            let snap = self.sup.disk.load();
            let mut m = Supervisor::new(self.sup.cfg.clone(), snap, self.snow());
            let (muts, topic, will) = m.prepare_connect(self.snow());
            self.sup.disk.apply(&muts);
            self.sup.machine = Some(m);
            self.procs[c].link.will = Some((topic, will));
            self.schedule_tick(c);
        } else if self.is_gw(c) {
            let g = Self::gw_of(c);
            let snap = self.gws[g].disk.load();
            let now = self.gnow(c);
            let (m, first) = Gateway::new(self.gws[g].cfg.clone(), snap, now);
            self.gws[g].machine = Some(m);
            self.gws[g].pending.clear();
            self.gws[g]
                .pending
                .push_back(GIn::DiskFree { bytes: 1 << 40 });
            self.gw_exec(g, first);
            if !self.procs[c].alive {
                return;
            }
            // The serial task opens the port, which resets the board.
            self.open_port(g);
            let now = self.gnow(c);
            if let Some(m) = self.gws[g].machine.as_mut() {
                let (muts, topic, will) = m.prepare_connect(now);
                self.gws[g].disk.apply(&muts);
                self.procs[c].link.will = Some((topic, will));
            }
            self.gw_drain(g);
        }
        self.schedule_connect(c, 0);
    }

    fn crash(&mut self, c: usize) {
        if !self.procs[c].alive || c == self.op_ix() {
            return;
        }
        self.log(|| "CRASH: everything not committed is lost".into());
        let p = &mut self.procs[c];
        p.alive = false;
        p.inc += 1;
        p.tick_at = None;
        p.crash_after = None;
        p.link.unacked.clear();
        p.link.connected = false;
        let conn = p.link.conn.take();
        if let Some(conn) = conn {
            // The broker notices at its keep-alive timeout and fires the will.
            let d = self.rng.range(1_000, 20_000);
            self.at(d, Ev::BrokerNotice { c, conn });
        }
        if c == SUP {
            self.sup.machine = None;
        } else {
            let g = Self::gw_of(c);
            self.gws[g].machine = None;
            self.gws[g].pending.clear();
            let pr = &mut self.gws[g].printer;
            pr.stream = None;
            pr.ready = false;
            pr.gen += 1;
        }
        if !self.healing {
            let d = self.rng.range(1_000, 30_000);
            self.at(d, Ev::Restart(c));
        }
    }

    /// Counts one carried-out output against an armed crash; true when the process died.
    fn crash_point(&mut self, c: usize) -> bool {
        if let Some(n) = self.procs[c].crash_after.as_mut() {
            if *n == 0 {
                self.crash(c);
                return true;
            }
            *n -= 1;
        }
        false
    }

    // ----- supervisor shell -----

    fn sup_input(&mut self, input: SIn) {
        let now = self.snow();
        let Some(m) = self.sup.machine.as_mut() else {
            return;
        };
        let outs = m.handle(now, input);
        self.sup_exec(outs);
        if self.procs[SUP].alive {
            self.schedule_tick(SUP);
        }
    }

    fn sup_exec(&mut self, outs: Vec<SOut>) {
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
        if !muts.is_empty() {
            self.sup.disk.apply(&muts);
            self.check_sup_disk();
        }
        for o in outs {
            if !matches!(o, SOut::Persist(_)) && self.crash_point(SUP) {
                return;
            }
            match o {
                SOut::Persist(_) => {}
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
            }
        }
    }

    fn serve_chunk(&mut self, inc: u64, printer: PrinterId, r: FileChunkRequest) {
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

    // ----- gateway shell -----

    fn gw_input(&mut self, g: usize, input: GIn) {
        if self.gws[g].machine.is_none() {
            return;
        }
        self.gws[g].pending.push_back(input);
        self.gw_drain(g);
    }

    fn gw_drain(&mut self, g: usize) {
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

    fn gw_exec(&mut self, g: usize, outs: Vec<GOut>) {
        let c = g + 1;
        for o in outs {
            if self.crash_point(c) {
                return;
            }
            match o {
                GOut::Persist(m) => {
                    for mu in &m {
                        if let gateway::store::Mutation::PutLedger(r) = mu {
                            match self.accepted_on.get(&r.job_id) {
                                Some(other) if *other != g => self.violate(format!(
                                    "job {} accepted by {} and by {}: a job on two printers",
                                    r.job_id, self.gws[*other].id, self.gws[g].id
                                )),
                                _ => {
                                    self.accepted_on.insert(r.job_id.clone(), g);
                                }
                            }
                        }
                    }
                    self.gws[g].disk.apply(&m);
                }
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

    // ----- printers -----

    fn printer_event(&mut self, g: usize, ev: PrinterEvent) {
        if self.procs[g + 1].alive {
            self.gw_input(g, GIn::Printer(ev));
        }
    }

    /// The port is (re)opened: the board resets and answers after a moment.
    fn open_port(&mut self, g: usize) {
        let p = &mut self.gws[g].printer;
        p.gen += 1;
        p.ready = false;
        p.stream = None;
        p.hung = false;
        p.halted = false;
        if p.plugged {
            let gen = p.gen;
            let d = self.rng.range(300, 2_000);
            let firmware = Firmware {
                name: "Marlin 2.1.2 (sim)".into(),
                protocol_version: Some("1.0".into()),
                machine_type: Some("Sim".into()),
                capabilities: vec!["AUTOREPORT_TEMP".into()],
            };
            self.at(
                d,
                Ev::PrinterDue {
                    g,
                    gen,
                    ev: PrinterEvent::Ready { firmware },
                },
            );
        }
    }

    fn printer_cmd(&mut self, g: usize, cmd: PrinterCommand) {
        match cmd {
            PrinterCommand::StartStream { job_id, sha256 } => {
                if !self.started.insert(job_id.clone()) {
                    self.violate(format!(
                        "job {job_id} started a second time (on {})",
                        self.gws[g].id
                    ));
                }
                let gw = &self.gws[g];
                let verified = gw.disk.files.get(&sha256).is_some_and(|f| f.verified);
                let total = match gw.disk.blobs.get(&sha256) {
                    Some(b) if Sha256Hex::digest(b) == sha256 && verified => gcode_lines(b),
                    _ => {
                        self.violate(format!(
                            "job {job_id} started on {} from a file that is not verified on disk",
                            gw.id
                        ));
                        0
                    }
                };
                let p = &mut self.gws[g].printer;
                p.stream = Some(Stream {
                    job: job_id,
                    total,
                    acked: 0,
                    paused: false,
                });
                let gen = p.gen;
                let d = self.rng.range(500, 2_000);
                self.at(d, Ev::PrinterStep { g, gen });
            }
            PrinterCommand::PauseStream => {
                if let Some(s) = self.gws[g].printer.stream.as_mut() {
                    s.paused = true;
                }
            }
            PrinterCommand::ResumeStream => {
                if let Some(s) = self.gws[g].printer.stream.as_mut() {
                    s.paused = false;
                }
            }
            PrinterCommand::CancelStream => self.gws[g].printer.stream = None,
            PrinterCommand::ResetPrinter => self.open_port(g),
        }
    }

    fn printer_step(&mut self, g: usize, gen: u64) {
        let p = &mut self.gws[g].printer;
        if p.gen != gen {
            return;
        }
        let working = !p.hung && !p.halted && p.plugged && p.ready;
        let Some(s) = p.stream.as_mut() else { return };
        let mut evs = Vec::new();
        if working && !s.paused {
            let n = self.rng.range(4, 30);
            s.acked = (s.acked + n).min(s.total);
            if let Some(pct) = (s.acked * 100).checked_div(s.total) {
                let pct = pct as f64;
                evs.push(PrinterEvent::Progress {
                    percent: pct,
                    remaining_min: Some((s.total - s.acked) / 10),
                });
            }
            evs.push(PrinterEvent::LinesAcked { count: s.acked });
            if s.acked >= s.total {
                p.stream = None;
            }
        }
        let more = p.stream.is_some();
        let job = p.stream.as_ref().map(|s| s.job.clone());
        for ev in evs {
            self.printer_event(g, ev);
        }
        if more && self.gws[g].printer.gen == gen {
            let d = self.rng.range(1_000, 3_000);
            self.at(d, Ev::PrinterStep { g, gen });
            let _ = job;
        }
    }

    fn printer_fault(&mut self, g: usize, f: PrinterFault) {
        self.log(|| format!("printer fault on p{g}: {f:?}"));
        match f {
            PrinterFault::Hang => {
                let p = &mut self.gws[g].printer;
                if p.ready && !p.hung {
                    p.hung = true;
                    let gen = p.gen;
                    self.at(10_000, Ev::PrinterTimeout { g, gen });
                }
            }
            PrinterFault::CablePull => {
                let p = &mut self.gws[g].printer;
                if !p.plugged {
                    return;
                }
                p.plugged = false;
                p.ready = false;
                p.stream = None;
                p.gen += 1;
                self.printer_event(
                    g,
                    PrinterEvent::Disconnected {
                        reason: "cable pulled".into(),
                    },
                );
                let d = self.rng.range(2_000, 30_000);
                self.at(d, Ev::Replug(g));
            }
            PrinterFault::ThermalRunaway => {
                let p = &mut self.gws[g].printer;
                if !p.ready || p.halted {
                    return;
                }
                p.halted = true;
                p.stream = None;
                self.printer_event(
                    g,
                    PrinterEvent::Fatal {
                        message: "Thermal Runaway, system stopped! Heater_ID: 0".into(),
                    },
                );
            }
            PrinterFault::Reset => {
                if !self.gws[g].printer.ready {
                    return;
                }
                self.gws[g].printer.gen += 1;
                self.gws[g].printer.stream = None;
                self.printer_event(g, PrinterEvent::Reset);
                if self.procs[g + 1].alive {
                    self.open_port(g);
                }
            }
            PrinterFault::FirmwareError => {
                if self.gws[g].printer.ready {
                    self.printer_event(
                        g,
                        PrinterEvent::FirmwareError {
                            message: "Error:checksum mismatch, Last Line: 12".into(),
                        },
                    );
                }
            }
        }
    }

    // ----- faults -----

    fn fault(&mut self) {
        if self.healing {
            return;
        }
        self.faults += 1;
        let n = self.procs.len();
        let roll = self.rng.range(0, 99);
        match roll {
            0..=19 => {
                let c = self.rng.index(n);
                let d = self.rng.range(1_000, 40_000);
                self.log(|| format!("FAULT partition client {c} for {d} ms"));
                self.partition(c, d);
            }
            20..=31 => {
                let c = self.rng.index(n - 1);
                self.log(|| format!("FAULT crash process {c}"));
                self.crash(c);
            }
            32..=41 => {
                let c = self.rng.index(n - 1);
                let k = self.rng.range(0, 8) as u32;
                self.log(|| format!("FAULT crash process {c} after {k} more outputs"));
                if self.procs[c].alive {
                    self.procs[c].crash_after = Some(k);
                }
            }
            42..=47 => {
                let d = self.rng.range(1_000, 10_000);
                self.log(|| format!("FAULT broker restart (amnesia), down {d} ms"));
                self.broker_restart(d);
            }
            48..=51 if !self.starts_seen.is_empty() => {
                // A late retry: a start the supervisor sent again under a new id reaches the
                // printer that already took the job (and maybe printed it): the printer's
                // ledger must refuse it. (A start reaching a printer that never took the job
                // would be the supervisor's own decision, not a fault.)
                let (g, job, topic, payload) =
                    self.starts_seen[self.rng.index(self.starts_seen.len())].clone();
                let took_it = self.accepted_on.get(&job) == Some(&g);
                if let (true, Ok(mut cmd)) = (took_it, Command::decode(&payload)) {
                    self.faults_replayed += 1;
                    cmd.id = CommandId::new(format!("replay-{}", self.faults_replayed))
                        .expect("valid id");
                    self.log(|| format!("FAULT stale start replayed on {topic}"));
                    let c = self.op_ix();
                    self.client_send(
                        c,
                        Up::Publish {
                            topic,
                            payload: cmd.encode(),
                            retain: false,
                        },
                    );
                }
            }
            48..=55 => {
                let d = self.rng.range(3_000, 30_000);
                self.log(|| format!("FAULT slow network for {d} ms"));
                self.slow = true;
                self.at(d, Ev::SlowEnd);
            }
            _ => {
                let g = self.rng.index(self.gws.len());
                let f = match self.rng.range(0, 9) {
                    0..=2 => PrinterFault::Hang,
                    3..=4 => PrinterFault::CablePull,
                    5..=6 => PrinterFault::ThermalRunaway,
                    7 => PrinterFault::Reset,
                    _ => PrinterFault::FirmwareError,
                };
                self.printer_fault(g, f);
            }
        }
        let gap = self
            .rng
            .range(self.cfg.fault_gap_ms / 4, self.cfg.fault_gap_ms * 2);
        self.at(gap, Ev::Fault);
    }

    fn partition(&mut self, c: usize, d: u64) {
        if !self.procs[c].link.up {
            return;
        }
        self.procs[c].link.up = false;
        // The TCP connection dies: both sides notice, each after its own delay.
        if let Some(conn) = self.procs[c].link.conn {
            let dc = self.rng.range(300, 5_000);
            self.at(dc, Ev::ClientNotice { c, conn });
            let db = self.rng.range(1_000, 20_000);
            self.at(db, Ev::BrokerNotice { c, conn });
        }
        self.at(d, Ev::PartitionEnd(c));
    }

    fn broker_restart(&mut self, down: u64) {
        if !self.broker.up {
            return;
        }
        self.broker.crash();
        for c in 0..self.procs.len() {
            if let Some(conn) = self.procs[c].link.conn {
                let d = self.rng.range(0, 1_000);
                self.at(d, Ev::ClientNotice { c, conn });
            }
        }
        self.at(down, Ev::BrokerUp);
    }

    fn heal(&mut self) {
        self.log(|| "HEAL: no more faults".into());
        self.healing = true;
        self.heal_at = self.now;
        self.slow = false;
        if !self.broker.up {
            self.broker.up = true;
        }
        for c in 0..self.procs.len() {
            self.procs[c].crash_after = None;
            if !self.procs[c].link.up {
                self.procs[c].link.up = true;
            }
            if !self.procs[c].alive {
                self.restart(c);
            } else {
                self.schedule_connect(c, 0);
            }
        }
        for g in 0..self.gws.len() {
            if !self.gws[g].printer.plugged {
                self.gws[g].printer.plugged = true;
                self.open_port(g);
            }
        }
        self.at(5_000, Ev::HealCheck);
    }

    // ----- the operator -----

    fn op_request(&mut self, op: ApiOp, printer: Option<PrinterId>) {
        self.op.next += 1;
        let id = CommandId::new(format!("op-{}", self.op.next)).expect("valid id");
        let req = ApiRequest {
            v: Version,
            id: id.clone(),
            client: ClientId::new("op").expect("valid"),
            op,
        };
        let payload = req.encode();
        self.op.pending.insert(id, (payload.clone(), 0, printer));
        let topic = self.topics.format(&Topic::ApiRequest);
        let c = self.op_ix();
        self.client_send(
            c,
            Up::Publish {
                topic,
                payload,
                retain: false,
            },
        );
    }

    fn operator_retry(&mut self) {
        let c = self.op_ix();
        let topic = self.topics.format(&Topic::ApiRequest);
        let mut again = Vec::new();
        for (payload, tries, _) in self.op.pending.values_mut() {
            if *tries < 30 {
                *tries += 1;
                again.push(payload.clone());
            }
        }
        for payload in again {
            self.client_send(
                c,
                Up::Publish {
                    topic: topic.clone(),
                    payload,
                    retain: false,
                },
            );
        }
        self.at(10_000, Ev::OperatorRetry);
    }

    fn operator_message(&mut self, payload: &[u8]) {
        let Ok(resp) = ApiResponse::decode(payload) else {
            self.violate("the operator got an unreadable response".into());
            return;
        };
        self.op.pending.remove(&resp.id);
        if let Some(ApiResult::Submitted { job_ids }) = resp.result {
            for j in job_ids {
                self.op.accepted.insert(j);
            }
        }
    }

    /// The operator's dashboard: the supervisor's printer list (what `printloop printers`
    /// shows), when the supervisor is up.
    fn dashboard(&self) -> Vec<protocol::api::PrinterSummary> {
        self.sup
            .machine
            .as_ref()
            .map(Supervisor::printer_summaries)
            .unwrap_or_default()
    }

    fn operator(&mut self) {
        if self.healing {
            return;
        }
        if self.submit_budget > 0 {
            self.submit_budget -= 1;
            let f = self.files[self.rng.index(self.files.len())].clone();
            let n = self.op.next;
            let priority = self.rng.range(0, 2) as i32;
            self.op_request(
                ApiOp::SubmitJob(SubmitJob {
                    name: format!("part-{n}.gcode"),
                    sha256: f,
                    copies: 1,
                    priority,
                    tags: vec![],
                }),
                None,
            );
            if self.submit_budget == 0 {
                self.at(5_000, Ev::Operator);
            }
            return;
        }
        let accepted: Vec<JobId> = self.op.accepted.iter().cloned().collect();
        let roll = self.rng.range(0, 99);
        match roll {
            0..=49 => {
                // Clears a bed the dashboard says is done.
                let done: Vec<PrinterId> = self
                    .dashboard()
                    .into_iter()
                    .filter(|p| {
                        matches!(
                            p.phase,
                            PrinterPhase::Finished
                                | PrinterPhase::Idle
                                | PrinterPhase::Error
                                | PrinterPhase::Halted
                        )
                    })
                    .map(|p| p.printer_id)
                    .collect();
                if !done.is_empty() {
                    let p = done[self.rng.index(done.len())].clone();
                    let failed = self.rng.chance(0.15);
                    self.op_request(
                        ApiOp::BedClear(BedClear {
                            printer_id: p.clone(),
                            failed,
                        }),
                        Some(p),
                    );
                }
            }
            50..=59 => {
                let p = self.gws[self.rng.index(self.gws.len())].id.clone();
                self.op_request(
                    ApiOp::BedClear(BedClear {
                        printer_id: p.clone(),
                        failed: false,
                    }),
                    Some(p),
                );
            }
            60..=71 if !accepted.is_empty() => {
                let j = accepted[self.rng.index(accepted.len())].clone();
                self.op_request(ApiOp::CancelJob(JobArgs { job_id: j }), None);
            }
            72..=83 if !accepted.is_empty() => {
                let j = accepted[self.rng.index(accepted.len())].clone();
                self.op_request(ApiOp::RequeueJob(JobArgs { job_id: j }), None);
            }
            84..=91 => {
                let g = self.rng.index(self.gws.len());
                let p = self.gws[g].id.clone();
                self.op_request(ApiOp::ReleasePrinter(PrinterArgs { printer_id: p }), None);
            }
            92..=95 => {
                self.submit_budget += 1;
            }
            _ => {}
        }
        let gap = self.rng.range(3_000, 25_000);
        self.at(gap, Ev::Operator);
    }

    /// After the faults: a diligent operator clears done beds and releases held printers;
    /// then the views must converge.
    fn heal_check(&mut self) {
        match self.converged() {
            Ok(()) => {
                self.converged_at = Some(self.now);
                return;
            }
            Err(why) => {
                if self.now > self.heal_at + self.cfg.converge_ms {
                    let views: Vec<String> = self
                        .dashboard()
                        .iter()
                        .map(|p| {
                            format!(
                                "{} {:?} stale={} {:?} job={:?} held={}",
                                p.printer_id, p.presence, p.stale, p.phase, p.job_id, p.held
                            )
                        })
                        .collect();
                    self.violate(format!(
                        "no convergence {} s after the last fault: {why}\n  supervisor's view: {}",
                        self.cfg.converge_ms / 1000,
                        views.join("; ")
                    ));
                    return;
                }
            }
        }
        let busy: BTreeSet<PrinterId> = self
            .op
            .pending
            .values()
            .filter_map(|(_, _, p)| p.clone())
            .collect();
        for p in self.dashboard() {
            if p.held {
                self.op_request(
                    ApiOp::ReleasePrinter(PrinterArgs {
                        printer_id: p.printer_id.clone(),
                    }),
                    None,
                );
            }
            let done = matches!(
                p.phase,
                PrinterPhase::Finished
                    | PrinterPhase::Idle
                    | PrinterPhase::Error
                    | PrinterPhase::Halted
            );
            if done && !busy.contains(&p.printer_id) && p.presence == Presence::Online && !p.stale {
                self.op_request(
                    ApiOp::BedClear(BedClear {
                        printer_id: p.printer_id.clone(),
                        failed: false,
                    }),
                    Some(p.printer_id),
                );
            }
        }
        self.at(5_000, Ev::HealCheck);
    }

    // ----- invariants -----

    /// Cheap checks after every step.
    fn check_step(&self) -> Result<(), String> {
        // An accepted job is never lost: every job the operator was told about is durable.
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

    fn check_sup_disk(&mut self) {
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

    /// Convergence: everyone up, no job open, and the supervisor's view of each printer equal
    /// to the gateway's.
    fn converged(&self) -> Result<(), String> {
        for (c, p) in self.procs.iter().enumerate() {
            if !p.alive || !p.link.connected {
                return Err(format!("{} is not connected", self.name(c)));
            }
        }
        let sup = self.sup.machine.as_ref().ok_or("the supervisor is down")?;
        let jobs: BTreeMap<JobId, &supervisor::model::JobRecord> =
            sup.jobs().map(|j| (j.job_id.clone(), j)).collect();
        for j in jobs.values() {
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
            // Every job the gateway ran is recorded with a compatible outcome.
            for r in gw.disk.ledger.values() {
                let Some(j) = jobs.get(&r.job_id) else {
                    return Err(format!(
                        "{} ran job {} that the supervisor does not know",
                        gw.id, r.job_id
                    ));
                };
                let ok = match r.outcome {
                    None => false,
                    Some(JobStage::Finished) => matches!(
                        j.state,
                        JobState::Finished | JobState::Done | JobState::Failed
                    ),
                    Some(JobStage::Failed) => j.state == JobState::Failed,
                    Some(JobStage::Cancelled) => j.state == JobState::Cancelled,
                    Some(JobStage::Interrupted) => j.state == JobState::Interrupted,
                    Some(_) => false,
                };
                if !ok || j.printer.as_ref() != Some(&gw.id) {
                    return Err(format!(
                        "{}: job {} ended {:?} on the printer, the supervisor has {:?} on {:?}",
                        gw.id, r.job_id, r.outcome, j.state, j.printer
                    ));
                }
            }
        }
        // Every job the supervisor says ran on a printer is in that printer's ledger.
        for j in jobs.values() {
            if matches!(
                j.state,
                JobState::Done | JobState::Failed | JobState::Interrupted
            ) {
                let on = j
                    .printer
                    .as_ref()
                    .and_then(|p| self.gws.iter().find(|g| &g.id == p));
                if !on.is_some_and(|g| g.disk.ledger.contains_key(&j.job_id)) {
                    return Err(format!(
                        "job {} is {:?} on {:?}, which never ran it",
                        j.job_id, j.state, j.printer
                    ));
                }
            }
        }
        Ok(())
    }
}
