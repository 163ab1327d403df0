//! The sans-IO firmware core: a discrete-event model of a Marlin 2.1 board and its serial
//! link. No IO, no clock, no tasks: time is a [`Duration`] since the simulation began, passed
//! into every call. Feed host bytes with [`Firmware::receive`], collect what the firmware has
//! put on the wire by `now` with [`Firmware::poll_output`], and come back no later than
//! [`Firmware::next_deadline`].
use std::collections::VecDeque;
use std::f64::consts::TAU;
use std::fmt;
use std::time::Duration;

use protocol::marlin;

use crate::config::SimConfig;
use crate::e_parser::{EmergencyCommand, EmergencyParser};
use crate::gcode::Command;
use crate::heater::{self, Heater};
use crate::rng::SplitMix64;
use crate::SimError;

/// Marlin `MAX_CMD_SIZE`: characters of a line beyond `MAX_CMD_SIZE - 1` are dropped.
const MAX_CMD_SIZE: usize = 96;
/// Marlin `DEFAULT_KEEPALIVE_INTERVAL`.
const KEEPALIVE: Duration = Duration::from_secs(2);
/// M109/M190 print the temperatures this often while waiting.
const WAIT_REPORT: Duration = Duration::from_secs(1);
/// Marlin `TEMP_WINDOW` / `TEMP_BED_WINDOW`.
const TEMP_WINDOW: f64 = 1.0;
/// Marlin's default feedrate before the first `F`, mm/min.
const DEFAULT_FEEDRATE: f64 = 1500.0;
/// Marlin `DEFAULT_MAX_FEEDRATE`, mm/s, for X Y Z E.
const MAX_FEEDRATE: [f64; 4] = [300.0, 300.0, 5.0, 25.0];
/// Marlin `MM_PER_ARC_SEGMENT`.
const ARC_SEGMENT_MM: f64 = 1.0;
/// Homing feedrates, mm/s (X, Y, Z), and the time of the bump and back-off per axis.
const HOMING_FEEDRATE: [f64; 3] = [50.0, 50.0, 4.0];
const HOMING_BUMP_SECS: f64 = 0.5;
/// Marlin's `quick_stop()` refuses new blocks for `TEMP_TIMER_FREQUENCY` ticks of its ~1 kHz
/// temperature interrupt, and `quickstop_stepper()` waits that out in `planner.synchronize()`
/// (`Planner::busy()` counts the window): every M410 holds the main loop for about a second.
/// A firmware timer, so `motion_speed` does not shorten it.
const QUICKSTOP_PAUSE: Duration = Duration::from_secs(1);
/// Emergency actions kept for [`Firmware::poll_emergency`]; beyond it the oldest are dropped.
const MAX_EMERGENCY_LOG: usize = 32;

/// The version string this firmware claims.
pub const FIRMWARE_VERSION: &str = "Marlin 2.1.2.1";

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

/// An emergency command the firmware carried out: what [`Firmware::poll_emergency`] hands the
/// shell for its log, and [`Stats::last_emergency`].
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

/// A span of bytes on the wire: byte `k` arrives at `start + wire_time(k + 1)`.
#[derive(Debug)]
struct Chunk {
    start: Duration,
    bytes: Vec<u8>,
    next: usize,
}

/// One direction of the serial link: bytes are serialised at the baud rate, 10 bits each.
#[derive(Debug)]
struct Wire {
    baud: u64,
    chunks: VecDeque<Chunk>,
    /// When the last queued byte finishes.
    tail: Duration,
    pending: usize,
}

impl Wire {
    fn new(baud: u32) -> Self {
        Self {
            baud: u64::from(baud),
            chunks: VecDeque::new(),
            tail: Duration::ZERO,
            pending: 0,
        }
    }

    /// Time to serialise `n` bytes (8N1).
    fn time(&self, n: usize) -> Duration {
        wire_time(self.baud, n)
    }

    fn push(&mut self, now: Duration, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        let start = now.max(self.tail);
        self.tail = start + self.time(bytes.len());
        self.pending += bytes.len();
        self.chunks.push_back(Chunk {
            start,
            bytes,
            next: 0,
        });
    }

    /// Arrival time of the next byte.
    fn next_arrival(&self) -> Option<Duration> {
        self.chunks.front().map(|c| c.start + self.time(c.next + 1))
    }

    /// Pops one byte if it has arrived by `now`.
    fn pop_arrived(&mut self, now: Duration) -> Option<(Duration, u8)> {
        let at = self.next_arrival()?;
        if at > now {
            return None;
        }
        let chunk = self.chunks.front_mut()?;
        let b = chunk.bytes[chunk.next];
        chunk.next += 1;
        if chunk.next == chunk.bytes.len() {
            self.chunks.pop_front();
        }
        self.pending -= 1;
        Some((at, b))
    }

    /// Every byte that has arrived by `now`.
    fn drain_arrived(&mut self, now: Duration, out: &mut Vec<u8>) {
        let baud = self.baud;
        while let Some(chunk) = self.chunks.front_mut() {
            let elapsed = now.saturating_sub(chunk.start).as_nanos();
            let mut n = usize::try_from(elapsed * u128::from(baud) / 10_000_000_000)
                .unwrap_or(usize::MAX)
                .min(chunk.bytes.len());
            let start = chunk.start;
            while n < chunk.bytes.len() && start + wire_time(baud, n + 1) <= now {
                n += 1;
            }
            if n <= chunk.next {
                return;
            }
            out.extend_from_slice(&chunk.bytes[chunk.next..n]);
            self.pending -= n - chunk.next;
            chunk.next = n;
            if n == chunk.bytes.len() {
                self.chunks.pop_front();
            } else {
                return;
            }
        }
    }

    fn clear(&mut self, now: Duration) {
        self.chunks.clear();
        self.pending = 0;
        self.tail = now;
    }
}

/// A command in the command buffer: the line's `N` (if any) and the text without it.
#[derive(Debug, Clone)]
struct Queued {
    number: Option<u32>,
    text: String,
}

/// One planner block: a straight move from `from` to `to` (logical X Y Z E, mm, in the
/// coordinates in force when it was planned) taking `time`.
#[derive(Debug, Clone, Copy)]
struct Block {
    from: [f64; 4],
    to: [f64; 4],
    time: Duration,
}

impl Block {
    /// Where the head is after `fraction` (0..=1) of the block.
    fn at(&self, fraction: f64) -> [f64; 4] {
        let k = fraction.clamp(0.0, 1.0);
        std::array::from_fn(|i| self.from[i] + (self.to[i] - self.from[i]) * k)
    }

    /// The same move started from `from` instead, at the same speed.
    fn rebased(self, from: [f64; 4]) -> Block {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputState {
    Normal,
    /// In a `;` comment or past MAX_CMD_SIZE: skip to end of line.
    Eol,
}

enum LineError {
    LineNumber,
    Checksum,
    NoChecksum,
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

    /// The next emergency action not yet collected, oldest first (the shell logs them). At
    /// most the latest 32 are kept.
    pub fn poll_emergency(&mut self) -> Option<EmergencyAction> {
        self.emergency_log.pop_front()
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

    /// Whether the main loop is held in `quickstop_stepper()` after an M410.
    fn in_quickstop(&self) -> bool {
        self.quickstop_until.is_some_and(|t| t > self.now)
    }

    // ---- event loop -------------------------------------------------------------------

    /// Earliest internal event (output delivery excluded).
    fn next_event(&self) -> Option<Duration> {
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

    fn advance_to(&mut self, target: Duration) {
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

    /// The serial receive interrupt, for one byte arriving at `at`.
    fn on_byte(&mut self, at: Duration, b: u8) {
        self.stats.bytes_in += 1;
        self.stats.first_byte_in_at.get_or_insert(at);
        self.stats.last_byte_in_at = Some(at);
        // The emergency parser sees every byte, whether or not the ring buffer has room for
        // it; not while booting (no firmware yet) or halted (kill() ends with interrupts off).
        let parsed = if self.cfg.emergency_parser && !self.halted && self.booting_until.is_none() {
            self.e_parser.update(b)
        } else {
            None
        };
        if self.hung || self.halted || self.booting_until.is_some() {
            self.stats.bytes_ignored += 1;
        } else if self.rx.len() >= self.cfg.rx_buffer {
            self.stats.rx_overflow_bytes += 1;
        } else {
            self.rx.push_back(b);
        }
        if let Some(cmd) = parsed {
            self.emergency_parsed(at, cmd);
        }
    }

    /// The emergency parser recognised `cmd` in a line whose end arrived at `at`: what Marlin's
    /// receive interrupt does (`EmergencyParser::update`), then, for M112 and M410, what the
    /// main loop's next `idle()` does with the flags (`Temperature::task()`).
    fn emergency_parsed(&mut self, at: Duration, cmd: EmergencyCommand) {
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
    fn service_emergency(&mut self) {
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

    fn log_kill(&mut self, received: Duration, by_parser: bool) {
        let effect = EmergencyEffect::Killed {
            hotend_target: self.hotend.target(),
            bed_target: self.bed.target(),
        };
        self.log_emergency(received, EmergencyCommand::M112, by_parser, effect);
    }

    fn log_emergency(
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
    fn quickstop(&mut self) -> EmergencyEffect {
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
    fn check_wait(&mut self, wait: Wait) -> Option<Wait> {
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

    // ---- serial input -----------------------------------------------------------------

    /// Marlin `get_serial_commands`: move bytes from RX into lines while the queue has room.
    fn read_serial(&mut self) {
        while self.ring.len() < self.cfg.bufsize && !self.halted && !self.in_quickstop() {
            let Some(b) = self.rx.pop_front() else {
                return;
            };
            match b {
                b'\n' | b'\r' => {
                    self.input_state = InputState::Normal;
                    if self.line.is_empty() {
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    self.line_done(&line);
                }
                _ if self.input_state == InputState::Eol => {}
                b';' => self.input_state = InputState::Eol,
                0x08 => {
                    self.line.pop();
                }
                _ => {
                    self.line.push(b);
                    if self.line.len() >= MAX_CMD_SIZE - 1 {
                        self.input_state = InputState::Eol;
                    }
                }
            }
        }
    }

    fn line_done(&mut self, line: &[u8]) {
        let start = line.iter().position(|&b| b != b' ').unwrap_or(line.len());
        let cmd = &line[start..];
        let mut number = None;
        let mut text = cmd;
        if cmd.first() == Some(&b'N') {
            let m110 = find(cmd, b"M110").is_some();
            let npos = if m110 {
                cmd.iter()
                    .skip(4)
                    .position(|&b| b == b'N')
                    .map_or(0, |p| p + 4)
            } else {
                0
            };
            let gcode_n = strtol(&cmd[npos + 1..]);
            // Wrapping: `N9223372036854775807` (or an `M110 N` that large) must not panic.
            if gcode_n != self.last_n.wrapping_add(1) && !m110 {
                return self.line_error(LineError::LineNumber);
            }
            let Some(apos) = cmd.iter().rposition(|&b| b == b'*') else {
                return self.line_error(LineError::NoChecksum);
            };
            if strtol(&cmd[apos + 1..]) != i64::from(marlin::checksum(&cmd[..apos])) {
                return self.line_error(LineError::Checksum);
            }
            let own_n = strtol(&cmd[1..]);
            let injected = match self
                .checksum_error_lines
                .iter()
                .position(|&n| i64::from(n) == own_n)
            {
                Some(i) => {
                    self.checksum_error_lines.swap_remove(i);
                    true
                }
                None => self.rng.chance(self.cfg.checksum_error_rate),
            };
            if injected {
                self.stats.injected_checksum_errors += 1;
                return self.line_error(LineError::Checksum);
            }
            self.last_n = gcode_n;
            number = u32::try_from(own_n).ok();
            let digits = cmd[1..]
                .iter()
                .position(|b| !b.is_ascii_digit())
                .map_or(cmd.len(), |p| p + 1);
            text = &cmd[digits..apos];
        } else if let Some(apos) = cmd.iter().rposition(|&b| b == b'*') {
            // Marlin's parser ends a command at `*` even without a line number.
            text = &cmd[..apos];
        }
        let text = String::from_utf8_lossy(text).trim().to_owned();
        if !self.cfg.emergency_parser {
            // Without EMERGENCY_PARSER, Marlin handles these when the line is read (and M410
            // again when it executes). With it, the parser has acted on the bytes already.
            let now = self.now;
            if text == "M112" || text.starts_with("M112 ") {
                self.kill();
                self.log_kill(now, false);
                return;
            }
            if text == "M410" || text.starts_with("M410 ") {
                let effect = self.quickstop();
                self.log_emergency(now, EmergencyCommand::M410, false, effect);
            }
        }
        self.stats.lines_accepted += 1;
        self.ring.push_back(Queued { number, text });
    }

    fn line_error(&mut self, kind: LineError) {
        let msg = match kind {
            LineError::LineNumber => {
                self.stats.line_number_errors += 1;
                "Line Number is not Last Line Number+1"
            }
            LineError::Checksum => {
                self.stats.checksum_errors += 1;
                "checksum mismatch"
            }
            LineError::NoChecksum => {
                self.stats.missing_checksum_errors += 1;
                "No Checksum with line number"
            }
        };
        let last = self.last_n;
        self.emit(&format!("Error:{msg}, Last Line: {last}"));
        // Marlin empties the RX buffer and starts a fresh line.
        self.rx.clear();
        self.line.clear();
        self.input_state = InputState::Normal;
        self.emit(&format!("Resend: {}", last.wrapping_add(1)));
        self.emit("ok");
        self.stats.resends_requested += 1;
    }

    // ---- commands ---------------------------------------------------------------------

    fn execute(&mut self) -> Next {
        let Some(text) = self.ring.front().map(|q| q.text.clone()) else {
            return Next::NoOk;
        };
        if text.is_empty() {
            return Next::Ok;
        }
        let Some(cmd) = Command::parse(&text) else {
            return self.unknown(&text);
        };
        let now = self.now;
        let f = self.motion_factor;
        match (cmd.letter, cmd.code) {
            ('G', Some(0 | 1)) => self.linear_move(&cmd),
            ('G', Some(2 | 3)) => self.arc_move(&cmd),
            ('G', Some(4)) => {
                let secs = cmd.param('S').unwrap_or(0.0) + cmd.param('P').unwrap_or(0.0) / 1000.0;
                let d = Duration::from_secs_f64((secs.max(0.0) / f).min(1e6));
                Next::Wait(Wait::Sync(AfterSync::Dwell(d)))
            }
            ('G', Some(20 | 21)) => Next::Ok,
            ('G', Some(28)) => Next::Wait(Wait::Sync(AfterSync::Home(self.home(&cmd)))),
            ('G', Some(90)) => {
                self.relative = false;
                self.relative_e = false;
                Next::Ok
            }
            ('G', Some(91)) => {
                self.relative = true;
                self.relative_e = true;
                Next::Ok
            }
            ('G', Some(92)) => {
                let mut any = false;
                for (i, axis) in ['X', 'Y', 'Z', 'E'].into_iter().enumerate() {
                    if let Some(v) = cmd.param(axis) {
                        self.position[i] = v;
                        any = true;
                    }
                }
                if !any {
                    self.position = [0.0; 4];
                }
                Next::Ok
            }
            ('M', Some(17 | 18 | 84)) => {
                if cmd.params().next().is_some() {
                    Next::Ok
                } else {
                    Next::Wait(Wait::Sync(AfterSync::Ok))
                }
            }
            ('M', Some(27)) => {
                self.emit("Not SD printing");
                Next::Ok
            }
            ('M', Some(31)) => {
                self.emit("echo:Print time: 0s");
                Next::Ok
            }
            ('M', Some(73)) => {
                if let Some(p) = cmd.param('P') {
                    self.stats.progress.percent = Some(p.clamp(0.0, 100.0) as u32);
                }
                if let Some(r) = cmd.param('R') {
                    self.stats.progress.remaining_minutes = Some(r.max(0.0) as u32);
                }
                Next::Ok
            }
            ('M', Some(82)) => {
                self.relative_e = false;
                Next::Ok
            }
            ('M', Some(83)) => {
                self.relative_e = true;
                Next::Ok
            }
            ('M', Some(104 | 140)) => {
                if let Some(s) = cmd.param('S') {
                    let heater = if cmd.is('M', 140) {
                        &mut self.bed
                    } else {
                        &mut self.hotend
                    };
                    heater.set_target(now, f, s);
                }
                Next::Ok
            }
            ('M', Some(105)) => {
                let line = format!("ok {}", self.temps_text());
                self.emit(&line);
                Next::NoOk
            }
            ('M', Some(106)) => {
                self.fan = cmd.param('S').unwrap_or(255.0).clamp(0.0, 255.0) as u32;
                Next::Ok
            }
            ('M', Some(107)) => {
                self.fan = 0;
                Next::Ok
            }
            ('M', Some(109 | 190)) => self.wait_heater(&cmd),
            ('M', Some(110)) => {
                if let Some(n) = cmd.param('N') {
                    self.last_n = n as i64;
                }
                Next::Ok
            }
            ('M', Some(114)) => {
                let [x, y, z, e] = self.position;
                self.emit(&format!(
                    "X:{x:.2} Y:{y:.2} Z:{z:.2} E:{e:.2} Count X:{} Y:{} Z:{}",
                    (x * 80.0).round() as i64,
                    (y * 80.0).round() as i64,
                    (z * 400.0).round() as i64
                ));
                Next::Ok
            }
            ('M', Some(115)) => {
                self.m115();
                Next::Ok
            }
            ('M', Some(118)) => {
                self.m118(cmd.rest);
                Next::Ok
            }
            ('M', Some(155)) => {
                let secs = cmd.param('S').unwrap_or(0.0).clamp(0.0, 60.0);
                self.autoreport = (secs >= 1.0).then(|| {
                    let interval = Duration::from_secs(secs as u64);
                    (interval, now + interval)
                });
                Next::Ok
            }
            ('M', Some(220)) => {
                if let Some(s) = cmd.param('S') {
                    self.feed_percent = s.clamp(10.0, 999.0);
                }
                Next::Ok
            }
            ('M', Some(400)) => Next::Wait(Wait::Sync(AfterSync::Ok)),
            ('M', Some(500)) => {
                self.emit("echo:Settings Stored (662 bytes; crc 31585)");
                Next::Ok
            }
            ('M', Some(501..=503)) => {
                if cmd.is('M', 503) {
                    self.emit("echo:; Steps per unit:");
                    self.emit("echo: M92 X80.00 Y80.00 Z400.00 E93.00");
                }
                Next::Ok
            }
            // With EMERGENCY_PARSER these three are no-ops here (gcode.cpp `case 108: case 112:
            // case 410: break;`): the parser acted when the line arrived. Without it, M108 has
            // nothing to cancel by the time it runs (lines are read only between commands).
            ('M', Some(108)) => Next::Ok,
            ('M', Some(112)) if !self.cfg.emergency_parser => {
                // A spelling the early check missed (`M0112`): Marlin's M112() kills too.
                self.kill();
                self.log_kill(now, false);
                Next::NoOk
            }
            ('M', Some(410)) if !self.cfg.emergency_parser => {
                // M410(): quickstop_stepper(), whose one-second hold delays this ok.
                let effect = self.quickstop();
                self.log_emergency(now, EmergencyCommand::M410, false, effect);
                Next::Wait(Wait::Sync(AfterSync::Ok))
            }
            ('M', Some(112 | 410)) => Next::Ok,
            ('M', Some(75..=78 | 80 | 81 | 111 | 117 | 119 | 121 | 120 | 201..=209)) => Next::Ok,
            ('M', Some(211 | 221 | 300 | 302 | 412 | 413 | 420 | 851 | 900 | 907 | 999)) => {
                Next::Ok
            }
            ('T', Some(0)) => Next::Ok,
            ('T', Some(n)) => {
                self.emit(&format!("echo:Invalid extruder {n}"));
                Next::Ok
            }
            _ => self.unknown(&text),
        }
    }

    fn unknown(&mut self, text: &str) -> Next {
        self.stats.unknown_commands += 1;
        self.emit(&format!("echo:Unknown command: \"{text}\""));
        Next::Ok
    }

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

    fn linear_move(&mut self, cmd: &Command<'_>) -> Next {
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

    fn arc_move(&mut self, cmd: &Command<'_>) -> Next {
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
    fn home(&mut self, cmd: &Command<'_>) -> Duration {
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

    fn wait_heater(&mut self, cmd: &Command<'_>) -> Next {
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

    fn m115(&mut self) {
        let info = format!(
            "FIRMWARE_NAME:{FIRMWARE_VERSION} (printloop-sim) SOURCE_CODE_URL:github.com/MarlinFirmware/Marlin PROTOCOL_VERSION:1.0 MACHINE_TYPE:printloop-sim EXTRUDER_COUNT:1 UUID:{}",
            self.uuid
        );
        self.emit(&info);
        for (cap, on) in [
            ("SERIAL_XON_XOFF", false),
            ("BINARY_FILE_TRANSFER", false),
            ("EEPROM", true),
            ("VOLUMETRIC", true),
            ("AUTOREPORT_POS", false),
            ("AUTOREPORT_TEMP", true),
            ("PROGRESS", true),
            ("PRINT_JOB", true),
            ("AUTOLEVEL", false),
            ("RUNOUT", false),
            ("Z_PROBE", false),
            ("LEVELING_DATA", false),
            ("BUILD_PERCENT", true),
            ("SOFTWARE_POWER", false),
            ("TOGGLE_LIGHTS", false),
            ("CASE_LIGHT_BRIGHTNESS", false),
            ("EMERGENCY_PARSER", self.cfg.emergency_parser),
            ("HOST_ACTION_COMMANDS", true),
            ("PROMPT_SUPPORT", false),
            ("SDCARD", false),
            ("AUTOREPORT_SD_STATUS", false),
            ("THERMAL_PROTECTION", true),
            ("MOTION_MODES", false),
            ("ARCS", true),
            ("BABYSTEPPING", false),
            ("CHAMBER_TEMPERATURE", false),
        ] {
            self.emit(&format!("Cap:{cap}:{}", u8::from(on)));
        }
    }

    /// `M118 [A1] [E1] [Pn] text`: A1 prefixes `//`, E1 prefixes `echo:`.
    fn m118(&mut self, rest: &str) {
        let mut prefix = "";
        let mut text = rest;
        loop {
            let t = text.trim_start();
            let flag = t.get(..2);
            match flag {
                Some("A1") => prefix = "//",
                Some("E1") => prefix = "echo:",
                Some(p) if p.starts_with('P') && p[1..].chars().all(|c| c.is_ascii_digit()) => {}
                _ => break,
            }
            text = &t[2..];
        }
        self.emit(&format!("{prefix}{}", text.trim()));
    }

    fn temps_text(&self) -> String {
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

    // ---- lifecycle --------------------------------------------------------------------

    fn reset(&mut self) {
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

    fn banner(&mut self) {
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
    fn kill(&mut self) {
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

/// Time to serialise `n` bytes at `baud` (8N1: 10 bits a byte).
fn wire_time(baud: u64, n: usize) -> Duration {
    let ns = (n as u128 * 10_000_000_000) / u128::from(baud.max(1));
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

fn min_opt(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
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

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// C `strtol(s, NULL, 10)`: leading spaces, optional sign, digits; 0 when there are none.
fn strtol(s: &[u8]) -> i64 {
    let mut i = s.iter().take_while(|b| **b == b' ').count();
    let negative = match s.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let mut v: i64 = 0;
    while let Some(d) = s.get(i).filter(|b| b.is_ascii_digit()) {
        v = v.saturating_mul(10).saturating_add(i64::from(d - b'0'));
        i += 1;
    }
    if negative {
        -v
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strtol_like_c() {
        assert_eq!(strtol(b"12 G1"), 12);
        assert_eq!(strtol(b"  -3"), -3);
        assert_eq!(strtol(b"x"), 0);
        assert_eq!(strtol(b""), 0);
        assert_eq!(strtol(b"99999999999999999999999"), i64::MAX);
    }

    #[test]
    fn wire_times_are_exact_for_250000_baud() {
        let w = Wire::new(250_000);
        assert_eq!(w.time(1), Duration::from_micros(40));
        assert_eq!(w.time(25_000), Duration::from_secs(1));
        let w = Wire::new(115_200);
        assert_eq!(w.time(11_520), Duration::from_secs(1));
    }

    #[test]
    fn wire_drain_matches_pop() {
        let mut a = Wire::new(115_200);
        let mut b = Wire::new(115_200);
        for w in [&mut a, &mut b] {
            w.push(Duration::ZERO, b"hello world".to_vec());
            w.push(Duration::from_millis(5), b"again".to_vec());
        }
        for ms in [0u64, 1, 2, 3, 5, 6, 7, 100] {
            let now = Duration::from_millis(ms);
            let mut drained = Vec::new();
            a.drain_arrived(now, &mut drained);
            let mut popped = Vec::new();
            while let Some((_, x)) = b.pop_arrived(now) {
                popped.push(x);
            }
            assert_eq!(drained, popped, "at {ms} ms");
        }
        assert_eq!(a.pending, 0);
    }
}
