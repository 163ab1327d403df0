//! The sans-IO firmware core: a discrete-event model of a Marlin 2.1 board and its serial
//! link. No IO, no clock, no tasks: time is a [`Duration`] since the simulation began, passed
//! into every call. Feed host bytes with [`Firmware::receive`], collect what the firmware has
//! put on the wire by `now` with [`Firmware::poll_output`], and come back no later than
//! [`Firmware::next_deadline`].
//!
//! Layout: this file holds the [`Firmware`] state and its IO-facing API; `wire` times the link,
//! `serial` validates lines, `event_loop` is Marlin's main loop, `commands`, `motion` and
//! `temperature` handle G-code, `emergency` acts on M108/M112/M410, `lifecycle` owns resets,
//! `kill()` and injected faults, `stats` the observable snapshot.
use std::collections::VecDeque;
use std::time::Duration;

use crate::config::SimConfig;
use crate::e_parser::EmergencyParser;
use crate::heater::{self, Heater};
use crate::rng::SplitMix64;
use crate::SimError;

mod commands;
mod emergency;
mod event_loop;
mod lifecycle;
mod motion;
mod serial;
mod stats;
mod temperature;
#[cfg(test)]
mod tests;
mod wire;

pub use emergency::{EmergencyAction, EmergencyEffect};
pub use lifecycle::Fault;
pub use stats::{Phase, Progress, Stats, TempStatus};

use motion::Block;
use serial::{InputState, Queued};
use wire::Wire;

/// Marlin `MAX_CMD_SIZE`: characters of a line beyond `MAX_CMD_SIZE - 1` are dropped.
const MAX_CMD_SIZE: usize = 96;
/// Marlin's default feedrate before the first `F`, mm/min.
const DEFAULT_FEEDRATE: f64 = 1500.0;

/// The version string this firmware claims.
pub const FIRMWARE_VERSION: &str = "Marlin 2.1.2.1";

/// Why the executing command has not finished yet.
#[derive(Debug, Clone)]
enum Wait {
    /// Move segments still to enter the planner.
    Planner(VecDeque<Block>),
    /// Until the planner is empty, then the follow-up.
    Sync(AfterSync),
    /// Dwell or homing until a time.
    Until { until: Duration, homing: bool },
    /// M109/M190.
    Heat {
        bed: bool,
        from_above: bool,
        until: Option<Duration>,
        next_report: Duration,
    },
}

#[derive(Debug, Clone, Copy)]
enum AfterSync {
    Ok,
    Dwell(Duration),
    Home(Duration),
}

#[derive(Debug, Clone)]
enum Exec {
    Idle,
    /// Parsing and dispatching the head command (CPU time).
    Running {
        done_at: Duration,
    },
    Waiting(Wait),
}

/// What a command does after its CPU time.
enum Next {
    Ok,
    /// The handler printed its own `ok` (M105).
    NoOk,
    Wait(Wait),
}

/// The simulated board. See the crate docs for the model.
#[derive(Debug)]
pub struct Firmware {
    cfg: SimConfig,
    motion_factor: f64,
    rng: SplitMix64,
    uuid: String,
    now: Duration,
    host_open: bool,
    wire_in: Wire,
    wire_out: Wire,
    rx: VecDeque<u8>,
    line: Vec<u8>,
    input_state: InputState,
    last_n: i64,
    ring: VecDeque<Queued>,
    exec: Exec,
    next_busy: Duration,
    planner: VecDeque<Block>,
    /// When the head block (the one the steppers execute) ends.
    head_end: Option<Duration>,
    booting_until: Option<Duration>,
    hung: bool,
    halted: bool,
    autoreport: Option<(Duration, Duration)>,
    hotend: Heater,
    bed: Heater,
    position: [f64; 4],
    relative: bool,
    relative_e: bool,
    feedrate: f64,
    feed_percent: f64,
    fan: u32,
    checksum_error_lines: Vec<u32>,
    /// The receive interrupt's emergency parser (fed only with `cfg.emergency_parser`).
    e_parser: EmergencyParser,
    /// Marlin `wait_for_heatup`: set when an M109/M190 wait starts, cleared by M108.
    wait_for_heatup: bool,
    /// Marlin `emergency_parser.killed_by_M112` / `quickstop_by_M410`: set by the receive
    /// interrupt (here: the line's arrival time), acted on when the main loop next runs
    /// `idle()` — at once, unless it is hung or held by an M410 already.
    pending_kill: Option<Duration>,
    pending_quickstop: Option<Duration>,
    /// While the main loop sits in `quickstop_stepper()` after an M410 (see QUICKSTOP_PAUSE).
    quickstop_until: Option<Duration>,
    /// Emergency actions not yet collected by [`Firmware::poll_emergency`].
    emergency_log: VecDeque<EmergencyAction>,
    stats: Stats,
}

impl Firmware {
    /// A board that is powered but has no host yet (call [`Firmware::host_opened`]).
    pub fn new(cfg: SimConfig) -> Result<Firmware, SimError> {
        cfg.validate()?;
        let mut id = SplitMix64::new(cfg.seed ^ 0x5EED_F1C3_u64);
        let (a, b) = (id.next_u64(), id.next_u64());
        let uuid = format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0x0fff,
            ((b >> 48) & 0x3fff) | 0x8000,
            b & 0xffff_ffff_ffff
        );
        Ok(Firmware {
            motion_factor: cfg.motion_factor(),
            rng: SplitMix64::new(cfg.seed),
            uuid,
            now: Duration::ZERO,
            host_open: false,
            wire_in: Wire::new(cfg.baud),
            wire_out: Wire::new(cfg.baud),
            rx: VecDeque::with_capacity(cfg.rx_buffer),
            line: Vec::with_capacity(MAX_CMD_SIZE),
            input_state: InputState::Normal,
            last_n: 0,
            ring: VecDeque::with_capacity(cfg.bufsize),
            exec: Exec::Idle,
            next_busy: Duration::ZERO,
            planner: VecDeque::with_capacity(cfg.planner_blocks),
            head_end: None,
            booting_until: None,
            hung: false,
            halted: false,
            autoreport: None,
            hotend: Heater::new(heater::HOTEND, cfg.ambient),
            bed: Heater::new(heater::BED, cfg.ambient),
            position: [0.0; 4],
            relative: false,
            relative_e: false,
            feedrate: DEFAULT_FEEDRATE,
            feed_percent: 100.0,
            fan: 0,
            checksum_error_lines: cfg.checksum_error_lines.clone(),
            e_parser: EmergencyParser::default(),
            wait_for_heatup: false,
            pending_kill: None,
            pending_quickstop: None,
            quickstop_until: None,
            emergency_log: VecDeque::new(),
            stats: Stats::default(),
            cfg,
        })
    }

    /// The configuration this board runs with.
    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// The UUID M115 reports (derived from the seed).
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// A host opened the port: like DTR on a real board, this resets it (a print in progress is
    /// lost), and the `start` banner follows after `boot_time`.
    pub fn host_opened(&mut self, now: Duration) {
        self.advance_to(now);
        self.host_open = true;
        self.wire_in.clear(self.now);
        self.reset();
    }

    /// The host closed the port. The board keeps running; what it prints is lost.
    pub fn host_closed(&mut self, now: Duration) {
        self.advance_to(now);
        self.host_open = false;
        self.wire_out.clear(self.now);
    }

    /// Whether a host has the port open.
    pub fn host_open(&self) -> bool {
        self.host_open
    }

    /// How many more bytes the host side of the wire takes right now.
    pub fn input_capacity(&self) -> usize {
        self.cfg.host_tx_buffer.saturating_sub(self.wire_in.pending)
    }

    /// The host wrote `bytes` at `now`. They travel at the baud rate and reach the board's RX
    /// buffer one by one. Takes at most [`Firmware::input_capacity`] bytes and returns how many
    /// it took (the caller keeps the rest, like a blocked `write`).
    pub fn receive(&mut self, now: Duration, bytes: &[u8]) -> usize {
        self.advance_to(now);
        let n = bytes.len().min(self.input_capacity());
        self.wire_in.push(self.now, bytes[..n].to_vec());
        n
    }

    /// Bytes that have reached the host by `now`, if any.
    pub fn poll_output(&mut self, now: Duration) -> Option<Vec<u8>> {
        self.advance_to(now);
        let mut out = Vec::new();
        self.wire_out.drain_arrived(self.now, &mut out);
        self.stats.bytes_out += out.len() as u64;
        (!out.is_empty()).then_some(out)
    }

    /// When something next happens (a byte arrives, a timer fires, output reaches the host).
    /// `None` when the board waits for input only.
    pub fn next_deadline(&self) -> Option<Duration> {
        min_opt(self.next_event(), self.wire_out.next_arrival())
    }

    /// The next emergency action not yet collected, oldest first (the shell logs them). At
    /// most the latest 32 are kept.
    pub fn poll_emergency(&mut self) -> Option<EmergencyAction> {
        self.emergency_log.pop_front()
    }

    /// Queues one output line (adds `\n`) on the wire to the host.
    fn emit(&mut self, line: &str) {
        if !self.host_open || self.halted || self.hung {
            return;
        }
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        if !bytes.is_empty() && self.rng.chance(self.cfg.garble_rate) {
            self.stats.garbled_lines += 1;
            let n = 1 + self.rng.below(2);
            for _ in 0..n {
                let i = self.rng.below(bytes.len() as u64) as usize;
                let mut b = self.rng.below(256) as u8;
                if b == b'\n' || b == b'\r' {
                    b = b'#';
                }
                bytes[i] = b;
            }
        }
        bytes.push(b'\n');
        self.wire_out.push(self.now, bytes);
    }
}

fn min_opt(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}
