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
