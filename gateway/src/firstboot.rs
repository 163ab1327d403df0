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

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::FileConfig;

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

/// Parses and validates a boot file. Touches nothing.
pub fn plan(boot_toml: &str) -> Result<Plan, FirstBootError> {
    // Windows editors may start the file with a byte-order mark; TOML has none.
    let boot_toml = boot_toml.strip_prefix('\u{feff}').unwrap_or(boot_toml);
    // Whatever goes wrong, no secret value may leave in the message: scrub the ones we can find.
    let secrets = find_secrets(boot_toml);
    plan_inner(boot_toml).map_err(|e| scrub_error(e, &secrets))
}

fn plan_inner(boot_toml: &str) -> Result<Plan, FirstBootError> {
    let mut table: toml::Table =
        toml::from_str(boot_toml).map_err(|e| syntax_error(boot_toml, &e))?;
    let system = match table.remove("system") {
        None => SystemSection::default(),
        Some(toml::Value::Table(t)) => {
            // The section is re-serialised and parsed alone so the error can name the key.
            let mut wrapper = toml::Table::new();
            wrapper.insert("system".into(), toml::Value::Table(t));
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Wrapper {
                system: SystemSection,
            }
            let text = toml::to_string(&wrapper).map_err(|e| invalid("system", e.to_string()))?;
            toml::from_str::<Wrapper>(&text)
                .map_err(|e| reserialised_error(&text, &e))?
                .system
        }
        Some(_) => return Err(invalid("system", "must be a table: write it as [system]")),
    };
    let mut warnings = Vec::new();

    // The gateway part: exactly what `printloop-gateway --config` accepts.
    if !table.contains_key("data_dir") {
        table.insert(
            "data_dir".into(),
            toml::Value::String(DEFAULT_DATA_DIR.into()),
        );
    }
    let text = toml::to_string(&table).map_err(|e| invalid("(gateway)", e.to_string()))?;
    let file = FileConfig::parse(&text).map_err(|_| {
        // `parse` gives toml's rendered message, which quotes the line: parse again for the parts.
        match toml::from_str::<FileConfig>(&text) {
            Err(e) => reserialised_error(&text, &e),
            Ok(_) => invalid("(gateway)", "invalid"),
        }
    })?;
    let broker_password = match table.get_mut("broker") {
        Some(toml::Value::Table(b)) => match b.remove("password") {
            Some(toml::Value::String(p)) => Some(Secret(p)),
            Some(_) => return Err(invalid("broker.password", "must be a string")),
            None => None,
        },
        _ => None,
    };
    let id = file
        .id
        .clone()
        .filter(|id| !id.is_empty())
        .ok_or_else(|| invalid("id", "missing: every gateway needs its printer id"))?;
    protocol::PrinterId::new(id.clone()).map_err(|e| invalid("id", e.to_string()))?;
    if let Some(root) = &file.topic_root {
        protocol::Topics::new(root.clone()).map_err(|e| invalid("topic_root", e.to_string()))?;
    }
    let url = file.broker.url.clone().ok_or_else(|| {
        invalid(
            "broker.url",
            "missing: the broker's address, e.g. mqtt://farm-server:1883",
        )
    })?;
    crate::config::broker_url(&url).map_err(|e| match e {
        crate::config::ConfigError::Invalid { message, .. } => invalid("broker.url", message),
        other => invalid("broker.url", other.to_string()),
    })?;
    if let Some(ca) = &file.broker.ca_file {
        if !ca.is_absolute() {
            return Err(invalid(
                "broker.ca_file",
                "must be an absolute path (a file on the boot partition is /boot/firmware/NAME)",
            ));
        }
    }
    if file.broker.password.is_some() && file.broker.username.is_none() {
        warnings.push("broker.password is set but broker.username is not".into());
    }
    if file.serial.port.is_none() {
        return Err(invalid(
            "serial.port",
            "missing: the printer's serial device, e.g. /dev/ttyACM0 or /dev/ttyUSB0",
        ));
    }
    match file.serial.mode.as_deref() {
        None | Some("auto" | "pingpong") => {}
        Some(other) => {
            return Err(invalid(
                "serial.mode",
                format!("{other:?} is not `auto` or `pingpong`"),
            ))
        }
    }
    if file.serial.baud == Some(0) {
        return Err(invalid("serial.baud", "must be a baud rate, e.g. 115200"));
    }
    if file.timing.heartbeat_s == Some(0) {
        return Err(invalid("timing.heartbeat_s", "must be at least 1"));
    }
    if file.broker.keepalive_s == Some(0) {
        return Err(invalid("broker.keepalive_s", "must be at least 1"));
    }
    match &file.data_dir {
        Some(d) if d.is_absolute() => {}
        _ => return Err(invalid("data_dir", "must be an absolute path")),
    }

    // [system]
    let hostname = match &system.hostname {
        Some(h) => {
            check_hostname(h).map_err(|m| invalid("system.hostname", m))?;
            h.to_ascii_lowercase()
        }
        None => default_hostname(&id),
    };
    let timezone = match &system.timezone {
        Some(tz) => {
            check_timezone(tz).map_err(|m| invalid("system.timezone", m))?;
            Some(tz.clone())
        }
        None => None,
    };
    let country = match &system.wifi_country {
        Some(c) if c.len() == 2 && c.bytes().all(|b| b.is_ascii_alphabetic()) => {
            Some(c.to_ascii_uppercase())
        }
        Some(c) => {
            return Err(invalid(
                "system.wifi_country",
                format!("{c:?} is not a two-letter country code (ISO 3166-1, e.g. DE, US, GB)"),
            ))
        }
        None => None,
    };
    let wifi = match (&system.wifi_ssid, &system.wifi_password) {
        (None, Some(_)) => {
            return Err(invalid(
                "system.wifi_ssid",
                "missing: system.wifi_password is set but not the network's name",
            ))
        }
        (None, None) => {
            if country.is_some() {
                warnings.push(
                    "system.wifi_country is set without system.wifi_ssid: it is not used".into(),
                );
            }
            None
        }
        (Some(ssid), password) => {
            if ssid.is_empty() || ssid.len() > 32 {
                return Err(invalid(
                    "system.wifi_ssid",
                    format!("must be 1 to 32 bytes long, not {}", ssid.len()),
                ));
            }
            if ssid.contains(['\0', '\n', '\r']) {
                return Err(invalid(
                    "system.wifi_ssid",
                    "must not contain a line break or NUL",
                ));
            }
            let key = match password {
                None => WifiKey::Keep,
                Some(p) if p.is_empty() => WifiKey::Open,
                Some(p) => check_psk(p).map_err(|m| invalid("system.wifi_password", m))?,
            };
            if country.is_none() {
                warnings.push(
                    "system.wifi_country is not set: the Wi-Fi uses the world regulatory \
                     domain, which may hide some channels"
                        .into(),
                );
            }
            Some(Wifi {
                ssid: ssid.clone(),
                key,
                country,
            })
        }
    };
    let ssh_authorized_keys = match &system.ssh_authorized_key {
        Some(k) => Some(check_ssh_keys(k).map_err(|m| invalid("system.ssh_authorized_key", m))?),
        None => None,
    };
    Ok(Plan {
        printer_id: id,
        gateway: table,
        broker_password,
        hostname,
        timezone,
        wifi,
        ssh_authorized_keys,
        warnings,
    })
}

/// Checks a host name against RFC 1123 (labels of a-z, 0-9 and inner '-', 1 to 63 each).
fn check_hostname(h: &str) -> Result<(), String> {
    if h.is_empty() || h.len() > 253 {
        return Err(format!("{h:?} must be 1 to 253 characters long"));
    }
    for label in h.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "{h:?}: each dot-separated part must be 1 to 63 characters long"
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!(
                "{h:?}: only letters a-z, digits and '-' are allowed (RFC 1123)"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("{h:?}: a part must not start or end with '-'"));
        }
    }
    if h.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("{h:?} looks like an address, not a name"));
    }
    Ok(())
}

/// `printloop-<id>`, with what a host name cannot hold replaced.
fn default_hostname(id: &str) -> String {
    let mut h: String = format!("printloop-{id}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    h.truncate(63);
    h.trim_end_matches('-').to_owned()
}

/// A time zone name: relative, '/'-separated, no `.` or `..` parts. Its existence is checked by
/// [`apply`] against the root's zoneinfo.
fn check_timezone(tz: &str) -> Result<(), String> {
    let ok = !tz.is_empty()
        && tz.len() <= 64
        && tz.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'+'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{tz:?} is not a time zone name like Europe/Berlin or Etc/UTC"
        ))
    }
}

/// A WPA passphrase (8 to 63 printable ASCII characters) or a raw key (64 hex digits). The
/// messages never quote the value.
fn check_psk(p: &str) -> Result<WifiKey, String> {
    if p.len() == 64 && p.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(WifiKey::Hex(Secret(p.to_ascii_lowercase())));
    }
    if !p.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(
            "a WPA passphrase may hold only printable ASCII characters (no accents, no line breaks)"
                .into(),
        );
    }
    if !(8..=63).contains(&p.len()) {
        return Err(format!(
            "a WPA passphrase is 8 to 63 characters long (this one has {}), or 64 hex digits; \
             \"\" for an open network",
            p.len()
        ));
    }
    Ok(WifiKey::Passphrase(Secret(p.to_owned())))
}

/// Key types `sshd` accepts in `authorized_keys`.
const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// One or more public keys, one a line (options before the type are allowed). Returns them
/// normalised: trimmed, without blank and comment lines, each ending in a line break.
fn check_ssh_keys(text: &str) -> Result<String, String> {
    let mut out = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.contains(['\0', '\r']) {
            return Err("must not contain NUL or carriage returns".into());
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let at = fields.iter().position(|f| SSH_KEY_TYPES.contains(f));
        let valid = match at {
            Some(i) => fields.get(i + 1).is_some_and(|b64| {
                b64.len() >= 16
                    && b64
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
            }),
            None => false,
        };
        if !valid {
            let shown: String = line.chars().take(40).collect();
            return Err(format!(
                "{shown:?}… is not an OpenSSH public key line (\"ssh-ed25519 AAAA… comment\"; \
                 the contents of ~/.ssh/id_ed25519.pub)"
            ));
        }
        out.push_str(line);
        out.push('\n');
    }
    if out.is_empty() {
        return Err("holds no key".into());
    }
    Ok(out)
}

/// Writes what `plan` asks for under `root` (`/` on the Pi). Returns the files written, as
/// paths under `root`. Each file is replaced atomically (written beside, synced, renamed).
pub fn apply(plan: &Plan, root: &Path) -> Result<Vec<PathBuf>, FirstBootError> {
    let mut written = Vec::new();
    let service_ids = lookup_ids(root, SERVICE_USER);

    // The gateway's configuration. A password left out is carried over from the file being
    // replaced when it is for the same broker and user.
    let config_path = root.join(GATEWAY_CONFIG);
    let mut gateway = plan.gateway.clone();
    let password = match &plan.broker_password {
        Some(p) => Some(p.clone()),
        None => carried_password(&config_path, &gateway),
    };
    if let Some(p) = &password {
        if let Some(toml::Value::Table(b)) = gateway.get_mut("broker") {
            b.insert(
                "password".into(),
                toml::Value::String(p.expose().to_owned()),
            );
        }
    }
    let body = toml::to_string(&gateway).map_err(|e| FirstBootError::Write {
        path: config_path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let text = format!(
        "# The printloop gateway's configuration, written at first boot from the boot partition's\n\
         # {BOOT_FILE_NAME} by `printloop-gateway firstboot`. See the gateway's documentation.\n\n{body}"
    );
    write_file(
        &config_path,
        text.as_bytes(),
        0o640,
        service_ids.map(|(_, gid)| gid),
    )?;
    written.push(config_path);

    // The state directory, owned by the service user when it exists on this root.
    if let Some(toml::Value::String(d)) = gateway.get("data_dir") {
        let dir = under(root, Path::new(d));
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(|source| FirstBootError::Write {
                path: dir.clone(),
                source,
            })?;
            let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o750));
            if let Some((uid, gid)) = service_ids {
                std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|source| {
                    FirstBootError::Write {
                        path: dir.clone(),
                        source,
                    }
                })?;
            }
            written.push(dir);
        }
    }

    // Host name.
    let hostname_path = root.join("etc/hostname");
    write_file(
        &hostname_path,
        format!("{}\n", plan.hostname).as_bytes(),
        0o644,
        None,
    )?;
    written.push(hostname_path);
    let hosts_path = root.join("etc/hosts");
    let hosts = fs::read_to_string(&hosts_path).unwrap_or_else(|_| {
        "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n".into()
    });
    write_file(
        &hosts_path,
        hosts_with(&hosts, &plan.hostname).as_bytes(),
        0o644,
        None,
    )?;
    written.push(hosts_path);

    // Time zone.
    if let Some(tz) = &plan.timezone {
        let zone = root.join("usr/share/zoneinfo").join(tz);
        if !zone.is_file() {
            return Err(invalid(
                "system.timezone",
                format!("{tz:?} is not a known time zone (no /usr/share/zoneinfo/{tz})"),
            ));
        }
        let localtime = root.join("etc/localtime");
        let tmp = root.join("etc/.localtime.firstboot");
        let _ = fs::remove_file(&tmp);
        let target = Path::new("/usr/share/zoneinfo").join(tz);
        std::os::unix::fs::symlink(&target, &tmp)
            .and_then(|()| fs::rename(&tmp, &localtime))
            .map_err(|source| FirstBootError::Write {
                path: localtime.clone(),
                source,
            })?;
        written.push(localtime);
        let timezone_path = root.join("etc/timezone");
        write_file(&timezone_path, format!("{tz}\n").as_bytes(), 0o644, None)?;
        written.push(timezone_path);
    }

    // Wi-Fi.
    if let Some(wifi) = &plan.wifi {
        let wpa_path = root.join(WPA_CONFIG);
        let key = match &wifi.key {
            WifiKey::Keep => carried_wifi_key(&wpa_path, &wifi.ssid).unwrap_or(WifiKey::Open),
            k => k.clone(),
        };
        write_file(&wpa_path, wpa_config(wifi, &key).as_bytes(), 0o600, None)?;
        written.push(wpa_path);
    }

    // ssh: the keys, and the marker that lets ssh.service start.
    if let Some(keys) = &plan.ssh_authorized_keys {
        let ssh_dir = root.join("root/.ssh");
        fs::create_dir_all(&ssh_dir)
            .and_then(|()| fs::set_permissions(&ssh_dir, fs::Permissions::from_mode(0o700)))
            .map_err(|source| FirstBootError::Write {
                path: ssh_dir.clone(),
                source,
            })?;
        let keys_path = root.join(AUTHORIZED_KEYS);
        write_file(&keys_path, keys.as_bytes(), 0o600, None)?;
        written.push(keys_path);
        let marker = root.join(SSH_MARKER);
        write_file(
            &marker,
            b"# Present: ssh.service starts (set by printloop-gateway firstboot from\n\
              # system.ssh_authorized_key). Remove it and reboot to turn ssh off.\n",
            0o644,
            None,
        )?;
        written.push(marker);
    }
    Ok(written)
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

/// The boot file with its secrets (the broker and Wi-Fi passwords) turned into comments. Keeps
/// the operator's comments and layout; when the secrets cannot be removed line by line (an
/// inline table, a multi-line string), the result is the parsed file re-serialised without them.
pub fn redacted(boot_toml: &str) -> String {
    let boot_toml = boot_toml.strip_prefix('\u{feff}').unwrap_or(boot_toml);
    const NOTE: &str = "(removed from this file once applied; a password left out is kept)";
    let mut out = String::new();
    let mut lines = boot_toml.lines();
    while let Some(line) = lines.next() {
        match secret_key(line) {
            Some(key) => {
                out.push_str(&format!("# {key} = {NOTE}\n"));
                // A multi-line string runs on to its closing delimiter.
                let value = line.split_once('=').map_or("", |(_, v)| v.trim_start());
                for delim in ["\"\"\"", "'''"] {
                    if let Some(rest) = value.strip_prefix(delim) {
                        if !rest.contains(delim) {
                            for next in lines.by_ref() {
                                if next.contains(delim) {
                                    break;
                                }
                            }
                        }
                    }
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    let secrets = find_secrets(boot_toml);
    let clean = toml::from_str::<toml::Table>(&out).is_ok()
        && secrets.iter().all(|s| !out.contains(s.as_str()));
    if clean {
        return out;
    }
    // Fallback: the parsed table without the secrets (comments are lost).
    let mut table: toml::Table = toml::from_str(boot_toml).unwrap_or_default();
    for section in ["broker", "system"] {
        if let Some(toml::Value::Table(t)) = table.get_mut(section) {
            t.remove("password");
            t.remove("wifi_password");
        }
    }
    table.remove("password");
    table.remove("wifi_password");
    format!(
        "# Applied at first boot; passwords removed {NOTE}.\n{}",
        toml::to_string(&table).unwrap_or_default()
    )
}

/// The key of a `key = value` line when it is a secret (`password`, `wifi_password`, also as the
/// last part of a dotted key such as `broker.password`).
fn secret_key(line: &str) -> Option<String> {
    let t = line.trim_start();
    if t.starts_with('#') || t.starts_with('[') {
        return None;
    }
    let (key, _) = t.split_once('=')?;
    let key = key.trim();
    let last = key.rsplit('.').next()?.trim().trim_matches(['"', '\'']);
    matches!(last, "password" | "wifi_password").then(|| key.to_owned())
}

/// The secret values a (possibly invalid) boot file holds, as far as it parses.
fn find_secrets(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(table) = toml::from_str::<toml::Table>(text) {
        let mut visit = |t: &toml::Table| {
            for k in ["password", "wifi_password"] {
                if let Some(toml::Value::String(s)) = t.get(k) {
                    if !s.is_empty() {
                        out.push(s.clone());
                    }
                }
            }
        };
        visit(&table);
        for v in table.values() {
            if let toml::Value::Table(t) = v {
                visit(t);
            }
        }
    } else {
        // Unparsable: take what stands after `password =` on a line, quotes removed.
        for line in text.lines() {
            if secret_key(line).is_some() {
                if let Some((_, v)) = line.split_once('=') {
                    let v = v.trim().trim_matches(['"', '\'']);
                    if !v.is_empty() {
                        out.push(v.to_owned());
                    }
                }
            }
        }
    }
    out
}

fn scrub(text: &str, secrets: &[String]) -> String {
    let mut s = text.to_owned();
    for secret in secrets {
        if !secret.is_empty() {
            s = s.replace(secret.as_str(), "***");
        }
    }
    s
}

fn scrub_error(e: FirstBootError, secrets: &[String]) -> FirstBootError {
    match e {
        FirstBootError::Syntax {
            line,
            column,
            message,
        } => FirstBootError::Syntax {
            line,
            column,
            message: scrub(&message, secrets),
        },
        FirstBootError::Invalid { key, message } => FirstBootError::Invalid {
            key,
            message: scrub(&message, secrets),
        },
        other => other,
    }
}

/// A syntax error in the operator's file: line and column, toml's message without the quoted
/// source line, and no value at all on a secret's line.
fn syntax_error(text: &str, e: &toml::de::Error) -> FirstBootError {
    let (line, column, line_text) = match e.span() {
        Some(span) => position(text, span.start),
        None => (0, 0, ""),
    };
    let message = if secret_key(line_text).is_some() {
        "invalid value (not shown: it is a password)".to_owned()
    } else {
        one_line(e.message())
    };
    FirstBootError::Syntax {
        line,
        column,
        message,
    }
}

/// An error found in a re-serialised part of the file (canonical TOML: one key a line under
/// `[section]` headers): names the key from the span, and shows no value on a password's line.
fn reserialised_error(text: &str, e: &toml::de::Error) -> FirstBootError {
    let mut message = one_line(e.message());
    let unknown = message.starts_with("unknown field `");
    let (mut section, mut line_key) = (None, None);
    if let Some(span) = e.span() {
        let (line, _, line_text) = position(text, span.start);
        section = text
            .lines()
            .take(line)
            .filter_map(|l| {
                let l = l.trim();
                l.strip_prefix('[')
                    .and_then(|l| l.strip_suffix(']'))
                    .map(|s| s.trim().to_owned())
            })
            .last();
        if let Some((k, _)) = line_text.split_once('=') {
            line_key = Some(k.trim().trim_matches('"').to_owned());
            if secret_key(line_text).is_some() && !unknown {
                message = "invalid value (not shown: it is a password)".into();
            }
        }
    }
    let qualified = |name: &str| match &section {
        Some(s) => format!("{s}.{name}"),
        None => name.to_owned(),
    };
    // toml names an unknown key itself ("unknown field `x`, expected one of …").
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((name, tail)) = rest.split_once('`') {
            return invalid(qualified(name), format!("unknown key{tail}"));
        }
    }
    let key = match (&line_key, &section) {
        (Some(k), _) => qualified(k),
        (None, Some(s)) => s.clone(),
        (None, None) => "(file)".to_owned(),
    };
    invalid(key, message)
}

/// toml's multi-line messages on one line.
fn one_line(message: &str) -> String {
    message.trim().replace('\n', "; ")
}

/// 1-based line and column of a byte offset, and that line's text.
fn position(text: &str, offset: usize) -> (usize, usize, &str) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let column = text[start..offset].chars().count() + 1;
    (line, column, &text[start..end])
}

/// `root` joined with an absolute path inside it.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// The uid and gid of `user` in the root's /etc/passwd, if it is there.
fn lookup_ids(root: &Path, user: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string(root.join("etc/passwd")).ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() >= 4 && f[0] == user {
            Some((f[2].parse().ok()?, f[3].parse().ok()?))
        } else {
            None
        }
    })
}

/// The broker password of the configuration file being replaced, when it is for the same
/// broker URL and user name.
fn carried_password(path: &Path, new: &toml::Table) -> Option<Secret> {
    let old: toml::Table = toml::from_str(&fs::read_to_string(path).ok()?).ok()?;
    let broker = |t: &toml::Table, k: &str| -> Option<String> {
        match t.get("broker")? {
            toml::Value::Table(b) => b.get(k)?.as_str().map(str::to_owned),
            _ => None,
        }
    };
    (broker(&old, "url") == broker(new, "url")
        && broker(&old, "username") == broker(new, "username"))
    .then(|| broker(&old, "password").map(Secret))
    .flatten()
}

/// The key of the wpa_supplicant file being replaced, when it is for the same SSID.
fn carried_wifi_key(path: &Path, ssid: &str) -> Option<WifiKey> {
    let old = fs::read_to_string(path).ok()?;
    let mut same = false;
    let mut key = None;
    for line in old.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("ssid=") {
            same = v == hex(ssid.as_bytes()) || v == format!("\"{ssid}\"");
        } else if let Some(v) = line.strip_prefix("psk=") {
            key = Some(
                match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                    Some(p) => WifiKey::Passphrase(Secret(p.to_owned())),
                    None => WifiKey::Hex(Secret(v.to_owned())),
                },
            );
        }
    }
    if same {
        key
    } else {
        None
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The wpa_supplicant configuration for one network. The SSID is written in hex, so any bytes
/// are safe; a passphrase is quoted (wpa_supplicant reads up to the last quote on the line).
fn wpa_config(wifi: &Wifi, key: &WifiKey) -> String {
    let mut s = String::from(
        "# Written by printloop-gateway firstboot from system.wifi_* in the boot partition's\n\
         # printloop-gateway.toml. Used by wpa_supplicant@wlan0.service.\n\
         ctrl_interface=DIR=/run/wpa_supplicant\n\
         update_config=0\n",
    );
    if let Some(c) = &wifi.country {
        s.push_str(&format!("country={c}\n"));
    }
    s.push_str("\nnetwork={\n");
    if wifi.ssid.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        s.push_str(&format!("\t# ssid: {}\n", wifi.ssid));
    }
    s.push_str(&format!(
        "\tssid={}\n\tscan_ssid=1\n",
        hex(wifi.ssid.as_bytes())
    ));
    match key {
        WifiKey::Open | WifiKey::Keep => s.push_str("\tkey_mgmt=NONE\n"),
        WifiKey::Passphrase(p) => s.push_str(&format!(
            "\tkey_mgmt=WPA-PSK WPA-PSK-SHA256 SAE\n\tieee80211w=1\n\tpsk=\"{}\"\n",
            p.expose()
        )),
        WifiKey::Hex(p) => s.push_str(&format!(
            "\tkey_mgmt=WPA-PSK WPA-PSK-SHA256\n\tpsk={}\n",
            p.expose()
        )),
    }
    s.push_str("}\n");
    s
}

/// /etc/hosts with `127.0.1.1 <hostname>` as the only 127.0.1.1 line.
fn hosts_with(hosts: &str, hostname: &str) -> String {
    let short = hostname.split('.').next().unwrap_or(hostname);
    let entry = if short == hostname {
        format!("127.0.1.1\t{hostname}")
    } else {
        format!("127.0.1.1\t{hostname} {short}")
    };
    let mut out = String::new();
    let mut placed = false;
    for line in hosts.lines() {
        if line.split_whitespace().next() == Some("127.0.1.1") {
            if !placed {
                out.push_str(&entry);
                out.push('\n');
                placed = true;
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !placed {
        out.push_str(&entry);
        out.push('\n');
    }
    out
}

/// Replaces `path` atomically: a temporary file beside it with `mode` from the start, synced,
/// optionally given to `group`, renamed over `path`, and the directory synced.
fn write_file(
    path: &Path,
    content: &[u8],
    mode: u32,
    group: Option<u32>,
) -> Result<(), FirstBootError> {
    let err = |source| FirstBootError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.firstboot"));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    let written = (|| -> std::io::Result<()> {
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(content)?;
        f.sync_all()?;
        if let Some(gid) = group {
            std::os::unix::fs::fchown(&f, None, Some(gid))?;
        }
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(err(e));
    }
    sync_dir(dir);
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"# the operator's comment
id = "p1"
name = "MK3S left"
tags = ["pla"]

[broker]
url = "mqtt://10.0.2.2:1883"
username = "p1"
password = "mqtt-secret-42"

[serial]
port = "/dev/ttyACM0"
baud = 115200

[system]
hostname = "Printer-P1"
timezone = "Europe/Berlin"
wifi_ssid = "farm net"
wifi_password = "wifi-secret-42"
wifi_country = "de"
ssh_authorized_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx0ZXN0a2V5dGVzdGtleXRlc3RrZXl0ZXN0a2V5 admin@laptop"
"#;

    const MINIMAL: &str =
        "id = \"p_2\"\n[broker]\nurl = \"mqtt://farm:1883\"\n[serial]\nport = \"/dev/ttyUSB0\"\n";

    /// A root with what `apply` reads: passwd, hosts, a zoneinfo entry.
    fn root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = dir.path();
        fs::create_dir_all(r.join("etc")).expect("etc");
        fs::create_dir_all(r.join("usr/share/zoneinfo/Europe")).expect("zoneinfo");
        fs::write(r.join("usr/share/zoneinfo/Europe/Berlin"), b"TZif").expect("tz");
        fs::write(
            r.join("etc/hosts"),
            "127.0.0.1\tlocalhost\n127.0.1.1\tprintloop\n::1\tlocalhost\n",
        )
        .expect("hosts");
        dir
    }

    fn err(text: &str) -> String {
        plan(text).expect_err("must be refused").to_string()
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn a_full_file_is_planned() {
        let p = plan(FULL).expect("valid");
        assert_eq!(p.printer_id, "p1");
        assert_eq!(p.hostname, "printer-p1");
        assert_eq!(p.timezone.as_deref(), Some("Europe/Berlin"));
        let wifi = p.wifi.as_ref().expect("wifi");
        assert_eq!(wifi.ssid, "farm net");
        assert_eq!(wifi.country.as_deref(), Some("DE"));
        assert_eq!(
            wifi.key,
            WifiKey::Passphrase(Secret("wifi-secret-42".into()))
        );
        assert_eq!(
            p.broker_password.as_ref().map(Secret::expose),
            Some("mqtt-secret-42")
        );
        assert!(p.gateway.get("system").is_none());
        assert_eq!(
            p.gateway.get("data_dir").and_then(|v| v.as_str()),
            Some(DEFAULT_DATA_DIR)
        );
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        // Debug shows no secret.
        let debug = format!("{p:?}");
        assert!(!debug.contains("secret-42"), "{debug}");
    }

    #[test]
    fn a_minimal_file_gets_defaults() {
        let p = plan(MINIMAL).expect("valid");
        assert_eq!(p.hostname, "printloop-p-2");
        assert!(p.wifi.is_none() && p.timezone.is_none() && p.ssh_authorized_keys.is_none());
        assert!(p.broker_password.is_none());
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("[broker]\nurl = \"mqtt://h:1\"\n[serial]\nport = \"/dev/x\"\n", "`id`"),
            ("id = \"P 1\"\n[broker]\nurl = \"mqtt://h:1\"\n[serial]\nport = \"/dev/x\"\n", "`id`"),
            ("id = \"p1\"\n[serial]\nport = \"/dev/x\"\n", "`broker.url`"),
            ("id = \"p1\"\n[broker]\nurl = \"tcp://h\"\n[serial]\nport = \"/dev/x\"\n", "`broker.url`"),
            ("id = \"p1\"\n[broker]\nurl = \"mqtt://h:1\"\n", "`serial.port`"),
            ("id = \"p1\"\n[broker]\nurl = \"mqtt://h:1\"\n[serial]\nport = \"/dev/x\"\nbaudrate = 3\n", "`serial.baudrate`"),
            ("id = \"p1\"\ncolour = 3\n[broker]\nurl = \"mqtt://h:1\"\n[serial]\nport = \"/dev/x\"\n", "`colour`"),
            ("id = \"p1\"\n[broker]\nurl = \"mqtt://h:1\"\n[serial]\nport = \"/dev/x\"\nbaud = \"fast\"\n", "`serial.baud`"),
            ("id = \"p1\"\n[broker]\nurl = \"mqtt://h:1\"\n[serial]\nport = \"/dev/x\"\nmode = \"turbo\"\n", "`serial.mode`"),
            ("id = \"p1\"\n[broker]\nurl = \"mqtt://h:1\"\n[serial]\nport = \"/dev/x\"\n[timing]\nheartbeat_s = 0\n", "`timing.heartbeat_s`"),
            ("id = \"p1\"\ndata_dir = \"rel\"\n[broker]\nurl = \"mqtt://h:1\"\n[serial]\nport = \"/dev/x\"\n", "`data_dir`"),
            ("id = \"p1\"\ntopic_root = \"a//b\"\n[broker]\nurl = \"mqtt://h:1\"\n[serial]\nport = \"/dev/x\"\n", "`topic_root`"),
        ];
        for (text, key) in cases {
            let e = err(text);
            assert!(e.contains(key), "{key} not named in {e:?} for {text:?}");
        }
    }

    fn with_system(system: &str) -> String {
        format!("{MINIMAL}[system]\n{system}\n")
    }

    #[test]
    fn system_keys_are_validated() {
        let long_host = format!("hostname = \"{}\"", "a".repeat(64));
        let long_ssid = format!("wifi_ssid = \"{}\"", "s".repeat(33));
        let long_psk = format!("wifi_ssid = \"x\"\nwifi_password = \"{}\"", "p".repeat(64));
        let cases: &[(&str, &str)] = &[
            ("hostname = \"-bad\"", "`system.hostname`"),
            ("hostname = \"under_score\"", "`system.hostname`"),
            ("hostname = \"\"", "`system.hostname`"),
            (&long_host, "`system.hostname`"),
            ("hostname = \"10.0.0.1\"", "`system.hostname`"),
            ("timezone = \"../etc/passwd\"", "`system.timezone`"),
            ("timezone = \"/Europe/Berlin\"", "`system.timezone`"),
            ("wifi_country = \"DEU\"", "`system.wifi_country`"),
            ("wifi_country = \"1A\"", "`system.wifi_country`"),
            ("wifi_password = \"12345678\"", "`system.wifi_ssid`"),
            (&long_ssid, "`system.wifi_ssid`"),
            ("wifi_ssid = \"\"", "`system.wifi_ssid`"),
            (
                "wifi_ssid = \"x\"\nwifi_password = \"short\"",
                "`system.wifi_password`",
            ),
            (&long_psk, "`system.wifi_password`"),
            (
                "wifi_ssid = \"x\"\nwifi_password = \"caf\u{e9} au lait\"",
                "`system.wifi_password`",
            ),
            (
                "ssh_authorized_key = \"hello\"",
                "`system.ssh_authorized_key`",
            ),
            ("ssh_authorized_key = \"\"", "`system.ssh_authorized_key`"),
            ("wifi_sid = \"x\"", "`system.wifi_sid`"),
            ("hostname = 5", "`system.hostname`"),
        ];
        for (system, key) in cases {
            let e = err(&with_system(system));
            assert!(e.contains(key), "{key} not named in {e:?} for {system:?}");
        }
        let e = err(&format!("system = 3\n{MINIMAL}"));
        assert!(e.contains("`system`"), "{e}");
    }

    #[test]
    fn wifi_keys() {
        let hex64 = "0123456789abcdef".repeat(4);
        let p = plan(&with_system(&format!(
            "wifi_ssid = \"n\"\nwifi_password = \"{}\"\nwifi_country = \"GB\"",
            hex64.to_uppercase()
        )))
        .expect("hex key");
        assert_eq!(p.wifi.expect("wifi").key, WifiKey::Hex(Secret(hex64)));
        let p = plan(&with_system("wifi_ssid = \"n\"\nwifi_password = \"\"")).expect("open");
        assert_eq!(p.wifi.expect("wifi").key, WifiKey::Open);
        assert!(p.warnings.iter().any(|w| w.contains("wifi_country")));
        let p = plan(&with_system("wifi_ssid = \"n\"")).expect("keep");
        assert_eq!(p.wifi.expect("wifi").key, WifiKey::Keep);
        // 8 and 63 characters are the bounds; 32 bytes of SSID is the maximum.
        for len in [8, 63] {
            let text = with_system(&format!(
                "wifi_ssid = \"{}\"\nwifi_password = \"{}\"",
                "s".repeat(32),
                "p".repeat(len)
            ));
            plan(&text).expect("in bounds");
        }
        let e = err(&with_system(
            "wifi_ssid = \"x\"\nwifi_password = \"1234567\"",
        ));
        assert!(e.contains("7"), "{e}");
    }

    #[test]
    fn secrets_never_appear_in_errors() {
        let secret = "hunter2-very-secret";
        let texts = [
            // A syntax error on the password's own line.
            format!("id = \"p1\"\n[broker]\npassword = \"{secret}\n"),
            // Wrong types.
            "id = \"p1\"\n[broker]\npassword = 12345\n[serial]\nport = \"/x\"\n".to_owned(),
            // A Wi-Fi password that is too long, and one with a bad character.
            with_system(&format!("wifi_ssid = \"x\"\nwifi_password = \"{}\"", secret.repeat(5))),
            with_system(&format!("wifi_ssid = \"x\"\nwifi_password = \"{secret}\u{e9}\"")),
            // Another error in a file that holds both passwords.
            format!("id = \"p1\"\n[broker]\nurl = \"bad\"\npassword = \"{secret}\"\n[serial]\nport = \"/x\"\n[system]\nwifi_ssid = \"x\"\nwifi_password = \"{secret}\"\n"),
            format!("id = \"p1\"\n[broker]\nurl = \"mqtt://{secret}:1\"\npassword = \"{secret}\"\n[serial]\nport = \"/x\"\nbaud = \"z\"\n"),
        ];
        for text in &texts {
            let e = plan(text).expect_err("refused");
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains(secret), "secret in {shown}");
            assert!(!shown.contains("12345"), "secret in {shown}");
        }
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let e = plan("id = \"p1\"\n[broker\nurl = 1\n").expect_err("syntax");
        match e {
            FirstBootError::Syntax { line, .. } => assert_eq!(line, 2),
            other => panic!("not a syntax error: {other}"),
        }
    }

    #[test]
    fn apply_writes_everything() {
        let dir = root();
        let r = dir.path();
        let p = plan(FULL).expect("valid");
        let written = apply(&p, r).expect("applied");
        let config = r.join(GATEWAY_CONFIG);
        assert!(written.contains(&config));
        assert_eq!(mode(&config), 0o640);
        let text = fs::read_to_string(&config).expect("config");
        let back = FileConfig::parse(&text).expect("the gateway accepts it");
        assert_eq!(back.id.as_deref(), Some("p1"));
        assert_eq!(back.broker.password.as_deref(), Some("mqtt-secret-42"));
        assert_eq!(back.serial.baud, Some(115_200));
        assert_eq!(back.data_dir.as_deref(), Some(Path::new(DEFAULT_DATA_DIR)));
        assert_eq!(back.tags, vec!["pla".to_owned()]);
        assert!(r.join("var/lib/printloop/gateway").is_dir());

        assert_eq!(
            fs::read_to_string(r.join("etc/hostname")).expect("hostname"),
            "printer-p1\n"
        );
        let hosts = fs::read_to_string(r.join("etc/hosts")).expect("hosts");
        assert_eq!(hosts.matches("127.0.1.1").count(), 1, "{hosts}");
        assert!(hosts.contains("127.0.1.1\tprinter-p1\n"), "{hosts}");
        assert!(hosts.contains("127.0.0.1\tlocalhost"), "{hosts}");

        assert_eq!(
            fs::read_link(r.join("etc/localtime")).expect("symlink"),
            Path::new("/usr/share/zoneinfo/Europe/Berlin")
        );
        assert_eq!(
            fs::read_to_string(r.join("etc/timezone")).expect("tz"),
            "Europe/Berlin\n"
        );

        let wpa_path = r.join(WPA_CONFIG);
        assert_eq!(mode(&wpa_path), 0o600);
        let wpa = fs::read_to_string(&wpa_path).expect("wpa");
        assert!(wpa.contains("country=DE\n"), "{wpa}");
        assert!(
            wpa.contains(&format!("ssid={}\n", hex(b"farm net"))),
            "{wpa}"
        );
        assert!(wpa.contains("psk=\"wifi-secret-42\"\n"), "{wpa}");

        let keys = r.join(AUTHORIZED_KEYS);
        assert_eq!(mode(&keys), 0o600);
        assert_eq!(mode(&r.join("root/.ssh")), 0o700);
        assert!(fs::read_to_string(&keys)
            .expect("keys")
            .starts_with("ssh-ed25519 AAAA"));
        assert!(r.join(SSH_MARKER).is_file());
        for w in &written {
            assert!(w.starts_with(r), "{} is outside the root", w.display());
        }
        // No temporary file is left behind.
        for d in ["etc", "etc/printloop", "etc/wpa_supplicant", "root/.ssh"] {
            for entry in fs::read_dir(r.join(d)).expect("dir") {
                let name = entry.expect("entry").file_name();
                assert!(
                    !name.to_string_lossy().ends_with(".firstboot"),
                    "{name:?} left in {d}"
                );
            }
        }
    }

    #[test]
    fn apply_refuses_an_unknown_timezone_and_keeps_unset_things() {
        let dir = root();
        let r = dir.path();
        let p = plan(&with_system("timezone = \"Mars/Olympus_Mons\"")).expect("plan");
        let e = apply(&p, r).expect_err("unknown zone").to_string();
        assert!(e.contains("system.timezone"), "{e}");
        let p = plan(MINIMAL).expect("plan");
        let written = apply(&p, r).expect("applied");
        assert!(!r.join("etc/localtime").exists());
        assert!(!r.join(WPA_CONFIG).exists());
        assert!(!r.join(SSH_MARKER).exists());
        assert!(!written.iter().any(|w| w.ends_with("authorized_keys")));
    }

    #[test]
    fn a_password_left_out_is_carried_over_for_the_same_broker_only() {
        let dir = root();
        let r = dir.path();
        apply(&plan(FULL).expect("plan"), r).expect("first");
        // The .applied file, renamed back and re-applied: same broker and user.
        let again = redacted(FULL);
        apply(&plan(&again).expect("plan"), r).expect("second");
        let back = FileConfig::load(&r.join(GATEWAY_CONFIG)).expect("config");
        assert_eq!(back.broker.password.as_deref(), Some("mqtt-secret-42"));
        let wpa = fs::read_to_string(r.join(WPA_CONFIG)).expect("wpa");
        assert!(wpa.contains("psk=\"wifi-secret-42\""), "{wpa}");
        // Another broker: the old password does not follow.
        let moved = again.replace("mqtt://10.0.2.2:1883", "mqtt://elsewhere:1883");
        apply(&plan(&moved).expect("plan"), r).expect("third");
        let back = FileConfig::load(&r.join(GATEWAY_CONFIG)).expect("config");
        assert_eq!(back.broker.password, None);
        // Another network: an open one unless a password is given.
        let other = moved.replace("farm net", "other net");
        apply(&plan(&other).expect("plan"), r).expect("fourth");
        let wpa = fs::read_to_string(r.join(WPA_CONFIG)).expect("wpa");
        assert!(
            wpa.contains("key_mgmt=NONE") && !wpa.contains("secret"),
            "{wpa}"
        );
    }

    #[test]
    fn redaction_keeps_comments_and_drops_secrets() {
        let out = redacted(FULL);
        assert!(!out.contains("secret-42"), "{out}");
        assert!(out.contains("# the operator's comment"), "{out}");
        assert!(out.contains("# password = "), "{out}");
        assert!(out.contains("# wifi_password = "), "{out}");
        plan(&out).expect("still a valid boot file");
        // Inline tables and multi-line strings fall back to a re-serialised file.
        let inline = "id = \"p1\"\nbroker = { url = \"mqtt://h:1\", password = \"inline-secret\" }\n[serial]\nport = \"/x\"\n";
        let out = redacted(inline);
        assert!(!out.contains("inline-secret"), "{out}");
        assert!(plan(&out).is_ok(), "{out}");
        let multi = "id = \"p1\"\n[broker]\nurl = \"mqtt://h:1\"\npassword = \"\"\"\nmulti-secret\n\"\"\"\n[serial]\nport = \"/x\"\n";
        let out = redacted(multi);
        assert!(!out.contains("multi-secret"), "{out}");
        assert!(plan(&out).is_ok(), "{out}");
    }

    #[test]
    fn run_renames_the_file_and_reports_errors_beside_it() {
        let dir = root();
        let r = dir.path();
        let boot = tempfile::tempdir().expect("boot");
        let file = boot.path().join(BOOT_FILE_NAME);
        let error_file = boot.path().join(ERROR_FILE_NAME);

        fs::write(&file, "id = \"p1\"\n[serial]\nport = \"/x\"\n").expect("write");
        let e = run(&file, r).expect_err("no broker url");
        assert!(e.to_string().contains("broker.url"));
        assert!(file.exists(), "the file stays for the operator to fix");
        let report = fs::read_to_string(&error_file).expect("error file");
        assert!(report.contains("broker.url"), "{report}");
        assert!(!r.join(GATEWAY_CONFIG).exists());

        fs::write(&file, FULL).expect("write");
        let outcome = run(&file, r).expect("applied");
        assert!(!file.exists());
        assert!(!error_file.exists(), "a stale error file is removed");
        assert_eq!(outcome.applied, boot.path().join(APPLIED_FILE_NAME));
        assert_eq!(outcome.hostname, "printer-p1");
        let applied = fs::read_to_string(&outcome.applied).expect("applied");
        assert!(!applied.contains("secret-42"), "{applied}");
        assert!(r.join(GATEWAY_CONFIG).is_file());
    }

    #[test]
    fn the_image_template_needs_only_an_id() {
        let template = include_str!("../../packaging/image/printloop-gateway.toml");
        let e = plan(template).expect_err("no id yet").to_string();
        assert!(e.contains("`id`") && e.contains("missing"), "{e}");
        let filled = template.replacen("id = \"\"", "id = \"p1\"", 1);
        let p = plan(&filled).expect("the template with an id is valid");
        assert_eq!(p.hostname, "printloop-p1");
        assert!(p.wifi.is_none() && p.ssh_authorized_keys.is_none());
        // As a Windows editor may save it: a byte-order mark and CRLF line ends.
        let windows = format!("\u{feff}{}", filled.replace('\n', "\r\n"));
        assert_eq!(plan(&windows).expect("BOM and CRLF").printer_id, "p1");
        assert!(!redacted(&windows).starts_with('\u{feff}'));
    }

    #[test]
    fn hosts_and_hostnames() {
        assert_eq!(default_hostname("p_1"), "printloop-p-1");
        assert_eq!(default_hostname(&"x".repeat(80)).len(), 63);
        let h = hosts_with(
            "127.0.0.1 localhost\n127.0.1.1 a\n127.0.1.1 b\n",
            "farm.example",
        );
        assert_eq!(h, "127.0.0.1 localhost\n127.0.1.1\tfarm.example farm\n");
        assert_eq!(hosts_with("", "p"), "127.0.1.1\tp\n");
        assert!(check_hostname("Printer-1.farm.example").is_ok());
    }

    #[test]
    fn ssh_keys_are_normalised() {
        let k = "\n# mine\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA me\n  ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB you  \n";
        assert_eq!(
            check_ssh_keys(k).expect("keys"),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA me\nssh-rsa AAAAB3NzaC1yc2EAAAADAQAB you\n"
        );
        assert!(
            check_ssh_keys("from=\"10.0.0.0/8\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA me").is_ok()
        );
        assert!(check_ssh_keys("ssh-ed25519").is_err());
    }
}
