//! Fault injection during the fault phase: partitions, crashes, broker restarts with amnesia,
//! stale starts, slow periods, printer faults; then the heal. After the heal no fault happens,
//! every process is up and connected again, and the run must converge.

use protocol::command::Command;
use protocol::CommandId;

use crate::network::Up;
use crate::printers::PrinterFault;
use crate::world::{Ev, World};

impl World {
    pub(crate) fn partition_end(&mut self, c: usize) {
        self.procs[c].link.up = true;
        self.schedule_connect(c, 0);
    }

    pub(crate) fn fault(&mut self) {
        if self.healing {
            return;
        }
        self.faults += 1;
        let n = self.procs.len();
        let roll = self.rng.range(0, 99);
        match roll {
            0..=19 => {
                let c = self.rng.index(n);
                let d = self.rng.range(1_000, 40_000);
                self.log(|| format!("FAULT partition client {c} for {d} ms"));
                self.partition(c, d);
            }
            20..=31 => {
                let c = self.rng.index(n - 1);
                self.log(|| format!("FAULT crash process {c}"));
                self.crash(c);
            }
            32..=41 => {
                let c = self.rng.index(n - 1);
                let k = self.rng.range(0, 8) as u32;
                self.log(|| format!("FAULT crash process {c} after {k} more outputs"));
                if self.procs[c].alive {
                    self.procs[c].crash_after = Some(k);
                }
            }
            42..=47 => {
                let d = self.rng.range(1_000, 10_000);
                self.log(|| format!("FAULT broker restart (amnesia), down {d} ms"));
                self.broker_restart(d);
            }
            48..=51 if !self.starts_seen.is_empty() => {
                // A late retry: a start the supervisor sent again under a new id reaches the
                // printer that already took the job (and maybe printed it): the printer's
                // ledger must refuse it. (A start reaching a printer that never took the job
                // would be the supervisor's own decision, not a fault.)
                let (g, job, topic, payload) =
                    self.starts_seen[self.rng.index(self.starts_seen.len())].clone();
                let took_it = self.gws[g].disk.ledger.contains_key(&job);
                if let (true, Ok(mut cmd)) = (took_it, Command::decode(&payload)) {
                    self.faults_replayed += 1;
                    cmd.id = CommandId::new(format!("replay-{}", self.faults_replayed))
                        .expect("valid id");
                    self.log(|| format!("FAULT stale start replayed on {topic}"));
                    let c = self.op_ix();
                    self.client_send(
                        c,
                        Up::Publish {
                            topic,
                            payload: cmd.encode(),
                            retain: false,
                        },
                    );
                }
            }
            48..=55 => {
                let d = self.rng.range(3_000, 30_000);
                self.log(|| format!("FAULT slow network for {d} ms"));
                self.slow = true;
                self.at(d, Ev::SlowEnd);
            }
            _ => {
                let g = self.rng.index(self.gws.len());
                let f = match self.rng.range(0, 9) {
                    0..=2 => PrinterFault::Hang,
                    3..=4 => PrinterFault::CablePull,
                    5..=6 => PrinterFault::ThermalRunaway,
                    7 => PrinterFault::Reset,
                    _ => PrinterFault::FirmwareError,
                };
                self.printer_fault(g, f);
            }
        }
        let gap = self
            .rng
            .range(self.cfg.fault_gap_ms / 4, self.cfg.fault_gap_ms * 2);
        self.at(gap, Ev::Fault);
    }

    pub(crate) fn partition(&mut self, c: usize, d: u64) {
        if !self.procs[c].link.up {
            return;
        }
        self.procs[c].link.up = false;
        // The TCP connection dies: both sides notice, each after its own delay.
        if let Some(conn) = self.procs[c].link.conn {
            let dc = self.rng.range(300, 5_000);
            self.at(dc, Ev::ClientNotice { c, conn });
            let db = self.rng.range(1_000, 20_000);
            self.at(db, Ev::BrokerNotice { c, conn });
        }
        self.at(d, Ev::PartitionEnd(c));
    }

    pub(crate) fn broker_restart(&mut self, down: u64) {
        if !self.broker.up {
            return;
        }
        self.broker.crash();
        for c in 0..self.procs.len() {
            if let Some(conn) = self.procs[c].link.conn {
                let d = self.rng.range(0, 1_000);
                self.at(d, Ev::ClientNotice { c, conn });
            }
        }
        self.at(down, Ev::BrokerUp);
    }

    pub(crate) fn heal(&mut self) {
        self.log(|| "HEAL: no more faults".into());
        self.healing = true;
        self.heal_at = self.now;
        self.slow = false;
        if !self.broker.up {
            self.broker.up = true;
        }
        for c in 0..self.procs.len() {
            self.procs[c].crash_after = None;
            if !self.procs[c].link.up {
                self.procs[c].link.up = true;
            }
            if !self.procs[c].alive {
                self.restart(c);
            } else {
                self.schedule_connect(c, 0);
            }
        }
        for g in 0..self.gws.len() {
            if !self.gws[g].printer.plugged {
                self.gws[g].printer.plugged = true;
                self.open_port(g);
            }
        }
        self.at(5_000, Ev::HealCheck);
    }
}
