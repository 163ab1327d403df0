//! Unit tests of the core's private helpers: C-like `strtol` for line numbers and checksums,
//! and the wire's 8N1 timing (draining in bulk must deliver exactly what popping one by one does).
use std::time::Duration;

use super::serial::strtol;
use super::wire::Wire;

#[test]
fn strtol_like_c() {
    assert_eq!(strtol(b"12 G1"), 12);
    assert_eq!(strtol(b"  -3"), -3);
    assert_eq!(strtol(b"x"), 0);
    assert_eq!(strtol(b""), 0);
    assert_eq!(strtol(b"99999999999999999999999"), i64::MAX);
}

#[test]
fn wire_times_are_exact_for_250000_baud() {
    let w = Wire::new(250_000);
    assert_eq!(w.time(1), Duration::from_micros(40));
    assert_eq!(w.time(25_000), Duration::from_secs(1));
    let w = Wire::new(115_200);
    assert_eq!(w.time(11_520), Duration::from_secs(1));
}

#[test]
fn wire_drain_matches_pop() {
    let mut a = Wire::new(115_200);
    let mut b = Wire::new(115_200);
    for w in [&mut a, &mut b] {
        w.push(Duration::ZERO, b"hello world".to_vec());
        w.push(Duration::from_millis(5), b"again".to_vec());
    }
    for ms in [0u64, 1, 2, 3, 5, 6, 7, 100] {
        let now = Duration::from_millis(ms);
        let mut drained = Vec::new();
        a.drain_arrived(now, &mut drained);
        let mut popped = Vec::new();
        while let Some((_, x)) = b.pop_arrived(now) {
            popped.push(x);
        }
        assert_eq!(drained, popped, "at {ms} ms");
    }
    assert_eq!(a.pending, 0);
}
