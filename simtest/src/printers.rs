//! The printer at the end of each gateway's cable, at the level of the link driver's events:
//! reset on port open, acknowledged lines, hang, cable pull, halt. Between it and the gateway's
//! machine runs the gateway's real streamer (`gateway::streamer`), exactly as `printer.rs`
//! drives it: the gateway's printer commands and these link events in, link operations out. A
//! board reset or unplug bumps `gen`, so nothing scheduled for the old board reaches the new one.

use gateway::link::{FirmwareInfo, LinkEvent, TimeoutKind};
use gateway::machine::{Input as GIn, PrinterCommand, PrinterEvent};
use gateway::streamer::{parse_m73, LinkOp, StreamerInput};

use crate::rng::Rng;
use crate::world::{Ev, World};

#[derive(Debug, Clone)]
pub(crate) enum PrinterFault {
    Hang,
    CablePull,
    ThermalRunaway,
    Reset,
    FirmwareError,
}

#[derive(Debug)]
pub(crate) struct Stream {
    /// Lines the feeder hands to the link: the file's, and the closing `M400`.
    pub(crate) total: u64,
    pub(crate) acked: u64,
    pub(crate) paused: bool,
}

/// The printer at the end of a gateway's serial cable, at the level of `PrinterEvent`s.
#[derive(Debug)]
pub(crate) struct PrinterModel {
    pub(crate) plugged: bool,
    pub(crate) hung: bool,
    pub(crate) halted: bool,
    pub(crate) gen: u64,
    pub(crate) ready: bool,
    pub(crate) stream: Option<Stream>,
    /// Lines the current link acknowledged over its life (`LinkEvent::Acked { seq }`): a new
    /// link (the streamer's `Reopen`, a new gateway process) counts from 0.
    pub(crate) link_seq: u64,
}

pub(crate) fn gcode(rng: &mut Rng, n: usize) -> Vec<u8> {
    let lines = rng.range(20, 90) as usize;
    let mut s = format!("; sim file {n}\nG28\nM104 S200\nM140 S60\nM190 S60\nM109 S200\n");
    for i in 0..lines {
        if i % 10 == 0 {
            s.push_str(&format!("M73 P{} R{}\n", i * 100 / lines, lines - i));
        }
        s.push_str(&format!(
            "G1 X{} Y{} E{}.{} F1800 ; move {i}\n",
            rng.range(0, 200),
            rng.range(0, 200),
            i,
            rng.range(0, 9)
        ));
    }
    s.push_str("M104 S0\nM140 S0\nM84\n");
    s.into_bytes()
}

pub(crate) fn gcode_lines(bytes: &[u8]) -> u64 {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter(|l| protocol::marlin::strip_comment(l).is_some())
        .count() as u64
}

impl World {
    /// Something the printer says after a delay (`Ready` after a reset), unless the board has
    /// been reset or unplugged since.
    pub(crate) fn printer_due(&mut self, g: usize, gen: u64, ev: LinkEvent) {
        if self.gws[g].printer.gen == gen {
            if matches!(ev, LinkEvent::Ready { .. }) {
                self.gws[g].printer.ready = true;
            }
            self.link_event(g, ev);
        }
    }

    pub(crate) fn printer_timeout(&mut self, g: usize, gen: u64) {
        let p = &self.gws[g].printer;
        if p.gen == gen && p.hung && self.procs[g + 1].alive {
            // The streamer closes and reopens a silent port (which resets the board).
            self.link_event(
                g,
                LinkEvent::Timeout {
                    kind: TimeoutKind::Silent,
                },
            );
        }
    }

    pub(crate) fn replug(&mut self, g: usize) {
        if self.gws[g].printer.plugged {
            return; // plugged back already (the heal does it)
        }
        self.gws[g].printer.plugged = true;
        if self.procs[g + 1].alive {
            self.open_port(g);
        }
    }

    pub(crate) fn printer_event(&mut self, g: usize, ev: PrinterEvent) {
        if self.procs[g + 1].alive {
            self.gw_input(g, GIn::Printer(ev));
        }
    }

    /// What the link driver reports, through the gateway's streamer.
    pub(crate) fn link_event(&mut self, g: usize, ev: LinkEvent) {
        if self.procs[g + 1].alive {
            self.streamer_input(g, StreamerInput::Link(ev));
        }
    }

    /// One input of the gateway's real streamer, and its link operations carried out in order
    /// (what `gateway/src/printer.rs` does with them).
    pub(crate) fn streamer_input(&mut self, g: usize, input: StreamerInput) {
        let ops = self.gws[g].streamer.handle(input);
        for op in ops {
            if !self.procs[g + 1].alive {
                return;
            }
            self.link_op(g, op);
        }
    }

    fn link_op(&mut self, g: usize, op: LinkOp) {
        match op {
            LinkOp::StartFeeder { job_id, sha256 } => {
                self.check_start(g, &job_id, &sha256);
                let blob = self.gws[g].disk.blobs.get(&sha256).cloned();
                let file = blob.as_deref().unwrap_or_default();
                // The feeder tells the streamer of each M73 before the line goes out.
                let text = String::from_utf8_lossy(file).into_owned();
                let mut n = 0u64;
                for line in text.lines() {
                    if let Some(cmd) = protocol::marlin::strip_comment(line) {
                        n += 1;
                        if let Some((percent, remaining_min)) = parse_m73(cmd) {
                            let _ = self.gws[g].streamer.handle(StreamerInput::M73 {
                                line: n,
                                percent,
                                remaining_min,
                            });
                        }
                    }
                }
                let p = &mut self.gws[g].printer;
                p.stream = Some(Stream {
                    total: n + 1,
                    acked: 0,
                    paused: false,
                });
                let gen = p.gen;
                let d = self.rng.range(500, 2_000);
                self.at(d, Ev::PrinterStep { g, gen });
            }
            LinkOp::StopFeeder | LinkOp::Clear => self.gws[g].printer.stream = None,
            LinkOp::Pause => {
                if let Some(s) = self.gws[g].printer.stream.as_mut() {
                    s.paused = true;
                }
            }
            LinkOp::Resume => {
                if let Some(s) = self.gws[g].printer.stream.as_mut() {
                    s.paused = false;
                }
            }
            LinkOp::MakeSafe => {}
            LinkOp::Reopen => {
                self.gws[g].printer.link_seq = 0;
                self.open_port(g);
            }
            LinkOp::Event(ev) => self.printer_event(g, ev),
        }
    }

    /// The port is (re)opened: the board resets and answers after a moment.
    pub(crate) fn open_port(&mut self, g: usize) {
        let p = &mut self.gws[g].printer;
        p.gen += 1;
        p.ready = false;
        p.stream = None;
        p.hung = false;
        p.halted = false;
        if p.plugged {
            let gen = p.gen;
            let d = self.rng.range(300, 2_000);
            let firmware = FirmwareInfo {
                fields: vec![
                    ("FIRMWARE_NAME".into(), "Marlin 2.1.2 (sim)".into()),
                    ("PROTOCOL_VERSION".into(), "1.0".into()),
                    ("MACHINE_TYPE".into(), "Sim".into()),
                ],
                capabilities: [("AUTOREPORT_TEMP".to_owned(), true)].into(),
                advanced_ok: false,
            };
            self.at(
                d,
                Ev::PrinterDue {
                    g,
                    gen,
                    ev: LinkEvent::Ready { firmware },
                },
            );
        }
    }

    pub(crate) fn printer_cmd(&mut self, g: usize, cmd: PrinterCommand) {
        self.streamer_input(g, StreamerInput::Command(cmd));
    }

    pub(crate) fn printer_step(&mut self, g: usize, gen: u64) {
        let p = &mut self.gws[g].printer;
        if p.gen != gen {
            return;
        }
        let working = !p.hung && !p.halted && p.plugged && p.ready;
        let Some(s) = p.stream.as_mut() else { return };
        let mut acked = None;
        if working && !s.paused {
            let n = self.rng.range(4, 30).min(s.total - s.acked);
            s.acked += n;
            p.link_seq += n;
            acked = Some(p.link_seq);
            if s.acked >= s.total {
                p.stream = None;
            }
        }
        let more = p.stream.is_some();
        if let Some(seq) = acked {
            self.link_event(g, LinkEvent::Acked { seq });
        }
        if more && self.gws[g].printer.gen == gen {
            let d = self.rng.range(1_000, 3_000);
            self.at(d, Ev::PrinterStep { g, gen });
        }
    }

    pub(crate) fn printer_fault(&mut self, g: usize, f: PrinterFault) {
        self.log(|| format!("printer fault on p{g}: {f:?}"));
        match f {
            PrinterFault::Hang => {
                let p = &mut self.gws[g].printer;
                if p.ready && !p.hung {
                    p.hung = true;
                    let gen = p.gen;
                    self.at(10_000, Ev::PrinterTimeout { g, gen });
                }
            }
            PrinterFault::CablePull => {
                let p = &mut self.gws[g].printer;
                if !p.plugged {
                    return;
                }
                p.plugged = false;
                p.ready = false;
                p.stream = None;
                p.gen += 1;
                self.link_event(
                    g,
                    LinkEvent::Disconnected {
                        reason: "cable pulled".into(),
                    },
                );
                let d = self.rng.range(2_000, 30_000);
                self.at(d, Ev::Replug(g));
            }
            PrinterFault::ThermalRunaway => {
                let p = &mut self.gws[g].printer;
                if !p.ready || p.halted {
                    return;
                }
                p.halted = true;
                self.link_event(
                    g,
                    LinkEvent::Fatal {
                        message: "Thermal Runaway, system stopped! Heater_ID: 0".into(),
                    },
                );
            }
            PrinterFault::Reset => {
                if !self.gws[g].printer.ready {
                    return;
                }
                self.gws[g].printer.gen += 1;
                self.gws[g].printer.stream = None;
                self.link_event(g, LinkEvent::Reset { dropped: 0 });
                if self.procs[g + 1].alive {
                    self.open_port(g);
                }
            }
            PrinterFault::FirmwareError => {
                if self.gws[g].printer.ready {
                    self.link_event(
                        g,
                        LinkEvent::FirmwareError {
                            message: "Error:checksum mismatch, Last Line: 12".into(),
                        },
                    );
                }
            }
        }
    }
}
