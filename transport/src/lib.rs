//! The MQTT connection shared by printloop's processes.
//!
//! [`connect`] builds the client and starts the one task that polls rumqttc's event loop
//! ([`forward`], also used by the operator's tools and the test harnesses), which only
//! **forwards** what it sees through a channel: nothing is ever published from that task
//! (bytebeamio/rumqtt#263, #1025). When the connection drops, the task asks the owner for the
//! next will (each connection has its own epoch, so its own will) through [`MqttEvent::Down`],
//! waits a jittered, capped backoff, and reconnects. Publishing is the owner's business, through
//! [`outgoing::Outgoing`], so a full queue never blocks it.

pub mod forward;
pub mod logging;
pub mod outgoing;
pub mod settings;
pub mod systemd;

pub use forward::{Acks, Forwarding, MqttEvent, Out, Reconnect};

use std::path::PathBuf;
use std::time::Duration;

use rumqttc::{AsyncClient, LastWill, MqttOptions, Transport};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Where the broker is and how to log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// TLS?
    pub tls: bool,
    /// CA certificate (PEM) for TLS; the system roots when absent.
    pub ca_file: Option<PathBuf>,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
}

impl BrokerAddr {
    /// A plain loopback broker on `port`.
    pub fn loopback(port: u16) -> Self {
        Self {
            host: "127.0.0.1".into(),
            port,
            tls: false,
            ca_file: None,
            username: None,
            password: None,
        }
    }

    /// Parses `mqtt://host[:port]` or `mqtts://host[:port]` (default ports 1883 / 8883);
    /// IPv6 hosts go in brackets. The only broker-URL parser of the project.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let bad = |reason: &str| UrlError(reason.to_owned());
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else {
            return Err(bad("it must start with mqtt:// or mqtts://"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '@', '?', '#']) {
            return Err(bad(
                "give only host and port (a user name and password are separate settings; \
                 the password goes in PRINTLOOP_MQTT_PASSWORD)",
            ));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let parse_port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0);
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("an IPv6 address needs its closing ']'"))?;
            match after {
                "" => (host, default_port),
                p => (
                    host,
                    parse_port(p.strip_prefix(':').unwrap_or("x"))
                        .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?,
                ),
            }
        } else {
            match rest.rsplit_once(':') {
                Some(_) if rest.matches(':').count() > 1 => {
                    return Err(bad("write an IPv6 address in brackets: mqtt://[::1]:1883"))
                }
                Some((h, p)) => (
                    h,
                    parse_port(p)
                        .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?,
                ),
                None => (rest, default_port),
            }
        };
        if host.is_empty() {
            return Err(bad("it has no host"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            tls,
            ca_file: None,
            username: None,
            password: None,
        })
    }
}

/// Why a broker URL cannot be used (the reason, without the URL).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(pub String);

/// What cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The CA file could not be read.
    #[error("reading CA file {path}: {source}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct Session {
    /// Stable client id.
    pub client_id: String,
    /// Persistent session?
    pub clean_session: bool,
    /// Keep-alive.
    pub keepalive: Duration,
    /// Largest packet in and out.
    pub max_packet: usize,
    /// Longest pause between reconnect attempts.
    pub max_backoff: Duration,
    /// Request queue capacity (publishes beyond it are refused by `try_publish`).
    pub queue: usize,
}

/// The largest MQTT packet printloop's brokers pass on: `max_payload_size` of the embedded
/// broker (`broker.toml`) and `max_packet_size` of `docs/mosquitto.conf`, 1 MiB.
pub const BROKER_MAX_PACKET: usize = 1024 * 1024;

/// The largest packet a printloop client reads: the broker's limit plus room for the topic and
/// header, so that anything a correctly configured broker delivers is read (and refused by the
/// payload's own, smaller limit, with an answer) instead of breaking the connection.
pub const MAX_PACKET: usize = BROKER_MAX_PACKET + 16 * 1024;

impl Default for Session {
    fn default() -> Self {
        Self {
            client_id: "printloop".into(),
            clean_session: false,
            keepalive: Duration::from_secs(15),
            max_packet: MAX_PACKET,
            max_backoff: Duration::from_secs(30),
            queue: 256,
        }
    }
}

/// Connects (lazily: the task connects) and starts the connection task.
pub fn connect(
    broker: &BrokerAddr,
    session: &Session,
    will: Option<LastWill>,
) -> Result<(AsyncClient, mpsc::Receiver<MqttEvent>, JoinHandle<()>), TransportError> {
    let mut o = MqttOptions::new(session.client_id.clone(), broker.host.clone(), broker.port);
    o.set_clean_session(session.clean_session)
        .set_keep_alive(session.keepalive)
        .set_max_packet_size(session.max_packet, session.max_packet)
        .set_inflight(32);
    if let Some(will) = will {
        o.set_last_will(will);
    }
    if let Some(user) = &broker.username {
        o.set_credentials(user.clone(), broker.password.clone().unwrap_or_default());
    }
    if broker.tls {
        let transport = match &broker.ca_file {
            Some(path) => {
                let ca = std::fs::read(path).map_err(|source| TransportError::CaFile {
                    path: path.clone(),
                    source,
                })?;
                Transport::tls(ca, None, None)
            }
            None => Transport::tls_with_default_config(),
        };
        o.set_transport(transport);
    }
    let (client, mut eventloop) = AsyncClient::new(o, session.queue);
    eventloop.set_network_options(network_options());
    let (tx, rx) = mpsc::channel(64);
    // Each client's own jitter: a fleet of Pis booted from one image runs its gateways under
    // the same pid, and a seed made of the pid and the port had them all retry in step after
    // a broker restart. The standard library's hasher keys are random per process.
    let seed = {
        use std::hash::BuildHasher as _;
        std::collections::hash_map::RandomState::new().hash_one(&session.client_id)
    };
    let forwarding = Forwarding {
        reconnect: Reconnect::Backoff {
            max: session.max_backoff,
            seed,
        },
        ..Forwarding::default()
    };
    // The task logs in the caller's span (which printer, or the supervisor).
    let task = forward::spawn(eventloop, forwarding, Out::Bounded(tx));
    Ok((client, rx, task))
}

/// TCP options for every printloop connection: `TCP_NODELAY`, since MQTT is request and answer
/// (a chunk request, a command, its result). With Nagle's algorithm a small packet waits for the
/// peer's delayed acknowledgement (40 ms on Linux) whenever one is outstanding: one file chunk
/// per round cost ~50 ms on loopback and capped a gateway's pull at ~1.2 MB/s (issue #13).
pub fn network_options() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

/// The time for a pure machine: milliseconds since `start` (monotonic) and the wall clock.
pub fn now(start: std::time::Instant) -> protocol::Now {
    protocol::Now {
        mono_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    }
}

/// The size of an incoming packet that broke the connection for being over our limit.
pub fn oversized(e: &rumqttc::ConnectionError) -> Option<usize> {
    match e {
        rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(len),
        )) => Some(*len),
        _ => None,
    }
}

/// The reconnect delay after `attempt` failures: exponential from 250 ms, capped, with jitter
/// in [50 %, 100 %] so a fleet does not reconnect in lockstep after a broker restart.
pub fn backoff(attempt: u32, max: Duration, seed: u64) -> Duration {
    let base = Duration::from_millis(250).saturating_mul(1u32 << attempt.min(8));
    let capped = base.min(max);
    let mixed = seed
        .wrapping_add(u64::from(attempt))
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let jitter = (mixed >> 33) % 500;
    capped.mul_f64(0.5 + jitter as f64 / 1000.0)
}

/// The reconnect delay after the broker refused our login `attempt` times in a row: 15 s,
/// doubling to 2 min, less up to 25 % jitter. Retrying a refused login sooner cannot help (a
/// person must fix a password or the registry) and only floods the broker's log: this keeps
/// it to three attempts in the first minute and one every two minutes after that.
pub fn refused_backoff(attempt: u32, seed: u64) -> Duration {
    let base = Duration::from_secs(15).saturating_mul(1u32 << attempt.saturating_sub(1).min(3));
    let capped = base.min(Duration::from_secs(120));
    let mixed = seed
        .wrapping_add(u64::from(attempt))
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let jitter = (mixed >> 33) % 250;
    capped.mul_f64(1.0 - jitter as f64 / 1000.0)
}

/// How sure we are that a connection error is the broker refusing our login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The network or the broker's availability, not our credentials.
    No,
    /// The connection ended right after CONNECT, before any CONNACK. printloop's embedded
    /// broker (rumqttd) answers a bad login that way, but so does anything between us and the
    /// broker that accepts the TCP connection and closes it: a proxy or load balancer whose
    /// broker is restarting, a link being cut. Only a run of these is taken for a refusal.
    Ambiguous,
    /// The broker said so in its CONNACK (Mosquitto and most brokers).
    Certain,
}

/// How long ambiguous closes must go on, with no CONNACK between them, to be taken for a
/// refused login. Until then the network backoff applies (0.25 s, 0.5 s, 1 s…), so a broker
/// that is only restarting behind a proxy, or a link that was cut for a few seconds, is
/// reached again at once instead of after the 15 s a refusal waits. A real refusal by the
/// embedded broker costs about five quick attempts before the slow pace starts.
pub const AMBIGUOUS_FOR: Duration = Duration::from_secs(5);

/// Did the broker refuse our login? `before_connack`: the error came before any CONNACK of
/// this connection attempt. Mosquitto answers a bad login with a CONNACK refusal; rumqttd
/// (printloop's embedded broker) closes the socket without a CONNACK, which a client can only
/// tell from the connection ending right after CONNECT ([`Refusal::Ambiguous`], taken for a
/// refusal once it has gone on for [`AMBIGUOUS_FOR`]).
pub fn refusal(e: &rumqttc::ConnectionError, before_connack: bool) -> Refusal {
    use rumqttc::{ConnectReturnCode as C, ConnectionError as E, StateError};
    match e {
        E::ConnectionRefused(C::BadUserNamePassword | C::NotAuthorized | C::BadClientId) => {
            Refusal::Certain
        }
        E::MqttState(StateError::ConnectionAborted) if before_connack => Refusal::Ambiguous,
        E::Io(io)
            if before_connack
                && matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
                ) =>
        {
            Refusal::Ambiguous
        }
        _ => Refusal::No,
    }
}

/// Says what to check when the broker refuses us.
pub fn describe(e: &rumqttc::ConnectionError) -> String {
    match e {
        rumqttc::ConnectionError::ConnectionRefused(code) => format!(
            "the broker refused the login ({code:?}): check the user name, the password \
             (PRINTLOOP_MQTT_PASSWORD or broker.password) and, on Mosquitto, the password file \
             and ACL made by `printloop clients mosquitto`"
        ),
        rumqttc::ConnectionError::MqttState(rumqttc::StateError::ConnectionAborted) => {
            "the broker closed the connection before answering the login: printloop's embedded \
             broker does that for an unknown user, a wrong password or a gateway client id that \
             is not its own; check the user name, the password (PRINTLOOP_MQTT_PASSWORD or \
             broker.password) and that the printer is enrolled (`printloop printers add`)"
                .to_owned()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = BrokerAddr::parse("mqtt://127.0.0.1:1884").expect("valid");
        assert_eq!((u.host.as_str(), u.port, u.tls), ("127.0.0.1", 1884, false));
        let u = BrokerAddr::parse("mqtts://broker.farm").expect("valid");
        assert_eq!((u.port, u.tls), (8883, true));
        assert_eq!(
            BrokerAddr::parse("mqtt://[::1]:1883").expect("valid").host,
            "::1"
        );
        for bad in [
            "tcp://x",
            "mqtt://",
            "mqtt://h:99999",
            "mqtt://h:0",
            "mqtt://u:p@h:1",
            "mqtt://h:1/x",
        ] {
            assert!(BrokerAddr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_refused_login_is_retried_at_most_three_times_in_the_first_minute() {
        for seed in 0..50 {
            let mut at = Duration::ZERO;
            let mut attempts_in_first_minute = 1; // the first attempt, at 0
            for n in 1..20 {
                at += refused_backoff(n, seed);
                if at < Duration::from_secs(60) {
                    attempts_in_first_minute += 1;
                }
                assert!(refused_backoff(n, seed) <= Duration::from_secs(120));
                assert!(refused_backoff(n, seed) >= Duration::from_secs(11));
            }
            assert!(
                attempts_in_first_minute <= 3,
                "seed {seed}: {attempts_in_first_minute}"
            );
        }
    }

    #[test]
    fn refusals_are_told_apart_from_network_failures() {
        use rumqttc::{ConnectReturnCode as C, ConnectionError as E, StateError};
        assert_eq!(
            refusal(&E::ConnectionRefused(C::NotAuthorized), false),
            Refusal::Certain
        );
        assert_eq!(
            refusal(&E::ConnectionRefused(C::BadUserNamePassword), true),
            Refusal::Certain
        );
        assert_eq!(
            refusal(&E::ConnectionRefused(C::ServiceUnavailable), true),
            Refusal::No
        );
        // rumqttd's answer to a bad login, and also a proxy whose broker is down.
        assert_eq!(
            refusal(&E::MqttState(StateError::ConnectionAborted), true),
            Refusal::Ambiguous
        );
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert_eq!(refusal(&E::Io(eof), true), Refusal::Ambiguous);
        // A connection that was up and then dropped is the network, not a refusal.
        assert_eq!(
            refusal(&E::MqttState(StateError::ConnectionAborted), false),
            Refusal::No
        );
        let refused_tcp = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(refusal(&E::Io(refused_tcp), true), Refusal::No);
        assert!(
            describe(&E::ConnectionRefused(C::NotAuthorized)).contains("PRINTLOOP_MQTT_PASSWORD")
        );
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let max = Duration::from_secs(30);
        let a = backoff(1, max, 1);
        assert!(
            a >= Duration::from_millis(250) && a <= Duration::from_millis(500),
            "{a:?}"
        );
        for attempt in 0..40 {
            assert!(backoff(attempt, max, 7) <= max);
        }
        assert!(backoff(20, max, 3) >= max / 2);
        let spread: std::collections::HashSet<_> = (0..20).map(|s| backoff(5, max, s)).collect();
        assert!(spread.len() > 5, "jitter differs between gateways");
    }
}
