//! Tests of the first-boot step: planning and its errors (naming the key, never a secret),
//! applying under a temporary root, redaction, and the whole `run`.

use std::os::unix::fs::PermissionsExt as _;

use super::validate::{check_hostname, check_ssh_keys, default_hostname};
use super::write::{hex, hosts_with};
use super::*;
use crate::config::FileConfig;

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
    let template = include_str!("../../../packaging/image/printloop-gateway.toml");
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
