//! Motion: G0/G1 lines, G2/G3 arcs cut into 1 mm segments, G28 homing times, and the planner
//! `Block`. The logical position moves to a command's target as soon as it runs, so it is where
//! the head will be once the planner has run dry.
use std::collections::VecDeque;
use std::f64::consts::TAU;
use std::time::Duration;

use super::{Firmware, Next, Wait};
use crate::gcode::Command;

/// Marlin `DEFAULT_MAX_FEEDRATE`, mm/s, for X Y Z E.
const MAX_FEEDRATE: [f64; 4] = [300.0, 300.0, 5.0, 25.0];
/// Marlin `MM_PER_ARC_SEGMENT`.
const ARC_SEGMENT_MM: f64 = 1.0;
/// Homing feedrates, mm/s (X, Y, Z), and the time of the bump and back-off per axis.
const HOMING_FEEDRATE: [f64; 3] = [50.0, 50.0, 4.0];
const HOMING_BUMP_SECS: f64 = 0.5;

/// One planner block: a straight move from `from` to `to` (logical X Y Z E, mm, in the
/// coordinates in force when it was planned) taking `time`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Block {
    pub(super) from: [f64; 4],
    pub(super) to: [f64; 4],
    pub(super) time: Duration,
}

impl Block {
    /// Where the head is after `fraction` (0..=1) of the block.
    pub(super) fn at(&self, fraction: f64) -> [f64; 4] {
        let k = fraction.clamp(0.0, 1.0);
        std::array::from_fn(|i| self.from[i] + (self.to[i] - self.from[i]) * k)
    }

    /// The same move started from `from` instead, at the same speed.
    pub(super) fn rebased(self, from: [f64; 4]) -> Block {
        let old = move_length(self.from, self.to);
        let new = move_length(from, self.to);
        let time = if old > 1e-12 {
            secs_to_duration(self.time.as_secs_f64() * new / old)
        } else {
            self.time
        };
        Block {
            from,
            to: self.to,
            time,
        }
    }
}

impl Firmware {
    fn target_of(&self, cmd: &Command<'_>) -> [f64; 4] {
        let mut target = self.position;
        for (i, axis) in ['X', 'Y', 'Z', 'E'].into_iter().enumerate() {
            if let Some(v) = cmd.param(axis) {
                let relative = if i == 3 {
                    self.relative_e
                } else {
                    self.relative
                };
                target[i] = if relative { self.position[i] + v } else { v };
            }
        }
        target
    }

    /// Seconds for a straight move by `delta` at the modal feedrate, respecting per-axis limits.
    fn move_secs(&self, delta: [f64; 4], length: f64) -> f64 {
        let speed = self.feedrate / 60.0 * self.feed_percent / 100.0;
        let mut secs = length / speed.max(1e-3);
        for (d, max) in delta.iter().zip(MAX_FEEDRATE) {
            secs = secs.max(d.abs() / max);
        }
        secs / self.motion_factor
    }

    pub(super) fn linear_move(&mut self, cmd: &Command<'_>) -> Next {
        let target = self.target_of(cmd);
        if let Some(f) = cmd.param('F').filter(|f| *f > 0.0) {
            self.feedrate = f;
        }
        let from = self.position;
        let delta: [f64; 4] = std::array::from_fn(|i| target[i] - from[i]);
        self.position = target;
        let length = move_length(from, target);
        if length < 1e-9 {
            return Next::Ok;
        }
        let time = secs_to_duration(self.move_secs(delta, length));
        self.queue_segments(VecDeque::from([Block {
            from,
            to: target,
            time,
        }]))
    }

    pub(super) fn arc_move(&mut self, cmd: &Command<'_>) -> Next {
        let start = self.position;
        let target = self.target_of(cmd);
        if let Some(f) = cmd.param('F').filter(|f| *f > 0.0) {
            self.feedrate = f;
        }
        self.position = target;
        let (dx, dy) = (target[0] - start[0], target[1] - start[1]);
        let clockwise = cmd.is('G', 2);
        // (centre, radius, sweep in radians); no centre without I, J or R.
        let (centre, radius, sweep) = match (cmd.param('I'), cmd.param('J'), cmd.param('R')) {
            (i, j, _) if i.is_some() || j.is_some() => {
                let (i, j) = (i.unwrap_or(0.0), j.unwrap_or(0.0));
                let (cx, cy) = (start[0] + i, start[1] + j);
                let a0 = (start[1] - cy).atan2(start[0] - cx);
                let a1 = (target[1] - cy).atan2(target[0] - cx);
                let mut sweep = if clockwise { a0 - a1 } else { a1 - a0 };
                sweep = sweep.rem_euclid(TAU);
                if sweep < 1e-9 {
                    sweep = TAU;
                }
                (Some((cx, cy)), i.hypot(j), sweep)
            }
            (_, _, Some(r)) => {
                let chord = dx.hypot(dy);
                let r_abs = r.abs().max(chord / 2.0);
                let mut sweep = 2.0 * (chord / (2.0 * r_abs)).clamp(0.0, 1.0).asin();
                if r < 0.0 {
                    sweep = TAU - sweep;
                }
                // Marlin's G2/G3 R: the centre beside the chord's midpoint, on the side that
                // gives the short arc for R > 0 and the long one for R < 0.
                let h = (r_abs * r_abs - chord * chord / 4.0).max(0.0).sqrt();
                let (px, py) = if chord > 1e-9 {
                    (-dy / chord, dx / chord)
                } else {
                    (0.0, 1.0)
                };
                let side = if clockwise != (r < 0.0) { -1.0 } else { 1.0 };
                let cx = (start[0] + target[0]) / 2.0 + side * h * px;
                let cy = (start[1] + target[1]) / 2.0 + side * h * py;
                (Some((cx, cy)), r_abs, sweep)
            }
            _ => (None, 0.0, 0.0),
        };
        let dz = target[2] - start[2];
        let length = (radius * sweep).hypot(dz);
        if length < 1e-9 {
            return Next::Ok;
        }
        let segments = ((length / ARC_SEGMENT_MM).floor() as usize).clamp(1, 2000);
        let delta = [dx, dy, dz, target[3] - start[3]];
        let secs = self.move_secs(delta, length) / segments as f64;
        let time = secs_to_duration(secs);
        let a0 = centre.map_or(0.0, |(cx, cy)| (start[1] - cy).atan2(start[0] - cx));
        let turn = if clockwise { -sweep } else { sweep };
        // The end of segment `k` of `segments` (the last one ends exactly at the target).
        let point = |k: usize| -> [f64; 4] {
            if k == 0 {
                return start;
            }
            if k == segments {
                return target;
            }
            let f = k as f64 / segments as f64;
            let linear: [f64; 4] = std::array::from_fn(|i| start[i] + (target[i] - start[i]) * f);
            match centre {
                Some((cx, cy)) => {
                    let a = a0 + turn * f;
                    [
                        cx + radius * a.cos(),
                        cy + radius * a.sin(),
                        linear[2],
                        linear[3],
                    ]
                }
                None => linear,
            }
        };
        let blocks = (1..=segments)
            .map(|k| Block {
                from: point(k - 1),
                to: point(k),
                time,
            })
            .collect();
        self.queue_segments(blocks)
    }

    fn queue_segments(&mut self, segments: VecDeque<Block>) -> Next {
        match self.check_wait(Wait::Planner(segments)) {
            None => Next::Ok,
            Some(wait) => Next::Wait(wait),
        }
    }

    /// Homing time for the axes named (all when none), and the new position.
    pub(super) fn home(&mut self, cmd: &Command<'_>) -> Duration {
        let all = !(cmd.has('X') || cmd.has('Y') || cmd.has('Z'));
        let mut secs = 0.0;
        for (i, axis) in ['X', 'Y', 'Z'].into_iter().enumerate() {
            if all || cmd.has(axis) {
                secs += self.position[i].abs() / HOMING_FEEDRATE[i] + HOMING_BUMP_SECS;
                self.position[i] = 0.0;
            }
        }
        secs_to_duration(secs / self.motion_factor)
    }
}

/// Length of a move as Marlin's planner measures it: the XYZ distance, or the E distance for
/// a move of the extruder alone.
fn move_length(from: [f64; 4], to: [f64; 4]) -> f64 {
    let d: [f64; 4] = std::array::from_fn(|i| to[i] - from[i]);
    let xyz = (d[0].powi(2) + d[1].powi(2) + d[2].powi(2)).sqrt();
    if xyz > 1e-9 {
        xyz
    } else {
        d[3].abs()
    }
}

fn secs_to_duration(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs.clamp(0.0, 1e7)).unwrap_or(Duration::ZERO)
}
