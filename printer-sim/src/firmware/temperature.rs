//! Temperature commands: the M109/M190 wait (held until the heater is within `TEMP_WINDOW`, or
//! an M108 clears `wait_for_heatup`) and the `T:… B:…` report line M105, M155 and waits print.
use std::time::Duration;

use super::{Firmware, Next, Wait};
use crate::gcode::Command;

/// M109/M190 print the temperatures this often while waiting.
pub(super) const WAIT_REPORT: Duration = Duration::from_secs(1);
/// Marlin `TEMP_WINDOW` / `TEMP_BED_WINDOW`.
pub(super) const TEMP_WINDOW: f64 = 1.0;

impl Firmware {
    pub(super) fn wait_heater(&mut self, cmd: &Command<'_>) -> Next {
        let bed = cmd.is('M', 190);
        let (value, from_above) = match (cmd.param('S'), cmd.param('R')) {
            (Some(s), _) => (s, false),
            (None, Some(r)) => (r, true),
            (None, None) => return Next::Ok,
        };
        let (now, f) = (self.now, self.motion_factor);
        let heater = if bed { &mut self.bed } else { &mut self.hotend };
        let target = heater.set_target(now, f, value);
        if target <= 0.0 || heater.reached(now, f, TEMP_WINDOW, from_above) {
            return Next::Ok;
        }
        let until = heater.reach_time(now, f, TEMP_WINDOW, from_above);
        self.wait_for_heatup = true;
        Next::Wait(Wait::Heat {
            bed,
            from_above,
            until,
            next_report: now + WAIT_REPORT,
        })
    }

    pub(super) fn temps_text(&self) -> String {
        let (now, f) = (self.now, self.motion_factor);
        format!(
            "T:{:.2} /{:.2} B:{:.2} /{:.2} @:{} B@:{}",
            self.hotend.temp_at(now, f),
            self.hotend.target(),
            self.bed.temp_at(now, f),
            self.bed.target(),
            self.hotend.power_at(now, f),
            self.bed.power_at(now, f)
        )
    }
}
