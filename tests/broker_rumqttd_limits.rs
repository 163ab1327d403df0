//! Measures the rumqttd 0.20 limitations listed in `docs/broker.md`. Each test asserts the
//! limitation's *current* behaviour, so a rumqttd upgrade that changes it fails here and the
//! docs (and printloop's workarounds) get revisited. Where it matters, the same steps run on
//! Mosquitto to show what a conforming broker does.
//!
//! Figures are printed with `MEASURED` (run with `--nocapture` to see them).
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use broker::rumqttd::TlsConfig;
use broker::{BrokerConfig, ListenerKind};
use rumqttc::{LastWill, Publish, QoS};
use testkit::{
    mqtt_options, shipped_broker_toml, BrokerProcess, EmbeddedBroker, Mosquitto, MosquittoOptions,
    TestClient, RECV_TIMEOUT,
};

const MARKER: &str = "~marker";

fn text(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

/// Publishes a non-retained marker on `marker_topic` (which the subscriber's filter matches)
/// and returns everything the subscriber received before it. Brokers send the retained
/// messages of a subscription before later publishes, so this is "the retained set" without
/// waiting for silence.
async fn received_before_marker(
    port: u16,
    subscriber: &mut TestClient,
    marker_topic: &str,
) -> Vec<Publish> {
    let mut marker = TestClient::connect(port, "marker")
        .await
        .expect("marker client");
    marker
        .publish(marker_topic, QoS::AtLeastOnce, false, MARKER)
        .await
        .expect("marker published");
    let mut got = Vec::new();
    loop {
        let p = subscriber.expect_message("the marker").await;
        if p.payload.as_ref() == MARKER.as_bytes() {
            return got;
        }
        got.push(p);
    }
}

fn start_mosquitto(options: MosquittoOptions) -> testkit::MosquittoGuard {
    match Mosquitto::start_with(options) {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    }
}

fn start_embedded() -> EmbeddedBroker {
    EmbeddedBroker::start().expect("embedded rumqttd starts")
}

// ---------------------------------------------------------------------------------------------
// No persistence: retained messages and sessions are lost when the broker restarts.

/// Retained status + a persistent session with one queued event, then a broker restart.
/// Returns (retained payloads after restart, session_present, events delivered after restart).
async fn survive_restart(port: u16, restart: impl FnOnce()) -> (Vec<String>, bool, Vec<String>) {
    let status = "printloop/v1/printers/p1/status";
    let events = "printloop/v1/printers/p1/events";
    let mut options = mqtt_options("supervisor-r", port);
    options.set_clean_session(false);
    let mut supervisor = TestClient::connect_with(options.clone())
        .await
        .expect("connect");
    supervisor
        .subscribe(events, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    supervisor.disconnect().await.expect("disconnect");

    let mut gateway = TestClient::connect(port, "gw-r").await.expect("connect");
    gateway
        .publish(status, QoS::AtLeastOnce, true, "online")
        .await
        .expect("retained");
    gateway
        .publish(events, QoS::AtLeastOnce, false, "job finished")
        .await
        .expect("queued for the supervisor");
    gateway.disconnect().await.expect("disconnect");

    restart();

    let mut supervisor = TestClient::connect_with(options).await.expect("reconnect");
    let session_present = supervisor.session_present();
    let mut queued = Vec::new();
    if session_present {
        queued.push(text(
            &supervisor.expect_message("the queued event").await.payload,
        ));
    }
    let mut late = TestClient::connect(port, "late").await.expect("connect");
    late.subscribe("printloop/v1/printers/+/status", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let retained = received_before_marker(port, &mut late, "printloop/v1/printers/marker/status")
        .await
        .iter()
        .map(|p| text(&p.payload))
        .collect();
    (retained, session_present, queued)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttd_loses_retained_messages_and_sessions_on_restart() {
    let mut broker = BrokerProcess::start(env!("CARGO_BIN_EXE_printloop"), shipped_broker_toml())
        .expect("printloop broker starts");
    let port = broker.v4_port();
    let (retained, session_present, queued) = survive_restart(port, || {
        broker.restart().expect("restart on the same ports")
    })
    .await;
    eprintln!(
        "MEASURED rumqttd after restart: retained={retained:?} session_present={session_present} queued={queued:?}"
    );
    assert!(
        retained.is_empty(),
        "rumqttd kept retained messages: {retained:?}"
    );
    assert!(!session_present, "rumqttd kept the persistent session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_with_persistence_keeps_them_across_restart() {
    let mut mosquitto = start_mosquitto(MosquittoOptions {
        persistence: true,
        ..Default::default()
    });
    let port = mosquitto.port();
    let (retained, session_present, queued) =
        survive_restart(port, || mosquitto.restart().expect("restart")).await;
    eprintln!(
        "MEASURED mosquitto (persistence true) after restart: retained={retained:?} session_present={session_present} queued={queued:?}"
    );
    assert_eq!(retained, ["online"]);
    assert!(session_present);
    assert_eq!(queued, ["job finished"]);
}

// ---------------------------------------------------------------------------------------------
// MQTT 5 session expiry is ignored: a session that should end at disconnect (expiry 0) is kept.

/// `port` serves MQTT 5, `v4_port` MQTT 3.1.1 (for the publisher).
async fn v5_session_present_after_expiry_zero(port: u16, v4_port: u16) -> (bool, Option<String>) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    async fn connect(
        port: u16,
    ) -> (
        AsyncClient,
        tokio::sync::mpsc::UnboundedReceiver<Packet>,
        tokio::task::JoinHandle<()>,
    ) {
        let mut options = MqttOptions::new("supervisor-v5", "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_start(false)
            // 0 = "the session ends when the network connection closes" (MQTT 5 §3.1.2.11.2).
            .set_session_expiry_interval(Some(0));
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if let Event::Incoming(packet) = event {
                    if tx.send(packet).is_err() {
                        return;
                    }
                }
            }
        });
        (client, rx, task)
    }
    async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Packet>, what: &str) -> Packet {
        match tokio::time::timeout(RECV_TIMEOUT, rx.recv()).await {
            Ok(Some(p)) => p,
            _ => panic!("no {what} within {RECV_TIMEOUT:?}"),
        }
    }

    let events = "printloop/v1/printers/p1/events";
    let (client, mut rx, task) = connect(port).await;
    assert!(matches!(next(&mut rx, "CONNACK").await, Packet::ConnAck(_)));
    client
        .subscribe(events, QoS5::AtLeastOnce)
        .await
        .expect("subscribe");
    assert!(matches!(next(&mut rx, "SUBACK").await, Packet::SubAck(_)));
    client.disconnect().await.expect("disconnect");
    while tokio::time::timeout(RECV_TIMEOUT, rx.recv())
        .await
        .ok()
        .flatten()
        .is_some()
    {}
    task.abort();

    let mut gateway = TestClient::connect(v4_port, "gw-v5")
        .await
        .expect("connect");
    gateway
        .publish(events, QoS::AtLeastOnce, false, "job finished")
        .await
        .expect("publish");

    let (_client, mut rx, task) = connect(port).await;
    let Packet::ConnAck(connack) = next(&mut rx, "CONNACK").await else {
        panic!("expected CONNACK")
    };
    let delivered = if connack.session_present {
        match next(&mut rx, "the queued event").await {
            Packet::Publish(p) => Some(text(&p.payload)),
            other => panic!("expected a publish, got {other:?}"),
        }
    } else {
        None
    };
    task.abort();
    (connack.session_present, delivered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttd_ignores_v5_session_expiry() {
    let broker = start_embedded();
    let (present, delivered) =
        v5_session_present_after_expiry_zero(broker.v5_port(), broker.v4_port()).await;
    eprintln!(
        "MEASURED rumqttd v5 expiry=0 reconnect: session_present={present} delivered={delivered:?}"
    );
    assert!(present, "rumqttd now honours session expiry 0");
    assert_eq!(delivered.as_deref(), Some("job finished"));

    let mosquitto = start_mosquitto(MosquittoOptions::default());
    let (present, delivered) =
        v5_session_present_after_expiry_zero(mosquitto.port(), mosquitto.port()).await;
    eprintln!("MEASURED mosquitto v5 expiry=0 reconnect: session_present={present} delivered={delivered:?}");
    assert!(
        !present,
        "Mosquitto ends a session with expiry 0 at disconnect"
    );
}

// ---------------------------------------------------------------------------------------------
// No per-topic ACL: any authenticated client may publish on any topic.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttd_has_no_per_topic_acl() {
    let mut config = BrokerConfig::load(shipped_broker_toml()).expect("broker.toml");
    let rumqttd = config.rumqttd_mut();
    for servers in [&mut rumqttd.v4, &mut rumqttd.v5] {
        for server in servers.iter_mut().flat_map(|s| s.values_mut()) {
            server.connections.auth = Some(HashMap::from([
                ("gw-a".to_owned(), "pw-a".to_owned()),
                ("gw-b".to_owned(), "pw-b".to_owned()),
                ("supervisor".to_owned(), "pw-s".to_owned()),
            ]));
        }
    }
    let broker = EmbeddedBroker::start_with(config).expect("rumqttd with auth");
    let port = broker.v4_port();

    let mut anonymous = mqtt_options("anonymous", port);
    anonymous.set_keep_alive(Duration::from_secs(5));
    let refused = TestClient::connect_with(anonymous).await;
    assert!(refused.is_err(), "credentials are enforced");

    let mut options = mqtt_options("supervisor", port);
    options.set_credentials("supervisor", "pw-s");
    let mut supervisor = TestClient::connect_with(options).await.expect("supervisor");
    supervisor
        .subscribe("printloop/v1/printers/+/status", QoS::AtLeastOnce)
        .await
        .expect("subscribe");

    let mut options = mqtt_options("gw-b", port);
    options.set_credentials("gw-b", "pw-b");
    let mut gateway_b = TestClient::connect_with(options).await.expect("gateway b");
    gateway_b
        .publish(
            "printloop/v1/printers/a/status",
            QoS::AtLeastOnce,
            true,
            "offline (forged by b)",
        )
        .await
        .expect("rumqttd accepts the forged publish");
    let got = supervisor.expect_message("the forged status").await;
    eprintln!(
        "MEASURED rumqttd: gateway b published on printers/a/status and the supervisor got {:?}",
        text(&got.payload)
    );
    assert_eq!(got.topic, "printloop/v1/printers/a/status");
    assert_eq!(text(&got.payload), "offline (forged by b)");
}

// ---------------------------------------------------------------------------------------------
// A QoS 1 wildcard subscription receives at most 100 retained messages; QoS 0 receives all
// (up to router.max_outgoing_packet_count).

async fn retained_counts(port: u16) -> (usize, usize) {
    let mut gateway = TestClient::connect(port, "gw-many").await.expect("connect");
    for n in 0..150 {
        gateway
            .publish(
                &format!("printloop/v1/printers/p{n:03}/state"),
                QoS::AtLeastOnce,
                true,
                format!("state {n}"),
            )
            .await
            .expect("retained publish");
    }
    let mut counts = [0; 2];
    for (i, qos) in [QoS::AtLeastOnce, QoS::AtMostOnce].into_iter().enumerate() {
        let mut sub = TestClient::connect(port, &format!("snapshot-{i}"))
            .await
            .expect("connect");
        sub.subscribe("printloop/v1/printers/+/state", qos)
            .await
            .expect("subscribe");
        let got =
            received_before_marker(port, &mut sub, "printloop/v1/printers/~marker/state").await;
        assert!(
            got.iter().all(|p| p.retain),
            "only retained messages before the marker"
        );
        counts[i] = got.len();
    }
    (counts[0], counts[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttd_qos1_wildcard_gets_at_most_100_retained() {
    let broker = start_embedded();
    let (qos1, qos0) = retained_counts(broker.v4_port()).await;
    eprintln!("MEASURED rumqttd: QoS1 wildcard got {qos1} of 150 retained, QoS0 wildcard got {qos0} of 150");
    assert_eq!(qos1, 100);
    assert_eq!(qos0, 150);

    let mosquitto = start_mosquitto(MosquittoOptions::default());
    let (qos1, qos0) = retained_counts(mosquitto.port()).await;
    eprintln!("MEASURED mosquitto: QoS1 wildcard got {qos1} of 150 retained, QoS0 wildcard got {qos0} of 150");
    assert_eq!((qos1, qos0), (150, 150));
}

// ---------------------------------------------------------------------------------------------
// An empty publish *without* retain clears the retained message (the spec says only a retained
// empty publish does).

async fn retained_after_empty_non_retained_publish(port: u16) -> Vec<String> {
    let topic = "printloop/v1/printers/p1/state";
    let mut gateway = TestClient::connect(port, "gw-empty")
        .await
        .expect("connect");
    gateway
        .publish(topic, QoS::AtLeastOnce, true, "printing 42%")
        .await
        .expect("retained");
    gateway
        .publish(topic, QoS::AtLeastOnce, false, Vec::new())
        .await
        .expect("empty, not retained");
    let mut late = TestClient::connect(port, "late").await.expect("connect");
    late.subscribe("printloop/v1/printers/+/state", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    received_before_marker(port, &mut late, "printloop/v1/printers/~marker/state")
        .await
        .iter()
        .map(|p| text(&p.payload))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttd_empty_non_retained_publish_clears_retained() {
    let broker = start_embedded();
    let retained = retained_after_empty_non_retained_publish(broker.v4_port()).await;
    eprintln!("MEASURED rumqttd: retained after an empty non-retained publish = {retained:?}");
    assert!(retained.is_empty());

    let mosquitto = start_mosquitto(MosquittoOptions::default());
    let retained = retained_after_empty_non_retained_publish(mosquitto.port()).await;
    eprintln!("MEASURED mosquitto: retained after an empty non-retained publish = {retained:?}");
    assert_eq!(retained, ["printing 42%"]);
}

// ---------------------------------------------------------------------------------------------
// A silent peer on a TLS listener blocks every later TLS connection: rumqttd runs the TLS
// handshake inside its accept loop.

fn self_signed_cert(dir: &Path) -> (String, String) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let program = testkit::find_program("openssl").unwrap_or_else(|| {
        panic!("`openssl` not found: install it with `apt-get install -y openssl`")
    });
    let status = std::process::Command::new(program)
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success(), "openssl req failed");
    (cert.display().to_string(), key.display().to_string())
}

/// Connects, sends bytes that are not a TLS ClientHello, and returns how long the server took
/// to answer (alert or close), or `None` if it did not within `within`.
fn garbage_answered_within(addr: SocketAddr, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).expect("tcp connect");
    stream.set_read_timeout(Some(within)).expect("timeout");
    stream.write_all(b"not a TLS hello\r\n\r\n").expect("write");
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(_) => Some(started.elapsed()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(_) => Some(started.elapsed()), // reset: answered too
    }
}

/// (answer time without a silent peer, answered while one is connected, answer time once it left)
fn tls_listener_with_silent_peer(
    addr: SocketAddr,
) -> (Option<Duration>, Option<Duration>, Option<Duration>) {
    let before = garbage_answered_within(addr, Duration::from_secs(5));
    let silent = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).expect("silent peer");
    let mut blocked =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).expect("second peer");
    blocked
        .write_all(b"not a TLS hello\r\n\r\n")
        .expect("write");
    let during = garbage_answered_within(addr, Duration::from_secs(2));
    drop(silent);
    blocked
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let after = match blocked.read(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        _ => Some(started.elapsed()),
    };
    (before, during, after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttd_silent_tls_peer_blocks_the_tls_listener() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (certpath, keypath) = self_signed_cert(dir.path());

    let mut config = BrokerConfig::load(shipped_broker_toml()).expect("broker.toml");
    let mut tls = config
        .rumqttd()
        .v4
        .as_ref()
        .and_then(|v4| v4.get("1"))
        .expect("v4.1")
        .clone();
    tls.name = "v4-tls".to_owned();
    tls.tls = Some(TlsConfig::Rustls {
        capath: None,
        certpath: certpath.clone(),
        keypath: keypath.clone(),
    });
    tls.listen = "127.0.0.1:8883".parse().expect("addr");
    config
        .rumqttd_mut()
        .v4
        .get_or_insert_with(HashMap::new)
        .insert("tls".to_owned(), tls);
    let broker = EmbeddedBroker::start_with(config).expect("rumqttd with a TLS listener");
    let tls_addr = broker
        .inner()
        .listeners()
        .iter()
        .find(|l| l.tls)
        .expect("tls listener")
        .addr;

    let (before, during, after) =
        tokio::task::spawn_blocking(move || tls_listener_with_silent_peer(tls_addr))
            .await
            .expect("join");
    eprintln!("MEASURED rumqttd TLS listener: answered in {before:?} alone; while a silent peer is connected: {during:?} (None = not within 2 s); after it left the queued peer was answered in {after:?}");
    assert!(before.is_some(), "the TLS listener answers a bad hello");
    assert!(
        during.is_none(),
        "rumqttd no longer blocks on a silent TLS peer"
    );
    assert!(
        after.is_some(),
        "the accept loop resumes once the silent peer leaves"
    );

    // The plain listener is not affected: its CONNECT wait is per connection.
    let plain = broker.inner().addr(ListenerKind::V4).expect("plain v4");
    let _silent = TcpStream::connect(plain).expect("silent peer on the plain listener");
    TestClient::connect(plain.port(), "plain-ok")
        .await
        .expect("the plain listener still accepts while a silent peer is connected");

    // Mosquitto's TLS listener with the same certificate.
    let tls_port = testkit::free_port();
    let mosquitto = start_mosquitto(MosquittoOptions {
        extra_lines: vec![
            format!("listener {tls_port} 127.0.0.1"),
            format!("certfile {certpath}"),
            format!("keyfile {keypath}"),
        ],
        ..Default::default()
    });
    let addr = SocketAddr::from(([127, 0, 0, 1], tls_port));
    let (before, during, after) =
        tokio::task::spawn_blocking(move || tls_listener_with_silent_peer(addr))
            .await
            .expect("join");
    eprintln!("MEASURED mosquitto TLS listener: alone {before:?}; with a silent peer {during:?}; queued peer {after:?}");
    assert!(during.is_some(), "Mosquitto keeps accepting TLS peers");
    drop(mosquitto);
}

// ---------------------------------------------------------------------------------------------
// A clean-session reconnect while the old connection is still open (half-open) loses the new
// connection's will: rumqttd fires the *new* will at takeover, then has none when the new
// connection dies.

/// A raw MQTT 3.1.1 CONNECT with a retained QoS 1 will, keep-alive 60 s.
fn connect_with_will(client_id: &str, clean: bool, topic: &str, will: &str) -> Vec<u8> {
    let mut body = b"\x00\x04MQTT\x04".to_vec();
    // (clean session), will, will QoS 1, will retain
    body.push(if clean { 0x02 } else { 0x00 } | 0x04 | 0x08 | 0x20);
    body.extend_from_slice(&60u16.to_be_bytes());
    for field in [client_id.as_bytes(), topic.as_bytes(), will.as_bytes()] {
        body.extend_from_slice(&u16::try_from(field.len()).expect("short").to_be_bytes());
        body.extend_from_slice(field);
    }
    let mut packet = vec![0x10, u8::try_from(body.len()).expect("short packet")];
    packet.extend_from_slice(&body);
    packet
}

/// Returns (what the observer saw up to the birth, what it saw within 3 s after the new
/// connection died, the retained status at the end).
async fn half_open_takeover(port: u16, clean: bool) -> (Vec<String>, Vec<String>, Vec<String>) {
    let status = "printloop/v1/printers/h1/status";
    let mut observer = TestClient::connect(port, "observer")
        .await
        .expect("connect");
    observer
        .subscribe(status, QoS::AtLeastOnce)
        .await
        .expect("subscribe");

    // The old connection: connected with will epoch=1, then silent with its socket open, as
    // when a Wi-Fi link drops without a FIN.
    let mut old = TcpStream::connect(("127.0.0.1", port)).expect("old connection");
    old.set_read_timeout(Some(RECV_TIMEOUT)).expect("timeout");
    old.write_all(&connect_with_will(
        "gw-h1",
        clean,
        status,
        "offline epoch=1",
    ))
    .expect("CONNECT");
    let mut connack = [0u8; 4];
    old.read_exact(&mut connack).expect("CONNACK");
    assert_eq!(connack[0], 0x20);

    // The gateway reconnects (clean session) with its next epoch before the broker noticed.
    let mut options = mqtt_options("gw-h1", port);
    options.set_clean_session(clean);
    options.set_last_will(LastWill::new(
        status,
        "offline epoch=2",
        QoS::AtLeastOnce,
        true,
    ));
    let mut gateway = TestClient::connect_with(options).await.expect("reconnect");
    gateway
        .publish(status, QoS::AtLeastOnce, true, "online epoch=2")
        .await
        .expect("birth");
    let mut until_birth = Vec::new();
    loop {
        let p = text(&observer.expect_message("the birth").await.payload);
        let done = p == "online epoch=2";
        until_birth.push(p);
        if done {
            break;
        }
    }

    gateway.kill().await;
    let after_death = observer
        .collect_until_quiet(Duration::from_secs(3), Duration::from_secs(5))
        .await
        .iter()
        .map(|p| text(&p.payload))
        .collect();

    let mut late = TestClient::connect(port, "late").await.expect("connect");
    late.subscribe("printloop/v1/printers/+/status", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let retained = received_before_marker(port, &mut late, "printloop/v1/printers/~marker/status")
        .await
        .iter()
        .map(|p| text(&p.payload))
        .collect();
    drop(old);
    (until_birth, after_death, retained)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttd_half_open_clean_reconnect_loses_the_new_will() {
    let broker = start_embedded();
    let (until_birth, after_death, retained) = half_open_takeover(broker.v4_port(), true).await;
    eprintln!("MEASURED rumqttd half-open takeover: before birth {until_birth:?}; after the new connection died {after_death:?}; retained {retained:?}");
    assert_eq!(
        until_birth,
        ["offline epoch=2", "online epoch=2"],
        "rumqttd publishes the NEW will at takeover"
    );
    assert!(
        after_death.is_empty(),
        "rumqttd now publishes a will when the new connection dies"
    );
    assert_eq!(
        retained,
        ["online epoch=2"],
        "a dead gateway stays 'online'"
    );

    let mosquitto = start_mosquitto(MosquittoOptions::default());
    let (until_birth, after_death, retained) = half_open_takeover(mosquitto.port(), true).await;
    eprintln!("MEASURED mosquitto half-open takeover: before birth {until_birth:?}; after the new connection died {after_death:?}; retained {retained:?}");
    assert_eq!(after_death, ["offline epoch=2"]);
    assert_eq!(retained, ["offline epoch=2"]);
}

/// The workaround: with a persistent session (clean_session=false) rumqttd cancels the old
/// will instead of firing, and the new will survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttd_half_open_persistent_reconnect_keeps_the_new_will() {
    let broker = start_embedded();
    let (until_birth, after_death, retained) = half_open_takeover(broker.v4_port(), false).await;
    eprintln!("MEASURED rumqttd half-open takeover, persistent session: before birth {until_birth:?}; after the new connection died {after_death:?}; retained {retained:?}");
    assert_eq!(until_birth, ["online epoch=2"]);
    assert_eq!(after_death, ["offline epoch=2"]);
    assert_eq!(retained, ["offline epoch=2"]);
}

// ---------------------------------------------------------------------------------------------
// No shutdown API: dropping the embedded broker's handle leaves it serving.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttd_has_no_shutdown_api() {
    let broker = start_embedded();
    let port = broker.v4_port();
    drop(broker);
    let client = TestClient::connect(port, "after-drop").await;
    eprintln!(
        "MEASURED rumqttd: MQTT connect after dropping the handle: {}",
        if client.is_ok() {
            "accepted"
        } else {
            "refused"
        }
    );
    assert!(
        client.is_ok(),
        "the broker stopped when its handle was dropped"
    );
}
