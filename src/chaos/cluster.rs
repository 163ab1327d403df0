//! A 3-node RabbitMQ cluster (the MQTT plugin, quorum session queues) for
//! `printloop chaos --broker rabbitmq-cluster`, driven through `scripts/rabbitmq-cluster.sh`
//! (built into this binary and written into the run's directory, so an installed `printloop`
//! carries it too). Facts about how RabbitMQ behaves: `docs/notes-rabbitmq.md`; for operators:
//! `docs/scale.md`.
//!
//! The runner puts the supervisor, the operator and the observer on node 1 and never kills it;
//! a gateway's proxy prefers one node and fails over to the others ([`Cluster::preference`]).
//! Every script call is bounded; the nodes are stopped by [`Cluster::stop`] at the end of a run
//! and, when a run ends early (an error), by dropping the value.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;

/// Nodes in the cluster: with 3, quorum queues and the MQTT plugin's client-id tracker keep a
/// majority while one node is down (with 2 they do not).
pub const NODES: usize = 3;

/// The script, as built into this binary.
const SCRIPT: &str = include_str!("../../scripts/rabbitmq-cluster.sh");

/// Bounds on each script call (the script bounds its own waits a little below these).
const START_LIMIT: Duration = Duration::from_secs(150);
const RESTART_LIMIT: Duration = Duration::from_secs(180);
const KILL_LIMIT: Duration = Duration::from_secs(20);
const STOP_LIMIT: Duration = Duration::from_secs(60);

/// A running cluster.
pub struct Cluster {
    /// The cluster's directory (node data, configs, logs): `<run dir>/rabbitmq`.
    dir: PathBuf,
    script: PathBuf,
    /// The script's progress and errors (stderr), appended.
    log: PathBuf,
    /// MQTT port of node `i + 1`.
    ports: [u16; NODES],
    /// The Erlang VM (`beam.smp`) of node `i + 1`, as the script last reported it.
    pids: [Option<u32>; NODES],
    /// The node the schedule killed, until it is restarted (1-based).
    killed: Option<usize>,
    stopped: bool,
}

impl Cluster {
    /// Writes the script into `run_dir`, picks free loopback ports and starts the cluster
    /// (`start <run dir>/rabbitmq 3 <base>` with quorum session queues).
    pub async fn start(run_dir: &Path, log: &Path) -> anyhow::Result<Cluster> {
        let script = run_dir.join("rabbitmq-cluster.sh");
        std::fs::write(&script, SCRIPT).with_context(|| format!("writing {}", script.display()))?;
        anyhow::ensure!(
            Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server").is_file(),
            "RabbitMQ is not installed: run `{} install` (as root; apt-get rabbitmq-server)",
            script.display()
        );
        let base = free_base().context("finding 50 free loopback ports for the cluster")?;
        let mut cluster = Cluster {
            dir: run_dir.join("rabbitmq"),
            script,
            log: log.to_owned(),
            ports: std::array::from_fn(|i| base + 1 + i as u16),
            pids: [None; NODES],
            killed: None,
            // Nothing to stop until `start` was called: set below.
            stopped: true,
        };
        eprintln!(
            "chaos: starting a {NODES}-node RabbitMQ cluster (MQTT on 127.0.0.1:{}..{}; quorum sessions)",
            cluster.ports[0],
            cluster.ports[NODES - 1]
        );
        cluster.stopped = false;
        let dir = cluster.dir.display().to_string();
        let out = cluster
            .script(
                &["start", &dir, &NODES.to_string(), &base.to_string()],
                START_LIMIT,
            )
            .await?;
        cluster.note_pids(&out);
        anyhow::ensure!(
            cluster.pids.iter().all(Option::is_some),
            "the cluster started but the script did not report every node's pid:\n{out}"
        );
        Ok(cluster)
    }

    /// Node `node`'s MQTT port (1-based).
    pub fn port(&self, node: usize) -> u16 {
        self.ports[node - 1]
    }

    /// Every node's MQTT port, `node` first, then the others in order: what a TCP load
    /// balancer that prefers `node` tries.
    pub fn preference(&self, node: usize) -> Vec<u16> {
        (0..NODES)
            .map(|k| self.ports[(node - 1 + k) % NODES])
            .collect()
    }

    /// SIGKILLs node `node`'s Erlang VM (the script's `kill`).
    pub async fn kill(&mut self, node: usize) -> anyhow::Result<()> {
        self.killed = Some(node);
        let dir = self.dir.display().to_string();
        self.script(&["kill", &dir, &node.to_string()], KILL_LIMIT)
            .await?;
        self.pids[node - 1] = None;
        Ok(())
    }

    /// Starts node `node` again and waits until it has rejoined (the script's `restart`).
    pub async fn restart(&mut self, node: usize) -> anyhow::Result<()> {
        let dir = self.dir.display().to_string();
        let out = self
            .script(&["restart", &dir, &node.to_string()], RESTART_LIMIT)
            .await?;
        self.note_pids(&out);
        anyhow::ensure!(
            self.pids[node - 1].is_some(),
            "node pl{node} restarted but the script did not report its pid:\n{out}"
        );
        if self.killed == Some(node) {
            self.killed = None;
        }
        Ok(())
    }

    /// Nodes (1-based) whose VM is gone though the schedule did not kill them.
    pub fn crashed(&self) -> Vec<usize> {
        (1..=NODES)
            .filter(|&n| self.killed != Some(n))
            .filter(|&n| self.pids[n - 1].is_some_and(|pid| !alive(pid)))
            .collect()
    }

    /// Stops every node (the script's `stop`: SIGTERM, then SIGKILL).
    pub async fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let dir = self.dir.display().to_string();
        if let Err(e) = self.script(&["stop", &dir], STOP_LIMIT).await {
            tracing::warn!("stopping the RabbitMQ cluster: {e:#}");
        }
    }

    /// The last `lines` lines of node `node`'s RabbitMQ log.
    pub fn tail(&self, node: usize, lines: usize) -> String {
        let name = format!("pl{node}@localhost.log");
        super::procs::tail(&self.dir.join(format!("n{node}/log/{name}")), lines)
    }

    /// Runs the script with `args` (stderr appended to the log), bounded by `limit`; its stdout.
    async fn script(&self, args: &[&str], limit: Duration) -> anyhow::Result<String> {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = tokio::process::Command::new("bash")
            .arg(&self.script)
            .args(args)
            .env("PRINTLOOP_RMQ_QUEUE_TYPE", "quorum")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .context("running bash (the RabbitMQ cluster script)")?;
        let what = args.first().copied().unwrap_or_default();
        let out = tokio::time::timeout(limit, child.wait_with_output())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "`rabbitmq-cluster.sh {what}` took more than {} s; its log: {}",
                    limit.as_secs(),
                    self.log.display()
                )
            })?
            .with_context(|| format!("`rabbitmq-cluster.sh {what}`"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        anyhow::ensure!(
            out.status.success(),
            "`rabbitmq-cluster.sh {}` failed ({}); the end of its log ({}):\n{}",
            args.join(" "),
            out.status,
            self.log.display(),
            super::procs::tail(&self.log, 25)
        );
        Ok(stdout)
    }

    /// Reads `node=plI@localhost mqtt=P pid=N` lines.
    fn note_pids(&mut self, out: &str) {
        for (node, pid) in out.lines().filter_map(parse_node_line) {
            if (1..=NODES).contains(&node) {
                self.pids[node - 1] = pid;
            }
        }
    }
}

impl Drop for Cluster {
    /// A run that ended early still stops its nodes (they are not this process's children and
    /// would outlive it). Blocking, bounded by the script's own grace (30 s) and SIGKILL.
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        eprintln!("chaos: stopping the RabbitMQ cluster");
        let _ = std::process::Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .arg(&self.dir)
            .env("PRINTLOOP_RMQ_TIMEOUT", "10")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `(node, pid)` from one of the script's `node=pl2@localhost mqtt=21802 pid=1234` lines.
fn parse_node_line(line: &str) -> Option<(usize, Option<u32>)> {
    let mut node = None;
    let mut pid = None;
    for field in line.split_whitespace() {
        if let Some(v) = field.strip_prefix("node=pl") {
            node = v.split('@').next()?.parse().ok();
        } else if let Some(v) = field.strip_prefix("pid=") {
            pid = v.parse().ok();
        }
    }
    Some((node?, pid))
}

/// Whether process `pid` runs (a zombie does not: in a container whose PID 1 does not reap,
/// a killed node stays as `<defunct>`).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // `pid (comm) S ...`: the state follows the last `)`.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// A base port B whose ports B+1..=B+49 (the script's MQTT, AMQP, distribution, epmd and CLI
/// ports) are free on loopback now. Below Linux's ephemeral range (32768 and up), so no
/// outgoing connection takes one of them while a killed node is down.
fn free_base() -> Option<u16> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id();
    (0..40u32)
        .map(|k| 20_000 + ((seed.wrapping_add(k.wrapping_mul(7_919)) % 250) * 50) as u16)
        .find(|&base| {
            (1..=49u16).all(|d| TcpListener::bind((Ipv4Addr::LOCALHOST, base + d)).is_ok())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_scripts_node_lines() {
        assert_eq!(
            parse_node_line("node=pl2@localhost mqtt=21802 pid=4242"),
            Some((2, Some(4242)))
        );
        assert_eq!(
            parse_node_line("node=pl3@localhost mqtt=21803 pid=none state=down"),
            Some((3, None))
        );
        assert_eq!(
            parse_node_line("running_nodes(as seen by pl1@localhost)=a,b"),
            None
        );
    }

    #[test]
    fn a_balancer_prefers_its_node_then_the_next_ones() {
        let mut c = Cluster {
            dir: PathBuf::new(),
            script: PathBuf::new(),
            log: PathBuf::new(),
            ports: [21801, 21802, 21803],
            // Node 1 alive, node 2's VM gone, node 3's not known.
            pids: [Some(std::process::id()), Some(u32::MAX), None],
            killed: None,
            stopped: true,
        };
        assert_eq!(c.preference(1), vec![21801, 21802, 21803]);
        assert_eq!(c.preference(3), vec![21803, 21801, 21802]);
        assert_eq!(c.port(2), 21802);
        assert!(alive(std::process::id()));
        assert_eq!(c.crashed(), vec![2]);
        c.killed = Some(2);
        assert!(c.crashed().is_empty(), "killed on purpose");
    }

    #[test]
    fn free_base_ports_fit() {
        let base = free_base().expect("a free range");
        assert!((20_000..32_768 - 49).contains(&base));
    }
}
