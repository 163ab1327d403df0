//! Test support shared by integration tests: real brokers on ports chosen at run time, child
//! processes that die with the test, bounded waits, and a small MQTT client.
//!
//! - [`free_port`], [`wait_for`], [`wait_for_port`]: the basics.
//! - [`Mosquitto`]: a real Mosquitto per test (config in a temp dir, killed on drop).
//! - [`EmbeddedBroker`]: in-process rumqttd from the shipped `broker.toml` on free ports.
//! - [`BrokerProcess`]: `printloop broker` as a child process, killable and restartable on the
//!   same ports.
//! - [`TestBroker`]: one of the above chosen by [`BrokerKind`], so a test body runs on both.
//! - [`TestClient`]: rumqttc 0.25 with bounded receives.
//! - [`SecureFarm`]: Mosquitto secured the way an operator does it with `printloop printers add`,
//!   `printloop clients mosquitto` and `scripts/farm-ca.sh` (password file, ACL, TLS).
//!
//! Every wait is bounded; a missing `mosquitto` binary is an error (tests fail, they never skip).
mod client;
mod demo;
mod embedded;
pub mod gcode;
pub mod http;
mod mosquitto;
mod process;
pub mod proxy;
mod secure;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use client::{mqtt_options, TestClient, RECV_TIMEOUT};
pub use demo::{DemoFarm, DemoOptions};
pub use embedded::{shipped_broker_toml, EmbeddedBroker};
pub use mosquitto::{mosquitto_passwd, Mosquitto, MosquittoGuard, MosquittoOptions};
pub use process::BrokerProcess;
pub use secure::{SecureFarm, SecureFarmSpec};

/// Loopback, where every test broker listens.
pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// How long starting a broker (process or in-process) may take.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the test kit. Tests usually `.expect()` them; the messages say what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A program the test needs is not installed.
    #[error("`{program}` not found (looked in PATH, /usr/sbin, /usr/local/sbin): {hint}")]
    MissingProgram { program: String, hint: &'static str },
    /// An I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A child process exited while it should be serving.
    #[error("{what} exited ({status}) before it was ready; its log:\n{log}")]
    Exited {
        what: String,
        status: String,
        log: String,
    },
    /// Something did not become ready in time.
    #[error("{what} was not ready within {timeout:?}; log:\n{log}")]
    NotReady {
        what: String,
        timeout: Duration,
        log: String,
    },
    /// The embedded broker failed.
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    /// An MQTT client operation failed.
    #[error("MQTT client `{client_id}`: {reason}")]
    Mqtt { client_id: String, reason: String },
}

/// Result of the test kit.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The `printloop-gateway` binary built beside the running test (`target/<profile>/`): the
/// root package's integration tests cannot name another package's binary with `env!`.
pub fn gateway_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let bin = exe
        .parent()
        .and_then(std::path::Path::parent)
        .map(|d| d.join("printloop-gateway"))
        .unwrap_or_default();
    assert!(
        bin.is_file(),
        "{} not found: run `cargo build -p gateway` (or `cargo test --workspace`) first",
        bin.display()
    );
    bin
}

/// A loopback port that was free a moment ago (bind 127.0.0.1:0, read the port, close).
///
/// Another process can take the port before the caller binds it; the kernel's round-robin
/// ephemeral ports make that rare, and the starters in this crate retry on "address in use".
pub fn free_port() -> u16 {
    match broker::free_port(LOCALHOST) {
        Ok(port) => port,
        Err(e) => panic!("no free loopback port: {e}"),
    }
}

/// Waits until `condition` is true, polling every `poll_interval`; panics after `timeout` with a
/// message naming `what` it waited for.
pub async fn wait_for<F, Fut>(
    what: &str,
    timeout: Duration,
    poll_interval: Duration,
    mut condition: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if condition().await {
            return;
        }
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(poll_interval).await;
    }
}

/// Blocks until `addr` accepts a TCP connection, at most `timeout`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::NotReady {
                    what: format!("{addr} (last error: {e})"),
                    timeout,
                    log: String::new(),
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Finds an installed program in PATH or the sbin directories (Debian puts `mosquitto` in
/// `/usr/sbin`, which is not in every user's PATH).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

pub(crate) fn require_program(name: &str, hint: &'static str) -> Result<PathBuf> {
    find_program(name).ok_or_else(|| Error::MissingProgram {
        program: name.to_owned(),
        hint,
    })
}

/// Which broker a parameterised test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// rumqttd in the test process, from the shipped `broker.toml`.
    Embedded,
    /// A real Mosquitto child process.
    Mosquitto,
}

/// A running broker of either kind; dropping it kills Mosquitto (rumqttd cannot be stopped and
/// lives until the test process exits).
#[derive(Debug)]
pub enum TestBroker {
    /// In-process rumqttd.
    Embedded(Box<EmbeddedBroker>),
    /// Mosquitto child process.
    Mosquitto(Box<MosquittoGuard>),
}

impl TestBroker {
    /// Starts a broker of `kind` on free loopback ports.
    pub fn start(kind: BrokerKind) -> Result<Self> {
        Ok(match kind {
            BrokerKind::Embedded => TestBroker::Embedded(Box::new(EmbeddedBroker::start()?)),
            BrokerKind::Mosquitto => TestBroker::Mosquitto(Box::new(Mosquitto::start()?)),
        })
    }

    /// The kind of this broker.
    pub fn kind(&self) -> BrokerKind {
        match self {
            TestBroker::Embedded(_) => BrokerKind::Embedded,
            TestBroker::Mosquitto(_) => BrokerKind::Mosquitto,
        }
    }

    /// The port serving MQTT 3.1.1.
    pub fn port(&self) -> u16 {
        match self {
            TestBroker::Embedded(b) => b.v4_port(),
            TestBroker::Mosquitto(m) => m.port(),
        }
    }

    /// The port serving MQTT 5 (Mosquitto serves both versions on one port).
    pub fn v5_port(&self) -> u16 {
        match self {
            TestBroker::Embedded(b) => b.v5_port(),
            TestBroker::Mosquitto(m) => m.port(),
        }
    }
}
