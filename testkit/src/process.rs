//! Child processes that log to a file, are stopped by their PID, and die with the test.
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use broker::{BrokerConfig, ListenerKind};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::{io_error, Error, Result, LOCALHOST, START_TIMEOUT};

const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A started child process whose stdout and stderr go to `log_path`.
#[derive(Debug)]
pub(crate) struct ChildProcess {
    what: String,
    child: Child,
    log_path: PathBuf,
    /// Length of the log when this process started: its own lines come after.
    log_start: u64,
}

impl ChildProcess {
    /// Spawns `command`, appending its output to `log_path`.
    pub(crate) fn spawn(what: &str, mut command: Command, log_path: &Path) -> Result<Self> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(io_error(format!("opening {}", log_path.display())))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let stderr = log
            .try_clone()
            .map_err(io_error(format!("cloning {}", log_path.display())))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .map_err(io_error(format!("starting {what}: {command:?}")))?;
        Ok(ChildProcess {
            what: what.to_owned(),
            child,
            log_path: log_path.to_owned(),
            log_start,
        })
    }

    /// This process's part of the log.
    pub(crate) fn log(&self) -> String {
        let all = std::fs::read(&self.log_path).unwrap_or_default();
        let start = usize::try_from(self.log_start).unwrap_or(0).min(all.len());
        String::from_utf8_lossy(&all[start..]).into_owned()
    }

    /// Waits until the process's log contains `marker` and `addr` accepts TCP connections.
    /// Fails early, with the log, if the process exits.
    pub(crate) fn wait_ready(&mut self, marker: &str, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(io_error(format!("waiting for {}", self.what)))?
            {
                return Err(Error::Exited {
                    what: self.what.clone(),
                    status: status.to_string(),
                    log: self.log(),
                });
            }
            if self.log().contains(marker)
                && std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    what: format!("{} on {addr}", self.what),
                    timeout: START_TIMEOUT,
                    log: self.log(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the process dies without cleaning up (a crash, a power cut).
    pub(crate) fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL if it has not exited within 5 s.
    pub(crate) fn terminate(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }

    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub(crate) fn id(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn is_address_in_use(error: &Error) -> bool {
    matches!(error, Error::Exited { log, .. } if log.contains("ddress already in use")
        || log.contains("AddrInUse")
        || log.contains("os error 98"))
}

/// `printloop broker --config <copy>` as a child process on free loopback ports.
///
/// The copy is the given `broker.toml` with only the `listen` addresses changed (every other key
/// as the user wrote it). [`kill`](Self::kill) and [`restart`](Self::restart) keep the ports, so
/// clients can reconnect to "the same broker" after a broker restart. Killed on drop.
#[derive(Debug)]
pub struct BrokerProcess {
    binary: PathBuf,
    dir: TempDir,
    config_path: PathBuf,
    log_path: PathBuf,
    v4: Option<SocketAddr>,
    v5: Option<SocketAddr>,
    child: Option<ChildProcess>,
}

impl BrokerProcess {
    /// Starts `binary broker --config <copy of config on free ports>` and waits until it logs
    /// "broker ready" (which it does after its own MQTT probe of every listener).
    pub fn start(binary: impl AsRef<Path>, config: impl AsRef<Path>) -> Result<Self> {
        let config = config.as_ref();
        let text = std::fs::read_to_string(config)
            .map_err(io_error(format!("reading {}", config.display())))?;
        // Validate the original first: errors then name the user's file.
        BrokerConfig::from_toml_str(&text, &config.display().to_string())?;
        let dir = tempfile::Builder::new()
            .prefix("printloop-broker-")
            .tempdir()
            .map_err(io_error("creating a temp dir"))?;
        let mut process = BrokerProcess {
            binary: binary.as_ref().to_owned(),
            config_path: dir.path().join("broker.toml"),
            log_path: dir.path().join("broker.log"),
            dir,
            v4: None,
            v5: None,
            child: None,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            process.write_config_on_free_ports(&text)?;
            match process.spawn() {
                Err(e) if attempt < 3 && is_address_in_use(&e) => continue,
                other => return other.map(|()| process),
            }
        }
    }

    fn write_config_on_free_ports(&mut self, text: &str) -> Result<()> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| Error::Io {
            what: "parsing broker config".to_owned(),
            source: std::io::Error::other(e),
        })?;
        let moved = BrokerConfig::from_toml_str(text, "copy")?.with_free_ports()?;
        for listener in moved.listeners() {
            let entry = table
                .get_mut(listener.kind.section())
                .and_then(|v| v.get_mut(&listener.key))
                .and_then(|v| v.as_table_mut());
            if let Some(entry) = entry {
                entry.insert("listen".into(), listener.addr.to_string().into());
            }
        }
        if let (Some(console), Some(new)) = (
            table.get_mut("console").and_then(|v| v.as_table_mut()),
            moved.rumqttd().console.as_ref(),
        ) {
            console.insert("listen".into(), new.listen.clone().into());
        }
        self.v4 = moved.first_listener(ListenerKind::V4).map(|l| l.addr);
        self.v5 = moved.first_listener(ListenerKind::V5).map(|l| l.addr);
        let out = toml::to_string(&table).map_err(|e| Error::Io {
            what: "writing broker config".to_owned(),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(&self.config_path, out)
            .map_err(io_error(format!("writing {}", self.config_path.display())))
    }

    fn spawn(&mut self) -> Result<()> {
        let mut command = Command::new(&self.binary);
        command
            .arg("broker")
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info");
        let mut child = ChildProcess::spawn("printloop broker", command, &self.log_path)?;
        let addr = self
            .v4
            .or(self.v5)
            .unwrap_or_else(|| SocketAddr::new(LOCALHOST, 0));
        child.wait_ready("broker ready", addr)?;
        self.child = Some(child);
        Ok(())
    }

    /// The MQTT 3.1.1 port (first `[v4.*]` listener); panics if the config has none.
    pub fn v4_port(&self) -> u16 {
        self.v4
            .expect("the broker config has no v4 listener")
            .port()
    }

    /// The MQTT 5 port (first `[v5.*]` listener); panics if the config has none.
    pub fn v5_port(&self) -> u16 {
        self.v5
            .expect("the broker config has no v5 listener")
            .port()
    }

    /// The config file the process runs with (a copy, with the chosen ports).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The temp dir holding the config copy and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process's log (stdout and stderr) over all its restarts.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildProcess::id)
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(ChildProcess::is_running)
    }

    /// SIGKILL (a crash); the ports stay reserved for [`start_again`](Self::start_again).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// SIGTERM (an orderly stop; rumqttd saves nothing either way).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.terminate();
        }
    }

    /// Starts the broker again on the same ports (after `kill` or `stop`).
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        self.spawn()
    }

    /// Kills the broker and starts it again on the same ports.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.start_again()
    }
}
