//! The chaos runner's child processes: each logs to its own file (appended across restarts),
//! can be killed with SIGKILL (a crash, a power cut) or stopped with SIGTERM (an orderly stop),
//! and is killed when dropped, so nothing outlives the runner.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt as _;
use tokio::process::{Child, ChildStdin, Command};

/// How long an orderly stop may take before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(8);

/// How a [`Proc`] is (re)started.
#[derive(Debug, Clone)]
pub struct Spec {
    /// For messages and the log file name.
    pub name: String,
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its log (stdout and stderr, appended).
    pub log: PathBuf,
    /// Give it a pipe on stdin (for the simulator's control commands).
    pub stdin: bool,
}

/// One child process and how to start it again.
pub struct Proc {
    spec: Spec,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    /// Times it was started.
    pub starts: u32,
}

impl Proc {
    /// A process that is not running yet.
    pub fn new(spec: Spec) -> Self {
        Proc {
            spec,
            child: None,
            stdin: None,
            starts: 0,
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Starts it (does nothing if it runs).
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)
            .with_context(|| format!("opening {}", self.spec.log.display()))?;
        let err = log.try_clone().context("cloning a log file handle")?;
        let mut cmd = Command::new(&self.spec.program);
        cmd.args(&self.spec.args)
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("PRINTLOOP_CHAOS_CHILD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(log)
            .stderr(err)
            .stdin(if self.spec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "starting {}: {} {}",
                self.spec.name,
                self.spec.program.display(),
                self.spec.args.join(" ")
            )
        })?;
        self.stdin = child.stdin.take();
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    /// Whether it runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL and reap.
    pub async fn kill(&mut self) {
        self.stdin = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
        }
    }

    /// `signal` (SIGTERM or SIGINT), then SIGKILL after [`STOP_TIMEOUT`]. `true` if it exited
    /// by itself.
    pub async fn stop(&mut self, signal: Signal) -> bool {
        self.stdin = None;
        let Some(mut c) = self.child.take() else {
            return true;
        };
        if let Some(pid) = c.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
        match tokio::time::timeout(STOP_TIMEOUT, c.wait()).await {
            Ok(_) => true,
            Err(_) => {
                tracing::warn!(process = %self.spec.name, "did not stop within {STOP_TIMEOUT:?}; killed");
                let _ = c.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
                false
            }
        }
    }

    /// Writes one line to its stdin.
    pub async fn send_line(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .with_context(|| format!("{} has no control input", self.spec.name))?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .with_context(|| format!("writing to {}", self.spec.name))?;
        stdin.flush().await.context("flushing")?;
        Ok(())
    }

    /// The last `lines` lines of its log.
    pub fn tail(&self, lines: usize) -> String {
        tail(&self.spec.log, lines)
    }
}

/// The last `lines` lines of a file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits (bounded) until `addr` accepts TCP connections.
pub async fn wait_port(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Which broker the chaos run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BrokerKind {
    /// `printloop broker` (rumqttd): keeps nothing across a restart.
    Rumqttd,
    /// The system's `mosquitto` with a generated config (persistence off).
    Mosquitto,
}

impl BrokerKind {
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            BrokerKind::Rumqttd => "rumqttd",
            BrokerKind::Mosquitto => "mosquitto",
        }
    }
}

/// Which broker `printloop chaos` runs: one process ([`BrokerKind`]), or a RabbitMQ cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ChaosBroker {
    /// `printloop broker` (rumqttd): keeps nothing across a restart.
    Rumqttd,
    /// The system's `mosquitto` with a generated config (persistence off).
    Mosquitto,
    /// Three RabbitMQ nodes with the MQTT plugin and quorum session queues
    /// (`scripts/rabbitmq-cluster.sh`): gateways spread over the nodes through failover
    /// proxies, the supervisor on node 1; the broker fault kills and restarts node 2 or 3.
    RabbitmqCluster,
}

impl ChaosBroker {
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            ChaosBroker::Rumqttd => BrokerKind::Rumqttd.name(),
            ChaosBroker::Mosquitto => BrokerKind::Mosquitto.name(),
            ChaosBroker::RabbitmqCluster => "rabbitmq-cluster",
        }
    }

    /// The one-process broker it is, if it is one.
    pub fn single(self) -> Option<BrokerKind> {
        match self {
            ChaosBroker::Rumqttd => Some(BrokerKind::Rumqttd),
            ChaosBroker::Mosquitto => Some(BrokerKind::Mosquitto),
            ChaosBroker::RabbitmqCluster => None,
        }
    }
}

/// What a runner of real processes needs first: this executable, the gateway binary (`given`,
/// or the one next to this executable), and a fresh directory `printloop-<what>-…` that is kept
/// (the runner removes it when the run passes).
pub fn prepare_run(
    what: &str,
    speed: f64,
    given: Option<&Path>,
) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    anyhow::ensure!(
        speed.is_finite() && (0.5..=100.0).contains(&speed),
        "--speed must be 0.5 to 100"
    );
    let printloop = std::env::current_exe().context("finding this executable")?;
    let gateway_bin = match given {
        Some(p) => p.to_path_buf(),
        None => printloop.with_file_name("printloop-gateway"),
    };
    anyhow::ensure!(
        gateway_bin.is_file(),
        "{} not found: build it (`cargo build --workspace`) or pass --gateway-bin",
        gateway_bin.display()
    );
    let dir = tempfile::Builder::new()
        .prefix(&format!("printloop-{what}-"))
        .tempdir()
        .context("creating the run's directory")?
        .keep();
    eprintln!("{what}: data and logs in {}", dir.display());
    Ok((printloop, gateway_bin, dir))
}

/// Ends a run: a passed run's directory is removed (unless `keep`); otherwise it is kept and
/// returned, for the report.
pub fn settle_dir(dir: &Path, keep: bool, passed: bool) -> Option<String> {
    if passed && !keep {
        let _ = std::fs::remove_dir_all(dir);
        None
    } else {
        Some(dir.display().to_string())
    }
}

/// Prints a run's violations (stderr), its report (one JSON line on stdout) and, when failed,
/// where its logs and stores are kept.
pub fn print_report(
    what: &str,
    violations: &[String],
    report: &impl serde::Serialize,
    dir: &Path,
) -> anyhow::Result<()> {
    for v in violations {
        eprintln!("{what}: VIOLATION: {v}");
    }
    println!(
        "{}",
        serde_json::to_string(report).context("encoding the report")?
    );
    if !violations.is_empty() {
        eprintln!("{what}: kept {} (logs, stores)", dir.display());
    }
    Ok(())
}

/// Finds a program in PATH or the sbin directories (Debian installs `mosquitto` in /usr/sbin).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The broker process spec and its port: a config file written into `dir`.
pub fn broker_spec(kind: BrokerKind, printloop: &Path, dir: &Path) -> anyhow::Result<(Spec, u16)> {
    match kind {
        BrokerKind::Rumqttd => {
            let config = broker::BrokerConfig::from_toml_str(
                include_str!("../../broker.toml"),
                "broker.toml (built in)",
            )
            .context("the built-in broker.toml")?
            .with_free_ports()
            .context("finding free ports for the broker")?;
            let port = config
                .first_listener(broker::ListenerKind::V4)
                .map(|l| l.addr.port())
                .context("the built-in broker.toml has no v4 listener")?;
            let path = dir.join("broker.toml");
            std::fs::write(
                &path,
                config.to_toml_string().context("writing broker.toml")?,
            )
            .with_context(|| format!("writing {}", path.display()))?;
            Ok((
                Spec {
                    name: "broker".into(),
                    program: printloop.to_owned(),
                    args: vec![
                        "broker".into(),
                        "--config".into(),
                        path.display().to_string(),
                    ],
                    log: dir.join("broker.log"),
                    stdin: false,
                },
                port,
            ))
        }
        BrokerKind::Mosquitto => {
            let program = find_program("mosquitto").context(
                "`mosquitto` not found (PATH, /usr/sbin): install it with `apt-get install -y mosquitto`",
            )?;
            let port = broker::free_port(std::net::IpAddr::from([127, 0, 0, 1]))
                .context("finding a free port for mosquitto")?;
            let mut conf = String::from("# written by printloop chaos\n");
            if nix::unistd::geteuid().is_root() {
                // As root Mosquitto switches to the `mosquitto` user, which cannot read our dir.
                conf.push_str("user root\n");
            }
            let _ = writeln!(conf, "listener {port} 127.0.0.1");
            conf.push_str(
                "allow_anonymous true\npersistence false\nlog_dest stderr\nset_tcp_nodelay true\n",
            );
            let path = dir.join("mosquitto.conf");
            std::fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
            Ok((
                Spec {
                    name: "broker".into(),
                    program,
                    args: vec!["-c".into(), path.display().to_string()],
                    log: dir.join("broker.log"),
                    stdin: false,
                },
                port,
            ))
        }
    }
}
