//! `printloop adversary`: the adversarial suite of issue #10 — one hostile MQTT client against
//! the real processes, one attack class after another, while a probe measures what an honest
//! client still gets.
//!
//! 1. **Start** (the chaos runner's parts, [`crate::chaos`]): a broker, `printloop supervisor`,
//!    two `printloop sim` printers each with its `printloop-gateway`, on loopback ports chosen
//!    now, all in one temp dir (kept when the run fails). The printers are enrolled as an
//!    operator would (`printloop printers add`, `printloop clients add`), so the supervisor
//!    gives work only to p0 and p1. On Mosquitto the broker runs with logins and the ACL that
//!    `printloop clients mosquitto` writes, and the attacker logs in as the `nodered` role;
//!    the broker's log (`log_type debug`) says which of its publishes it denied.
//! 2. **Work**: an operator task keeps two jobs waiting and clears beds the whole time.
//! 3. **Classes** ([`classes::CLASSES`]): each attacks for a bounded time, then the run waits
//!    [`AFTERMATH`] (or three heartbeats and a second, if longer) and checks that the real
//!    printers' and the supervisor's retained topics hold their owners' truth again and that
//!    the supervisor sees both printers online and fresh. The probe's figures over the class
//!    (attack and aftermath) give the command latency, the API latency and the state gap. A
//!    problem that lingers is reported by the class that caused it (and at the end). Then the
//!    next class waits (at most [`RECOVERY`]) until commands are answered within 1 s again.
//! 4. **End**: no new jobs; every job must end `finished`; then the processes stop and the
//!    chaos checker reads their stores (no job printed twice, outcomes agree); both printers
//!    online with their real epoch; no `panicked`, no raw ESC and no forged line in any log.
//!
//! One JSON line per class, then a summary line, on stdout; exit status 0 only with no
//! violation.

mod attacker;
pub mod classes;
mod probe;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::Signal;
use protocol::api::JobState;
use protocol::presence::{Meta, Presence, Status};
use protocol::state::StateSnapshot;
use protocol::{JobId, Payload as _, PrinterId, Topic, Topics};
use rumqttc::{AsyncClient, QoS, SubscribeFilter};
use serde_json::Value;
use transport::{Acks, Forwarding, MqttEvent, Out, Reconnect};

use crate::chaos::observe::Observer;
use crate::chaos::operator::Operator;
use crate::chaos::procs::{self, BrokerKind, Proc, Spec};
use crate::ops::{Credentials, Endpoint};
use attacker::Attacker;
use probe::{Conn, Forged, Probe, ProbeCommand};

/// How long after a class its retained topics and the supervisor's view are checked.
const AFTERMATH: Duration = Duration::from_secs(5);

/// Longest wait after a class's checks for the system to recover before the next class.
const RECOVERY: Duration = Duration::from_secs(20);

/// The gateways' state heartbeat, in seconds.
const HEARTBEAT_S: u64 = 2;

/// A command answered later than this is a violation (issue #10's steady-state hypothesis).
const MAX_CMD_LATENCY_MS: u64 = 2000;

/// Printers in the farm.
const PRINTERS: usize = 2;

/// The supervisor's timing: re-send a silent start after 2 s; flag a silent printer's job
/// after 60 s.
const SUPERVISOR_TIMING: &str = "[timing]\ncommand_retry_s = 2\nstep_timeout_s = 60\n";

/// Arguments of `printloop adversary`.
#[derive(Debug, Clone, clap::Args)]
pub struct AdversaryArgs {
    /// The broker: `rumqttd` (`printloop broker`) or `mosquitto` (the system's binary, with
    /// logins and the generated ACL; the attacker logs in as the `nodered` role).
    #[arg(long, value_enum, default_value_t = BrokerKind::Rumqttd)]
    pub broker: BrokerKind,
    /// Only these classes, comma-separated (default: all, in order).
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<String>,
    /// Seconds each flood lasts.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub attack_secs: u64,
    /// How much faster than real time the simulated printers run.
    #[arg(long, default_value_t = 8.0)]
    pub speed: f64,
    /// The probe's harmless command. `rebirth` makes every gateway re-publish its retained
    /// topics five times a second, which repairs forged ones whatever the gateway does.
    #[arg(long, value_enum, default_value_t = ProbeCommand::Pause)]
    pub probe_command: ProbeCommand,
    /// Longest wait, in seconds, for every job to end after the last class.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub settle_timeout: u64,
    /// Keep the run's directory (logs, stores) even when it passes.
    #[arg(long)]
    pub keep: bool,
    /// The `printloop-gateway` binary (default: next to this executable).
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
}

/// One class's JSON line.
#[derive(Debug, serde::Serialize)]
struct ClassLine {
    class: String,
    broker: &'static str,
    messages_sent: u64,
    worst_cmd_latency_ms: u64,
    worst_api_latency_ms: u64,
    worst_state_gap_ms: u64,
    violations: Vec<String>,
    duration_s: f64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    details: BTreeMap<&'static str, Value>,
    /// Mosquitto only: the attacker's publishes the broker denied, by topic.
    #[serde(skip_serializing_if = "Option::is_none")]
    broker_denied: Option<BTreeMap<String, u64>>,
}

/// The summary line.
#[derive(Debug, serde::Serialize)]
struct Summary {
    broker: &'static str,
    classes: usize,
    violations: Vec<String>,
    jobs: BTreeMap<String, usize>,
    wall_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<String>,
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Runs the suite; `Ok(true)` when it found no violation.
pub async fn run(args: AdversaryArgs) -> anyhow::Result<bool> {
    for c in &args.classes {
        anyhow::ensure!(
            classes::CLASSES.contains(&c.as_str()),
            "unknown class {c:?} (one of: {})",
            classes::CLASSES.join(", ")
        );
    }
    let (printloop, gateway_bin, dir) =
        crate::chaos::procs::prepare_run("adversary", args.speed, args.gateway_bin.as_deref())?;
    let started = Instant::now();
    let mut farm = match Farm::start(&args, &printloop, &gateway_bin, &dir).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("adversary: setup failed; kept {}", dir.display());
            return Err(e);
        }
    };
    let outcome = farm.play(&args).await;
    farm.stop().await;
    let mut summary = match outcome {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "adversary: the run failed; kept {} (logs, stores)\n{}",
                dir.display(),
                farm.tails()
            );
            return Err(e);
        }
    };
    farm.final_checks(&mut summary);
    summary.wall_s = round1(started.elapsed().as_secs_f64());
    let ok = summary.violations.is_empty();
    summary.data_dir = crate::chaos::procs::settle_dir(&dir, args.keep, ok);
    crate::chaos::procs::print_report("adversary", &summary.violations, &summary, &dir)?;
    Ok(ok)
}

/// The logins of a run on Mosquitto.
struct Logins {
    operator: (String, String),
    attacker: (String, String),
}

/// The processes and clients of one run.
struct Farm {
    dir: PathBuf,
    kind: BrokerKind,
    topics: Topics,
    broker: Proc,
    supervisor: Proc,
    sims: Vec<Proc>,
    gateways: Vec<Proc>,
    /// How the probe, checker and observer connect (operator login on Mosquitto).
    conn: Conn,
    /// How the attacker connects (`nodered` login on Mosquitto).
    attacker_conn: Conn,
    ep: Endpoint,
    observer: Observer,
    checker: Operator,
    job_file: (protocol::Sha256Hex, u64),
    idle_file: protocol::Sha256Hex,
    /// The operator task: keeps jobs flowing; gives the operator back when stopped.
    operator: Option<tokio::task::JoinHandle<Operator>>,
    submit: Arc<AtomicBool>,
    stop_operator: Arc<AtomicBool>,
    submitted: Vec<JobId>,
    violations: Vec<String>,
}

/// Runs `printloop <args>` to completion (enrolment), quietly; its output on failure.
fn enrol(printloop: &Path, args: &[String]) -> anyhow::Result<()> {
    let out = std::process::Command::new(printloop)
        .args(args)
        .output()
        .with_context(|| format!("running printloop {}", args.join(" ")))?;
    anyhow::ensure!(
        out.status.success(),
        "printloop {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn read_password(path: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

impl Farm {
    async fn start(
        args: &AdversaryArgs,
        printloop: &Path,
        gateway_bin: &Path,
        dir: &Path,
    ) -> anyhow::Result<Farm> {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).context("creating the log directory")?;
        let topics = Topics::default();
        let sup_dir = dir.join("supervisor");
        let s = |p: &Path| p.display().to_string();

        // The broker's port first: enrolment writes it into each gateway's config.
        let (broker_spec, port) = match args.broker {
            BrokerKind::Rumqttd => procs::broker_spec(BrokerKind::Rumqttd, printloop, dir)?,
            BrokerKind::Mosquitto => {
                let port = broker::free_port(std::net::IpAddr::from([127, 0, 0, 1]))
                    .context("finding a free port for mosquitto")?;
                (mosquitto_spec(dir, port)?, port)
            }
        };
        let url = format!("mqtt://127.0.0.1:{port}");

        // Enrolment, as an operator does it: the printers, the supervisor, Node-RED (the
        // attacker's role) and an operator (the runner's probe, checker and operator loop).
        for i in 0..PRINTERS {
            enrol(
                printloop,
                &[
                    "printers".into(),
                    "add".into(),
                    format!("p{i}"),
                    "--broker-url".into(),
                    url.clone(),
                    "--serial".into(),
                    s(&dir.join(format!("p{i}.tty"))),
                    "--out".into(),
                    s(&dir.join(format!("gateway-p{i}.toml"))),
                    "--data-dir".into(),
                    s(&sup_dir),
                ],
            )?;
        }
        for (user, role) in [
            ("supervisor", "supervisor"),
            ("nodered", "nodered"),
            ("operator", "operator"),
        ] {
            enrol(
                printloop,
                &[
                    "clients".into(),
                    "add".into(),
                    user.into(),
                    "--role".into(),
                    role.into(),
                    "--password-file".into(),
                    s(&dir.join(format!("{user}.password"))),
                    "--data-dir".into(),
                    s(&sup_dir),
                ],
            )?;
        }
        let password = |user: &str| read_password(&dir.join(format!("{user}.password")));
        let logins = match args.broker {
            BrokerKind::Rumqttd => None,
            BrokerKind::Mosquitto => {
                enrol(
                    printloop,
                    &[
                        "clients".into(),
                        "mosquitto".into(),
                        "--out".into(),
                        s(&dir.join("mosquitto")),
                        "--data-dir".into(),
                        s(&sup_dir),
                    ],
                )?;
                Some(Logins {
                    operator: ("operator".into(), password("operator")?),
                    attacker: ("nodered".into(), password("nodered")?),
                })
            }
        };

        let mut broker = Proc::new(broker_spec);
        crate::chaos::start_broker(&mut broker, port).await?;

        let mut sims = Vec::new();
        let mut gateways = Vec::new();
        for i in 0..PRINTERS {
            let link = dir.join(format!("p{i}.tty"));
            let mut sim = Proc::new(Spec {
                name: format!("sim p{i}"),
                program: printloop.to_owned(),
                args: vec![
                    "sim".into(),
                    "--link".into(),
                    s(&link),
                    "--speed".into(),
                    args.speed.to_string(),
                    "--motion-speed".into(),
                    "20000".into(),
                    "--advanced-ok".into(),
                    "--seed".into(),
                    (1000 + i).to_string(),
                ],
                log: logs.join(format!("sim-p{i}.log")),
                stdin: false,
            });
            crate::chaos::start_sim(&mut sim, &link).await?;
            let mut gw = Proc::new(Spec {
                name: format!("gateway p{i}"),
                program: gateway_bin.to_owned(),
                args: vec![
                    // The enrolled config: its id, the broker, its login.
                    "--config".into(),
                    s(&dir.join(format!("gateway-p{i}.toml"))),
                    "--serial".into(),
                    s(&link),
                    "--data-dir".into(),
                    s(&dir.join(format!("gw-p{i}"))),
                    "--heartbeat".into(),
                    HEARTBEAT_S.to_string(),
                    // Real serial timeouts (a busy 2-core host stalls processes; see chaos).
                    "--time-scale".into(),
                    "1".into(),
                ],
                log: logs.join(format!("gateway-p{i}.log")),
                stdin: false,
            });
            gw.start()?;
            sims.push(sim);
            gateways.push(gw);
        }

        let mut sup_toml = format!("{SUPERVISOR_TIMING}\n[broker]\nurl = \"{url}\"\n");
        if logins.is_some() {
            let _ = write!(
                sup_toml,
                "username = \"supervisor\"\npassword = {}\n",
                toml::Value::String(password("supervisor")?)
            );
        }
        let config = dir.join("supervisor.toml");
        std::fs::write(&config, sup_toml).context("writing supervisor.toml")?;
        let mut supervisor = Proc::new(Spec {
            name: "supervisor".into(),
            program: printloop.to_owned(),
            args: vec![
                "supervisor".into(),
                "--data-dir".into(),
                s(&sup_dir),
                "--config".into(),
                s(&config),
                "--metrics".into(),
                "off".into(),
                "--http".into(),
                "off".into(),
            ],
            log: logs.join("supervisor.log"),
            stdin: false,
        });
        supervisor.start()?;

        let conn = Conn {
            port,
            login: logins.as_ref().map(|l| l.operator.clone()),
        };
        let attacker_conn = Conn {
            port,
            login: logins.as_ref().map(|l| l.attacker.clone()),
        };
        let mut ep = Endpoint::new(&url, protocol::DEFAULT_ROOT, Duration::from_secs(10))
            .context("endpoint")?;
        ep.credentials = conn
            .login
            .clone()
            .map(|(username, password)| Credentials { username, password });
        let observer = Observer::start_with(port, topics.clone(), conn.login.clone());
        let mut checker = Operator::new(ep.clone());
        // The fleet is up when the supervisor lists both printers online.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = checker.printers().await.is_some_and(|ps| {
                (0..PRINTERS).all(|i| {
                    ps.iter().any(|p| {
                        p.printer_id.as_str() == format!("p{i}")
                            && p.presence == Presence::Online
                            && !p.stale
                    })
                })
            });
            if up {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the fleet did not come up within 60 s\n--- supervisor ---\n{}",
                    supervisor.tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        checker.upload(&dir.join("gcode")).await?;
        let job_file = (checker.files[0].sha256.clone(), checker.files[0].size);
        let idle_file = checker.files[1].sha256.clone();
        eprintln!(
            "adversary: {PRINTERS} printers up on {}",
            args.broker.name()
        );

        // The operator: keeps two jobs waiting (only the cube: seconds each), clears beds.
        let mut op = Operator::new(ep.clone());
        op.files = checker.files.clone();
        let submit = Arc::new(AtomicBool::new(true));
        let stop_operator = Arc::new(AtomicBool::new(false));
        let (sub, stop) = (submit.clone(), stop_operator.clone());
        let operator = tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                op.operate(sub.load(Ordering::SeqCst), false, 2).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            op
        });

        Ok(Farm {
            dir: dir.to_owned(),
            kind: args.broker,
            topics,
            broker,
            supervisor,
            sims,
            gateways,
            conn,
            attacker_conn,
            ep,
            observer,
            checker,
            job_file,
            idle_file,
            operator: Some(operator),
            submit,
            stop_operator,
            submitted: Vec::new(),
            violations: Vec::new(),
        })
    }

    /// The classes, then settling. Prints a line per class.
    async fn play(&mut self, args: &AdversaryArgs) -> anyhow::Result<Summary> {
        let forged = Forged::default();
        let probe = Probe::start(
            &self.conn,
            self.ep.clone(),
            self.topics.clone(),
            PRINTERS,
            forged.clone(),
            args.probe_command,
        );
        let mut attacker = Attacker::connect(
            self.attacker_conn.clone(),
            self.topics.clone(),
            forged.clone(),
        )
        .await;
        // Let jobs start and the probe see every printer before the first attack.
        let warmup = Instant::now() + Duration::from_secs(20);
        while Instant::now() < warmup {
            let seen = (0..PRINTERS)
                .all(|i| probe.epoch(i).is_some() && probe.heartbeat_s(i).is_some())
                && probe.sup_epoch().is_some();
            let printing = self.checker.jobs().await.is_some_and(|jobs| {
                jobs.iter()
                    .any(|j| matches!(j.state, JobState::Printing | JobState::Finished))
            });
            if seen && printing {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let baseline = probe.window(Instant::now() - Duration::from_secs(3), Instant::now());
        eprintln!(
            "adversary: baseline: command latency {} ms, API {} ms, state gap {:?} ms",
            baseline.worst_cmd_ms, baseline.worst_api_ms, baseline.gaps_ms
        );

        let list: Vec<String> = if args.classes.is_empty() {
            classes::CLASSES.iter().map(|c| (*c).to_owned()).collect()
        } else {
            args.classes.clone()
        };
        let heartbeat_ms = |probe: &Probe, i: usize| {
            u64::from(probe.heartbeat_s(i).unwrap_or(HEARTBEAT_S as u32)) * 1000
        };
        let aftermath = AFTERMATH.max(Duration::from_millis(3 * heartbeat_ms(&probe, 0) + 1000));
        let mut all = Vec::new();
        let mut lingering = std::collections::HashSet::new();
        for name in &list {
            eprintln!("adversary: class {name}");
            let log_mark = self.broker_log_len();
            let drops = attacker.disconnects.load(Ordering::SeqCst);
            let start = Instant::now();
            let mut ctx = classes::Ctx {
                attacker: &mut attacker,
                probe: &probe,
                attack: Duration::from_secs(args.attack_secs),
                job_file: self.job_file.clone(),
                idle_file: self.idle_file.clone(),
            };
            let mut outcome = classes::run(name, &mut ctx).await;
            let dropped = attacker.disconnects.load(Ordering::SeqCst) - drops;
            if dropped > 0 {
                outcome
                    .details
                    .insert("attacker_connection_dropped", Value::from(dropped));
            }
            tokio::time::sleep(aftermath).await;
            let end = Instant::now();
            let w = probe.window(start, end);
            let mut violations = outcome.violations;
            if outcome.past_the_broker {
                outcome.details.insert(
                    "past_the_broker",
                    Value::from(format!(
                        "commands behind the flood took up to {} ms, {} got no answer (the \
                         broker's limit, not a violation)",
                        w.worst_cmd_ms, w.unanswered
                    )),
                );
            } else if w.worst_cmd_ms > MAX_CMD_LATENCY_MS {
                violations.push(format!(
                    "{name}: a command to p{} took {} ms (limit {MAX_CMD_LATENCY_MS} ms){}",
                    w.worst_cmd_printer,
                    w.worst_cmd_ms,
                    if w.unanswered > 0 {
                        format!("; {} probe commands got no answer", w.unanswered)
                    } else {
                        String::new()
                    }
                ));
            }
            for (i, gap) in w.gaps_ms.iter().enumerate() {
                let limit = heartbeat_ms(&probe, i) + 1000;
                if *gap > limit {
                    violations.push(format!(
                        "{name}: no state from p{i}'s gateway for {gap} ms (heartbeat + 1 s = {limit} ms)"
                    ));
                }
            }
            // A problem left by an earlier class is that class's (and the end's), not this one's.
            let mut problems = self.retained_truth(&probe, &forged).await;
            problems.extend(self.supervisor_view(&probe).await);
            for v in problems {
                if lingering.insert(v.clone()) {
                    violations.push(format!("{name}: {} after the class, {v}", secs(aftermath)));
                }
            }
            if name == "unknown_printer" {
                violations.extend(self.ghost_has_no_work().await);
            }
            self.watchdog(&mut violations).await;
            self.submitted.extend(outcome.jobs);
            // Recovery, bounded: the next class starts when commands are answered within 1 s
            // and states flow again (so its figures are its own), or after RECOVERY.
            let recovering = Instant::now();
            loop {
                let now = Instant::now();
                let w = probe.window(now - Duration::from_secs(2), now);
                let healthy = w.worst_cmd_ms < 1000
                    && w.gaps_ms
                        .iter()
                        .enumerate()
                        .all(|(i, g)| *g <= heartbeat_ms(&probe, i) + 1000);
                if healthy {
                    outcome.details.insert(
                        "recovered_after_s",
                        Value::from(round1(recovering.elapsed().as_secs_f64())),
                    );
                    break;
                }
                if recovering.elapsed() > RECOVERY {
                    if outcome.past_the_broker {
                        violations.push(format!(
                            "{name}: not recovered {} after the flood stopped",
                            secs(aftermath + RECOVERY)
                        ));
                    }
                    outcome.details.insert(
                        "not_recovered",
                        Value::from(format!(
                            "{} after the class, commands to p{} still take {} ms; state gaps {:?} ms",
                            secs(aftermath + RECOVERY),
                            w.worst_cmd_printer,
                            w.worst_cmd_ms,
                            w.gaps_ms
                        )),
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let line = ClassLine {
                class: name.clone(),
                broker: self.kind.name(),
                messages_sent: outcome.messages_sent,
                worst_cmd_latency_ms: w.worst_cmd_ms,
                worst_api_latency_ms: w.worst_api_ms,
                worst_state_gap_ms: w.gaps_ms.iter().copied().max().unwrap_or(0),
                violations: violations.clone(),
                duration_s: round1((end - start).as_secs_f64()),
                details: outcome.details,
                broker_denied: self.broker_denied(log_mark),
            };
            println!(
                "{}",
                serde_json::to_string(&line).context("encoding a class line")?
            );
            all.extend(violations);
        }
        if probe.send_failures() > 0 {
            eprintln!(
                "adversary: the probe could not queue {} commands",
                probe.send_failures()
            );
        }
        drop(attacker);

        // Settle: no new jobs; every job must end.
        self.submit.store(false, Ordering::SeqCst);
        eprintln!("adversary: classes over; settling");
        let deadline = Instant::now() + Duration::from_secs(args.settle_timeout);
        loop {
            let open: Option<Vec<String>> = self.checker.jobs().await.map(|jobs| {
                jobs.iter()
                    .filter(|j| !invariants::settled(j.state) || j.state == JobState::Queued)
                    .map(|j| format!("{} {:?}", j.job_id, j.state).to_lowercase())
                    .collect()
            });
            if open.as_ref().is_some_and(Vec::is_empty) {
                break;
            }
            if Instant::now() > deadline {
                all.push(format!(
                    "the jobs did not end within {} s of the last class: {}",
                    args.settle_timeout,
                    open.map_or("(the supervisor did not answer)".into(), |o| o.join(", "))
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Both printers online with their real epoch, in the retained topics and the
        // supervisor's view.
        for v in self.retained_truth(&probe, &forged).await {
            all.push(format!("at the end, {v}"));
        }
        for v in self.supervisor_view(&probe).await {
            all.push(format!("at the end, {v}"));
        }
        let mut watchdog = Vec::new();
        self.watchdog(&mut watchdog).await;
        all.extend(watchdog);
        Ok(Summary {
            broker: self.kind.name(),
            classes: list.len(),
            violations: all,
            jobs: BTreeMap::new(),
            wall_s: 0.0,
            data_dir: None,
        })
    }

    /// A process that exited by itself is a violation (it is started again).
    async fn watchdog(&mut self, violations: &mut Vec<String>) {
        let mut crashed = Vec::new();
        if !self.broker.is_running() {
            crashed.push("broker".to_owned());
            let _ = self.broker.start();
        }
        if !self.supervisor.is_running() {
            crashed.push("supervisor".to_owned());
            let _ = self.supervisor.start();
        }
        for p in self.gateways.iter_mut().chain(self.sims.iter_mut()) {
            if !p.is_running() {
                crashed.push(p.name().to_owned());
                let _ = p.start();
            }
        }
        for c in crashed {
            violations.push(format!("{c} exited on its own (restarted; see its log)"));
        }
    }

    /// The retained topics of the real printers and of the supervisor, read by a fresh
    /// subscriber: each must hold its owner's truth (not a forgery, decodable, online, the
    /// owner's current epoch).
    async fn retained_truth(&self, probe: &Probe, forged: &Forged) -> Vec<String> {
        let mut wanted = Vec::new();
        for i in 0..PRINTERS {
            let p = PrinterId::new(format!("p{i}"))
                .unwrap_or_else(|_| unreachable!("p<n> is a valid printer id"));
            wanted.push((i, Topic::Status(p.clone())));
            wanted.push((i, Topic::State(p.clone())));
            wanted.push((i, Topic::Meta(p)));
        }
        wanted.push((usize::MAX, Topic::SupervisorStatus));
        let names: Vec<String> = wanted.iter().map(|(_, t)| self.topics.format(t)).collect();
        let retained = retained_snapshot(&self.conn, &names).await;
        let mut out = Vec::new();
        for ((i, topic), name) in wanted.iter().zip(&names) {
            let short = name
                .strip_prefix(self.topics.root())
                .and_then(|s| s.strip_prefix('/'))
                .unwrap_or(name);
            let Some(payload) = retained.get(name) else {
                out.push(format!("{short} has no retained message"));
                continue;
            };
            if forged.contains(payload) {
                out.push(format!(
                    "{short} still holds the attacker's message ({} bytes: {})",
                    payload.len(),
                    preview(payload)
                ));
                continue;
            }
            let real_epoch = if *i == usize::MAX {
                probe.sup_epoch()
            } else {
                probe.epoch(*i)
            };
            let problem = match topic {
                Topic::Status(_) | Topic::SupervisorStatus => match Status::decode(payload) {
                    Err(e) => Some(format!("does not decode: {e}")),
                    Ok(s) if s.presence != Presence::Online => {
                        Some(format!("says offline (epoch {})", s.epoch))
                    }
                    Ok(s) if Some(s.epoch) != real_epoch => Some(format!(
                        "has epoch {}, its owner's is {real_epoch:?}",
                        s.epoch
                    )),
                    Ok(_) => None,
                },
                Topic::State(_) => match StateSnapshot::decode(payload) {
                    Err(e) => Some(format!("does not decode: {e}")),
                    Ok(s) if Some(s.epoch) != real_epoch => Some(format!(
                        "has epoch {}, the gateway's is {real_epoch:?}",
                        s.epoch
                    )),
                    Ok(_) => None,
                },
                Topic::Meta(p) => match Meta::decode(payload) {
                    Err(e) => Some(format!("does not decode: {e}")),
                    Ok(m) if &m.printer_id != p => Some(format!("names printer {}", m.printer_id)),
                    Ok(m) if Some(m.epoch) != real_epoch => Some(format!(
                        "has epoch {}, the gateway's is {real_epoch:?}",
                        m.epoch
                    )),
                    Ok(_) => None,
                },
                _ => None,
            };
            if let Some(p) = problem {
                out.push(format!("retained {short} {p}"));
            }
        }
        out
    }

    /// The supervisor's view: both printers online and not stale.
    async fn supervisor_view(&mut self, probe: &Probe) -> Vec<String> {
        let Some(printers) = self.checker.printers().await else {
            return vec!["the supervisor does not answer list_printers".into()];
        };
        let mut out = Vec::new();
        for i in 0..PRINTERS {
            let id = format!("p{i}");
            match printers.iter().find(|p| p.printer_id.as_str() == id) {
                None => out.push(format!("the supervisor does not list {id}")),
                Some(p) if p.presence != Presence::Online || p.stale => out.push(format!(
                    "the supervisor sees {id} {:?}{} (its gateway is online, epoch {:?})",
                    p.presence,
                    if p.stale { ", stale" } else { "" },
                    probe.epoch(i)
                )),
                Some(_) => {}
            }
        }
        out
    }

    /// After `unknown_printer`: the invented printer has no work and is not enrolled.
    async fn ghost_has_no_work(&mut self) -> Vec<String> {
        let Some(printers) = self.checker.printers().await else {
            return vec![];
        };
        let mut out = Vec::new();
        if let Some(g) = printers.iter().find(|p| p.printer_id.as_str() == "ghost") {
            if let Some(j) = &g.job_id {
                out.push(format!(
                    "unknown_printer: the supervisor gave job {j} to the invented printer ghost"
                ));
            }
            if g.enrolled {
                out.push("unknown_printer: the supervisor lists ghost as enrolled".into());
            }
        }
        if let Some(jobs) = self.checker.jobs().await {
            for j in jobs {
                if j.printer_id.as_ref().is_some_and(|p| p.as_str() == "ghost") {
                    out.push(format!(
                        "unknown_printer: job {} is {:?} on the invented printer ghost",
                        j.job_id, j.state
                    ));
                }
            }
        }
        out
    }

    fn broker_log_len(&self) -> u64 {
        std::fs::metadata(self.dir.join("broker.log")).map_or(0, |m| m.len())
    }

    /// Mosquitto: the attacker's publishes the broker denied since `mark`, by topic.
    fn broker_denied(&self, mark: u64) -> Option<BTreeMap<String, u64>> {
        if self.kind != BrokerKind::Mosquitto {
            return None;
        }
        let log = std::fs::read(self.dir.join("broker.log")).unwrap_or_default();
        let from = usize::try_from(mark).unwrap_or(0).min(log.len());
        Some(denied_publishes(
            &String::from_utf8_lossy(&log[from..]),
            self.topics.root(),
        ))
    }

    /// Stops everything (orderly: the stores are read afterwards).
    async fn stop(&mut self) {
        self.stop_operator.store(true, Ordering::SeqCst);
        if let Some(handle) = self.operator.take() {
            if let Ok(Ok(op)) = tokio::time::timeout(Duration::from_secs(15), handle).await {
                self.submitted.extend(op.submitted.iter().cloned());
                if let Some(api) = op.api {
                    api.close().await;
                }
            }
        }
        if let Some(api) = self.checker.api.take() {
            api.close().await;
        }
        let mut clean = self.supervisor.stop(Signal::SIGTERM).await;
        for g in &mut self.gateways {
            clean &= g.stop(Signal::SIGTERM).await;
        }
        if !clean {
            self.violations
                .push("a gateway or the supervisor did not stop on SIGTERM within 8 s".into());
        }
        for s in &mut self.sims {
            s.stop(Signal::SIGTERM).await;
        }
        self.broker.stop(Signal::SIGTERM).await;
    }

    /// After the stop: the stores (chaos's checker), every job finished, the logs.
    fn final_checks(&mut self, summary: &mut Summary) {
        let mut v = std::mem::take(&mut self.violations);
        let ev = crate::chaos::read_evidence(
            &self.dir,
            PRINTERS,
            self.submitted.clone(),
            self.observer.observed(),
            &mut v,
        );
        v.extend(invariants::violations(&ev));
        // Every job ends finished (a print an operator marked failed counts when its retry
        // finished).
        for j in &ev.jobs {
            if matches!(j.state, JobState::Finished | JobState::Done) {
                continue;
            }
            if ev
                .jobs
                .iter()
                .any(|r| r.retry_of.as_ref() == Some(&j.job_id))
            {
                continue;
            }
            v.push(format!(
                "job {} ended {:?}{}",
                j.job_id,
                j.state,
                j.reason
                    .as_deref()
                    .map(|r| format!(" ({})", crate::ops::printable(r, 200)))
                    .unwrap_or_default()
            ));
        }
        let mut jobs: BTreeMap<String, usize> = BTreeMap::new();
        for j in &ev.jobs {
            *jobs
                .entry(format!("{:?}", j.state).to_lowercase())
                .or_default() += 1;
        }
        jobs.insert("submitted".into(), self.submitted.len());
        summary.jobs = jobs;
        v.extend(log_violations(&self.dir.join("logs")));
        summary.violations.extend(v);
    }

    fn tails(&self) -> String {
        let mut s = format!("--- supervisor (tail) ---\n{}", self.supervisor.tail(30));
        for g in &self.gateways {
            let _ = write!(s, "\n--- {} (tail) ---\n{}", g.name(), g.tail(15));
        }
        s
    }
}

fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64().round())
}

/// The first bytes of a payload, printable.
fn preview(payload: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(&payload[..payload.len().min(80)]).into_owned();
    crate::ops::printable(&text, 80)
}

/// The retained message of each topic in `names`, from a fresh clean-session subscriber
/// (waits at most 2 s; topics without one are absent).
async fn retained_snapshot(conn: &Conn, names: &[String]) -> BTreeMap<String, Vec<u8>> {
    let id = format!("adversary-check-{}", std::process::id());
    let (client, eventloop) = AsyncClient::new(conn.options(&id), 64);
    let filters: Vec<SubscribeFilter> = names
        .iter()
        .map(|n| SubscribeFilter::new(n.clone(), QoS::AtLeastOnce))
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let forwarding = Forwarding {
        reconnect: Reconnect::After(Duration::from_millis(100)),
        resubscribe: Some((client.clone(), filters)),
        acks: Acks::Subscribe,
    };
    let forward = transport::forward::spawn(eventloop, forwarding, Out::Unbounded(tx));
    let _forward = crate::chaos::observe::AbortOnDrop(forward);
    let mut out = BTreeMap::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut subacked: Option<Instant> = None;
        loop {
            // Retained messages follow the SUBACK at once; 1 s after it there are no more.
            let quiet = subacked.map_or(Duration::from_secs(2), |t| {
                Duration::from_secs(1).saturating_sub(t.elapsed())
            });
            match tokio::time::timeout(quiet, rx.recv()).await {
                Ok(Some(MqttEvent::SubAck(_))) => subacked = Some(Instant::now()),
                Ok(Some(MqttEvent::Message(p))) if p.retain => {
                    out.insert(p.topic.clone(), p.payload.to_vec());
                    if out.len() == names.len() {
                        return;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    let _ = client.try_disconnect();
    out
}

/// Mosquitto's refusals of the attacker's publishes (log_type debug), counted by topic under
/// the root: `Denied PUBLISH` (the ACL) as the topic, `Dropped too large PUBLISH` as
/// `too large: <topic>`, and connections it closed for an oversize packet.
fn denied_publishes(log: &str, root: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let short = |topic: &str| {
        topic
            .strip_prefix(root)
            .and_then(|t| t.strip_prefix('/'))
            .unwrap_or(topic)
            .to_owned()
    };
    for line in log.lines() {
        let key = if let Some(rest) = line.split("Denied PUBLISH from attacker").nth(1) {
            short(rest.split('\'').nth(1).unwrap_or("?"))
        } else if let Some(rest) = line.split("Dropped too large PUBLISH from attacker").nth(1) {
            format!(
                "too large: {}",
                short(rest.split('\'').nth(1).unwrap_or("?"))
            )
        } else if line.contains("Client attacker") && line.contains("disconnected due to oversize")
        {
            "connection closed: oversize packet".to_owned()
        } else {
            continue;
        };
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

/// What the logs must not contain: a panic, a raw ESC byte, a line forged by a job's name.
fn log_violations(logs: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(logs) else {
        return vec![format!("cannot read {}", logs.display())];
    };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    for path in files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes);
        if let Some(line) = text.lines().find(|l| l.contains("panicked")) {
            out.push(format!("{name}: {}", crate::ops::printable(line, 200)));
        }
        let checked = name.starts_with("supervisor") || name.starts_with("gateway");
        if !checked {
            continue;
        }
        let esc = bytes.iter().filter(|b| **b == 0x1b).count();
        if esc > 0 {
            out.push(format!(
                "log_injection: {name} contains {esc} raw ESC bytes"
            ));
        }
        let forged = text
            .lines()
            .filter(|l| l.starts_with(classes::FORGED_LOG_TEXT))
            .count();
        if forged > 0 {
            out.push(format!(
                "log_injection: {name} has {forged} lines that start with the text a job's name forged"
            ));
        }
    }
    out
}

/// The Mosquitto broker of a run: logins, the generated ACL (`printloop clients mosquitto`
/// wrote it into `dir/mosquitto/`), the production limits of `docs/mosquitto.conf`, and debug
/// logging (the only place Mosquitto says which publishes it denied to an MQTT 3.1.1 client).
fn mosquitto_spec(dir: &Path, port: u16) -> anyhow::Result<Spec> {
    let program = procs::find_program("mosquitto").context(
        "`mosquitto` not found (PATH, /usr/sbin): install it with `apt-get install -y mosquitto`",
    )?;
    let files = dir.join("mosquitto");
    let mut conf = String::from("# written by printloop adversary\nper_listener_settings false\n");
    if nix::unistd::geteuid().is_root() {
        conf.push_str("user root\n");
    }
    let _ = writeln!(conf, "listener {port} 127.0.0.1");
    let _ = writeln!(
        conf,
        "allow_anonymous false\npassword_file {}\nacl_file {}",
        files.join("printloop.passwd").display(),
        files.join("printloop.acl").display()
    );
    conf.push_str(
        "persistence false\nmax_packet_size 1048576\nmax_queued_messages 10000\n\
         max_inflight_messages 20\nset_tcp_nodelay true\nlog_dest stderr\nlog_type error\nlog_type warning\n\
         log_type notice\nlog_type information\nlog_type debug\nconnection_messages true\n",
    );
    let path = dir.join("mosquitto.conf");
    std::fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
    Ok(Spec {
        name: "broker".into(),
        program,
        args: vec!["-c".into(), path.display().to_string()],
        log: dir.join("broker.log"),
        stdin: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_publishes_are_counted_by_topic() {
        let log = "1: Denied PUBLISH from attacker (d0, q1, r1, m3, 'printloop/v1/printers/p0/state', ... (12 bytes))\n\
                   2: Received PUBLISH from attacker (d0, q1, r0, m4, 'printloop/v1/printers/p0/cmd', ... (9 bytes))\n\
                   3: Denied PUBLISH from attacker-shot-2 (d0, q1, r1, m1, 'printloop/v1/printers/p0/state', ... (9 bytes))\n\
                   4: Client attacker-shot-3 disconnected due to oversize packet.\n";
        let d = denied_publishes(log, "printloop/v1");
        assert_eq!(d.get("printers/p0/state"), Some(&2));
        assert_eq!(d.get("connection closed: oversize packet"), Some(&1));
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn forged_log_lines_and_escapes_are_found() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            dir.path().join("supervisor.log"),
            format!("ok\n{} ERROR x\n\x1b[31m\n", classes::FORGED_LOG_TEXT),
        )
        .expect("write");
        std::fs::write(dir.path().join("gateway-p0.log"), "fine \\x1b escaped\n").expect("write");
        let v = log_violations(dir.path());
        assert_eq!(v.len(), 2, "{v:?}");
    }
}
