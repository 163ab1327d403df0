//! The secrets (the broker and Wi-Fi passwords): found in a boot file, turned into comments in
//! the `.applied` file that replaces it, and scrubbed from error messages, so none ever leaves.

use super::FirstBootError;

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
pub(super) fn secret_key(line: &str) -> Option<String> {
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
pub(super) fn find_secrets(text: &str) -> Vec<String> {
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

pub(super) fn scrub_error(e: FirstBootError, secrets: &[String]) -> FirstBootError {
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
