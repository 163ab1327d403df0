//! What the firmware shows the outside: the [`Stats`] snapshot and its parts. Counters (and the
//! last emergency action) survive resets; state fields are read from the core at snapshot time.
use std::time::Duration;

use super::{AfterSync, EmergencyAction, Exec, Firmware, Wait};

/// What the firmware is doing, for stats and dashboards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Between a reset and the `start` banner.
    #[default]
    Booting,
    /// Nothing queued, planner empty.
    Idle,
    /// Moves in the planner, or a move waiting for a planner slot.
    Moving,
    /// M109/M190 waiting for a temperature.
    Heating,
    /// G28 running.
    Homing,
    /// G4 dwell, M400/M84 waiting for the planner to drain, or the second an M410 quick stop
    /// holds the main loop.
    Waiting,
    /// After kill(): silent until a reset.
    Halted,
    /// Hang fault active.
    Hung,
}

/// One heater as the stats report it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TempStatus {
    /// Measured °C.
    pub actual: f64,
    /// Target °C (0 = off).
    pub target: f64,
    /// Power 0..=127 as Marlin's `@:`.
    pub power: u32,
}

/// The last M73 the firmware received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// `P`: percent done.
    pub percent: Option<u32>,
    /// `R`: minutes remaining.
    pub remaining_minutes: Option<u32>,
}

/// A snapshot of counters and state. Counters survive resets; `resets` counts them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stats {
    /// The core's time of this snapshot.
    pub now: Duration,
    /// Whether a host has the port open.
    pub host_open: bool,
    /// Bytes the wire delivered to the board (including ones lost to overflow or ignored).
    pub bytes_in: u64,
    /// Bytes the wire delivered to the host.
    pub bytes_out: u64,
    /// Core time at which the first / latest byte arrived from the host.
    pub first_byte_in_at: Option<Duration>,
    /// See `first_byte_in_at`.
    pub last_byte_in_at: Option<Duration>,
    /// Bytes lost because the RX buffer was full (a UART overrun).
    pub rx_overflow_bytes: u64,
    /// Bytes discarded while booting, hung or halted.
    pub bytes_ignored: u64,
    /// Lines that passed validation and entered the command queue.
    pub lines_accepted: u64,
    /// Commands executed to their `ok`.
    pub commands_executed: u64,
    /// `Error:checksum mismatch` sent (injected ones included).
    pub checksum_errors: u64,
    /// Of those, how many were injected by the fault knobs.
    pub injected_checksum_errors: u64,
    /// `Error:Line Number is not Last Line Number+1` sent.
    pub line_number_errors: u64,
    /// `Error:No Checksum with line number` sent.
    pub missing_checksum_errors: u64,
    /// `Resend:` sent.
    pub resends_requested: u64,
    /// `echo:Unknown command` sent.
    pub unknown_commands: u64,
    /// Output lines corrupted by the garble knob.
    pub garbled_lines: u64,
    /// Marlin's `last_N`.
    pub last_line: i64,
    /// What the firmware is doing.
    pub phase: Phase,
    /// Hotend.
    pub hotend: TempStatus,
    /// Bed.
    pub bed: TempStatus,
    /// Part fan 0..=255.
    pub fan: u32,
    /// Last M73.
    pub progress: Progress,
    /// Planner blocks fully executed (an arc counts its segments).
    pub moves_executed: u64,
    /// Planner blocks queued right now.
    pub planner_queued: usize,
    /// Commands in the command buffer right now (the executing one included).
    pub commands_queued: usize,
    /// Resets (port opens, reset faults).
    pub resets: u64,
    /// Logical position X Y Z E, mm: where the head will be when the planned moves are done
    /// (after an M410, where it stopped).
    pub position: [f64; 4],
    /// `M108` lines the emergency parser caught (each one, whether or not a wait was running).
    pub emergency_m108: u64,
    /// `M112` lines the emergency parser caught.
    pub emergency_m112: u64,
    /// `M410` lines the emergency parser caught.
    pub emergency_m410: u64,
    /// The latest emergency action the firmware carried out (by the emergency parser, or by
    /// the serial reader when the parser is off). Survives resets, like the counters.
    pub last_emergency: Option<EmergencyAction>,
}

impl Firmware {
    /// Counters and state at the core's current time.
    pub fn stats(&self) -> Stats {
        let now = self.now;
        let f = self.motion_factor;
        let mut s = self.stats.clone();
        s.now = now;
        s.host_open = self.host_open;
        s.last_line = self.last_n;
        s.phase = self.phase();
        s.hotend = TempStatus {
            actual: self.hotend.temp_at(now, f),
            target: self.hotend.target(),
            power: self.hotend.power_at(now, f),
        };
        s.bed = TempStatus {
            actual: self.bed.temp_at(now, f),
            target: self.bed.target(),
            power: self.bed.power_at(now, f),
        };
        s.fan = self.fan;
        s.planner_queued = self.planner.len();
        s.commands_queued = self.ring.len();
        s.position = self.position;
        s
    }

    fn phase(&self) -> Phase {
        if self.hung {
            return Phase::Hung;
        }
        if self.halted {
            return Phase::Halted;
        }
        if self.booting_until.is_some() {
            return Phase::Booting;
        }
        let held = self.in_quickstop();
        match &self.exec {
            Exec::Waiting(Wait::Heat { .. }) => Phase::Heating,
            Exec::Waiting(Wait::Until { homing: true, .. }) => Phase::Homing,
            Exec::Waiting(Wait::Sync(AfterSync::Home(_))) => Phase::Homing,
            _ if held => Phase::Waiting,
            Exec::Waiting(Wait::Until { .. } | Wait::Sync(_)) => Phase::Waiting,
            Exec::Waiting(Wait::Planner(_)) => Phase::Moving,
            _ if !self.planner.is_empty() => Phase::Moving,
            _ => Phase::Idle,
        }
    }
}
