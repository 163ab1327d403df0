//! What the printer link reports (`PrinterEvent`): ready, lines acknowledged, progress,
//! temperatures, errors, resets and disconnects. A print the link loses ends (`interrupted`, or
//! `failed` on a halt) and is never resumed; its line is checkpointed every `checkpoint_lines`.

use protocol::state::{EventKind, JobStage};

use crate::store::Mutation;

use super::{Gateway, LinkState, Now, Output, PrinterEvent};

impl Gateway {
    pub(super) fn on_printer(&mut self, now: Now, ev: PrinterEvent, out: &mut Vec<Output>) {
        let was_dirty = self.state_dirty;
        self.state_dirty = true;
        match ev {
            PrinterEvent::Ready { firmware } => {
                let was_halted = self.link == LinkState::Halted;
                self.link = LinkState::Ready;
                let name = firmware.name.clone();
                self.firmware = Some(firmware);
                if was_halted {
                    self.error = None;
                }
                self.event(now, EventKind::PrinterConnected { firmware: name }, out);
                if self.connected {
                    self.birth(now, out);
                }
                // A verified file waiting for the printer starts now.
                if self
                    .current
                    .as_ref()
                    .is_some_and(|j| j.stage == JobStage::Starting)
                {
                    self.start_stream(now, out);
                }
            }
            PrinterEvent::LinesAcked { count } => {
                let Some(job) = &mut self.current else { return };
                if !matches!(job.stage, JobStage::Printing | JobStage::Paused) {
                    return;
                }
                job.line = count;
                let done = job.total_lines > 0 && job.line >= job.total_lines;
                let checkpoint = job.line >= self.last_checkpoint_line + self.cfg.checkpoint_lines;
                let snapshot = job.clone();
                if done {
                    self.end_job(now, JobStage::Finished, None, out);
                } else if checkpoint {
                    self.last_checkpoint_line = snapshot.line;
                    out.push(Output::Persist(vec![Mutation::SetCurrent(Some(snapshot))]));
                }
            }
            PrinterEvent::Progress {
                percent,
                remaining_min,
            } => {
                self.progress_pct = Some(percent.clamp(0.0, 100.0));
                self.remaining_s = remaining_min.map(|m| m * 60);
            }
            PrinterEvent::Temperatures(t) => {
                self.temps = Some(t);
                // Temperatures alone do not make a state change worth publishing early (but
                // must not cancel one that is due: a job that just ended stayed `preparing`
                // until the next heartbeat, issue #10).
                self.state_dirty = was_dirty;
            }
            PrinterEvent::Fatal { message } => {
                self.link = LinkState::Halted;
                self.error = Some(message.clone());
                self.event(
                    now,
                    EventKind::PrinterError {
                        message: message.clone(),
                        fatal: true,
                    },
                    out,
                );
                if self
                    .current
                    .as_ref()
                    .is_some_and(|j| !j.stage.is_terminal())
                {
                    self.transfer = None;
                    self.end_job(
                        now,
                        JobStage::Failed,
                        Some(format!("printer halted: {message}")),
                        out,
                    );
                }
            }
            PrinterEvent::FirmwareError { message } => {
                self.event(
                    now,
                    EventKind::PrinterError {
                        message,
                        fatal: false,
                    },
                    out,
                );
            }
            PrinterEvent::Reset => {
                if self.printing() {
                    self.end_job(
                        now,
                        JobStage::Interrupted,
                        Some("printer reset during the print".into()),
                        out,
                    );
                }
                self.link = LinkState::Down {
                    reason: "printer reset".into(),
                };
            }
            PrinterEvent::Disconnected { reason } => {
                if self.printing() {
                    self.end_job(
                        now,
                        JobStage::Interrupted,
                        Some(format!("serial link lost: {reason}")),
                        out,
                    );
                }
                self.event(
                    now,
                    EventKind::PrinterDisconnected {
                        reason: reason.clone(),
                    },
                    out,
                );
                if self.link != LinkState::Halted {
                    self.link = LinkState::Down { reason };
                }
            }
            PrinterEvent::Timeout => {
                if self.printing() {
                    self.end_job(
                        now,
                        JobStage::Interrupted,
                        Some("printer stopped answering".into()),
                        out,
                    );
                }
                self.event(
                    now,
                    EventKind::PrinterDisconnected {
                        reason: "printer stopped answering".into(),
                    },
                    out,
                );
                self.link = LinkState::Down {
                    reason: "printer stopped answering".into(),
                };
            }
        }
    }
}
