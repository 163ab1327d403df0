//! Runs the deterministic simulation over many seeds.
//!
//! - `cargo test -p simtest --test seeds`: seeds `0..1000` (override with `SIM_SEEDS=n`, e.g.
//!   `SIM_SEEDS=100000` for the long mode; `SIM_SEED_START` moves the window).
//! - `SIM_SEED=1234 cargo test -p simtest --test seeds -- --exact seeds --nocapture`: replays one seed with a
//!   step-by-step trace.

use std::time::Instant;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn seeds() {
    if let Some(seed) = env_u64("SIM_SEED") {
        // The machines' own logs (RUST_LOG, default info) interleave with the trace.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .with_test_writer()
            .without_time()
            .try_init();
        let s = simtest::check_seed(seed, true);
        eprintln!("{s:?}");
        return;
    }
    let n = env_u64("SIM_SEEDS").unwrap_or(1000);
    let first = env_u64("SIM_SEED_START").unwrap_or(0);
    let started = Instant::now();
    // Seeds are independent: two threads share them (each run is single-threaded and
    // deterministic on its own).
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(2)) as u64;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                let (mut steps, mut faults, mut done) = (0u64, 0u64, 0usize);
                let mut seed = first + t;
                while seed < first + n {
                    // A panic inside a machine is a failure of this seed, reported with it.
                    let run = std::panic::catch_unwind(|| simtest::run_seed(seed, false))
                        .unwrap_or_else(|p| {
                            let msg = p
                                .downcast_ref::<String>()
                                .map(String::as_str)
                                .or_else(|| p.downcast_ref::<&str>().copied())
                                .unwrap_or("a panic");
                            Err(format!("panicked: {msg}"))
                        });
                    match run {
                        Ok(s) => {
                            steps += s.steps;
                            faults += s.faults;
                            done += s.done;
                        }
                        Err(e) => failures.push(format!(
                            "simulation seed {seed} failed: {e}\n  replay: {}",
                            simtest::replay_command(seed)
                        )),
                    }
                    seed += threads;
                }
                (failures, steps, faults, done)
            })
        })
        .collect();
    let mut failures = Vec::new();
    let (mut steps, mut faults, mut done) = (0u64, 0u64, 0usize);
    for h in handles {
        let (f, s, fa, d) = h.join().expect("a simulation thread panicked");
        failures.extend(f);
        steps += s;
        faults += fa;
        done += d;
    }
    eprintln!(
        "{n} seeds from {first}: {steps} steps, {faults} faults, {done} jobs done, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {n} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn a_seed_replays_exactly() {
    let a = simtest::run_seed(7, false);
    let b = simtest::run_seed(7, false);
    assert_eq!(a, b, "the same seed must give the same run");
    let c = simtest::run_seed(8, false);
    assert_ne!(a, c, "another seed must give another run");
}
