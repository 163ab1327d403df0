//! `printloop demo` as a child process: a whole farm (embedded broker, supervisor, simulated
//! printers with real gateways) with its dashboard on a free loopback port, and API tokens
//! made the way an operator makes them (`printloop tokens add`).

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

/// How the farm is made.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Simulated printers.
    pub printers: u32,
    /// Jobs the demo submits itself.
    pub jobs: u32,
    /// Print speed (×).
    pub speed: f64,
    /// No simulated operator: beds wait for the test.
    pub manual: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            printers: 2,
            jobs: 0,
            speed: 100.0,
            manual: true,
        }
    }
}

/// A running demo farm; stopped (SIGINT, then killed) on drop.
pub struct DemoFarm {
    child: Child,
    /// The dashboard and API.
    pub http: SocketAddr,
    /// The embedded broker's MQTT port (loopback, no login).
    pub broker_port: u16,
    /// The demo's operator token.
    pub operator: String,
    /// A viewer's token made before the start.
    pub viewer: String,
    /// The farm's directory (`supervisor/` holds the database, files, tokens).
    pub dir: tempfile::TempDir,
    lines: mpsc::Receiver<String>,
    printloop: PathBuf,
}

fn token_add(printloop: &Path, data_dir: &Path, name: &str, role: &str) -> Result<String> {
    let out = Command::new(printloop)
        .args(["tokens", "add", name, "--role", role, "--data-dir"])
        .arg(data_dir)
        .output()
        .context("running printloop tokens add")?;
    if !out.status.success() {
        bail!(
            "printloop tokens add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

type Spawned = (Child, SocketAddr, String, u16, mpsc::Receiver<String>);

/// Starts `printloop demo` on `dir` and waits (60 s at most) until it serves and its printers
/// run.
fn spawn(printloop: &Path, dir: &Path, opts: &DemoOptions) -> Result<Spawned> {
    let mut cmd = Command::new(printloop);
    cmd.args([
        "demo",
        "--http",
        "127.0.0.1:0",
        "--free-ports",
        "--printers",
    ])
    .arg(opts.printers.to_string())
    .arg("--jobs")
    .arg(opts.jobs.to_string())
    .arg("--speed")
    .arg(opts.speed.to_string())
    .arg("--data-dir")
    .arg(dir)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::from(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("demo.log"))?,
    ));
    if opts.manual {
        cmd.arg("--manual");
    }
    let mut child = cmd.spawn().context("starting printloop demo")?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut farm = None;
    let mut broker = 0;
    while Instant::now() < deadline {
        let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) else {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the demo exited ({status}) before serving: {}",
                    std::fs::read_to_string(dir.join("demo.log")).unwrap_or_default()
                );
            }
            continue;
        };
        if let Some(rest) = line.strip_prefix("demo: broker at mqtt://") {
            broker = rest
                .split([':', ' '])
                .nth(1)
                .and_then(|p| p.parse().ok())
                .context("broker line")?;
        }
        if let Some(rest) = line.strip_prefix("demo: dashboard at http://") {
            let (addr, token) = rest.split_once("/#token=").context("dashboard line")?;
            farm = Some((addr.parse::<SocketAddr>()?, token.to_owned()));
        }
        if line.contains("jobs queued at") {
            break;
        }
    }
    let Some((http, operator)) = farm else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("the demo printed no dashboard URL within 60 s");
    };
    Ok((child, http, operator, broker, lines))
}

impl DemoFarm {
    /// Starts `printloop demo` and waits (60 s at most) for its dashboard URL.
    pub fn start(printloop: &Path, opts: &DemoOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("printloop-web-")
            .tempdir()?;
        let sup = dir.path().join("supervisor");
        let viewer = token_add(printloop, &sup, "wall", "viewer")?;
        let (child, http, operator, broker_port, lines) = spawn(printloop, dir.path(), opts)?;
        Ok(Self {
            child,
            http,
            broker_port,
            operator,
            viewer,
            dir,
            lines,
            printloop: printloop.to_owned(),
        })
    }

    /// Kills the whole farm with SIGKILL (supervisor, gateways, simulators: no goodbye, no
    /// flush) and starts it again on the same directory, submitting nothing.
    pub fn kill9_and_restart(&mut self, opts: &DemoOptions) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let opts = DemoOptions {
            jobs: 0,
            ..opts.clone()
        };
        let (child, http, operator, broker_port, lines) =
            spawn(&self.printloop, self.dir.path(), &opts)?;
        self.child = child;
        self.http = http;
        self.broker_port = broker_port;
        self.operator = operator;
        self.lines = lines;
        Ok(())
    }

    /// `GET path` with the operator's token.
    pub fn get(&self, path: &str) -> Result<crate::http::Response> {
        let auth = format!("Bearer {}", self.operator);
        crate::http::request(
            self.http,
            "GET",
            path,
            &[("Authorization", &auth)],
            b"",
            Duration::from_secs(20),
        )
    }

    /// Every job, ended ones too (`GET /api/v1/jobs`), as JSON.
    pub fn jobs(&self) -> Vec<serde_json::Value> {
        self.get("/api/v1/jobs?include_ended=true&limit=1000")
            .ok()
            .and_then(|r| r.json().ok())
            .and_then(|v| v["jobs"].as_array().cloned())
            .unwrap_or_default()
    }

    /// The state of job `id` (`""` when there is no such job).
    pub fn job_state(&self, id: &str) -> String {
        self.jobs()
            .into_iter()
            .find(|j| j["job_id"] == id)
            .and_then(|j| j["state"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// Waits (at most `within`) until job `id` is in `state`.
    pub fn wait_job(&self, id: &str, state: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let now = self.job_state(id);
            if now == state {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("job {id} is {now:?}, not {state:?}, after {within:?}");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The supervisor's data directory.
    pub fn supervisor_dir(&self) -> PathBuf {
        self.dir.path().join("supervisor")
    }

    /// Lines the demo printed since the last call.
    pub fn output(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// The demo's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("demo.log")).unwrap_or_default()
    }
}

impl Drop for DemoFarm {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
