//! Printer views: what the supervisor believes of each printer (presence, last state, the
//! pending start) and the pending-start bookkeeping. A view follows the printer's newest
//! `(epoch, seq)`, and recovers from a forged one (`Behind`).

use super::*;

/// How far a printer's clock may run behind the supervisor's when it judges a start
/// command's expiry: a start is only given up this long after it expired.
pub(super) const START_EXPIRY_SKEW_MS: u64 = 5_000;

#[derive(Debug, Clone)]
pub(super) struct PendingStart {
    pub(super) job: JobId,
    pub(super) command: CommandId,
    /// Earlier sends of the same start (retries replace `command`): an `ok` for any of them
    /// means the printer has the job.
    pub(super) earlier: Vec<CommandId>,
    pub(super) sent_mono: u64,
    /// When the command expires, by the printer's (wall) clock: what is persisted.
    pub(super) expires_unix: u64,
    /// The same instant on our monotonic clock: when the start is given up.
    pub(super) expires_mono: u64,
    /// The printer refused the latest send, at this `(epoch, at_ms)` of its own. The start is
    /// only given up once a report made after that says the printer does not have the job:
    /// an earlier send may have been accepted and the report saying so not be in yet.
    pub(super) refused: Option<(u64, u64)>,
    /// The printer answered the latest send `busy`: send it again at this instant.
    pub(super) busy_retry_mono: Option<u64>,
}

impl PendingStart {
    /// When a start still without a sign of life is sent again.
    pub(super) fn retry_at(&self, retry_ms: u64) -> u64 {
        self.busy_retry_mono.unwrap_or(self.sent_mono + retry_ms)
    }
}

#[derive(Debug, Clone)]
pub(super) struct PrinterView {
    pub(super) rec: PrinterRecord,
    pub(super) presence: Presence,
    pub(super) status_epoch: u64,
    pub(super) state: Option<StateSnapshot>,
    pub(super) last_state_mono: Option<u64>,
    pub(super) online_since_mono: u64,
    pub(super) last_event: (u64, u64),
    pub(super) stale: bool,
    pub(super) pending: Option<PendingStart>,
    pub(super) last_rebirth_mono: Option<u64>,
    pub(super) silent_since_mono: Option<u64>,
    /// Its last `meta` (names its Home Assistant device).
    pub(super) meta: Option<Meta>,
    /// A digest of the Home Assistant configs last published for it (none: not published).
    pub(super) ha_published: Option<u64>,
    /// In the client registry (or there is none): only then does it get work.
    pub(super) enrolled: bool,
    /// Its recent events, command results and presence changes (its dashboard page).
    pub(super) activity: super::dashboard::ActivityLog,
    /// Reports that contradict the marks above (a `state` not newer than the one held, or
    /// one of an epoch below an `offline` status): a stream of them is the live printer.
    pub(super) behind: Option<Behind>,
}

/// A stream of reports from below the supervisor's marks for a printer.
#[derive(Debug, Clone)]
pub(super) struct Behind {
    pub(super) epoch: u64,
    pub(super) seq: u64,
    pub(super) since_mono: u64,
    pub(super) count: u32,
}

/// Reports in a row, over at least one heartbeat, that make a stream below the marks the live
/// one. A lone old copy (a retained message from before a restart, a late redelivery) never
/// makes a stream: its `seq` does not go on increasing.
pub(super) const BEHIND_REPORTS: u32 = 3;

impl PrinterView {
    /// Counts `s` into the stream below the marks; true when that stream is the live printer.
    pub(super) fn behind_is_live(&mut self, s: &StateSnapshot, now: Now) -> bool {
        match &mut self.behind {
            Some(b) if b.epoch == s.epoch && s.seq > b.seq => {
                b.seq = s.seq;
                b.count += 1;
            }
            Some(b) if b.epoch == s.epoch && s.seq == b.seq => {}
            _ => {
                self.behind = Some(Behind {
                    epoch: s.epoch,
                    seq: s.seq,
                    since_mono: now.mono_ms,
                    count: 1,
                })
            }
        }
        let heartbeat_ms = u64::from(s.heartbeat_s.max(1)) * 1000;
        self.behind.as_ref().is_some_and(|b| {
            b.count >= BEHIND_REPORTS && now.mono_ms >= b.since_mono + heartbeat_ms
        })
    }

    pub(super) fn new(rec: PrinterRecord, now: Now) -> Self {
        // A start sent before a restart is still on its way as far as anyone knows: it is
        // retried (or expires) from now on, and the job is not moved meanwhile.
        let pending = rec.start_sent.as_ref().map(|s| PendingStart {
            job: s.job.clone(),
            command: s.command.clone(),
            earlier: Vec::new(),
            sent_mono: now.mono_ms,
            expires_unix: s.expires_at_ms,
            expires_mono: now.mono_ms + s.expires_at_ms.saturating_sub(now.unix_ms),
            refused: None,
            busy_retry_mono: None,
        });
        Self {
            rec,
            presence: Presence::Offline,
            status_epoch: 0,
            state: None,
            last_state_mono: None,
            online_since_mono: now.mono_ms,
            last_event: (0, 0),
            behind: None,
            stale: false,
            pending,
            last_rebirth_mono: None,
            silent_since_mono: Some(now.mono_ms),
            meta: None,
            ha_published: None,
            enrolled: true,
            activity: Default::default(),
        }
    }

    pub(super) fn phase(&self) -> Option<PrinterPhase> {
        self.state.as_ref().map(|s| s.phase)
    }

    pub(super) fn reachable(&self) -> bool {
        self.presence == Presence::Online && !self.stale && self.state.is_some()
    }

    pub(super) fn heartbeat_ms(&self) -> u64 {
        self.state
            .as_ref()
            .map_or(10_000, |s| u64::from(s.heartbeat_s.max(1)) * 1000)
    }
}
