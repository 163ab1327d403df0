//! The operator over the MQTT API: submits jobs, clears beds, cancels, requeues, releases,
//! retrying unanswered requests with the same id; after the heal, a diligent one that clears
//! done beds until the views converge. Remembers every job id it was told was accepted.

use std::collections::{BTreeMap, BTreeSet};

use protocol::api::{
    ApiOp, ApiRequest, ApiResponse, ApiResult, BedClear, JobArgs, JobState, PrinterArgs, SubmitJob,
};
use protocol::state::PrinterPhase;
use protocol::{ClientId, CommandId, JobId, Payload, PrinterId, Topic, Version};
use supervisor::machine::Supervisor;
use supervisor::operator::{Act, Diligent};

use crate::network::Up;
use crate::world::{Ev, World};

#[derive(Default)]
pub(crate) struct Operator {
    pub(crate) next: u64,
    /// Requests without an answer yet: id → (payload, tries).
    pub(crate) pending: BTreeMap<CommandId, (Vec<u8>, u32, Option<PrinterId>)>,
    /// Jobs the supervisor confirmed it accepted.
    pub(crate) accepted: BTreeSet<JobId>,
    /// After the faults: the diligent operator model (`supervisor::operator`).
    pub(crate) diligent: Diligent,
}

impl World {
    pub(crate) fn op_request(&mut self, op: ApiOp, printer: Option<PrinterId>) {
        self.op.next += 1;
        let id = CommandId::new(format!("op-{}", self.op.next)).expect("valid id");
        let req = ApiRequest {
            v: Version,
            id: id.clone(),
            client: ClientId::new("op").expect("valid"),
            op,
        };
        let payload = req.encode();
        self.op.pending.insert(id, (payload.clone(), 0, printer));
        let topic = self.topics.format(&Topic::ApiRequest);
        let c = self.op_ix();
        self.client_send(
            c,
            Up::Publish {
                topic,
                payload,
                retain: false,
            },
        );
    }

    pub(crate) fn operator_retry(&mut self) {
        let c = self.op_ix();
        let topic = self.topics.format(&Topic::ApiRequest);
        let mut again = Vec::new();
        for (payload, tries, _) in self.op.pending.values_mut() {
            if *tries < 30 {
                *tries += 1;
                again.push(payload.clone());
            }
        }
        for payload in again {
            self.client_send(
                c,
                Up::Publish {
                    topic: topic.clone(),
                    payload,
                    retain: false,
                },
            );
        }
        self.at(10_000, Ev::OperatorRetry);
    }

    pub(crate) fn operator_message(&mut self, payload: &[u8]) {
        let Ok(resp) = ApiResponse::decode(payload) else {
            self.violate("the operator got an unreadable response".into());
            return;
        };
        self.op.pending.remove(&resp.id);
        if let Some(ApiResult::Submitted { job_ids }) = resp.result {
            for j in job_ids {
                self.op.accepted.insert(j);
            }
        }
    }

    /// The operator's dashboard: the supervisor's printer list (what `printloop printers`
    /// shows), when the supervisor is up.
    pub(crate) fn dashboard(&self) -> Vec<protocol::api::PrinterSummary> {
        self.sup
            .machine
            .as_ref()
            .map(Supervisor::printer_summaries)
            .unwrap_or_default()
    }

    pub(crate) fn operator(&mut self) {
        if self.healing {
            return;
        }
        if self.submit_budget > 0 {
            self.submit_budget -= 1;
            let f = self.files[self.rng.index(self.files.len())].clone();
            let n = self.op.next;
            let priority = self.rng.range(0, 2) as i32;
            self.op_request(
                ApiOp::SubmitJob(SubmitJob {
                    name: format!("part-{n}.gcode"),
                    sha256: f,
                    copies: 1,
                    priority,
                    tags: vec![],
                }),
                None,
            );
            if self.submit_budget == 0 {
                self.at(5_000, Ev::Operator);
            }
            return;
        }
        let accepted: Vec<JobId> = self.op.accepted.iter().cloned().collect();
        let roll = self.rng.range(0, 99);
        match roll {
            0..=49 => {
                // Clears a bed the dashboard says is done.
                let done: Vec<PrinterId> = self
                    .dashboard()
                    .into_iter()
                    .filter(|p| {
                        matches!(
                            p.phase,
                            PrinterPhase::Finished
                                | PrinterPhase::Idle
                                | PrinterPhase::Error
                                | PrinterPhase::Halted
                        )
                    })
                    .map(|p| p.printer_id)
                    .collect();
                if !done.is_empty() {
                    let p = done[self.rng.index(done.len())].clone();
                    let failed = self.rng.chance(0.15);
                    self.op_request(
                        ApiOp::BedClear(BedClear {
                            printer_id: p.clone(),
                            failed,
                        }),
                        Some(p),
                    );
                }
            }
            50..=59 => {
                let p = self.gws[self.rng.index(self.gws.len())].id.clone();
                self.op_request(
                    ApiOp::BedClear(BedClear {
                        printer_id: p.clone(),
                        failed: false,
                    }),
                    Some(p),
                );
            }
            60..=71 if !accepted.is_empty() => {
                let j = accepted[self.rng.index(accepted.len())].clone();
                self.op_request(ApiOp::CancelJob(JobArgs { job_id: j }), None);
            }
            72..=83 if !accepted.is_empty() => {
                let j = accepted[self.rng.index(accepted.len())].clone();
                self.op_request(ApiOp::RequeueJob(JobArgs { job_id: j }), None);
            }
            84..=91 => {
                let g = self.rng.index(self.gws.len());
                let p = self.gws[g].id.clone();
                self.op_request(ApiOp::ReleasePrinter(PrinterArgs { printer_id: p }), None);
            }
            92..=95 => {
                self.submit_budget += 1;
            }
            _ => {}
        }
        let gap = self.rng.range(3_000, 25_000);
        self.at(gap, Ev::Operator);
    }

    /// After the faults: a diligent operator clears done beds and releases held printers;
    /// then the views must converge.
    pub(crate) fn heal_check(&mut self) {
        match self.converged() {
            Ok(()) => {
                self.converged_at = Some(self.now);
                return;
            }
            Err(why) => {
                if self.now > self.heal_at + self.cfg.converge_ms {
                    let views: Vec<String> = self
                        .dashboard()
                        .iter()
                        .map(|p| {
                            format!(
                                "{} {:?} stale={} {:?} job={:?} held={}",
                                p.printer_id, p.presence, p.stale, p.phase, p.job_id, p.held
                            )
                        })
                        .collect();
                    self.violate(format!(
                        "no convergence {} s after the last fault: {why}\n  supervisor's view: {}",
                        self.cfg.converge_ms / 1000,
                        views.join("; ")
                    ));
                    return;
                }
            }
        }
        let busy: BTreeSet<PrinterId> = self
            .op
            .pending
            .values()
            .filter_map(|(_, _, p)| p.clone())
            .collect();
        // The diligent operator model `printloop demo` and `printloop chaos` run too.
        let printers = self.dashboard();
        let acts = {
            let jobs: BTreeMap<JobId, JobState> = self
                .sup
                .machine
                .as_ref()
                .map(|m| m.jobs().map(|j| (j.job_id.clone(), j.state)).collect())
                .unwrap_or_default();
            self.op
                .diligent
                .round_with(self.now, &printers, |id| jobs.get(id).copied())
        };
        for act in acts {
            if busy.contains(act.printer()) {
                continue;
            }
            let printer = matches!(act, Act::ClearBed { .. }).then(|| act.printer().clone());
            self.op_request(act.op(), printer);
        }
        self.at(5_000, Ev::HealCheck);
    }
}
