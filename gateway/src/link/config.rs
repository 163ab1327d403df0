//! Knobs of the link driver.
use std::time::Duration;

/// How many lines may be on their way to the firmware at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamMode {
    /// Ping-pong until the firmware shows `ADVANCED_OK` (`ok N.. P.. B..`), then send ahead,
    /// bounded by its free command slots and [`LinkConfig::rx_buffer`].
    #[default]
    Auto,
    /// Always one line in flight, whatever the firmware reports.
    PingPong,
}

/// Configuration of a [`Link`](super::Link). `LinkConfig::default()` suits a stock Marlin 2.x
/// board; tests shrink the timeouts.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// Ping-pong or send-ahead.
    pub mode: StreamMode,
    /// Marlin `RX_BUFFER_SIZE`: send-ahead never has more unacknowledged bytes than this on the
    /// wire, so the firmware's UART buffer cannot overflow.
    pub rx_buffer: usize,
    /// Upper bound of lines in flight in send-ahead mode, whatever `B` says.
    pub max_in_flight: usize,
    /// Numbered lines kept for `Resend:` requests (at least 64 is sensible; never below the
    /// window). A request for an older line is a fatal link error.
    pub history: usize,
    /// How long to wait for the `start` banner after opening before talking anyway (boards
    /// whose USB adapter does not reset them never print one).
    pub boot_timeout: Duration,
    /// No `ok` and no `busy:` for this long (for heating and other blocking commands: also no
    /// temperature line) ⇒ probe with `M105`.
    pub response_timeout: Duration,
    /// Probes sent without any answer before [`LinkEvent::Timeout`](super::LinkEvent::Timeout).
    pub probe_retries: u32,
    /// Longest time a blocking command (M109, M190, G28, G29, M400, G4) may take, keep-alives or
    /// not, before the link probes.
    pub blocking_timeout: Duration,
    /// While re-sending after a `Resend:` in send-ahead mode, how long to wait for the re-sent
    /// line's `ok` before assuming the stale-request count was off and probing.
    pub recovery_timeout: Duration,
    /// Temperature report interval: `M155 S<secs>` when the firmware can auto-report, else
    /// `M105` polling at this interval. Zero disables both.
    pub temperature_interval: Duration,
    /// After [`Link::make_safe`](super::Link::make_safe), how long the firmware has to
    /// acknowledge `M104 S0` and `M140 S0` before the link sends `M112` (a firmware busy with a
    /// long `G4`, or without an emergency parser, cannot be stopped any other way).
    pub safe_within: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            mode: StreamMode::Auto,
            rx_buffer: 128,
            max_in_flight: 16,
            history: 64,
            boot_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(10),
            probe_retries: 2,
            blocking_timeout: Duration::from_secs(30 * 60),
            recovery_timeout: Duration::from_secs(1),
            temperature_interval: Duration::from_secs(2),
            safe_within: Duration::from_millis(500),
        }
    }
}

impl LinkConfig {
    /// Every timeout multiplied by `factor` (e.g. `1.0 / 50.0` for a simulator running fifty
    /// times faster than real time).
    pub fn scaled(mut self, factor: f64) -> Self {
        let f = |d: Duration| Duration::from_secs_f64((d.as_secs_f64() * factor).max(1e-6));
        self.boot_timeout = f(self.boot_timeout);
        self.response_timeout = f(self.response_timeout);
        self.blocking_timeout = f(self.blocking_timeout);
        self.recovery_timeout = f(self.recovery_timeout);
        self.temperature_interval = f(self.temperature_interval);
        self.safe_within = f(self.safe_within);
        self
    }
}
