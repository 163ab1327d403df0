//! One direction of the simulated serial link: bytes queued on a `Wire` arrive one by one,
//! each 10 bit times (8N1) after the previous, never before the wire would have carried them.
//! Sans-IO like the rest of the core: every call takes the time it happens at.
use std::collections::VecDeque;
use std::time::Duration;

/// A span of bytes on the wire: byte `k` arrives at `start + wire_time(k + 1)`.
#[derive(Debug)]
struct Chunk {
    start: Duration,
    bytes: Vec<u8>,
    next: usize,
}

/// One direction of the serial link: bytes are serialised at the baud rate, 10 bits each.
#[derive(Debug)]
pub(super) struct Wire {
    baud: u64,
    chunks: VecDeque<Chunk>,
    /// When the last queued byte finishes.
    tail: Duration,
    pub(super) pending: usize,
}

impl Wire {
    pub(super) fn new(baud: u32) -> Self {
        Self {
            baud: u64::from(baud),
            chunks: VecDeque::new(),
            tail: Duration::ZERO,
            pending: 0,
        }
    }

    /// Time to serialise `n` bytes (8N1).
    pub(super) fn time(&self, n: usize) -> Duration {
        wire_time(self.baud, n)
    }

    pub(super) fn push(&mut self, now: Duration, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        let start = now.max(self.tail);
        self.tail = start + self.time(bytes.len());
        self.pending += bytes.len();
        self.chunks.push_back(Chunk {
            start,
            bytes,
            next: 0,
        });
    }

    /// Arrival time of the next byte.
    pub(super) fn next_arrival(&self) -> Option<Duration> {
        self.chunks.front().map(|c| c.start + self.time(c.next + 1))
    }

    /// Pops one byte if it has arrived by `now`.
    pub(super) fn pop_arrived(&mut self, now: Duration) -> Option<(Duration, u8)> {
        let at = self.next_arrival()?;
        if at > now {
            return None;
        }
        let chunk = self.chunks.front_mut()?;
        let b = chunk.bytes[chunk.next];
        chunk.next += 1;
        if chunk.next == chunk.bytes.len() {
            self.chunks.pop_front();
        }
        self.pending -= 1;
        Some((at, b))
    }

    /// Every byte that has arrived by `now`.
    pub(super) fn drain_arrived(&mut self, now: Duration, out: &mut Vec<u8>) {
        let baud = self.baud;
        while let Some(chunk) = self.chunks.front_mut() {
            let elapsed = now.saturating_sub(chunk.start).as_nanos();
            let mut n = usize::try_from(elapsed * u128::from(baud) / 10_000_000_000)
                .unwrap_or(usize::MAX)
                .min(chunk.bytes.len());
            let start = chunk.start;
            while n < chunk.bytes.len() && start + wire_time(baud, n + 1) <= now {
                n += 1;
            }
            if n <= chunk.next {
                return;
            }
            out.extend_from_slice(&chunk.bytes[chunk.next..n]);
            self.pending -= n - chunk.next;
            chunk.next = n;
            if n == chunk.bytes.len() {
                self.chunks.pop_front();
            } else {
                return;
            }
        }
    }

    pub(super) fn clear(&mut self, now: Duration) {
        self.chunks.clear();
        self.pending = 0;
        self.tail = now;
    }
}

/// Time to serialise `n` bytes at `baud` (8N1: 10 bits a byte).
fn wire_time(baud: u64, n: usize) -> Duration {
    let ns = (n as u128 * 10_000_000_000) / u128::from(baud.max(1));
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}
