//! The printer side of the gateway: a task that owns the [`SerialLink`], streams verified files
//! into it, and turns what the link reports into [`PrinterEvent`]s for the state machine.
//!
//! - A stream is fed by a feeder task that reads the file, strips comments and submits lines
//!   in batches; the link's bounded queue back-pressures it, so memory stays flat whatever the
//!   file size.
//! - The link counts acknowledged print lines over its whole life; the task turns that into the
//!   job's line count (`acked - acked at stream start`). Each stream ends with an `M400`, so
//!   the file's last line counts only once the printer has finished moving.
//! - `M73 P<pct> R<min>` lines in the file become progress when the firmware acknowledges them.
//! - `ResetPrinter` closes the port and opens it again, which resets a Marlin board (DTR).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::files::FileCache;
use crate::link::{LinkConfig, LinkEvent};
use crate::machine::{PrinterCommand, PrinterEvent};
use crate::run::{printer_event, Settings};
use crate::serial::{SerialLink, ShellConfig};

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

/// One stream in progress.
struct Stream {
    feeder: JoinHandle<()>,
    /// Link-wide ack count when the stream started.
    base: u64,
    /// `(line within the stream, percent, remaining minutes)` of M73 lines not yet acknowledged.
    m73: mpsc::Receiver<(u64, f64, Option<u64>)>,
    /// The feeder has ended and every M73 line is in `pending_m73` (or was consumed): the
    /// closed channel is not polled again (it would be ready at once, forever).
    m73_closed: bool,
    pending_m73: VecDeque<(u64, f64, Option<u64>)>,
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
        let mut acked_total = 0u64;
        let mut stream: Option<Stream> = None;
        loop {
            let m73 = async {
                match stream.as_mut() {
                    Some(s) if !s.m73_closed => s.m73.recv().await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                cmd = self.commands.recv() => {
                    let Some(cmd) = cmd else { break };
                    match cmd {
                        PrinterCommand::StartStream { job_id, sha256 } => {
                            if let Some(old) = stream.take() {
                                old.feeder.abort();
                            }
                            let path = self.cache.path(&sha256);
                            let (m73_tx, m73_rx) = mpsc::channel(1024);
                            let feeder = tokio::spawn(feed(link.clone(), path, m73_tx, job_id.to_string()).instrument(tracing::info_span!("job", job = %job_id)));
                            stream = Some(Stream { feeder, base: acked_total, m73: m73_rx, m73_closed: false, pending_m73: VecDeque::new() });
                        }
                        PrinterCommand::PauseStream => { let _ = link.pause().await; }
                        PrinterCommand::ResumeStream => { let _ = link.resume().await; }
                        PrinterCommand::CancelStream => {
                            if let Some(old) = stream.take() {
                                old.feeder.abort();
                            }
                            // Make the printer safe at once: stop waiting and moving, heaters
                            // and fan off, motors released; M112 if the firmware cannot.
                            let _ = link.clear().await;
                            let _ = link.make_safe().await;
                        }
                        PrinterCommand::ResetPrinter => {
                            if let Some(old) = stream.take() {
                                old.feeder.abort();
                            }
                            (link, link_events) = self.reopen(link).await;
                            // A new link numbers its lines from 1 again.
                            acked_total = 0;
                        }
                    }
                }
                m = m73 => {
                    match (m, stream.as_mut()) {
                        (Some(m), Some(s)) => s.pending_m73.push_back(m),
                        // The whole file was handed to the link: stop polling the channel.
                        (None, Some(s)) => s.m73_closed = true,
                        (_, None) => {}
                    }
                }
                ev = link_events.recv() => {
                    let Some(ev) = ev else {
                        tracing::error!("serial link task ended; reopening");
                        let (l, e) = self.open();
                        link = l;
                        link_events = e;
                        acked_total = 0;
                        continue;
                    };
                    let mut out = Vec::new();
                    match &ev {
                        LinkEvent::Acked { seq } => {
                            acked_total = *seq;
                            if let Some(s) = stream.as_mut() {
                                let count = acked_total.saturating_sub(s.base);
                                while let Ok(m) = s.m73.try_recv() {
                                    s.pending_m73.push_back(m);
                                }
                                let mut progress = None;
                                while s.pending_m73.front().is_some_and(|(line, _, _)| *line <= count) {
                                    progress = s.pending_m73.pop_front();
                                }
                                if let Some((_, percent, remaining_min)) = progress {
                                    out.push(PrinterEvent::Progress { percent, remaining_min });
                                }
                                // The stream ends with an M400 of ours, acknowledged once the
                                // last move is done: the file's last line counts only then, so
                                // a job is not `finished` while the printer still moves.
                                out.push(PrinterEvent::LinesAcked { count: count.saturating_sub(1) });
                            }
                        }
                        LinkEvent::Reset { .. } | LinkEvent::Disconnected { .. } | LinkEvent::Timeout { .. } | LinkEvent::LinkError { .. } | LinkEvent::Fatal { .. } => {
                            if let Some(old) = stream.take() {
                                old.feeder.abort();
                            }
                            if !matches!(ev, LinkEvent::Fatal { .. }) {
                                let _ = link.clear().await;
                            }
                        }
                        LinkEvent::Action(a) => tracing::info!(action = %a, "printer host action"),
                        LinkEvent::Garbage { line } => tracing::debug!(%line, "garbled line from the printer"),
                        _ => {}
                    }
                    let silent = matches!(ev, LinkEvent::Timeout { .. } | LinkEvent::LinkError { .. });
                    if let Some(pe) = printer_event(ev) {
                        out.push(pe);
                    }
                    if silent {
                        // A printer that stopped answering gets its port closed and opened
                        // again (which resets a Marlin board): a replugged cable or a new
                        // device behind the same path is found that way.
                        tracing::warn!("printer silent: reopening its port");
                        (link, link_events) = self.reopen(link).await;
                        acked_total = 0;
                    }
                    for e in out {
                        if self.events.send(e).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
        if let Some(old) = stream.take() {
            old.feeder.abort();
        }
        if let Ok(link) = Arc::try_unwrap(link) {
            let _ = link.close().await;
        }
    }
}

/// Parses `M73 P<pct> [R<min>]`.
fn parse_m73(line: &str) -> Option<(f64, Option<u64>)> {
    let mut words = line.split_whitespace();
    if words.next()? != "M73" {
        return None;
    }
    let (mut p, mut r) = (None, None);
    for w in words {
        if let Some(v) = w.strip_prefix('P') {
            p = v.parse::<f64>().ok();
        } else if let Some(v) = w.strip_prefix('R') {
            r = v.parse::<u64>().ok();
        }
    }
    Some((p?, r))
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

#[cfg(test)]
mod tests {
    use super::parse_m73;

    #[test]
    fn m73() {
        assert_eq!(parse_m73("M73 P12 R40"), Some((12.0, Some(40))));
        assert_eq!(parse_m73("M73 Q12 S40"), None);
        assert_eq!(parse_m73("M73 P5"), Some((5.0, None)));
        assert_eq!(parse_m73("G1 X1"), None);
    }
}
