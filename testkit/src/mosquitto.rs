//! A real Mosquitto per test: its config in a temp dir, its port chosen at run time.
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::process::{is_address_in_use, ChildProcess};
use crate::{free_port, io_error, require_program, Error, Result, LOCALHOST};

const INSTALL_HINT: &str = "install it with `apt-get install -y mosquitto mosquitto-clients`";

/// What the generated `mosquitto.conf` contains besides the loopback listener.
#[derive(Debug, Clone, Default)]
pub struct MosquittoOptions {
    /// `persistence true` with the database in the temp dir: retained messages and sessions
    /// survive [`MosquittoGuard::restart`] (an orderly stop saves the database).
    pub persistence: bool,
    /// `password_file`; also turns `allow_anonymous` off. Make one with [`mosquitto_passwd`].
    pub password_file: Option<PathBuf>,
    /// `acl_file`.
    pub acl_file: Option<PathBuf>,
    /// More configuration lines, written as given.
    pub extra_lines: Vec<String>,
}

/// Starts Mosquitto processes; see [`MosquittoGuard`].
#[derive(Debug)]
pub struct Mosquitto;

impl Mosquitto {
    /// The `mosquitto` binary, or an error that says how to install it.
    pub fn binary() -> Result<PathBuf> {
        require_program("mosquitto", INSTALL_HINT)
    }

    /// Mosquitto on a free loopback port, anonymous, no persistence.
    pub fn start() -> Result<MosquittoGuard> {
        Self::start_with(MosquittoOptions::default())
    }

    /// Mosquitto on a free loopback port with `options`.
    pub fn start_with(options: MosquittoOptions) -> Result<MosquittoGuard> {
        Self::start_inner(options, None)
    }

    /// Mosquitto with a whole configuration given as text, in which `{port}` is replaced by a
    /// free loopback port (write `listener {port} 127.0.0.1`). Its log must go to stderr
    /// (`log_dest stderr`, the default) so readiness can be seen.
    pub fn start_with_template(template: &str) -> Result<MosquittoGuard> {
        Self::start_inner(MosquittoOptions::default(), Some(template.to_owned()))
    }

    fn start_inner(options: MosquittoOptions, template: Option<String>) -> Result<MosquittoGuard> {
        let binary = Self::binary()?;
        let dir = tempfile::Builder::new()
            .prefix("printloop-mosquitto-")
            .tempdir()
            .map_err(io_error("creating a temp dir"))?;
        let mut guard = MosquittoGuard {
            binary,
            config_path: dir.path().join("mosquitto.conf"),
            log_path: dir.path().join("mosquitto.log"),
            dir,
            port: 0,
            options,
            template,
            child: None,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            guard.port = free_port();
            guard.write_config()?;
            match guard.spawn() {
                Err(e) if attempt < 3 && is_address_in_use(&e) => continue,
                other => return other.map(|()| guard),
            }
        }
    }
}

/// A running Mosquitto; killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct MosquittoGuard {
    binary: PathBuf,
    dir: TempDir,
    config_path: PathBuf,
    log_path: PathBuf,
    port: u16,
    options: MosquittoOptions,
    template: Option<String>,
    child: Option<ChildProcess>,
}

impl MosquittoGuard {
    fn write_config(&self) -> Result<()> {
        let mut conf = String::from("# written by printloop's testkit\n");
        if nix::unistd::geteuid().is_root() {
            // As root Mosquitto switches to the `mosquitto` user, which cannot read this temp dir.
            conf.push_str("user root\n");
        }
        if let Some(template) = &self.template {
            conf.push_str(&template.replace("{port}", &self.port.to_string()));
            return std::fs::write(&self.config_path, conf)
                .map_err(io_error(format!("writing {}", self.config_path.display())));
        }
        let _ = writeln!(conf, "listener {} 127.0.0.1", self.port);
        let anonymous = self.options.password_file.is_none();
        let _ = writeln!(conf, "allow_anonymous {anonymous}");
        if self.options.persistence {
            let _ = writeln!(conf, "persistence true");
            let _ = writeln!(conf, "persistence_location {}/", self.dir.path().display());
        } else {
            conf.push_str("persistence false\n");
        }
        if let Some(file) = &self.options.password_file {
            let _ = writeln!(conf, "password_file {}", file.display());
        }
        if let Some(file) = &self.options.acl_file {
            let _ = writeln!(conf, "acl_file {}", file.display());
        }
        conf.push_str("log_dest stderr\nset_tcp_nodelay true\n");
        for line in &self.options.extra_lines {
            let _ = writeln!(conf, "{line}");
        }
        std::fs::write(&self.config_path, conf)
            .map_err(io_error(format!("writing {}", self.config_path.display())))
    }

    fn spawn(&mut self) -> Result<()> {
        let mut command = Command::new(&self.binary);
        command.arg("-c").arg(&self.config_path);
        let mut child = ChildProcess::spawn("mosquitto", command, &self.log_path)?;
        child.wait_ready(" running", self.addr())?;
        self.child = Some(child);
        Ok(())
    }

    /// The loopback port Mosquitto listens on (MQTT 3.1.1 and 5).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(LOCALHOST, self.port)
    }

    /// The temp dir with the config, the log and (with persistence) the database.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The generated `mosquitto.conf`.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Mosquitto's log over all its restarts.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(ChildProcess::is_running)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildProcess::id)
    }

    /// SIGKILL: no database save, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// SIGTERM: Mosquitto saves its database (with persistence) and exits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.terminate();
        }
    }

    /// Starts Mosquitto again on the same port and config (after `kill` or `stop`).
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        self.spawn()
    }

    /// An orderly restart on the same port: SIGTERM (persistence saved), then start again.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.start_again()
    }
}

/// Adds `user` with `password` to a Mosquitto password file (created if missing), with
/// `mosquitto_passwd -b` exactly as an operator would.
pub fn mosquitto_passwd(file: &Path, user: &str, password: &str) -> Result<()> {
    let program = require_program("mosquitto_passwd", INSTALL_HINT)?;
    let mut command = Command::new(program);
    if !file.exists() {
        command.arg("-c");
    }
    let output = command
        .arg("-b")
        .arg(file)
        .arg(user)
        .arg(password)
        .output()
        .map_err(io_error("running mosquitto_passwd"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Exited {
            what: format!("mosquitto_passwd for {user}"),
            status: output.status.to_string(),
            log: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}
