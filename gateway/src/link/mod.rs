//! Sans-IO Marlin host driver: numbered lines with checksums, resend history, ping-pong or
//! send-ahead streaming, handshake, timeouts and firmware messages.
//!
//! The driver does no IO, reads no clock and spawns nothing. Its shell
//! ([`crate::serial::SerialLink`]) feeds it what happens and carries out what it asks:
//!
//! ```text
//!  port opened ──► on_open(now)            poll_transmit() ──► bytes to write
//!  line read   ──► on_line(now, text)      poll_event()    ──► LinkEvent for the gateway core
//!  timer fired ──► on_timeout(now)         next_deadline() ──► when to call on_timeout
//!  core        ──► submit / send_now / pause_stream / resume_stream / clear / emergency_stop
//! ```
//!
//! After every input call, drain `poll_transmit` and `poll_event` and re-arm the timer from
//! `next_deadline`.
//!
//! # Protocol
//! Every command goes out as `N<n> <cmd>*<checksum>` (`M110 N0` first). Each line is kept in a
//! bounded history for `Resend: n` / `rs n`; a request for a line no longer kept is a
//! [`LinkEvent::LinkError`]. The `ok` that Marlin prints after each resend request is
//! swallowed. In ping-pong mode one line is in flight; with `ADVANCED_OK` (and
//! [`StreamMode::Auto`]) lines are sent ahead while fewer than the firmware's command slots
//! (learned from `B`) are unacknowledged and their bytes fit [`LinkConfig::rx_buffer`]. After a
//! resend request in send-ahead mode the driver re-sends one line at a time and ignores the
//! repeated requests that the lines already on the wire are bound to provoke, until the
//! re-sent line is acknowledged.
//!
//! # Timeouts
//! The oldest unacknowledged line must see progress (`ok`, `echo:busy:`, and for heating /
//! homing / dwell commands any temperature line) within [`LinkConfig::response_timeout`];
//! otherwise the driver sends a numbered `M105` as a probe: if a line was lost the firmware
//! answers with a resend request, if an `ok` was lost the `ok T:` answers it. After
//! [`LinkConfig::probe_retries`] unanswered probes it reports [`LinkEvent::Timeout`].
use std::collections::VecDeque;
use std::time::Instant;

use protocol::marlin::{self, Response, Temps};
use tracing::{debug, trace, warn};

mod config;
mod event;
mod framer;
#[cfg(test)]
mod tests;

pub use config::{LinkConfig, StreamMode};
pub use event::{FirmwareInfo, LinkEvent, TimeoutKind};
pub use framer::{LineFramer, OVERLONG};

/// Longest line the driver keeps as text in an event; longer ones are cut.
const EVENT_TEXT_MAX: usize = 160;

/// Most `Cap:` entries kept per session (Marlin 2.1 reports about 30).
const MAX_CAPABILITIES: usize = 64;

/// Strips `;` comments and blank lines: the lines of a G-code file that should be
/// [submitted](Link::submit), in order.
pub fn gcode_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().filter_map(marlin::strip_comment)
}

/// Why a line was refused by [`Link::submit`] / [`Link::send_now`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Nothing left after stripping the comment.
    #[error("empty command")]
    Empty,
    /// A line break inside the command would split it on the wire.
    #[error("command contains a line break")]
    LineBreak,
    /// Longer than Marlin's `MAX_CMD_SIZE` (96) once numbered.
    #[error("command too long ({0} bytes)")]
    TooLong(usize),
}

/// Marlin's `MAX_CMD_SIZE` less its terminator: longer numbered lines are cut by the firmware.
const MAX_WIRE_LINE: usize = 95;

/// Checks a command as [`Link::submit`] would and returns it without comment and whitespace.
pub fn check_command(cmd: &str) -> Result<&str, SubmitError> {
    let cmd = marlin::strip_comment(cmd).ok_or(SubmitError::Empty)?;
    if cmd.contains(['\n', '\r']) {
        return Err(SubmitError::LineBreak);
    }
    // "N4294967295 " + cmd + "*255"
    let wire = cmd.len() + 16;
    if wire > MAX_WIRE_LINE {
        return Err(SubmitError::TooLong(cmd.len()));
    }
    Ok(cmd)
}

/// What a numbered line is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A submitted print line, with its 1-based sequence number.
    Print(u64),
    /// A `send_now` command.
    Urgent,
    /// A line of [`Link::make_safe`]; `heaters_off` on the last heater line, whose
    /// acknowledgement means both heaters are off.
    Safety { heaters_off: bool },
    /// Handshake step.
    Handshake(Step),
    /// Temperature poll / timeout probe.
    Poll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    M110,
    M115,
    M155,
}

#[derive(Debug)]
struct Entry {
    n: u32,
    kind: Kind,
    /// `N<n> <cmd>*<cs>\n`.
    wire: Vec<u8>,
    /// Blocking command (long timeout, kept alive by temperature lines).
    blocking: bool,
    /// `M105` (its `ok T:` answer carries no `N`).
    m105: bool,
}

#[derive(Debug, Clone, Copy)]
struct Sent {
    n: u32,
    len: usize,
    at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    /// Port open, waiting for `start` (or the boot timeout).
    Booting {
        until: Instant,
    },
    /// `M110`/`M115`/`M155` exchange.
    Handshake,
    Ready,
    /// Fatal firmware error: nothing is sent until `start` or a new open.
    Halted,
    /// Timeout or unrecoverable protocol error: nothing is sent until `on_open`.
    Failed,
}

/// Re-sending after a resend request.
#[derive(Debug, Clone, Copy)]
struct Recovery {
    /// The requested line.
    line: u32,
    /// Requests for the same line still expected from lines that were on the wire.
    stale: usize,
}

/// Counters of the link since it was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkStats {
    /// Numbered lines written (re-sends included).
    pub lines_sent: u64,
    /// Bytes of those lines.
    pub bytes_sent: u64,
    /// Lines written again because of a resend request or probe.
    pub lines_resent: u64,
    /// Resend requests acted upon.
    pub resend_requests: u64,
    /// Resend requests ignored as repeats provoked by lines already on the wire.
    pub stale_resend_requests: u64,
    /// Probes sent after a timeout.
    pub probes: u64,
    /// Garbled lines received.
    pub garbage_lines: u64,
    /// Most lines in flight at once.
    pub peak_in_flight: usize,
}

/// The Marlin host driver. See the [module docs](self).
#[derive(Debug)]
pub struct Link {
    cfg: LinkConfig,
    state: State,
    /// The firmware as learned in this session.
    firmware: FirmwareInfo,
    // ---- queues --------------------------------------------------------------------------
    /// Submitted print lines not yet numbered, with their sequence number.
    print_queue: VecDeque<(u64, String)>,
    /// `send_now` commands and polls not yet numbered.
    urgent: VecDeque<(Kind, String)>,
    paused: bool,
    /// Sequence number the next submitted print line gets.
    next_seq: u64,
    acked: u64,
    // ---- numbered lines ------------------------------------------------------------------
    /// Number of the next new line.
    next_n: u32,
    /// Lines `history.front().n ..= next_n - 1` (bounded).
    history: VecDeque<Entry>,
    /// Next line to write from history (== `next_n` when nothing waits for a re-send).
    send_cursor: u32,
    in_flight: VecDeque<Sent>,
    in_flight_bytes: usize,
    /// Command slots learned from `B` (max seen + 1); 1 until known.
    slots: usize,
    /// `ok`s still to swallow (one follows each resend request).
    swallow_ok: u32,
    /// Resend number announced by an `Error:… Last Line:` whose `Resend:` line is still due.
    pending_resend_line: Option<u32>,
    recovery: Option<Recovery>,
    // ---- timers --------------------------------------------------------------------------
    /// The latest time an input call passed in.
    now: Option<Instant>,
    last_rx: Option<Instant>,
    /// Last sign that the oldest line is being worked on.
    last_progress: Option<Instant>,
    probes: u32,
    next_poll: Option<Instant>,
    /// [`Link::make_safe`] waits for the heaters-off acknowledgement until this instant, then
    /// sends `M112`.
    safe_by: Option<Instant>,
    /// The link sent `M112` itself: the firmware's kill message that follows is expected.
    stopped_by_us: bool,
    // ---- output --------------------------------------------------------------------------
    transmit: VecDeque<Vec<u8>>,
    events: VecDeque<LinkEvent>,
    stats: LinkStats,
}

impl Link {
    /// A link whose port is not open yet (call [`Link::on_open`]).
    pub fn new(cfg: LinkConfig) -> Self {
        let mut cfg = cfg;
        cfg.history = cfg.history.max(cfg.max_in_flight).max(8);
        cfg.max_in_flight = cfg.max_in_flight.max(1);
        Self {
            cfg,
            state: State::Closed,
            firmware: FirmwareInfo::default(),
            print_queue: VecDeque::new(),
            urgent: VecDeque::new(),
            paused: false,
            next_seq: 1,
            acked: 0,
            next_n: 0,
            history: VecDeque::new(),
            send_cursor: 0,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            slots: 1,
            swallow_ok: 0,
            pending_resend_line: None,
            recovery: None,
            now: None,
            last_rx: None,
            last_progress: None,
            probes: 0,
            next_poll: None,
            safe_by: None,
            stopped_by_us: false,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            stats: LinkStats::default(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &LinkConfig {
        &self.cfg
    }

    // ---- core API ------------------------------------------------------------------------

    /// Queues one print line (comment-free, see [`gcode_lines`]) for streaming. Returns its
    /// sequence number, which [`LinkEvent::Acked`] reports when the firmware has it.
    pub fn submit(&mut self, line: &str) -> Result<u64, SubmitError> {
        let cmd = check_command(line)?;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.print_queue.push_back((seq, cmd.to_owned()));
        Ok(seq)
    }

    /// Queues an out-of-band command ahead of every print line (`M105`, `M155`, `M117`, …).
    /// For an emergency stop use [`Link::emergency_stop`], which does not wait for its turn.
    pub fn send_now(&mut self, cmd: &str) -> Result<(), SubmitError> {
        let cmd = check_command(cmd)?;
        self.urgent.push_back((Kind::Urgent, cmd.to_owned()));
        Ok(())
    }

    /// Writes an unnumbered `M112` at once, ahead of everything (Marlin handles it as soon as
    /// it is parsed). The firmware answers with a kill: expect [`LinkEvent::Fatal`].
    pub fn emergency_stop(&mut self) {
        self.transmit.push_front(b"M112\n".to_vec());
    }

    /// Writes `cmd` unnumbered ahead of everything, if the firmware has an emergency parser
    /// (which acts on it as it arrives). The queue answers it later with an `ok`: with
    /// ADVANCED_OK that names the last numbered line, which is harmless; without, it would be
    /// taken for the oldest line's, so one `ok` is swallowed.
    fn emergency_line(&mut self, cmd: &str) {
        if !self.firmware.has("EMERGENCY_PARSER") {
            return;
        }
        self.transmit.push_front(format!("{cmd}\n").into_bytes());
        if !self.firmware.advanced_ok {
            self.swallow_ok += 1;
        }
    }

    /// Makes the printer safe at once (a cancel, a halt, a fault): drops the queued print
    /// lines and queues `M104 S0`, `M140 S0`, `M107`, `M84` ahead of all else. On a firmware
    /// with Marlin's emergency parser it first writes `M108`, which ends a temperature wait
    /// even while the firmware's queue is blocked.
    ///
    /// - `M104 S0` and `M140 S0` acknowledged within [`LinkConfig::safe_within`]: the heaters
    ///   are off, and `M410` (emergency parser) stops the moves still planned. (`M410` holds
    ///   Marlin's queue for a second, so it is not sent before the heaters are off.)
    /// - Not acknowledged in time (a long `G4` or a slow move blocks the queue): `M112`. The
    ///   heaters and motors go off at once and the printer halts until it is reset;
    ///   [`LinkEvent::Fatal`] says why.
    ///
    /// Without the emergency parser Marlin reads `M112` only when its queue has room, so a
    /// blocking command ends first (the gateway warns about such firmware when it connects).
    pub fn make_safe(&mut self, now: Instant) {
        self.now = Some(now);
        self.print_queue.clear();
        self.paused = false;
        self.urgent
            .retain(|(k, _)| !matches!(k, Kind::Safety { .. }));
        let lines = ["M104 S0", "M140 S0", "M107", "M84"];
        for (i, cmd) in lines.into_iter().enumerate() {
            let kind = Kind::Safety {
                heaters_off: i == 1,
            };
            self.urgent.push_back((kind, cmd.to_owned()));
        }
        if self.state != State::Ready {
            // Halted (killed), booting after a reset, or closed: the heaters are off already
            // or nothing can be told; the lines above go first when the link is back.
            return;
        }
        self.emergency_line("M108");
        self.safe_by = Some(now + self.cfg.safe_within);
        debug!("making the printer safe");
        self.fill();
    }

    /// Print lines submitted but not yet written.
    pub fn queued(&self) -> usize {
        self.print_queue.len()
    }

    /// Lines written and not yet acknowledged (print lines and others).
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Print lines acknowledged so far (a count: lines dropped by [`Link::clear`], a reset or
    /// a closed port never count, so after such a drop it is less than the last `seq`).
    pub fn acked_count(&self) -> u64 {
        self.acked
    }

    /// Whether the handshake is done and lines stream.
    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    /// What the firmware said in the handshake.
    pub fn firmware(&self) -> &FirmwareInfo {
        &self.firmware
    }

    /// Whether send-ahead is in effect right now.
    pub fn sending_ahead(&self) -> bool {
        self.cfg.mode == StreamMode::Auto && self.firmware.advanced_ok && self.recovery.is_none()
    }

    /// Counters.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Stops taking new print lines (lines in flight still complete; `send_now` still works).
    pub fn pause_stream(&mut self) {
        self.paused = true;
    }

    /// Resumes streaming print lines.
    pub fn resume_stream(&mut self) {
        self.paused = false;
        self.fill();
    }

    /// Drops every queued print line (cancel) and returns how many. Lines already written
    /// complete normally. Sequence numbers are never reused: the next submission continues
    /// after the dropped ones.
    pub fn clear(&mut self) -> usize {
        let n = self.print_queue.len();
        self.print_queue.clear();
        n
    }

    // ---- IO inputs -----------------------------------------------------------------------

    /// The port has just been opened (the board probably resets now).
    pub fn on_open(&mut self, now: Instant) {
        self.now = Some(now);
        debug!("port opened, waiting for the start banner");
        self.reset_session();
        self.state = State::Booting {
            until: now + self.cfg.boot_timeout,
        };
        self.last_rx = None;
    }

    /// The port was closed or lost. The board resets when the port opens again, so the print
    /// cannot go on: queued and unacknowledged print lines are dropped (their count is
    /// returned); `send_now` commands stay queued for the next session.
    pub fn on_close(&mut self) -> u64 {
        let dropped = self.unfinished_print_lines();
        self.print_queue.clear();
        self.reset_session();
        self.state = State::Closed;
        dropped
    }

    /// Print lines queued, in flight, or waiting to be re-sent.
    fn unfinished_print_lines(&self) -> u64 {
        let mut n = self.print_queue.len() as u64;
        n += self
            .in_flight
            .iter()
            .filter(|s| matches!(self.entry(s.n).map(|e| e.kind), Some(Kind::Print(_))))
            .count() as u64;
        n += self
            .history
            .iter()
            .filter(|e| e.n >= self.send_cursor && matches!(e.kind, Kind::Print(_)))
            .count() as u64;
        n
    }

    /// One line from the printer, without its terminator.
    pub fn on_line(&mut self, now: Instant, line: &str) {
        self.now = Some(now);
        self.last_rx = Some(now);
        let line = line.trim_end_matches(['\r', '\n']);
        if line.trim().is_empty() {
            return;
        }
        if is_garbage(line) {
            self.stats.garbage_lines += 1;
            trace!(line, "garbage from the printer");
            self.events.push_back(LinkEvent::Garbage {
                line: shorten(line),
            });
            return;
        }
        let response = marlin::parse_response(line);
        trace!(?response, "from the printer");
        match response {
            Response::Start => self.on_start(now),
            _ if matches!(self.state, State::Closed) => {}
            Response::Ok {
                line: n,
                planner_free: _,
                buffer_free,
                temps,
            } => self.on_ok(now, n, buffer_free, temps),
            Response::Resend(n) => self.on_resend_line(now, n),
            Response::Busy(_) => {
                self.last_progress = Some(now);
            }
            Response::Temperature(t) => {
                if self.head_is_blocking() {
                    self.last_progress = Some(now);
                }
                self.events.push_back(LinkEvent::Temperatures(t));
            }
            Response::Error(message) => self.on_error(now, message),
            Response::Capability { name, enabled } => {
                // Bounded: a garbling cable or a hostile device cannot grow it forever.
                let caps = &mut self.firmware.capabilities;
                if caps.len() < MAX_CAPABILITIES || caps.contains_key(&name) {
                    caps.insert(name, enabled);
                } else {
                    debug!(%name, "capability dropped: too many reported");
                }
            }
            Response::FirmwareInfo(info) => self.firmware.absorb(info),
            Response::Action(a) => self.events.push_back(LinkEvent::Action(a)),
            Response::Echo(text) => self.events.push_back(LinkEvent::Message(shorten(&text))),
            Response::Other(text) => {
                if self.recovery.is_some() && text.trim().is_empty() {
                    return;
                }
                self.events.push_back(LinkEvent::Message(shorten(&text)));
            }
        }
        self.fill();
    }

    /// The deadline from [`Link::next_deadline`] has passed (calling it early is harmless).
    pub fn on_timeout(&mut self, now: Instant) {
        self.now = Some(now);
        if self.safe_by.is_some_and(|by| now >= by) {
            self.safe_by = None;
            if self.state == State::Ready {
                let message = format!(
                    "emergency stop (M112): the heaters were not confirmed off within {:?} of \
                     the stop (the firmware was busy, e.g. in a long G4); reset the printer",
                    self.cfg.safe_within
                );
                warn!("{message}");
                self.emergency_stop();
                self.stopped_by_us = true;
                self.state = State::Halted;
                self.events.push_back(LinkEvent::Fatal { message });
                return;
            }
        }
        match self.state {
            State::Booting { until } if now >= until => {
                debug!("no start banner; handshaking anyway");
                self.begin_handshake();
            }
            State::Handshake | State::Ready => {
                if let Some(deadline) = self.ack_deadline() {
                    if now >= deadline {
                        self.on_ack_timeout(now);
                    }
                }
                if let Some(at) = self.next_poll {
                    if now >= at && self.state == State::Ready {
                        self.poll_temperature(now);
                    }
                }
            }
            _ => {}
        }
        self.fill();
    }

    // ---- IO outputs ----------------------------------------------------------------------

    /// Bytes to write to the port, one line (with `\n`) at a time. Lines submitted since the
    /// last input are numbered here (stamped with the latest time passed in; call
    /// [`Link::on_timeout`] first if time has moved on since).
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        if self.transmit.is_empty() {
            self.fill();
        }
        self.transmit.pop_front()
    }

    /// The next event for the gateway core.
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    /// When [`Link::on_timeout`] must be called next.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Booting { until } => Some(until),
            State::Handshake | State::Ready => {
                let ack = self.ack_deadline();
                let poll = self.next_poll.filter(|_| self.state == State::Ready);
                match (ack, poll) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            _ => None,
        }
        .into_iter()
        .chain(self.safe_by)
        .min()
    }

    // ---- handshake -----------------------------------------------------------------------

    fn reset_session(&mut self) {
        self.firmware = FirmwareInfo::default();
        self.urgent
            .retain(|(k, _)| matches!(k, Kind::Urgent | Kind::Safety { .. }));
        self.safe_by = None;
        self.stopped_by_us = false;
        self.next_n = 0;
        self.history.clear();
        self.send_cursor = 0;
        self.in_flight.clear();
        self.in_flight_bytes = 0;
        self.slots = 1;
        self.swallow_ok = 0;
        self.pending_resend_line = None;
        self.recovery = None;
        self.last_progress = None;
        self.probes = 0;
        self.next_poll = None;
        self.transmit.clear();
    }

    fn on_start(&mut self, now: Instant) {
        match self.state {
            State::Closed => {}
            State::Booting { .. } => {
                debug!("start banner");
                self.begin_handshake();
            }
            State::Handshake => {
                // A late banner (the board booted slower than `boot_timeout`): start over.
                debug!("start banner during the handshake; handshaking again");
                self.reset_session();
                self.begin_handshake();
            }
            State::Ready | State::Halted | State::Failed => {
                let dropped = self.unfinished_print_lines();
                warn!(dropped, "the printer reset (start banner)");
                self.print_queue.clear();
                self.events.push_back(LinkEvent::Reset { dropped });
                self.reset_session();
                self.last_rx = Some(now);
                self.begin_handshake();
            }
        }
    }

    fn begin_handshake(&mut self) {
        self.state = State::Handshake;
        self.urgent
            .push_front((Kind::Handshake(Step::M115), "M115".to_owned()));
        self.urgent
            .push_front((Kind::Handshake(Step::M110), "M110 N0".to_owned()));
        self.fill();
    }

    fn handshake_step_done(&mut self, now: Instant, step: Step) {
        match step {
            Step::M110 => {}
            Step::M115 => {
                let interval = self.cfg.temperature_interval;
                if !interval.is_zero() && self.firmware.has("AUTOREPORT_TEMP") {
                    let secs = interval.as_secs_f64().round().max(1.0) as u64;
                    // Ahead of anything the core queued meanwhile.
                    self.urgent
                        .push_front((Kind::Handshake(Step::M155), format!("M155 S{secs}")));
                } else {
                    self.become_ready(now);
                }
            }
            Step::M155 => self.become_ready(now),
        }
    }

    fn become_ready(&mut self, now: Instant) {
        self.state = State::Ready;
        if !self.firmware.has("EMERGENCY_PARSER") {
            warn!(
                "the firmware has no emergency parser (M115 Cap:EMERGENCY_PARSER): a cancel \
                 cannot interrupt a long command (G4, M109, a slow move) and waits for it to \
                 end; enable EMERGENCY_PARSER in Marlin's Configuration_adv.h"
            );
        }
        let interval = self.cfg.temperature_interval;
        if !interval.is_zero() && !self.firmware.has("AUTOREPORT_TEMP") {
            self.next_poll = Some(now + interval);
        }
        debug!(firmware = ?self.firmware.name(), advanced_ok = self.firmware.advanced_ok, "link ready");
        self.events.push_back(LinkEvent::Ready {
            firmware: self.firmware.clone(),
        });
    }

    fn poll_temperature(&mut self, now: Instant) {
        self.next_poll = Some(now + self.cfg.temperature_interval);
        let pending = self.urgent.iter().any(|(k, _)| *k == Kind::Poll)
            || self
                .in_flight
                .iter()
                .any(|s| self.entry(s.n).is_some_and(|e| e.m105));
        if !pending {
            self.urgent.push_back((Kind::Poll, "M105".to_owned()));
        }
    }

    // ---- responses -----------------------------------------------------------------------

    fn on_ok(
        &mut self,
        now: Instant,
        n: Option<u32>,
        buffer_free: Option<u32>,
        temps: Option<Temps>,
    ) {
        if let Some(t) = temps.clone() {
            self.events.push_back(LinkEvent::Temperatures(t));
        }
        if self.swallow_ok > 0 {
            self.swallow_ok -= 1;
            trace!("swallowed the ok after a resend request");
            return;
        }
        if matches!(
            self.state,
            State::Booting { .. } | State::Halted | State::Failed
        ) {
            return;
        }
        if let Some(n) = n {
            if n >= self.next_n {
                // Not a line we wrote: a garbled number.
                debug!(n, "ok for a line never written; ignored");
                return;
            }
            if !self.firmware.advanced_ok {
                debug!("firmware has ADVANCED_OK");
            }
            self.firmware.advanced_ok = true;
            if let Some(b) = buffer_free {
                let slots = (b as usize + 1).min(self.cfg.max_in_flight);
                self.slots = self.slots.max(slots);
            }
            self.ack_through(now, n);
            return;
        }
        if temps.is_some() {
            // `ok T:…` answers an M105 (Marlin prints it without N even with ADVANCED_OK):
            // everything sent before it has been taken as well.
            let oldest_m105 = self
                .in_flight
                .iter()
                .filter(|s| self.entry(s.n).is_some_and(|e| e.m105))
                .map(|s| s.n)
                .min();
            if let Some(m) = oldest_m105 {
                self.ack_through(now, m);
                return;
            }
        }
        if self.firmware.advanced_ok {
            // With ADVANCED_OK every numbered line's ok carries N: an ok without it answers
            // a fragment of a line that a resend request cut, i.e. a stale line.
            if let Some(r) = self.recovery.as_mut() {
                r.stale = r.stale.saturating_sub(1);
            }
            return;
        }
        if let Some(oldest) = self.in_flight.iter().map(|s| s.n).min() {
            self.ack_through(now, oldest);
        }
    }

    /// Everything in flight numbered `<= n` has been acknowledged.
    fn ack_through(&mut self, now: Instant, n: u32) {
        let mut done: Vec<u32> = Vec::new();
        let mut bytes = 0;
        self.in_flight.retain(|s| {
            if s.n <= n {
                done.push(s.n);
                bytes += s.len;
                false
            } else {
                true
            }
        });
        if done.is_empty() {
            return;
        }
        self.in_flight_bytes -= bytes;
        self.last_progress = Some(now);
        self.probes = 0;
        if self.recovery.is_some_and(|r| n >= r.line) {
            trace!("re-sent line acknowledged; recovery over");
            self.recovery = None;
        }
        done.sort_unstable();
        for line in done {
            let Some(kind) = self.entry(line).map(|e| e.kind) else {
                continue;
            };
            match kind {
                Kind::Print(seq) => {
                    self.acked += 1;
                    self.events.push_back(LinkEvent::Acked { seq });
                }
                Kind::Handshake(step) => self.handshake_step_done(now, step),
                Kind::Safety { heaters_off: true } if self.safe_by.is_some() => {
                    debug!("heaters off; stopping the moves still planned");
                    self.safe_by = None;
                    self.emergency_line("M410");
                }
                Kind::Urgent | Kind::Poll | Kind::Safety { .. } => {}
            }
        }
    }

    fn on_resend_line(&mut self, now: Instant, n: u32) {
        if self.pending_resend_line == Some(n) {
            // Already handled when its `Error:… Last Line:` arrived.
            self.pending_resend_line = None;
            return;
        }
        self.pending_resend_line = None;
        self.on_resend(now, n);
    }

    fn on_error(&mut self, now: Instant, message: String) {
        if marlin::is_fatal_error(&message) {
            if self.stopped_by_us {
                // The kill that our M112 asked for; LinkEvent::Fatal already said why.
                debug!(%message, "the firmware halted after our emergency stop");
                self.stopped_by_us = false;
                return;
            }
            warn!(%message, "fatal firmware error");
            if !matches!(self.state, State::Closed) {
                self.state = State::Halted;
            }
            self.events.push_back(LinkEvent::Fatal { message });
            return;
        }
        if let Some(last) = last_line_of(&message) {
            // `Error:checksum mismatch, Last Line: 4` is followed by `Resend: 5` and `ok`;
            // act on the first of the two that arrives intact.
            debug!(%message, "line error");
            self.pending_resend_line = None;
            let n = last.wrapping_add(1);
            self.on_resend(now, n);
            self.pending_resend_line = Some(n);
            return;
        }
        self.events.push_back(LinkEvent::FirmwareError { message });
    }

    /// The firmware asks for everything from line `n` again.
    fn on_resend(&mut self, _now: Instant, n: u32) {
        self.swallow_ok += 1;
        if !matches!(self.state, State::Handshake | State::Ready) {
            return;
        }
        if let Some(r) = self.recovery.as_mut() {
            if r.line == n && r.stale > 0 {
                r.stale -= 1;
                self.stats.stale_resend_requests += 1;
                trace!(n, "stale resend request ignored");
                return;
            }
        }
        if n >= self.next_n {
            // Everything we wrote has been taken (e.g. a probe found a lost `ok`).
            trace!(n, "resend request for a line not yet written");
            return;
        }
        let oldest = self.history.front().map(|e| e.n).unwrap_or(self.next_n);
        if n < oldest {
            let message =
                format!("printer asked for line {n} again, the oldest line kept is {oldest}");
            warn!(%message);
            self.state = State::Failed;
            self.events.push_back(LinkEvent::LinkError { message });
            return;
        }
        self.stats.resend_requests += 1;
        // Lines after `n` already on the wire will each provoke the same request.
        let stale = self.in_flight.iter().filter(|s| s.n > n).count();
        let mut bytes = 0;
        self.in_flight.retain(|s| {
            let keep = s.n < n;
            if !keep {
                bytes += s.len;
            }
            keep
        });
        self.in_flight_bytes -= bytes;
        self.send_cursor = self.send_cursor.min(n);
        debug!(n, stale, "resend requested");
        self.recovery = Some(Recovery { line: n, stale });
    }

    // ---- timeouts ------------------------------------------------------------------------

    fn head_is_blocking(&self) -> bool {
        self.in_flight
            .iter()
            .map(|s| s.n)
            .min()
            .and_then(|n| self.entry(n))
            .is_some_and(|e| e.blocking)
    }

    fn ack_deadline(&self) -> Option<Instant> {
        let head = self.in_flight.iter().min_by_key(|s| s.n)?;
        let progress = self.last_progress.unwrap_or(head.at).max(head.at);
        let mut timeout = self.cfg.response_timeout;
        if self.recovery.is_some() && self.probes == 0 {
            timeout = timeout.min(self.cfg.recovery_timeout);
        }
        let mut deadline = progress + timeout;
        if self.head_is_blocking() {
            deadline = deadline.min(head.at + self.cfg.blocking_timeout.max(timeout));
        }
        Some(deadline)
    }

    fn on_ack_timeout(&mut self, now: Instant) {
        if self.probes >= self.cfg.probe_retries {
            let kind = if self.state == State::Handshake {
                TimeoutKind::Handshake
            } else if self
                .last_rx
                .is_none_or(|t| now.duration_since(t) >= self.cfg.response_timeout)
            {
                TimeoutKind::Silent
            } else {
                TimeoutKind::NoAck
            };
            warn!(?kind, "printer does not answer");
            self.state = State::Failed;
            self.events.push_back(LinkEvent::Timeout { kind });
            return;
        }
        self.probes += 1;
        self.stats.probes += 1;
        if let Some(r) = self.recovery.as_mut() {
            r.stale = 0;
        }
        debug!(probe = self.probes, "no answer; probing with M105");
        self.last_progress = Some(now);
        if self.send_cursor < self.next_n {
            // Lines wait to be re-sent: the next of them is the probe (writing a new line
            // behind them would have it written twice).
            let n = self.send_cursor;
            self.send_cursor += 1;
            self.stats.lines_resent += 1;
            self.write(n);
            return;
        }
        // The probe is numbered: a lost line shows as a resend request, a lost `ok` is
        // answered by the probe's `ok T:`.
        self.push_new_line(Kind::Poll, "M105");
    }

    // ---- sending -------------------------------------------------------------------------

    fn entry(&self, n: u32) -> Option<&Entry> {
        let front = self.history.front()?.n;
        let i = n.checked_sub(front)? as usize;
        self.history.get(i)
    }

    fn window_allows(&self, len: usize) -> bool {
        if self.in_flight.is_empty() {
            return true;
        }
        if !self.sending_ahead() {
            return false;
        }
        self.in_flight.len() < self.slots && self.in_flight_bytes + len <= self.cfg.rx_buffer
    }

    /// Writes as many lines as the window allows.
    fn fill(&mut self) {
        loop {
            let streaming = match self.state {
                State::Ready => true,
                State::Handshake => false,
                _ => return,
            };
            if self.send_cursor < self.next_n {
                // Re-send from history.
                let Some(len) = self.entry(self.send_cursor).map(|e| e.wire.len()) else {
                    // Cannot happen: the cursor never drops below the history's front.
                    self.send_cursor = self.next_n;
                    continue;
                };
                if !self.window_allows(len) {
                    return;
                }
                let n = self.send_cursor;
                self.send_cursor += 1;
                self.stats.lines_resent += 1;
                self.write(n);
                continue;
            }
            // A new line: urgent first (handshake lines only before Ready).
            let next = match self.urgent.front() {
                Some((kind, _)) if streaming || matches!(kind, Kind::Handshake(_)) => {
                    self.urgent.pop_front()
                }
                _ if streaming && !self.paused => self
                    .print_queue
                    .front()
                    .map(|(seq, _)| (Kind::Print(*seq), String::new())),
                _ => None,
            };
            let Some((kind, cmd)) = next else { return };
            let cmd = match kind {
                Kind::Print(_) => match self.print_queue.front() {
                    Some((_, c)) => c.clone(),
                    None => return,
                },
                _ => cmd,
            };
            let wire_len = marlin::format_line(self.next_n, &cmd).len() + 1;
            if !self.window_allows(wire_len) {
                if !matches!(kind, Kind::Print(_)) {
                    self.urgent.push_front((kind, cmd));
                }
                return;
            }
            if matches!(kind, Kind::Print(_)) {
                self.print_queue.pop_front();
            }
            self.push_new_line(kind, &cmd);
        }
    }

    /// Numbers and writes a new line right now, window or not (probes).
    fn push_new_line(&mut self, kind: Kind, cmd: &str) {
        let n = self.next_n;
        let mut wire = marlin::format_line(n, cmd).into_bytes();
        wire.push(b'\n');
        self.history.push_back(Entry {
            n,
            kind,
            wire,
            blocking: is_blocking(cmd),
            m105: is_m105(cmd),
        });
        self.next_n = self.next_n.wrapping_add(1);
        if self.send_cursor == n {
            self.send_cursor = self.next_n;
        }
        self.write(n);
        self.trim_history();
    }

    fn trim_history(&mut self) {
        let oldest_needed = self
            .in_flight
            .iter()
            .map(|s| s.n)
            .min()
            .unwrap_or(self.send_cursor)
            .min(self.send_cursor);
        while self.history.len() > self.cfg.history {
            match self.history.front() {
                Some(e) if e.n < oldest_needed => {
                    self.history.pop_front();
                }
                _ => break,
            }
        }
    }

    fn write(&mut self, n: u32) {
        let Some(entry) = self.entry(n) else { return };
        let wire = entry.wire.clone();
        let len = wire.len();
        trace!(line = %String::from_utf8_lossy(&wire[..len.saturating_sub(1)]), "to the printer");
        self.transmit.push_back(wire);
        self.stats.lines_sent += 1;
        self.stats.bytes_sent += len as u64;
        // Nothing is written before `on_open` has passed a time in.
        let Some(at) = self.now else { return };
        if self.in_flight.is_empty() {
            // A fresh wait: measure progress from now.
            self.last_progress = Some(at);
        }
        self.in_flight.push_back(Sent { n, len, at });
        self.in_flight_bytes += len;
        self.stats.peak_in_flight = self.stats.peak_in_flight.max(self.in_flight.len());
    }
}

/// Heating waits, homing, probing, dwell and planner sync: they may take minutes, and the
/// firmware keeps the link alive with `busy:` and temperature lines meanwhile.
fn is_blocking(cmd: &str) -> bool {
    let word = cmd.split_whitespace().next().unwrap_or("");
    matches!(
        word.to_ascii_uppercase().as_str(),
        "M109" | "M190" | "M191" | "G28" | "G29" | "M400" | "G4" | "M303" | "M226"
    )
}

fn is_m105(cmd: &str) -> bool {
    cmd.split_whitespace()
        .next()
        .is_some_and(|w| w.eq_ignore_ascii_case("M105"))
}

/// `…, Last Line: 4` in Marlin's line errors.
fn last_line_of(message: &str) -> Option<u32> {
    let i = message.find("Last Line:")?;
    message[i + "Last Line:".len()..].trim().parse().ok()
}

/// Not printable text: a line the wire garbled.
fn is_garbage(line: &str) -> bool {
    line.chars()
        .any(|c| c == char::REPLACEMENT_CHARACTER || (c.is_control() && c != '\t'))
}

fn shorten(text: &str) -> String {
    let mut end = text.len().min(EVENT_TEXT_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}
