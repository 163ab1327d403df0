//! Timers: when `handle(now, Tick)` is due next and what falls due then (the `state` heartbeat,
//! re-asserting our retained topics, re-publishing the outbox, a chunk timeout). All on the
//! monotonic clock, and only while connected: `next_deadline` names each deadline `on_time` acts on.

use super::{Gateway, Now, Output};

/// Our retained topics are re-asserted at most this often (a client that keeps forging them
/// cannot make the gateway flood the broker; that client needs the ACL, `docs/broker.md`).
const REASSERT_EVERY_MS: u64 = 1_000;

impl Gateway {
    fn reassert_allowed(&self, now: Now) -> bool {
        self.reasserted_ms
            .is_none_or(|t| now.mono_ms >= t + REASSERT_EVERY_MS)
    }

    /// When `handle(now, Tick)` should be called next (monotonic ms).
    pub fn next_deadline(&self) -> Option<u64> {
        let mut d: Option<u64> = None;
        let mut at = |t: u64| d = Some(d.map_or(t, |x| x.min(t)));
        if self.connected {
            match self.last_state_ms {
                None => at(0),
                Some(last) => {
                    at(last + self.cfg.heartbeat_ms);
                    if self.state_dirty {
                        at(last + self.cfg.state_min_interval_ms);
                    }
                }
            }
            if let Some(t) = &self.transfer {
                if t.request_id.is_some() {
                    at(t.deadline_ms);
                }
            }
            if self.reassert_due {
                at(self.reasserted_ms.map_or(0, |t| t + REASSERT_EVERY_MS));
            }
            if !self.outbox.is_empty() {
                at(self.outbox_sent_ms + self.cfg.outbox_resend_ms);
            }
        }
        d
    }

    pub(super) fn on_time(&mut self, now: Now, out: &mut Vec<Output>) {
        if self.connected {
            let due = match self.last_state_ms {
                None => true,
                Some(last) => {
                    now.mono_ms >= last + self.cfg.heartbeat_ms
                        || (self.state_dirty
                            && now.mono_ms >= last + self.cfg.state_min_interval_ms)
                }
            };
            if due {
                self.publish_state(now, out);
            }
            if self.reassert_due && self.reassert_allowed(now) {
                self.reassert_due = false;
                self.reasserted_ms = Some(now.mono_ms);
                self.birth(now, out);
            }
            if !self.outbox.is_empty()
                && now.mono_ms >= self.outbox_sent_ms + self.cfg.outbox_resend_ms
            {
                tracing::info!(
                    events = self.outbox.len(),
                    "events not echoed by the broker yet: publishing them again"
                );
                self.publish_outbox(now, out);
            }
            let timed_out = self.transfer.as_ref().is_some_and(|t| {
                t.request_id.is_some() && !t.storing && now.mono_ms >= t.deadline_ms
            });
            if timed_out {
                self.on_chunk_timeout(now, out);
            }
        }
    }
}
