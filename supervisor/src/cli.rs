//! `printloop supervisor`: configuration file, flags, and the process.
//!
//! ```toml
//! data_dir = "/var/lib/printloop"     # supervisor.redb, files/, uploads/
//! topic_root = "printloop/v1"
//!
//! [broker]
//! embedded = "broker.toml"            # run rumqttd inside the supervisor, or:
//! # url = "mqtts://broker.farm:8883"  # use a broker that runs elsewhere
//! # username = "supervisor"           # password: PRINTLOOP_MQTT_PASSWORD
//! # ca_file = "/etc/printloop/ca.pem"
//!
//! [metrics]
//! listen = "127.0.0.1:9464"           # Prometheus: GET /metrics
//!
//! [http]                              # dashboard, REST API, slicer uploads (docs/http.md)
//! listen = "127.0.0.1:8080"           # beyond loopback every request needs an API token anyway
//!
//! [timing]
//! step_timeout_s = 300                # a silent printer's job is flagged timed_out (never moved)
//! command_retry_s = 15                # a start with no sign of life is sent again
//! command_ttl_s = 120                 # starts expire
//! stale_heartbeats = 3                # no state for 3 heartbeats: stale
//! breaker_threshold = 3               # failed jobs in a row before a printer is held
//!
//! [ha]                                # Home Assistant MQTT discovery (docs/home-assistant.md)
//! enabled = true
//! discovery_prefix = "homeassistant"
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use transport::settings::ConfigError as SettingsError;

use crate::machine::SupervisorConfig;
use crate::run::{BrokerTarget, Settings};

/// Arguments of `printloop supervisor`.
#[derive(Debug, Clone, clap::Args)]
pub struct SupervisorArgs {
    /// TOML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where the job database and the G-code files live.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Use an external broker (mqtt://HOST:PORT or mqtts://…) instead of the embedded one.
    #[arg(long, conflicts_with = "embedded")]
    pub broker: Option<String>,
    /// Run the embedded broker from this broker.toml (the default, with ./broker.toml).
    #[arg(long)]
    pub embedded: Option<PathBuf>,
    /// MQTT user name (password: PRINTLOOP_MQTT_PASSWORD).
    #[arg(long)]
    pub username: Option<String>,
    /// CA certificate for mqtts://.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Serve Prometheus metrics at this address ("off" to disable).
    #[arg(long)]
    pub metrics: Option<String>,
    /// Serve the dashboard, the REST API and slicer uploads at this address (default
    /// 127.0.0.1:8080; "off" to disable). Every request needs an API token (`printloop tokens`).
    #[arg(long)]
    pub http: Option<String>,
    /// Topic root.
    #[arg(long)]
    pub topic_root: Option<String>,
    /// Home Assistant's MQTT discovery prefix (default "homeassistant").
    #[arg(long)]
    pub ha_discovery_prefix: Option<String>,
    /// Publish no Home Assistant discovery and ignore its buttons.
    #[arg(long)]
    pub no_ha: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    topic_root: Option<String>,
    #[serde(default)]
    broker: BrokerSection,
    #[serde(default)]
    metrics: MetricsSection,
    #[serde(default)]
    http: HttpSection,
    #[serde(default)]
    timing: TimingSection,
    #[serde(default)]
    ha: HaSection,
    #[serde(default)]
    history: HistorySection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistorySection {
    keep_jobs: Option<u64>,
    keep_days: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HaSection {
    enabled: Option<bool>,
    discovery_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BrokerSection {
    embedded: Option<PathBuf>,
    url: Option<String>,
    username: Option<String>,
    password: Option<String>,
    ca_file: Option<PathBuf>,
    keepalive_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSection {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TimingSection {
    step_timeout_s: Option<u64>,
    command_retry_s: Option<u64>,
    command_ttl_s: Option<u64>,
    stale_heartbeats: Option<u32>,
    breaker_threshold: Option<u32>,
}

/// What is wrong with the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, or a value in it or in a flag (the gateway's rules and wording,
    /// `transport::settings`).
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The embedded broker's configuration.
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
}

/// The data directory a supervisor with this config file and `--data-dir` would use (a flag
/// wins over the file; default `printloop-data`), reading nothing else of the file.
pub fn data_dir(
    config: Option<&std::path::Path>,
    flag: Option<PathBuf>,
) -> Result<PathBuf, ConfigError> {
    if let Some(dir) = flag {
        return Ok(dir);
    }
    let file = match config {
        Some(path) => read_file_config(path)?,
        None => FileConfig::default(),
    };
    Ok(file
        .data_dir
        .unwrap_or_else(|| PathBuf::from("printloop-data")))
}

fn read_file_config(path: &std::path::Path) -> Result<FileConfig, ConfigError> {
    Ok(transport::settings::load_toml(path)?)
}

/// Resolves the settings from the file and the flags (a flag wins).
pub fn settings(args: &SupervisorArgs) -> Result<Settings, ConfigError> {
    let file = match &args.config {
        Some(path) => read_file_config(path)?,
        None => FileConfig::default(),
    };
    let invalid = |key, message: String| ConfigError::from(SettingsError::Invalid { key, message });
    let topics = protocol::Topics::new(
        args.topic_root
            .clone()
            .or(file.topic_root)
            .unwrap_or_else(|| protocol::DEFAULT_ROOT.into()),
    )
    .map_err(|e| invalid("topic_root", e.to_string()))?;
    let data_dir = args
        .data_dir
        .clone()
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from("printloop-data"));
    let url = args.broker.clone().or(if args.embedded.is_some() {
        None
    } else {
        file.broker.url
    });
    let broker = match url {
        Some(url) => {
            let mut addr = transport::BrokerAddr::parse(&url)
                .map_err(|e| invalid("broker.url", format!("{url:?}: {e}")))?;
            addr.username = args.username.clone().or(file.broker.username);
            addr.password = std::env::var("PRINTLOOP_MQTT_PASSWORD")
                .ok()
                .or(file.broker.password);
            addr.ca_file = args.ca_file.clone().or(file.broker.ca_file);
            BrokerTarget::External(addr)
        }
        None => {
            let path = args
                .embedded
                .clone()
                .or(file.broker.embedded)
                .unwrap_or_else(|| PathBuf::from("broker.toml"));
            BrokerTarget::Embedded(Box::new(broker::BrokerConfig::load(&path)?))
        }
    };
    let metrics = match args.metrics.clone().or(file.metrics.listen).as_deref() {
        Some("off") => None,
        Some(a) => Some(
            a.parse::<SocketAddr>()
                .map_err(|e| invalid("metrics.listen", format!("{a:?}: {e}")))?,
        ),
        None => Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
    };
    let http = match args.http.clone().or(file.http.listen).as_deref() {
        Some("off") => None,
        Some(a) => Some(
            a.parse::<SocketAddr>()
                .map_err(|e| invalid("http.listen", format!("{a:?}: {e}")))?,
        ),
        None => Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
    };
    let mut machine = SupervisorConfig {
        topics,
        ..SupervisorConfig::default()
    };
    let t = file.timing;
    // One rule and one wording for both binaries (`transport::settings`).
    use transport::settings;
    let seconds = |key, s: u64| settings::seconds(s).map_err(|m| invalid(key, m));
    let at_least_one = |key, n: u32| settings::at_least_one(n).map_err(|m| invalid(key, m));
    if let Some(s) = t.step_timeout_s {
        machine.step_timeout = seconds("timing.step_timeout_s", s)?;
    }
    if let Some(s) = t.command_retry_s {
        machine.command_retry = seconds("timing.command_retry_s", s)?;
    }
    if let Some(s) = t.command_ttl_s {
        machine.command_ttl = seconds("timing.command_ttl_s", s)?;
    }
    if let Some(n) = t.stale_heartbeats {
        machine.stale_heartbeats = at_least_one("timing.stale_heartbeats", n)?;
    }
    if let Some(n) = t.breaker_threshold {
        machine.breaker_threshold = at_least_one("timing.breaker_threshold", n)?;
    }
    if let Some(n) = file.history.keep_jobs {
        if !(100..=10_000_000).contains(&n) {
            return Err(invalid(
                "history.keep_jobs",
                format!("{n} is out of range: keep 100 to 10000000 ended jobs"),
            ));
        }
        machine.history.keep_jobs = n as usize;
    }
    if let Some(d) = file.history.keep_days {
        if !(1..=36_500).contains(&d) {
            return Err(invalid(
                "history.keep_days",
                format!("{d} is out of range: keep them 1 to 36500 days"),
            ));
        }
        machine.history.keep_days = d;
    }
    let keepalive = settings::keepalive(file.broker.keepalive_s.unwrap_or(15))
        .map_err(|m| invalid("broker.keepalive_s", m))?;
    machine.ha.enabled = !args.no_ha && file.ha.enabled.unwrap_or(true);
    if let Some(prefix) = args
        .ha_discovery_prefix
        .clone()
        .or(file.ha.discovery_prefix)
    {
        crate::ha::validate_prefix(&prefix)
            .map_err(|e| invalid("ha.discovery_prefix", format!("{prefix:?}: {e}")))?;
        machine.ha.discovery_prefix = prefix;
    }
    Ok(Settings {
        machine,
        broker,
        data_dir,
        metrics,
        http,
        keepalive,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.toml");
        std::fs::write(&path, "data_dir = \"x\"\n[timing]\nstep_timeout = 5\n").expect("write");
        let args = SupervisorArgs {
            config: Some(path.clone()),
            data_dir: None,
            broker: Some("mqtt://127.0.0.1:1".into()),
            embedded: None,
            username: None,
            ca_file: None,
            metrics: None,
            http: None,
            topic_root: None,
            ha_discovery_prefix: None,
            no_ha: false,
        };
        let e = settings(&args).expect_err("unknown key");
        assert!(e.to_string().contains("step_timeout"), "{e}");
        std::fs::write(&path, "[metrics]\nlisten = \"nowhere\"\n").expect("write");
        let e = settings(&args).expect_err("bad address");
        assert!(e.to_string().contains("metrics.listen"), "{e}");
        // MQTT's keep-alive is 16 bits: rumqttc would send 65 536 s as 0 (no keep-alive).
        std::fs::write(&path, "[broker]\nkeepalive_s = 65536\n").expect("write");
        let e = settings(&args).expect_err("keep-alive over MQTT's field");
        assert!(
            e.to_string().contains("broker.keepalive_s") && e.to_string().contains("65535"),
            "{e}"
        );
        std::fs::write(&path, "[timing]\nstep_timeout_s = 7\n").expect("write");
        let s = settings(&args).expect("valid");
        assert_eq!(s.machine.step_timeout_ms(), 7000);
        assert!(matches!(s.broker, BrokerTarget::External(ref a) if a.port == 1));
        assert!(s.machine.ha.enabled);
        assert_eq!(s.machine.ha.discovery_prefix, "homeassistant");
        std::fs::write(&path, "[ha]\nenabled = false\ndiscovery_prefix = \"ha\"\n").expect("write");
        let s = settings(&args).expect("valid");
        assert!(!s.machine.ha.enabled);
        assert_eq!(s.machine.ha.discovery_prefix, "ha");
        std::fs::write(&path, "[ha]\ndiscovery_prefix = \"ha/#\"\n").expect("write");
        let e = settings(&args).expect_err("bad prefix");
        assert!(e.to_string().contains("ha.discovery_prefix"), "{e}");
        std::fs::write(&path, "[ha]\nprefix = \"ha\"\n").expect("write");
        let e = settings(&args).expect_err("unknown key");
        assert!(e.to_string().contains("prefix"), "{e}");
        // Zero is refused with the key's name, as the gateway does: never raised to 1.
        for (text, key) in [
            ("[timing]\nstep_timeout_s = 0\n", "timing.step_timeout_s"),
            (
                "[timing]\nstale_heartbeats = 0\n",
                "timing.stale_heartbeats",
            ),
            (
                "[timing]\nbreaker_threshold = 0\n",
                "timing.breaker_threshold",
            ),
            ("[broker]\nkeepalive_s = 0\n", "broker.keepalive_s"),
        ] {
            std::fs::write(&path, text).expect("write");
            let e = settings(&args).expect_err("zero");
            assert!(
                e.to_string().contains(key) && e.to_string().contains("at least 1"),
                "{e}"
            );
        }
        std::fs::write(&path, "[broker]\nkeepalive_s = 30\n").expect("write");
        assert_eq!(
            settings(&args).expect("valid").keepalive,
            std::time::Duration::from_secs(30)
        );
    }
}

/// Why `printloop supervisor` stopped.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad configuration.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// The supervisor failed.
    #[error(transparent)]
    Run(#[from] crate::run::RunError),
}

/// Runs the supervisor until Ctrl-C or SIGTERM.
pub async fn run(args: SupervisorArgs) -> Result<(), CliError> {
    let settings = settings(&args)?;
    crate::run::run(settings, shutdown_signal(), None).await?;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
