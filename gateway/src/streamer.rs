//! The streamer: the printer side of the gateway as a pure machine. The gateway's commands for
//! the printer and the link driver's events come in; link operations and the printer events the
//! gateway's machine needs go out, in the order the shell carries them out
//! (`printer.rs`, a tokio task that only does the IO; the simulation drives this same machine).
//!
//! What it keeps:
//! - The job's line count is the link's acknowledged lines since the stream started
//!   (`acked − base`). Each stream ends with an `M400`, so the file's last line counts only once
//!   the printer has finished moving: a job is not `finished` while the printer still moves.
//! - `M73 P<pct> R<min>` lines become progress when the firmware acknowledges them.
//! - A printer that reset, vanished or stopped answering loses its stream (the feeder stops, the
//!   link's queue is dropped); a silent one gets its port closed and opened again, which resets
//!   a Marlin board and finds a replugged cable or a new device behind the same path.
//! - A cancel makes the printer safe at once: the queue is dropped, then `make_safe` (heaters
//!   and fan off, motors released; `M112` when the firmware cannot confirm).

use std::collections::VecDeque;

use protocol::presence::Firmware;
use protocol::state::{Heater, Temperatures};
use protocol::{JobId, Sha256Hex};

use crate::link::LinkEvent;
use crate::machine::{PrinterCommand, PrinterEvent};

/// What comes in.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamerInput {
    /// A command of the gateway's machine.
    Command(PrinterCommand),
    /// What the link driver reports.
    Link(LinkEvent),
    /// The feeder read `M73` on line `line` of the stream (it tells before it hands the line
    /// to the link, so this always comes before the line's acknowledgement).
    M73 {
        /// The line within the stream (1-based).
        line: u64,
        /// Percent done.
        percent: f64,
        /// Minutes remaining, if given.
        remaining_min: Option<u64>,
    },
    /// The link's task ended on its own.
    LinkEnded,
}

/// What the shell does, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkOp {
    /// Stop any feeder, then start one for the verified file `sha256`.
    StartFeeder {
        /// The job (for logs).
        job_id: JobId,
        /// The file.
        sha256: Sha256Hex,
    },
    /// Stop the feeder.
    StopFeeder,
    /// Stop sending new lines.
    Pause,
    /// Send lines again.
    Resume,
    /// Drop the lines queued in the link.
    Clear,
    /// Make the printer safe at once.
    MakeSafe,
    /// Close the port and open it again (a new link numbers its lines from 1).
    Reopen,
    /// Tell the gateway's machine.
    Event(PrinterEvent),
}

/// One stream in progress.
#[derive(Debug, Clone, Default)]
struct Stream {
    /// Link-wide acknowledged lines when the stream started.
    base: u64,
    /// `(line, percent, remaining minutes)` of `M73` lines not yet acknowledged.
    pending_m73: VecDeque<(u64, f64, Option<u64>)>,
}

/// The streamer's state.
#[derive(Debug, Clone, Default)]
pub struct Streamer {
    /// Lines the current link acknowledged over its life.
    acked_total: u64,
    stream: Option<Stream>,
}

impl Streamer {
    /// A streamer with no stream, on a fresh link.
    pub fn new() -> Self {
        Self::default()
    }

    /// Is a stream under way?
    pub fn streaming(&self) -> bool {
        self.stream.is_some()
    }

    /// Handles one input.
    pub fn handle(&mut self, input: StreamerInput) -> Vec<LinkOp> {
        let mut ops = Vec::new();
        match input {
            StreamerInput::Command(cmd) => self.on_command(cmd, &mut ops),
            StreamerInput::M73 {
                line,
                percent,
                remaining_min,
            } => {
                if let Some(s) = &mut self.stream {
                    s.pending_m73.push_back((line, percent, remaining_min));
                }
            }
            StreamerInput::Link(ev) => self.on_link(ev, &mut ops),
            StreamerInput::LinkEnded => {
                tracing::error!("serial link task ended; reopening");
                self.acked_total = 0;
                ops.push(LinkOp::Reopen);
            }
        }
        ops
    }

    fn on_command(&mut self, cmd: PrinterCommand, ops: &mut Vec<LinkOp>) {
        match cmd {
            PrinterCommand::StartStream { job_id, sha256 } => {
                self.stream = Some(Stream {
                    base: self.acked_total,
                    pending_m73: VecDeque::new(),
                });
                ops.push(LinkOp::StartFeeder { job_id, sha256 });
            }
            PrinterCommand::PauseStream => ops.push(LinkOp::Pause),
            PrinterCommand::ResumeStream => ops.push(LinkOp::Resume),
            PrinterCommand::CancelStream => {
                self.stream = None;
                ops.extend([LinkOp::StopFeeder, LinkOp::Clear, LinkOp::MakeSafe]);
            }
            PrinterCommand::ResetPrinter => {
                self.stream = None;
                self.acked_total = 0;
                ops.extend([LinkOp::StopFeeder, LinkOp::Reopen]);
            }
        }
    }

    fn on_link(&mut self, ev: LinkEvent, ops: &mut Vec<LinkOp>) {
        match &ev {
            LinkEvent::Acked { seq } => {
                self.acked_total = *seq;
                if let Some(s) = &mut self.stream {
                    let count = self.acked_total.saturating_sub(s.base);
                    let mut progress = None;
                    while s
                        .pending_m73
                        .front()
                        .is_some_and(|(line, _, _)| *line <= count)
                    {
                        progress = s.pending_m73.pop_front();
                    }
                    if let Some((_, percent, remaining_min)) = progress {
                        ops.push(LinkOp::Event(PrinterEvent::Progress {
                            percent,
                            remaining_min,
                        }));
                    }
                    // The stream's own closing M400 is not a line of the file.
                    ops.push(LinkOp::Event(PrinterEvent::LinesAcked {
                        count: count.saturating_sub(1),
                    }));
                }
            }
            LinkEvent::Reset { .. }
            | LinkEvent::Disconnected { .. }
            | LinkEvent::Timeout { .. }
            | LinkEvent::LinkError { .. }
            | LinkEvent::Fatal { .. } => {
                if self.stream.take().is_some() {
                    ops.push(LinkOp::StopFeeder);
                }
                if !matches!(ev, LinkEvent::Fatal { .. }) {
                    ops.push(LinkOp::Clear);
                }
                if matches!(ev, LinkEvent::Timeout { .. } | LinkEvent::LinkError { .. }) {
                    tracing::warn!("printer silent: reopening its port");
                    self.acked_total = 0;
                    ops.push(LinkOp::Reopen);
                }
            }
            LinkEvent::Action(a) => tracing::info!(action = %a, "printer host action"),
            LinkEvent::Garbage { line } => tracing::debug!(%line, "garbled line from the printer"),
            _ => {}
        }
        if let Some(pe) = printer_event(ev) {
            ops.push(LinkOp::Event(pe));
        }
    }
}

/// Link events that matter to the gateway's machine; the rest stay with the streamer.
pub fn printer_event(ev: LinkEvent) -> Option<PrinterEvent> {
    Some(match ev {
        LinkEvent::Ready { firmware } => PrinterEvent::Ready {
            firmware: firmware_of(&firmware),
        },
        LinkEvent::Temperatures(t) => PrinterEvent::Temperatures(temperatures_of(&t)),
        LinkEvent::Fatal { message } => PrinterEvent::Fatal { message },
        LinkEvent::FirmwareError { message } => PrinterEvent::FirmwareError { message },
        LinkEvent::Reset { .. } => PrinterEvent::Reset,
        LinkEvent::Timeout { .. } => PrinterEvent::Timeout,
        LinkEvent::LinkError { message } => PrinterEvent::Disconnected { reason: message },
        LinkEvent::Disconnected { reason } => PrinterEvent::Disconnected { reason },
        LinkEvent::Acked { .. }
        | LinkEvent::Action(_)
        | LinkEvent::Message(_)
        | LinkEvent::Garbage { .. } => return None,
    })
}

/// The firmware's identity in the protocol's shape.
pub fn firmware_of(info: &crate::link::FirmwareInfo) -> Firmware {
    let mut caps: Vec<String> = info
        .capabilities
        .iter()
        .filter(|(_, on)| **on)
        .map(|(k, _)| k.clone())
        .collect();
    caps.sort();
    Firmware {
        name: info.name().unwrap_or("unknown firmware").to_owned(),
        protocol_version: info.get("PROTOCOL_VERSION").map(str::to_owned),
        machine_type: info.get("MACHINE_TYPE").map(str::to_owned),
        capabilities: caps,
    }
}

/// Temperatures in the protocol's shape.
pub fn temperatures_of(t: &protocol::marlin::Temps) -> Temperatures {
    Temperatures {
        nozzle: Heater {
            actual: t.hotend.map_or(0.0, |h| h.actual),
            target: t.hotend.and_then(|h| h.target).unwrap_or(0.0),
        },
        bed: Heater {
            actual: t.bed.map_or(0.0, |h| h.actual),
            target: t.bed.and_then(|h| h.target).unwrap_or(0.0),
        },
    }
}

/// Parses `M73 P<pct> [R<min>]`.
pub fn parse_m73(line: &str) -> Option<(f64, Option<u64>)> {
    let mut words = line.split_whitespace();
    if words.next()? != "M73" {
        return None;
    }
    let (mut p, mut r) = (None, None);
    for w in words {
        if let Some(v) = w.strip_prefix('P') {
            p = v.parse::<f64>().ok();
        } else if let Some(v) = w.strip_prefix('R') {
            r = v.parse::<u64>().ok();
        }
    }
    Some((p?, r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(s: &mut Streamer) -> Vec<LinkOp> {
        s.handle(StreamerInput::Command(PrinterCommand::StartStream {
            job_id: JobId::new("j1").expect("id"),
            sha256: Sha256Hex::digest(b"x"),
        }))
    }

    fn acked(s: &mut Streamer, seq: u64) -> Vec<LinkOp> {
        s.handle(StreamerInput::Link(LinkEvent::Acked { seq }))
    }

    #[test]
    fn m73() {
        assert_eq!(parse_m73("M73 P12 R40"), Some((12.0, Some(40))));
        assert_eq!(parse_m73("M73 Q12 S40"), None);
        assert_eq!(parse_m73("M73 P5"), Some((5.0, None)));
        assert_eq!(parse_m73("G1 X1"), None);
    }

    #[test]
    fn lines_count_from_the_stream_start_and_the_closing_m400_is_not_a_line() {
        let mut s = Streamer::new();
        // The link acknowledged 7 lines before this stream (an earlier job).
        acked(&mut s, 7);
        assert!(matches!(&start(&mut s)[..], [LinkOp::StartFeeder { .. }]));
        s.handle(StreamerInput::M73 {
            line: 2,
            percent: 40.0,
            remaining_min: Some(3),
        });
        assert_eq!(
            acked(&mut s, 8),
            vec![LinkOp::Event(PrinterEvent::LinesAcked { count: 0 })]
        );
        assert_eq!(
            acked(&mut s, 9),
            vec![
                LinkOp::Event(PrinterEvent::Progress {
                    percent: 40.0,
                    remaining_min: Some(3)
                }),
                LinkOp::Event(PrinterEvent::LinesAcked { count: 1 }),
            ]
        );
    }

    #[test]
    fn cancel_makes_safe_and_a_silent_printer_is_reopened() {
        let mut s = Streamer::new();
        start(&mut s);
        let ops = s.handle(StreamerInput::Command(PrinterCommand::CancelStream));
        assert_eq!(
            ops,
            vec![LinkOp::StopFeeder, LinkOp::Clear, LinkOp::MakeSafe]
        );
        assert!(!s.streaming());
        start(&mut s);
        let ops = s.handle(StreamerInput::Link(LinkEvent::Timeout {
            kind: crate::link::TimeoutKind::Silent,
        }));
        assert_eq!(
            ops,
            vec![
                LinkOp::StopFeeder,
                LinkOp::Clear,
                LinkOp::Reopen,
                LinkOp::Event(PrinterEvent::Timeout)
            ]
        );
        // A halted firmware keeps its queue (nothing more goes out anyway) and its port.
        start(&mut s);
        let ops = s.handle(StreamerInput::Link(LinkEvent::Fatal {
            message: "Heating failed".into(),
        }));
        assert_eq!(
            ops,
            vec![
                LinkOp::StopFeeder,
                LinkOp::Event(PrinterEvent::Fatal {
                    message: "Heating failed".into()
                })
            ]
        );
        // After a reopen the new link counts from 0.
        start(&mut s);
        s.handle(StreamerInput::Command(PrinterCommand::ResetPrinter));
        start(&mut s);
        assert_eq!(
            acked(&mut s, 1),
            vec![LinkOp::Event(PrinterEvent::LinesAcked { count: 0 })]
        );
    }
}
