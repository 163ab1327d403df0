//! The seeded fault schedule: which fault comes next, on which printer, for how long. Pure: the
//! same seed and fleet size give the same sequence, so a failing run can be replayed.
//!
//! Kinds are drawn from a shuffled bag holding each kind once: every kind appears once in each
//! round of [`FaultKind::ALL`].

use std::time::Duration;

use printer_sim::SplitMix64;

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// `kill -9` of one gateway (the Pi loses power); restarted after the hold.
    KillGateway,
    /// `kill -9` of the supervisor; restarted after the hold.
    KillSupervisor,
    /// `kill -9` of one simulated printer (the printer loses power); restarted after the hold.
    KillSimulator,
    /// The broker is killed and started again on the same port (rumqttd and this Mosquitto
    /// keep nothing: retained messages and sessions are gone).
    RestartBroker,
    /// One gateway's link holds every byte (a black hole) for the hold.
    Partition,
    /// One gateway's link is closed and refused for the hold.
    CutLink,
    /// One gateway's link delays every chunk for the hold.
    DelayLink,
    /// One printer's USB cable is pulled, plugged back after the hold.
    CablePull,
    /// One printer's firmware halts with a thermal runaway (an operator later resets it).
    ThermalRunaway,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 9] = [
        FaultKind::KillGateway,
        FaultKind::KillSupervisor,
        FaultKind::KillSimulator,
        FaultKind::RestartBroker,
        FaultKind::Partition,
        FaultKind::CutLink,
        FaultKind::DelayLink,
        FaultKind::CablePull,
        FaultKind::ThermalRunaway,
    ];

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillGateway => "kill_gateway",
            FaultKind::KillSupervisor => "kill_supervisor",
            FaultKind::KillSimulator => "kill_simulator",
            FaultKind::RestartBroker => "restart_broker",
            FaultKind::Partition => "partition",
            FaultKind::CutLink => "cut_link",
            FaultKind::DelayLink => "delay_link",
            FaultKind::CablePull => "cable_pull",
            FaultKind::ThermalRunaway => "thermal_runaway",
        }
    }

    /// The range of its hold, in milliseconds.
    fn hold_ms(self) -> (u64, u64) {
        match self {
            FaultKind::KillGateway | FaultKind::KillSimulator => (300, 1_500),
            FaultKind::KillSupervisor => (500, 2_000),
            FaultKind::RestartBroker => (300, 1_500),
            // Longer than a gateway's keep-alive (2 s × 1.5): the broker gives up on it.
            FaultKind::Partition => (2_000, 5_000),
            FaultKind::CutLink => (1_000, 3_000),
            FaultKind::DelayLink => (2_000, 4_000),
            FaultKind::CablePull => (500, 2_000),
            FaultKind::ThermalRunaway => (0, 0),
        }
    }
}

/// One planned fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// What.
    pub kind: FaultKind,
    /// Which printer (ignored by the supervisor and broker faults).
    pub printer: usize,
    /// How long it lasts before it is healed.
    pub hold: Duration,
    /// For `DelayLink`: the delay per chunk.
    pub delay: Duration,
    /// Pause after the system converged, before the next fault.
    pub gap: Duration,
}

/// The sequence of faults of one seed.
#[derive(Debug)]
pub struct Schedule {
    rng: SplitMix64,
    bag: Vec<FaultKind>,
    printers: usize,
}

impl Schedule {
    /// The schedule for `seed` over `printers` printers (at least 1).
    pub fn new(seed: u64, printers: usize) -> Self {
        Schedule {
            rng: SplitMix64::new(seed ^ 0x6368_616f_735f_7275),
            bag: Vec::new(),
            printers: printers.max(1),
        }
    }

    fn between(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.rng.below(hi - lo + 1)
    }

    /// The next fault.
    pub fn next_fault(&mut self) -> Fault {
        if self.bag.is_empty() {
            self.bag = FaultKind::ALL.to_vec();
            // Fisher–Yates with the seeded generator.
            for i in (1..self.bag.len()).rev() {
                let j = self.rng.below(i as u64 + 1) as usize;
                self.bag.swap(i, j);
            }
        }
        let kind = self.bag.pop().unwrap_or(FaultKind::CutLink);
        let printer = self.rng.below(self.printers as u64) as usize;
        let hold = Duration::from_millis(self.between(kind.hold_ms()));
        let delay = Duration::from_millis(self.between((100, 600)));
        let gap = Duration::from_millis(self.between((200, 1_000)));
        Fault {
            kind,
            printer,
            hold,
            delay,
            gap,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_faults_and_every_kind_each_round() {
        let take = |seed| {
            let mut s = Schedule::new(seed, 5);
            (0..18).map(|_| s.next_fault()).collect::<Vec<_>>()
        };
        let a = take(1);
        assert_eq!(a, take(1));
        assert_ne!(a, take(2));
        for round in a.chunks(FaultKind::ALL.len()) {
            let mut kinds: Vec<FaultKind> = round.iter().map(|f| f.kind).collect();
            kinds.sort();
            assert_eq!(kinds, FaultKind::ALL.to_vec());
        }
        for f in &a {
            assert!(f.printer < 5);
            let (lo, hi) = f.kind.hold_ms();
            assert!((lo..=hi).contains(&(f.hold.as_millis() as u64)), "{f:?}");
        }
    }
}
