//! The gateway process: one `select!` loop that turns IO into [`Input`]s for the state machine
//! and carries out its [`Output`]s, persisting before publishing.
//!
//! Tasks and bulkheads:
//! - the MQTT event loop runs in its own task and only forwards what it sees through a bounded
//!   channel; nothing is ever published from that task (bytebeamio/rumqtt#263, #1025);
//! - publishes use `try_publish`: a full request queue drops the message with a warning instead
//!   of blocking (events are in the durable outbox and are re-sent; state is re-sent by the
//!   heartbeat), so a slow or dead broker never stalls the printer;
//! - the serial link runs in its own task ([`crate::serial`]) behind bounded channels;
//! - hashing a file runs on the blocking pool.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use protocol::presence::Firmware;
use protocol::state::{Heater, Temperatures};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS, Transport};
use tokio::sync::{mpsc, oneshot};

use crate::config::BrokerUrl;
use crate::files::FileCache;
use crate::link::{LinkConfig, LinkEvent};
use crate::machine::{CoreConfig, Gateway, Input, Now, Output, PrinterEvent};
use crate::printer::Printer;
use crate::store::Store;

/// Everything the gateway process needs, resolved from the config file and flags.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The state machine's configuration.
    pub core: CoreConfig,
    /// The broker.
    pub broker: BrokerUrl,
    /// MQTT user name.
    pub username: Option<String>,
    /// MQTT password.
    pub password: Option<String>,
    /// CA certificate (PEM) for mqtts.
    pub ca_file: Option<PathBuf>,
    /// MQTT keep-alive.
    pub keepalive: Duration,
    /// Where the state file and the file cache live.
    pub data_dir: PathBuf,
    /// The printer's serial device.
    pub serial_port: PathBuf,
    /// Its baud rate.
    pub baud: u32,
    /// The link driver's configuration.
    pub link: LinkConfig,
    /// Longest pause between two reconnect attempts.
    pub max_backoff: Duration,
}

/// Why the gateway stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The state database failed: the gateway cannot promise anything without it.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The data directory is unusable.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The CA file could not be read.
    #[error("reading CA file {path}: {source}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What the MQTT task tells the main loop.
enum MqttEvent {
    Connected {
        session_present: bool,
    },
    Message {
        topic: String,
        payload: Vec<u8>,
    },
    /// The connection failed or dropped; the task waits for the next will (with the next
    /// epoch) before it tries again.
    Down {
        error: String,
        next_will: oneshot::Sender<LastWill>,
    },
}

fn now(start: Instant) -> Now {
    Now {
        mono_ms: start.elapsed().as_millis() as u64,
        unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
}

fn mqtt_options(s: &Settings, will: LastWill) -> Result<MqttOptions, RunError> {
    let client_id = format!("printloop-gw-{}", s.core.printer_id);
    let mut o = MqttOptions::new(client_id, s.broker.host.clone(), s.broker.port);
    o.set_clean_session(false)
        .set_keep_alive(s.keepalive)
        .set_last_will(will)
        // File chunks are up to 128 KiB; leave room for the envelope.
        .set_max_packet_size(256 * 1024, 256 * 1024)
        .set_inflight(32);
    if let Some(user) = &s.username {
        o.set_credentials(user.clone(), s.password.clone().unwrap_or_default());
    }
    if s.broker.tls {
        let transport = match &s.ca_file {
            Some(path) => {
                let ca = std::fs::read(path).map_err(|source| RunError::CaFile {
                    path: path.clone(),
                    source,
                })?;
                Transport::tls(ca, None, None)
            }
            None => Transport::tls_with_default_config(),
        };
        o.set_transport(transport);
    }
    Ok(o)
}

fn backoff(attempt: u32, max: Duration, seed: u64) -> Duration {
    let base = Duration::from_millis(250).saturating_mul(1u32 << attempt.min(8));
    let capped = base.min(max);
    // Jitter in [50 %, 100 %] so a fleet does not reconnect in lockstep after a broker restart.
    let jitter = (seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(attempt as u64)
        >> 33)
        % 500;
    capped.mul_f64(0.5 + jitter as f64 / 1000.0)
}

/// Whether a connection error means our credentials or identity were refused.
fn refused(e: &rumqttc::ConnectionError) -> Option<String> {
    match e {
        rumqttc::ConnectionError::ConnectionRefused(code) => Some(format!(
            "the broker refused the connection ({code:?}): check broker.username, PRINTLOOP_MQTT_PASSWORD and the broker's ACL"
        )),
        _ => None,
    }
}

async fn mqtt_task(
    mut eventloop: rumqttc::EventLoop,
    tx: mpsc::Sender<MqttEvent>,
    max_backoff: Duration,
    seed: u64,
) {
    let mut failures = 0u32;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                failures = 0;
                if tx
                    .send(MqttEvent::Connected {
                        session_present: ack.session_present,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let msg = MqttEvent::Message {
                    topic: p.topic,
                    payload: p.payload.to_vec(),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let error = refused(&e).unwrap_or_else(|| e.to_string());
                let (will_tx, will_rx) = oneshot::channel();
                if tx
                    .send(MqttEvent::Down {
                        error,
                        next_will: will_tx,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                match will_rx.await {
                    Ok(will) => {
                        eventloop.mqtt_options.set_last_will(will);
                    }
                    Err(_) => return,
                }
                failures += 1;
                tokio::time::sleep(backoff(failures, max_backoff, seed)).await;
            }
        }
    }
}

/// Runs the gateway until `shutdown` resolves.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    let printer_id = settings.core.printer_id.clone();
    let span = tracing::info_span!("gateway", printer = %printer_id);
    let _enter = span.enter();
    std::fs::create_dir_all(&settings.data_dir).map_err(|source| RunError::DataDir {
        path: settings.data_dir.clone(),
        source,
    })?;
    let store = Store::open(&settings.data_dir.join("gateway.redb"))?;
    let cache =
        FileCache::open(&settings.data_dir.join("files")).map_err(|source| RunError::DataDir {
            path: settings.data_dir.join("files"),
            source,
        })?;
    let start = Instant::now();
    let snap = store.load()?;
    tracing::info!(
        epoch = snap.epoch,
        outbox = snap.outbox.len(),
        jobs = snap.ledger.len(),
        "state loaded"
    );
    let (mut machine, first) = Gateway::new(settings.core.clone(), snap, now(start));

    let (check_tx, mut check_rx) = mpsc::channel::<Input>(4);
    let mut printer = Printer::spawn(&settings, cache.clone());
    let mut shell = Shell {
        store,
        cache,
        client: None,
        check_tx,
        pending: VecDeque::new(),
    };
    if let Some(free) = shell.cache.free_bytes() {
        shell.pending.push_back(Input::DiskFree { bytes: free });
    }
    shell.execute(first, &mut printer)?;

    // First connection: persist the new epoch before the will that carries it exists.
    let (muts, will_topic, will) = machine.prepare_connect(now(start));
    shell.store.apply(&muts)?;
    let options = mqtt_options(
        &settings,
        LastWill::new(will_topic, will, QoS::AtLeastOnce, true),
    )?;
    let (client, eventloop) = AsyncClient::new(options, 256);
    shell.client = Some(client);
    let (mqtt_tx, mut mqtt_rx) = mpsc::channel(64);
    let seed = start.elapsed().as_nanos() as u64 ^ u64::from(std::process::id());
    let mqtt = tokio::spawn(mqtt_task(eventloop, mqtt_tx, settings.max_backoff, seed));

    tokio::pin!(shutdown);
    loop {
        while let Some(input) = shell.pending.pop_front() {
            let out = machine.handle(now(start), input);
            shell.execute(out, &mut printer)?;
        }
        let deadline = machine
            .next_deadline()
            .map(|ms| start + Duration::from_millis(ms))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = &mut shutdown => break,
            ev = mqtt_rx.recv() => {
                let Some(ev) = ev else { break };
                match ev {
                    MqttEvent::Connected { session_present } => {
                        tracing::info!(session_present, epoch = machine.epoch(), "connected to the broker");
                        shell.pending.push_back(Input::MqttConnected { session_present });
                    }
                    MqttEvent::Message { topic, payload } => shell.pending.push_back(Input::Message { topic, payload }),
                    MqttEvent::Down { error, next_will } => {
                        tracing::warn!(%error, "broker connection lost; the printer carries on");
                        let out = machine.handle(now(start), Input::MqttDisconnected);
                        shell.execute(out, &mut printer)?;
                        let (muts, topic, will) = machine.prepare_connect(now(start));
                        shell.store.apply(&muts)?;
                        let _ = next_will.send(LastWill::new(topic, will, QoS::AtLeastOnce, true));
                    }
                }
            }
            ev = printer.next_event() => {
                if let Some(ev) = ev {
                    shell.pending.push_back(Input::Printer(ev));
                }
            }
            Some(input) = check_rx.recv() => shell.pending.push_back(input),
            _ = tokio::time::sleep_until(deadline.into()) => shell.pending.push_back(Input::Tick),
        }
    }

    // A clean goodbye: retained offline with a reason, then disconnect.
    if let Some(client) = &shell.client {
        let bye = machine.goodbye(now(start));
        let _ = client.try_publish(bye.topic, QoS::AtLeastOnce, true, bye.payload);
        let _ = tokio::time::timeout(Duration::from_secs(2), client.disconnect()).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), mqtt).await;
    printer.close().await;
    tracing::info!("gateway stopped");
    Ok(())
}

struct Shell {
    store: Store,
    cache: FileCache,
    client: Option<AsyncClient>,
    check_tx: mpsc::Sender<Input>,
    pending: VecDeque<Input>,
}

impl Shell {
    /// Carries out outputs in order. A store failure stops the gateway: it must not report
    /// what it could not make durable.
    fn execute(&mut self, outs: Vec<Output>, printer: &mut Printer) -> Result<(), RunError> {
        for o in outs {
            match o {
                Output::Persist(m) => self.store.apply(&m)?,
                Output::Subscribe(topic) => {
                    if let Some(c) = &self.client {
                        if let Err(e) = c.try_subscribe(topic.clone(), QoS::AtLeastOnce) {
                            tracing::warn!(%topic, error = %e, "subscribe not queued");
                        }
                    }
                }
                Output::Publish(p) => {
                    if let Some(c) = &self.client {
                        if let Err(e) =
                            c.try_publish(p.topic.clone(), QoS::AtLeastOnce, p.retain, p.payload)
                        {
                            tracing::warn!(topic = %p.topic, error = %e, "publish dropped: the MQTT queue is full");
                        }
                    }
                }
                Output::Printer(cmd) => printer.command(cmd),
                Output::StoreChunk {
                    sha256,
                    offset,
                    data,
                } => {
                    let input = match self.cache.store_chunk(&sha256, offset, &data) {
                        Ok(()) => Input::ChunkStored {
                            sha256,
                            offset,
                            len: data.len() as u64,
                        },
                        Err(e) => Input::ChunkStoreFailed {
                            sha256,
                            reason: e.to_string(),
                        },
                    };
                    self.pending.push_back(input);
                }
                Output::CheckFile { sha256 } => {
                    let cache = self.cache.clone();
                    let tx = self.check_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let result = cache.check(&sha256);
                        let _ = tx.blocking_send(Input::FileChecked { sha256, result });
                    });
                }
                Output::RemoveFile { sha256 } => {
                    self.cache.remove(&sha256);
                    if let Some(free) = self.cache.free_bytes() {
                        self.pending.push_back(Input::DiskFree { bytes: free });
                    }
                }
            }
        }
        Ok(())
    }
}

/// Maps what the link driver says to what the state machine needs.
pub(crate) fn firmware_of(info: &crate::link::FirmwareInfo) -> Firmware {
    let mut caps: Vec<String> = info
        .capabilities
        .iter()
        .filter(|(_, on)| **on)
        .map(|(k, _)| k.clone())
        .collect();
    caps.sort();
    Firmware {
        name: info.name().unwrap_or("unknown firmware").to_owned(),
        protocol_version: info.get("PROTOCOL_VERSION").map(str::to_owned),
        machine_type: info.get("MACHINE_TYPE").map(str::to_owned),
        capabilities: caps,
    }
}

/// Temperatures in the protocol's shape.
pub(crate) fn temperatures_of(t: &protocol::marlin::Temps) -> Temperatures {
    Temperatures {
        nozzle: Heater {
            actual: t.hotend.map_or(0.0, |h| h.actual),
            target: t.hotend.and_then(|h| h.target).unwrap_or(0.0),
        },
        bed: Heater {
            actual: t.bed.map_or(0.0, |h| h.actual),
            target: t.bed.and_then(|h| h.target).unwrap_or(0.0),
        },
    }
}

/// Link events that matter to the state machine; the rest are logged by the printer side.
pub(crate) fn printer_event(ev: LinkEvent) -> Option<PrinterEvent> {
    Some(match ev {
        LinkEvent::Ready { firmware } => PrinterEvent::Ready {
            firmware: firmware_of(&firmware),
        },
        LinkEvent::Temperatures(t) => PrinterEvent::Temperatures(temperatures_of(&t)),
        LinkEvent::Fatal { message } => PrinterEvent::Fatal { message },
        LinkEvent::FirmwareError { message } => PrinterEvent::FirmwareError { message },
        LinkEvent::Reset { .. } => PrinterEvent::Reset,
        LinkEvent::Timeout { .. } => PrinterEvent::Timeout,
        LinkEvent::LinkError { message } => PrinterEvent::Disconnected { reason: message },
        LinkEvent::Disconnected { reason } => PrinterEvent::Disconnected { reason },
        LinkEvent::Acked { .. }
        | LinkEvent::Action(_)
        | LinkEvent::Message(_)
        | LinkEvent::Garbage { .. } => return None,
    })
}
