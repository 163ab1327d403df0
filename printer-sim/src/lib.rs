//! A simulated Marlin 2.1 printer: the default "hardware" of printloop's demo, tests and
//! benchmarks.
//!
//! # Two layers
//!
//! - [`Firmware`] is a **sans-IO core**: a discrete-event model of a Marlin board *and* of the
//!   serial wire in front of it. It never reads a clock, spawns a task or touches a file
//!   descriptor. Time is a [`Duration`](std::time::Duration) since the simulation began, passed
//!   into every call: [`Firmware::receive`] (the host wrote bytes), [`Firmware::poll_output`]
//!   (bytes that reached the host by now), [`Firmware::next_deadline`] (when to come back),
//!   [`Firmware::host_opened`] / [`Firmware::host_closed`], [`Firmware::inject`]. The same
//!   inputs at the same times with the same seed give the same bytes, so hundreds of printers
//!   can run in one thread in virtual time.
//! - [`Simulator::start`] is the **tokio shell**: it creates a pseudo-terminal, links its slave
//!   device at a path of your choice, maps real time to core time (× `speed`), and serves
//!   until [`SimHandle::shutdown`]. A client opens the device like a USB serial port.
//!   [`SimHandle::control`] injects faults at run time, [`SimHandle::stats`] /
//!   [`SimHandle::wait_for`] observe it. `printloop sim` ([`cli`]) runs one from the command
//!   line.
//!
//! # The model
//!
//! **Wire.** Each direction carries one byte per 10 bit times (8N1) at `baud` (250000).
//! Whatever the host writes queues on the host side (`host_tx_buffer`, 4096 bytes — the
//! adapter's buffer; beyond it the shell stops reading the pty and the client's `write`
//! blocks) and reaches the board one byte at a time. Pty writes are instant, so the shell
//! paces everything by the model: a byte counts as received only when the wire would have
//! delivered it, and output is written to the pty when its last bit would have arrived.
//! Measured over a pty at speed 1: within ~0.2 % of `baud / 10` bytes per second.
//!
//! **Board.** Bytes land in a UART buffer of `rx_buffer` bytes (128); when it is full,
//! arriving bytes are lost, exactly like an overrun, and surface later as a checksum or
//! line-number error and a resend. Marlin's main loop reads that buffer into `bufsize` (4)
//! command slots only between commands, so while a command blocks (M109, G28, G4, M400, a move
//! waiting for the planner) nothing is read. Line validation follows Marlin 2.1's
//! `get_serial_commands`: `N<n> … *<xor>`; the line number is checked first (`Error:Line
//! Number is not Last Line Number+1, Last Line: <last>`), then the checksum (`Error:checksum
//! mismatch, …`, or `Error:No Checksum with line number, …`); each error empties the RX buffer
//! and sends `Resend: <last+1>` and `ok`. `M110 N<k>` resets numbering; lines without `N` are
//! not checked. Every command costs `command_time` (200 µs) of firmware CPU, then answers `ok`
//! (`ok N<n> P<planner free> B<free slots>` with `advanced_ok`; B counts the executing command
//! as occupied, so an idle board says `P15 B3`).
//!
//! **Motion.** A planner of `planner_blocks` (16; as in Marlin one slot stays empty, so 15
//! moves fit). A move's `ok` is sent when it enters the planner, so oks stall while it is full.
//! Block time = distance / feedrate (F in mm/min, modal, `M220` applies), at least
//! distance / Marlin's per-axis maximum (300, 300, 5, 25 mm/s), no acceleration. G2/G3 arcs
//! (I/J or R) become 1 mm segments, one block each. G28 takes travel / homing feedrate plus
//! 0.5 s per axis. G4, M400 and M84 wait for the planner to drain.
//!
//! **Heat.** First-order: a heater at full power approaches a ceiling exponentially (hotend
//! 20 → 215 °C in ≈ 45 s, bed 20 → 60 °C in ≈ 55 s), an idle one decays to ambient, a reached
//! target is held exactly (no overshoot, no PID ripple). M109/M190 `S` wait for heating, `R`
//! also for cooling, until within 1 °C (no residency time), printing a temperature line every
//! second. `echo:busy: processing` every 2 s while any command blocks. `M155 S<n>`
//! auto-reports.
//!
//! **Emergency parser** (`emergency_parser`, on by default, as in most Marlin builds; M115
//! says `Cap:EMERGENCY_PARSER:1`). Marlin 2.1.2's `EmergencyParser::update` state machine runs
//! in the receive interrupt on every byte as it arrives — before the RX buffer, so a byte lost
//! to an overflow is still parsed, and whatever the command queue is doing. It recognises
//! `M108`, `M112` and `M410`, optionally after `N<n>`, and acts at the line's `\n`/`\r`
//! (anything between the word and the line end is skipped: `N7 M112*38`, `M112 x` and even
//! `M1123` act). M108 ends a running M109/M190 wait at once (its `ok` follows, the target
//! stays); M112 is `kill()` at once, even during G4 or a heat wait; M410 drops the planner and
//! stops the head where it is (the position becomes that point), then holds the main loop for
//! Marlin's one-second cleaning window (`quickstop_stepper()`); a move that was waiting for a
//! planner slot is not dropped but runs afterwards from where the head stopped. G4 is not cut
//! short by M108 or M410. When such a line later reaches the command queue it is a no-op
//! answered `ok`. While the main loop is hung the parser still sees the bytes, but M112 and
//! M410 act only when the loop runs again (Marlin applies them in `idle()`); nothing is parsed
//! while booting or halted. Every action is counted in [`Stats`], kept as
//! [`Stats::last_emergency`] and handed to the shell ([`Firmware::poll_emergency`]), which logs
//! one INFO line each (`emergency parser: M112 at 12.345 s: heaters off …`). With the parser
//! off, M112 and M410 act only when the main loop reads their line (between commands; M410
//! again when it executes), and M108 never interrupts anything.
//!
//! **Time scales.** The shell runs the core at `speed` × real time (wire, timers, motion,
//! heat all scale). `motion_speed` overrides motion and heat only, relative to real time:
//! `speed = 1, motion_speed = Some(1e6)` streams at the true wire rate with instant moves.
//!
//! **Port open = reset.** Opening the device resets the board (DTR), after `boot_time` (0) it
//! prints the `start` banner; numbering and all state are lost (a print in progress is gone),
//! temperatures physically remain. Output the previous client did not read is discarded. The
//! shell notices opens by polling the master for the end of HUP every 5 ms.
//!
//! **Faults** (config and [`SimControl`]), all random choices from a splitmix64 seeded by
//! `seed`: checksum errors at a rate per line or at given line numbers (once each); `garble`
//! rate per output line (1–2 bytes replaced); hang (nothing answered, input discarded — the
//! emergency parser still sees it — until unhang or reset); thermal runaway (`Error:Thermal
//! Runaway, system stopped! Heater_ID: 0`, `Error:Printer halted. kill() called!`, then
//! silence until a reset/reopen); reset (a `start` banner mid-stream); cable pull (the pty
//! closes: the client reads end-of-file and writes fail; the link disappears like a USB device
//! node) and replug (a fresh pty, the link re-pointed).
//!
//! # What is simplified
//!
//! No acceleration, jerk or junction planning (moves are faster than a slicer's estimate); no
//! delay before the first block; G20 inches ignored; one extruder; no SD card (`M27` says
//! `Not SD printing`); M410 does not interrupt homing (G28 is a timed wait, not planner moves);
//! without the emergency parser, M112/M410 are caught when read even with a line number
//! (Marlin's early check only sees unnumbered lines) and M108 never acts (Marlin would end a
//! heat wait if it read the line in `idle()`); TX never blocks the firmware (Marlin's blocking
//! serial writes would slow processing a little); opening the port resets with no bootloader
//! delay by default; a client that closes and reopens within one poll (5 ms) may not get a
//! reset.
//!
//! Commands understood: G0–G4, G20, G21, G28, G90–G92, M17, M18, M27, M31, M73, M75–M78,
//! M80, M81, M82–M84, M104–M112, M114, M115, M117–M121, M140, M155, M190, M201–M209, M211,
//! M220, M221, M300, M302, M400, M410, M412, M413, M420, M500–M503, M851, M900, M907, M999,
//! T0; anything else gets `echo:Unknown command: "<cmd>"` and `ok`.
pub mod cli;
mod config;
mod e_parser;
mod error;
pub mod firmware;
mod gcode;
mod heater;
mod rng;
mod shell;

pub use config::SimConfig;
pub use e_parser::EmergencyCommand;
pub use error::SimError;
pub use firmware::{
    EmergencyAction, EmergencyEffect, Fault, Firmware, Phase, Progress, Stats, TempStatus,
};
pub use rng::SplitMix64;
pub use shell::{SimControl, SimHandle, SimStats, Simulator};
