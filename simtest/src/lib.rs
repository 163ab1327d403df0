//! Deterministic simulation of the whole printloop loop at the sans-IO layer (issue #5).
//!
//! One run = one seed: a supervisor, 2–5 gateways with simulated printers, an operator and a
//! simulated broker, driven from one event queue with a simulated clock and one seeded
//! generator. Faults (partitions, crashes that lose what was not committed, broker restarts
//! with amnesia, slow and duplicated messages, late wills, serial faults, corrupt file chunks)
//! come at random moments, with operator actions; then a quiet period in which the views must
//! converge. Simulation-only invariants are checked after every step, and the shared checker
//! (`invariants`, the one the chaos runner uses) on what each seed left behind. See
//! `docs/resilience.md`.
//!
//! Every process is the real pure state machine inside a shell that mirrors its `run.rs`
//! (`shells`); around them: the event loop (`world`), the clients' broker links (`network`) and
//! the broker (`broker`), process lifecycle and timers (`procs`), durable stores (`disk`),
//! printers (`printers`), faults (`faults`), the operator (`operator`) and the checks (`check`).

pub mod broker;
mod check;
pub mod disk;
mod faults;
mod network;
mod operator;
mod printers;
mod procs;
pub mod rng;
mod shells;
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
