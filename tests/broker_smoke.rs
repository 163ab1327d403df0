//! The MQTT behaviour printloop relies on, checked on both brokers it must work with: the
//! embedded rumqttd (shipped `broker.toml`) and a real Mosquitto. Each test gets its own broker
//! on ports chosen at run time; every wait is bounded.
use std::process::Output;
use std::time::Duration;

use rumqttc::{LastWill, QoS};
use testkit::{
    find_program, mqtt_options, shipped_broker_toml, BrokerKind, BrokerProcess, TestBroker,
    TestClient,
};

/// Runs `body` against a fresh broker of each kind, as two tests.
macro_rules! on_both_brokers {
    ($($body:ident),* $(,)?) => {$(
        mod $body {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded_rumqttd() {
                super::$body(super::start(testkit::BrokerKind::Embedded)).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mosquitto() {
                super::$body(super::start(testkit::BrokerKind::Mosquitto)).await;
            }
        }
    )*};
}

on_both_brokers!(
    retained_message_reaches_a_later_subscriber,
    retained_will_is_published_when_a_client_dies_and_kept,
    persistent_session_redelivers_qos1_published_while_away,
    exact_and_wildcard_filters_route_whichever_came_first,
);

fn start(kind: BrokerKind) -> TestBroker {
    match TestBroker::start(kind) {
        Ok(broker) => broker,
        Err(e) => panic!("cannot start {kind:?} broker: {e}"),
    }
}

fn text(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

async fn retained_message_reaches_a_later_subscriber(broker: TestBroker) {
    let topic = "printloop/v1/printers/p1/meta";
    let mut publisher = TestClient::connect(broker.port(), "gw-p1")
        .await
        .expect("connect");
    publisher
        .publish(topic, QoS::AtLeastOnce, true, r#"{"model":"mk3"}"#)
        .await
        .expect("retained publish acknowledged");
    publisher.disconnect().await.expect("disconnect");

    let mut late = TestClient::connect(broker.port(), "late-sub")
        .await
        .expect("connect");
    late.subscribe("printloop/v1/printers/+/meta", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let got = late.expect_message("the retained meta").await;
    assert_eq!(got.topic, topic);
    assert_eq!(text(&got.payload), r#"{"model":"mk3"}"#);
    assert!(
        got.retain,
        "a retained message delivered at subscribe time has retain=1"
    );
}

async fn retained_will_is_published_when_a_client_dies_and_kept(broker: TestBroker) {
    let status = "printloop/v1/printers/p2/status";
    let mut observer = TestClient::connect(broker.port(), "observer")
        .await
        .expect("connect");
    observer
        .subscribe(status, QoS::AtLeastOnce)
        .await
        .expect("subscribe");

    let mut options = mqtt_options("gw-p2", broker.port());
    options
        .set_keep_alive(Duration::from_secs(1))
        .set_last_will(LastWill::new(
            status,
            "offline epoch=7",
            QoS::AtLeastOnce,
            true,
        ));
    let mut gateway = TestClient::connect_with(options)
        .await
        .expect("gateway connects");
    gateway
        .publish(status, QoS::AtLeastOnce, true, "online epoch=7")
        .await
        .expect("birth");
    let birth = observer.expect_message("the birth").await;
    assert_eq!(text(&birth.payload), "online epoch=7");

    // The gateway dies: its socket closes without DISCONNECT.
    gateway.kill().await;
    let will = observer
        .expect_message("the will after the gateway died")
        .await;
    assert_eq!(will.topic, status);
    assert_eq!(text(&will.payload), "offline epoch=7");

    let mut late = TestClient::connect(broker.port(), "late-sub")
        .await
        .expect("connect");
    late.subscribe(status, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let kept = late.expect_message("the retained will").await;
    assert_eq!(
        text(&kept.payload),
        "offline epoch=7",
        "the will replaced the birth"
    );
    assert!(kept.retain);
}

async fn persistent_session_redelivers_qos1_published_while_away(broker: TestBroker) {
    let events = "printloop/v1/printers/p3/events";
    let mut options = mqtt_options("supervisor-1", broker.port());
    options.set_clean_session(false);

    let mut supervisor = TestClient::connect_with(options.clone())
        .await
        .expect("connect");
    assert!(
        !supervisor.session_present(),
        "a fresh broker has no session"
    );
    supervisor
        .subscribe("printloop/v1/printers/+/events", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    supervisor.disconnect().await.expect("goes away");

    let mut gateway = TestClient::connect(broker.port(), "gw-p3")
        .await
        .expect("connect");
    for n in 1..=3 {
        gateway
            .publish(events, QoS::AtLeastOnce, false, format!("event {n}"))
            .await
            .expect("publish acknowledged");
    }

    let mut supervisor = TestClient::connect_with(options).await.expect("reconnect");
    assert!(supervisor.session_present(), "CONNACK session_present=1");
    for n in 1..=3 {
        let got = supervisor
            .expect_message("the events queued while away")
            .await;
        assert_eq!(got.topic, events);
        assert_eq!(text(&got.payload), format!("event {n}"));
    }
}

fn start_cli_broker() -> BrokerProcess {
    match BrokerProcess::start(env!("CARGO_BIN_EXE_printloop"), shipped_broker_toml()) {
        Ok(process) => process,
        Err(e) => panic!("`printloop broker` does not start: {e}"),
    }
}

async fn run(program: &std::path::Path, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(program);
    command.args(args).kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(10), command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("cannot run {}: {e}", program.display()),
        Err(_) => panic!("{} {args:?} did not finish within 10 s", program.display()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_broker_serves_retained_publish_and_subscribe() {
    let mut broker = start_cli_broker();
    let topic = "printloop/v1/printers/cli/status";

    let mut publisher = TestClient::connect(broker.v4_port(), "cli-pub")
        .await
        .expect("connect");
    publisher
        .publish(topic, QoS::AtLeastOnce, true, "online")
        .await
        .expect("publish");
    let mut subscriber = TestClient::connect(broker.v4_port(), "cli-sub")
        .await
        .expect("connect");
    subscriber
        .subscribe(topic, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let got = subscriber.expect_message("the retained status").await;
    assert_eq!(text(&got.payload), "online");
    assert!(got.retain);

    // What a user would type, if the Mosquitto clients are installed.
    if let (Some(pub_bin), Some(sub_bin)) =
        (find_program("mosquitto_pub"), find_program("mosquitto_sub"))
    {
        for (port, version) in [(broker.v4_port(), "mqttv311"), (broker.v5_port(), "mqttv5")] {
            let port = port.to_string();
            let topic = format!("printloop/v1/cli/{version}");
            let published = run(
                &pub_bin,
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-V",
                    version,
                    "-q",
                    "1",
                    "-r",
                    "-t",
                    &topic,
                    "-m",
                    "hello",
                ],
            )
            .await;
            assert!(published.status.success(), "mosquitto_pub: {published:?}");
            let received = run(
                &sub_bin,
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-V",
                    version,
                    "-t",
                    &topic,
                    "-C",
                    "1",
                    "-W",
                    "5",
                ],
            )
            .await;
            assert!(received.status.success(), "mosquitto_sub: {received:?}");
            assert_eq!(String::from_utf8_lossy(&received.stdout).trim(), "hello");
        }
    } else {
        eprintln!("mosquitto_pub/mosquitto_sub not installed: checked with rumqttc only");
    }

    assert!(broker.is_running());
    assert!(
        broker.log().contains("broker listening"),
        "{}",
        broker.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_broker_rejects_an_unknown_key_naming_file_and_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("bad.toml");
    let shipped = std::fs::read_to_string(shipped_broker_toml()).expect("broker.toml");
    let edited = shipped.replace(
        "max_connections = 1000",
        "max_connections = 1000\ncolour = \"blue\"",
    );
    assert_ne!(
        shipped, edited,
        "broker.toml still has max_connections = 1000"
    );
    std::fs::write(&bad, edited).expect("write");

    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_printloop"));
    let out = run(
        bin,
        &["broker", "--config", bad.to_str().expect("utf-8 path")],
    )
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}: unknown key `router.colour`", bad.display())),
        "{stderr}"
    );
}

/// Routing by filter, in every order a fleet makes: a topic first seen through a wildcard and
/// then subscribed exactly (a gateway's `cmd` after the supervisor's `+`), an exact filter
/// before its topic exists, retained messages for exact and wildcard filters. The embedded
/// broker finds exact filters by name instead of matching every filter (vendor/README.md); this
/// is the behaviour that index must keep.
async fn exact_and_wildcard_filters_route_whichever_came_first(broker: TestBroker) {
    let quiet = Duration::from_millis(300);
    let port = broker.port();
    let mut publisher = TestClient::connect(port, "publisher")
        .await
        .expect("connect");
    let mut wild = TestClient::connect(port, "wild").await.expect("connect");
    wild.subscribe("fleet/+/state", QoS::AtLeastOnce)
        .await
        .expect("subscribe");

    // The topic is routed (and remembered) through the wildcard first.
    publisher
        .publish("fleet/a/state", QoS::AtLeastOnce, true, "a1")
        .await
        .expect("publish");
    let got = wild.expect_message("a1 through the wildcard").await;
    assert_eq!(
        (got.topic.as_str(), text(&got.payload).as_str()),
        ("fleet/a/state", "a1")
    );

    // An exact subscriber arrives: the retained message, then every later one.
    let mut exact = TestClient::connect(port, "exact").await.expect("connect");
    exact
        .subscribe("fleet/a/state", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let got = exact.expect_message("the retained a1").await;
    assert_eq!(text(&got.payload), "a1");
    assert!(got.retain);
    publisher
        .publish("fleet/a/state", QoS::AtLeastOnce, false, "a2")
        .await
        .expect("publish");
    assert_eq!(text(&exact.expect_message("a2, exact").await.payload), "a2");
    assert_eq!(
        text(&wild.expect_message("a2, wildcard").await.payload),
        "a2"
    );

    // Another topic under the wildcard reaches only the wildcard.
    publisher
        .publish("fleet/b/state", QoS::AtLeastOnce, true, "b1")
        .await
        .expect("publish");
    assert_eq!(text(&wild.expect_message("b1").await.payload), "b1");
    exact
        .expect_no_message(quiet, "fleet/b/state is not fleet/a/state")
        .await;

    // An exact filter before its topic was ever published; a longer and a shorter topic do not
    // match it.
    exact
        .subscribe("fleet/c/cmd", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    exact
        .expect_no_message(quiet, "nothing retained on fleet/c/cmd")
        .await;
    for t in ["fleet/c/cmd/x", "fleet/c", "fleet/c/cmd"] {
        publisher
            .publish(t, QoS::AtLeastOnce, false, t)
            .await
            .expect("publish");
    }
    let got = exact.expect_message("fleet/c/cmd").await;
    assert_eq!(got.topic, "fleet/c/cmd");
    exact.expect_no_message(quiet, "only fleet/c/cmd").await;
    wild.expect_no_message(quiet, "no state topic among those")
        .await;

    // A late wildcard subscriber gets every retained state, not one.
    let mut late = TestClient::connect(port, "late").await.expect("connect");
    late.subscribe("fleet/+/state", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let mut retained: Vec<String> = late
        .collect_until_quiet(quiet, Duration::from_secs(5))
        .await
        .iter()
        .map(|p| text(&p.payload))
        .collect();
    retained.sort();
    assert_eq!(retained, ["a1", "b1"]);
}
