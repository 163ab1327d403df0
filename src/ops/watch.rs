//! `printloop watch`: the fleet at a glance, from the retained topics only (`printers/+/state`,
//! `printers/+/status`, `queue`), so it needs nothing but the broker.
//!
//! [`FleetView`] is pure: it takes topic + payload and keeps the newest snapshot of each printer
//! (by `(epoch, seq)`; a late will is ignored), and renders lines for a given time. [`run`] is
//! the shell: it subscribes at QoS 0 (rumqttd hands a QoS 1 wildcard subscription at most 100
//! retained messages, docs/broker.md) and redraws at most 4 times a second.

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write};
use std::time::Duration;

use protocol::api::QueueSnapshot;
use protocol::presence::{Presence, Status};
use protocol::state::{JobStage, PrinterPhase, StateSnapshot};
use protocol::{Payload as _, PrinterId, PrinterTopicKind, Topic, Topics};
use rumqttc::{QoS, SubscribeFilter, SubscribeReasonCode};

use super::mqtt::{Link, LinkEvent};
use super::table::{duration, wire_name};
use super::{now_ms, printable, Endpoint, OpsError};

/// Shortest time between two frames.
pub const FRAME_INTERVAL: Duration = Duration::from_millis(250);

/// `--once`: the retained snapshot is taken as complete when nothing arrived for this long
/// after the subscription was acknowledged (brokers send retained messages right after the
/// SUBACK; MQTT has no end-of-retained marker).
pub const SETTLE: Duration = Duration::from_millis(300);

/// Width of a progress bar, in cells.
const BAR_WIDTH: usize = 20;

#[derive(Debug, Default)]
struct PrinterView {
    status: Option<Status>,
    /// The newest epoch seen `online`: an `offline` older than this is a late will.
    online_epoch: Option<u64>,
    state: Option<StateSnapshot>,
}

/// What the retained topics say about the fleet.
#[derive(Debug, Default)]
pub struct FleetView {
    printers: BTreeMap<PrinterId, PrinterView>,
    queue: Option<QueueSnapshot>,
}

/// How lines are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    /// Block characters for bars (a terminal); `#` and `-` otherwise.
    pub unicode: bool,
}

impl FleetView {
    /// Applies one message. `Ok(true)` if the view changed, `Ok(false)` if it was not newer than
    /// what is shown (or not a topic the view uses), `Err` if it did not decode.
    pub fn apply(&mut self, topics: &Topics, topic: &str, payload: &[u8]) -> Result<bool, String> {
        let topic = topics.parse(topic).map_err(|e| e.to_string())?;
        let bad = |e: protocol::DecodeError| format!("{}: {e}", topics.format(&topic));
        if payload.is_empty() {
            // A deleted retained topic: the printer was decommissioned (`printers forget`).
            return Ok(match &topic {
                Topic::Status(id) | Topic::State(id) => self.printers.remove(id).is_some(),
                _ => false,
            });
        }
        match &topic {
            Topic::Status(id) => {
                let status = Status::decode(payload).map_err(bad)?;
                let view = self.printers.entry(id.clone()).or_default();
                match status.presence {
                    Presence::Online => {
                        view.online_epoch = view.online_epoch.max(Some(status.epoch));
                    }
                    Presence::Offline if view.online_epoch.is_some_and(|e| status.epoch < e) => {
                        return Ok(false);
                    }
                    Presence::Offline => {}
                }
                if view.status.as_ref() == Some(&status) {
                    return Ok(false);
                }
                view.status = Some(status);
                Ok(true)
            }
            Topic::State(id) => {
                let state = StateSnapshot::decode(payload).map_err(bad)?;
                let view = self.printers.entry(id.clone()).or_default();
                if let Some(old) = &view.state {
                    if (state.epoch, state.seq) <= (old.epoch, old.seq) {
                        return Ok(false);
                    }
                }
                view.state = Some(state);
                Ok(true)
            }
            Topic::Queue => {
                let queue = QueueSnapshot::decode(payload).map_err(bad)?;
                if let Some(old) = &self.queue {
                    if (queue.epoch, queue.seq) <= (old.epoch, old.seq) {
                        return Ok(false);
                    }
                }
                self.queue = Some(queue);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The queue line.
    pub fn queue_line(&self) -> String {
        match &self.queue {
            None => "queue: no snapshot (is `printloop supervisor` running?)".to_owned(),
            Some(q) => {
                let c = &q.counts;
                format!(
                    "queue: {} queued, {} starting, {} printing, {} awaiting harvest, {} need attention",
                    c.queued, c.starting, c.printing, c.awaiting_harvest, c.attention
                )
            }
        }
    }

    /// One line per printer, in id order, with ids padded to the same width.
    pub fn printer_lines(&self, now_ms: u64, style: Style) -> Vec<(PrinterId, String)> {
        let width = self
            .printers
            .keys()
            .map(|id| id.as_str().len())
            .max()
            .unwrap_or(0);
        self.printers
            .iter()
            .map(|(id, view)| (id.clone(), printer_line(id, view, width, now_ms, style)))
            .collect()
    }

    /// The whole frame: the queue line, then one line per printer.
    pub fn frame(&self, now_ms: u64, style: Style) -> Vec<String> {
        let mut lines = vec![self.queue_line()];
        let printers = self.printer_lines(now_ms, style);
        if printers.is_empty() {
            lines.push("no printers have published their state yet".to_owned());
        }
        lines.extend(printers.into_iter().map(|(_, line)| line));
        lines
    }
}

fn presence(view: &PrinterView, now_ms: u64) -> &'static str {
    let stale = view.state.as_ref().is_some_and(|s| {
        let limit = u64::from(s.heartbeat_s).saturating_mul(3_000);
        now_ms.saturating_sub(s.at_ms) > limit
    });
    match view.status.as_ref().map(|s| s.presence) {
        Some(Presence::Offline) => "offline",
        _ if stale => "stale",
        Some(Presence::Online) => "online",
        None => "unknown",
    }
}

fn bar(pct: f64, style: Style) -> String {
    let filled = ((pct.clamp(0.0, 100.0) / 100.0) * BAR_WIDTH as f64).round() as usize;
    let (on, off) = if style.unicode {
        ('█', '░')
    } else {
        ('#', '-')
    };
    let mut s = String::with_capacity(BAR_WIDTH + 2);
    s.push('[');
    s.extend(std::iter::repeat_n(on, filled));
    s.extend(std::iter::repeat_n(off, BAR_WIDTH - filled));
    s.push(']');
    s
}

fn printer_line(
    id: &PrinterId,
    view: &PrinterView,
    width: usize,
    now_ms: u64,
    style: Style,
) -> String {
    let mut parts = vec![
        format!("{:width$}", id.as_str()),
        format!("{:7}", presence(view, now_ms)),
    ];
    let Some(state) = &view.state else {
        parts.push("no state yet".to_owned());
        return parts.join("  ");
    };
    parts.push(format!("{:12}", wire_name(&state.phase)));
    if let Some(job) = &state.job {
        let pct = match (job.stage, job.transferred_bytes) {
            (JobStage::Transferring, Some(done)) if job.size_bytes > 0 => {
                done as f64 * 100.0 / job.size_bytes as f64
            }
            _ => job.progress_pct,
        };
        let pct = if pct.is_finite() { pct } else { 0.0 };
        parts.push(bar(pct, style));
        parts.push(format!("{:5.1}%", pct.clamp(0.0, 100.0)));
        parts.push(job.job_id.to_string());
        parts.push(printable(&job.name, 32));
        let stage = wire_name(&job.stage);
        if stage != wire_name(&state.phase) {
            parts.push(format!("({stage})"));
        }
        if let (false, Some(left)) = (job.stage.is_terminal(), job.remaining_s) {
            parts.push(format!("{} left", duration(left)));
        }
        if let Some(reason) = &job.reason {
            parts.push(printable(reason, 60));
        }
    } else {
        match state.phase {
            PrinterPhase::Idle => parts.push("bed not cleared".to_owned()),
            PrinterPhase::Ready => parts.push("bed clear, waiting for a job".to_owned()),
            PrinterPhase::Disconnected => parts.push("no serial link to the printer".to_owned()),
            _ => {}
        }
    }
    if state.phase == PrinterPhase::Finished {
        parts.push("clear the bed".to_owned());
    }
    if let Some(error) = &state.error {
        parts.push(format!("error: {}", printable(error, 80)));
    }
    if state.maintenance {
        parts.push("[maintenance]".to_owned());
    }
    if let Some(t) = &state.temps {
        parts.push(format!(
            "T {:.0}/{:.0} B {:.0}/{:.0}",
            t.nozzle.actual, t.nozzle.target, t.bed.actual, t.bed.target
        ));
    }
    parts.join("  ").trim_end().to_owned()
}

/// Draws frames: a terminal gets the whole frame redrawn in place; a pipe or file gets a line
/// whenever a line changes.
struct Screen<W: Write> {
    out: W,
    tty: bool,
    drawn: BTreeMap<String, String>,
    first: bool,
}

impl<W: Write> Screen<W> {
    fn draw(&mut self, header: &str, view: &FleetView, note: Option<&str>) -> std::io::Result<()> {
        let now = now_ms();
        let style = Style { unicode: self.tty };
        if self.tty {
            let mut text = String::from(if self.first {
                "\x1b[2J\x1b[H"
            } else {
                "\x1b[H"
            });
            let mut lines = vec![header.to_owned()];
            lines.extend(note.map(|n| format!("broker connection lost: {n} (reconnecting)")));
            lines.extend(view.frame(now, style));
            for line in lines {
                text.push_str(&line);
                text.push_str("\x1b[K\n");
            }
            text.push_str("\x1b[J");
            self.out.write_all(text.as_bytes())?;
        } else {
            let mut keyed = vec![("!header".to_owned(), header.to_owned())];
            if let Some(n) = note {
                keyed.push((
                    "!note".to_owned(),
                    format!("broker connection lost: {n} (reconnecting)"),
                ));
            }
            keyed.push(("!queue".to_owned(), view.queue_line()));
            keyed.extend(
                view.printer_lines(now, style)
                    .into_iter()
                    .map(|(id, line)| (id.to_string(), line)),
            );
            for (key, line) in keyed {
                if self.drawn.get(&key) != Some(&line) {
                    writeln!(self.out, "{line}")?;
                    self.drawn.insert(key, line);
                }
            }
        }
        self.first = false;
        self.out.flush()
    }
}

fn filters(topics: &Topics) -> Vec<SubscribeFilter> {
    [
        topics.all_printers(PrinterTopicKind::Status),
        topics.all_printers(PrinterTopicKind::State),
        topics.format(&Topic::Queue),
    ]
    .into_iter()
    .map(|f| SubscribeFilter::new(f, QoS::AtMostOnce))
    .collect()
}

async fn subscribe(link: &Link, topics: &Topics) -> Result<(), OpsError> {
    link.client
        .subscribe_many(filters(topics))
        .await
        .map_err(|e| OpsError::ConnectionLost {
            broker: link.broker.clone(),
            reason: e.to_string(),
        })
}

fn check_suback(
    link: &Link,
    topics: &Topics,
    codes: &[SubscribeReasonCode],
) -> Result<(), OpsError> {
    match codes
        .iter()
        .zip(filters(topics))
        .find(|(c, _)| matches!(c, SubscribeReasonCode::Failure))
    {
        Some((_, f)) => Err(OpsError::SubscribeRefused {
            broker: link.broker.clone(),
            filter: f.path,
        }),
        None => Ok(()),
    }
}

fn apply(view: &mut FleetView, topics: &Topics, topic: &str, payload: &[u8]) -> bool {
    match view.apply(topics, topic, payload) {
        Ok(changed) => changed,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a message");
            false
        }
    }
}

/// Takes the retained snapshot, prints one plain frame and returns.
async fn once(ep: &Endpoint, link: &mut Link) -> Result<FleetView, OpsError> {
    let mut view = FleetView::default();
    let deadline = tokio::time::Instant::now() + ep.timeout;
    let mut subscribed = false;
    loop {
        let wait = if subscribed {
            (tokio::time::Instant::now() + SETTLE).min(deadline)
        } else {
            deadline
        };
        match tokio::time::timeout_at(wait, link.next()).await {
            Err(_) if subscribed => return Ok(view),
            Err(_) => {
                return Err(OpsError::BrokerTimeout {
                    broker: link.broker.clone(),
                    what: "subscribing to the fleet's topics",
                    secs: ep.timeout.as_secs().max(1),
                })
            }
            Ok(Some(LinkEvent::SubAck(codes))) => {
                check_suback(link, &ep.topics, &codes)?;
                subscribed = true;
            }
            Ok(Some(LinkEvent::Message { topic, payload })) => {
                apply(&mut view, &ep.topics, &topic, &payload);
            }
            Ok(Some(LinkEvent::Down { reason })) => {
                return Err(OpsError::ConnectionLost {
                    broker: link.broker.clone(),
                    reason,
                })
            }
            Ok(Some(LinkEvent::Connected)) => {}
            Ok(None) => {
                return Err(OpsError::ConnectionLost {
                    broker: link.broker.clone(),
                    reason: "the connection ended".into(),
                })
            }
        }
    }
}

/// `printloop watch`: live until Ctrl-C, or one frame with `once`.
pub async fn run(ep: &Endpoint, once_only: bool) -> Result<(), OpsError> {
    let mut link = Link::connect(ep, !once_only).await?;
    subscribe(&link, &ep.topics).await?;
    let header = format!("printloop watch  {}  {}", ep.broker, ep.topics.root());
    let stdout = std::io::stdout();
    let tty = stdout.is_terminal();
    if once_only {
        let view = once(ep, &mut link).await?;
        link.close().await;
        let mut out = stdout.lock();
        let lines = view.frame(now_ms(), Style { unicode: false });
        for line in lines {
            writeln!(out, "{line}").map_err(OpsError::Output)?;
        }
        return out.flush().map_err(OpsError::Output);
    }
    let mut screen = Screen {
        out: stdout.lock(),
        tty,
        drawn: BTreeMap::new(),
        first: true,
    };
    if tty {
        screen
            .out
            .write_all(b"\x1b[?25l")
            .map_err(OpsError::Output)?;
    }
    let result = live(ep, &mut link, &mut screen, &header).await;
    if tty {
        let _ = screen.out.write_all(b"\x1b[?25h");
        let _ = screen.out.flush();
    }
    link.close().await;
    result
}

async fn live<W: Write>(
    ep: &Endpoint,
    link: &mut Link,
    screen: &mut Screen<W>,
    header: &str,
) -> Result<(), OpsError> {
    let mut view = FleetView::default();
    let mut note: Option<String> = None;
    let mut dirty = true;
    let mut since_draw = 0u32;
    let mut subscribed = false;
    let mut tick = tokio::time::interval(FRAME_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            event = link.next() => match event {
                Some(LinkEvent::Connected) => {
                    // A clean session: after a reconnect, subscribe again.
                    note = None;
                    dirty = true;
                    subscribe(link, &ep.topics).await?;
                }
                Some(LinkEvent::SubAck(codes)) => {
                    check_suback(link, &ep.topics, &codes)?;
                    subscribed = true;
                }
                Some(LinkEvent::Message { topic, payload }) => {
                    dirty |= apply(&mut view, &ep.topics, &topic, &payload);
                }
                Some(LinkEvent::Down { reason }) => {
                    note = Some(reason);
                    dirty = true;
                }
                None => {
                    return Err(OpsError::ConnectionLost {
                        broker: link.broker.clone(),
                        reason: "the connection ended".into(),
                    })
                }
            },
            _ = tick.tick() => {
                since_draw += 1;
                // Redraw on change, and every second anyway (presence turns stale with time);
                // the first frame waits for the retained snapshot (at most a second).
                if (dirty && subscribed) || since_draw >= 4 {
                    screen.draw(header, &view, note.as_deref()).map_err(OpsError::Output)?;
                    dirty = false;
                    since_draw = 0;
                }
            }
            _ = &mut ctrl_c => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: Style = Style { unicode: false };

    fn state(epoch: u64, seq: u64, at_ms: u64, extra: &str) -> Vec<u8> {
        format!(
            r#"{{"v":1,"epoch":{epoch},"seq":{seq},"at_ms":{at_ms},"heartbeat_s":10,"bed_clear":false{extra}}}"#
        )
        .into_bytes()
    }

    fn status(presence: &str, epoch: u64) -> Vec<u8> {
        format!(r#"{{"v":1,"presence":"{presence}","epoch":{epoch},"at_ms":0}}"#).into_bytes()
    }

    const PRINTING: &str = r#","phase":"printing","job":{"job_id":"j-000042","file_sha256":"03ab417c94be0b5209793ee0a79f9d843017afaba4ca8807e1763652aa8fcb37","name":"cube20.gcode","stage":"printing","line":3120,"total_lines":7160,"progress_pct":43.6,"remaining_s":660,"size_bytes":186847},"temps":{"nozzle":{"actual":214.8,"target":215},"bed":{"actual":60.1,"target":60}}"#;

    #[test]
    fn renders_a_printing_printer() {
        let t = Topics::default();
        let mut v = FleetView::default();
        let now = 1_000_000;
        assert_eq!(
            v.apply(&t, "printloop/v1/printers/p0/status", &status("online", 7)),
            Ok(true)
        );
        assert_eq!(
            v.apply(
                &t,
                "printloop/v1/printers/p0/state",
                &state(7, 5, now, PRINTING)
            ),
            Ok(true)
        );
        assert_eq!(
            v.apply(
                &t,
                "printloop/v1/printers/p10/state",
                &state(1, 1, now, r#","phase":"idle""#)
            ),
            Ok(true)
        );
        let frame = v.frame(now + 1000, PLAIN);
        assert_eq!(
            frame,
            [
                "queue: no snapshot (is `printloop supervisor` running?)",
                "p0   online   printing      [#########-----------]   43.6%  j-000042  cube20.gcode  11m left  T 215/215 B 60/60",
                "p10  unknown  idle          bed not cleared",
            ]
        );
    }

    #[test]
    fn older_snapshots_and_late_wills_are_ignored() {
        let t = Topics::default();
        let mut v = FleetView::default();
        let s = "printloop/v1/printers/p0/status";
        let st = "printloop/v1/printers/p0/state";
        assert_eq!(v.apply(&t, s, &status("online", 8)), Ok(true));
        assert_eq!(
            v.apply(&t, s, &status("offline", 7)),
            Ok(false),
            "late will"
        );
        assert_eq!(v.apply(&t, s, &status("offline", 8)), Ok(true));
        // Forgotten: its retained topics are deleted, and it leaves the view.
        assert_eq!(v.apply(&t, s, b""), Ok(true));
        assert_eq!(v.apply(&t, st, b""), Ok(false));
        assert_eq!(
            v.apply(&t, st, &state(8, 5, 0, r#","phase":"idle""#)),
            Ok(true)
        );
        assert_eq!(
            v.apply(&t, st, &state(8, 5, 0, r#","phase":"idle""#)),
            Ok(false)
        );
        assert_eq!(
            v.apply(&t, st, &state(7, 9, 0, r#","phase":"ready""#)),
            Ok(false)
        );
        assert_eq!(
            v.apply(&t, st, &state(9, 1, 0, r#","phase":"ready""#)),
            Ok(true)
        );
        assert!(v.apply(&t, st, b"{}").is_err());
        assert!(v.apply(&t, "elsewhere/x", b"{}").is_err());
        assert_eq!(
            v.apply(&t, "printloop/v1/printers/p0/events", b"{}"),
            Ok(false)
        );
    }

    #[test]
    fn stale_and_transferring() {
        let t = Topics::default();
        let mut v = FleetView::default();
        let job = r#","phase":"preparing","job":{"job_id":"j-1","file_sha256":"03ab417c94be0b5209793ee0a79f9d843017afaba4ca8807e1763652aa8fcb37","name":"a\u001b[2Jb","stage":"transferring","line":0,"total_lines":0,"progress_pct":0,"transferred_bytes":500,"size_bytes":1000}"#;
        v.apply(&t, "printloop/v1/printers/p0/status", &status("online", 1))
            .expect("status");
        v.apply(&t, "printloop/v1/printers/p0/state", &state(1, 1, 0, job))
            .expect("state");
        let line = &v.frame(31_000, PLAIN)[1];
        assert_eq!(
            line,
            "p0  stale    preparing     [##########----------]   50.0%  j-1  a?[2Jb  (transferring)"
        );
        assert!(v.frame(30_000, PLAIN)[1].contains("online"));
    }

    #[test]
    fn queue_line() {
        let t = Topics::default();
        let mut v = FleetView::default();
        let q = br#"{"v":1,"epoch":3,"seq":88,"at_ms":0,"counts":{"queued":1,"starting":0,"printing":1,"awaiting_harvest":0,"attention":2},"jobs":[],"truncated":false}"#;
        assert_eq!(v.apply(&t, "printloop/v1/queue", q), Ok(true));
        assert_eq!(v.apply(&t, "printloop/v1/queue", q), Ok(false));
        assert_eq!(
            v.queue_line(),
            "queue: 1 queued, 0 starting, 1 printing, 0 awaiting harvest, 2 need attention"
        );
        assert_eq!(
            v.frame(0, PLAIN)[1],
            "no printers have published their state yet"
        );
    }

    #[test]
    fn plain_screen_prints_changed_lines_only() {
        let t = Topics::default();
        let mut v = FleetView::default();
        let mut screen = Screen {
            out: Vec::new(),
            tty: false,
            drawn: BTreeMap::new(),
            first: true,
        };
        screen.draw("hdr", &v, None).expect("draw");
        v.apply(
            &t,
            "printloop/v1/printers/p0/state",
            &state(1, 1, now_ms(), r#","phase":"idle""#),
        )
        .expect("state");
        screen.draw("hdr", &v, None).expect("draw");
        screen.draw("hdr", &v, None).expect("draw");
        let text = String::from_utf8(screen.out).expect("utf8");
        assert_eq!(
            text,
            "hdr\nqueue: no snapshot (is `printloop supervisor` running?)\np0  unknown  idle          bed not cleared\n"
        );
    }
}
