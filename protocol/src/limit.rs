//! Per-client rate limits: the admission rule both ends apply to what clients send (a gateway to
//! `cmd`, the supervisor to `api/request`).
//!
//! Each declared client name has a token bucket (`per_s` sustained, `burst` at once). A message
//! over its client's rate is not carried out: it is answered `busy` with the time after which a
//! retry is admitted, so a careless client (a Node-RED flow in a loop, a script with no back-off)
//! slows itself down and everyone else is served as usual.
//!
//! Names are declared by the sender, so a client can invent a new one for every message. A
//! name the limiter has not seen is charged to one shared *newcomers* bucket first; only when
//! that admits it does the name get a bucket of its own. The number of named buckets is
//! bounded, and when it is full the most recently added name is dropped, never an established
//! one: a flood under invented names shares one bucket and cannot push the supervisor, Home
//! Assistant or Node-RED out. (A flood under another client's *own* name is only stopped by a
//! broker that checks who may publish: Mosquitto with printloop's ACL, `docs/broker.md`.)
//!
//! Pure: time is passed in (milliseconds of a monotonic clock).

use std::collections::BTreeMap;

/// A sustained rate and a burst.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Messages per second, sustained.
    pub per_s: f64,
    /// Messages admitted at once after a quiet period.
    pub burst: f64,
}

impl Rate {
    /// `per_s` sustained, `burst` at once.
    pub const fn new(per_s: f64, burst: f64) -> Self {
        Self { per_s, burst }
    }
}

/// A refusal: retry after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    /// When a retry is admitted, in milliseconds from now.
    pub retry_after_ms: u64,
}

#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

impl Bucket {
    fn full(rate: Rate, now_ms: u64) -> Self {
        Self {
            tokens: rate.burst,
            at_ms: now_ms,
        }
    }

    fn take(&mut self, rate: Rate, now_ms: u64) -> Result<(), Busy> {
        let dt = now_ms.saturating_sub(self.at_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + dt * rate.per_s).min(rate.burst);
        self.at_ms = self.at_ms.max(now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait_s = (1.0 - self.tokens) / rate.per_s.max(f64::MIN_POSITIVE);
            Err(Busy {
                retry_after_ms: (wait_s * 1000.0).ceil().clamp(1.0, 3_600_000.0) as u64,
            })
        }
    }
}

/// The limiter: one bucket per established client name, one for newcomers.
#[derive(Debug, Clone)]
pub struct Limiter {
    rate: Rate,
    /// Name → (bucket, the order it was added in).
    named: BTreeMap<String, (Bucket, u64)>,
    newcomers: Option<Bucket>,
    max_named: usize,
    added: u64,
    refused: u64,
}

/// How many client names get a bucket of their own.
pub const MAX_NAMED: usize = 64;

impl Limiter {
    /// A limiter applying `rate` to each client.
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            named: BTreeMap::new(),
            newcomers: None,
            max_named: MAX_NAMED,
            added: 0,
            refused: 0,
        }
    }

    /// Admits one message from `client` at `now_ms`, or says when to retry.
    pub fn admit(&mut self, client: &str, now_ms: u64) -> Result<(), Busy> {
        let rate = self.rate;
        let result = if let Some((bucket, _)) = self.named.get_mut(client) {
            bucket.take(rate, now_ms)
        } else {
            let shared = self
                .newcomers
                .get_or_insert_with(|| Bucket::full(rate, now_ms));
            shared.take(rate, now_ms).map(|()| {
                if self.named.len() >= self.max_named {
                    // Drop the newest name: established clients keep their buckets.
                    if let Some(newest) = self
                        .named
                        .iter()
                        .max_by_key(|(_, (_, order))| *order)
                        .map(|(k, _)| k.clone())
                    {
                        self.named.remove(&newest);
                    }
                }
                let mut own = Bucket::full(rate, now_ms);
                own.tokens -= 1.0;
                self.added += 1;
                self.named.insert(client.to_owned(), (own, self.added));
            })
        };
        if result.is_err() {
            self.refused += 1;
        }
        result
    }

    /// Messages refused since the start.
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate::new(10.0, 20.0);

    fn admitted(l: &mut Limiter, client: &str, n: usize, now_ms: u64) -> usize {
        (0..n).filter(|_| l.admit(client, now_ms).is_ok()).count()
    }

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let mut l = Limiter::new(RATE);
        assert_eq!(admitted(&mut l, "a", 100, 0), 20);
        let busy = l.admit("a", 0).expect_err("over the burst");
        assert_eq!(busy.retry_after_ms, 100);
        // One second later: ten more, not twenty.
        assert_eq!(admitted(&mut l, "a", 100, 1_000), 10);
        // Exactly when it said: admitted.
        let busy = l.admit("a", 1_000).expect_err("over the rate");
        assert!(l.admit("a", 1_000 + busy.retry_after_ms).is_ok());
        assert_eq!(l.refused(), 80 + 90 + 1 + 1);
    }

    #[test]
    fn one_client_over_its_rate_does_not_slow_another() {
        let mut l = Limiter::new(RATE);
        assert_eq!(admitted(&mut l, "supervisor", 1, 0), 1);
        for t in 0..100u64 {
            admitted(&mut l, "careless", 1_000, t * 10);
        }
        assert_eq!(admitted(&mut l, "supervisor", 15, 1_000), 15);
    }

    #[test]
    fn invented_names_share_one_bucket_and_cannot_evict_established_clients() {
        let mut l = Limiter::new(RATE);
        for name in ["supervisor", "homeassistant", "nodered"] {
            assert!(l.admit(name, 0).is_ok());
        }
        // Ten seconds of a flood under a fresh name per message.
        let mut flood_admitted = 0;
        for i in 0..50_000u64 {
            if l.admit(&format!("x{i}"), i / 5).is_ok() {
                flood_admitted += 1;
            }
        }
        // The newcomers bucket: its burst plus its rate over ten seconds.
        assert!(flood_admitted <= 20 + 100 + 1, "{flood_admitted}");
        assert!(l.named.len() <= MAX_NAMED);
        for name in ["supervisor", "homeassistant", "nodered"] {
            assert!(l.named.contains_key(name), "{name} was evicted");
            assert_eq!(admitted(&mut l, name, 10, 10_000), 10, "{name}");
        }
    }

    #[test]
    fn a_clock_that_goes_back_is_harmless() {
        let mut l = Limiter::new(RATE);
        assert_eq!(admitted(&mut l, "a", 20, 5_000), 20);
        assert!(l.admit("a", 1_000).is_err());
        assert_eq!(admitted(&mut l, "a", 100, 6_000), 10);
    }
}
