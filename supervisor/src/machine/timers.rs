//! Timers: every deadline of the supervisor, declared once. [`Timer`] names each one; `due` says
//! when it is due (or that it is not armed) and `fire` what it does, side by side, and both
//! `next_deadline` and `on_time` are derived from them. Invariant: a timer that fires acts or
//! moves its own deadline on, so a deadline is never due right after its tick (no busy loop);
//! `on_time` checks it in debug builds. A timer is armed only while its action can act: one
//! whose action waits for something else (the broker, a report) waits for that input instead.

use super::*;

/// Our retained status is re-asserted at most this often.
const STATUS_REASSERT_EVERY_MS: u64 = 1_000;

/// One deadline of the supervisor. Fleet timers are one each; printer timers one per printer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    /// Someone contradicted our retained `supervisor/status`: publish it again, at most once
    /// a second.
    StatusReassert,
    /// A printer online, not yet stale, sent no `state` for `stale_heartbeats` of its
    /// heartbeats: it is stale (unreachable; its job is not moved).
    Stale,
    /// A printer online without a `state` of its current epoch, or without a `meta`, for
    /// `rebirth_after_ms`: ask it to publish everything again (then at most every
    /// 4 × `rebirth_after_ms`, and at most `REBIRTHS_PER_S` a second fleet-wide).
    Rebirth,
    /// A printer silent for `step_timeout_ms` with an active job: the job is flagged
    /// `timed_out` for an operator, never moved.
    StepTimeout,
    /// A start command expired (plus the clock skew allowance) on a reachable printer that
    /// never showed the job: the start is given up, the job can go elsewhere.
    StartExpiry,
    /// A start with no sign of life after `command_retry_ms` (or the wait a `busy` answer
    /// asked for), on a ready printer: send it again, with a new command id.
    StartRetry,
    /// The queue changed: publish its snapshot, at most once per `queue_min_interval_ms`.
    Queue,
    /// Home Assistant came online: after a jitter, every discovery config is due again.
    HaRepublish,
    /// The fleet device's discovery configs are due.
    HaFleet,
    /// Printers' discovery configs are due: one bounded round per `HA_ROUND_MS`.
    HaRound,
    /// Ended jobs beyond the retention are archived (every `HISTORY_EVERY_MS`).
    History,
}

/// Rebirth requests sent per second, fleet-wide, at most. After a broker restart every printer
/// whose state has not come back may need one at once, and each answer is a full birth (status,
/// meta, state): a hundred a second re-reads 10 000 printers in under two minutes without
/// flooding the supervisor, the broker, or the farm's Wi-Fi. (Most printers never need one:
/// their own reconnect publishes a birth.)
pub(super) const REBIRTHS_PER_S: u32 = 100;

impl Timer {
    /// Fired before dispatch: what frees or flags printers and jobs.
    pub(super) const BEFORE_DISPATCH: &'static [Timer] = &[
        Timer::StatusReassert,
        Timer::Stale,
        Timer::Rebirth,
        Timer::StepTimeout,
        Timer::StartExpiry,
        Timer::StartRetry,
    ];
    /// Fired after dispatch: publications of what the batch changed.
    pub(super) const AFTER_DISPATCH: &'static [Timer] = &[
        Timer::Queue,
        Timer::HaRepublish,
        Timer::HaFleet,
        Timer::HaRound,
        Timer::History,
    ];

    fn per_printer(self) -> bool {
        matches!(
            self,
            Timer::Stale
                | Timer::Rebirth
                | Timer::StepTimeout
                | Timer::StartExpiry
                | Timer::StartRetry
        )
    }
}

impl Supervisor {
    /// When a fleet timer is due (monotonic ms), `None` when it is not armed.
    fn fleet_due(&self, t: Timer) -> Option<u64> {
        if t == Timer::History {
            // Retention publishes nothing: it runs connected or not.
            return Some(
                self.history_checked_mono
                    .map_or(0, |t| t + super::history::HISTORY_EVERY_MS),
            );
        }
        if !self.connected {
            return None; // everything a fleet timer does is a publish
        }
        let ha = self.cfg.ha.enabled;
        match t {
            Timer::StatusReassert => self.status_reassert_due.then(|| {
                self.status_reasserted_mono
                    .map_or(0, |t| t + STATUS_REASSERT_EVERY_MS)
            }),
            Timer::Queue => self.queue_dirty.then(|| {
                self.last_queue_mono
                    .map_or(0, |l| l + self.cfg.queue_min_interval_ms())
            }),
            Timer::HaRepublish => self.ha_republish_mono.filter(|_| ha),
            Timer::HaFleet => (ha && self.ha_fleet_dirty).then_some(0),
            Timer::HaRound => (ha && !self.ha_dirty.is_empty())
                .then(|| self.ha_round_mono.map_or(0, |t| t + HA_ROUND_MS)),
            _ => None,
        }
    }

    /// When a printer timer is due for `p` (monotonic ms), `None` when it is not armed.
    fn printer_due(&self, p: &PrinterView, t: Timer) -> Option<u64> {
        let online = p.presence == Presence::Online;
        match t {
            Timer::Stale => p
                .last_state_mono
                .filter(|_| online && !p.stale)
                .map(|last| last + p.heartbeat_ms() * u64::from(self.cfg.stale_heartbeats) + 1),
            Timer::Rebirth => {
                // No `meta` either counts: a broker that sends no retained messages to
                // wildcard subscriptions (RabbitMQ) never delivers it to a supervisor that
                // started after the printer's birth, and without it Home Assistant gets no
                // device for the printer.
                let behind =
                    p.state.as_ref().is_none_or(|s| s.epoch < p.status_epoch) || p.meta.is_none();
                (self.connected && online && behind).then(|| {
                    let after = self.cfg.rebirth_after_ms();
                    let first = p.online_since_mono + after;
                    let own = p
                        .last_rebirth_mono
                        .map_or(first, |l| first.max(l + after * 4));
                    // Paced fleet-wide: this second's rebirths are spent, the next second's.
                    if self.rebirths_in_slot >= REBIRTHS_PER_S {
                        own.max(self.rebirth_slot_mono + 1_000)
                    } else {
                        own
                    }
                })
            }
            Timer::StepTimeout => {
                let since = p.silent_since_mono?;
                let job = self.jobs.get(p.rec.assigned.as_ref()?)?;
                (active(job.state) && job.state != JobState::TimedOut)
                    .then(|| since + self.cfg.step_timeout_ms())
            }
            Timer::StartExpiry => {
                let pending = p.pending.as_ref()?;
                let shows = p.state.as_ref().is_some_and(|s| {
                    s.job.as_ref().is_some_and(|j| j.job_id == pending.job)
                        || s.recent_jobs.iter().any(|e| e.job_id == pending.job)
                });
                // The printer judges expiry by its own clock: allow for some skew.
                (p.reachable() && !shows).then(|| pending.expires_mono + START_EXPIRY_SKEW_MS + 1)
            }
            Timer::StartRetry => {
                let pending = p.pending.as_ref()?;
                let job = self.jobs.get(p.rec.assigned.as_ref()?)?;
                // What `push_start` needs to send.
                (self.connected
                    && job.state == JobState::Assigned
                    && p.reachable()
                    && p.phase() == Some(PrinterPhase::Ready))
                .then(|| pending.retry_at(self.cfg.command_retry_ms()))
            }
            _ => None,
        }
    }

    /// What a fleet timer does when it is due.
    fn fire_fleet(&mut self, t: Timer, now: Now, out: &mut Vec<Output>) {
        match t {
            Timer::StatusReassert => {
                self.status_reassert_due = false;
                self.status_reasserted_mono = Some(now.mono_ms);
                self.publish(
                    out,
                    self.topic(Topic::SupervisorStatus),
                    Status::online(self.epoch, now.unix_ms).encode(),
                    true,
                );
            }
            Timer::Queue => self.publish_queue(now, out),
            Timer::HaRepublish => self.ha_republish(),
            Timer::HaFleet => self.ha_publish_fleet(out),
            Timer::HaRound => self.ha_round(now, out),
            Timer::History => self.prune_history(now, out),
            _ => {}
        }
    }

    /// What a printer timer does when it is due for printer `id`.
    fn fire_printer(&mut self, id: &PrinterId, t: Timer, now: Now, out: &mut Vec<Output>) {
        match t {
            Timer::Stale => {
                let p = self.printers.get_mut(id).expect("listed");
                p.stale = true;
                p.silent_since_mono.get_or_insert(now.mono_ms);
                self.queue_dirty = true;
                let last = p.last_state_mono.unwrap_or(now.mono_ms);
                tracing::warn!(printer = %id, "printer stale: no state for {} ms", now.mono_ms - last);
            }
            Timer::Rebirth => {
                if now.mono_ms >= self.rebirth_slot_mono + 1_000 {
                    (self.rebirth_slot_mono, self.rebirths_in_slot) = (now.mono_ms, 0);
                }
                self.rebirths_in_slot += 1;
                let p = self.printers.get_mut(id).expect("listed");
                p.last_rebirth_mono = Some(now.mono_ms);
                self.counters.rebirths += 1;
                tracing::info!(printer = %id, "views disagree: asking for a rebirth");
                self.send(now, id, CommandAction::Rebirth(Empty {}), Some(60_000), out);
            }
            Timer::StepTimeout => {
                let p = &self.printers[id];
                let (Some(since), Some(job)) = (p.silent_since_mono, p.rec.assigned.clone()) else {
                    return;
                };
                if let Some(j) = self.jobs.get_mut(&job) {
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
            Timer::StartExpiry => {
                let p = self.printers.get_mut(id).expect("listed");
                if let Some(pending) = p.pending.take() {
                    tracing::info!(printer = %id, job = %pending.job, "start expired unanswered: given up");
                }
            }
            Timer::StartRetry => self.push_start(now, id, out),
            _ => {}
        }
    }

    /// When `Tick` is due next (monotonic ms): the earliest armed timer. The shell asks after
    /// every wake-up, and the answer scans the fleet: it is kept until the machine changes
    /// (`handle_batch` and `prepare_connect` forget it).
    pub fn next_deadline(&self) -> Option<u64> {
        if let Some(known) = self.deadline_cache.get() {
            return known;
        }
        let next = if self.indexes_current() {
            // The timer index (`index`): no fleet scan.
            let next = self
                .fleet_next_due()
                .into_iter()
                .chain(self.first_printer_due())
                .min();
            debug_assert_eq!(next, self.compute_next_deadline(), "the timer index");
            next
        } else {
            self.compute_next_deadline()
        };
        self.deadline_cache.set(Some(next));
        next
    }

    fn fleet_next_due(&self) -> Option<u64> {
        Timer::BEFORE_DISPATCH
            .iter()
            .chain(Timer::AFTER_DISPATCH)
            .filter(|t| !t.per_printer())
            .filter_map(|&t| self.fleet_due(t))
            .min()
    }

    fn compute_next_deadline(&self) -> Option<u64> {
        let printers = self
            .printers
            .values()
            .filter_map(|p| self.printer_timer_due(p));
        self.fleet_next_due().into_iter().chain(printers).min()
    }

    /// When the first of printer `p`'s timers is due (monotonic ms), `None` when none is armed.
    pub(super) fn printer_timer_due(&self, p: &PrinterView) -> Option<u64> {
        Timer::BEFORE_DISPATCH
            .iter()
            .filter(|t| t.per_printer())
            .filter_map(|&t| self.printer_due(p, t))
            .min()
    }

    /// Fires every timer of `timers` that is due at `now`, in the order listed.
    pub(super) fn on_time(&mut self, now: Now, timers: &[Timer], out: &mut Vec<Output>) {
        let is_due = |d: Option<u64>| d.is_some_and(|d| d <= now.mono_ms);
        for &t in timers.iter().filter(|t| !t.per_printer()) {
            if is_due(self.fleet_due(t)) {
                self.fire_fleet(t, now, out);
                debug_assert!(
                    !is_due(self.fleet_due(t)),
                    "{t:?} is still due after firing"
                );
            }
        }
        let per_printer: Vec<Timer> = timers.iter().copied().filter(|t| t.per_printer()).collect();
        if per_printer.is_empty() {
            return;
        }
        // This runs after every batch: the timer index names the printers with something due
        // (`index`), and each is checked exactly.
        self.refresh_indexes();
        let due: Vec<PrinterId> = self
            .printers_due(now.mono_ms)
            .into_iter()
            .filter(|id| {
                self.printers
                    .get(id)
                    .is_some_and(|p| per_printer.iter().any(|&t| is_due(self.printer_due(p, t))))
            })
            .collect();
        #[cfg(debug_assertions)]
        {
            let scanned: Vec<PrinterId> = self
                .printers
                .values()
                .filter(|p| per_printer.iter().any(|&t| is_due(self.printer_due(p, t))))
                .map(|p| p.rec.printer_id.clone())
                .collect();
            assert_eq!(
                due, scanned,
                "printers due by the timer index and by a scan"
            );
        }
        for id in due {
            for &t in &per_printer {
                let Some(p) = self.printers.get(&id) else {
                    break;
                };
                if is_due(self.printer_due(p, t)) {
                    self.fire_printer(&id, t, now, out);
                    debug_assert!(
                        self.printers
                            .get(&id)
                            .is_none_or(|p| !is_due(self.printer_due(p, t))),
                        "{t:?} of {id} is still due after firing"
                    );
                }
            }
        }
    }

    /// A message on `supervisor/status`: our echo, or someone else's claim (a forged `offline`,
    /// a cleared topic). A contradiction is answered with our presence again (timer
    /// `StatusReassert`).
    pub(super) fn on_own_status(&mut self, payload: &[u8]) {
        let ours = Status::decode(payload)
            .is_ok_and(|s| s.presence == Presence::Online && s.epoch == self.epoch);
        if self.connected && !ours && !self.status_reassert_due {
            tracing::warn!("a retained supervisor status contradicts ours (forged, or left by an old connection): publishing it again");
            self.status_reassert_due = true;
        }
    }
}
