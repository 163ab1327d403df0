//! rumqttd running inside our process, on its own threads.
//!
//! rumqttd 0.20's `Broker::start` blocks forever: it spawns one OS thread per listener (each
//! with its own single-threaded tokio runtime) plus the router thread that `Broker::new` already
//! started, then joins the listener threads. We run `start` on a thread of its own, so a tokio
//! program (the supervisor) can embed the broker without giving up a runtime worker.
//!
//! **No shutdown.** rumqttd 0.20 has no API to stop a broker: no shutdown signal, no way to close
//! its listening sockets or its router. Once started, the broker's threads live until the
//! process exits. [`EmbeddedBroker`] therefore has no `stop` and no `Drop` that pretends to stop
//! it: dropping the handle detaches it and the broker keeps serving. To stop a broker, run it as
//! a process (`printloop broker`) and end the process.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rumqttd::local::{LinkRx, LinkTx};

use crate::{BrokerConfig, BrokerError, Listener, ListenerKind};

/// How long [`EmbeddedBroker::start`] waits for every listener to answer.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);

const PROBE_POLL: Duration = Duration::from_millis(20);
const PROBE_IO_TIMEOUT: Duration = Duration::from_secs(1);

/// A broker whose router runs but whose listeners are not started yet: the moment to create
/// in-process links (rumqttd can only create them before `start`, which borrows the broker for
/// ever).
pub struct PreparedBroker {
    config: BrokerConfig,
    broker: rumqttd::Broker,
}

impl PreparedBroker {
    /// An in-process MQTT client on the router (no socket). It has no will and a clean session.
    ///
    /// printloop's own programs should prefer a normal MQTT client over loopback: it is the one
    /// code path that also works against Mosquitto.
    pub fn link(&self, client_id: &str) -> Result<(LinkTx, LinkRx), BrokerError> {
        self.broker.link(client_id).map_err(|e| BrokerError::Link {
            client_id: client_id.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Starts the listeners on a broker thread and waits (at most `ready_timeout`) until every
    /// listener answers.
    pub fn start(self, ready_timeout: Duration) -> Result<EmbeddedBroker, BrokerError> {
        let PreparedBroker { config, mut broker } = self;
        config.validate()?;
        let listeners = config.listeners();

        // rumqttd binds inside its listener threads and only logs a failed bind; check first so
        // the common "address in use" case is an error here (the race stays, see `free_port`).
        for l in &listeners {
            std::net::TcpListener::bind(l.addr).map_err(|source| BrokerError::Bind {
                listener: l.config_key(),
                addr: l.addr,
                source,
            })?;
        }

        let thread = std::thread::Builder::new()
            .name("rumqttd".to_owned())
            .spawn(move || match broker.start() {
                Ok(()) => "every listener thread ended (see the log for bind errors)".to_owned(),
                Err(e) => format!("{e} ({e:?})"),
            })
            .map_err(BrokerError::Spawn)?;

        let mut handle = EmbeddedBroker {
            config,
            listeners,
            thread: Some(thread),
        };
        handle.wait_ready(ready_timeout)?;
        Ok(handle)
    }
}

/// A running in-process rumqttd. Dropping it does **not** stop the broker (rumqttd has no
/// shutdown API); the broker serves until the process exits.
pub struct EmbeddedBroker {
    config: BrokerConfig,
    listeners: Vec<Listener>,
    thread: Option<JoinHandle<String>>,
}

impl EmbeddedBroker {
    /// Validates the configuration and starts rumqttd's router (not its listeners yet).
    pub fn prepare(config: BrokerConfig) -> Result<PreparedBroker, BrokerError> {
        config.validate()?;
        let broker = rumqttd::Broker::new(config.secured_rumqttd()?);
        Ok(PreparedBroker { config, broker })
    }

    /// Starts rumqttd on its own threads and returns once every listener answers (bounded by
    /// [`DEFAULT_READY_TIMEOUT`]).
    pub fn start(config: BrokerConfig) -> Result<Self, BrokerError> {
        Self::prepare(config)?.start(DEFAULT_READY_TIMEOUT)
    }

    /// The configuration the broker runs with.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// The listeners, as bound.
    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// The address of the first listener of a kind.
    pub fn addr(&self, kind: ListenerKind) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.kind == kind)
            .map(|l| l.addr)
    }

    /// False once rumqttd's `start` has returned (all its listeners died).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Blocks until rumqttd stops serving, which in practice only happens when every listener
    /// thread died; returns why. Never returns `Ok`: a broker that stops is an error.
    pub fn wait(mut self) -> Result<(), BrokerError> {
        Err(self.take_stop_reason())
    }

    fn take_stop_reason(&mut self) -> BrokerError {
        match self.thread.take() {
            Some(thread) => match thread.join() {
                Ok(reason) => BrokerError::Stopped(reason),
                Err(_) => BrokerError::Stopped("the broker thread panicked".to_owned()),
            },
            None => BrokerError::Stopped("already reported".to_owned()),
        }
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), BrokerError> {
        let deadline = Instant::now() + timeout;
        let mut pending: Vec<(Listener, String)> = self
            .listeners
            .iter()
            .map(|l| (l.clone(), "not tried yet".to_owned()))
            .collect();
        loop {
            if !self.is_running() {
                return Err(self.take_stop_reason());
            }
            pending.retain_mut(|(listener, last_error)| match probe(listener) {
                Ok(()) => false,
                Err(e) => {
                    *last_error = e;
                    true
                }
            });
            let Some((listener, last_error)) = pending.first() else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(BrokerError::NotReady {
                    listener: listener.config_key(),
                    addr: listener.addr,
                    timeout,
                    last_error: last_error.clone(),
                });
            }
            std::thread::sleep(PROBE_POLL);
        }
    }
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("origin", &self.config.origin())
            .field("listeners", &self.listeners)
            .field("running", &self.is_running())
            .finish()
    }
}

/// Checks that a listener serves MQTT: plain v4/v5 listeners must answer a CONNECT with a
/// CONNACK or, when the listener requires credentials, by closing the connection (rumqttd sends
/// no CONNACK then); TLS and websocket listeners need only accept a TCP connection.
pub(crate) fn probe(listener: &Listener) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&listener.addr, PROBE_IO_TIMEOUT)
        .map_err(|e| format!("connect: {e}"))?;
    if listener.tls || listener.kind == ListenerKind::Ws {
        return Ok(());
    }
    stream
        .set_read_timeout(Some(PROBE_IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(PROBE_IO_TIMEOUT)))
        .map_err(|e| format!("socket options: {e}"))?;
    stream
        .write_all(&connect_packet(listener.kind == ListenerKind::V5))
        .map_err(|e| format!("sending CONNECT: {e}"))?;
    let mut first = [0u8; 1];
    match stream.read(&mut first) {
        Ok(1) => {}
        // rumqttd answers a CONNECT without valid credentials by closing the connection (no
        // CONNACK): it read and judged our CONNECT, so it is serving.
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
        Err(e) => return Err(format!("waiting for CONNACK: {e}")),
    }
    if first[0] != 0x20 {
        return Err(format!(
            "expected a CONNACK (0x20), got packet type byte {:#04x}",
            first[0]
        ));
    }
    // A DISCONNECT, so the probe leaves no will and no session behind.
    let _ = stream.write_all(&[0xE0, 0x00]);
    Ok(())
}

/// A minimal CONNECT (clean session, keep-alive 10 s, no will, no credentials).
fn connect_packet(v5: bool) -> Vec<u8> {
    static PROBES: AtomicU64 = AtomicU64::new(0);
    let client_id = format!(
        "printloop-probe-{}-{}",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::Relaxed)
    );
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T'];
    body.push(if v5 { 5 } else { 4 });
    body.push(0x02); // clean session / clean start
    body.extend_from_slice(&10u16.to_be_bytes());
    if v5 {
        body.push(0x00); // no properties
    }
    // client ids above are at most ~40 bytes: the u16 length and one-byte remaining length hold.
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_packet_is_well_formed() {
        for v5 in [false, true] {
            let p = connect_packet(v5);
            assert_eq!(p[0], 0x10);
            assert_eq!(p[1] as usize, p.len() - 2);
            assert_eq!(&p[2..8], b"\x00\x04MQTT");
            assert_eq!(p[8], if v5 { 5 } else { 4 });
        }
    }
}
