//! The board's lifecycle and injected faults: reset (port open, reset fault) loses all state
//! but the counters and the heaters' temperatures; `kill()` (M112, thermal runaway) halts it
//! silent until the next reset; hang, checksum and garble knobs.
use std::time::Duration;

use super::stats::Progress;
use super::{Exec, Firmware, InputState, DEFAULT_FEEDRATE};
use crate::e_parser::EmergencyParser;

/// A fault to inject at run time (see also the rate setters on [`Firmware`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The main loop stops: nothing is answered, received bytes are discarded, the stepper
    /// interrupt keeps draining the planner. Cleared by [`Fault::Unhang`] or a reset.
    ///
    /// The serial receive interrupt still runs, so the emergency parser still sees every byte:
    /// an `M108` clears the heat-wait flag at once, but `M112` and `M410` only set flags that
    /// Marlin acts on in `idle()` (`Temperature::task()`), which a hung loop does not reach —
    /// they take effect at [`Fault::Unhang`] (and are forgotten by a reset).
    Hang,
    /// Ends a [`Fault::Hang`].
    Unhang,
    /// `Error:Thermal Runaway, system stopped! Heater_ID: 0`, then
    /// `Error:Printer halted. kill() called!`, then silence until a reset.
    ThermalRunaway,
    /// An unexpected reset (brown-out, watchdog): state lost, `start` banner again.
    Reset,
}

impl Firmware {
    /// Injects a fault at `now`.
    pub fn inject(&mut self, now: Duration, fault: Fault) {
        self.advance_to(now);
        match fault {
            Fault::Hang => self.hung = true,
            Fault::Unhang => {
                self.hung = false;
                // The loop's first idle() acts on what the parser flagged meanwhile.
                self.service_emergency();
            }
            Fault::ThermalRunaway => {
                if !self.halted && self.booting_until.is_none() {
                    self.emit("Error:Thermal Runaway, system stopped! Heater_ID: 0");
                    self.kill();
                }
            }
            Fault::Reset => self.reset(),
        }
    }

    /// Probability per numbered line of a corrupted arrival (checksum mismatch).
    pub fn set_checksum_error_rate(&mut self, rate: f64) {
        self.cfg.checksum_error_rate = rate.clamp(0.0, 1.0);
    }

    /// Line numbers whose next arrival is corrupted (each fires once).
    pub fn add_checksum_error_lines(&mut self, lines: &[u32]) {
        self.checksum_error_lines.extend_from_slice(lines);
    }

    /// Probability per output line of corrupted bytes.
    pub fn set_garble_rate(&mut self, rate: f64) {
        self.cfg.garble_rate = rate.clamp(0.0, 1.0);
    }

    pub(super) fn reset(&mut self) {
        let (now, f) = (self.now, self.motion_factor);
        self.stats.resets += 1;
        self.wire_out.clear(now);
        self.rx.clear();
        self.line.clear();
        self.input_state = InputState::Normal;
        self.last_n = 0;
        self.ring.clear();
        self.exec = Exec::Idle;
        self.planner.clear();
        self.head_end = None;
        self.hung = false;
        self.halted = false;
        self.e_parser = EmergencyParser::default();
        self.wait_for_heatup = false;
        self.pending_kill = None;
        self.pending_quickstop = None;
        self.quickstop_until = None;
        self.autoreport = None;
        self.hotend.switch_off(now, f);
        self.bed.switch_off(now, f);
        self.position = [0.0; 4];
        self.relative = false;
        self.relative_e = false;
        self.feedrate = DEFAULT_FEEDRATE;
        self.feed_percent = 100.0;
        self.fan = 0;
        self.stats.progress = Progress::default();
        if self.cfg.boot_time.is_zero() {
            self.booting_until = None;
            self.banner();
        } else {
            self.booting_until = Some(now + self.cfg.boot_time);
        }
    }

    pub(super) fn banner(&mut self) {
        for line in [
            "start",
            "echo:Marlin 2.1.2.1",
            "echo: Last Updated: 2023-07-12 | Author: (printloop-sim)",
            "echo: Compiled: Jul 12 2023",
            "echo: Free Memory: 4531  PlannerBufferBytes: 1232",
            "echo:V86 stored settings retrieved (662 bytes; crc 31585)",
        ] {
            self.emit(line);
        }
    }

    /// Marlin kill(): heaters and steppers off, then nothing until a reset.
    pub(super) fn kill(&mut self) {
        let (now, f) = (self.now, self.motion_factor);
        if !self.halted {
            self.emit("Error:Printer halted. kill() called!");
        }
        self.halted = true;
        self.hotend.switch_off(now, f);
        self.bed.switch_off(now, f);
        self.planner.clear();
        self.head_end = None;
        self.ring.clear();
        self.exec = Exec::Idle;
        self.autoreport = None;
        self.wait_for_heatup = false;
        self.pending_kill = None;
        self.pending_quickstop = None;
        self.quickstop_until = None;
    }
}
