//! Deterministic simulation of the whole printloop loop at the sans-IO layer (issue #5).
//!
//! One run = one seed: a supervisor, 2–5 gateways with simulated printers, an operator and a
//! simulated broker, driven from one event queue with a simulated clock and one seeded
//! generator. Faults (partitions, crashes that lose what was not committed, broker restarts
//! with amnesia, slow and duplicated messages, late wills, serial faults, corrupt file chunks)
//! come at random moments, with operator actions; then a quiet period in which the views must
//! converge. Invariants are checked after every step. See `docs/resilience.md`.

pub mod broker;
pub mod disk;
pub mod rng;
pub mod world;

pub use world::{SimConfig, Summary, World};

/// Runs one seed with the default configuration.
pub fn run_seed(seed: u64, verbose: bool) -> Result<Summary, String> {
    let cfg = SimConfig {
        verbose,
        ..SimConfig::new(seed)
    };
    World::new(cfg).run()
}

/// The command that replays `seed` with a step-by-step trace.
pub fn replay_command(seed: u64) -> String {
    format!("SIM_SEED={seed} cargo test -p simtest --test seeds -- --exact seeds --nocapture")
}

/// Runs `seed` and panics with the seed and the replay command when an invariant breaks.
pub fn check_seed(seed: u64, verbose: bool) -> Summary {
    match run_seed(seed, verbose) {
        Ok(s) => s,
        Err(e) => panic!(
            "simulation seed {seed} failed: {e}\nreplay: {}",
            replay_command(seed)
        ),
    }
}
