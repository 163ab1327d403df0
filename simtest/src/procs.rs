//! Process lifecycle: start from disk, crash (at once or after n more outputs), and each
//! process's one pending timer tick. Keeps run.rs's start order: snapshot, then a new epoch
//! committed before any connection attempt; a crash loses everything not committed.

use gateway::machine::{Gateway, Input as GIn};
use supervisor::machine::{Input as SIn, Supervisor};

use crate::network::Link;
use crate::world::{Ev, World, SUP};

#[derive(Debug, Default)]
pub(crate) struct Proc {
    pub(crate) alive: bool,
    pub(crate) inc: u64,
    pub(crate) tick_at: Option<u64>,
    /// A crash armed to happen after this many more outputs are carried out.
    pub(crate) crash_after: Option<u32>,
    pub(crate) link: Link,
    pub(crate) skew_ms: u64,
}

impl World {
    /// A process's timer: only the tick it last asked for, in its current incarnation.
    pub(crate) fn tick(&mut self, c: usize, inc: u64, at: u64) {
        let p = &mut self.procs[c];
        if p.alive && p.inc == inc && p.tick_at == Some(at) {
            p.tick_at = None;
            if c == SUP {
                self.sup_input(SIn::Tick);
            } else {
                self.gw_input(Self::gw_of(c), GIn::Tick);
            }
        }
    }

    pub(crate) fn schedule_tick(&mut self, c: usize) {
        let deadline = if c == SUP {
            self.sup
                .machine
                .as_ref()
                .and_then(Supervisor::next_deadline)
        } else {
            self.gws[Self::gw_of(c)]
                .machine
                .as_ref()
                .and_then(Gateway::next_deadline)
        };
        let Some(d) = deadline else { return };
        if d <= self.now {
            // Both machines keep their deadlines in one timer table whose timers act or move
            // their own deadline on when they fire: a deadline due right after the machine ran
            // would make run.rs spin (it used to be clamped to now + 250 ms here).
            let who = self.name(c);
            self.violate(format!(
                "{who}: deadline {d} not after tick at {}: busy loop",
                self.now
            ));
            return;
        }
        let t = d;
        let p = &mut self.procs[c];
        if p.tick_at.is_none_or(|x| t < x) {
            p.tick_at = Some(t);
            let inc = p.inc;
            self.seq += 1;
            self.queue.insert((t, self.seq), Ev::Tick { c, inc, at: t });
        }
    }

    pub(crate) fn restart(&mut self, c: usize) {
        if self.procs[c].alive {
            return;
        }
        self.procs[c].alive = true;
        self.procs[c].inc += 1;
        self.procs[c].crash_after = None;
        self.procs[c].link.unacked.clear();
        self.procs[c].link.conn = None;
        self.procs[c].link.connected = false;
        self.log(|| "process starts from its disk".into());
        if c == SUP {
            let snap = self.sup.disk.load();
            let mut m = Supervisor::new(self.sup.cfg.clone(), snap, self.snow());
            let (muts, topic, will) = m.prepare_connect(self.snow());
            self.sup.disk.apply(&muts);
            self.sup.machine = Some(m);
            self.sup.pending.clear();
            self.procs[c].link.will = Some((topic, will));
            self.schedule_tick(c);
        } else if self.is_gw(c) {
            let g = Self::gw_of(c);
            let snap = self.gws[g].disk.load();
            let now = self.gnow(c);
            let (m, first) = Gateway::new(self.gws[g].cfg.clone(), snap, now);
            self.gws[g].machine = Some(m);
            self.gws[g].pending.clear();
            self.gws[g]
                .pending
                .push_back(GIn::DiskFree { bytes: 1 << 40 });
            self.gw_exec(g, first);
            if !self.procs[c].alive {
                return;
            }
            // A new process: a new streamer, and its serial task opens a new link on the port,
            // which resets the board.
            self.gws[g].streamer = gateway::streamer::Streamer::new();
            self.gws[g].printer.link_seq = 0;
            self.open_port(g);
            let now = self.gnow(c);
            if let Some(m) = self.gws[g].machine.as_mut() {
                let (muts, topic, will) = m.prepare_connect(now);
                self.gws[g].disk.apply(&muts);
                self.procs[c].link.will = Some((topic, will));
            }
            self.gw_drain(g);
        }
        self.schedule_connect(c, 0);
    }

    pub(crate) fn crash(&mut self, c: usize) {
        if !self.procs[c].alive || c == self.op_ix() {
            return;
        }
        self.log(|| "CRASH: everything not committed is lost".into());
        let p = &mut self.procs[c];
        p.alive = false;
        p.inc += 1;
        p.tick_at = None;
        p.crash_after = None;
        p.link.unacked.clear();
        p.link.connected = false;
        let conn = p.link.conn.take();
        if let Some(conn) = conn {
            // The broker notices at its keep-alive timeout and fires the will.
            let d = self.rng.range(1_000, 20_000);
            self.at(d, Ev::BrokerNotice { c, conn });
        }
        if c == SUP {
            self.sup.machine = None;
            self.sup.pending.clear();
            self.sup.batch_queued = false;
        } else {
            let g = Self::gw_of(c);
            self.gws[g].machine = None;
            self.gws[g].pending.clear();
            let pr = &mut self.gws[g].printer;
            pr.stream = None;
            pr.ready = false;
            pr.gen += 1;
        }
        if !self.healing {
            let d = self.rng.range(1_000, 30_000);
            self.at(d, Ev::Restart(c));
        }
    }

    /// Counts one carried-out output against an armed crash; true when the process died.
    pub(crate) fn crash_point(&mut self, c: usize) -> bool {
        if let Some(n) = self.procs[c].crash_after.as_mut() {
            if *n == 0 {
                self.crash(c);
                return true;
            }
            *n -= 1;
        }
        false
    }
}
