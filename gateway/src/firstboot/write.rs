//! Applying a [`Plan`] under a root directory (`/` on the Pi): the gateway's configuration, host
//! name, time zone, Wi-Fi and ssh. Each file is replaced atomically (written beside, synced,
//! renamed), and a secret left out is carried over from the file it replaces.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use super::{
    invalid, FirstBootError, Plan, Secret, Wifi, WifiKey, AUTHORIZED_KEYS, BOOT_FILE_NAME,
    GATEWAY_CONFIG, SERVICE_USER, SSH_MARKER, WPA_CONFIG,
};

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

pub(super) fn hex(bytes: &[u8]) -> String {
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
pub(super) fn hosts_with(hosts: &str, hostname: &str) -> String {
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
pub(super) fn write_file(
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

pub(super) fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}
