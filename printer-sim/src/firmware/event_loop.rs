//! Marlin's main loop as a discrete-event simulation: `advance_to` steps from event to event
//! (bytes arriving, planner blocks ending, timers); at each instant `run` reads serial only while
//! no command is executing, then runs or re-checks the head command until nothing changes.
use std::time::Duration;

use super::motion::Block;
use super::temperature::{TEMP_WINDOW, WAIT_REPORT};
use super::{min_opt, AfterSync, Exec, Firmware, Next, Wait};

/// Marlin `DEFAULT_KEEPALIVE_INTERVAL`.
const KEEPALIVE: Duration = Duration::from_secs(2);

impl Firmware {
    /// Earliest internal event (output delivery excluded).
    pub(super) fn next_event(&self) -> Option<Duration> {
        let mut t = min_opt(self.wire_in.next_arrival(), self.head_end);
        t = min_opt(t, self.booting_until);
        if self.hung || self.halted || self.booting_until.is_some() {
            return t;
        }
        t = min_opt(t, self.autoreport.map(|(_, next)| next));
        if let Some(until) = self.quickstop_until {
            // Only the keepalive of a command in progress goes on until the loop is released.
            t = min_opt(t, Some(until));
            if matches!(self.exec, Exec::Waiting(_)) {
                t = min_opt(t, Some(self.next_busy));
            }
            return t;
        }
        match &self.exec {
            Exec::Idle => {}
            Exec::Running { done_at } => t = min_opt(t, Some(*done_at)),
            Exec::Waiting(wait) => {
                t = min_opt(t, Some(self.next_busy));
                match wait {
                    Wait::Until { until, .. } => t = min_opt(t, Some(*until)),
                    Wait::Heat {
                        until, next_report, ..
                    } => t = min_opt(min_opt(t, *until), Some(*next_report)),
                    // These progress on planner events.
                    Wait::Planner(_) | Wait::Sync(_) => {}
                }
            }
        }
        t
    }

    pub(super) fn advance_to(&mut self, target: Duration) {
        let target = target.max(self.now);
        while let Some(t) = self.next_event() {
            if t > target {
                break;
            }
            self.now = t.max(self.now);
            self.step();
        }
        self.now = target;
    }

    /// Handles everything due at `self.now`.
    fn step(&mut self) {
        let now = self.now;
        // Blocks that end now are done before a byte arriving now can stop the head.
        while let Some(end) = self.head_end.filter(|e| *e <= now) {
            self.planner.pop_front();
            self.stats.moves_executed += 1;
            self.head_end = self.planner.front().map(|b| end + b.time);
        }
        while let Some((at, b)) = self.wire_in.pop_arrived(now) {
            self.on_byte(at, b);
        }
        if let Some(until) = self.booting_until {
            if until <= now {
                self.booting_until = None;
                self.banner();
            }
        }
        if self.hung || self.halted || self.booting_until.is_some() {
            return;
        }
        if self.quickstop_until.is_some_and(|t| t <= now) {
            self.quickstop_until = None;
        }
        self.service_emergency();
        if self.halted {
            return;
        }
        if let Some((interval, next)) = self.autoreport {
            if next <= now {
                let line = format!(" {}", self.temps_text());
                self.emit(&line);
                self.autoreport = Some((interval, now + interval));
            }
        }
        self.run();
    }

    /// Marlin's main loop at one instant: read serial while idle, run the head command, check
    /// what the running command waits for, until nothing changes.
    fn run(&mut self) {
        let now = self.now;
        loop {
            if self.halted || self.hung {
                return;
            }
            if self.in_quickstop() {
                // Inside quickstop_stepper()'s synchronize(): idle() keeps a command's host
                // keepalive going, nothing else moves on.
                if matches!(self.exec, Exec::Waiting(_)) && self.next_busy <= now {
                    self.emit("echo:busy: processing");
                    self.next_busy = now + KEEPALIVE;
                }
                return;
            }
            match std::mem::replace(&mut self.exec, Exec::Idle) {
                Exec::Idle => {
                    self.read_serial();
                    if self.halted || self.ring.is_empty() {
                        return;
                    }
                    self.exec = Exec::Running {
                        done_at: now + self.cfg.command_time,
                    };
                    self.next_busy = now + KEEPALIVE;
                }
                Exec::Running { done_at } if done_at <= now => match self.execute() {
                    Next::Ok => self.finish(true),
                    Next::NoOk => self.finish(false),
                    Next::Wait(w) => self.exec = Exec::Waiting(w),
                },
                Exec::Waiting(wait) => {
                    if self.next_busy <= now {
                        self.emit("echo:busy: processing");
                        self.next_busy = now + KEEPALIVE;
                    }
                    match self.check_wait(wait) {
                        Some(wait) => {
                            self.exec = Exec::Waiting(wait);
                            return;
                        }
                        None => self.finish(true),
                    }
                }
                other => {
                    self.exec = other;
                    return;
                }
            }
        }
    }

    /// `Some(wait)` while still waiting, `None` when the command is done.
    pub(super) fn check_wait(&mut self, wait: Wait) -> Option<Wait> {
        let now = self.now;
        match wait {
            Wait::Planner(mut segments) => {
                while let Some(seg) = segments.front().copied() {
                    if !self.plan(seg) {
                        break;
                    }
                    segments.pop_front();
                }
                (!segments.is_empty()).then_some(Wait::Planner(segments))
            }
            Wait::Sync(after) => {
                if !self.planner.is_empty() {
                    return Some(Wait::Sync(after));
                }
                match after {
                    AfterSync::Ok => None,
                    AfterSync::Dwell(d) => Some(Wait::Until {
                        until: now + d,
                        homing: false,
                    }),
                    AfterSync::Home(d) => Some(Wait::Until {
                        until: now + d,
                        homing: true,
                    }),
                }
            }
            Wait::Until { until, homing } => (until > now).then_some(Wait::Until { until, homing }),
            Wait::Heat {
                bed,
                from_above,
                until,
                mut next_report,
            } => {
                let f = self.motion_factor;
                let heater = if bed { &self.bed } else { &self.hotend };
                // An M108 (emergency parser) clears `wait_for_heatup`: the wait ends, ok follows.
                if !self.wait_for_heatup || heater.reached(now, f, TEMP_WINDOW, from_above) {
                    self.wait_for_heatup = false;
                    return None;
                }
                let until = match until {
                    Some(u) if u <= now => heater.reach_time(now, f, TEMP_WINDOW, from_above),
                    other => other,
                };
                if next_report <= now {
                    let line = format!(" {} W:?", self.temps_text());
                    self.emit(&line);
                    next_report = now + WAIT_REPORT;
                }
                Some(Wait::Heat {
                    bed,
                    from_above,
                    until,
                    next_report,
                })
            }
        }
    }

    /// Sends the ok for the head command (unless it printed its own) and removes it.
    fn finish(&mut self, ok: bool) {
        if ok {
            let line = if self.cfg.advanced_ok {
                let n = self
                    .ring
                    .front()
                    .and_then(|q| q.number)
                    .map(|n| format!(" N{n}"))
                    .unwrap_or_default();
                format!(
                    "ok{n} P{} B{}",
                    self.planner_free(),
                    self.cfg.bufsize.saturating_sub(self.ring.len())
                )
            } else {
                "ok".to_owned()
            };
            self.emit(&line);
        }
        self.ring.pop_front();
        self.stats.commands_executed += 1;
        self.exec = Exec::Idle;
    }

    fn planner_free(&self) -> usize {
        (self.cfg.planner_blocks - 1).saturating_sub(self.planner.len())
    }

    /// Puts one block into the planner if there is room.
    fn plan(&mut self, block: Block) -> bool {
        if self.planner_free() == 0 {
            return false;
        }
        if self.planner.is_empty() {
            self.head_end = Some(self.now + block.time);
        }
        self.planner.push_back(block);
        true
    }
}
