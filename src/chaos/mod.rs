//! `printloop chaos`: the whole system as separate processes, under a seeded schedule of real
//! faults, then a check of what every process left on disk.
//!
//! 1. **Start**: a broker (`printloop broker` = rumqttd, or the system's `mosquitto` with a
//!    generated config) on a free loopback port, or a 3-node RabbitMQ cluster
//!    ([`cluster::Cluster`]); the runner's observer, subscribed before anything publishes; per
//!    printer a `printloop sim --control-stdin` on a pty and a `printloop-gateway` that reaches
//!    the broker through its own loopback [`testkit::proxy::Proxy`] (on the cluster, a failover
//!    proxy that prefers node `i mod 3 + 1`, like a TCP load balancer); the `printloop
//!    supervisor` on the broker (node 1) directly. All data in one temp dir, kept (and printed)
//!    when the run fails.
//! 2. **Work**: the runner is the operator: it uploads the built-in G-code files, keeps the queue
//!    topped up while faults run, clears beds (a failed print as failed, so it is requeued),
//!    resets halted printers and releases printers held by the circuit breaker.
//! 3. **Faults** ([`faults::Schedule`], seeded): one at a time — inject, hold, heal, then wait
//!    until the supervisor's view of every printer (`list_printers`) agrees with the printer's
//!    own retained `status` and `state` again; that time is the fault's convergence time. On the
//!    cluster the broker fault is a SIGKILL of node 2 or 3 and its restart.
//! 4. **Settle**: no more faults or new jobs; the operator goes on until every job has ended,
//!    the views agree, then every process is stopped (SIGTERM).
//! 5. **Check** ([`invariants::violations`], the one checker the simulation uses too): the
//!    supervisor's redb store and every gateway's redb ledger, opened with the crates' own store
//!    code, plus the `job_started` / `file_verified` events seen on the broker.
//!
//! Prints one JSON line on stdout; exits 0 only with no violation (each is also on stderr).

pub(crate) mod cluster;
pub mod faults;
pub(crate) mod observe;
pub(crate) mod operator;
pub(crate) mod procs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::Signal;
use protocol::api::{JobState, PrinterSummary};
use protocol::presence::Presence;
use protocol::{JobId, Topics};

use crate::ops::Endpoint;
use cluster::Cluster;
use faults::{Fault, FaultKind, Schedule};
use observe::{Observer, PrinterSeen};
use operator::Operator;
pub use procs::ChaosBroker;
use procs::{Proc, Spec};
use testkit::proxy::{LinkMode, Proxy};

/// The supervisor's timing in a chaos run: re-send a silent start after 2 s; flag a silent
/// printer's job after 60 s (longer than any fault's hold plus its convergence).
const SUPERVISOR_TOML: &str = "[timing]\ncommand_retry_s = 2\nstep_timeout_s = 60\n";

/// How often the runner looks at the system.
const TICK: Duration = Duration::from_millis(250);

/// Arguments of `printloop chaos`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// Simulated printers (each with its own gateway process).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub printers: u32,
    /// Seconds of fault injection (then the system settles and is checked).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub duration: u64,
    /// Fewest faults to play: injection goes on past `--duration` until this many were played
    /// (a slow machine converges slower, and fits fewer faults into the same seconds).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub min_faults: u32,
    /// Seed of the fault schedule (the same seed gives the same faults in the same order).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The broker: `rumqttd` (`printloop broker`), `mosquitto` (the system's binary) or
    /// `rabbitmq-cluster` (3 RabbitMQ nodes on loopback via scripts/rabbitmq-cluster.sh; needs
    /// root and `rabbitmq-server` installed; the broker fault kills and restarts node 2 or 3).
    #[arg(long, value_enum, default_value_t = ChaosBroker::Rumqttd)]
    pub broker: ChaosBroker,
    /// How much faster than real time the simulated printers run (moves and heating are
    /// instant; this scales the serial wire, so a small file prints in seconds).
    #[arg(long, default_value_t = 4.0)]
    pub speed: f64,
    /// Longest wait, in seconds, for the views to agree after a fault is healed.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub converge_timeout: u64,
    /// Longest wait, in seconds, for every job to end once faults stop.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub settle_timeout: u64,
    /// Keep the run's directory (logs, stores) even when it passes.
    #[arg(long)]
    pub keep: bool,
    /// The `printloop-gateway` binary (default: next to this executable).
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
    /// Test hook: forge a ledger entry in a gateway's store after the run, to prove the checker
    /// sees it (the run must then fail).
    #[arg(long, hide = true)]
    pub inject_violation: bool,
}

/// The JSON line's `jobs` object.
#[derive(Debug, Default, serde::Serialize)]
struct JobCounts {
    submitted: usize,
    total: usize,
    finished: usize,
    failed: usize,
    interrupted: usize,
    cancelled: usize,
    timed_out: usize,
    queued: usize,
    requeued: usize,
}

/// The JSON line.
#[derive(Debug, serde::Serialize)]
struct Report {
    seed: u64,
    broker: &'static str,
    printers: u32,
    duration_s: u64,
    faults: BTreeMap<&'static str, u32>,
    faults_total: u32,
    jobs: JobCounts,
    violations: Vec<String>,
    worst_converge_s: f64,
    worst_converge_fault: Option<String>,
    /// On the cluster: the slowest time from a node's SIGKILL until the views agreed again
    /// with that node still down (every gateway reconnected through another node).
    #[serde(skip_serializing_if = "Option::is_none")]
    worst_failover_s: Option<f64>,
    converge_s: BTreeMap<&'static str, f64>,
    settle_s: f64,
    wall_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<String>,
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Runs a chaos experiment; `Ok(true)` when it found no violation.
pub async fn run(args: ChaosArgs) -> anyhow::Result<bool> {
    let (printloop, gateway_bin, dir) =
        procs::prepare_run("chaos", args.speed, args.gateway_bin.as_deref())?;
    let started = Instant::now();
    // Ctrl-C drops the run: its child processes are killed on drop, and a RabbitMQ cluster
    // (whose nodes are not our children) is stopped by its `Drop`.
    let outcome = tokio::select! {
        outcome = Run::execute(&args, &printloop, &gateway_bin, &dir) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted (Ctrl-C)")),
    };
    let wall = started.elapsed().as_secs_f64();
    match outcome {
        Ok(mut report) => {
            report.wall_s = round1(wall);
            let ok = report.violations.is_empty();
            report.data_dir = procs::settle_dir(&dir, args.keep, ok);
            procs::print_report("chaos", &report.violations, &report, &dir)?;
            Ok(ok)
        }
        Err(e) => {
            eprintln!(
                "chaos: the run failed; kept {} (logs, stores)",
                dir.display()
            );
            Err(e)
        }
    }
}

/// The broker of a run: one process, or a RabbitMQ cluster.
enum Broker {
    Single { proc: Box<Proc>, port: u16 },
    Cluster(Cluster),
}

impl Broker {
    /// Starts it: one process on a free port, or the cluster (its script's progress in
    /// `logs/rabbitmq-cluster.log`).
    async fn start(kind: ChaosBroker, printloop: &Path, dir: &Path) -> anyhow::Result<Broker> {
        match kind.single() {
            Some(single) => {
                let (spec, port) = procs::broker_spec(single, printloop, dir)?;
                let mut proc = Box::new(Proc::new(spec));
                start_broker(&mut proc, port).await?;
                Ok(Broker::Single { proc, port })
            }
            None => Ok(Broker::Cluster(
                Cluster::start(dir, &dir.join("logs/rabbitmq-cluster.log")).await?,
            )),
        }
    }

    /// Where the supervisor, the operator and the observer connect: the broker, or node 1
    /// (which the schedule never kills).
    fn port(&self) -> u16 {
        match self {
            Broker::Single { port, .. } => *port,
            Broker::Cluster(c) => c.port(1),
        }
    }

    /// What printer `i`'s proxy forwards to: the broker, or node `i mod 3 + 1` first and the
    /// other nodes after it.
    fn upstreams(&self, i: usize) -> Vec<u16> {
        match self {
            Broker::Single { port, .. } => vec![*port],
            Broker::Cluster(c) => c.preference(i % cluster::NODES + 1),
        }
    }
}

/// The node a broker fault on the cluster kills: the faulted printer's preferred node unless
/// that is node 1 (the supervisor's), then node 2 or 3.
fn cluster_victim(printer: usize) -> usize {
    match printer % cluster::NODES + 1 {
        1 => 2 + printer % 2,
        node => node,
    }
}

/// A killed cluster node the farm has not got over yet.
#[derive(Debug, Clone)]
struct Failover {
    /// The node (1-based) and its MQTT port.
    node: usize,
    port: u16,
    /// When it was killed.
    since: Instant,
    /// The printers whose gateway was connected through it, with the epoch of the status the
    /// observer had seen from them then.
    moved: Vec<(usize, u64)>,
}

/// A fault being played.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Waiting before the next fault.
    Gap { until: Instant },
    /// The fault is on.
    Holding { fault: Fault, until: Instant },
    /// Healed at `since`; waiting for the views to agree.
    Converging { fault: Fault, since: Instant },
}

/// One chaos run: the processes, the proxies, the operator and the record.
struct Run<'a> {
    args: &'a ChaosArgs,
    dir: &'a Path,
    n: usize,
    broker: Broker,
    supervisor: Proc,
    sims: Vec<Proc>,
    gateways: Vec<Proc>,
    proxies: Vec<Proxy>,
    links: Vec<PathBuf>,
    observer: Observer,
    operator: Operator,
    faults: BTreeMap<&'static str, u32>,
    converge: Vec<(String, f64)>,
    violations: Vec<String>,
    /// Processes the schedule has taken down on purpose (not restarted by the watchdog).
    down: Vec<String>,
    /// On the cluster: a node the schedule killed, until the farm got over it.
    failover_pending: Option<Failover>,
    /// On the cluster: seconds from each node kill until the views agreed without that node.
    failover: Vec<f64>,
}

impl<'a> Run<'a> {
    async fn execute(
        args: &'a ChaosArgs,
        printloop: &Path,
        gateway_bin: &Path,
        dir: &'a Path,
    ) -> anyhow::Result<Report> {
        let n = args.printers as usize;
        let topics = Topics::new(protocol::DEFAULT_ROOT).context("topic root")?;
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).context("creating the log directory")?;

        // The broker, then the observer: subscribed before anything publishes, so it sees
        // every birth live (RabbitMQ sends no retained messages to its wildcard filters).
        let broker = Broker::start(args.broker, printloop, dir).await?;
        let url = format!("mqtt://127.0.0.1:{}", broker.port());
        let observer = Observer::start(broker.port(), topics.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        while !observer.subscribed() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the runner's observer was not subscribed within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // The printers, their links and gateways.
        let mut sims = Vec::new();
        let mut links = Vec::new();
        let mut proxies = Vec::new();
        let mut gateways = Vec::new();
        for i in 0..n {
            let link = dir.join(format!("p{i}.tty"));
            let mut sim = Proc::new(Spec {
                name: format!("sim p{i}"),
                program: printloop.to_owned(),
                args: vec![
                    "sim".into(),
                    "--link".into(),
                    link.display().to_string(),
                    "--speed".into(),
                    args.speed.to_string(),
                    "--motion-speed".into(),
                    "20000".into(),
                    "--advanced-ok".into(),
                    "--seed".into(),
                    (args.seed.wrapping_mul(1000) + i as u64).to_string(),
                    "--control-stdin".into(),
                ],
                log: logs.join(format!("sim-p{i}.log")),
                stdin: true,
            });
            start_sim(&mut sim, &link).await?;
            let proxy = Proxy::start_multi(broker.upstreams(i))
                .await
                .context("starting a link proxy")?;
            let gw = Proc::new(Spec {
                name: format!("gateway p{i}"),
                program: gateway_bin.to_owned(),
                args: vec![
                    "--id".into(),
                    format!("p{i}"),
                    "--broker".into(),
                    format!("mqtt://127.0.0.1:{}", proxy.port()),
                    "--serial".into(),
                    link.display().to_string(),
                    "--data-dir".into(),
                    dir.join(format!("gw-p{i}")).display().to_string(),
                    "--heartbeat".into(),
                    "1".into(),
                    "--keepalive".into(),
                    "2".into(),
                    // Real serial timeouts: a busy 2-core host can stall a process for
                    // seconds, and a timeout scaled to the simulator's speed would then
                    // interrupt a healthy print (see tests/e2e_fleet.rs).
                    "--time-scale".into(),
                    "1".into(),
                ],
                log: logs.join(format!("gateway-p{i}.log")),
                stdin: false,
            });
            sims.push(sim);
            links.push(link);
            proxies.push(proxy);
            gateways.push(gw);
        }
        for g in &mut gateways {
            g.start()?;
        }
        let config = dir.join("supervisor.toml");
        std::fs::write(&config, SUPERVISOR_TOML).context("writing supervisor.toml")?;
        let mut supervisor = Proc::new(Spec {
            name: "supervisor".into(),
            program: printloop.to_owned(),
            args: vec![
                "supervisor".into(),
                "--broker".into(),
                url.clone(),
                "--data-dir".into(),
                dir.join("supervisor").display().to_string(),
                "--config".into(),
                config.display().to_string(),
                "--metrics".into(),
                "off".into(),
                "--http".into(),
                "off".into(),
            ],
            log: logs.join("supervisor.log"),
            stdin: false,
        });
        supervisor.start()?;

        let ep = Endpoint::new(&url, protocol::DEFAULT_ROOT, Duration::from_secs(3))
            .context("endpoint")?;
        let mut run = Run {
            args,
            dir,
            n,
            broker,
            supervisor,
            sims,
            gateways,
            proxies,
            links,
            observer,
            operator: Operator::new(ep),
            faults: BTreeMap::new(),
            converge: Vec::new(),
            violations: Vec::new(),
            down: Vec::new(),
            failover_pending: None,
            failover: Vec::new(),
        };
        let report = run.play().await;
        if report.is_err() {
            eprintln!("{}", run.logs());
        }
        run.stop_all().await;
        let mut report = report?;
        if args.inject_violation {
            forge_ledger_entry(&dir.join("gw-p0/gateway.redb"))?;
        }
        let evidence = run.evidence(&mut report.violations);
        report.violations.extend(invariants::violations(&evidence));
        report.jobs = counts(&evidence);
        Ok(report)
    }

    /// Start-up, work, faults, settling. Processes still run when it returns.
    async fn play(&mut self) -> anyhow::Result<Report> {
        self.await_fleet_up().await?;
        self.upload().await?;
        let inject_start = Instant::now();
        let inject_until = inject_start + Duration::from_secs(self.args.duration);
        let mut schedule = Schedule::new(self.args.seed, self.n);
        let converge_limit = Duration::from_secs(self.args.converge_timeout);
        // Let the first jobs start before the first fault.
        let mut stage = Stage::Gap {
            until: Instant::now() + Duration::from_secs(2),
        };
        let mut fault_no = 0u32;
        let mut last_why = String::new();
        loop {
            self.watchdog().await;
            self.operate(true).await;
            if self.failover_pending.is_some() {
                // A node is down (the cluster's broker fault): note when the farm got over it.
                let _ = self.failed_over().await;
            }
            let now = Instant::now();
            stage = match stage {
                Stage::Gap { until } if now >= until => {
                    if now >= inject_until && fault_no >= self.args.min_faults {
                        break;
                    }
                    let fault = schedule.next_fault();
                    fault_no += 1;
                    eprintln!(
                        "chaos: [{:>5.1}s] fault #{fault_no}: {} on p{} for {:?}",
                        now.duration_since(inject_start).as_secs_f64(),
                        fault.kind.name(),
                        fault.printer,
                        fault.hold
                    );
                    self.inject(fault).await?;
                    *self.faults.entry(fault.kind.name()).or_default() += 1;
                    Stage::Holding {
                        fault,
                        until: Instant::now() + fault.hold,
                    }
                }
                Stage::Holding { fault, until } if now >= until => {
                    self.heal(fault).await?;
                    Stage::Converging {
                        fault,
                        since: Instant::now(),
                    }
                }
                Stage::Converging { fault, since } => match self.agreement().await {
                    Ok(()) => {
                        let secs = since.elapsed().as_secs_f64();
                        eprintln!(
                            "chaos:          converged {secs:.1} s after healing {}",
                            fault.kind.name()
                        );
                        self.converge.push((fault.kind.name().to_owned(), secs));
                        Stage::Gap {
                            until: Instant::now() + fault.gap,
                        }
                    }
                    Err(why) if since.elapsed() > converge_limit => {
                        self.violations.push(format!(
                            "no convergence within {} s after healing fault #{fault_no} ({} on p{}): {why}",
                            converge_limit.as_secs(),
                            fault.kind.name(),
                            fault.printer
                        ));
                        self.converge
                            .push((fault.kind.name().to_owned(), since.elapsed().as_secs_f64()));
                        Stage::Gap {
                            until: Instant::now(),
                        }
                    }
                    Err(why) => {
                        // Each new reason once: a slow convergence explains itself in the log.
                        if why != last_why {
                            eprintln!(
                                "chaos:          [{:>5.1}s after healing] {why}",
                                since.elapsed().as_secs_f64()
                            );
                            last_why = why;
                        }
                        stage
                    }
                },
                other => other,
            };
            tokio::time::sleep(TICK).await;
        }

        // Settle: no new faults, no new jobs; the operator carries on.
        eprintln!("chaos: faults over; settling");
        let settle_start = Instant::now();
        let settle_limit = Duration::from_secs(self.args.settle_timeout);
        loop {
            self.watchdog().await;
            self.operate(false).await;
            let open = match self.operator.jobs().await {
                Some(jobs) => jobs
                    .into_iter()
                    .filter(|j| !invariants::settled(j.state) || j.state == JobState::Queued)
                    .map(|j| format!("{} {:?}", j.job_id, j.state).to_lowercase())
                    .collect::<Vec<_>>(),
                None => vec!["(the supervisor did not answer)".into()],
            };
            let agreed = self.agreement().await;
            if open.is_empty() && agreed.is_ok() {
                break;
            }
            if settle_start.elapsed() > settle_limit {
                self.violations.push(format!(
                    "the system did not settle within {} s: open jobs {open:?}; views: {}",
                    settle_limit.as_secs(),
                    agreed.err().unwrap_or_else(|| "agree".into())
                ));
                break;
            }
            tokio::time::sleep(TICK * 2).await;
        }
        let settle_s = settle_start.elapsed().as_secs_f64();
        eprintln!("chaos: settled in {settle_s:.1} s");

        let worst = self
            .converge
            .iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .cloned();
        let mut per_kind: BTreeMap<&'static str, f64> = BTreeMap::new();
        for (k, s) in &self.converge {
            if let Some(kind) = FaultKind::ALL.iter().find(|f| f.name() == k) {
                let e = per_kind.entry(kind.name()).or_default();
                *e = round1(e.max(*s));
            }
        }
        Ok(Report {
            seed: self.args.seed,
            broker: self.args.broker.name(),
            printers: self.args.printers,
            duration_s: self.args.duration,
            faults_total: self.faults.values().sum(),
            faults: self.faults.clone(),
            jobs: JobCounts::default(),
            violations: std::mem::take(&mut self.violations),
            worst_converge_s: round1(worst.as_ref().map_or(0.0, |w| w.1)),
            worst_converge_fault: worst.map(|w| w.0),
            worst_failover_s: self.failover.iter().copied().reduce(f64::max).map(round1),
            converge_s: per_kind,
            settle_s: round1(settle_s),
            wall_s: 0.0,
            data_dir: None,
        })
    }

    async fn await_fleet_up(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.agreement().await.is_ok() {
                eprintln!("chaos: {} printers up", self.n);
                return Ok(());
            }
            if Instant::now() > deadline {
                let why = self.agreement().await.err().unwrap_or_default();
                anyhow::bail!("the fleet did not come up within 60 s: {why}");
            }
            self.watchdog().await;
            tokio::time::sleep(TICK).await;
        }
    }

    async fn upload(&mut self) -> anyhow::Result<()> {
        self.operator.upload(&self.dir.join("gcode")).await
    }

    /// Restarts a process that died without being told to (and records it: nothing in the
    /// system may crash by itself).
    async fn watchdog(&mut self) {
        let mut crashed = Vec::new();
        match &mut self.broker {
            Broker::Single { proc, port } => {
                if !self.down.iter().any(|d| d == "broker") && !proc.is_running() {
                    crashed.push(proc.name().to_owned());
                    let _ = start_broker(proc, *port).await;
                }
            }
            Broker::Cluster(c) => {
                for node in c.crashed() {
                    crashed.push(format!("RabbitMQ node pl{node}"));
                    if let Err(e) = c.restart(node).await {
                        eprintln!("chaos: restarting node pl{node}: {e:#}");
                    }
                }
            }
        }
        if !self.down.iter().any(|d| d == "supervisor") && !self.supervisor.is_running() {
            crashed.push(self.supervisor.name().to_owned());
            let _ = self.supervisor.start();
        }
        for i in 0..self.n {
            if !self.down.contains(&format!("sim p{i}")) && !self.sims[i].is_running() {
                crashed.push(self.sims[i].name().to_owned());
                let _ = start_sim(&mut self.sims[i], &self.links[i]).await;
            }
            if !self.down.contains(&format!("gateway p{i}")) && !self.gateways[i].is_running() {
                crashed.push(self.gateways[i].name().to_owned());
                let _ = self.gateways[i].start();
            }
        }
        for c in crashed {
            self.violations
                .push(format!("{c} exited on its own (restarted; see its log)"));
        }
    }

    /// One round of the operator: clear beds, reset halted printers, release held ones and,
    /// while `submit`, keep the queue topped up (in runs of 30 s or more every fourth job is
    /// the cylinder, four times longer).
    async fn operate(&mut self, submit: bool) {
        let long_jobs = self.args.duration >= 30;
        self.operator
            .operate(submit, long_jobs, self.n.div_ceil(2))
            .await;
    }

    /// `Ok` when the supervisor's view of every printer agrees with the printer's own retained
    /// status and state; otherwise the first disagreement.
    async fn agreement(&mut self) -> Result<(), String> {
        let seen = self.observer.printers();
        let Some(sup) = self.operator.printers().await else {
            return Err("the supervisor does not answer".into());
        };
        agree(self.n, &sup, &seen)
    }

    async fn inject(&mut self, f: Fault) -> anyhow::Result<()> {
        let p = f.printer;
        match f.kind {
            FaultKind::KillGateway => {
                self.down.push(self.gateways[p].name().to_owned());
                self.gateways[p].kill().await;
            }
            FaultKind::KillSupervisor => {
                self.down.push("supervisor".into());
                self.supervisor.kill().await;
            }
            FaultKind::KillSimulator => {
                self.down.push(self.sims[p].name().to_owned());
                self.sims[p].kill().await;
            }
            FaultKind::RestartBroker => {
                self.down.push("broker".into());
                match &mut self.broker {
                    Broker::Single { proc, .. } => proc.kill().await,
                    Broker::Cluster(c) => {
                        let node = cluster_victim(p);
                        eprintln!("chaos:          SIGKILL of RabbitMQ node pl{node}");
                        let port = c.port(node);
                        let seen = self.observer.printers();
                        let moved = (0..self.n)
                            .filter(|&i| self.proxies[i].connections_to(port) > 0)
                            .map(|i| {
                                let epoch = seen
                                    .get(&format!("p{i}"))
                                    .and_then(|o| o.status.as_ref())
                                    .map_or(0, |st| st.epoch);
                                (i, epoch)
                            })
                            .collect();
                        let since = Instant::now();
                        c.kill(node).await?;
                        self.failover_pending = Some(Failover {
                            node,
                            port,
                            since,
                            moved,
                        });
                    }
                }
            }
            FaultKind::Partition => self.proxies[p].set(LinkMode::Partition),
            FaultKind::CutLink => self.proxies[p].set(LinkMode::Cut),
            FaultKind::DelayLink => self.proxies[p].set(LinkMode::Delay(f.delay)),
            FaultKind::CablePull => self.sims[p].send_line("cable_pull").await?,
            FaultKind::ThermalRunaway => self.sims[p].send_line("thermal_runaway").await?,
        }
        Ok(())
    }

    async fn heal(&mut self, f: Fault) -> anyhow::Result<()> {
        let p = f.printer;
        self.down.clear();
        match f.kind {
            FaultKind::KillGateway => self.gateways[p].start()?,
            FaultKind::KillSupervisor => self.supervisor.start()?,
            FaultKind::KillSimulator => start_sim(&mut self.sims[p], &self.links[p]).await?,
            FaultKind::RestartBroker => {
                self.await_failover().await;
                match &mut self.broker {
                    Broker::Single { proc, port } => start_broker(proc, *port).await?,
                    Broker::Cluster(c) => {
                        let node = cluster_victim(p);
                        let t = Instant::now();
                        c.restart(node).await?;
                        eprintln!(
                            "chaos:          RabbitMQ node pl{node} rejoined in {:.1} s",
                            t.elapsed().as_secs_f64()
                        );
                    }
                }
            }
            FaultKind::Partition | FaultKind::CutLink | FaultKind::DelayLink => {
                self.proxies[p].set(LinkMode::Pass)
            }
            FaultKind::CablePull => self.sims[p].send_line("replug").await?,
            FaultKind::ThermalRunaway => {}
        }
        Ok(())
    }

    /// On the cluster, after a node's SIGKILL: `Ok` once every gateway that was connected
    /// through that node is online again through another one (a newer status on the broker, no
    /// connection left to the dead node) and the views agree, with the node still down; the
    /// time from the kill is recorded. Checked on every tick of the hold, then by
    /// [`Run::await_failover`]. (Agreement alone proves nothing here: no will is published
    /// when a node dies, so right after the kill every view still says "online".)
    async fn failed_over(&mut self) -> Result<(), String> {
        let Some(f) = self.failover_pending.clone() else {
            return Ok(());
        };
        let seen = self.observer.printers();
        for &(i, epoch) in &f.moved {
            let now = seen
                .get(&format!("p{i}"))
                .and_then(|o| o.status.as_ref())
                .map_or(0, |st| st.epoch);
            if now <= epoch || self.proxies[i].connections_to(f.port) > 0 {
                return Err(format!(
                    "p{i} is not back through another node yet (status epoch {now}, was {epoch})"
                ));
            }
        }
        self.agreement().await?;
        let (node, secs) = (f.node, f.since.elapsed().as_secs_f64());
        let moved = f
            .moved
            .iter()
            .map(|(i, _)| format!("p{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        eprintln!(
            "chaos:          gateways moved: {}; views agree with pl{node} down, {secs:.1} s after its SIGKILL",
            if moved.is_empty() { "(no gateway was on it)".to_owned() } else { moved }
        );
        self.failover.push(secs);
        self.failover_pending = None;
        Ok(())
    }

    /// Before a killed node is restarted: waits (up to `--converge-timeout`, the operator
    /// working on) for [`Run::failed_over`]. Not agreeing in time is a violation: the farm must
    /// not need the dead node back.
    async fn await_failover(&mut self) {
        let limit = Duration::from_secs(self.args.converge_timeout);
        let waiting = Instant::now();
        loop {
            let Some(node) = self.failover_pending.as_ref().map(|f| f.node) else {
                return;
            };
            match self.failed_over().await {
                Ok(_) => return,
                Err(why) if waiting.elapsed() > limit => {
                    self.violations.push(format!(
                        "no failover: the views did not agree within {} s with RabbitMQ node \
                         pl{node} down: {why}",
                        limit.as_secs()
                    ));
                    self.failover_pending = None;
                    return;
                }
                Err(_) => {}
            }
            self.watchdog().await;
            self.operate(true).await;
            tokio::time::sleep(TICK).await;
        }
    }

    /// Orderly stops: the supervisor and gateways release their redb files.
    async fn stop_all(&mut self) {
        if let Some(api) = self.operator.api.take() {
            api.close().await;
        }
        let mut clean = self.supervisor.stop(Signal::SIGTERM).await;
        for g in &mut self.gateways {
            clean &= g.stop(Signal::SIGTERM).await;
        }
        if !clean {
            tracing::warn!(
                "a process had to be killed at the end; its store is read as a crash left it"
            );
        }
        for s in &mut self.sims {
            s.stop(Signal::SIGTERM).await;
        }
        match &mut self.broker {
            Broker::Single { proc, .. } => {
                proc.stop(Signal::SIGTERM).await;
            }
            Broker::Cluster(c) => c.stop().await,
        }
        for p in &self.proxies {
            p.set(LinkMode::Cut);
        }
    }

    /// Reads every store; a store that cannot be read is a violation.
    fn evidence(&self, violations: &mut Vec<String>) -> invariants::Evidence {
        read_evidence(
            self.dir,
            self.n,
            self.operator.submitted.clone(),
            self.observer.observed(),
            violations,
        )
    }

    fn logs(&self) -> String {
        let mut s = format!("--- supervisor (tail) ---\n{}", self.supervisor.tail(30));
        for g in &self.gateways {
            s += &format!("\n--- {} (tail) ---\n{}", g.name(), g.tail(15));
        }
        if let Broker::Cluster(c) = &self.broker {
            for node in 1..=cluster::NODES {
                s += &format!(
                    "\n--- RabbitMQ node pl{node} (tail) ---\n{}",
                    c.tail(node, 10)
                );
            }
        }
        s
    }
}

/// The evidence for [`invariants::violations`]: the supervisor's store and every gateway's ledger
/// under `dir` (`supervisor/`, `gw-p<i>/`), read after every process stopped; a store that
/// cannot be read is a violation.
pub(crate) fn read_evidence(
    dir: &Path,
    n: usize,
    submitted: Vec<JobId>,
    observed: invariants::Observed,
    violations: &mut Vec<String>,
) -> invariants::Evidence {
    let mut ev = invariants::Evidence {
        submitted,
        observed,
        ..Default::default()
    };
    let sup = dir.join("supervisor/supervisor.redb");
    match supervisor::store::Store::open(&sup).and_then(|s| s.load()) {
        Ok(snap) => ev.jobs = snap.jobs,
        Err(e) => violations.push(format!("cannot read the supervisor's store: {e}")),
    }
    for i in 0..n {
        let path = dir.join(format!("gw-p{i}/gateway.redb"));
        match gateway::store::Store::open(&path).and_then(|s| s.load()) {
            Ok(snap) => ev.gateways.push(invariants::GatewayLedger {
                printer: format!("p{i}"),
                ledger: snap.ledger,
                current: snap.current.map(|c| (c.job_id, c.file_sha256)),
                verified_files: snap
                    .files
                    .into_iter()
                    .filter(|f| f.verified)
                    .map(|f| f.sha256)
                    .collect(),
            }),
            Err(e) => violations.push(format!("cannot read p{i}'s store {}: {e}", path.display())),
        }
    }
    ev
}

/// The first disagreement between the supervisor's printers and the retained topics.
fn agree(
    n: usize,
    sup: &[PrinterSummary],
    seen: &BTreeMap<String, PrinterSeen>,
) -> Result<(), String> {
    for i in 0..n {
        let id = format!("p{i}");
        let s = sup
            .iter()
            .find(|s| s.printer_id.as_str() == id)
            .ok_or_else(|| format!("the supervisor does not list {id}"))?;
        let o = seen
            .get(&id)
            .ok_or_else(|| format!("nothing retained for {id}"))?;
        let status = o
            .status
            .as_ref()
            .ok_or_else(|| format!("{id} has no status"))?;
        if status.presence != Presence::Online {
            return Err(format!("{id} is offline (epoch {})", status.epoch));
        }
        let state = o
            .state
            .as_ref()
            .filter(|st| st.epoch == status.epoch)
            .ok_or_else(|| format!("{id} has no state of its current connection"))?;
        if s.presence != Presence::Online || s.stale {
            return Err(format!(
                "{id} is online, the supervisor sees it {:?}{}",
                s.presence,
                if s.stale { " (stale)" } else { "" }
            ));
        }
        if s.phase != state.phase {
            return Err(format!(
                "{id} is {:?}, the supervisor sees {:?}",
                state.phase, s.phase
            ));
        }
        if let Some(j) = &state.job {
            if s.job_id.as_ref() != Some(&j.job_id) {
                return Err(format!(
                    "{id} has job {}, the supervisor sees {:?}",
                    j.job_id, s.job_id
                ));
            }
        }
    }
    Ok(())
}

fn counts(ev: &invariants::Evidence) -> JobCounts {
    let mut c = JobCounts {
        submitted: ev.submitted.len(),
        total: ev.jobs.len(),
        ..Default::default()
    };
    for j in &ev.jobs {
        match j.state {
            JobState::Done | JobState::Finished => c.finished += 1,
            JobState::Failed => c.failed += 1,
            JobState::Interrupted => c.interrupted += 1,
            JobState::Cancelled => c.cancelled += 1,
            JobState::TimedOut => c.timed_out += 1,
            JobState::Queued => c.queued += 1,
            _ => {}
        }
        if j.retry_of.is_some() {
            c.requeued += 1;
        }
    }
    c
}

pub(crate) async fn start_broker(broker: &mut Proc, port: u16) -> anyhow::Result<()> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    for attempt in 1..=3 {
        broker.start()?;
        if procs::wait_port(addr, Duration::from_secs(10)).await && broker.is_running() {
            return Ok(());
        }
        tracing::warn!(attempt, "the broker did not come up; trying again");
        broker.kill().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!(
        "the broker did not start on port {port}; its log:\n{}",
        broker.tail(20)
    )
}

pub(crate) async fn start_sim(sim: &mut Proc, link: &Path) -> anyhow::Result<()> {
    // A killed simulator leaves its link behind (and its pty number may be reused): remove it,
    // so the new link proves the new simulator is up.
    if !sim.is_running() {
        let _ = std::fs::remove_file(link);
    }
    sim.start()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::fs::symlink_metadata(link).is_ok() {
            return Ok(());
        }
        if !sim.is_running() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!(
        "{} did not link {}; its log:\n{}",
        sim.name(),
        link.display(),
        sim.tail(20)
    )
}

/// The `--inject-violation` hook: a ledger entry for a job the supervisor never made.
fn forge_ledger_entry(path: &Path) -> anyhow::Result<()> {
    let store = gateway::store::Store::open(path).context("opening p0's store to forge")?;
    store
        .apply(&[gateway::store::Mutation::PutLedger(
            gateway::store::LedgerRecord {
                job_id: JobId::new("chaos-forged").context("job id")?,
                outcome: Some(protocol::state::JobStage::Finished),
                line: 1,
                accepted_at_ms: 1,
                ended_at_ms: Some(2),
            },
        )])
        .context("forging a ledger entry")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::presence::Status;
    use protocol::state::PrinterPhase;
    use protocol::state::StateSnapshot;
    use protocol::Payload as _;
    use protocol::PrinterId;

    fn summary(id: &str, phase: PrinterPhase, presence: Presence) -> PrinterSummary {
        PrinterSummary {
            printer_id: PrinterId::new(id).expect("id"),
            presence,
            stale: false,
            phase,
            job_id: None,
            progress_pct: None,
            held: false,
            consecutive_failures: 0,
            enrolled: true,
        }
    }

    fn seen(epoch: u64, phase: &str) -> PrinterSeen {
        PrinterSeen {
            status: Some(
                Status::decode(
                    format!(r#"{{"v":1,"presence":"online","epoch":{epoch},"at_ms":1}}"#)
                        .as_bytes(),
                )
                .expect("status"),
            ),
            state: Some(
                StateSnapshot::decode(
                    format!(
                        r#"{{"v":1,"epoch":{epoch},"seq":3,"at_ms":1,"heartbeat_s":1,"phase":"{phase}","bed_clear":false}}"#
                    )
                    .as_bytes(),
                )
                .expect("state"),
            ),
        }
    }

    #[test]
    fn a_node_fault_spares_node_1_and_hits_a_gateways_node() {
        for printer in 0..32 {
            let node = cluster_victim(printer);
            assert!((2..=cluster::NODES).contains(&node), "p{printer}: pl{node}");
            if printer % cluster::NODES + 1 != 1 {
                assert_eq!(node, printer % cluster::NODES + 1, "p{printer}'s own node");
            }
        }
    }

    #[test]
    fn views_agree_only_on_the_same_phase_and_presence_of_the_current_connection() {
        let sup = vec![summary("p0", PrinterPhase::Idle, Presence::Online)];
        let mut seen_map = BTreeMap::from([("p0".to_owned(), seen(2, "idle"))]);
        assert_eq!(agree(1, &sup, &seen_map), Ok(()));

        let printing = vec![summary("p0", PrinterPhase::Printing, Presence::Online)];
        assert!(agree(1, &printing, &seen_map)
            .expect_err("phase")
            .contains("supervisor sees Printing"));

        let offline = vec![summary("p0", PrinterPhase::Idle, Presence::Offline)];
        assert!(agree(1, &offline, &seen_map).is_err());

        // A state of an older connection does not count.
        let mut old = seen(2, "idle");
        old.state = seen(1, "idle").state;
        seen_map.insert("p0".into(), old);
        assert!(agree(1, &sup, &seen_map)
            .expect_err("old state")
            .contains("current connection"));

        assert!(agree(2, &sup, &BTreeMap::new()).is_err());
    }
}
