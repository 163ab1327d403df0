//! What the web dashboard reads (`protocol::web`): a tile per printer, the fleet's counts, the
//! queue board, history and per-printer use, and each printer's recent activity. Read-only
//! views of the machine; the HTTP shell renders them on its own schedule.

use std::collections::VecDeque;

use protocol::web::{Activity, FleetCounts, QueueView, Tile, TileJob, Utilisation};

use super::*;

/// Entries kept in a printer's activity log (its page shows them; 10 000 printers keep
/// 20 each).
pub(super) const ACTIVITY_KEPT: usize = 20;
/// Longest activity text kept (a gateway's error message can be long).
const ACTIVITY_TEXT: usize = 200;
/// Jobs on the queue board.
const QUEUE_BOARD: usize = 200;
/// The utilisation window.
pub const UTILISATION_WINDOW_MS: u64 = 24 * 3600 * 1000;

/// A printer's recent activity, newest last.
#[derive(Debug, Clone, Default)]
pub(super) struct ActivityLog(VecDeque<Activity>);

impl ActivityLog {
    pub(super) fn push(&mut self, at_ms: u64, kind: &str, text: String) {
        if self.0.len() == ACTIVITY_KEPT {
            self.0.pop_front();
        }
        let mut text = text;
        if text.len() > ACTIVITY_TEXT {
            let mut cut = ACTIVITY_TEXT;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        self.0.push_back(Activity {
            at_ms,
            kind: kind.to_owned(),
            text,
        });
    }
}

/// An event in a few words: its kind and its fields' values (`job_ended j-000003 finished`).
pub(super) fn describe<T: serde::Serialize>(tag: &str, value: &T) -> String {
    let Ok(serde_json::Value::Object(map)) = serde_json::to_value(value) else {
        return tag.to_owned();
    };
    let mut words: Vec<String> = Vec::new();
    if let Some(serde_json::Value::String(k)) = map.get(tag) {
        words.push(k.clone());
    }
    for (k, v) in &map {
        if k == tag {
            continue;
        }
        match v {
            serde_json::Value::Null => {}
            serde_json::Value::String(s) => words.push(s.clone()),
            other => words.push(format!("{k}={other}")),
        }
    }
    words.join(" ")
}

impl Supervisor {
    /// Every printer's tile, by id (`version` is left 0: the shell numbers changes).
    pub fn tiles(&self) -> Vec<Tile> {
        self.printers.values().map(|p| self.tile(p)).collect()
    }

    fn tile(&self, p: &PrinterView) -> Tile {
        let s = p.state.as_ref();
        let phase = p.phase().unwrap_or(PrinterPhase::Disconnected);
        let job = s.and_then(|s| s.job.as_ref()).map(|j| TileJob {
            job_id: j.job_id.clone(),
            name: self
                .jobs
                .get(&j.job_id)
                .map_or_else(|| j.name.clone(), |r| r.name.clone()),
            stage: j.stage,
            // Rounded for the screen, so a tile changes (and a stream sends it) when what a
            // person sees changes: whole percents, whole degrees, minutes of time left.
            progress_pct: j.progress_pct.clamp(0.0, 100.0).floor(),
            remaining_s: j.remaining_s.map(|r| {
                if r >= 60 {
                    (r + 30) / 60 * 60
                } else {
                    (r + 5) / 10 * 10
                }
            }),
            started_at_ms: j.started_at_ms,
        });
        Tile {
            printer_id: p.rec.printer_id.clone(),
            presence: p.presence,
            stale: p.stale,
            phase,
            held: p.rec.held,
            enrolled: p.enrolled,
            maintenance: s.is_some_and(|s| s.maintenance),
            awaiting_bed_clear: s.is_some_and(|s| {
                !s.bed_clear
                    && matches!(
                        s.phase,
                        PrinterPhase::Idle | PrinterPhase::Finished | PrinterPhase::Error
                    )
            }),
            tags: p.rec.tags.clone(),
            job,
            temps: s.and_then(|s| s.temps).map(|mut t| {
                for h in [&mut t.nozzle, &mut t.bed] {
                    h.actual = h.actual.round();
                    h.target = h.target.round();
                }
                t
            }),
            error: s.and_then(|s| s.error.clone()),
            consecutive_failures: p.rec.consecutive_failures,
            version: 0,
        }
    }

    /// One printer's tile, if it is known.
    pub fn printer_tile(&self, id: &PrinterId) -> Option<Tile> {
        self.printers.get(id).map(|p| self.tile(p))
    }

    /// One printer's recent activity, newest first.
    pub fn printer_activity(&self, id: &PrinterId) -> Vec<Activity> {
        self.printers
            .get(id)
            .map(|p| p.activity.0.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    /// One printer's jobs, newest first.
    pub fn printer_jobs(&self, id: &PrinterId, limit: usize) -> Vec<JobSummary> {
        let mut jobs: Vec<&JobRecord> = self
            .jobs
            .values()
            .filter(|j| j.printer.as_ref() == Some(id))
            .collect();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.seq));
        jobs.into_iter().take(limit).map(summary).collect()
    }

    /// The summary line over `tiles`.
    pub fn fleet_counts(tiles: &[Tile]) -> FleetCounts {
        let mut c = FleetCounts {
            total: tiles.len() as u32,
            ..FleetCounts::default()
        };
        for t in tiles {
            let online = t.presence == Presence::Online;
            match t.phase {
                PrinterPhase::Printing | PrinterPhase::Preparing if online => c.printing += 1,
                PrinterPhase::Paused if online => c.paused += 1,
                PrinterPhase::Idle | PrinterPhase::Ready if online && !t.awaiting_bed_clear => {
                    c.idle += 1
                }
                PrinterPhase::Error | PrinterPhase::Halted => c.error += 1,
                _ => {}
            }
            c.awaiting_bed_clear += u32::from(t.awaiting_bed_clear);
            c.held += u32::from(t.held);
            c.offline += u32::from(!online);
            c.stale += u32::from(online && t.stale);
        }
        c
    }

    /// The queue board: active and queued jobs in dispatch order.
    pub fn queue_view(&self) -> QueueView {
        let snap = self.api_list(&ListJobs {
            include_ended: false,
            limit: Some(QUEUE_BOARD as u32 + 1),
        });
        let ApiResult::Jobs { mut jobs } = snap else {
            unreachable!("api_list answers jobs")
        };
        let truncated = jobs.len() > QUEUE_BOARD;
        jobs.truncate(QUEUE_BOARD);
        QueueView {
            counts: self.queue_counts(),
            jobs,
            truncated,
        }
    }

    /// Ended jobs (done, failed, cancelled, interrupted, timed out, finished), newest first.
    pub fn ended_jobs(&self, limit: usize) -> Vec<JobSummary> {
        let mut ended: Vec<&JobRecord> = self
            .jobs
            .values()
            .filter(|j| j.ended_at_ms.is_some() || !j.is_open())
            .collect();
        first_sorted(&mut ended, limit, |j| {
            std::cmp::Reverse((j.ended_at_ms.unwrap_or(j.submitted_at_ms), j.seq))
        });
        ended.into_iter().map(summary).collect()
    }

    /// Each printer's use over the window before `now_ms` (24 hours, or since the printer
    /// was first seen when that is later): jobs finished and failed, and time spent printing
    /// (a job's start to its end, or to now while it prints, cut to the window).
    pub fn utilisation(&self, now_ms: u64) -> Vec<Utilisation> {
        let day = now_ms.saturating_sub(UTILISATION_WINDOW_MS);
        let mut by: BTreeMap<&PrinterId, (u64, Utilisation)> = self
            .printers
            .iter()
            .map(|(id, p)| {
                let since = day.max(p.rec.first_seen_ms.min(now_ms));
                (
                    id,
                    (
                        since,
                        Utilisation {
                            printer_id: id.clone(),
                            jobs_finished: 0,
                            jobs_failed: 0,
                            printing_s: 0,
                            window_s: ((now_ms - since) / 1000).max(1),
                            utilisation_pct: 0.0,
                        },
                    ),
                )
            })
            .collect();
        for j in self.jobs.values() {
            let (Some(printer), Some(start)) = (j.printer.as_ref(), j.started_at_ms) else {
                continue;
            };
            let Some((since, u)) = by.get_mut(printer) else {
                continue;
            };
            let since = *since;
            let end = j.ended_at_ms.unwrap_or(now_ms).min(now_ms);
            if end < since {
                continue;
            }
            u.printing_s += end.saturating_sub(start.max(since)) / 1000;
            if j.ended_at_ms.is_some() {
                match j.state {
                    JobState::Finished | JobState::Done => u.jobs_finished += 1,
                    JobState::Failed | JobState::Interrupted | JobState::TimedOut => {
                        u.jobs_failed += 1
                    }
                    _ => {}
                }
            }
        }
        by.into_values()
            .map(|(_, mut u)| {
                u.printing_s = u.printing_s.min(u.window_s);
                u.utilisation_pct =
                    (u.printing_s as f64 * 1000.0 / u.window_s as f64).round() / 10.0;
                u
            })
            .collect()
    }
}
