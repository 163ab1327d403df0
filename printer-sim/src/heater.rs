//! First-order heater model: full power drives the temperature exponentially towards a
//! ceiling, an off heater lets it decay towards ambient, and regulation holds the target
//! exactly (no overshoot, no PID ripple). Closed form, so the core can compute when a target
//! is reached instead of stepping.
use std::time::Duration;

/// Physical constants of one heater.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct HeaterSpec {
    /// Temperature full power would settle at, °C.
    pub ceiling: f64,
    /// Time constant, seconds (63 % of the way in one `tau`).
    pub tau: f64,
    /// Highest target the firmware accepts (Marlin clamps to MAXTEMP minus a margin).
    pub max_target: f64,
}

/// Hotend: 20 → 215 °C in about 45 s.
pub(crate) const HOTEND: HeaterSpec = HeaterSpec {
    ceiling: 320.0,
    tau: 42.0,
    max_target: 260.0,
};
/// Bed: 20 → 60 °C in about 55 s.
pub(crate) const BED: HeaterSpec = HeaterSpec {
    ceiling: 150.0,
    tau: 150.0,
    max_target: 120.0,
};

#[derive(Debug, Clone)]
pub(crate) struct Heater {
    spec: HeaterSpec,
    ambient: f64,
    /// Temperature at `at`.
    temp: f64,
    target: f64,
    at: Duration,
}

impl Heater {
    pub fn new(spec: HeaterSpec, ambient: f64) -> Self {
        Self {
            spec,
            ambient,
            temp: ambient,
            target: 0.0,
            at: Duration::ZERO,
        }
    }

    pub fn target(&self) -> f64 {
        self.target
    }

    /// Temperature at `t` (≥ the last rebase), with physics running `factor` times faster.
    pub fn temp_at(&self, t: Duration, factor: f64) -> f64 {
        let dt = t.saturating_sub(self.at).as_secs_f64() * factor;
        let decay = (-dt / self.spec.tau).exp();
        if self.temp < self.target {
            let eq = self.spec.ceiling;
            (eq + (self.temp - eq) * decay).min(self.target)
        } else {
            let floor = self.target.max(self.ambient);
            if self.temp <= floor {
                return self.temp;
            }
            (self.ambient + (self.temp - self.ambient) * decay).max(floor)
        }
    }

    /// Sets a new target at `t`; returns the clamped value.
    pub fn set_target(&mut self, t: Duration, factor: f64, target: f64) -> f64 {
        self.temp = self.temp_at(t, factor);
        self.at = t;
        self.target = if target.is_finite() {
            target.clamp(0.0, self.spec.max_target)
        } else {
            0.0
        };
        self.target
    }

    /// Heater power as Marlin prints it (`@:`), 0..=127.
    pub fn power_at(&self, t: Duration, factor: f64) -> u32 {
        if self.target <= 0.0 {
            return 0;
        }
        let temp = self.temp_at(t, factor);
        if temp < self.target - 0.5 {
            127
        } else if temp > self.target + 0.5 {
            0
        } else {
            let hold = (self.target - self.ambient) / (self.spec.ceiling - self.ambient);
            (hold.clamp(0.0, 1.0) * 127.0).round() as u32
        }
    }

    /// Whether the temperature is within `window` of the target, optionally also from above.
    pub fn reached(&self, t: Duration, factor: f64, window: f64, from_above_too: bool) -> bool {
        let temp = self.temp_at(t, factor);
        let low_ok = temp >= self.target - window - 1e-6;
        let high_ok =
            !from_above_too || temp <= self.target + window + 1e-6 || self.target < self.ambient;
        low_ok && high_ok
    }

    /// Earliest time ≥ `t` at which [`Heater::reached`] becomes true, if ever.
    pub fn reach_time(
        &self,
        t: Duration,
        factor: f64,
        window: f64,
        from_above_too: bool,
    ) -> Option<Duration> {
        if self.reached(t, factor, window, from_above_too) {
            return Some(t);
        }
        let temp = self.temp_at(t, factor);
        let tau = self.spec.tau / factor;
        let secs = if temp < self.target - window {
            let eq = self.spec.ceiling;
            let goal = self.target - window;
            if goal >= eq {
                return None;
            }
            tau * ((eq - temp) / (eq - goal)).ln()
        } else {
            let goal = self.target + window;
            if goal <= self.ambient {
                return None;
            }
            tau * ((temp - self.ambient) / (goal - self.ambient)).ln()
        };
        if !secs.is_finite() || secs < 0.0 {
            return None;
        }
        // Round up to the next microsecond so the check at that instant passes.
        Some(t + Duration::from_secs_f64(secs) + Duration::from_micros(1))
    }

    /// After a reset or kill: targets off, the metal keeps its heat.
    pub fn switch_off(&mut self, t: Duration, factor: f64) {
        self.set_target(t, factor, 0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(f64) -> Duration = Duration::from_secs_f64;

    #[test]
    fn heats_monotonically_and_clamps_at_target() {
        let mut h = Heater::new(HOTEND, 20.0);
        h.set_target(Duration::ZERO, 1.0, 215.0);
        let mut last = 20.0;
        for s in 1..120 {
            let t = h.temp_at(S(s as f64), 1.0);
            assert!(t >= last && t <= 215.0);
            last = t;
        }
        assert_eq!(last, 215.0);
        let reach = h
            .reach_time(Duration::ZERO, 1.0, 1.0, false)
            .expect("reachable");
        assert!((30.0..60.0).contains(&reach.as_secs_f64()), "{reach:?}");
        assert!(h.reached(reach, 1.0, 1.0, false));
        assert!(!h.reached(reach - Duration::from_millis(100), 1.0, 1.0, false));
    }

    #[test]
    fn cools_towards_ambient_and_factor_speeds_up() {
        let mut h = Heater::new(BED, 20.0);
        h.set_target(Duration::ZERO, 1.0, 60.0);
        let t60 = h
            .reach_time(Duration::ZERO, 1.0, 0.0, false)
            .expect("reach");
        let fast = h
            .reach_time(Duration::ZERO, 100.0, 0.0, false)
            .expect("reach");
        assert!((fast.as_secs_f64() * 100.0 - t60.as_secs_f64()).abs() < 0.01);
        h.set_target(t60, 1.0, 0.0);
        let later = h.temp_at(t60 + S(600.0), 1.0);
        assert!(later < 60.0 && later > 20.0);
        assert_eq!(h.power_at(t60, 1.0), 0);
        // Unreachable target (clamped below the ceiling, so never None for valid targets).
        assert_eq!(h.set_target(t60, 1.0, 500.0), BED.max_target);
    }
}
