//! `docs/mosquitto.conf` and `docs/mosquitto.acl` on a real Mosquitto: the production example
//! runs (paths and ports swapped for temp ones), and the ACL confines a gateway to its own
//! printer's topics. The password file is made with `mosquitto_passwd -b`, as an operator would.
use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::QoS;
use testkit::{mosquitto_passwd, mqtt_options, Mosquitto, MosquittoGuard, TestClient};

fn docs(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs")
        .join(file)
}

fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    let openssl = testkit::find_program("openssl")
        .unwrap_or_else(|| panic!("`openssl` not found: apt-get install -y openssl"));
    let status = std::process::Command::new(openssl)
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success(), "openssl req failed");
    (cert, key)
}

struct Production {
    mosquitto: MosquittoGuard,
    tls_port: u16,
    _dir: tempfile::TempDir,
}

/// docs/mosquitto.conf with its paths and ports swapped for temp ones, users p1, p2 (gateways)
/// and supervisor.
fn start_production_example() -> Production {
    let dir = tempfile::tempdir().expect("temp dir");
    let passwd = dir.path().join("printloop.passwd");
    for (user, password) in [("p1", "pw-p1"), ("p2", "pw-p2"), ("supervisor", "pw-sup")] {
        mosquitto_passwd(&passwd, user, password).expect("mosquitto_passwd -b");
    }
    let (cert, key) = self_signed_cert(dir.path());
    let tls_port = testkit::free_port();
    let conf = std::fs::read_to_string(docs("mosquitto.conf")).expect("docs/mosquitto.conf");
    let mut swapped = conf.clone();
    for (from, to) in [
        ("/var/lib/mosquitto/", format!("{}/", dir.path().display())),
        (
            "/etc/mosquitto/printloop.passwd",
            passwd.display().to_string(),
        ),
        (
            "/etc/mosquitto/printloop.acl",
            docs("mosquitto.acl").display().to_string(),
        ),
        (
            "/etc/mosquitto/certs/server.crt",
            cert.display().to_string(),
        ),
        ("/etc/mosquitto/certs/server.key", key.display().to_string()),
        (
            "listener 1883 127.0.0.1",
            "listener {port} 127.0.0.1".to_owned(),
        ),
        ("listener 8883", format!("listener {tls_port} 127.0.0.1")),
        ("log_dest syslog", "log_dest stderr".to_owned()),
    ] {
        assert!(
            swapped.contains(from),
            "docs/mosquitto.conf no longer has `{from}`"
        );
        swapped = swapped.replace(from, &to);
    }
    let mosquitto = Mosquitto::start_with_template(&swapped)
        .unwrap_or_else(|e| panic!("docs/mosquitto.conf does not run: {e}"));
    Production {
        mosquitto,
        tls_port,
        _dir: dir,
    }
}

async fn login(port: u16, user: &str, password: &str) -> TestClient {
    login_as(port, user, user, password).await
}

async fn login_as(port: u16, client_id: &str, user: &str, password: &str) -> TestClient {
    let mut options = mqtt_options(client_id, port);
    options.set_credentials(user, password);
    TestClient::connect_with(options)
        .await
        .unwrap_or_else(|e| panic!("{user} cannot log in: {e}"))
}

fn text(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_can_write_only_under_its_own_printer_id() {
    let production = start_production_example();
    let port = production.mosquitto.port();

    let refused = TestClient::connect(port, "anonymous").await;
    assert!(refused.is_err(), "anonymous clients are refused");

    let mut supervisor = login(port, "supervisor", "pw-sup").await;
    supervisor
        .subscribe("printloop/v1/printers/+/state", QoS::AtLeastOnce)
        .await
        .expect("the supervisor reads every printer");

    // p2 forges p1's state, then writes its own. Same connection, so if the forgery got through
    // it would arrive first.
    let mut p2 = login(port, "p2", "pw-p2").await;
    p2.publish(
        "printloop/v1/printers/p1/state",
        QoS::AtLeastOnce,
        true,
        "forged by p2",
    )
    .await
    .expect("Mosquitto acknowledges (and drops) a denied publish");
    p2.publish(
        "printloop/v1/printers/p2/state",
        QoS::AtLeastOnce,
        true,
        "p2 idle",
    )
    .await
    .expect("own state");
    let first = supervisor.expect_message("p2's own state").await;
    assert_eq!(
        (first.topic.as_str(), text(&first.payload).as_str()),
        ("printloop/v1/printers/p2/state", "p2 idle"),
        "the forged publish under p1 must not reach the supervisor"
    );

    let mut p1 = login(port, "p1", "pw-p1").await;
    p1.publish(
        "printloop/v1/printers/p1/state",
        QoS::AtLeastOnce,
        true,
        "p1 printing",
    )
    .await
    .expect("own state");
    let got = supervisor.expect_message("p1's own state").await;
    assert_eq!(text(&got.payload), "p1 printing");

    // Nor was the forgery retained.
    let mut late = login_as(port, "supervisor-late", "supervisor", "pw-sup").await;
    late.subscribe("printloop/v1/printers/+/state", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    // Retained messages come before later publishes: collect up to a marker.
    supervisor
        .publish(
            "printloop/v1/printers/~marker/state",
            QoS::AtLeastOnce,
            false,
            "~marker",
        )
        .await
        .expect("marker");
    let mut retained = Vec::new();
    loop {
        let p = text(&late.expect_message("the marker").await.payload);
        if p == "~marker" {
            break;
        }
        retained.push(p);
    }
    retained.sort();
    assert_eq!(retained, ["p1 printing", "p2 idle"]);

    // A gateway reads only its own commands.
    let p1_cmd_refused = p2
        .subscribe("printloop/v1/printers/p1/cmd", QoS::AtLeastOnce)
        .await
        .is_err();
    p2.subscribe("printloop/v1/printers/p2/cmd", QoS::AtLeastOnce)
        .await
        .expect("own commands");
    supervisor
        .publish(
            "printloop/v1/printers/p1/cmd",
            QoS::AtLeastOnce,
            false,
            "cmd for p1",
        )
        .await
        .expect("publish");
    supervisor
        .publish(
            "printloop/v1/printers/p2/cmd",
            QoS::AtLeastOnce,
            false,
            "cmd for p2",
        )
        .await
        .expect("publish");
    let got = p2.expect_message("p2's command").await;
    eprintln!(
        "MEASURED mosquitto ACL: p2 subscribing to p1/cmd refused in SUBACK: {p1_cmd_refused}"
    );
    assert_eq!(
        text(&got.payload),
        "cmd for p2",
        "p2 must not receive p1's command"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_listener_of_the_production_example_serves_a_tls_handshake() {
    let production = start_production_example();
    let openssl = testkit::find_program("openssl").expect("openssl");
    let mut command = tokio::process::Command::new(openssl);
    command
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", production.tls_port),
        ])
        .args(["-servername", "localhost", "-brief"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(10), command.output())
        .await
        .expect("openssl s_client finishes within 10 s")
        .expect("openssl runs");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        all.contains("Protocol version: TLSv1."),
        "no TLS handshake:\n{all}"
    );
}

// ----- the files `printloop clients mosquitto` writes from the registry -----

fn secure_farm() -> testkit::SecureFarm {
    testkit::SecureFarm::start(
        Path::new(env!("CARGO_BIN_EXE_printloop")),
        &testkit::SecureFarmSpec {
            printers: vec!["p1".into(), "p2".into()],
            clients: vec![
                ("sup".into(), "supervisor".into()),
                ("ha".into(), "homeassistant".into()),
            ],
        },
    )
    .unwrap_or_else(|e| panic!("the secured farm does not start: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generated_password_file_and_acl_confine_every_role() {
    let farm = secure_farm();
    let port = farm.mosquitto.port();
    assert!(
        TestClient::connect(port, "anonymous").await.is_err(),
        "anonymous clients are refused"
    );
    let mut bad = mqtt_options("intruder", port);
    bad.set_credentials("p1", "not-the-password");
    assert!(
        TestClient::connect_with(bad).await.is_err(),
        "a wrong password is refused"
    );

    let mut sup = login_as(port, "printloop-supervisor", "sup", farm.password("sup")).await;
    for filter in [
        "printloop/v1/printers/+/state",
        "printloop/v1/ha/printers/+/press",
    ] {
        sup.subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("the supervisor reads");
    }

    // Gateway p1 forges p2's state, then writes its own: only its own arrives.
    let mut p1 = login_as(port, "printloop-gw-p1", "p1", farm.password("p1")).await;
    p1.publish(
        "printloop/v1/printers/p2/state",
        QoS::AtLeastOnce,
        true,
        "forged by p1",
    )
    .await
    .expect("Mosquitto acknowledges (and drops) a denied publish");
    p1.publish(
        "printloop/v1/printers/p1/state",
        QoS::AtLeastOnce,
        true,
        "p1 idle",
    )
    .await
    .expect("own state");
    let got = sup.expect_message("p1's own state").await;
    assert_eq!(
        (got.topic.as_str(), text(&got.payload).as_str()),
        ("printloop/v1/printers/p1/state", "p1 idle"),
        "p1's forgery of p2's state must not reach the supervisor"
    );

    // p1 cannot read p2's commands, and cannot write its own.
    let p2_cmd_refused = p1
        .subscribe("printloop/v1/printers/p2/cmd", QoS::AtLeastOnce)
        .await
        .is_err();
    p1.subscribe("printloop/v1/printers/p1/cmd", QoS::AtLeastOnce)
        .await
        .expect("own commands");
    p1.publish(
        "printloop/v1/printers/p1/cmd",
        QoS::AtLeastOnce,
        false,
        "self-command by p1",
    )
    .await
    .expect("acknowledged, dropped");
    sup.publish(
        "printloop/v1/printers/p2/cmd",
        QoS::AtLeastOnce,
        false,
        "cmd for p2",
    )
    .await
    .expect("publish");
    sup.publish(
        "printloop/v1/printers/p1/cmd",
        QoS::AtLeastOnce,
        false,
        "cmd for p1",
    )
    .await
    .expect("publish");
    let got = p1.expect_message("p1's command").await;
    assert_eq!(
        text(&got.payload),
        "cmd for p1",
        "p1 must neither read p2's commands nor command itself"
    );
    eprintln!(
        "MEASURED generated ACL: p1 subscribing to p2/cmd refused in SUBACK: {p2_cmd_refused}"
    );

    // Home Assistant presses a button but cannot write any printer's state.
    let mut ha = login_as(port, "homeassistant-1", "ha", farm.password("ha")).await;
    ha.publish(
        "printloop/v1/printers/p1/state",
        QoS::AtLeastOnce,
        true,
        "forged by ha",
    )
    .await
    .expect("acknowledged, dropped");
    ha.publish(
        "printloop/v1/ha/printers/p1/press",
        QoS::AtLeastOnce,
        false,
        "pause",
    )
    .await
    .expect("press");
    let got = sup.expect_message("Home Assistant's press").await;
    assert_eq!(
        (got.topic.as_str(), text(&got.payload).as_str()),
        ("printloop/v1/ha/printers/p1/press", "pause"),
        "Home Assistant's forged state must not reach the supervisor"
    );

    // A gateway's credential with another printer's client id is refused? Mosquitto cannot bind
    // client ids to users (printloop's embedded broker does): the ACL still confines it, so a
    // p1 login under p2's client id gets nothing of p2's.
    let mut p1_as_p2 = login_as(port, "printloop-gw-p2", "p1", farm.password("p1")).await;
    let _ = p1_as_p2
        .subscribe("printloop/v1/printers/p2/cmd", QoS::AtLeastOnce)
        .await;
    sup.publish(
        "printloop/v1/printers/p2/cmd",
        QoS::AtLeastOnce,
        false,
        "cmd for p2",
    )
    .await
    .expect("publish");
    p1_as_p2
        .expect_no_message(
            Duration::from_secs(1),
            "p1's login must not read p2's commands",
        )
        .await;
}

/// A gateway with a wrong password: one clear error that names the fix, then a capped back-off —
/// at most 3 attempts in the first 40 s (the broker's own log counts them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_one_clear_error_and_at_most_three_attempts_in_40_s() {
    let farm = secure_farm();
    let data = tempfile::tempdir().expect("tempdir");
    let log = data.path().join("gw.log");
    let mut gw = std::process::Command::new(testkit::gateway_binary())
        .arg("--config")
        .arg(&farm.gateway_configs["p1"])
        .arg("--ca-file")
        .arg(&farm.ca)
        .arg("--serial")
        .arg(data.path().join("no-such-port"))
        .arg("--data-dir")
        .arg(data.path().join("state"))
        .env("PRINTLOOP_MQTT_PASSWORD", "a-wrong-password")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("gateway starts");
    tokio::time::sleep(Duration::from_secs(40)).await;
    let _ = gw.kill();
    let _ = gw.wait();
    let broker_log = farm.mosquitto.log();
    let attempts = broker_log
        .lines()
        // Mosquitto logs a refused login as "Client <unknown> disconnected, not authorised."; the
        // gateway is the only client of this broker.
        .filter(|l| l.contains("not authorised"))
        .count();
    let gw_log = std::fs::read_to_string(&log).expect("gateway log");
    let errors: Vec<&str> = gw_log.lines().filter(|l| l.contains("ERROR")).collect();
    eprintln!("MEASURED wrong password: {attempts} attempts in 40 s; gateway errors: {errors:#?}");
    assert!(
        (1..=3).contains(&attempts),
        "{attempts} attempts in 40 s\nbroker log:\n{broker_log}\ngateway log:\n{gw_log}"
    );
    assert_eq!(errors.len(), 1, "one clear error:\n{gw_log}");
    assert!(
        errors[0].contains("PRINTLOOP_MQTT_PASSWORD") && errors[0].contains("refused"),
        "the error names the fix: {}",
        errors[0]
    );
}
