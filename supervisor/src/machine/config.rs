//! The supervisor's policies (timeouts, rates, the topic tree), with their defaults.

use std::time::Duration;

use super::*;

/// The supervisor's policies.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// The topic tree.
    pub topics: Topics,
    /// A printer is stale after this many of its heartbeats without a `state`.
    pub stale_heartbeats: u32,
    /// A start command expires this long after it was sent.
    pub command_ttl: Duration,
    /// A start with no sign of life after this long is sent again (a new command id).
    pub command_retry: Duration,
    /// A job whose printer is silent this long is flagged `timed_out` (never moved).
    pub step_timeout: Duration,
    /// Jobs failed in a row before a printer is held out of dispatch.
    pub breaker_threshold: u32,
    /// Minimum time between two queue snapshots.
    pub queue_min_interval: Duration,
    /// A printer online without a `state` for this long is asked to re-publish (rebirth).
    pub rebirth_after: Duration,
    /// Home Assistant discovery and buttons.
    pub ha: HaConfig,
    /// Secret that makes the supervisor's command ids unpredictable (random for each
    /// configuration; a deterministic simulation sets its own). A client that could guess the
    /// next id could send it first, and the real command would be answered `duplicate`.
    pub command_key: [u8; 16],
    /// API requests admitted per client (a client over it is answered busy).
    pub api_rate: Rate,
    /// Upload chunks admitted per client (a rate of their own).
    pub upload_rate: Rate,
    /// How many ended jobs, and for how long, the supervisor keeps (the rest is archived).
    pub history: HistoryConfig,
}

/// Retention of ended jobs (done, cancelled, failed, interrupted, timed out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Ended jobs kept, at most (the most recently ended).
    pub keep_jobs: usize,
    /// Ended jobs are kept at most this many days.
    pub keep_days: u32,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            keep_jobs: 10_000,
            keep_days: 90,
        }
    }
}

impl SupervisorConfig {
    /// `command_ttl` in milliseconds (the machine counts in milliseconds of `Now`).
    pub fn command_ttl_ms(&self) -> u64 {
        ms(self.command_ttl)
    }
    /// `command_retry` in milliseconds.
    pub fn command_retry_ms(&self) -> u64 {
        ms(self.command_retry)
    }
    /// `step_timeout` in milliseconds.
    pub fn step_timeout_ms(&self) -> u64 {
        ms(self.step_timeout)
    }
    /// `queue_min_interval` in milliseconds.
    pub fn queue_min_interval_ms(&self) -> u64 {
        ms(self.queue_min_interval)
    }
    /// `rebirth_after` in milliseconds.
    pub fn rebirth_after_ms(&self) -> u64 {
        ms(self.rebirth_after)
    }
}

/// A duration in milliseconds, saturating (no setting comes near).
pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// API requests the supervisor admits per client: a hundred a second, two hundred at once.
pub const API_RATE: Rate = Rate::new(100.0, 200.0);

/// Upload chunks the supervisor admits per client: six hundred a second (64 KiB each: 39 MB/s
/// from one client), as many at once. Under `API_RATE` an upload was held to 6.5 MB/s.
pub const UPLOAD_RATE: Rate = Rate::new(600.0, 600.0);

/// 16 random bytes from the operating system (a clock-derived fallback if it has none: ids
/// stay distinct, if less secret).
fn random_key() -> [u8; 16] {
    let mut key = [0u8; 16];
    if getrandom::fill(&mut key).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        key = (t ^ u128::from(std::process::id())).to_le_bytes();
    }
    key
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            command_key: random_key(),
            topics: Topics::default(),
            stale_heartbeats: 3,
            command_ttl: Duration::from_millis(120_000),
            command_retry: Duration::from_millis(15_000),
            step_timeout: Duration::from_millis(300_000),
            breaker_threshold: 3,
            queue_min_interval: Duration::from_millis(250),
            rebirth_after: Duration::from_millis(5_000),
            ha: HaConfig::default(),
            api_rate: API_RATE,
            upload_rate: UPLOAD_RATE,
            history: HistoryConfig::default(),
        }
    }
}
