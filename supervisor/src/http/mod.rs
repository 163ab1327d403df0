//! The supervisor's HTTP server (`docs/http.md`): the operator's dashboard (`/`), the REST API
//! (`/api/v1/…`), slicer uploads in OctoPrint's dialect (`/api/version`, `/api/files/local`),
//! the live stream and `/metrics`.
//!
//! It never touches the machine. Operations go to the supervisor's loop as [`Call`]s and come
//! back as the machine's answers (the same code, rate limits, idempotency and refusals as the
//! MQTT API); reads come from a [`Frame`] the loop renders a few times a second, or from a
//! [`Query`] the loop answers between batches.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use protocol::api::ApiResponse;
use protocol::web::{History, PrinterDetail};
use protocol::{ClientId, CommandId, PrinterId};
use tokio::sync::{mpsc, oneshot, watch};

use crate::files::FileStore;
use crate::machine::{Input, Now, Supervisor};

mod assets;
mod auth;
mod errors;
pub mod metrics;
mod octoprint;
pub mod openapi;
pub mod registry;
mod rest;
mod stream;
pub mod tokens;
mod upload;
pub mod view;
pub mod webhooks;

pub use view::Frame;

/// Most frames a second a live stream sends (the loop renders frames this often).
pub fn stream_frames_per_s() -> u64 {
    stream::FRAMES_PER_S
}

/// Tiles gathered a second, at most, for the live streams (see [`Shell::publish`]).
pub const TILES_PER_S: u64 = 4_000;

/// How often a frame is gathered for a fleet of `printers` (ms): as often as a stream may send
/// one, or less often for a large fleet.
pub fn frame_every_ms(printers: usize) -> u64 {
    let fastest = 1000 / stream_frames_per_s();
    (printers as u64 * 1000 / TILES_PER_S).max(fastest)
}

/// How long a request waits for the loop's answer before it is told the supervisor is busy.
const ANSWER_WITHIN: Duration = Duration::from_secs(15);

/// Something the loop must do for an HTTP request.
#[derive(Debug)]
pub enum Call {
    /// Hand `input` to the machine and send its answer for `(client, id)` to `reply`.
    Machine {
        /// `Input::Http` or `Input::Uploaded`.
        input: Input,
        /// Whose.
        client: ClientId,
        /// The request id.
        id: CommandId,
        /// Where the answer goes.
        reply: oneshot::Sender<ApiResponse>,
    },
    /// Read something from the machine.
    Query(Query),
}

/// Reads the loop answers between batches.
#[derive(Debug)]
pub enum Query {
    /// A printer's page.
    Printer(PrinterId, oneshot::Sender<Option<PrinterDetail>>),
    /// Ended jobs and per-printer use.
    History(usize, oneshot::Sender<History>),
}

impl Query {
    /// Answers from the machine.
    pub fn answer(self, sup: &Supervisor, now: Now) {
        match self {
            Query::Printer(id, reply) => {
                let detail = sup.printer_tile(&id).map(|tile| PrinterDetail {
                    tile,
                    events: sup.printer_activity(&id),
                    jobs: sup.printer_jobs(&id, 50),
                });
                let _ = reply.send(detail);
            }
            Query::History(limit, reply) => {
                let _ = reply.send(History {
                    jobs: sup.ended_jobs(limit),
                    utilisation: sup.utilisation(now.unix_ms),
                });
            }
        }
    }
}

/// The loop's side: waiting HTTP requests, and the views it gathers for frames.
pub struct Shell {
    waiting: HashMap<(ClientId, CommandId), Vec<oneshot::Sender<ApiResponse>>>,
    views: watch::Sender<Option<view::Views>>,
    watchers: Arc<Watchers>,
    lists_at: Option<u64>,
    gathered_at: Option<u64>,
}

/// Who looks at frames: open live streams, and when a fleet view was last asked for.
#[derive(Debug, Default)]
pub(crate) struct Watchers {
    streams: AtomicUsize,
    asked_ms: AtomicU64,
}

impl Watchers {
    /// Whether frames are wanted at `now_ms` (a fleet request keeps them coming 10 s).
    fn wanted(&self, now_ms: u64) -> bool {
        self.streams.load(Ordering::Relaxed) > 0
            || now_ms.saturating_sub(self.asked_ms.load(Ordering::Relaxed)) < 10_000
    }
}

/// An open live stream (counted while it lives).
pub(crate) struct Watching(Arc<Watchers>);

impl Watching {
    pub(crate) fn new(w: &Arc<Watchers>) -> Self {
        w.streams.fetch_add(1, Ordering::Relaxed);
        Watching(w.clone())
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shell {
    /// Registers a call's waiter and returns the machine's input (`None` for a query, which
    /// the caller answers with [`Query::answer`]).
    pub fn accept(&mut self, call: Call) -> Result<Input, Query> {
        match call {
            Call::Machine {
                input,
                client,
                id,
                reply,
            } => {
                self.waiting.entry((client, id)).or_default().push(reply);
                Ok(input)
            }
            Call::Query(q) => Err(q),
        }
    }

    /// The machine answered an HTTP request.
    pub fn reply(&mut self, client: &ClientId, response: ApiResponse) {
        if let Some(waiters) = self.waiting.remove(&(client.clone(), response.id.clone())) {
            for w in waiters {
                let _ = w.send(response.clone());
            }
        }
        // Requests whose handlers gave up (a closed browser) are forgotten here too.
        self.waiting
            .retain(|_, ws| ws.iter().any(|w| !w.is_closed()));
    }

    /// Gathers the views for a new frame, when anyone watches (the lists once a second).
    ///
    /// A frame gathers every printer's tile on the loop, and its rendering reads them all: the
    /// pace is kept to [`TILES_PER_S`] tiles a second, so up to 1 000 printers get every frame
    /// (4 a second) and 10 000 one every 2.5 s. Measured at 10 000 printers with 10 streams,
    /// 4 frames a second took dispatch p99 from 9 ms to 7.7 s (issue #13).
    pub fn publish(&mut self, sup: &Supervisor, now: Now) {
        if !self.watchers.wanted(now.unix_ms) {
            self.lists_at = None;
            self.gathered_at = None;
            return;
        }
        let every = frame_every_ms(sup.printer_count());
        if self.gathered_at.is_some_and(|at| now.unix_ms < at + every) {
            return;
        }
        self.gathered_at = Some(now.unix_ms);
        let lists = self
            .lists_at
            .is_none_or(|at| now.unix_ms >= at + every.max(1000));
        if lists {
            self.lists_at = Some(now.unix_ms);
        }
        self.views
            .send_replace(Some(view::Views::gather(sup, now, lists)));
    }
}

/// Serialises views into frames, apart from the loop.
async fn render(
    mut views: watch::Receiver<Option<view::Views>>,
    frames: watch::Sender<Arc<Frame>>,
) {
    let mut builder = view::Builder::default();
    while views.changed().await.is_ok() {
        let Some(v) = views.borrow_and_update().clone() else {
            continue;
        };
        let frame = builder.build(v);
        frames.send_replace(Arc::new(frame));
    }
}

/// What the server needs.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Where to listen.
    pub addr: SocketAddr,
    /// The data directory (`tokens.toml`).
    pub data_dir: PathBuf,
}

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address cannot be bound.
    #[error("HTTP listener {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The token file is unusable.
    #[error(transparent)]
    Tokens(#[from] tokens::TokensError),
}

/// Shared by every handler.
#[derive(Clone)]
pub(crate) struct App {
    calls: mpsc::Sender<Call>,
    frames: watch::Receiver<Arc<Frame>>,
    watchers: Arc<Watchers>,
    tokens: Arc<tokens::Tokens>,
    files: Arc<FileStore>,
    metrics: Arc<metrics::Metrics>,
    /// The data directory (`webhooks.toml`).
    data_dir: PathBuf,
    /// The listener is on a loopback address (then `/metrics` needs no token).
    loopback: bool,
}

/// A running server.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The loop's side.
    pub shell: Shell,
    /// Calls from handlers, for the loop.
    pub calls: mpsc::Receiver<Call>,
}

/// The loop's side and the handlers' side of one frame channel, for a loop that serves
/// `/metrics` only (no dashboard).
fn frames() -> (watch::Sender<Arc<Frame>>, watch::Receiver<Arc<Frame>>) {
    watch::channel(Arc::new(Frame::default()))
}

/// Binds and starts the server. It runs until the process ends.
pub async fn start(
    settings: &HttpSettings,
    files: Arc<FileStore>,
    metrics: Arc<metrics::Metrics>,
) -> Result<Server, HttpError> {
    let tokens = Arc::new(tokens::Tokens::open(
        settings.data_dir.join(tokens::TOKENS_FILE),
    )?);
    let listener = tokio::net::TcpListener::bind(settings.addr)
        .await
        .map_err(|source| HttpError::Bind {
            addr: settings.addr,
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(settings.addr);
    if !addr.ip().is_loopback() && !tokens.any() {
        tracing::warn!(%addr, path = %tokens.path().display(), "the HTTP server listens beyond loopback and no API token exists yet: every request is refused until `printloop tokens add` makes one");
    }
    let (calls_tx, calls_rx) = mpsc::channel(1024);
    let (frames_tx, frames_rx) = frames();
    let (views_tx, views_rx) = watch::channel(None);
    tokio::spawn(render(views_rx, frames_tx));
    let watchers = Arc::new(Watchers::default());
    let app = App {
        calls: calls_tx,
        frames: frames_rx,
        watchers: watchers.clone(),
        tokens,
        files,
        metrics,
        data_dir: settings.data_dir.clone(),
        loopback: addr.ip().is_loopback(),
    };
    let router = router(app);
    tokio::spawn(async move {
        let service = router.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(listener, service).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    tracing::info!(%addr, "dashboard and API at http://{addr}/");
    Ok(Server {
        addr,
        shell: Shell {
            waiting: HashMap::new(),
            views: views_tx,
            watchers,
            lists_at: None,
            gathered_at: None,
        },
        calls: calls_rx,
    })
}

/// Serves `/metrics` alone on `addr` (the `[metrics] listen` address).
pub async fn start_metrics(
    addr: SocketAddr,
    data_dir: PathBuf,
    files: Arc<FileStore>,
    metrics: Arc<metrics::Metrics>,
) -> Result<SocketAddr, HttpError> {
    let tokens = Arc::new(tokens::Tokens::open(data_dir.join(tokens::TOKENS_FILE))?);
    let data_dir = data_dir.clone();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    let (calls, _) = mpsc::channel(1);
    let app = App {
        calls,
        frames: frames().1,
        watchers: Arc::new(Watchers::default()),
        tokens,
        files,
        metrics,
        data_dir,
        loopback: bound.ip().is_loopback(),
    };
    let router = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics::serve))
        .fallback(errors::not_found)
        .with_state(app);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}

fn router(app: App) -> axum::Router {
    use axum::extract::DefaultBodyLimit;
    use axum::routing::{get, post, put};
    axum::Router::new()
        .route("/", get(assets::index))
        .route("/app.js", get(assets::script))
        .route("/app.css", get(assets::style))
        .route("/favicon.ico", get(assets::favicon))
        .route("/metrics", get(metrics::serve))
        .route(
            "/api/v1/session",
            get(auth::whoami).post(auth::sign_in).delete(auth::sign_out),
        )
        .route("/api/v1/openapi.json", get(openapi::serve))
        .route("/api/v1/fleet", get(rest::fleet))
        .route("/api/v1/stream", get(stream::serve))
        .route("/api/v1/printers", get(rest::list_printers))
        .route(
            "/api/v1/printers/:printer_id",
            get(rest::printer).delete(rest::forget),
        )
        .route(
            "/api/v1/printers/:printer_id/bed-clear",
            post(rest::bed_clear),
        )
        .route("/api/v1/printers/:printer_id/pause", post(rest::pause))
        .route("/api/v1/printers/:printer_id/resume", post(rest::resume))
        .route("/api/v1/printers/:printer_id/release", post(rest::release))
        .route("/api/v1/jobs", get(rest::list_jobs).post(rest::submit))
        .route("/api/v1/jobs/:job_id/cancel", post(rest::cancel))
        .route("/api/v1/jobs/:job_id/requeue", post(rest::requeue))
        .route("/api/v1/jobs/:job_id/priority", put(rest::priority))
        .route("/api/v1/history", get(rest::history))
        .route("/api/v1/history.csv", get(rest::history_csv))
        .route(
            "/api/v1/files/:sha256",
            get(upload::status)
                .put(upload::chunk)
                .layer(DefaultBodyLimit::max(upload::MAX_CHUNK)),
        )
        .route(
            "/api/v1/webhooks",
            get(webhooks::list).post(webhooks::create),
        )
        .route(
            "/api/v1/webhooks/:id",
            axum::routing::delete(webhooks::delete),
        )
        .route("/api/version", get(octoprint::version))
        // The slicer's file streams to disk with its own limit (the file store's).
        .route(
            "/api/files/local",
            post(octoprint::upload).layer(DefaultBodyLimit::disable()),
        )
        .fallback(errors::not_found)
        .layer(DefaultBodyLimit::max(upload::MAX_JSON))
        .layer(axum::middleware::from_fn(assets::security_headers))
        .with_state(app)
}

#[cfg(test)]
mod pace_tests {
    use super::frame_every_ms;

    #[test]
    fn frames_slow_down_for_large_fleets_only() {
        assert_eq!(frame_every_ms(0), 250);
        assert_eq!(frame_every_ms(1_000), 250);
        assert_eq!(frame_every_ms(2_000), 500);
        assert_eq!(frame_every_ms(10_000), 2_500);
    }
}
