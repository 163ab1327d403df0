//! Timers: every deadline of the gateway, declared once. [`Timer`] names each; `due` says when it
//! is due (or that it is not armed) and `fire` what it does, and both `next_deadline` and
//! `on_time` are derived from them. All on the monotonic clock, all only while connected.
//! Invariant: a timer that fires acts or moves its own deadline on (no busy loop).

use super::{Gateway, Now, Output};

/// Our retained topics are re-asserted at most this often (a client that keeps forging them
/// cannot make the gateway flood the broker; that client needs the ACL, `docs/broker.md`).
const REASSERT_EVERY_MS: u64 = 1_000;

/// One deadline of the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// Publish `state`: at once after connecting, then every heartbeat, and sooner (at most once
    /// per `state_min_interval_ms`) when it changed.
    State,
    /// Someone contradicted our retained status, meta or state: publish them again, at most
    /// once a second.
    Reassert,
    /// Events the broker has not echoed back after `outbox_resend_ms`: publish them again.
    Outbox,
    /// A file chunk asked for and not answered by its deadline: ask again (or give up).
    Chunk,
}

impl Timer {
    /// In firing order: `State` last, since what the others do (a transfer given up ends the
    /// job) changes the state, which then goes out in the same batch.
    const ALL: [Timer; 4] = [Timer::Chunk, Timer::Reassert, Timer::Outbox, Timer::State];
}

impl Gateway {
    /// When `t` is due (monotonic ms), `None` when it is not armed.
    fn due(&self, t: Timer) -> Option<u64> {
        if !self.connected {
            return None; // everything a timer does is a publish
        }
        match t {
            Timer::State => Some(match self.last_state_ms {
                None => 0,
                Some(last) if self.state_dirty => {
                    last + self
                        .cfg
                        .state_min_interval_ms()
                        .min(self.cfg.heartbeat_ms())
                }
                Some(last) => last + self.cfg.heartbeat_ms(),
            }),
            Timer::Reassert => self
                .reassert_due
                .then(|| self.reasserted_ms.map_or(0, |t| t + REASSERT_EVERY_MS)),
            Timer::Outbox => {
                (!self.outbox.is_empty()).then(|| self.outbox_sent_ms + self.cfg.outbox_resend_ms())
            }
            // Armed while chunks are asked for and not answered; every chunk that arrives
            // moves it (a long window on a slow link is not a timeout).
            Timer::Chunk => self
                .transfer
                .as_ref()
                .filter(|t| !t.in_flight.is_empty())
                .map(|t| t.deadline_ms),
        }
    }

    /// What `t` does when it is due.
    fn fire(&mut self, t: Timer, now: Now, out: &mut Vec<Output>) {
        match t {
            Timer::State => self.publish_state(now, out),
            Timer::Reassert => {
                self.reassert_due = false;
                self.reasserted_ms = Some(now.mono_ms);
                self.birth(now, out);
            }
            Timer::Outbox => {
                tracing::info!(
                    events = self.outbox.len(),
                    "events not echoed by the broker yet: publishing them again"
                );
                self.publish_outbox(now, out);
            }
            Timer::Chunk => self.on_chunk_timeout(now, out),
        }
    }

    /// When `handle(now, Tick)` should be called next (monotonic ms): the earliest armed timer.
    pub fn next_deadline(&self) -> Option<u64> {
        Timer::ALL.iter().filter_map(|&t| self.due(t)).min()
    }

    /// Fires every timer due at `now`, in [`Timer::ALL`]'s order.
    pub(super) fn on_time(&mut self, now: Now, out: &mut Vec<Output>) {
        for t in Timer::ALL {
            if self.due(t).is_some_and(|d| d <= now.mono_ms) {
                self.fire(t, now, out);
            }
        }
        debug_assert!(
            self.next_deadline().is_none_or(|d| d > now.mono_ms),
            "a timer is still due after on_time: {:?}",
            Timer::ALL.map(|t| (t, self.due(t)))
        );
    }
}
