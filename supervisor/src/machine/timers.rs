//! Timers: every deadline of the supervisor, declared once in a table from which both
//! `next_deadline` and `on_time` are derived. Each timer, when it fires, acts or moves its own
//! deadline on: a deadline is never due right after its tick (no busy loop).

use super::*;

/// Our retained status is re-asserted at most this often.
const STATUS_REASSERT_EVERY_MS: u64 = 1_000;

impl Supervisor {
    /// When `Tick` is due next (monotonic ms).
    pub fn next_deadline(&self) -> Option<u64> {
        let mut d: Option<u64> = None;
        let mut at = |t: u64| d = Some(d.map_or(t, |x: u64| x.min(t)));
        if let Some(t) = self.status_reassert_at().filter(|_| self.connected) {
            at(t);
        }
        if self.queue_dirty {
            at(self
                .last_queue_mono
                .map_or(0, |l| l + self.cfg.queue_min_interval_ms));
        }
        for p in self.printers.values() {
            if p.presence == Presence::Online && !p.stale {
                if let Some(last) = p.last_state_mono {
                    at(last + p.heartbeat_ms() * u64::from(self.cfg.stale_heartbeats) + 1);
                } else {
                    at(p.online_since_mono + self.cfg.rebirth_after_ms);
                }
            }
            if let Some(pending) = &p.pending {
                at(pending.retry_at(self.cfg.command_retry_ms));
            }
            if let Some(since) = p.silent_since_mono {
                if p.rec.assigned.is_some() {
                    at(since + self.cfg.step_timeout_ms);
                }
            }
        }
        if let Some(t) = self.ha_republish_mono {
            at(t);
        }
        if self.cfg.ha.enabled && self.connected && !self.ha_dirty.is_empty() {
            at(self.ha_round_mono.map_or(0, |t| t + HA_ROUND_MS));
        }
        d
    }

    /// A message on `supervisor/status`: our echo, or someone else's claim (a forged `offline`,
    /// a cleared topic). A contradiction is answered with our presence again, at most once a
    /// second.
    pub(super) fn on_own_status(&mut self, payload: &[u8]) {
        let ours = Status::decode(payload)
            .is_ok_and(|s| s.presence == Presence::Online && s.epoch == self.epoch);
        if self.connected && !ours && !self.status_reassert_due {
            tracing::warn!("a retained supervisor status contradicts ours (forged, or left by an old connection): publishing it again");
            self.status_reassert_due = true;
        }
    }

    pub(super) fn status_reassert_at(&self) -> Option<u64> {
        self.status_reassert_due.then(|| {
            self.status_reasserted_mono
                .map_or(0, |t| t + STATUS_REASSERT_EVERY_MS)
        })
    }

    pub(super) fn on_time(&mut self, now: Now, out: &mut Vec<Output>) {
        if self.connected && self.status_reassert_at().is_some_and(|t| now.mono_ms >= t) {
            self.status_reassert_due = false;
            self.status_reasserted_mono = Some(now.mono_ms);
            self.publish(
                out,
                self.topic(Topic::SupervisorStatus),
                Status::online(self.epoch, now.unix_ms).encode(),
                true,
            );
        }
        // Only printers with something due (a superset of what the body below acts on): this
        // runs after every message, so it must not clone every printer id each time.
        let ids: Vec<PrinterId> = self
            .printers
            .values()
            .filter(|p| {
                let stale_due = p.presence == Presence::Online
                    && !p.stale
                    && p.last_state_mono.is_some_and(|last| {
                        now.mono_ms > last + p.heartbeat_ms() * u64::from(self.cfg.stale_heartbeats)
                    });
                let rebirth_due = p.presence == Presence::Online
                    && p.state.as_ref().is_none_or(|s| s.epoch < p.status_epoch);
                let timeout_due = p.rec.assigned.is_some()
                    && p.silent_since_mono
                        .is_some_and(|since| now.mono_ms >= since + self.cfg.step_timeout_ms);
                stale_due || rebirth_due || timeout_due || p.pending.is_some()
            })
            .map(|p| p.rec.printer_id.clone())
            .collect();
        for id in ids {
            let stale_after = {
                let p = &self.printers[&id];
                p.heartbeat_ms() * u64::from(self.cfg.stale_heartbeats)
            };
            let p = self.printers.get_mut(&id).expect("listed");
            if p.presence == Presence::Online && !p.stale {
                if let Some(last) = p.last_state_mono {
                    if now.mono_ms > last + stale_after {
                        p.stale = true;
                        p.silent_since_mono.get_or_insert(now.mono_ms);
                        self.queue_dirty = true;
                        tracing::warn!(printer = %id, "printer stale: no state for {} ms", now.mono_ms - last);
                    }
                }
            }
            // Online without a state of this epoch: ask it to re-publish everything.
            let p = self.printers.get_mut(&id).expect("listed");
            let needs_rebirth = p.presence == Presence::Online
                && p.state.as_ref().is_none_or(|s| s.epoch < p.status_epoch)
                && now.mono_ms >= p.online_since_mono + self.cfg.rebirth_after_ms
                && p.last_rebirth_mono
                    .is_none_or(|l| now.mono_ms >= l + self.cfg.rebirth_after_ms * 4);
            if needs_rebirth && self.connected {
                p.last_rebirth_mono = Some(now.mono_ms);
                self.counters.rebirths += 1;
                tracing::info!(printer = %id, "views disagree: asking for a rebirth");
                self.send(
                    now,
                    &id,
                    CommandAction::Rebirth(Empty {}),
                    Some(60_000),
                    out,
                );
            }
            // Step timeout: flag the job of a printer silent too long (never move it).
            let p = &self.printers[&id];
            if let (Some(since), Some(job)) = (p.silent_since_mono, p.rec.assigned.clone()) {
                if now.mono_ms >= since + self.cfg.step_timeout_ms {
                    if let Some(j) = self.jobs.get_mut(&job) {
                        if active(j.state) && j.state != JobState::TimedOut {
                            j.state = JobState::TimedOut;
                            j.reason = Some(format!(
                                "no report from {id} for {} s; it may still be printing",
                                (now.mono_ms - since) / 1000
                            ));
                            tracing::error!(printer = %id, job = %job, "job timed out: flagged for an operator, not moved");
                            out.push(Output::Persist(vec![Mutation::PutJob(j.clone())]));
                            self.queue_dirty = true;
                        }
                    }
                }
            }
            // A start whose command expired without any answer: the job goes back to the queue
            // only if the printer never reported it (it cannot start any more: it expired).
            let p = &self.printers[&id];
            if let Some(pending) = p.pending.clone() {
                let shows = p.state.as_ref().is_some_and(|s| {
                    s.job.as_ref().is_some_and(|j| j.job_id == pending.job)
                        || s.recent_jobs.iter().any(|e| e.job_id == pending.job)
                });
                // The printer judges expiry by its own clock: allow for some skew.
                if !shows
                    && now.unix_ms > pending.expires_unix.saturating_add(START_EXPIRY_SKEW_MS)
                    && p.reachable()
                {
                    let p = self.printers.get_mut(&id).expect("listed");
                    p.pending = None;
                } else if now.mono_ms >= pending.retry_at(self.cfg.command_retry_ms) {
                    self.push_start(now, &id, out);
                }
            }
        }
    }
}
