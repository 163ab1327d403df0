//! The gateway's configuration: one TOML file (`--config`), with flags for what people change.
//!
//! ```toml
//! id = "p0"                       # printer id: a-z 0-9 - _, unique in the fleet
//! name = "MK3S left"              # for people
//! model = "Prusa MK3S"
//! tags = ["pla", "0.4mm"]         # jobs can require tags
//! data_dir = "/var/lib/printloop" # the redb state file and the file cache live here
//! topic_root = "printloop/v1"
//!
//! [broker]
//! url = "mqtt://127.0.0.1:1883"   # mqtt:// or mqtts://
//! username = "p0"                 # optional; the password comes from PRINTLOOP_MQTT_PASSWORD
//! ca_file = "/etc/printloop/ca.pem"  # for mqtts://, else the system roots
//! keepalive_s = 15
//!
//! [serial]
//! port = "/dev/ttyUSB0"
//! baud = 250000
//! mode = "auto"                   # auto: send ahead when the firmware reports ADVANCED_OK
//!
//! [timing]
//! heartbeat_s = 10
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::{PrinterId, Topics};
use serde::Deserialize;
use transport::settings;

use crate::link::{LinkConfig, StreamMode};
use crate::machine::CoreConfig;
use crate::run::Settings;

/// The configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Printer id.
    pub id: Option<String>,
    /// Name for people.
    pub name: Option<String>,
    /// Printer model.
    pub model: Option<String>,
    /// Operator tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Where state and files live.
    pub data_dir: Option<PathBuf>,
    /// Topic root.
    pub topic_root: Option<String>,
    /// Broker settings.
    #[serde(default)]
    pub broker: BrokerSection,
    /// Serial settings.
    #[serde(default)]
    pub serial: SerialSection,
    /// Timing settings.
    #[serde(default)]
    pub timing: TimingSection,
}

/// `[broker]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSection {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: Option<String>,
    /// User name.
    pub username: Option<String>,
    /// Password (prefer the environment variable).
    pub password: Option<String>,
    /// CA certificate (PEM) for mqtts.
    pub ca_file: Option<PathBuf>,
    /// Keep-alive in seconds.
    pub keepalive_s: Option<u64>,
}

/// `[serial]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSection {
    /// Device path.
    pub port: Option<PathBuf>,
    /// Baud rate.
    pub baud: Option<u32>,
    /// `auto` or `pingpong`.
    pub mode: Option<String>,
}

/// `[timing]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimingSection {
    /// State heartbeat period.
    pub heartbeat_s: Option<u64>,
    /// Minimum time between two state publishes caused by changes.
    pub state_min_interval_ms: Option<u64>,
    /// How long to wait for a file chunk.
    pub chunk_timeout_s: Option<u64>,
}

pub use transport::settings::ConfigError;

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        settings::load_toml(path)
    }

    /// Parses config text.
    pub fn parse(text: &str) -> Result<Self, String> {
        settings::parse_toml(text)
    }
}

/// Parses the broker URL, naming the key in the error.
pub fn broker_url(url: &str) -> Result<transport::BrokerAddr, ConfigError> {
    transport::BrokerAddr::parse(url).map_err(|e| ConfigError::Invalid {
        key: "broker.url",
        message: format!("{url:?}: {e}"),
    })
}

/// What the command line may override (each `None`: the file's value, or the default).
#[derive(Debug, Clone)]
pub struct Flags {
    /// `--id`
    pub id: Option<String>,
    /// `--broker`
    pub broker: Option<String>,
    /// `--username`
    pub username: Option<String>,
    /// `--ca-file`
    pub ca_file: Option<PathBuf>,
    /// `--keepalive` (seconds)
    pub keepalive_s: Option<u64>,
    /// `--serial`
    pub serial: Option<PathBuf>,
    /// `--baud`
    pub baud: Option<u32>,
    /// `--mode`
    pub mode: Option<StreamMode>,
    /// `--data-dir`
    pub data_dir: Option<PathBuf>,
    /// `--heartbeat` (seconds)
    pub heartbeat_s: Option<u64>,
    /// `--time-scale`: divides every serial timeout (simulated printers faster than real time).
    pub time_scale: f64,
}

impl Default for Flags {
    fn default() -> Self {
        Flags {
            id: None,
            broker: None,
            username: None,
            ca_file: None,
            keepalive_s: None,
            serial: None,
            baud: None,
            mode: None,
            data_dir: None,
            heartbeat_s: None,
            time_scale: 1.0,
        }
    }
}

/// The gateway's settings: the config file, overridden by flags, checked. A missing or invalid
/// value is an error naming its key (the same rules and wording as the supervisor's,
/// `transport::settings`).
pub fn settings(file: FileConfig, args: &Flags) -> Result<Settings, ConfigError> {
    let missing = |key: &'static str, flag: &str| ConfigError::Invalid {
        key,
        message: format!("missing: set `{key}` in the config file or pass {flag}"),
    };
    let id = args
        .id
        .clone()
        .or(file.id)
        .ok_or_else(|| missing("id", "--id"))?;
    let printer_id = PrinterId::new(id).map_err(|e| ConfigError::Invalid {
        key: "id",
        message: e.to_string(),
    })?;
    let topics = Topics::new(
        file.topic_root
            .unwrap_or_else(|| protocol::DEFAULT_ROOT.into()),
    )
    .map_err(|e| ConfigError::Invalid {
        key: "topic_root",
        message: e.to_string(),
    })?;
    let mut broker = broker_url(
        &args
            .broker
            .clone()
            .or(file.broker.url)
            .unwrap_or_else(|| "mqtt://127.0.0.1:1883".into()),
    )?;
    let serial_port = args
        .serial
        .clone()
        .or(file.serial.port)
        .ok_or_else(|| missing("serial.port", "--serial"))?;
    let data_dir = args
        .data_dir
        .clone()
        .or(file.data_dir)
        .ok_or_else(|| missing("data_dir", "--data-dir"))?;
    let mode = match (args.mode, file.serial.mode.as_deref()) {
        (Some(mode), _) => mode,
        (None, Some("pingpong")) => StreamMode::PingPong,
        (None, Some("auto") | None) => StreamMode::Auto,
        (None, Some(other)) => {
            return Err(ConfigError::Invalid {
                key: "serial.mode",
                message: format!("{other:?} is not `auto` or `pingpong`"),
            })
        }
    };
    // Below 0.001 the link's scaled timeouts no longer fit in a Duration.
    if !(args.time_scale.is_finite() && args.time_scale >= 0.001) {
        return Err(ConfigError::Invalid {
            key: "time-scale",
            message: "must be a number of at least 0.001".into(),
        });
    }
    let invalid = |key: &'static str| move |message: String| ConfigError::Invalid { key, message };
    let seconds = |key: &'static str, s: u64| settings::seconds(s).map_err(invalid(key));
    let mut core = CoreConfig::new(printer_id);
    core.topics = topics;
    if let Some(n) = file.name {
        core.name = n;
    }
    if let Some(m) = file.model {
        core.model = m;
    }
    core.tags = file.tags;
    if let Some(h) = args.heartbeat_s.or(file.timing.heartbeat_s) {
        core.heartbeat = seconds("timing.heartbeat_s", h)?;
    }
    if let Some(m) = file.timing.state_min_interval_ms {
        core.state_min_interval =
            settings::millis(m).map_err(invalid("timing.state_min_interval_ms"))?;
    }
    if let Some(s) = file.timing.chunk_timeout_s {
        core.chunk_timeout = seconds("timing.chunk_timeout_s", s)?;
    }
    let keepalive = settings::keepalive(args.keepalive_s.or(file.broker.keepalive_s).unwrap_or(15))
        .map_err(invalid("broker.keepalive_s"))?;
    let link = LinkConfig {
        mode,
        ..LinkConfig::default()
    }
    .scaled(1.0 / args.time_scale);
    broker.username = args.username.clone().or(file.broker.username);
    broker.password = std::env::var("PRINTLOOP_MQTT_PASSWORD")
        .ok()
        .or(file.broker.password);
    broker.ca_file = args.ca_file.clone().or(file.broker.ca_file);
    Ok(Settings {
        core,
        broker,
        keepalive,
        data_dir,
        serial_port,
        baud: args.baud.or(file.serial.baud).unwrap_or(250_000),
        link,
        max_backoff: Duration::from_secs(30),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_name_the_key() {
        for bad in [
            "tcp://x",
            "mqtt://",
            "mqtt://h:99999",
            "mqtt://u:p@h:1",
            "mqtt://h:1/x",
        ] {
            let e = broker_url(bad).expect_err(bad);
            assert!(e.to_string().contains("broker.url"), "{e}");
        }
        assert_eq!(
            broker_url("mqtt://127.0.0.1:1884").expect("valid").port,
            1884
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let e =
            FileConfig::parse("id = \"p0\"\n[serial]\nbaudrate = 1\n").expect_err("unknown key");
        assert!(e.contains("baudrate"), "{e}");
        let e = FileConfig::parse("id = 3\n").expect_err("wrong type");
        assert!(e.contains("id"), "{e}");
        let ok = FileConfig::parse(
            "id = \"p0\"\ntags = [\"pla\"]\n[broker]\nurl = \"mqtt://127.0.0.1:1883\"\n[serial]\nport = \"/dev/ttyUSB0\"\nbaud = 115200\n[timing]\nheartbeat_s = 5\n",
        )
        .expect("valid");
        assert_eq!(ok.serial.baud, Some(115_200));
    }

    #[test]
    fn the_file_and_flags_merge_with_the_shared_rules() {
        let file = |text: &str| FileConfig::parse(text).expect("valid toml");
        let base = "id = \"p0\"\ndata_dir = \"/tmp/x\"\n[serial]\nport = \"/dev/null\"\n";
        let s = settings(file(base), &Flags::default()).expect("valid");
        assert_eq!(s.keepalive, Duration::from_secs(15));
        let flags = Flags {
            heartbeat_s: Some(3),
            mode: Some(StreamMode::PingPong),
            ..Flags::default()
        };
        let s =
            settings(file(&format!("{base}[timing]\nheartbeat_s = 9\n")), &flags).expect("valid");
        assert_eq!(s.core.heartbeat_ms(), 3_000, "a flag wins over the file");
        for (extra, key) in [
            ("[timing]\nheartbeat_s = 0\n", "timing.heartbeat_s"),
            ("[timing]\nchunk_timeout_s = 0\n", "timing.chunk_timeout_s"),
            (
                "[timing]\nstate_min_interval_ms = 0\n",
                "timing.state_min_interval_ms",
            ),
            ("[broker]\nkeepalive_s = 0\n", "broker.keepalive_s"),
            // MQTT's keep-alive is 16 bits: rumqttc would send 65 536 s as 0 (none at all).
            ("[broker]\nkeepalive_s = 65536\n", "broker.keepalive_s"),
            (
                "[timing]\nheartbeat_s = 9223372036854775807\n",
                "timing.heartbeat_s",
            ),
        ] {
            let e = settings(file(&format!("{base}{extra}")), &Flags::default()).expect_err(extra);
            assert!(e.to_string().contains(key), "{extra}: {e}");
        }
        let e = settings(file("data_dir = \"/tmp/x\"\n"), &Flags::default()).expect_err("no id");
        assert!(e.to_string().contains("missing: set `id`"), "{e}");
    }
}
