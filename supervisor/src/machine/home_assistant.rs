//! Home Assistant: MQTT discovery for enrolled printers (in bounded rounds, re-sent when Home
//! Assistant comes back online) and its buttons, made into the operator requests they stand for.

use super::*;

/// Printers whose discovery configs go out in one round (13 messages each)...
const HA_PRINTERS_PER_ROUND: usize = 25;
/// ...and the pause between rounds: a thousand printers' configs never flood the MQTT queue.
pub(crate) const HA_ROUND_MS: u64 = 100;

impl Supervisor {
    pub(super) fn on_ha_status(&mut self, now: Now, payload: &[u8]) {
        if payload.trim_ascii() != b"online" {
            return;
        }
        let delay = ha::jitter(
            now.unix_ms ^ self.epoch.rotate_left(32),
            self.cfg.ha.republish_jitter_ms,
        );
        let at = now.mono_ms + delay;
        tracing::info!(
            delay_ms = delay,
            "Home Assistant is online: discovery follows"
        );
        self.ha_republish_mono = Some(self.ha_republish_mono.map_or(at, |t| t.min(at)));
    }

    /// A Home Assistant button: made into the operator request it stands for, with an id
    /// derived from the printer, the action and the printer's last state `(epoch, seq)`: a
    /// press delivered twice, or pressed twice before the printer reported anything new,
    /// happens once; a press after the printer moved on (pause, resume, pause) is new. The
    /// request is checked against the printer's phase; refusals are answered on
    /// `api/response/homeassistant` and logged.
    pub(super) fn on_press(
        &mut self,
        now: Now,
        printer: PrinterId,
        payload: &[u8],
        out: &mut Vec<Output>,
    ) {
        let caller = Caller::Mqtt(ClientId::new(HA_CLIENT).expect("a valid client id"));
        let action = match PressAction::parse(payload) {
            Ok(a) => a,
            Err(e) => {
                self.counters.rejected_messages += 1;
                tracing::warn!(printer = %printer, error = %e, "Home Assistant press ignored");
                return;
            }
        };
        let seen = self
            .printers
            .get(&printer)
            .and_then(|p| p.state.as_ref())
            .map_or((0, 0), |s| (s.epoch, s.seq));
        let id = press_id(&printer, action, seen);
        if self.answers.contains_key(&caller.answer_key(&id)) {
            tracing::debug!(printer = %printer, action = action.as_str(), "Home Assistant press repeated: done once");
            return;
        }
        if !self.admit_api(now, &caller, &id, false, out) {
            return;
        }
        let op = match self.press_op(&printer, action) {
            Ok(op) => op,
            Err(e) => {
                tracing::warn!(printer = %printer, action = action.as_str(), error = %e, "Home Assistant press refused");
                self.answer(now, &caller, &id, Err(e), false, out);
                return;
            }
        };
        tracing::info!(printer = %printer, action = action.as_str(), "Home Assistant press");
        self.run_request(
            now,
            caller.clone(),
            ApiRequest {
                v: Version,
                id,
                client: caller.client().clone(),
                op,
            },
            out,
        );
    }

    /// The request a press stands for, if it makes sense in the printer's phase.
    pub(super) fn press_op(
        &self,
        printer: &PrinterId,
        action: PressAction,
    ) -> Result<ApiOp, Refusal> {
        let p = self.known(printer)?;
        let phase = p.phase().unwrap_or(PrinterPhase::Disconnected);
        let args = PrinterArgs {
            printer_id: printer.clone(),
        };
        Ok(match action {
            PressAction::Pause => ApiOp::PausePrinter(args),
            PressAction::Resume => ApiOp::ResumePrinter(args),
            PressAction::Cancel => {
                let job = p
                    .state
                    .as_ref()
                    .and_then(|s| s.job.as_ref())
                    .filter(|j| !j.stage.is_terminal())
                    .map(|j| j.job_id.clone())
                    .ok_or_else(|| {
                        Refusal::new(
                            ApiErrorCode::WrongPhase,
                            format!(
                                "printer {printer} is {} with no job to cancel",
                                phase_name(phase)
                            ),
                        )
                    })?;
                ApiOp::CancelJob(JobArgs { job_id: job })
            }
            PressAction::BedCleared => {
                if !matches!(phase, PrinterPhase::Idle | PrinterPhase::Finished) {
                    return Err(Refusal::new(
                        ApiErrorCode::WrongPhase,
                        format!(
                            "printer {printer} is {}: the bed is cleared only when idle or finished",
                            phase_name(phase)
                        ),
                    ));
                }
                ApiOp::BedClear(BedClear {
                    printer_id: printer.clone(),
                    failed: false,
                })
            }
        })
    }

    /// Home Assistant came back online (timer `HaRepublish`): every config is due again.
    pub(super) fn ha_republish(&mut self) {
        self.ha_republish_mono = None;
        self.ha_fleet_dirty = true;
        for (id, p) in self.printers.iter_mut() {
            p.ha_published = None;
            self.ha_dirty.insert(id.clone());
        }
    }

    /// The fleet device's configs (timer `HaFleet`).
    pub(super) fn ha_publish_fleet(&mut self, out: &mut Vec<Output>) {
        self.ha_fleet_dirty = false;
        for c in ha::fleet_configs(&self.cfg.ha, &self.cfg.topics) {
            self.publish(out, c.topic, c.payload, true);
        }
    }

    /// One round of printer configs that changed (timer `HaRound`): at most
    /// `HA_PRINTERS_PER_ROUND` printers. A printer's configs wait for its `meta`, which names
    /// the device.
    pub(super) fn ha_round(&mut self, now: Now, out: &mut Vec<Output>) {
        self.ha_round_mono = Some(now.mono_ms);
        let mut sent = 0;
        while sent < HA_PRINTERS_PER_ROUND {
            let Some(id) = self.ha_dirty.pop_first() else {
                break;
            };
            // Without meta it waits: its meta marks it dirty again.
            let Some(p) = self.printers.get(&id) else {
                continue;
            };
            // An invented printer gets no device in Home Assistant (enrolling it marks it
            // dirty again).
            if !p.enrolled {
                continue;
            }
            let Some(meta) = p.meta.as_ref() else {
                continue;
            };
            let configs = ha::printer_configs(&self.cfg.ha, &self.cfg.topics, &id, Some(meta));
            let digest = {
                use std::hash::{Hash as _, Hasher as _};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                configs
                    .iter()
                    .for_each(|c| (&c.topic, &c.payload).hash(&mut h));
                h.finish()
            };
            if p.ha_published == Some(digest) {
                continue;
            }
            sent += 1;
            tracing::info!(printer = %id, entities = configs.len(), "Home Assistant discovery published");
            for c in configs {
                self.publish(out, c.topic, c.payload, true);
            }
            if let Some(p) = self.printers.get_mut(&id) {
                p.ha_published = Some(digest);
            }
        }
    }
}

/// `ha-<printer>-<action>-<epoch>-<seq>`, or a digest of it when a long printer id would make
/// it longer than an id may be.
fn press_id(printer: &PrinterId, action: PressAction, (epoch, seq): (u64, u64)) -> CommandId {
    let readable = format!("ha-{printer}-{}-{epoch}-{seq}", action.as_str());
    CommandId::new(readable.clone()).unwrap_or_else(|_| {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(readable.as_bytes());
        let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        CommandId::new(format!("ha-{hex}")).expect("28 characters of [a-z0-9-]")
    })
}
