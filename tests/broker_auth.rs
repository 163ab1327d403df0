//! The embedded broker on a listener beyond loopback: anonymous clients are refused, the client
//! registry's logins are checked (password and the gateway client-id rule), and a loopback
//! listener stays open as before (the demo's and the README's set-up).
//!
//! The broker listens on 10.77.0.1 inside a network namespace this test makes (`unshare
//! --net`, as root): a real non-loopback address, and no traffic ever leaves the namespace.
use std::path::Path;
use std::process::Command;

fn run_in_new_netns(script: &str) -> String {
    let out = Command::new("unshare")
        .args(["--net", "bash", "-c", script])
        .output()
        .expect("unshare runs (util-linux; the test needs root, as CI has)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the namespace script failed:\n{text}");
    text
}

#[test]
fn beyond_loopback_the_embedded_broker_refuses_anonymous_clients_and_checks_the_registry() {
    let printloop = env!("CARGO_BIN_EXE_printloop");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("sup");
    let enrol = Command::new(printloop)
        .args([
            "printers",
            "add",
            "p1",
            "--broker-url",
            "mqtt://10.77.0.1:1883",
        ])
        .arg("--data-dir")
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("p1.toml"))
        .output()
        .expect("printers add");
    assert!(enrol.status.success(), "{enrol:?}");
    let p1: toml::Table =
        toml::from_str(&std::fs::read_to_string(dir.path().join("p1.toml")).expect("p1.toml"))
            .expect("toml");
    let p1_password = p1["broker"]["password"]
        .as_str()
        .expect("password")
        .to_owned();
    let ha = Command::new(printloop)
        .args(["clients", "add", "ha", "--role", "homeassistant"])
        .arg("--data-dir")
        .arg(&data)
        .output()
        .expect("clients add");
    assert!(ha.status.success(), "{ha:?}");
    let ha_password = String::from_utf8_lossy(&ha.stdout).trim().to_owned();

    let shipped = std::fs::read_to_string(testkit::shipped_broker_toml()).expect("broker.toml");
    assert!(shipped.contains("listen = \"127.0.0.1:1883\""));
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        shipped.replace("listen = \"127.0.0.1:1883\"", "listen = \"10.77.0.1:1883\""),
    )
    .expect("write broker.toml");
    let registry = data.join("clients.toml");
    let log = dir.path().join("broker.log");
    let pubs = |label: &str, args: &str| {
        format!(
            "if timeout 10 mosquitto_pub -q 1 -t printloop/v1/probe -m x {args}; then echo \"{label}=accepted\"; else echo \"{label}=refused\"; fi\n"
        )
    };
    let mut script = format!(
        "set -u\nip link set lo up\nip addr add 10.77.0.1/32 dev lo\n\
         {printloop} broker --config {config} --clients {registry} 2>{log} &\nbroker=$!\n\
         for i in $(seq 100); do grep -q 'broker ready' {log} && break; sleep 0.1; done\n",
        config = config.display(),
        registry = registry.display(),
        log = log.display(),
    );
    script += &pubs("anonymous", "-h 10.77.0.1 -p 1883 -i anon");
    script += &pubs(
        "wrong_password",
        "-h 10.77.0.1 -p 1883 -i hass -u ha -P nope",
    );
    script += &pubs(
        "ha",
        &format!("-h 10.77.0.1 -p 1883 -i hass -u ha -P {ha_password}"),
    );
    script += &pubs(
        "p1_as_p2",
        &format!("-h 10.77.0.1 -p 1883 -i printloop-gw-p2 -u p1 -P {p1_password}"),
    );
    script += &pubs(
        "p1",
        &format!("-h 10.77.0.1 -p 1883 -i printloop-gw-p1 -u p1 -P {p1_password}"),
    );
    script += &pubs(
        "loopback_anonymous",
        "-h 127.0.0.1 -p 1884 -V mqttv5 -i anon5",
    );
    script += "kill $broker\n";
    let out = run_in_new_netns(&script);
    let broker_log = std::fs::read_to_string(&log).unwrap_or_default();
    for (label, expect) in [
        ("anonymous", "refused"),
        ("wrong_password", "refused"),
        ("ha", "accepted"),
        ("p1_as_p2", "refused"),
        ("p1", "accepted"),
        ("loopback_anonymous", "accepted"),
    ] {
        assert!(
            out.contains(&format!("{label}={expect}")),
            "{label} should be {expect}:\n{out}\nbroker log:\n{broker_log}"
        );
    }
    assert!(
        broker_log.contains("every client must log in"),
        "{broker_log}"
    );
    assert!(!broker_log.contains(&p1_password) && !broker_log.contains(&ha_password));
}

#[test]
fn the_secured_config_puts_a_login_check_on_every_listener_beyond_loopback_only() {
    // The same policy without a network: the config the broker would run.
    let shipped = std::fs::read_to_string(testkit::shipped_broker_toml()).expect("broker.toml");
    let text = shipped.replace("listen = \"127.0.0.1:1883\"", "listen = \"0.0.0.0:1883\"");
    let config = broker::BrokerConfig::from_toml_str(&text, "test").expect("valid");
    let listeners = config.listeners();
    let open: Vec<_> = listeners.iter().filter(|l| l.requires_auth()).collect();
    assert_eq!(open.len(), 1, "{listeners:?}");
    assert_eq!(open[0].config_key(), "v4.1");
    assert!(Path::new(&testkit::shipped_broker_toml()).is_file());
}
