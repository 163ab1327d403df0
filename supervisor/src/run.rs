//! The supervisor process: one loop that feeds the [`Supervisor`] machine and carries out its
//! outputs, persisting before publishing.
//!
//! Bulkheads:
//! - file chunks for gateways are served by a separate task behind a bounded queue, on an MQTT
//!   connection of their own (`printloop-supervisor-files`): a burst of transfers never delays
//!   a decision, nor a command queued behind megabytes of chunks (a dropped request is asked
//!   again by the gateway);
//! - uploads and their final hash run on the blocking pool;
//! - publishes wait in the shell's [`Outgoing`] queue, by priority (presence, state and
//!   commands before answers, answers before `busy` refusals), and go to rumqttc as its queue
//!   has room: a burst of ten thousand requests is answered in full and never blocks the loop;
//! - the HTTP server (`crate::http`) never touches the machine: its operations arrive as calls
//!   through a bounded channel, its reads come from a frame rendered a few times a second;
//!   `/metrics` reads metrics set once a second.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::files::{FileChunkRequest, FileChunkResponse};
use protocol::{Payload, PrinterId, Topic, Topics};
use rumqttc::{AsyncClient, LastWill, QoS};
use tokio::sync::mpsc;
use tracing::Instrument as _;
use transport::outgoing::Outgoing;
use transport::{now, BrokerAddr, MqttEvent, Session};

use crate::files::FileStore;
use crate::http::metrics::Metrics;
use crate::machine::{Input, Now, Output, Supervisor, SupervisorConfig, UploadOutcome};
use crate::model::Mutation;
use crate::store::Store;

/// The client registry's file name in the supervisor's data directory.
pub const CLIENTS_FILE: &str = "clients.toml";

/// Which broker to use.
#[derive(Debug, Clone)]
pub enum BrokerTarget {
    /// Run rumqttd inside the supervisor from this configuration.
    Embedded(Box<broker::BrokerConfig>),
    /// Connect to a broker that runs elsewhere (Mosquitto, EMQX, …).
    External(BrokerAddr),
}

/// Everything the supervisor process needs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The machine's policies.
    pub machine: SupervisorConfig,
    /// The broker.
    pub broker: BrokerTarget,
    /// Where `supervisor.redb`, `files/` and `uploads/` live.
    pub data_dir: PathBuf,
    /// Serve Prometheus metrics here (alone; `/metrics` is on the HTTP server too).
    pub metrics: Option<SocketAddr>,
    /// Serve the dashboard, the REST API and slicer uploads here.
    pub http: Option<SocketAddr>,
    /// MQTT keep-alive.
    pub keepalive: Duration,
}

/// Why the supervisor stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The database failed.
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
    /// The client registry cannot be read (or no random password made).
    #[error("client registry: {0}")]
    Clients(#[from] broker::clients::ClientsError),
    /// The embedded broker did not start.
    #[error("embedded broker: {0}")]
    Broker(#[from] broker::BrokerError),
    /// The MQTT connection cannot be set up.
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    /// The HTTP or metrics listener cannot start.
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    /// The file server's thread or its runtime cannot start.
    #[error("file server: {0}")]
    FileServer(std::io::Error),
}

/// Most broker messages handled in one batch (one durable commit).
const MAX_BATCH: usize = 512;

/// A running supervisor's outside view (for the demo and tests).
#[derive(Debug, Clone)]
pub struct Handle {
    /// The broker it talks to (the embedded one's v4 listener when embedded).
    pub broker: BrokerAddr,
    /// The metrics listener, if any.
    pub metrics: Option<SocketAddr>,
    /// The HTTP server (dashboard, API), if any.
    pub http: Option<SocketAddr>,
}

/// The user name of the supervisor's own login to the broker it embeds. Its password is made
/// at every start and lives only in memory; the '.' keeps it apart from every registry user.
pub const INTERNAL_USER: &str = "printloop.supervisor";

/// Starts the embedded broker (if configured) and returns where to connect.
///
/// The embedded broker checks logins against the client registry at `registry`
/// (`<data_dir>/clients.toml`) on every listener beyond loopback; the supervisor itself
/// connects to a loopback listener when there is one, else with its in-memory credential.
pub fn start_broker(
    target: &BrokerTarget,
    registry: Option<&Path>,
) -> Result<BrokerAddr, RunError> {
    match target {
        BrokerTarget::External(addr) => Ok(addr.clone()),
        BrokerTarget::Embedded(config) => {
            let mut config = (**config).clone();
            let password = broker::clients::new_password()?;
            let auth = broker::clients::Authenticator::new(
                registry.map(Path::to_path_buf),
                Some((INTERNAL_USER.to_owned(), password.clone())),
            )?;
            config.set_authenticator(Arc::new(auth));
            let v4: Vec<broker::Listener> = config
                .listeners()
                .into_iter()
                .filter(|l| l.kind == broker::ListenerKind::V4 && !l.tls)
                .collect();
            let listener = v4
                .iter()
                .find(|l| !l.requires_auth())
                .or(v4.first())
                .cloned()
                .ok_or(broker::BrokerError::Invalid {
                    origin: config.origin().to_owned(),
                    key: "v4".into(),
                    reason: "the supervisor needs a plain MQTT 3.1.1 listener".into(),
                })?;
            let b = broker::EmbeddedBroker::start(config)?;
            // rumqttd has no shutdown API: it lives as long as the process.
            std::mem::forget(b);
            let ip = listener.addr.ip();
            let host = if ip.is_unspecified() {
                if ip.is_ipv4() { "127.0.0.1" } else { "::1" }.to_owned()
            } else {
                ip.to_string()
            };
            let (username, password) = if listener.requires_auth() {
                (Some(INTERNAL_USER.to_owned()), Some(password))
            } else {
                (None, None)
            };
            Ok(BrokerAddr {
                host,
                username,
                password,
                ..BrokerAddr::loopback(listener.addr.port())
            })
        }
    }
}

/// Runs the supervisor until `shutdown` resolves. `ready` receives where it connected once it
/// is up.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
    ready: Option<tokio::sync::oneshot::Sender<Handle>>,
) -> Result<(), RunError> {
    // Attached to the future, never entered across an `.await` (an entered span leaks into
    // whatever else its thread polls: `printloop demo` logged the supervisor under a gateway's).
    serve(settings, shutdown, ready)
        .instrument(tracing::info_span!("supervisor"))
        .await
}

async fn serve(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
    ready: Option<tokio::sync::oneshot::Sender<Handle>>,
) -> Result<(), RunError> {
    std::fs::create_dir_all(&settings.data_dir).map_err(|source| RunError::DataDir {
        path: settings.data_dir.clone(),
        source,
    })?;
    let store = Arc::new(Store::open(&settings.data_dir.join("supervisor.redb"))?);
    let files = FileStore::open(&settings.data_dir).map_err(|source| RunError::DataDir {
        path: settings.data_dir.clone(),
        source,
    })?;
    let start = Instant::now();
    let mut snap = store.load()?;
    // Files on disk that the database does not list (a crash between the two) are adopted.
    if let Ok(on_disk) = files.list() {
        let mut adopt = Vec::new();
        for f in on_disk {
            if !snap.files.iter().any(|r| r.sha256 == f.sha256) {
                let rec = crate::model::FileRecord {
                    sha256: f.sha256,
                    size_bytes: f.size_bytes,
                    stored_at_ms: now(start).unix_ms,
                };
                adopt.push(Mutation::PutFile(rec.clone()));
                snap.files.push(rec);
            }
        }
        store.apply(&adopt)?;
    }
    tracing::info!(
        epoch = snap.epoch,
        jobs = snap.jobs.len(),
        printers = snap.printers.len(),
        files = snap.files.len(),
        "state loaded"
    );
    let topics = settings.machine.topics.clone();
    let mut machine = Supervisor::new(settings.machine.clone(), snap, now(start));

    let broker_addr = {
        let target = settings.broker.clone();
        let registry = settings.data_dir.join(CLIENTS_FILE);
        tokio::task::spawn_blocking(move || start_broker(&target, Some(&registry)))
            .await
            .map_err(|e| RunError::DataDir {
                path: settings.data_dir.clone(),
                source: std::io::Error::other(e),
            })??
    };

    // Which printers may get work: the registry's gateways (re-read when it changes).
    let mut enrolment = Enrolment::new(settings.data_dir.join(CLIENTS_FILE));
    if let Some(set) = enrolment.changed() {
        let _ = machine.handle(now(start), Input::Enrolled(set));
    }

    let (muts, will_topic, will) = machine.prepare_connect(now(start));
    store.apply(&muts)?;
    let session = Session {
        client_id: "printloop-supervisor".into(),
        clean_session: false,
        keepalive: settings.keepalive,
        queue: 4096,
        ..Session::default()
    };
    let (client, mut mqtt_rx, mqtt) = transport::connect(
        &broker_addr,
        &session,
        Some(LastWill::new(will_topic, will, QoS::AtLeastOnce, true)),
    )?;
    tracing::info!(broker = %format!("{}:{}", broker_addr.host, broker_addr.port), epoch = machine.epoch(), "connecting");

    // The file-chunk bulkhead: its own connection and its own thread (see `file_server`).
    let files = Arc::new(files);
    // Room for the windows of many gateways pulling at once (8 requests each by default).
    let (chunk_tx, chunk_rx) = mpsc::channel::<(PrinterId, FileChunkRequest)>(4096);
    file_server(
        &broker_addr,
        settings.keepalive,
        chunk_rx,
        files.clone(),
        topics.clone(),
    )?;

    // Metrics, and the HTTP server.
    let metrics = Arc::new(Metrics::new());
    let metrics_addr = match settings.metrics {
        Some(addr) => {
            let bound = crate::http::start_metrics(
                addr,
                settings.data_dir.clone(),
                files.clone(),
                metrics.clone(),
            )
            .await?;
            tracing::info!(%bound, "metrics at http://{bound}/metrics");
            Some(bound)
        }
        None => None,
    };
    let (http_shell, mut http_calls, http_addr) = match settings.http {
        Some(addr) => {
            let server = crate::http::start(
                &crate::http::HttpSettings {
                    addr,
                    data_dir: settings.data_dir.clone(),
                },
                files.clone(),
                metrics.clone(),
            )
            .await?;
            (Some(server.shell), Some(server.calls), Some(server.addr))
        }
        None => (None, None, None),
    };
    if let Some(ready) = ready {
        let _ = ready.send(Handle {
            broker: broker_addr.clone(),
            metrics: metrics_addr,
            http: http_addr,
        });
    }

    // Webhooks: delivered from the store's outbox by their own task.
    let outbox =
        crate::http::webhooks::start(settings.data_dir.clone(), store.clone()).map_err(|e| {
            RunError::DataDir {
                path: settings.data_dir.join(crate::http::webhooks::WEBHOOKS_FILE),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
    let (upload_tx, mut upload_rx) = mpsc::channel::<Input>(16);
    let uploads = Uploads::start(files.clone(), upload_tx);
    let mut shell = Shell {
        history_dir: settings.data_dir.join(crate::history::HISTORY_DIR),
        store,
        client,
        chunk_tx,
        uploads,
        pending: std::collections::VecDeque::new(),
        outgoing: Outgoing::default(),
        http: http_shell,
        outbox,
    };
    let mut refresh = tokio::time::interval(Duration::from_secs(1));
    // The dashboard's frame: as often as a stream may send one.
    let mut frame_every = tokio::time::interval(Duration::from_millis(
        1000 / crate::http::stream_frames_per_s(),
    ));
    frame_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // systemd (Type=notify): ready once the store is open, the broker (if embedded) serves and
    // the MQTT task runs; the watchdog is fed from a timer arm of this loop only
    // (transport::systemd), so a wedged loop is restarted.
    let systemd = transport::systemd::Systemd::from_env();
    systemd.ready("supervising");
    let mut feed = tokio::time::interval(systemd.feed_every());
    feed.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        // Everything waiting goes through the machine first; then one durable commit for all
        // of it, then the publishes. Batching the commits is what lets a thousand printers'
        // traffic through: one fsync per batch, not one per message.
        if !shell.pending.is_empty() {
            let inputs: Vec<Input> = shell.pending.drain(..).collect();
            let outs = machine.handle_batch(now(start), inputs);
            shell.execute(now(start), outs)?;
        }
        shell.outgoing.drain(&shell.client);
        let waiting = !shell.outgoing.is_empty();
        let deadline = machine
            .next_deadline()
            .map(|ms| start + Duration::from_millis(ms))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = &mut shutdown => break,
            ev = mqtt_rx.recv() => {
                let Some(ev) = ev else { break };
                // Take what else has arrived too (bounded), so it shares one commit.
                let mut batch = vec![ev];
                while batch.len() < MAX_BATCH {
                    match mqtt_rx.try_recv() {
                        Ok(ev) => batch.push(ev),
                        Err(_) => break,
                    }
                }
                for ev in batch {
                match ev {
                    MqttEvent::Connected { session_present } => {
                        tracing::info!(session_present, epoch = machine.epoch(), "connected to the broker");
                        shell.pending.push_back(Input::Connected);
                    }
                    MqttEvent::Message(p) => shell.pending.push_back(Input::Message { topic: p.topic, payload: p.payload.to_vec() }),
                    // Acknowledgements are not asked for.
                    MqttEvent::SubAck(_) | MqttEvent::PubAck | MqttEvent::PubComp => {}
                    MqttEvent::Down { error, refused, next_will } => {
                        if !refused {
                            tracing::warn!(%error, "broker connection lost");
                        }
                        let mut inputs: Vec<Input> = shell.pending.drain(..).collect();
                        inputs.push(Input::Disconnected);
                        let out = machine.handle_batch(now(start), inputs);
                        shell.execute(now(start), out)?;
                        let (muts, topic, will) = machine.prepare_connect(now(start));
                        shell.store.apply(&muts)?;
                        if let Some(next) = next_will {
                            let _ = next.send(LastWill::new(topic, will, QoS::AtLeastOnce, true));
                        }
                    }
                }
                }
            }
            Some(input) = upload_rx.recv() => shell.pending.push_back(input),
            Some(call) = async {
                match http_calls.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(h) = shell.http.as_mut() {
                    match h.accept(call) {
                        Ok(input) => shell.pending.push_back(input),
                        Err(query) => query.answer(&machine, now(start)),
                    }
                }
            }
            _ = frame_every.tick(), if shell.http.is_some() => {
                if let Some(h) = shell.http.as_mut() {
                    h.publish(&machine, now(start));
                }
            }
            _ = refresh.tick() => {
                if let Some(set) = enrolment.changed() {
                    shell.pending.push_back(Input::Enrolled(set));
                }
                let latencies = machine.take_dispatch_latencies();
                metrics.update(&machine, latencies);
            }
            _ = tokio::time::sleep_until(deadline.into()) => shell.pending.push_back(Input::Tick),
            _ = feed.tick() => systemd.feed(),
            // rumqttc's queue was full: try again shortly (its event loop is draining it).
            _ = tokio::time::sleep(OUTGOING_RETRY), if waiting => {}
        }
    }
    systemd.stopping();
    let bye = machine.goodbye(now(start));
    let _ = shell
        .client
        .try_publish(bye.topic, QoS::AtLeastOnce, true, bye.payload);
    let _ = tokio::time::timeout(Duration::from_secs(2), shell.client.disconnect()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), mqtt).await;
    // The file server ends with the shell's sender of chunk requests.
    tracing::info!("supervisor stopped");
    Ok(())
}

/// How soon a publish that found rumqttc's queue full is tried again.
const OUTGOING_RETRY: Duration = Duration::from_millis(5);

struct Shell {
    outgoing: Outgoing,
    /// Where ended jobs are archived.
    history_dir: PathBuf,
    store: Arc<Store>,
    outbox: crate::http::webhooks::Outbox,
    client: AsyncClient,
    chunk_tx: mpsc::Sender<(PrinterId, FileChunkRequest)>,
    uploads: Uploads,
    pending: std::collections::VecDeque<Input>,
    http: Option<crate::http::Shell>,
}

impl Shell {
    /// Carries out outputs: every `Persist` of the batch first, in one transaction (their
    /// order kept) with the webhook events the batch made, then the rest in order. A store
    /// failure stops the supervisor: it must not publish what it could not make durable.
    fn execute(&mut self, now: Now, outs: Vec<Output>) -> Result<(), RunError> {
        let notices: Vec<protocol::web::WebhookEvent> = outs
            .iter()
            .filter_map(|o| match o {
                Output::Notify(n) => Some(n.clone()),
                _ => None,
            })
            .collect();
        // Ended jobs leave the store in this batch: they are in the archive first.
        for o in &outs {
            if let Output::Archive(jobs) = o {
                crate::history::append(&self.history_dir, jobs).map_err(|source| {
                    RunError::DataDir {
                        path: self.history_dir.clone(),
                        source,
                    }
                })?;
            }
        }
        let events = self.outbox.enqueue(notices);
        let wake = !events.is_empty();
        let mut mutations: Vec<Mutation> = outs
            .iter()
            .filter_map(|o| match o {
                Output::Persist(m) => Some(m.iter().cloned()),
                _ => None,
            })
            .flatten()
            .collect();
        mutations.extend(events);
        self.store.apply(&mutations)?;
        if wake {
            self.outbox.wake();
        }
        for o in outs {
            match o {
                Output::Persist(_) | Output::Notify(_) | Output::Archive(_) => {}
                Output::Subscribe { filter, qos0 } => {
                    let qos = if qos0 {
                        QoS::AtMostOnce
                    } else {
                        QoS::AtLeastOnce
                    };
                    self.outgoing.subscribe(filter, qos);
                }
                Output::Publish(p) => self.outgoing.push(p.lane, p.topic, p.payload, p.retain),
                Output::ServeChunk { printer, request } => {
                    if self.chunk_tx.try_send((printer.clone(), request)).is_err() {
                        tracing::warn!(%printer, "file server busy: chunk request dropped (the gateway asks again)");
                    }
                }
                Output::Reply { client, response } => {
                    if let Some(h) = self.http.as_mut() {
                        h.reply(&client, response);
                    }
                }
                Output::StoreUpload { caller, id, chunk } => {
                    if let Some(refused) = self.uploads.store(caller, id, chunk, now.unix_ms) {
                        self.pending.push_back(refused);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Writes upload chunks off the loop, **in the order they came** for any one file: a client
/// sends a window of chunks, and two of them written by different threads could land out of
/// order (the file store takes only the next byte, and would answer the later one "gap").
/// A file is always handled by the same worker (picked by its digest); different files go in
/// parallel.
struct Uploads {
    workers: Vec<std::sync::mpsc::SyncSender<UploadWork>>,
}

/// Chunks waiting for one upload writer, at most (~6 MiB of base64): beyond it a chunk is
/// answered "busy" at once instead of piling up in memory behind a slow disk (many clients,
/// or one that ignores its answers).
const UPLOAD_QUEUE: usize = 64;

struct UploadWork {
    caller: crate::machine::Caller,
    id: protocol::CommandId,
    chunk: protocol::api::UploadChunk,
    at_ms: u64,
}

/// Upload writers (threads). Uploads are disk-bound: two keep a second one moving while the
/// first hashes a finished file.
const UPLOAD_WORKERS: usize = 2;

impl Uploads {
    fn start(files: Arc<FileStore>, answers: mpsc::Sender<Input>) -> Self {
        let workers = (0..UPLOAD_WORKERS)
            .map(|i| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<UploadWork>(UPLOAD_QUEUE);
                let (files, answers) = (files.clone(), answers.clone());
                std::thread::Builder::new()
                    .name(format!("upload-{i}"))
                    .spawn(move || {
                        while let Ok(w) = rx.recv() {
                            let outcome = store_upload(&files, &w.chunk, w.at_ms);
                            let done = Input::Uploaded {
                                caller: w.caller,
                                id: w.id,
                                outcome,
                            };
                            if answers.blocking_send(done).is_err() {
                                return; // the supervisor is stopping
                            }
                        }
                    })
                    .map(|_| tx)
            })
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_default();
        Self { workers }
    }

    /// Hands a chunk to its file's writer; when that cannot be done now, the refusal to answer
    /// the request with (it is never left unanswered).
    fn store(
        &self,
        caller: crate::machine::Caller,
        id: protocol::CommandId,
        chunk: protocol::api::UploadChunk,
        at_ms: u64,
    ) -> Option<Input> {
        let n = self.workers.len().max(1);
        let first = chunk.sha256.as_str().as_bytes().first().copied();
        let pick = usize::from(first.unwrap_or(0)) % n;
        let work = UploadWork {
            caller,
            id,
            chunk,
            at_ms,
        };
        let Some(tx) = self.workers.get(pick) else {
            tracing::error!("no upload writer could be started");
            return None;
        };
        let (w, reason) = match tx.try_send(work) {
            Ok(()) => return None,
            Err(std::sync::mpsc::TrySendError::Full(w)) => (
                w,
                "busy: the supervisor's upload writer is behind; send this chunk again",
            ),
            Err(std::sync::mpsc::TrySendError::Disconnected(w)) => {
                tracing::error!("upload writer gone");
                (w, "the supervisor cannot store uploads now")
            }
        };
        Some(Input::Uploaded {
            caller: w.caller,
            id: w.id,
            outcome: UploadOutcome::Failed(reason.into()),
        })
    }
}

fn store_upload(
    files: &FileStore,
    chunk: &protocol::api::UploadChunk,
    at_ms: u64,
) -> UploadOutcome {
    match protocol_data(&chunk.data_b64) {
        Err(e) => UploadOutcome::Failed(e),
        Ok(data) => {
            match files.upload_chunk(&chunk.sha256, chunk.offset, chunk.total_size, &data, at_ms) {
                Ok(p) => UploadOutcome::Progress {
                    received: p.received,
                    total_size: p.total_size,
                    complete: p.complete,
                },
                Err(e) => UploadOutcome::Failed(e.to_string()),
            }
        }
    }
}

fn protocol_data(b64: &str) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    if b64.len() > 96 * 1024 {
        return Err("upload chunk larger than 64 KiB".into());
    }
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("upload chunk is not valid base64: {e}"))
}

/// How much lower than the decisions' the file server's CPU priority is (a nice value).
const FILE_SERVER_NICENESS: i32 = 10;

/// Starts the file server on a thread of its own, at a lower CPU priority, with an MQTT
/// connection of its own (`printloop-supervisor-files`; clean and will-less: a chunk lost with
/// it is asked again by its gateway). Fifty gateways pulling at once ask for ~4 000 chunks a
/// second; read, hashed, encoded and published, they take the CPU the decisions need, and on
/// the decisions' connection they would queue megabytes ahead of a command (rumqttc's queue and
/// socket are first come, first served). Measured with 50 pullers beside 1 000 printing
/// (`docs/supervisor.md`, "Files at scale"). The thread ends when `requests` closes.
fn file_server(
    broker: &BrokerAddr,
    keepalive: Duration,
    requests: mpsc::Receiver<(PrinterId, FileChunkRequest)>,
    files: Arc<FileStore>,
    topics: Topics,
) -> Result<(), RunError> {
    let session = Session {
        client_id: "printloop-supervisor-files".into(),
        clean_session: true,
        keepalive,
        queue: 64,
        ..Session::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::FileServer)?;
    let span = tracing::Span::current();
    let broker = broker.clone();
    let started = std::thread::Builder::new()
        .name("printloop-files".into())
        .spawn(move || {
            let _entered = span.enter();
            lower_this_threads_priority(FILE_SERVER_NICENESS);
            rt.block_on(async move {
                let (client, mut events, _task) = match transport::connect(&broker, &session, None)
                {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(error = %e, "file server: cannot connect; no file is served");
                        return;
                    }
                };
                tokio::spawn(async move {
                    while let Some(ev) = events.recv().await {
                        if let MqttEvent::Down { error, .. } = ev {
                            tracing::debug!(%error, "file connection down (it reconnects)");
                        }
                    }
                });
                serve_chunks(requests, files, client, topics).await;
            });
        });
    started.map(|_| ()).map_err(RunError::FileServer)
}

/// Lowers the calling thread's CPU priority by `niceness` (Linux: the nice value is per
/// thread, and threads it starts inherit it). Never fails the caller: without it the server
/// only competes on equal terms.
#[allow(unsafe_code)]
pub fn lower_this_threads_priority(niceness: i32) {
    // SAFETY: `gettid` and `setpriority` take plain integers and touch no memory of ours;
    // raising one's own nice value needs no privilege.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, niceness)
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "file server: priority unchanged");
    }
}

/// File chunks read and published at once. Reading is a `pread` from the page cache and the
/// publish waits for room in the MQTT queue: a few in parallel keep a window of requests from
/// one gateway (or many gateways' windows) moving without one slow publish holding the rest.
const CHUNKS_AT_ONCE: usize = 8;

async fn serve_chunks(
    mut rx: mpsc::Receiver<(PrinterId, FileChunkRequest)>,
    files: Arc<FileStore>,
    client: AsyncClient,
    topics: Topics,
) {
    let mut serving = tokio::task::JoinSet::new();
    while let Some((printer, req)) = rx.recv().await {
        while serving.len() >= CHUNKS_AT_ONCE {
            let _ = serving.join_next().await;
        }
        let (files, client, topic) = (
            files.clone(),
            client.clone(),
            topics.format(&Topic::FileChunk(printer.clone())),
        );
        serving.spawn(async move {
            let resp = tokio::task::spawn_blocking(move || {
                match files.read_chunk(&req.sha256, req.offset, req.len) {
                    Ok((data, total)) => FileChunkResponse::chunk(
                        req.request_id,
                        req.sha256,
                        req.offset,
                        total,
                        &data,
                    ),
                    Err(e) => FileChunkResponse::Error {
                        v: protocol::Version,
                        request_id: req.request_id,
                        sha256: req.sha256,
                        code: e.chunk_code(),
                        message: e.to_string(),
                    },
                }
            })
            .await;
            let Ok(resp) = resp else { return };
            // Back-pressure here, not in the main loop: wait for room in the MQTT queue.
            if let Err(e) = client
                .publish(topic, QoS::AtLeastOnce, false, resp.encode())
                .await
            {
                tracing::warn!(%printer, error = %e, "file chunk not sent");
            }
        });
    }
}

/// Watches the client registry for the set of enrolled printers.
struct Enrolment {
    path: PathBuf,
    /// What the file looked like when last read (`None`: absent).
    seen: Option<Option<(std::time::SystemTime, u64)>>,
}

impl Enrolment {
    fn new(path: PathBuf) -> Self {
        Self { path, seen: None }
    }

    /// The enrolled printers, when the file changed since the last call (`Some(None)`: there
    /// is no registry). A file that cannot be read or parsed keeps the last good answer.
    fn changed(&mut self) -> Option<Option<BTreeSet<PrinterId>>> {
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len()));
        if self.seen == Some(stamp) {
            return None;
        }
        self.seen = Some(stamp);
        if stamp.is_none() {
            return Some(None);
        }
        match broker::clients::Clients::load(&self.path) {
            Ok(clients) => Some(Some(
                clients
                    .iter()
                    .filter(|c| c.role == broker::clients::Role::Gateway)
                    .filter_map(|c| PrinterId::new(c.user.as_str()).ok())
                    .collect(),
            )),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "client registry unreadable; keeping the printers enrolled before");
                None
            }
        }
    }
}
