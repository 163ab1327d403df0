//! The printer at the end of each gateway's cable, at the level of `PrinterEvent`s and
//! `PrinterCommand`s: reset on port open, streaming progress, hang, cable pull, halt. A board
//! reset or unplug bumps `gen`, so nothing scheduled for the old board reaches the new one.

use gateway::machine::{Input as GIn, PrinterCommand, PrinterEvent};
use protocol::presence::Firmware;
use protocol::JobId;

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
    pub(crate) job: JobId,
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
    pub(crate) fn printer_due(&mut self, g: usize, gen: u64, ev: PrinterEvent) {
        if self.gws[g].printer.gen == gen {
            if matches!(ev, PrinterEvent::Ready { .. }) {
                self.gws[g].printer.ready = true;
            }
            self.printer_event(g, ev);
        }
    }

    pub(crate) fn printer_timeout(&mut self, g: usize, gen: u64) {
        let p = &self.gws[g].printer;
        if p.gen == gen && p.hung && self.procs[g + 1].alive {
            self.printer_event(g, PrinterEvent::Timeout);
            // printer.rs closes and reopens a silent port (which resets the board).
            self.open_port(g);
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
            let firmware = Firmware {
                name: "Marlin 2.1.2 (sim)".into(),
                protocol_version: Some("1.0".into()),
                machine_type: Some("Sim".into()),
                capabilities: vec!["AUTOREPORT_TEMP".into()],
            };
            self.at(
                d,
                Ev::PrinterDue {
                    g,
                    gen,
                    ev: PrinterEvent::Ready { firmware },
                },
            );
        }
    }

    pub(crate) fn printer_cmd(&mut self, g: usize, cmd: PrinterCommand) {
        match cmd {
            PrinterCommand::StartStream { job_id, sha256 } => {
                self.check_start(g, &job_id, &sha256);
                let total = self.gws[g]
                    .disk
                    .blobs
                    .get(&sha256)
                    .map_or(0, |b| gcode_lines(b));
                let p = &mut self.gws[g].printer;
                p.stream = Some(Stream {
                    job: job_id,
                    total,
                    acked: 0,
                    paused: false,
                });
                let gen = p.gen;
                let d = self.rng.range(500, 2_000);
                self.at(d, Ev::PrinterStep { g, gen });
            }
            PrinterCommand::PauseStream => {
                if let Some(s) = self.gws[g].printer.stream.as_mut() {
                    s.paused = true;
                }
            }
            PrinterCommand::ResumeStream => {
                if let Some(s) = self.gws[g].printer.stream.as_mut() {
                    s.paused = false;
                }
            }
            PrinterCommand::CancelStream => self.gws[g].printer.stream = None,
            PrinterCommand::ResetPrinter => self.open_port(g),
        }
    }

    pub(crate) fn printer_step(&mut self, g: usize, gen: u64) {
        let p = &mut self.gws[g].printer;
        if p.gen != gen {
            return;
        }
        let working = !p.hung && !p.halted && p.plugged && p.ready;
        let Some(s) = p.stream.as_mut() else { return };
        let mut evs = Vec::new();
        if working && !s.paused {
            let n = self.rng.range(4, 30);
            s.acked = (s.acked + n).min(s.total);
            if let Some(pct) = (s.acked * 100).checked_div(s.total) {
                let pct = pct as f64;
                evs.push(PrinterEvent::Progress {
                    percent: pct,
                    remaining_min: Some((s.total - s.acked) / 10),
                });
            }
            evs.push(PrinterEvent::LinesAcked { count: s.acked });
            if s.acked >= s.total {
                p.stream = None;
            }
        }
        let more = p.stream.is_some();
        let job = p.stream.as_ref().map(|s| s.job.clone());
        for ev in evs {
            self.printer_event(g, ev);
        }
        if more && self.gws[g].printer.gen == gen {
            let d = self.rng.range(1_000, 3_000);
            self.at(d, Ev::PrinterStep { g, gen });
            let _ = job;
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
                self.printer_event(
                    g,
                    PrinterEvent::Disconnected {
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
                p.stream = None;
                self.printer_event(
                    g,
                    PrinterEvent::Fatal {
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
                self.printer_event(g, PrinterEvent::Reset);
                if self.procs[g + 1].alive {
                    self.open_port(g);
                }
            }
            PrinterFault::FirmwareError => {
                if self.gws[g].printer.ready {
                    self.printer_event(
                        g,
                        PrinterEvent::FirmwareError {
                            message: "Error:checksum mismatch, Last Line: 12".into(),
                        },
                    );
                }
            }
        }
    }
}
