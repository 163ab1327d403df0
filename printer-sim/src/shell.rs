//! The tokio shell: one pseudo-terminal per simulated printer, driven by the sans-IO
//! [`Firmware`]. It turns real time into the core's time (× `speed`), feeds it what the
//! client writes, writes what the core says has reached the host by now, and detects the
//! client opening and closing the device.
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{cfmakeraw, tcflush, tcgetattr, tcsetattr, FlushArg, SetArg};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::firmware::{Fault, Firmware, Stats};
use crate::{SimConfig, SimError};

/// How often the shell looks for a client opening the device while none has it open
/// (a pty master signals the slave's close, not its open).
const OPEN_POLL: Duration = Duration::from_millis(5);

/// A snapshot of a running simulator.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SimStats {
    /// The firmware's counters and state.
    pub firmware: Stats,
    /// The current slave device (`/dev/pts/N`); changes on [`SimControl::replug`].
    pub device: PathBuf,
    /// False between [`SimControl::cable_pull`] and [`SimControl::replug`].
    pub plugged: bool,
}

#[derive(Debug)]
enum Control {
    Fault(Fault),
    CablePull,
    Replug,
    ChecksumErrorRate(f64),
    ChecksumErrorLines(Vec<u32>),
    GarbleRate(f64),
    Shutdown,
}

type Request = (Control, oneshot::Sender<Result<(), SimError>>);

/// Run-time fault control of a running simulator. Cheap to clone. Every call returns once
/// the simulator has carried it out.
#[derive(Debug, Clone)]
pub struct SimControl {
    tx: mpsc::UnboundedSender<Request>,
}

impl SimControl {
    async fn request(&self, control: Control) -> Result<(), SimError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send((control, ack))
            .map_err(|_| SimError::Stopped)?;
        done.await.map_err(|_| SimError::Stopped)?
    }

    /// Stop answering anything (bytes are still read and discarded).
    pub async fn hang(&self) -> Result<(), SimError> {
        self.request(Control::Fault(Fault::Hang)).await
    }

    /// End a hang.
    pub async fn unhang(&self) -> Result<(), SimError> {
        self.request(Control::Fault(Fault::Unhang)).await
    }

    /// Thermal runaway: two `Error:` lines, then silence until the port is reopened.
    pub async fn thermal_runaway(&self) -> Result<(), SimError> {
        self.request(Control::Fault(Fault::ThermalRunaway)).await
    }

    /// An unexpected reset: `start` banner mid-stream, state lost.
    pub async fn reset(&self) -> Result<(), SimError> {
        self.request(Control::Fault(Fault::Reset)).await
    }

    /// Unplug the USB cable: the pty master is closed (the client's reads see end-of-file,
    /// its writes fail with EIO) and the device link disappears, like a USB device node.
    pub async fn cable_pull(&self) -> Result<(), SimError> {
        self.request(Control::CablePull).await
    }

    /// Plug it back in: a fresh pty, the link re-pointed at it. The board was powered on
    /// its own supply, but opening the port resets it anyway.
    pub async fn replug(&self) -> Result<(), SimError> {
        self.request(Control::Replug).await
    }

    /// Probability per numbered line of a checksum error.
    pub async fn set_checksum_error_rate(&self, rate: f64) -> Result<(), SimError> {
        self.request(Control::ChecksumErrorRate(rate)).await
    }

    /// Line numbers whose next arrival fails its checksum.
    pub async fn add_checksum_error_lines(&self, lines: &[u32]) -> Result<(), SimError> {
        self.request(Control::ChecksumErrorLines(lines.to_vec()))
            .await
    }

    /// Probability per output line of corrupted bytes.
    pub async fn set_garble_rate(&self, rate: f64) -> Result<(), SimError> {
        self.request(Control::GarbleRate(rate)).await
    }
}

/// A running simulator. Prefer [`SimHandle::shutdown`]; otherwise the simulator stops (and
/// removes its link) once this handle and every [`SimControl`] clone are dropped.
#[derive(Debug)]
pub struct SimHandle {
    link: Option<PathBuf>,
    control: SimControl,
    stats: watch::Receiver<SimStats>,
    task: Option<JoinHandle<Result<(), SimError>>>,
}

impl SimHandle {
    /// The device a client opens: the link when one was given, else the slave's `/dev/pts/N`.
    pub fn path(&self) -> PathBuf {
        match &self.link {
            Some(link) => link.clone(),
            None => self.stats.borrow().device.clone(),
        }
    }

    /// Run-time faults.
    pub fn control(&self) -> SimControl {
        self.control.clone()
    }

    /// The latest snapshot.
    pub fn stats(&self) -> SimStats {
        self.stats.borrow().clone()
    }

    /// A receiver that sees every new snapshot (for waiting on a condition).
    pub fn watch_stats(&self) -> watch::Receiver<SimStats> {
        self.stats.clone()
    }

    /// Waits until a snapshot satisfies `pred`, at most `limit`.
    pub async fn wait_for(
        &self,
        limit: Duration,
        mut pred: impl FnMut(&SimStats) -> bool,
    ) -> Result<SimStats, SimError> {
        let mut rx = self.stats.clone();
        let wait = async {
            rx.wait_for(|s| pred(s))
                .await
                .map(|s| s.clone())
                .map_err(|_| SimError::Stopped)
        };
        tokio::time::timeout(limit, wait)
            .await
            .map_err(|_| SimError::Timeout(limit))?
    }

    /// Waits until the simulator stops on its own (an IO failure); its result says why.
    /// Returns `Ok` at once if it has already been awaited.
    pub async fn stopped(&mut self) -> Result<(), SimError> {
        match &mut self.task {
            Some(task) => {
                let result = task.await;
                self.task = None;
                result.map_err(|_| SimError::Stopped)?
            }
            None => Ok(()),
        }
    }

    /// Stops the simulator, closes the pty and removes the link.
    pub async fn shutdown(mut self) -> Result<(), SimError> {
        // If the task already ended, `stopped` returns its result.
        let _ = self.control.request(Control::Shutdown).await;
        self.stopped().await
    }
}

/// Entry point of the shell.
#[derive(Debug)]
pub struct Simulator;

impl Simulator {
    /// Creates the pty, links it at `link` (replacing a stale symlink there) and serves it on a
    /// tokio task. Must be called inside a tokio runtime.
    pub fn start(config: SimConfig, link: Option<&Path>) -> Result<SimHandle, SimError> {
        let speed = config.speed;
        let fw = Firmware::new(config)?;
        let pty = Pty::open()?;
        if let Some(link) = link {
            make_link(&pty.slave_path, link)?;
        }
        let initial = SimStats {
            firmware: fw.stats(),
            device: pty.slave_path.clone(),
            plugged: true,
        };
        let (stats_tx, stats) = watch::channel(initial);
        let (tx, rx) = mpsc::unbounded_channel();
        tracing::info!(device = %pty.slave_path.display(), link = ?link, "printer simulator listening");
        let shell = Shell {
            fw,
            pty: Some(pty),
            link: link.map(Path::to_path_buf),
            connected: false,
            pending: Vec::new(),
            epoch: Instant::now(),
            speed,
            stats: stats_tx,
            device: PathBuf::new(),
        };
        let task = tokio::spawn(shell.serve(rx));
        Ok(SimHandle {
            link: link.map(Path::to_path_buf),
            control: SimControl { tx },
            stats,
            task: Some(task),
        })
    }
}

/// The master side of one pseudo-terminal. While a client has the slave open the master is
/// registered with the reactor (`armed`); while nobody has it open it is kept unregistered,
/// because tokio's "read closed" readiness is sticky and a pty master reports HUP for as long
/// as the slave is closed. Re-registering on every open starts from clean readiness.
struct Pty {
    armed: Option<AsyncFd<OwnedFd>>,
    idle: Option<OwnedFd>,
    slave_path: PathBuf,
}

impl Pty {
    /// A pty whose slave is raw (no echo, no line discipline) and closed again, so the
    /// master sees HUP until a client opens it.
    fn open() -> Result<Pty, SimError> {
        let pair = nix::pty::openpty(None, None).map_err(SimError::Pty)?;
        let mut termios = tcgetattr(&pair.slave).map_err(SimError::Pty)?;
        cfmakeraw(&mut termios);
        tcsetattr(&pair.slave, SetArg::TCSANOW, &termios).map_err(SimError::Pty)?;
        let slave_path = nix::unistd::ttyname(&pair.slave).map_err(SimError::Pty)?;
        drop(pair.slave);
        let flags = fcntl(&pair.master, FcntlArg::F_GETFL).map_err(SimError::Pty)?;
        let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
        fcntl(&pair.master, FcntlArg::F_SETFL(flags)).map_err(SimError::Pty)?;
        Ok(Pty {
            armed: None,
            idle: Some(pair.master),
            slave_path,
        })
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        match (&self.armed, &self.idle) {
            (Some(a), _) => Some(a.get_ref().as_fd()),
            (None, Some(fd)) => Some(fd.as_fd()),
            (None, None) => None,
        }
    }

    /// Registers the master with the reactor (a client has opened the slave).
    fn arm(&mut self) -> std::io::Result<()> {
        if let Some(fd) = self.idle.take() {
            self.armed = Some(register(fd)?);
        }
        Ok(())
    }

    /// Takes the master off the reactor (the client closed the slave).
    fn disarm(&mut self) {
        if let Some(fd) = self.armed.take() {
            self.idle = Some(fd.into_inner());
        }
    }

    /// Discards output the last client left unread in the slave's input queue, so the next
    /// client does not receive it. Needs the slave open for a moment (we do not keep it open,
    /// or the master would never see a client's hang-up).
    fn discard_unread_output(&self) {
        let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_NONBLOCK;
        match nix::fcntl::open(&self.slave_path, flags, nix::sys::stat::Mode::empty()) {
            Ok(slave) => {
                let _ = tcflush(&slave, FlushArg::TCIFLUSH);
            }
            Err(e) => tracing::debug!(error = %e, "could not open the slave to flush it"),
        }
    }

    /// Whether some process has the slave open (no HUP on the master).
    fn slave_open(&self) -> bool {
        let Some(fd) = self.fd() else {
            return false;
        };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => !fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLHUP)),
            Err(_) => false,
        }
    }
}

/// Registers the master with the tokio reactor.
#[allow(unsafe_code)]
fn register(master: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `register_with_interest` requires the raw fd to stay open and unchanged for the
    // lifetime of the `AsyncFd`. The `AsyncFd` takes ownership of the `OwnedFd`, which closes
    // the fd only when dropped (after deregistration), and `OwnedFd::as_raw_fd` is constant.
    unsafe { AsyncFd::register_with_interest(master, Interest::READABLE | Interest::WRITABLE) }
        .map_err(|e| e.into_parts().1)
}

enum ReadEvent {
    Data(usize),
    Closed,
    Failed(std::io::Error),
}

/// Reads what the client wrote; `Closed` when it closed the device (or closed and reopened
/// it since the master was armed: tokio's read-closed readiness remembers the hang-up).
async fn read_pty(master: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> ReadEvent {
    loop {
        let mut guard = match master.ready(Interest::READABLE).await {
            Ok(g) => g,
            Err(e) => return ReadEvent::Failed(e),
        };
        let hup = guard.ready().is_read_closed();
        match nix::unistd::read(master.get_ref(), buf) {
            Ok(0) | Err(Errno::EIO) => {
                guard.clear_ready();
                return ReadEvent::Closed;
            }
            Ok(n) => return ReadEvent::Data(n),
            Err(Errno::EAGAIN) => {
                guard.clear_ready();
                // A hang-up happened even if someone has opened the device again since.
                if hup {
                    return ReadEvent::Closed;
                }
            }
            Err(Errno::EINTR) => {}
            Err(e) => return ReadEvent::Failed(e.into()),
        }
    }
}

/// Waits until the master can take more output.
async fn writable(master: &AsyncFd<OwnedFd>) -> std::io::Result<()> {
    let mut guard = master.writable().await?;
    guard.clear_ready();
    Ok(())
}

struct Shell {
    fw: Firmware,
    pty: Option<Pty>,
    link: Option<PathBuf>,
    connected: bool,
    /// Output due at the host that the pty did not take yet.
    pending: Vec<u8>,
    epoch: Instant,
    speed: f64,
    stats: watch::Sender<SimStats>,
    device: PathBuf,
}

impl Shell {
    /// The core's time now.
    fn vnow(&self) -> Duration {
        let real = self.epoch.elapsed();
        if self.speed == 1.0 {
            real
        } else {
            Duration::from_secs_f64(real.as_secs_f64() * self.speed)
        }
    }

    /// The real instant of a core time.
    fn real(&self, t: Duration) -> Instant {
        if self.speed == 1.0 {
            self.epoch + t
        } else {
            self.epoch + Duration::from_secs_f64((t.as_secs_f64() / self.speed).min(1e9))
        }
    }

    async fn serve(mut self, mut rx: mpsc::UnboundedReceiver<Request>) -> Result<(), SimError> {
        if let Some(pty) = &self.pty {
            self.device = pty.slave_path.clone();
        }
        let mut buf = vec![0u8; 4096];
        let result = loop {
            let now = self.vnow();
            if let Some(bytes) = self.fw.poll_output(now) {
                if self.connected {
                    self.pending.extend_from_slice(&bytes);
                }
            }
            // Every core call since the last turn (input, faults, time) may have acted on an
            // emergency command: one INFO line each, stamped with the core's time.
            while let Some(action) = self.fw.poll_emergency() {
                tracing::info!(
                    command = action.command.as_str(),
                    sim_time_s = action.at.as_secs_f64(),
                    "{action}"
                );
            }
            // Publish first: a client that reads this output then sees stats at least as new.
            self.publish();
            self.write_pending();
            let capacity = self.fw.input_capacity().min(buf.len());
            let can_read = self.connected && capacity > 0;
            let want_write = self.connected && !self.pending.is_empty();
            let mut wake = self.fw.next_deadline().map(|d| self.real(d));
            if self.pty.is_some() && !self.connected {
                let tick = Instant::now() + OPEN_POLL;
                wake = Some(wake.map_or(tick, |w| w.min(tick)));
            }
            let master = self.pty.as_ref().and_then(|p| p.armed.as_ref());
            tokio::select! {
                biased;
                req = rx.recv() => match req {
                    None => break Ok(()),
                    Some((Control::Shutdown, ack)) => {
                        let _ = ack.send(Ok(()));
                        break Ok(());
                    }
                    Some((control, ack)) => {
                        let r = self.control(control);
                        let _ = ack.send(r);
                    }
                },
                ev = async {
                    match master {
                        Some(m) => read_pty(m, &mut buf[..capacity]).await,
                        None => std::future::pending().await,
                    }
                }, if can_read => match ev {
                    ReadEvent::Data(n) => {
                        let now = self.vnow();
                        let taken = self.fw.receive(now, &buf[..n]);
                        debug_assert_eq!(taken, n);
                    }
                    ReadEvent::Closed => self.closed(),
                    ReadEvent::Failed(e) => break Err(SimError::Io(e)),
                },
                w = async {
                    match master {
                        Some(m) => writable(m).await,
                        None => std::future::pending().await,
                    }
                }, if want_write => {
                    if let Err(e) = w {
                        break Err(SimError::Io(e));
                    }
                }
                () = async {
                    match wake {
                        Some(w) => tokio::time::sleep_until(w).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            if !self.connected {
                self.check_open();
            }
        };
        self.pty = None;
        if let Some(link) = &self.link {
            remove_link(link);
        }
        result
    }

    fn control(&mut self, control: Control) -> Result<(), SimError> {
        let now = self.vnow();
        match control {
            Control::Fault(f) => self.fw.inject(now, f),
            Control::ChecksumErrorRate(r) => self.fw.set_checksum_error_rate(r),
            Control::ChecksumErrorLines(l) => self.fw.add_checksum_error_lines(&l),
            Control::GarbleRate(r) => self.fw.set_garble_rate(r),
            Control::CablePull => {
                if self.pty.is_none() {
                    return Err(SimError::InvalidState("the cable is already pulled"));
                }
                if self.connected {
                    self.closed();
                }
                self.pty = None;
                if let Some(link) = &self.link {
                    remove_link(link);
                }
                tracing::info!("cable pulled");
            }
            Control::Replug => {
                if self.pty.is_some() {
                    return Err(SimError::InvalidState("the cable is plugged in"));
                }
                let pty = Pty::open()?;
                if let Some(link) = &self.link {
                    make_link(&pty.slave_path, link)?;
                }
                tracing::info!(device = %pty.slave_path.display(), "cable replugged");
                self.device = pty.slave_path.clone();
                self.pty = Some(pty);
            }
            Control::Shutdown => {}
        }
        self.publish();
        Ok(())
    }

    fn check_open(&mut self) {
        let Some(pty) = &mut self.pty else {
            return;
        };
        if pty.slave_open() {
            // Whatever the previous client left unread must not reach this one.
            if let Some(fd) = pty.fd() {
                let _ = tcflush(fd, FlushArg::TCOFLUSH);
            }
            if let Err(e) = pty.arm() {
                tracing::warn!(error = %e, "could not register the pty with the reactor");
                return;
            }
            self.pending.clear();
            self.connected = true;
            let now = self.vnow();
            self.fw.host_opened(now);
            tracing::debug!("client opened the device");
        }
    }

    fn closed(&mut self) {
        if let Some(pty) = &mut self.pty {
            pty.disarm();
            pty.discard_unread_output();
        }
        self.connected = false;
        self.pending.clear();
        let now = self.vnow();
        self.fw.host_closed(now);
        tracing::debug!("client closed the device");
    }

    /// Writes as much pending output as the pty takes without blocking.
    fn write_pending(&mut self) {
        let Some(fd) = self.pty.as_ref().and_then(Pty::fd) else {
            self.pending.clear();
            return;
        };
        while !self.pending.is_empty() {
            match nix::unistd::write(fd, &self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return,
                Err(_) => {
                    // EIO: the client is gone; the read side reports the close.
                    self.pending.clear();
                    return;
                }
            }
        }
    }

    fn publish(&self) {
        let snapshot = SimStats {
            firmware: self.fw.stats(),
            device: self.device.clone(),
            plugged: self.pty.is_some(),
        };
        self.stats.send_if_modified(|s| {
            if *s == snapshot {
                false
            } else {
                *s = snapshot;
                true
            }
        });
    }
}

/// Points `link` at `target` atomically; replaces an existing symlink, refuses anything else.
fn make_link(target: &Path, link: &Path) -> Result<(), SimError> {
    let err = |source| SimError::Link {
        path: link.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(link) {
        if !meta.file_type().is_symlink() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a symlink",
            )));
        }
    }
    let file_name = link
        .file_name()
        .ok_or_else(|| err(std::io::Error::other("no file name")))?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = link.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(err)?;
    std::fs::rename(&tmp, link).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

/// Removes `link` if it is (still) a symlink.
fn remove_link(link: &Path) {
    if std::fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink()) {
        if let Err(e) = std::fs::remove_file(link) {
            tracing::warn!(link = %link.display(), error = %e, "could not remove the device link");
        }
    }
}
