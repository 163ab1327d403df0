//! The printer side of the gateway, as IO only: a task that owns the [`SerialLink`] and the
//! feeder, hands the gateway's commands and the link's events to the [`Streamer`] (the pure
//! machine that decides), and carries out the link operations it returns, in order.
//!
//! - A stream is fed by a feeder task that reads the file, strips comments and submits lines
//!   in batches; the link's bounded queue back-pressures it, so memory stays flat whatever the
//!   file size. It tells the streamer of each `M73` line before the line goes to the link.
//! - `Reopen` closes the port and opens it again, which resets a Marlin board (DTR).

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::files::FileCache;
use crate::link::{LinkConfig, LinkEvent};
use crate::machine::{PrinterCommand, PrinterEvent};
use crate::run::Settings;
use crate::serial::{SerialLink, ShellConfig};
use crate::streamer::{parse_m73, LinkOp, Streamer, StreamerInput};

/// Lines submitted to the link in one batch.
const BATCH: usize = 32;

/// Handle of the printer task.
pub struct Printer {
    commands: mpsc::Sender<PrinterCommand>,
    events: mpsc::Receiver<PrinterEvent>,
    task: JoinHandle<()>,
}

impl Printer {
    /// Starts the task for the settings' serial port.
    pub fn spawn(settings: &Settings, cache: FileCache) -> Self {
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let (ev_tx, ev_rx) = mpsc::channel(256);
        let task = PrinterTask {
            port: settings.serial_port.clone(),
            baud: settings.baud,
            link_cfg: settings.link.clone(),
            printer: settings.core.printer_id.to_string(),
            cache,
            commands: cmd_rx,
            events: ev_tx,
        };
        Self {
            commands: cmd_tx,
            events: ev_rx,
            task: tokio::spawn(task.run().in_current_span()),
        }
    }

    /// Queues a command for the printer task (never blocks; commands are rare).
    pub fn command(&mut self, cmd: PrinterCommand) {
        if let Err(e) = self.commands.try_send(cmd) {
            tracing::error!(error = %e, "printer command queue full or closed; command dropped");
        }
    }

    /// The next event (None when the task has ended).
    pub async fn next_event(&mut self) -> Option<PrinterEvent> {
        self.events.recv().await
    }

    /// Stops the task and closes the port.
    pub async fn close(self) {
        drop(self.commands);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), self.task).await;
    }
}

struct PrinterTask {
    port: PathBuf,
    baud: u32,
    link_cfg: LinkConfig,
    printer: String,
    cache: FileCache,
    commands: mpsc::Receiver<PrinterCommand>,
    events: mpsc::Sender<PrinterEvent>,
}

/// The feeder of the stream in progress.
struct Feeder {
    task: JoinHandle<()>,
    /// `(line, percent, remaining minutes)` of each `M73` line, sent before the line itself.
    m73: mpsc::Receiver<(u64, f64, Option<u64>)>,
    /// The feeder has ended and every M73 line was read: the closed channel is not polled
    /// again (it would be ready at once, forever).
    m73_closed: bool,
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PrinterTask {
    fn open(&self) -> (Arc<SerialLink>, mpsc::Receiver<LinkEvent>) {
        let shell = ShellConfig {
            printer: self.printer.clone(),
            ..ShellConfig::default()
        };
        let (link, events) =
            SerialLink::spawn_with(&self.port, self.baud, self.link_cfg.clone(), shell);
        (Arc::new(link), events)
    }

    /// Closes the link (so the port is free) and opens it again.
    async fn reopen(&self, link: Arc<SerialLink>) -> (Arc<SerialLink>, mpsc::Receiver<LinkEvent>) {
        match Arc::try_unwrap(link) {
            Ok(old) => {
                let _ = old.close().await;
            }
            Err(shared) => drop(shared), // a feeder still holds it; dropping the last one closes it
        }
        self.open()
    }

    async fn run(mut self) {
        let (mut link, mut link_events) = self.open();
        let mut streamer = Streamer::new();
        let mut feeder: Option<Feeder> = None;
        loop {
            let m73 = async {
                match feeder.as_mut() {
                    Some(f) if !f.m73_closed => f.m73.recv().await,
                    _ => std::future::pending().await,
                }
            };
            let input = tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => StreamerInput::Command(cmd),
                    None => break,
                },
                m = m73 => match m {
                    Some((line, percent, remaining_min)) => StreamerInput::M73 { line, percent, remaining_min },
                    None => {
                        // The whole file was handed to the link: stop polling the channel.
                        if let Some(f) = feeder.as_mut() {
                            f.m73_closed = true;
                        }
                        continue;
                    }
                },
                ev = link_events.recv() => match ev {
                    Some(ev) => {
                        // Every M73 the feeder read before the lines now acknowledged.
                        if let Some(f) = feeder.as_mut() {
                            while let Ok((line, percent, remaining_min)) = f.m73.try_recv() {
                                let _ = streamer.handle(StreamerInput::M73 { line, percent, remaining_min });
                            }
                        }
                        StreamerInput::Link(ev)
                    }
                    None => StreamerInput::LinkEnded,
                },
            };
            for op in streamer.handle(input) {
                match op {
                    LinkOp::StartFeeder { job_id, sha256 } => {
                        drop(feeder.take()); // aborts the old one
                        let path = self.cache.path(&sha256);
                        let (m73_tx, m73_rx) = mpsc::channel(1024);
                        let task = tokio::spawn(
                            feed(link.clone(), path, m73_tx, job_id.to_string())
                                .instrument(tracing::info_span!("job", job = %job_id)),
                        );
                        feeder = Some(Feeder {
                            task,
                            m73: m73_rx,
                            m73_closed: false,
                        });
                    }
                    LinkOp::StopFeeder => feeder = None,
                    LinkOp::Pause => {
                        let _ = link.pause().await;
                    }
                    LinkOp::Resume => {
                        let _ = link.resume().await;
                    }
                    LinkOp::Clear => {
                        let _ = link.clear().await;
                    }
                    LinkOp::MakeSafe => {
                        let _ = link.make_safe().await;
                    }
                    LinkOp::Reopen => (link, link_events) = self.reopen(link).await,
                    LinkOp::Event(e) => {
                        if self.events.send(e).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
        drop(feeder);
        if let Ok(link) = Arc::try_unwrap(link) {
            let _ = link.close().await;
        }
    }
}

/// Reads the verified file and submits its G-code lines in batches.
async fn feed(
    link: Arc<SerialLink>,
    path: PathBuf,
    m73: mpsc::Sender<(u64, f64, Option<u64>)>,
    job: String,
) {
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(%job, path = %path.display(), error = %e, "cannot open the job's file");
            return;
        }
    };
    let mut reader = std::io::BufReader::new(file);
    let mut batch = Vec::with_capacity(BATCH);
    let mut n = 0u64;
    let mut buf = Vec::new();
    loop {
        // Reading a local file in small pieces: blocking for microseconds at a time is fine.
        let read = match crate::files::read_gcode_line(&mut reader, &mut buf) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(%job, error = %e, "reading the job's file failed");
                return;
            }
        };
        if read > 0 {
            let text = String::from_utf8_lossy(&buf);
            if let Some(cmd) = protocol::marlin::strip_comment(&text) {
                n += 1;
                if let Some((p, r)) = parse_m73(cmd) {
                    let _ = m73.try_send((n, p, r));
                }
                batch.push(cmd.to_owned());
            }
        }
        if read == 0 {
            // Acknowledged when every move has been carried out (see the LinesAcked report).
            batch.push("M400".to_owned());
        }
        if batch.len() >= BATCH || (read == 0 && !batch.is_empty()) {
            if let Err(e) = link.submit(std::mem::take(&mut batch)).await {
                tracing::error!(%job, error = %e, "the link refused print lines");
                return;
            }
        }
        if read == 0 {
            tracing::info!(%job, lines = n, "whole file handed to the link");
            return;
        }
    }
}
