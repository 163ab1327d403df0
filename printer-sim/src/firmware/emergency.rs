//! What the firmware does about `M108`, `M112` and `M410`, caught by the emergency parser as the
//! bytes arrive or (parser off) by the serial reader. M108 acts in the interrupt; M112/M410 only at
//! the main loop's next `idle()`, never while it is hung or held by an M410. Each action is logged.
use std::fmt;
use std::time::Duration;

use super::{AfterSync, Exec, Firmware, Wait};
use crate::e_parser::EmergencyCommand;

/// Marlin's `quick_stop()` refuses new blocks for `TEMP_TIMER_FREQUENCY` ticks of its ~1 kHz
/// temperature interrupt, and `quickstop_stepper()` waits that out in `planner.synchronize()`
/// (`Planner::busy()` counts the window): every M410 holds the main loop for about a second.
/// A firmware timer, so `motion_speed` does not shorten it.
const QUICKSTOP_PAUSE: Duration = Duration::from_secs(1);
/// Emergency actions kept for [`Firmware::poll_emergency`]; beyond it the oldest are dropped.
const MAX_EMERGENCY_LOG: usize = 32;

/// An emergency command the firmware carried out: what [`Firmware::poll_emergency`] hands the
/// shell for its log, and [`Stats::last_emergency`](super::Stats::last_emergency).
#[derive(Debug, Clone, PartialEq)]
pub struct EmergencyAction {
    /// Core time at which the firmware acted.
    pub at: Duration,
    /// Core time at which the end of its line reached the board: earlier than `at` when the
    /// main loop was hung or held by an earlier M410 when it arrived.
    pub received: Duration,
    /// The command.
    pub command: EmergencyCommand,
    /// True: caught by the emergency parser as the bytes arrived. False: the parser is off and
    /// the main loop read the line (Marlin's early handling in `get_serial_commands`).
    pub by_parser: bool,
    /// What it did.
    pub effect: EmergencyEffect,
}

/// What an [`EmergencyAction`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum EmergencyEffect {
    /// `M108` ended the M109 (`bed == false`) or M190 wait in progress; the target stays.
    HeatWaitEnded {
        /// Whether it was the bed's wait.
        bed: bool,
        /// The heater's target, °C.
        target: f64,
    },
    /// `M108` while nothing waited for a temperature: no effect.
    NoHeatWait,
    /// `M112`: `kill()` — heaters off, planner dropped, steppers off, silent until a reset.
    Killed {
        /// Hotend target afterwards (0).
        hotend_target: f64,
        /// Bed target afterwards (0).
        bed_target: f64,
    },
    /// `M410`: the planner was dropped and the head stopped where it was.
    QuickStop {
        /// Where the head stopped (X Y Z E, mm).
        stopped_at: [f64; 4],
        /// Planner blocks thrown away (the one being executed included).
        dropped_blocks: usize,
    },
}

impl fmt::Display for EmergencyAction {
    /// One log line, e.g. `emergency parser: M112 at 12.345 s: heaters off (hotend target 0,
    /// bed target 0), motion stopped`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = if self.by_parser {
            "emergency parser"
        } else {
            "serial reader (no emergency parser)"
        };
        write!(
            f,
            "{source}: {} at {:.3} s: ",
            self.command.as_str(),
            self.at.as_secs_f64()
        )?;
        match &self.effect {
            EmergencyEffect::HeatWaitEnded { bed, target } => {
                let (wait, heater) = if *bed {
                    ("M190", "bed")
                } else {
                    ("M109", "hotend")
                };
                write!(f, "{wait} wait ended ({heater} target {target} stays)")?;
            }
            EmergencyEffect::NoHeatWait => write!(f, "no heat wait to cancel")?,
            EmergencyEffect::Killed {
                hotend_target,
                bed_target,
            } => write!(
                f,
                "heaters off (hotend target {hotend_target}, bed target {bed_target}), motion \
                 stopped, halted until reset"
            )?,
            EmergencyEffect::QuickStop {
                stopped_at: [x, y, z, e],
                dropped_blocks,
            } => write!(
                f,
                "motion stopped at X:{x:.3} Y:{y:.3} Z:{z:.3} E:{e:.3}, {dropped_blocks} planner \
                 blocks dropped"
            )?,
        }
        if self.received != self.at {
            write!(
                f,
                " (line received at {:.3} s)",
                self.received.as_secs_f64()
            )?;
        }
        Ok(())
    }
}

impl Firmware {
    /// Whether the main loop is held in `quickstop_stepper()` after an M410.
    pub(super) fn in_quickstop(&self) -> bool {
        self.quickstop_until.is_some_and(|t| t > self.now)
    }

    /// The emergency parser recognised `cmd` in a line whose end arrived at `at`: what Marlin's
    /// receive interrupt does (`EmergencyParser::update`), then, for M112 and M410, what the
    /// main loop's next `idle()` does with the flags (`Temperature::task()`).
    pub(super) fn emergency_parsed(&mut self, at: Duration, cmd: EmergencyCommand) {
        match cmd {
            EmergencyCommand::M108 => {
                self.stats.emergency_m108 += 1;
                // `wait_for_heatup = wait_for_user = false`, right in the interrupt: a running
                // M109/M190 wait ends the next time its loop looks (at once unless hung).
                let effect = match &self.exec {
                    Exec::Waiting(Wait::Heat { bed, .. }) if self.wait_for_heatup => {
                        let heater = if *bed { &self.bed } else { &self.hotend };
                        EmergencyEffect::HeatWaitEnded {
                            bed: *bed,
                            target: heater.target(),
                        }
                    }
                    _ => EmergencyEffect::NoHeatWait,
                };
                self.wait_for_heatup = false;
                self.log_emergency(at, cmd, true, effect);
            }
            EmergencyCommand::M112 => {
                self.stats.emergency_m112 += 1;
                self.pending_kill.get_or_insert(at);
            }
            EmergencyCommand::M410 => {
                self.stats.emergency_m410 += 1;
                self.pending_quickstop.get_or_insert(at);
            }
        }
        self.service_emergency();
    }

    /// Marlin `Temperature::task()`'s emergency part, run from every `idle()`: kill on a
    /// flagged M112, quick stop on a flagged M410. Not while the loop is hung, and not while it
    /// sits in an earlier M410's `quickstop_stepper()` (the task does not re-enter itself).
    pub(super) fn service_emergency(&mut self) {
        if self.hung || self.halted || self.booting_until.is_some() || self.in_quickstop() {
            return;
        }
        if let Some(received) = self.pending_kill.take() {
            self.kill();
            self.log_kill(received, true);
        } else if let Some(received) = self.pending_quickstop.take() {
            let effect = self.quickstop();
            self.log_emergency(received, EmergencyCommand::M410, true, effect);
        }
    }

    pub(super) fn log_kill(&mut self, received: Duration, by_parser: bool) {
        let effect = EmergencyEffect::Killed {
            hotend_target: self.hotend.target(),
            bed_target: self.bed.target(),
        };
        self.log_emergency(received, EmergencyCommand::M112, by_parser, effect);
    }

    pub(super) fn log_emergency(
        &mut self,
        received: Duration,
        command: EmergencyCommand,
        by_parser: bool,
        effect: EmergencyEffect,
    ) {
        let action = EmergencyAction {
            at: self.now,
            received,
            command,
            by_parser,
            effect,
        };
        if self.emergency_log.len() >= MAX_EMERGENCY_LOG {
            self.emergency_log.pop_front();
        }
        self.emergency_log.push_back(action.clone());
        self.stats.last_emergency = Some(action);
    }

    /// Marlin `quickstop_stepper()`: `planner.quick_stop()` drops every block and stops the
    /// steppers where they are; `planner.synchronize()` then holds the main loop for the
    /// cleaning window (QUICKSTOP_PAUSE); finally the position is taken from the steppers.
    ///
    /// A move that was waiting for a planner slot is not dropped: its `buffer_line()` gets the
    /// slot once `quickstop_stepper()` returns (the cleaning window is over by then), so it runs
    /// from where the head stopped to its own target — which stays the logical position, as
    /// in Marlin's `prepare_line_to_destination()`.
    pub(super) fn quickstop(&mut self) -> EmergencyEffect {
        let dropped_blocks = self.planner.len();
        let stopped = self.head_position();
        self.planner.clear();
        self.head_end = None;
        if let Some(at) = stopped {
            match &mut self.exec {
                Exec::Waiting(Wait::Planner(segments)) => {
                    if let Some(first) = segments.front_mut() {
                        *first = first.rebased(at);
                    }
                }
                // G28 defines the position itself once the planner is empty.
                Exec::Waiting(Wait::Sync(AfterSync::Home(_))) => {}
                _ => self.position = at,
            }
        }
        self.quickstop_until = Some(self.now + QUICKSTOP_PAUSE);
        EmergencyEffect::QuickStop {
            stopped_at: stopped.unwrap_or(self.position),
            dropped_blocks,
        }
    }

    /// Where the head is now, if a block is being executed.
    fn head_position(&self) -> Option<[f64; 4]> {
        let block = self.planner.front()?;
        let end = self.head_end?;
        let total = block.time.as_secs_f64();
        let left = end.saturating_sub(self.now).as_secs_f64();
        let fraction = if total > 0.0 { 1.0 - left / total } else { 1.0 };
        Some(block.at(fraction))
    }
}
