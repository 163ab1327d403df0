//! The simulator's knobs.
use std::time::Duration;

use crate::SimError;

/// Everything that shapes a simulated printer. `SimConfig::default()` is a stock Marlin 2.1
/// board at 250000 baud in real time.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Seed of every random choice (fault injection, UUID). Same seed ⇒ same behaviour.
    pub seed: u64,
    /// Wire rate in bits per second, both directions; 8N1 framing = 10 bits per byte.
    pub baud: u32,
    /// Time scale of the pty shell: 1.0 = real time, 100.0 = a hundred times faster. Everything
    /// (wire, firmware timers, motion, heating) is scaled alike. The sans-IO core ignores it
    /// except through [`SimConfig::motion_factor`].
    pub speed: f64,
    /// Override for motion and heating only, relative to real time: `Some(1e6)` makes moves,
    /// dwells, homing and heating practically instant while the wire keeps `speed`.
    pub motion_speed: Option<f64>,
    /// Marlin `ADVANCED_OK`: `ok N<line> P<planner free> B<buffer free>`.
    pub advanced_ok: bool,
    /// Marlin `RX_BUFFER_SIZE`: bytes the UART keeps for the firmware; more are lost.
    pub rx_buffer: usize,
    /// Marlin `BUFSIZE`: command slots between the serial reader and the executor.
    pub bufsize: usize,
    /// Marlin `BLOCK_BUFFER_SIZE`: planner ring; as in Marlin one slot stays empty, so at most
    /// `planner_blocks - 1` moves are queued and an idle printer reports `P<planner_blocks - 1>`.
    pub planner_blocks: usize,
    /// Firmware CPU time to parse and dispatch one command (firmware time, scaled by `speed`).
    pub command_time: Duration,
    /// Bytes the host side may have queued on the wire (the USB-serial adapter's buffer);
    /// beyond it the shell stops reading the pty and the host's writes block.
    pub host_tx_buffer: usize,
    /// Time from a reset (port open) to the `start` banner; bytes arriving meanwhile are lost.
    pub boot_time: Duration,
    /// Probability per numbered line that it arrives corrupted (checksum mismatch).
    pub checksum_error_rate: f64,
    /// Line numbers whose first arrival is corrupted (each fires once).
    pub checksum_error_lines: Vec<u32>,
    /// Probability per output line that some of its bytes are corrupted on the way to the host.
    pub garble_rate: f64,
    /// Room temperature, °C.
    pub ambient: f64,
    /// Marlin `EMERGENCY_PARSER` (on in most builds): `M108`, `M112` and `M410` act the moment
    /// their line has arrived, even while the command queue is blocked (a dwell, a heat wait,
    /// a full planner), and M115 reports `Cap:EMERGENCY_PARSER:1`. Off: they act only when
    /// the main loop reads their line, as in a build without it.
    pub emergency_parser: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            baud: 250_000,
            speed: 1.0,
            motion_speed: None,
            advanced_ok: false,
            rx_buffer: 128,
            bufsize: 4,
            planner_blocks: 16,
            command_time: Duration::from_micros(200),
            host_tx_buffer: 4096,
            boot_time: Duration::ZERO,
            checksum_error_rate: 0.0,
            checksum_error_lines: Vec::new(),
            garble_rate: 0.0,
            ambient: 20.0,
            emergency_parser: true,
        }
    }
}

impl SimConfig {
    /// Checks ranges; the error names the knob.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |what: &str| Err(SimError::Config(what.to_owned()));
        if self.baud < 300 {
            return bad("baud must be at least 300");
        }
        if !(self.speed.is_finite() && self.speed > 0.0) {
            return bad("speed must be a positive number");
        }
        if let Some(m) = self.motion_speed {
            if !(m.is_finite() && m > 0.0) {
                return bad("motion_speed must be a positive number");
            }
        }
        if self.rx_buffer == 0 {
            return bad("rx_buffer must be at least 1");
        }
        if self.bufsize == 0 {
            return bad("bufsize must be at least 1");
        }
        if self.planner_blocks < 2 {
            return bad("planner_blocks must be at least 2");
        }
        if self.host_tx_buffer == 0 {
            return bad("host_tx_buffer must be at least 1");
        }
        for (name, rate) in [
            ("checksum_error_rate", self.checksum_error_rate),
            ("garble_rate", self.garble_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(SimError::Config(format!("{name} must be within 0..=1")));
            }
        }
        if !self.ambient.is_finite() || !(-40.0..=60.0).contains(&self.ambient) {
            return bad("ambient must be within -40..=60 °C");
        }
        Ok(())
    }

    /// How much faster motion and heating run than the core's (virtual) clock:
    /// `motion_speed / speed`, or 1 without an override.
    pub fn motion_factor(&self) -> f64 {
        self.motion_speed.map_or(1.0, |m| m / self.speed)
    }
}
