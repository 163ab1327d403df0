//! The embedded broker started from the shipped `broker.toml` on free ports.
use std::path::Path;
use std::time::{Duration, Instant};

use broker::rumqttd::Notification;
use broker::{BrokerConfig, BrokerError, EmbeddedBroker, ListenerKind};

fn shipped() -> BrokerConfig {
    BrokerConfig::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("../broker.toml"))
        .expect("shipped broker.toml loads")
}

#[test]
fn shipped_config_starts_on_free_ports_and_a_second_broker_cannot_take_them() {
    let config = shipped().with_free_ports().expect("free ports");
    let broker = EmbeddedBroker::start(config.clone()).expect("broker starts");
    assert!(broker.is_running());
    let v4 = broker.addr(ListenerKind::V4).expect("v4 listener");
    let v5 = broker.addr(ListenerKind::V5).expect("v5 listener");
    assert!(v4.ip().is_loopback() && v5.ip().is_loopback());
    assert_ne!(v4.port(), 1883);

    match EmbeddedBroker::start(config) {
        Err(BrokerError::Bind { listener, addr, .. }) => {
            assert_eq!(listener, "v4.1");
            assert_eq!(addr, v4);
        }
        other => panic!("expected a bind error, got {other:?}"),
    }
    assert!(broker.is_running(), "the first broker is unaffected");
}

#[test]
fn local_links_are_created_before_start_and_exchange_messages() {
    let prepared = EmbeddedBroker::prepare(shipped().with_free_ports().expect("free ports"))
        .expect("prepared");
    let (mut sub_tx, mut sub_rx) = prepared.link("local-sub").expect("link");
    let (mut pub_tx, _pub_rx) = prepared.link("local-pub").expect("link");
    let _broker = prepared.start(Duration::from_secs(10)).expect("started");

    sub_tx.subscribe("printloop/test/#").expect("subscribe");
    pub_tx
        .publish("printloop/test/hello", b"hi".to_vec())
        .expect("publish");

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match sub_rx.recv_deadline(deadline) {
            Ok(Some(Notification::Forward(forward))) => {
                assert_eq!(&forward.publish.topic[..], b"printloop/test/hello");
                assert_eq!(&forward.publish.payload[..], b"hi");
                return;
            }
            Ok(_) => continue,
            Err(e) => panic!("no message on the local link within 5 s: {e}"),
        }
    }
}
