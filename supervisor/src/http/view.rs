//! The frame: what the dashboard shows, read by every HTTP request and stream without touching
//! the machine. While anyone watches (a live stream, or a fleet request in the last seconds)
//! the loop gathers [`Views`] a few times a second (the queue board and history once a
//! second: they sort every job); a task apart from the loop serialises them. Each tile is
//! serialised once per change and numbered (`version`), so a stream sends only the tiles that
//! changed.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash as _, Hasher as _};
use std::sync::Arc;

use protocol::api::JobSummary;
use protocol::web::{FleetCounts, QueueView, Tile};
use protocol::PrinterId;

use crate::machine::{Now, Supervisor};

/// Jobs in the frame's `ended` list.
pub const ENDED_KEPT: usize = 50;

/// One printer's tile, serialised.
#[derive(Debug)]
pub struct TileEntry {
    /// The printer.
    pub printer_id: PrinterId,
    /// Its number (changes with the tile).
    pub version: u64,
    /// The tile as JSON.
    pub json: String,
}

/// Everything the dashboard shows, as of `at_ms`.
#[derive(Debug, Default)]
pub struct Frame {
    /// When it was built (Unix ms).
    pub at_ms: u64,
    /// Tiles by printer id.
    pub tiles: Vec<Arc<TileEntry>>,
    /// The summary line, as JSON.
    pub counts: String,
    /// The queue board, as JSON.
    pub queue: Arc<String>,
    /// Changes with the queue board.
    pub queue_version: u64,
    /// The last ended jobs, as JSON.
    pub ended: Arc<String>,
    /// Changes with `ended`.
    pub ended_version: u64,
}

impl Frame {
    /// `protocol::web::FleetView` as JSON.
    pub fn fleet_json(&self) -> String {
        let mut s = String::with_capacity(
            self.tiles.iter().map(|t| t.json.len() + 1).sum::<usize>() + 4096,
        );
        s.push_str("{\"at_ms\":");
        s.push_str(&self.at_ms.to_string());
        s.push_str(",\"printers\":[");
        for (i, t) in self.tiles.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&t.json);
        }
        s.push_str("],\"counts\":");
        s.push_str(self.counts_json());
        s.push_str(",\"queue\":");
        s.push_str(self.queue_json());
        s.push_str(",\"ended\":");
        s.push_str(self.ended_json());
        s.push('}');
        s
    }

    /// The counts (an empty frame has zeros).
    pub fn counts_json(&self) -> &str {
        if self.counts.is_empty() {
            EMPTY_COUNTS
        } else {
            &self.counts
        }
    }

    /// The queue board.
    pub fn queue_json(&self) -> &str {
        if self.queue.is_empty() {
            EMPTY_QUEUE
        } else {
            &self.queue
        }
    }

    /// The ended jobs.
    pub fn ended_json(&self) -> &str {
        if self.ended.is_empty() {
            "[]"
        } else {
            &self.ended
        }
    }
}

const EMPTY_COUNTS: &str = "{\"total\":0,\"printing\":0,\"paused\":0,\"idle\":0,\"awaiting_bed_clear\":0,\"error\":0,\"held\":0,\"offline\":0,\"stale\":0}";
const EMPTY_QUEUE: &str = "{\"counts\":{\"queued\":0,\"starting\":0,\"printing\":0,\"awaiting_harvest\":0,\"attention\":0},\"jobs\":[],\"truncated\":false}";

/// What the loop gathers from the machine for a frame (no serialising in the loop).
#[derive(Debug, Clone)]
pub struct Views {
    /// When (Unix ms).
    pub at_ms: u64,
    /// Every tile.
    pub tiles: Vec<Tile>,
    /// The queue board, when gathered this time.
    pub queue: Option<QueueView>,
    /// The last ended jobs, when gathered this time.
    pub ended: Option<Vec<JobSummary>>,
}

impl Views {
    /// Gathers from the machine; the lists only when `lists`.
    pub fn gather(sup: &Supervisor, now: Now, lists: bool) -> Views {
        Views {
            at_ms: now.unix_ms,
            tiles: sup.tiles(),
            queue: lists.then(|| sup.queue_view()),
            ended: lists.then(|| sup.ended_jobs(ENDED_KEPT)),
        }
    }
}

/// Builds frames, numbering changes.
#[derive(Debug, Default)]
pub struct Builder {
    /// Per printer: the digest of its tile without `version`, and its entry.
    tiles: HashMap<PrinterId, (u64, Arc<TileEntry>)>,
    next_version: u64,
    queue: (u64, u64, Arc<String>),
    ended: (u64, u64, Arc<String>),
}

fn digest(s: &str) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

impl Builder {
    fn next(&mut self) -> u64 {
        self.next_version += 1;
        self.next_version
    }

    /// The frame for `v` (lists not gathered this time keep their last rendering).
    pub fn build(&mut self, v: Views) -> Frame {
        let counts: FleetCounts = Supervisor::fleet_counts(&v.tiles);
        let mut entries = Vec::with_capacity(v.tiles.len());
        let mut seen = HashMap::with_capacity(v.tiles.len());
        for mut t in v.tiles {
            let plain = serde_json::to_string(&t).unwrap_or_default();
            let d = digest(&plain);
            let entry = match self.tiles.get(&t.printer_id) {
                Some((old, e)) if *old == d => e.clone(),
                _ => {
                    t.version = self.next();
                    Arc::new(TileEntry {
                        printer_id: t.printer_id.clone(),
                        version: t.version,
                        json: serde_json::to_string(&t).unwrap_or_default(),
                    })
                }
            };
            seen.insert(t.printer_id, (d, entry.clone()));
            entries.push(entry);
        }
        self.tiles = seen;
        if let Some(q) = v.queue {
            let queue = serde_json::to_string(&q).unwrap_or_default();
            let qd = digest(&queue);
            if qd != self.queue.0 || self.queue.1 == 0 {
                let n = self.next();
                self.queue = (qd, n, Arc::new(queue));
            }
        }
        if let Some(e) = v.ended {
            let ended = serde_json::to_string(&e).unwrap_or_default();
            let ed = digest(&ended);
            if ed != self.ended.0 || self.ended.1 == 0 {
                let n = self.next();
                self.ended = (ed, n, Arc::new(ended));
            }
        }
        Frame {
            at_ms: v.at_ms,
            tiles: entries,
            counts: serde_json::to_string(&counts).unwrap_or_default(),
            queue: self.queue.2.clone(),
            queue_version: self.queue.1,
            ended: self.ended.2.clone(),
            ended_version: self.ended.1,
        }
    }
}
