//! The rules both binaries apply to their config files and flags, with one wording: a file is
//! TOML whose unknown or mistyped keys are named with their line ([`load_toml`]); a duration in
//! seconds is at least 1 and at most a year, MQTT's keep-alive at most 65 535 s (the protocol's
//! field is 16 bits: rumqttc would silently truncate a larger one), a count at least 1; a bad
//! value is [`ConfigError::Invalid`] naming its key as the file spells it.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// What is wrong with a configuration.
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

/// Reads and parses a TOML config file.
pub fn load_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(&text).map_err(|message| ConfigError::Parse {
        path: path.to_owned(),
        message,
    })
}

/// Parses TOML config text; the error names the key and the line.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

/// The longest duration a setting may have: a year.
pub const MAX_SECONDS: u64 = 365 * 24 * 3600;

/// The longest MQTT keep-alive (the CONNECT packet's 16-bit field).
pub const MAX_KEEPALIVE_S: u64 = u16::MAX as u64;

/// A duration given in seconds.
pub fn seconds(s: u64) -> Result<Duration, String> {
    match s {
        0 => Err("must be at least 1".into()),
        s if s > MAX_SECONDS => Err(format!("must be at most {MAX_SECONDS} (a year)")),
        s => Ok(Duration::from_secs(s)),
    }
}

/// An MQTT keep-alive given in seconds.
pub fn keepalive(s: u64) -> Result<Duration, String> {
    match s {
        0 => Err("must be at least 1".into()),
        s if s > MAX_KEEPALIVE_S => {
            Err(format!("must be at most {MAX_KEEPALIVE_S} (MQTT's limit)"))
        }
        s => Ok(Duration::from_secs(s)),
    }
}

/// A duration given in milliseconds (at least 1 ms, at most a year).
pub fn millis(ms: u64) -> Result<Duration, String> {
    match ms {
        0 => Err("must be at least 1".into()),
        ms if ms > MAX_SECONDS * 1000 => {
            Err(format!("must be at most {} (a year)", MAX_SECONDS * 1000))
        }
        ms => Ok(Duration::from_millis(ms)),
    }
}

/// A count that must be at least 1.
pub fn at_least_one(n: u32) -> Result<u32, String> {
    if n == 0 {
        Err("must be at least 1".into())
    } else {
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_too_long_and_the_keepalive_field_are_refused_with_one_wording() {
        assert_eq!(seconds(0).expect_err("refused"), "must be at least 1");
        assert_eq!(seconds(7).expect("accepted"), Duration::from_secs(7));
        assert!(seconds(u64::MAX).expect_err("refused").contains("at most"));
        assert_eq!(
            keepalive(65_535).expect("accepted"),
            Duration::from_secs(65_535)
        );
        // rumqttc sends `as_secs() as u16`: 65 536 s would go out as 0, no keep-alive at all.
        assert!(keepalive(65_536).expect_err("refused").contains("65535"));
        assert_eq!(millis(0).expect_err("refused"), "must be at least 1");
        assert_eq!(at_least_one(0).expect_err("refused"), "must be at least 1");
        assert_eq!(at_least_one(3), Ok(3));
    }
}
