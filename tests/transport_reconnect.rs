//! How the shared MQTT connection task tells a refused login from a network that is only down,
//! when both look the same on the wire: a TCP connection that ends before any CONNACK.
//! printloop's embedded broker answers a bad login that way, and so does a proxy whose broker is
//! restarting or a link being cut. The first must slow to a few attempts a minute; the second
//! must be reached again within a second or two of coming back.
use std::time::{Duration, Instant};

use rumqttc::{LastWill, QoS};
use tokio::net::{TcpListener, TcpStream};
use transport::{BrokerAddr, MqttEvent, Session};

/// A loopback "door" in front of `upstream`: for `closed_for` it accepts each connection and
/// closes it at once (what a proxy does while its broker is down); after that it forwards.
async fn door(upstream: u16, closed_for: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let opens = Instant::now() + closed_for;
    tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            if Instant::now() < opens {
                drop(down);
                continue;
            }
            tokio::spawn(async move {
                if let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)).await {
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
            });
        }
    });
    port
}

fn session(id: &str) -> Session {
    Session {
        client_id: id.into(),
        clean_session: true,
        ..Session::default()
    }
}

fn will() -> LastWill {
    LastWill::new("printloop/v1/test/will", "gone", QoS::AtLeastOnce, false)
}

/// What the connection task reported until it connected, was first taken for refused, or
/// until `limit`.
struct Outcome {
    connected_after: Option<Duration>,
    refused_after: Option<Duration>,
    downs: u32,
    refused: u32,
    /// Downs that asked for the next connection's will.
    wills_asked: u32,
}

async fn watch(port: u16, id: &str, limit: Duration) -> Outcome {
    watch_with(port, id, limit, Some(will())).await
}

async fn watch_with(port: u16, id: &str, limit: Duration, last_will: Option<LastWill>) -> Outcome {
    let addr = BrokerAddr::parse(&format!("mqtt://127.0.0.1:{port}")).expect("address");
    let with_will = last_will.is_some();
    let (_client, mut events, task) =
        transport::connect(&addr, &session(id), last_will).expect("connect");
    let start = Instant::now();
    let mut out = Outcome {
        connected_after: None,
        refused_after: None,
        downs: 0,
        refused: 0,
        wills_asked: 0,
    };
    while let Ok(Some(ev)) = tokio::time::timeout_at((start + limit).into(), events.recv()).await {
        match ev {
            MqttEvent::Connected { .. } => {
                out.connected_after = Some(start.elapsed());
                break;
            }
            MqttEvent::Down {
                refused, next_will, ..
            } => {
                out.downs += 1;
                out.refused += u32::from(refused);
                if refused {
                    out.refused_after = Some(start.elapsed());
                    break;
                }
                if let Some(next) = next_will {
                    out.wills_asked += 1;
                    if with_will {
                        let _ = next.send(will());
                    }
                }
            }
            _ => {}
        }
    }
    task.abort();
    out
}

#[tokio::test]
async fn a_broker_behind_a_proxy_that_comes_back_is_reached_within_seconds() {
    let broker = testkit::EmbeddedBroker::start().expect("broker");
    let port = door(broker.v4_port(), Duration::from_millis(2_500)).await;
    let out = watch(port, "reconnect-proxy", Duration::from_secs(10)).await;
    let after = out
        .connected_after
        .unwrap_or_else(|| panic!("not connected within 10 s ({} closes)", out.downs));
    assert!(out.downs >= 2, "the door closed {} connections", out.downs);
    assert_eq!(
        out.refused, 0,
        "closes for 2.5 s were taken for a refused login"
    );
    // Closed for 2.5 s; the network backoff then retries within ~2 s (a refusal would wait 11-15 s).
    assert!(after < Duration::from_secs(7), "connected after {after:?}");
}

/// A connection without a will (the supervisor's file server) reconnects like the others, and
/// its task asks for no will: it used to ask at every drop and stop when none came.
#[tokio::test]
async fn a_connection_without_a_will_reconnects_and_asks_for_none() {
    let broker = testkit::EmbeddedBroker::start().expect("broker");
    let port = door(broker.v4_port(), Duration::from_millis(2_500)).await;
    let out = watch_with(port, "reconnect-no-will", Duration::from_secs(10), None).await;
    assert!(out.downs >= 2, "the door closed {} connections", out.downs);
    assert_eq!(
        out.wills_asked, 0,
        "a will-less connection was asked for a will"
    );
    let after = out
        .connected_after
        .unwrap_or_else(|| panic!("not connected within 10 s ({} closes)", out.downs));
    assert!(after < Duration::from_secs(7), "connected after {after:?}");
}

#[tokio::test]
async fn closes_that_go_on_are_taken_for_a_refused_login_and_slow_down() {
    // Nothing behind the door ever answers: rumqttd refusing a bad password looks like this.
    let port = door(1, Duration::from_secs(3_600)).await;
    // The network backoff's attempts are 0.25-0.5 s, 0.5-1 s, 1-2 s, 2-4 s, 4-8 s apart (the
    // jitter is seeded per run), so the first close after 5 s comes between 5 and 15.5 s.
    let out = watch(port, "reconnect-refused", Duration::from_secs(20)).await;
    assert!(out.connected_after.is_none());
    let refused_after = out
        .refused_after
        .unwrap_or_else(|| panic!("{} closes over 20 s, none taken for a refusal", out.downs));
    assert!(
        refused_after >= transport::AMBIGUOUS_FOR,
        "taken for a refusal after only {refused_after:?}"
    );
    // A few quick attempts first (a proxy whose broker restarts is reached again at once), not
    // one and not a flood; after the refusal the pace is 11-15 s (`refused_backoff`'s tests).
    assert!(
        (4..=7).contains(&out.downs),
        "{} attempts before the refusal",
        out.downs
    );
}
