//! The tokio shell that runs a [`Link`] over a serial port.
//!
//! [`SerialLink::spawn`] starts one task per printer. The task owns the port and the
//! driver; the rest of the gateway talks to it through **bounded** channels only:
//!
//! - commands in: print lines ([`SerialLink::submit`], back-pressured: the task takes more
//!   only while fewer than [`ShellConfig::queue_high_water`] lines wait in the driver), and a
//!   separate small control channel (send-now, emergency stop, pause, resume, clear, close) so
//!   control never waits behind print lines;
//! - events out: an `mpsc` receiver of [`LinkEvent`]s. The task never waits for the consumer:
//!   when the channel is full, events wait in a local queue where temperature reports and
//!   acknowledgements are coalesced (latest wins — `Acked { seq }` is cumulative, so no count
//!   is lost) and informational messages are dropped (counted in [`LinkStatus`]); `Ready`,
//!   `Fatal`, `Reset`, `Timeout`, `LinkError`, `Disconnected` are always delivered, in order;
//! - a [`watch`] of [`LinkStatus`] (connected, ready, acked count, queue depths, counters).
//!
//! When the port fails (read error, end of file, write error) the task reports
//! [`LinkEvent::Disconnected`], drops the interrupted print (see [`Link::on_close`]) and keeps
//! trying to open the port again with a jittered, capped exponential backoff; every new
//! session starts with [`Link::on_open`] (banner, handshake, `Ready`).
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_serial::{SerialPort, SerialPortBuilderExt, SerialStream};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::link::{LineFramer, Link, LinkConfig, LinkEvent, LinkStats, SubmitError};

/// Knobs of the shell (the driver's are in [`LinkConfig`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ShellConfig {
    /// Longest line accepted from the printer; longer input is reported as garbage and
    /// skipped up to the next line break (memory stays bounded whatever arrives).
    pub max_line: usize,
    /// Print lines the driver may hold before the task stops taking more from
    /// [`SerialLink::submit`].
    pub queue_high_water: usize,
    /// Capacity of the event channel.
    pub event_capacity: usize,
    /// Informational events (messages, garbage) kept locally while the consumer is slow;
    /// more are dropped.
    pub max_pending_info: usize,
    /// First delay before reopening the port after it failed.
    pub reconnect_min: Duration,
    /// Longest delay between attempts to reopen the port.
    pub reconnect_max: Duration,
    /// Printer identifier for log spans.
    pub printer: String,
}

impl Default for ShellConfig {
    fn default() -> Self {
        Self {
            max_line: 512,
            queue_high_water: 256,
            event_capacity: 256,
            max_pending_info: 64,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            printer: String::new(),
        }
    }
}

/// Errors of the handle.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The serial task has ended (closed, or panicked).
    #[error("the serial link task has stopped")]
    Stopped,
    /// A submitted line is not a valid command.
    #[error("line {index} of the batch: {source}")]
    Invalid {
        /// Position in the batch.
        index: usize,
        /// Why.
        #[source]
        source: SubmitError,
    },
}

/// What the task publishes about itself (a [`watch`], latest wins).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LinkStatus {
    /// The port is open.
    pub connected: bool,
    /// The handshake is done.
    pub ready: bool,
    /// Print lines acknowledged, cumulative over the task's life.
    pub acked: u64,
    /// Print lines waiting in the driver.
    pub queued: usize,
    /// Lines written and not yet acknowledged.
    pub in_flight: usize,
    /// Driver counters.
    pub stats: LinkStats,
    /// Informational events dropped because the consumer was slow.
    pub events_dropped: u64,
    /// Sessions opened so far.
    pub sessions: u64,
}

#[derive(Debug)]
enum Control {
    SendNow(String),
    EmergencyStop,
    MakeSafe,
    Pause,
    Resume,
    Clear(oneshot::Sender<usize>),
    Close,
}

/// Handle of a running serial link task. Dropping it closes the link.
#[derive(Debug)]
pub struct SerialLink {
    lines: mpsc::Sender<Vec<String>>,
    control: mpsc::Sender<Control>,
    status: watch::Receiver<LinkStatus>,
    task: JoinHandle<()>,
}

impl SerialLink {
    /// Starts the task for the port at `path` (`/dev/ttyUSB0`, or a simulator's pty link) at
    /// `baud`. Returns the handle and the event receiver. Must be called inside a tokio
    /// runtime. The port is opened (and reopened) by the task; opening failures are retried.
    pub fn spawn(
        path: impl Into<PathBuf>,
        baud: u32,
        config: LinkConfig,
    ) -> (SerialLink, mpsc::Receiver<LinkEvent>) {
        Self::spawn_with(path, baud, config, ShellConfig::default())
    }

    /// [`SerialLink::spawn`] with shell knobs.
    pub fn spawn_with(
        path: impl Into<PathBuf>,
        baud: u32,
        config: LinkConfig,
        shell: ShellConfig,
    ) -> (SerialLink, mpsc::Receiver<LinkEvent>) {
        let path = path.into();
        let (lines_tx, lines_rx) = mpsc::channel(8);
        let (control_tx, control_rx) = mpsc::channel(32);
        let (events_tx, events_rx) = mpsc::channel(shell.event_capacity.max(1));
        let (status_tx, status_rx) = watch::channel(LinkStatus::default());
        let span = info_span!("serial", printer = %shell.printer, port = %path.display());
        let task = Task {
            path,
            baud,
            link: Link::new(config),
            cfg: shell,
            lines: lines_rx,
            control: control_rx,
            events: Outbox::new(events_tx),
            status: status_tx,
            sessions: 0,
            closing: false,
        };
        let task = tokio::spawn(task.run().instrument(span));
        (
            SerialLink {
                lines: lines_tx,
                control: control_tx,
                status: status_rx,
                task,
            },
            events_rx,
        )
    }

    /// Queues print lines (comment-free, see [`crate::link::gcode_lines`]) in order. Waits
    /// while the driver's queue is full: this is the back-pressure of a print stream.
    pub async fn submit(&self, lines: Vec<String>) -> Result<(), SerialError> {
        for (index, line) in lines.iter().enumerate() {
            crate::link::check_command(line)
                .map_err(|source| SerialError::Invalid { index, source })?;
        }
        self.lines
            .send(lines)
            .await
            .map_err(|_| SerialError::Stopped)
    }

    /// Queues a command ahead of all print lines.
    pub async fn send_now(&self, cmd: impl Into<String>) -> Result<(), SerialError> {
        let cmd = cmd.into();
        crate::link::check_command(&cmd)
            .map_err(|source| SerialError::Invalid { index: 0, source })?;
        self.ctl(Control::SendNow(cmd)).await
    }

    /// Writes `M112` at once.
    pub async fn emergency_stop(&self) -> Result<(), SerialError> {
        self.ctl(Control::EmergencyStop).await
    }

    /// Drops the queued print lines and makes the printer safe at once (see
    /// [`Link::make_safe`](crate::link::Link::make_safe)); call [`SerialLink::clear`] first to
    /// drop the lines still on their way to the driver too.
    pub async fn make_safe(&self) -> Result<(), SerialError> {
        self.ctl(Control::MakeSafe).await
    }

    /// Stops taking print lines.
    pub async fn pause(&self) -> Result<(), SerialError> {
        self.ctl(Control::Pause).await
    }

    /// Resumes print lines.
    pub async fn resume(&self) -> Result<(), SerialError> {
        self.ctl(Control::Resume).await
    }

    /// Drops the queued print lines (lines already submitted but still in the channel are
    /// dropped too); returns how many the driver held.
    pub async fn clear(&self) -> Result<usize, SerialError> {
        let (tx, rx) = oneshot::channel();
        self.ctl(Control::Clear(tx)).await?;
        rx.await.map_err(|_| SerialError::Stopped)
    }

    /// The task's status, updated as it runs.
    pub fn status(&self) -> watch::Receiver<LinkStatus> {
        self.status.clone()
    }

    /// Closes the port and waits for the task to end.
    pub async fn close(self) -> Result<(), SerialError> {
        let _ = self.control.send(Control::Close).await;
        self.task.await.map_err(|_| SerialError::Stopped)
    }

    async fn ctl(&self, c: Control) -> Result<(), SerialError> {
        self.control.send(c).await.map_err(|_| SerialError::Stopped)
    }
}

/// The event side: never blocks the serial loop.
struct Outbox {
    tx: mpsc::Sender<LinkEvent>,
    pending: VecDeque<LinkEvent>,
    info_pending: usize,
    dropped: u64,
    max_info: usize,
}

fn is_info(e: &LinkEvent) -> bool {
    matches!(e, LinkEvent::Message(_) | LinkEvent::Garbage { .. })
}

impl Outbox {
    fn new(tx: mpsc::Sender<LinkEvent>) -> Self {
        Self {
            tx,
            pending: VecDeque::new(),
            info_pending: 0,
            dropped: 0,
            max_info: 64,
        }
    }

    fn push(&mut self, ev: LinkEvent) {
        if self.pending.is_empty() {
            match self.tx.try_send(ev) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(ev)) => return self.queue(ev),
            }
        }
        self.queue(ev);
    }

    fn queue(&mut self, ev: LinkEvent) {
        match &ev {
            LinkEvent::Temperatures(_) => {
                // Latest wins; temperatures carry no order with other events.
                self.pending
                    .retain(|e| !matches!(e, LinkEvent::Temperatures(_)));
            }
            LinkEvent::Acked { .. } => {
                // Cumulative: an earlier one is replaced unless an event that must stay after
                // it (a reset, say) has been queued since.
                let last = self
                    .pending
                    .iter()
                    .rposition(|e| !is_info(e) && !matches!(e, LinkEvent::Temperatures(_)));
                if let Some(i) = last {
                    if matches!(self.pending[i], LinkEvent::Acked { .. }) {
                        self.pending.remove(i);
                    }
                }
            }
            e if is_info(e) => {
                if self.info_pending >= self.max_info {
                    self.dropped += 1;
                    return;
                }
                self.info_pending += 1;
            }
            _ => {}
        }
        self.pending.push_back(ev);
    }

    /// Sends what the channel takes now.
    fn flush(&mut self) {
        while let Some(ev) = self.pending.pop_front() {
            let info = is_info(&ev);
            match self.tx.try_send(ev) {
                Ok(()) => {
                    if info {
                        self.info_pending -= 1;
                    }
                }
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    self.pending.push_front(ev);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.pending.clear();
                    self.info_pending = 0;
                    return;
                }
            }
        }
    }
}

struct Task {
    path: PathBuf,
    baud: u32,
    link: Link,
    cfg: ShellConfig,
    lines: mpsc::Receiver<Vec<String>>,
    control: mpsc::Receiver<Control>,
    events: Outbox,
    status: watch::Sender<LinkStatus>,
    sessions: u64,
    closing: bool,
}

/// Why a session ended.
enum End {
    Closed,
    Lost(String),
}

/// Opens the port. Modem-control lines are set where the device has them: a pseudo-terminal
/// rejects the ioctls (`ENOTTY`/`EINVAL`), which is not an error for us.
fn open_port(path: &Path, baud: u32) -> Result<SerialStream, tokio_serial::Error> {
    let mut port = tokio_serial::new(path.to_string_lossy(), baud)
        .timeout(Duration::from_millis(100))
        .open_native_async()?;
    for (what, result) in [
        ("DTR", port.write_data_terminal_ready(true)),
        ("RTS", port.write_request_to_send(true)),
    ] {
        if let Err(e) = result {
            let benign = e.description.contains("Inappropriate ioctl")
                || e.description.contains("Invalid argument");
            if benign {
                debug!(line = what, error = %e, "modem control not supported by this device");
            } else {
                warn!(line = what, error = %e, "could not set a modem control line; going on");
            }
        }
    }
    Ok(port)
}

/// Why `path` cannot be opened, said so that an operator knows what to do. The three common
/// causes on a Pi each name their fix: the device is missing (unplugged, powered off, or a
/// wrong path), the service user may not open it (not in `dialout`), another program holds it.
pub fn open_failure(path: &Path, e: &tokio_serial::Error) -> String {
    use std::io::ErrorKind as Io;
    use tokio_serial::ErrorKind as K;
    let p = path.display();
    let desc = e.description.to_lowercase();
    if matches!(e.kind, K::Io(Io::NotFound)) || desc.contains("no such file") {
        format!(
            "{p} does not exist: is the printer plugged in and switched on, and is the path \
             right? (`ls -l /dev/serial/by-id/` lists the connected printers by stable name)"
        )
    } else if matches!(e.kind, K::Io(Io::PermissionDenied)) || desc.contains("permission denied") {
        format!(
            "permission denied opening {p}: the gateway's user must be in the `dialout` group \
             (the package's printloop-gateway user is; otherwise `sudo adduser <user> dialout` \
             and restart the gateway)"
        )
    } else if desc.contains("busy") {
        format!(
            "{p} is busy: is another program holding it (OctoPrint, Klipper, a serial terminal, \
             ModemManager, or a second gateway)?"
        )
    } else {
        format!("cannot open {p}: {}", e.description)
    }
}

/// A cheap jitter source without a random-number crate: the std hasher is randomly keyed.
fn jitter(max: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9);
    let r = h.finish() % 1000;
    max.mul_f64(r as f64 / 1000.0)
}

impl Task {
    async fn run(mut self) {
        self.events.max_info = self.cfg.max_pending_info;
        let mut backoff = self.cfg.reconnect_min;
        // The last reason the port could not be opened: a new reason is a warning and an event
        // (the printer's state then says why it is disconnected); the same one again is quiet.
        let mut open_error: Option<String> = None;
        loop {
            if self.closing {
                break;
            }
            match open_port(&self.path, self.baud) {
                Ok(port) => {
                    open_error = None;
                    self.sessions += 1;
                    info!(session = self.sessions, baud = self.baud, "port open");
                    backoff = self.cfg.reconnect_min;
                    match self.session(port).await {
                        End::Closed => break,
                        End::Lost(reason) => {
                            let dropped = self.link.on_close();
                            warn!(%reason, dropped, "port lost");
                            // The status says "not ready" before anyone hears of the loss,
                            // so a consumer reacting to the event never sees a stale status.
                            self.publish_status(false);
                            self.emit(LinkEvent::Disconnected { reason });
                        }
                    }
                }
                Err(e) => {
                    let reason = open_failure(&self.path, &e);
                    if open_error.as_deref() == Some(reason.as_str()) {
                        debug!(%reason, "cannot open the port yet");
                    } else {
                        warn!("{reason}; trying again");
                        self.publish_status(false);
                        self.emit(LinkEvent::Disconnected {
                            reason: reason.clone(),
                        });
                        open_error = Some(reason);
                    }
                }
            }
            self.publish_status(false);
            // Wait before the next attempt, still serving commands and the event outbox.
            let delay = backoff / 2 + jitter(backoff / 2);
            backoff = (backoff * 2).min(self.cfg.reconnect_max);
            self.idle(delay).await;
        }
        self.link.on_close();
        self.publish_status(false);
        self.events.flush();
        // Whatever the consumer has not taken yet is handed over before the task ends.
        while let Some(ev) = self.events.pending.pop_front() {
            if self.events.tx.send(ev).await.is_err() {
                break;
            }
        }
        info!("serial link closed");
    }

    fn emit(&mut self, ev: LinkEvent) {
        self.events.push(ev);
    }

    fn drain_link_events(&mut self) {
        while let Some(ev) = self.link.poll_event() {
            self.events.push(ev);
        }
    }

    fn publish_status(&self, connected: bool) {
        let status = LinkStatus {
            connected,
            ready: self.link.is_ready(),
            acked: self.link.acked_count(),
            queued: self.link.queued(),
            in_flight: self.link.in_flight(),
            stats: self.link.stats(),
            events_dropped: self.events.dropped,
            sessions: self.sessions,
        };
        self.status.send_if_modified(|s| {
            if *s == status {
                false
            } else {
                *s = status;
                true
            }
        });
    }

    fn on_control(&mut self, c: Control) {
        match c {
            Control::SendNow(cmd) => {
                if let Err(e) = self.link.send_now(&cmd) {
                    warn!(error = %e, "send_now refused");
                }
            }
            Control::EmergencyStop => self.link.emergency_stop(),
            Control::MakeSafe => self.link.make_safe(Instant::now().into_std()),
            Control::Pause => self.link.pause_stream(),
            Control::Resume => self.link.resume_stream(),
            Control::Clear(reply) => {
                let mut n = self.link.clear();
                while let Ok(batch) = self.lines.try_recv() {
                    n += batch.len();
                }
                let _ = reply.send(n);
            }
            Control::Close => self.closing = true,
        }
    }

    fn on_lines(&mut self, batch: Vec<String>) {
        for line in batch {
            if let Err(e) = self.link.submit(&line) {
                // Checked by the handle already; only a logic error gets here.
                warn!(error = %e, "print line refused");
            }
        }
    }

    /// Between sessions: serve commands and flush events until `delay` has passed.
    async fn idle(&mut self, delay: Duration) {
        let until = Instant::now() + delay;
        loop {
            self.events.flush();
            let outbox_waiting = !self.events.pending.is_empty();
            let wake = tokio::select! {
                () = tokio::time::sleep_until(until) => return,
                c = self.control.recv() => Wake::Control(c),
                _ = self.events.tx.reserve(), if outbox_waiting => Wake::Capacity,
            };
            match wake {
                Wake::Control(Some(c)) => {
                    self.on_control(c);
                    if self.closing {
                        return;
                    }
                }
                Wake::Control(None) => {
                    self.closing = true;
                    return;
                }
                _ => {}
            }
        }
    }

    async fn session(&mut self, port: SerialStream) -> End {
        let (mut reader, mut writer) = tokio::io::split(port);
        let start = Instant::now();
        self.link.on_open(start.into_std());
        self.publish_status(true);
        let mut rbuf = vec![0u8; 4096];
        let mut framer = LineFramer::new(self.cfg.max_line);
        let mut lines_open = true;
        let mut wbuf: Vec<u8> = Vec::with_capacity(1024);
        loop {
            // Carry out what the driver asked for.
            while let Some(bytes) = self.link.poll_transmit() {
                wbuf.extend_from_slice(&bytes);
            }
            // Status first: a consumer that sees an event finds the status at least as new.
            self.publish_status(true);
            self.drain_link_events();
            self.events.flush();
            let deadline = self.link.next_deadline().map(Instant::from_std);
            let take_lines = lines_open && self.link.queued() < self.cfg.queue_high_water;
            let outbox_waiting = !self.events.pending.is_empty();
            let writing = !wbuf.is_empty();
            let wake = tokio::select! {
                biased;
                c = self.control.recv() => Wake::Control(c),
                r = reader.read(&mut rbuf) => Wake::Read(r),
                w = writer.write(&wbuf), if writing => Wake::Wrote(w),
                () = sleep_until_opt(deadline) => Wake::Timer,
                b = self.lines.recv(), if take_lines => Wake::Lines(b),
                _ = self.events.tx.reserve(), if outbox_waiting => Wake::Capacity,
            };
            match wake {
                Wake::Control(Some(c)) => {
                    self.on_control(c);
                    if self.closing {
                        let _ = writer.write_all(&wbuf).await;
                        let _ = writer.flush().await;
                        return End::Closed;
                    }
                    self.link.on_timeout(Instant::now().into_std());
                }
                Wake::Control(None) => return End::Closed,
                Wake::Read(Ok(0)) => return End::Lost("end of file on the port".into()),
                Wake::Read(Ok(n)) => {
                    let now = Instant::now().into_std();
                    let link = &mut self.link;
                    framer.push(&rbuf[..n], |line| link.on_line(now, line));
                }
                Wake::Read(Err(e)) => return End::Lost(format!("read: {e}")),
                Wake::Wrote(Ok(0)) => return End::Lost("write: port closed".into()),
                Wake::Wrote(Ok(n)) => {
                    wbuf.drain(..n);
                }
                Wake::Wrote(Err(e)) => return End::Lost(format!("write: {e}")),
                Wake::Timer => self.link.on_timeout(Instant::now().into_std()),
                Wake::Lines(Some(batch)) => {
                    self.on_lines(batch);
                    self.link.on_timeout(Instant::now().into_std());
                }
                // No more print lines will come; control decides when to close.
                Wake::Lines(None) => lines_open = false,
                Wake::Capacity => {}
            }
        }
    }
}

/// What woke the loop up.
enum Wake {
    Control(Option<Control>),
    Read(std::io::Result<usize>),
    Wrote(std::io::Result<usize>),
    Timer,
    Lines(Option<Vec<String>>),
    Capacity,
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_that_cannot_be_opened_names_the_fix() {
        let path = Path::new("/dev/ttyUSB7");
        let missing = open_port(Path::new("/nonexistent/ttyUSB7"), 115_200).expect_err("missing");
        let why = open_failure(Path::new("/nonexistent/ttyUSB7"), &missing);
        assert!(
            why.contains("does not exist") && why.contains("/dev/serial/by-id"),
            "{why}"
        );
        for (kind, desc, expect) in [
            (
                tokio_serial::ErrorKind::Io(std::io::ErrorKind::PermissionDenied),
                "Permission denied",
                "dialout",
            ),
            (
                tokio_serial::ErrorKind::NoDevice,
                "Device or resource busy",
                "another program",
            ),
            (
                tokio_serial::ErrorKind::Unknown,
                "Something odd",
                "Something odd",
            ),
        ] {
            let why = open_failure(path, &tokio_serial::Error::new(kind, desc));
            assert!(
                why.contains(expect) && why.contains("/dev/ttyUSB7"),
                "{why}"
            );
        }
    }
}
