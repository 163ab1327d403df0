//! Reading and validating the boot file into a [`Plan`]: the gateway part exactly as
//! `printloop-gateway --config` accepts it, the `[system]` keys one by one. Touches nothing; an
//! error names its key (or line) and, scrubbed of the secrets found, never shows a secret value.

use serde::Deserialize;

use crate::config::FileConfig;

use super::secrets::{find_secrets, scrub_error, secret_key};
use super::{
    invalid, FirstBootError, Plan, Secret, SystemSection, Wifi, WifiKey, DEFAULT_DATA_DIR,
};

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
pub(super) fn check_hostname(h: &str) -> Result<(), String> {
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
pub(super) fn default_hostname(id: &str) -> String {
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
/// [`apply`](super::apply) against the root's zoneinfo.
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
pub(super) fn check_ssh_keys(text: &str) -> Result<String, String> {
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
