//! First boot of the Raspberry Pi image: one file on the FAT boot partition configures the Pi.
//!
//! Before the first boot the operator edits `printloop-gateway.toml` on the boot partition
//! (`/boot/firmware` on the Pi). It is the gateway's own configuration file (see
//! [`crate::config`]) plus a `[system]` section for the Pi itself:
//!
//! ```toml
//! id = "p1"
//! [broker]
//! url = "mqtt://farm-server:1883"
//! username = "p1"
//! password = "secret"
//! [serial]
//! port = "/dev/ttyACM0"
//!
//! [system]                          # every key optional
//! hostname = "printer-p1"           # RFC 1123; default printloop-<id>
//! timezone = "Europe/Berlin"        # a name under /usr/share/zoneinfo
//! wifi_ssid = "farm"
//! wifi_password = "8 to 63 characters, or 64 hex digits"
//! wifi_country = "DE"
//! ssh_authorized_key = "ssh-ed25519 AAAA… admin@laptop"   # turns ssh on
//! ```
//!
//! [`plan`] parses and validates the file without touching anything; [`apply`] writes the
//! result under a root directory (`/` on the Pi, a temporary directory in tests); [`run`] is the
//! whole first-boot step as `printloop-gateway firstboot` performs it: plan, apply, then replace
//! the boot file by `printloop-gateway.toml.applied` with its secrets removed, or, on an error,
//! leave it in place and explain the error in `printloop-gateway.error.txt` beside it.
//!
//! Semantics of a second application (the operator renames `.applied` back, edits, reboots):
//! the gateway part replaces `/etc/printloop/gateway.toml` as a whole, except that a broker
//! password left out is carried over from the file it replaces when the broker URL and user name
//! are unchanged (the `.applied` file no longer holds it); a `[system]` key left out leaves that
//! setting as it is (a Wi-Fi password left out is carried over for the same SSID; write
//! `wifi_password = ""` for an open network).
//!
//! Secrets (the broker password, the Wi-Fi password) never appear in an error, a warning, a
//! `Debug` output or the `.applied` file.
//!
//! This file holds the types, the constants and [`run`]; `validate` holds [`plan`], `write`
//! holds [`apply`], and `secrets` holds [`redacted`] and the scrubbing of error messages.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod secrets;
mod validate;
mod write;

pub use secrets::redacted;
pub use validate::plan;
pub use write::apply;

use write::{sync_dir, write_file};

/// The file's name on the boot partition.
pub const BOOT_FILE_NAME: &str = "printloop-gateway.toml";
/// What the boot file is renamed to once applied (with its secrets removed).
pub const APPLIED_FILE_NAME: &str = "printloop-gateway.toml.applied";
/// Where an error is explained, beside the boot file.
pub const ERROR_FILE_NAME: &str = "printloop-gateway.error.txt";
/// The gateway's state directory when the boot file does not set `data_dir`.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/printloop/gateway";
/// The gateway's configuration file, relative to the root.
pub const GATEWAY_CONFIG: &str = "etc/printloop/gateway.toml";
/// wpa_supplicant's configuration for `wpa_supplicant@wlan0.service`, relative to the root.
pub const WPA_CONFIG: &str = "etc/wpa_supplicant/wpa_supplicant-wlan0.conf";
/// Root's authorized keys, relative to the root.
pub const AUTHORIZED_KEYS: &str = "root/.ssh/authorized_keys";
/// The marker whose presence lets `ssh.service` start (a condition in the image's drop-in).
pub const SSH_MARKER: &str = "etc/printloop/ssh-enabled";
/// The user and group the gateway runs as.
pub const SERVICE_USER: &str = "printloop-gateway";

/// What is wrong with the boot file, or what could not be written.
#[derive(Debug, thiserror::Error)]
pub enum FirstBootError {
    /// The boot file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("line {line}, column {column}: {message}")]
    Syntax {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong (never a secret value).
        message: String,
    },
    /// A key is unknown, missing, of the wrong type or has an invalid value.
    #[error("`{key}`: {message}")]
    Invalid {
        /// The key, with its section: `broker.url`, `system.wifi_ssid`.
        key: String,
        /// What is wrong (never a secret value).
        message: String,
    },
    /// A file could not be written under the root.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> FirstBootError {
    FirstBootError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// A secret string: `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for writing it where it belongs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The `[system]` section.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemSection {
    /// Host name (RFC 1123).
    pub hostname: Option<String>,
    /// Time zone, a name under /usr/share/zoneinfo (`Europe/Berlin`, `Etc/UTC`).
    pub timezone: Option<String>,
    /// Wi-Fi network name.
    pub wifi_ssid: Option<String>,
    /// WPA passphrase (8 to 63 characters) or raw key (64 hex digits); `""` for an open network.
    pub wifi_password: Option<String>,
    /// Regulatory country, two letters (ISO 3166-1).
    pub wifi_country: Option<String>,
    /// One or more OpenSSH public keys (one a line); their presence turns ssh on.
    pub ssh_authorized_key: Option<String>,
}

impl fmt::Debug for SystemSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SystemSection")
            .field("hostname", &self.hostname)
            .field("timezone", &self.timezone)
            .field("wifi_ssid", &self.wifi_ssid)
            .field("wifi_password", &self.wifi_password.as_ref().map(|_| "***"))
            .field("wifi_country", &self.wifi_country)
            .field("ssh_authorized_key", &self.ssh_authorized_key)
            .finish()
    }
}

/// The Wi-Fi key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WifiKey {
    /// An open network (`wifi_password = ""`).
    Open,
    /// A WPA passphrase, 8 to 63 printable ASCII characters.
    Passphrase(Secret),
    /// A raw WPA key, 64 hex digits.
    Hex(Secret),
    /// Not given: the key already configured for the same SSID, else an open network.
    Keep,
}

/// The Wi-Fi network to join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wifi {
    /// The network name, 1 to 32 bytes.
    pub ssid: String,
    /// Its key.
    pub key: WifiKey,
    /// Regulatory country, upper case.
    pub country: Option<String>,
}

/// What the boot file asks for, validated. Its `Debug` shows no secret.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The printer id.
    pub printer_id: String,
    /// The gateway's configuration without the broker password (`data_dir` filled in).
    pub gateway: toml::Table,
    /// The broker password, if the file gives one.
    pub broker_password: Option<Secret>,
    /// The host name: `system.hostname`, else `printloop-<id>`.
    pub hostname: String,
    /// The time zone, if given.
    pub timezone: Option<String>,
    /// The Wi-Fi network, if given.
    pub wifi: Option<Wifi>,
    /// The ssh public keys, normalised to one a line, if given.
    pub ssh_authorized_keys: Option<String>,
    /// Things worth telling the operator that are not errors.
    pub warnings: Vec<String>,
}

/// What [`run`] did.
#[derive(Debug)]
pub struct Outcome {
    /// The files written under the root.
    pub written: Vec<PathBuf>,
    /// The boot file's new name (secrets removed).
    pub applied: PathBuf,
    /// Warnings from the plan.
    pub warnings: Vec<String>,
    /// The host name now configured (the running system's name is set by the caller).
    pub hostname: String,
}

/// The whole first-boot step: reads `boot_file`, applies it under `root`, then replaces it by
/// [`APPLIED_FILE_NAME`] without its secrets and removes a stale [`ERROR_FILE_NAME`]. On an
/// error the boot file stays and the error is written to [`ERROR_FILE_NAME`] beside it (best
/// effort) before it is returned.
pub fn run(boot_file: &Path, root: &Path) -> Result<Outcome, FirstBootError> {
    let dir = boot_file.parent().unwrap_or(Path::new("."));
    let error_file = dir.join(ERROR_FILE_NAME);
    let result = (|| -> Result<Outcome, FirstBootError> {
        let text = fs::read_to_string(boot_file).map_err(|source| FirstBootError::Read {
            path: boot_file.to_owned(),
            source,
        })?;
        let plan = plan(&text)?;
        let written = apply(&plan, root)?;
        let applied = dir.join(APPLIED_FILE_NAME);
        write_file(&applied, redacted(&text).as_bytes(), 0o644, None)?;
        fs::remove_file(boot_file).map_err(|source| FirstBootError::Write {
            path: boot_file.to_owned(),
            source,
        })?;
        sync_dir(dir);
        Ok(Outcome {
            written,
            applied,
            warnings: plan.warnings,
            hostname: plan.hostname,
        })
    })();
    match &result {
        Ok(_) => {
            if fs::remove_file(&error_file).is_ok() {
                sync_dir(dir);
            }
        }
        Err(e) => {
            let text = error_report(e, boot_file);
            let _ = write_file(&error_file, text.as_bytes(), 0o644, None);
        }
    }
    result
}

/// The text of the error file left on the boot partition.
pub fn error_report(e: &FirstBootError, boot_file: &Path) -> String {
    format!(
        "printloop: the first-boot configuration was NOT applied.\r\n\
         \r\n\
         {name}: {e}\r\n\
         \r\n\
         Fix {name} on this partition (it has not been changed) and boot the Pi again;\r\n\
         this file is removed once the configuration is applied.\r\n",
        name = boot_file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| BOOT_FILE_NAME.into()),
    )
}

#[cfg(test)]
mod tests;
