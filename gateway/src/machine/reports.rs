//! What the gateway tells the broker: subscriptions and the birth (`meta`, `state`, `status`) on
//! connect, the `state` snapshot, and events. An event is journalled in the durable outbox before
//! it is published (persist, then publish) and leaves it only when the broker echoes it back.

use protocol::presence::{Meta, Presence, Status};
use protocol::state::{Event, EventKind, JobProgress, JobStage, StateSnapshot};
use protocol::{Payload, Topic, Version};
use transport::outgoing::Lane;

use crate::store::{CurrentJob, Mutation};

use super::{Gateway, LinkState, Now, Output, Publish};

impl Gateway {
    pub(super) fn topic(&self, t: Topic) -> String {
        self.cfg.topics.format(&t)
    }

    pub(super) fn on_connected(&mut self, now: Now, session_present: bool, out: &mut Vec<Output>) {
        self.connected = true;
        let me = self.cfg.printer_id.clone();
        // Subscribe on every connect: after `session_present = 0` (rumqttd forgets sessions on
        // restart) it is required, and with a kept session it is harmless. Our own `events` come
        // back to us: that echo is the proof the broker has an event, so it leaves the outbox.
        let _ = session_present;
        out.push(Output::Subscribe(self.topic(Topic::Cmd(me.clone()))));
        out.push(Output::Subscribe(self.topic(Topic::FileChunk(me.clone()))));
        out.push(Output::Subscribe(self.topic(Topic::Events(me.clone()))));
        // Our own retained topics too: this gateway holds their truth, and re-asserts it when
        // anyone else's message replaces it (`on_own_retained`).
        out.push(Output::Subscribe(self.topic(Topic::Status(me.clone()))));
        out.push(Output::Subscribe(self.topic(Topic::Meta(me.clone()))));
        out.push(Output::Subscribe(self.topic(Topic::State(me.clone()))));
        // What happened while we were away goes first, in order, with its original time.
        self.publish_outbox(now, out);
        self.birth(now, out);
        // The retained copies the broker sends back on subscribing are the last connection's:
        // this birth replaces them.
        self.reasserted_ms = Some(now.mono_ms);
        self.reassert_due = false;
        // A transfer under way picks up where the link left it.
        self.resume_transfer(now, session_present, out);
    }

    /// Publishes every event the broker has not echoed back yet, oldest first.
    pub(super) fn publish_outbox(&mut self, now: Now, out: &mut Vec<Output>) {
        let topic = self.topic(Topic::Events(self.cfg.printer_id.clone()));
        for (key, payload) in &self.outbox {
            out.push(Output::Publish(Publish {
                topic: topic.clone(),
                payload: payload.clone(),
                retain: false,
                outbox_key: Some(*key),
                lane: Lane::Control,
            }));
        }
        self.outbox_sent_ms = now.mono_ms;
    }

    pub(super) fn meta(&self) -> Meta {
        Meta {
            v: Version,
            printer_id: self.cfg.printer_id.clone(),
            epoch: self.epoch,
            name: self.cfg.name.clone(),
            model: self.cfg.model.clone(),
            firmware: self.firmware.clone(),
            build_volume: self.cfg.build_volume,
            tags: self.cfg.tags.clone(),
            gateway_version: self.cfg.gateway_version.clone(),
        }
    }

    /// A message on one of our own retained topics: our echo, or someone else's claim about
    /// this printer (a forged or stale `status`, `state` or `meta`). A claim that contradicts
    /// ours is answered by publishing the truth again, at most once a second.
    pub(super) fn on_own_retained(&mut self, topic: &Topic, payload: &[u8]) {
        if !self.connected {
            return;
        }
        let ours = match topic {
            Topic::Status(_) => Status::decode(payload)
                .is_ok_and(|s| s.presence == Presence::Online && s.epoch == self.epoch),
            Topic::State(_) => StateSnapshot::decode(payload)
                .is_ok_and(|s| s.epoch == self.epoch && s.seq <= self.seq),
            Topic::Meta(_) => Meta::decode(payload).is_ok_and(|m| m == self.meta()),
            _ => true,
        };
        if !ours && !self.reassert_due {
            tracing::warn!(
                topic = %self.topic(topic.clone()),
                "a retained message contradicts this printer's own (forged, or left by an old \
                 connection): publishing the truth again"
            );
            self.reassert_due = true;
        }
    }

    pub(super) fn birth(&mut self, now: Now, out: &mut Vec<Output>) {
        let me = self.cfg.printer_id.clone();
        let meta = self.meta();
        out.push(Output::Publish(Publish {
            topic: self.topic(Topic::Meta(me.clone())),
            payload: meta.encode(),
            retain: true,
            outbox_key: None,
            lane: Lane::Control,
        }));
        self.publish_state(now, out);
        out.push(Output::Publish(Publish {
            topic: self.topic(Topic::Status(me)),
            payload: Status::online(self.epoch, now.unix_ms).encode(),
            retain: true,
            outbox_key: None,
            lane: Lane::Control,
        }));
    }

    fn next_seq(&mut self) -> u64 {
        if self.seq_epoch != self.epoch {
            self.seq_epoch = self.epoch;
            self.seq = 0;
        }
        self.seq += 1;
        self.seq
    }

    /// The state snapshot as it is now.
    pub fn snapshot(&self, now: Now) -> StateSnapshot {
        StateSnapshot {
            v: Version,
            epoch: self.epoch,
            seq: self.seq,
            at_ms: now.unix_ms,
            heartbeat_s: (self.cfg.heartbeat_ms() / 1000).max(1) as u32,
            phase: self.phase(),
            bed_clear: self.flags.bed_clear,
            maintenance: self.flags.maintenance,
            job: self.current.as_ref().map(|j| self.progress(j)),
            temps: self.temps,
            last_command: self.last_command.clone(),
            recent_jobs: self.recent_jobs.clone(),
            // While the printer is disconnected, the error says why (a port that cannot be
            // opened names its fix), so Home Assistant and `printloop watch` show it.
            error: self.error.clone().or_else(|| match &self.link {
                LinkState::Down { reason } => Some(format!("serial: {reason}")),
                _ => None,
            }),
        }
    }

    fn progress(&self, j: &CurrentJob) -> JobProgress {
        let by_lines = if j.total_lines > 0 {
            (j.line as f64 * 100.0 / j.total_lines as f64).min(100.0)
        } else {
            0.0
        };
        let pct = match j.stage {
            JobStage::Finished => 100.0,
            _ => self.progress_pct.unwrap_or(by_lines),
        };
        JobProgress {
            job_id: j.job_id.clone(),
            file_sha256: j.file_sha256.clone(),
            name: j.name.clone(),
            stage: j.stage,
            line: j.line,
            total_lines: j.total_lines,
            progress_pct: (pct * 10.0).round() / 10.0,
            remaining_s: self.remaining_s.filter(|_| !j.stage.is_terminal()),
            transferred_bytes: self
                .transfer
                .as_ref()
                .filter(|t| t.sha256 == j.file_sha256)
                .map(|t| t.stored),
            size_bytes: j.size_bytes,
            started_at_ms: j.started_at_ms,
            ended_at_ms: j.ended_at_ms,
            reason: j.reason.clone(),
        }
    }

    pub(super) fn publish_state(&mut self, now: Now, out: &mut Vec<Output>) {
        if !self.connected {
            return;
        }
        self.next_seq();
        let snap = self.snapshot(now);
        out.push(Output::Publish(Publish {
            topic: self.topic(Topic::State(self.cfg.printer_id.clone())),
            payload: snap.encode(),
            retain: true,
            outbox_key: None,
            lane: Lane::Control,
        }));
        self.state_dirty = false;
        self.last_state_ms = Some(now.mono_ms);
    }

    /// Journals an event durably and publishes it when connected.
    pub(super) fn event(&mut self, now: Now, kind: EventKind, out: &mut Vec<Output>) {
        let ev = Event {
            v: Version,
            epoch: self.epoch,
            seq: self.next_seq(),
            at_ms: now.unix_ms,
            event: kind,
        };
        let key = self.next_outbox_key;
        self.next_outbox_key += 1;
        let payload = ev.encode();
        if self.outbox.is_empty() {
            self.outbox_sent_ms = now.mono_ms;
        }
        self.outbox.push((key, payload.clone()));
        out.push(Output::Persist(vec![Mutation::PushOutbox(
            key,
            payload.clone(),
        )]));
        if self.connected {
            out.push(Output::Publish(Publish {
                topic: self.topic(Topic::Events(self.cfg.printer_id.clone())),
                payload,
                retain: false,
                outbox_key: Some(key),
                lane: Lane::Control,
            }));
        }
        self.state_dirty = true;
    }

    /// Our own event came back from the broker: it and everything before it are delivered.
    pub(super) fn on_own_event(&mut self, payload: &[u8], out: &mut Vec<Output>) {
        let Ok(echo) = Event::decode(payload) else {
            return;
        };
        let key = self.outbox.iter().find_map(|(k, bytes)| {
            Event::decode(bytes)
                .ok()
                .filter(|e| e.epoch == echo.epoch && e.seq == echo.seq)
                .map(|_| *k)
        });
        if let Some(key) = key {
            self.outbox.retain(|(k, _)| *k > key);
            out.push(Output::Persist(vec![Mutation::AckOutbox(key)]));
        }
    }
}
