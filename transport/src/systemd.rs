//! systemd's notify protocol for `Type=notify` units (`packaging/systemd/`): `READY=1` once the
//! process serves, `WATCHDOG=1` from its main loop, `STOPPING=1` on the way out. Outside
//! systemd (no `NOTIFY_SOCKET`) every call does nothing.
//!
//! The watchdog is fed **only by the main loop**, on a timer that is one arm of its `select!`:
//! if the loop wedges (a blocking call, a deadlock, a busy task starving it), the pings stop and
//! systemd kills and restarts the service after `WatchdogSec`. A helper task that pinged on its
//! own would keep a wedged gateway alive.
use std::time::Duration;

use sd_notify::NotifyState;

/// The main loop's link to systemd.
#[derive(Debug, Clone)]
pub struct Systemd {
    watchdog: Option<Duration>,
}

impl Systemd {
    /// Reads `WATCHDOG_USEC` (and `WATCHDOG_PID`) from the environment.
    pub fn from_env() -> Self {
        let mut usec = 0u64;
        let watchdog = sd_notify::watchdog_enabled(false, &mut usec)
            .then(|| Duration::from_micros(usec))
            .filter(|d| !d.is_zero());
        Self { watchdog }
    }

    /// How often the main loop must call [`Systemd::feed`]: half the watchdog timeout, or an
    /// hour when there is no watchdog (the timer arm then costs nothing).
    pub fn feed_every(&self) -> Duration {
        self.watchdog.map_or(Duration::from_secs(3600), |d| {
            (d / 2).max(Duration::from_millis(100))
        })
    }

    /// Whether systemd watches this process.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// `READY=1` (and a status line for `systemctl status`).
    pub fn ready(&self, status: &str) {
        let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// `WATCHDOG=1`: call it from the main loop only.
    pub fn feed(&self) {
        if self.watchdog.is_some() {
            let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
        }
    }

    /// A new status line for `systemctl status`.
    pub fn status(&self, status: &str) {
        let _ = sd_notify::notify(false, &[NotifyState::Status(status)]);
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_watchdog_the_loop_is_not_woken_often() {
        let s = Systemd { watchdog: None };
        assert_eq!(s.feed_every(), Duration::from_secs(3600));
        let s = Systemd {
            watchdog: Some(Duration::from_secs(30)),
        };
        assert_eq!(s.feed_every(), Duration::from_secs(15));
    }

    #[test]
    fn notify_reaches_a_notify_socket() {
        // A real datagram socket standing in for systemd's NOTIFY_SOCKET.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        std::env::set_var("NOTIFY_SOCKET", &path);
        std::env::set_var("WATCHDOG_USEC", "4000000");
        std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
        let s = Systemd::from_env();
        assert_eq!(s.watchdog(), Some(Duration::from_secs(4)));
        s.ready("serving");
        s.feed();
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("READY");
        let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(
            ready.contains("READY=1") && ready.contains("STATUS=serving"),
            "{ready}"
        );
        let n = sock.recv(&mut buf).expect("WATCHDOG");
        assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "WATCHDOG=1");
        std::env::remove_var("NOTIFY_SOCKET");
    }
}
