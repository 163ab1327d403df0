//! A secured farm's broker, made the way an operator makes it: printers enrolled and clients
//! registered with the real `printloop` CLI, Mosquitto's password file and ACL written by
//! `printloop clients mosquitto`, the farm's CA and broker certificate made by
//! `scripts/farm-ca.sh`, and a real Mosquitto serving a plain loopback listener and a TLS one,
//! both with those files and no anonymous clients.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{free_port, io_error, Error, Mosquitto, MosquittoGuard, MosquittoOptions, Result};

/// What to enrol.
#[derive(Debug, Clone)]
pub struct SecureFarmSpec {
    /// Printer ids: each enrolled with `printloop printers add`.
    pub printers: Vec<String>,
    /// Other clients: (user, role) for `printloop clients add`.
    pub clients: Vec<(String, String)>,
}

/// The running broker and everything the clients need to reach it.
#[derive(Debug)]
pub struct SecureFarm {
    /// Mosquitto (killed on drop).
    pub mosquitto: MosquittoGuard,
    /// The TLS listener's port (`mqtts://localhost:<port>`).
    pub tls_port: u16,
    /// The farm's CA certificate.
    pub ca: PathBuf,
    /// The supervisor's data directory, which holds the registry.
    pub data_dir: PathBuf,
    /// Each enrolled printer's gateway config, as `printloop printers add` wrote it.
    pub gateway_configs: BTreeMap<String, PathBuf>,
    /// Every user's password (printers' read back from their configs).
    pub passwords: BTreeMap<String, String>,
    dir: tempfile::TempDir,
}

impl SecureFarm {
    /// Enrols `spec` with the `printloop` binary at `printloop` and starts Mosquitto.
    pub fn start(printloop: &Path, spec: &SecureFarmSpec) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("printloop-secure-")
            .tempdir()
            .map_err(io_error("creating a temp dir"))?;
        let data_dir = dir.path().join("supervisor");
        let tls_port = free_port();
        let mut gateway_configs = BTreeMap::new();
        let mut passwords = BTreeMap::new();
        for id in &spec.printers {
            let out = dir.path().join(format!("{id}-printloop-gateway.toml"));
            run(
                Command::new(printloop)
                    .args(["printers", "add", id, "--broker-url"])
                    .arg(format!("mqtts://localhost:{tls_port}"))
                    .arg("--ca-file")
                    .arg(dir.path().join("ca-placeholder.pem"))
                    .arg("--data-dir")
                    .arg(&data_dir)
                    .arg("--out")
                    .arg(&out),
                &format!("printloop printers add {id}"),
                Some(&dir.path().join("ca-placeholder.pem")),
            )?;
            let text =
                std::fs::read_to_string(&out).map_err(io_error("reading a gateway config"))?;
            let value: toml::Table = toml::from_str(&text).map_err(|e| Error::Mqtt {
                client_id: id.clone(),
                reason: format!("the enrolled config is not TOML: {e}"),
            })?;
            let password = value
                .get("broker")
                .and_then(|b| b.get("password"))
                .and_then(|p| p.as_str())
                .unwrap_or_default()
                .to_owned();
            passwords.insert(id.clone(), password);
            gateway_configs.insert(id.clone(), out);
        }
        for (user, role) in &spec.clients {
            let stdout = run(
                Command::new(printloop)
                    .args(["clients", "add", user, "--role", role, "--data-dir"])
                    .arg(&data_dir),
                &format!("printloop clients add {user}"),
                None,
            )?;
            passwords.insert(user.clone(), stdout.trim().to_owned());
        }
        let mq = dir.path().join("mosquitto");
        run(
            Command::new(printloop)
                .args(["clients", "mosquitto", "--out"])
                .arg(&mq)
                .arg("--data-dir")
                .arg(&data_dir),
            "printloop clients mosquitto",
            None,
        )?;
        let ca_dir = dir.path().join("ca");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/farm-ca.sh");
        run(
            Command::new("bash")
                .arg(&script)
                .arg(&ca_dir)
                .args(["localhost", "127.0.0.1"]),
            "scripts/farm-ca.sh",
            None,
        )?;
        let mosquitto = Mosquitto::start_with(MosquittoOptions {
            persistence: false,
            password_file: Some(mq.join("printloop.passwd")),
            acl_file: Some(mq.join("printloop.acl")),
            extra_lines: vec![
                "connection_messages true".into(),
                "log_type all".into(),
                format!("listener {tls_port} 127.0.0.1"),
                format!("certfile {}", ca_dir.join("server.crt").display()),
                format!("keyfile {}", ca_dir.join("server.key").display()),
                "tls_version tlsv1.2".into(),
            ],
        })?;
        Ok(Self {
            mosquitto,
            tls_port,
            ca: ca_dir.join("ca.pem"),
            data_dir,
            gateway_configs,
            passwords,
            dir,
        })
    }

    /// The temp dir everything lives in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `user`'s password.
    pub fn password(&self, user: &str) -> &str {
        self.passwords.get(user).map_or("", String::as_str)
    }
}

/// Runs `command`; `touch` is created first (a file the command must find). Returns stdout.
fn run(command: &mut Command, what: &str, touch: Option<&Path>) -> Result<String> {
    if let Some(t) = touch {
        std::fs::write(t, "placeholder\n").map_err(io_error("writing a placeholder"))?;
    }
    let out = command
        .env("NO_COLOR", "1")
        .output()
        .map_err(io_error(format!("running {what}")))?;
    if !out.status.success() {
        return Err(Error::Exited {
            what: what.to_owned(),
            status: out.status.to_string(),
            log: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
