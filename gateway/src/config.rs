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

use serde::Deserialize;

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

/// What is wrong with the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown or mistyped key.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, which names the key and the line.
        message: String,
    },
    /// A value is missing or invalid.
    #[error("invalid `{key}`: {message}")]
    Invalid {
        /// The key (as in the file; flags say the same).
        key: &'static str,
        /// Why.
        message: String,
    },
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses config text.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

/// Parses the broker URL, naming the key in the error.
pub fn broker_url(url: &str) -> Result<transport::BrokerAddr, ConfigError> {
    transport::BrokerAddr::parse(url).map_err(|e| ConfigError::Invalid {
        key: "broker.url",
        message: format!("{url:?}: {e}"),
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
}
