//! `GET /api/v1/stream`: the dashboard's live feed (Server-Sent Events).
//!
//! The first event is the whole `fleet`; after it, `tiles` carries only the tiles whose
//! version changed (and the printers removed), `queue` and `history` only when those changed.
//! Frames are coalesced: a connection gets at most [`FRAMES_PER_S`] a second whatever the
//! fleet size or its rate of change, so a thousand busy printers cost a browser a few small
//! frames a second; the queue board and history, which change with every start and end, at
//! most once a second. EventSource reconnects by itself; a new connection starts with `fleet`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt as _};
use protocol::PrinterId;
use tokio::sync::watch;

use super::auth::Viewer;
use super::errors::HttpError;
use super::view::Frame;
use super::App;

/// Most frames a second per connection.
pub const FRAMES_PER_S: u64 = 4;
/// The queue board and history (up to 200 and 50 jobs) go at most this often: they change
/// with every start and end in a busy farm.
const LISTS_EVERY: Duration = Duration::from_secs(1);
/// A comment this often keeps proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Live streams the server holds at once (each holds a little memory and a socket; a wall of
/// screens needs tens).
pub const MAX_STREAMS: usize = 256;
/// How soon a browser reconnects after losing the stream.
const RETRY: Duration = Duration::from_secs(2);

struct Conn {
    rx: watch::Receiver<Arc<Frame>>,
    _watching: super::Watching,
    first: bool,
    sent: HashMap<PrinterId, u64>,
    queue_version: u64,
    ended_version: u64,
    lists_sent: Option<tokio::time::Instant>,
}

impl Conn {
    fn full(&mut self, f: &Frame) -> Vec<Event> {
        self.sent = f
            .tiles
            .iter()
            .map(|t| (t.printer_id.clone(), t.version))
            .collect();
        self.queue_version = f.queue_version;
        self.ended_version = f.ended_version;
        vec![Event::default()
            .event("fleet")
            .retry(RETRY)
            .data(f.fleet_json())]
    }

    fn diff(&mut self, f: &Frame) -> Vec<Event> {
        let mut out = Vec::new();
        let mut changed = String::new();
        let mut present = HashMap::with_capacity(f.tiles.len());
        for t in &f.tiles {
            if self.sent.get(&t.printer_id) != Some(&t.version) {
                if !changed.is_empty() {
                    changed.push(',');
                }
                changed.push_str(&t.json);
            }
            present.insert(t.printer_id.clone(), t.version);
        }
        let removed: Vec<&PrinterId> = self
            .sent
            .keys()
            .filter(|id| !present.contains_key(*id))
            .collect();
        if !changed.is_empty() || !removed.is_empty() {
            let removed = serde_json::to_string(&removed).unwrap_or_else(|_| "[]".into());
            out.push(Event::default().event("tiles").data(format!(
                "{{\"at_ms\":{},\"printers\":[{changed}],\"removed\":{removed},\"counts\":{}}}",
                f.at_ms,
                f.counts_json()
            )));
        }
        self.sent = present;
        if self.lists_sent.is_some_and(|at| at.elapsed() < LISTS_EVERY) {
            return out;
        }
        let before = out.len();
        if f.queue_version != self.queue_version {
            self.queue_version = f.queue_version;
            out.push(Event::default().event("queue").data(f.queue_json()));
        }
        if f.ended_version != self.ended_version {
            self.ended_version = f.ended_version;
            out.push(
                Event::default()
                    .event("history")
                    .data(format!("{{\"ended\":{}}}", f.ended_json())),
            );
        }
        if out.len() > before {
            self.lists_sent = Some(tokio::time::Instant::now());
        }
        out
    }
}

/// The stream of one connection.
pub(crate) fn events(
    rx: watch::Receiver<Arc<Frame>>,
    watching: super::Watching,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let conn = Conn {
        rx,
        _watching: watching,
        first: true,
        sent: HashMap::new(),
        queue_version: 0,
        ended_version: 0,
        lists_sent: None,
    };
    stream::unfold(conn, |mut c| async move {
        if c.first {
            // Frames start when the first viewer comes: wait for one made for it.
            let _ = tokio::time::timeout(Duration::from_secs(2), fresh(&mut c.rx)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(1000 / FRAMES_PER_S)).await;
            // The server's frames stopped (it is stopping): end the stream.
            c.rx.changed().await.ok()?;
        }
        let frame = c.rx.borrow_and_update().clone();
        let events = if c.first {
            c.first = false;
            c.full(&frame)
        } else {
            c.diff(&frame)
        };
        Some((stream::iter(events.into_iter().map(Ok)), c))
    })
    .flatten()
}

/// `GET /api/v1/stream`.
pub(crate) async fn serve(
    State(app): State<App>,
    Viewer(_): Viewer,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, HttpError> {
    if app
        .watchers
        .streams
        .load(std::sync::atomic::Ordering::Relaxed)
        >= MAX_STREAMS
    {
        return Err(HttpError::http(
            protocol::web::HttpErrorCode::Unavailable,
            format!("{MAX_STREAMS} live streams are open already; try again later"),
        ));
    }
    let watching = super::Watching::new(&app.watchers);
    Ok(Sse::new(events(app.frames.clone(), watching))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// Waits until the frame is at most a second old, or one frame interval for a large fleet
/// ([`super::frame_every_ms`]); the loop gathers one within a quarter second of being asked.
pub(crate) async fn fresh(rx: &mut watch::Receiver<Arc<Frame>>) {
    loop {
        // As fresh as the frames come: a large fleet's are gathered less often (at 10 000
        // printers every 2.5 s), and a new browser waited up to that long for the next one.
        let (at, printers) = {
            let f = rx.borrow();
            (f.at_ms, f.tiles.len())
        };
        let within = super::frame_every_ms(printers).max(1000);
        if super::upload::unix_ms().saturating_sub(at) <= within {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
