//! The gateway process: one `select!` loop that turns IO into [`Input`]s for the state machine
//! and carries out its [`Output`]s, persisting before publishing.
//!
//! Tasks and bulkheads:
//! - the MQTT event loop runs in its own task and only forwards what it sees through a bounded
//!   channel; nothing is ever published from that task (bytebeamio/rumqtt#263, #1025);
//! - publishes wait in the shell's [`Outgoing`] queue, by priority (state and events before
//!   answers, answers before `busy` refusals), and are handed to rumqttc only as its request
//!   queue has room: a slow broker or a flood of commands never stalls the printer and never
//!   costs an event or a state;
//! - the serial link runs in its own task ([`crate::serial`]) behind bounded channels;
//! - hashing a file runs on the blocking pool.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, LastWill, QoS};
use tokio::sync::mpsc;
use tracing::Instrument as _;
use transport::outgoing::Outgoing;
use transport::{now, BrokerAddr, MqttEvent, Session};

use crate::files::FileCache;
use crate::link::LinkConfig;
use crate::machine::{CoreConfig, Gateway, Input, Output};
use crate::printer::Printer;
use crate::store::Store;

/// Everything the gateway process needs, resolved from the config file and flags.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The state machine's configuration.
    pub core: CoreConfig,
    /// The broker, with credentials.
    pub broker: BrokerAddr,
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
    /// The MQTT connection cannot be set up.
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
}

/// Runs the gateway until `shutdown` resolves. Everything it logs, and every task it spawns,
/// is in the span `gateway{printer=…}` (attached to the future, never entered across an
/// `.await`: an entered span leaks into whatever else its thread polls).
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    let span = tracing::info_span!("gateway", printer = %settings.core.printer_id);
    serve(settings, shutdown).instrument(span).await
}

async fn serve(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    let printer_id = settings.core.printer_id.clone();
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
    let mut snap = store.load()?;
    // A partial file holds every chunk written before the gateway stopped, also past the last
    // synced mark (a process that died leaves its writes in the page cache; ext4's ordered
    // mode never makes a file longer than its data). Each was verified before it was written,
    // and the whole file is hashed before it prints: resume from what is on disk.
    for f in snap.files.iter_mut().filter(|f| !f.verified) {
        f.received_bytes = cache.part_len(&f.sha256).unwrap_or(0).min(f.size_bytes);
    }
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
        outgoing: Outgoing::default(),
    };
    if let Some(free) = shell.cache.free_bytes() {
        shell.pending.push_back(Input::DiskFree { bytes: free });
    }
    shell.execute(first, &mut printer)?;

    // First connection: persist the new epoch before the will that carries it exists.
    let (muts, will_topic, will) = machine.prepare_connect(now(start));
    shell.store.apply(&muts)?;
    let session = Session {
        client_id: format!("printloop-gw-{printer_id}"),
        clean_session: false,
        keepalive: settings.keepalive,
        max_backoff: settings.max_backoff,
        ..Session::default()
    };
    let (client, mut mqtt_rx, mqtt) = transport::connect(
        &settings.broker,
        &session,
        Some(LastWill::new(will_topic, will, QoS::AtLeastOnce, true)),
    )?;
    shell.client = Some(client);

    // systemd (Type=notify): ready once the state is loaded and the printer task runs (the
    // broker may be away: a gateway serves its printer without it); the watchdog is fed from a
    // timer arm of this loop only, so a wedged loop is restarted (transport::systemd).
    let systemd = transport::systemd::Systemd::from_env();
    systemd.ready(&format!("printer {printer_id}: serving"));
    let mut feed = tokio::time::interval(systemd.feed_every());
    feed.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    tokio::pin!(shutdown);
    loop {
        while let Some(input) = shell.pending.pop_front() {
            let out = machine.handle(now(start), input);
            shell.execute(out, &mut printer)?;
        }
        if let Some(client) = &shell.client {
            shell.outgoing.drain(client);
        }
        let waiting = !shell.outgoing.is_empty();
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
                    MqttEvent::Message(p) => shell.pending.push_back(Input::Message { topic: p.topic, payload: p.payload.to_vec() }),
                    // Acknowledgements are not asked for.
                    MqttEvent::SubAck(_) | MqttEvent::PubAck | MqttEvent::PubComp => {}
                    MqttEvent::Down { error, refused, next_will } => {
                        // A refused login is logged by the transport, once, with its fix.
                        if !refused {
                            tracing::warn!(%error, "broker connection lost; the printer carries on");
                        }
                        let out = machine.handle(now(start), Input::MqttDisconnected);
                        shell.execute(out, &mut printer)?;
                        let (muts, topic, will) = machine.prepare_connect(now(start));
                        shell.store.apply(&muts)?;
                        if let Some(next) = next_will {
                            let _ = next.send(LastWill::new(topic, will, QoS::AtLeastOnce, true));
                        }
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
            _ = feed.tick() => systemd.feed(),
            // rumqttc's queue was full: try again shortly (its event loop is draining it).
            _ = tokio::time::sleep(OUTGOING_RETRY), if waiting => {}
        }
    }
    systemd.stopping();

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

/// How soon a publish that found rumqttc's queue full is tried again.
const OUTGOING_RETRY: Duration = Duration::from_millis(5);

struct Shell {
    store: Store,
    cache: FileCache,
    client: Option<AsyncClient>,
    check_tx: mpsc::Sender<Input>,
    pending: VecDeque<Input>,
    outgoing: Outgoing,
}

impl Shell {
    /// Carries out outputs in order. A store failure stops the gateway: it must not report
    /// what it could not make durable.
    fn execute(&mut self, outs: Vec<Output>, printer: &mut Printer) -> Result<(), RunError> {
        for o in outs {
            match o {
                Output::Persist(m) => self.store.apply(&m)?,
                Output::Subscribe(topic) => self.outgoing.subscribe(topic, QoS::AtLeastOnce),
                Output::Publish(p) => self.outgoing.push(p.lane, p.topic, p.payload, p.retain),
                Output::Printer(cmd) => printer.command(cmd),
                Output::StoreChunk {
                    sha256,
                    offset,
                    data,
                    sync,
                } => {
                    let input = match self.cache.store_chunk(&sha256, offset, &data, sync) {
                        Ok(()) => Input::ChunkStored {
                            sha256,
                            offset,
                            len: data.len() as u64,
                            synced: sync,
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
