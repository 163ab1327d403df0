//! The runner as the farm's operator, over the supervisor's API: uploads the built-in G-code,
//! keeps the queue topped up, and carries out what the diligent operator model
//! (`supervisor::operator::Diligent`, shared with the demo and the simulation) decides: clear
//! beds (a failed print as failed, so it is requeued), release printers held by the circuit
//! breaker. Shared by `printloop chaos` and `printloop adversary`; it reconnects after a broker
//! restart.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use protocol::api::{ApiOp, ApiResult, JobSummary, ListJobs, NoArgs, PrinterSummary, SubmitJob};
use protocol::JobId;
use supervisor::operator::{Act, Diligent};

use crate::ops::gcode::SAMPLES;
use crate::ops::{gcode, ApiClient, Endpoint};

/// The operator's connection to the supervisor and what it has done.
pub(crate) struct Operator {
    pub(crate) ep: Endpoint,
    pub(crate) api: Option<ApiClient>,
    /// The uploaded sample files, in [`SAMPLES`] order.
    pub(crate) files: Vec<gcode::GcodeFile>,
    /// Every job id the supervisor accepted from this operator.
    pub(crate) submitted: Vec<JobId>,
    next_file: usize,
    /// The operator model (shared with the demo and the simulation).
    diligent: Diligent,
    started: Instant,
    last_operate: Instant,
}

impl Operator {
    /// An operator that has not connected yet.
    pub(crate) fn new(ep: Endpoint) -> Self {
        Operator {
            ep,
            api: None,
            files: Vec::new(),
            submitted: Vec::new(),
            next_file: 0,
            diligent: Diligent::new(),
            started: Instant::now(),
            last_operate: Instant::now() - Duration::from_secs(10),
        }
    }

    /// One request; `None` when refused or when the connection failed (it reconnects next time).
    pub(crate) async fn request(&mut self, op: ApiOp) -> Option<ApiResult> {
        if self.api.is_none() {
            self.api = ApiClient::connect(&self.ep).await.ok();
        }
        let api = self.api.as_mut()?;
        match api.request(op).await {
            Ok(r) => Some(r),
            Err(crate::ops::OpsError::Refused { op, error, code }) => {
                tracing::debug!(op, %error, ?code, "operator: refused");
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "operator: request failed; reconnecting");
                if let Some(api) = self.api.take() {
                    api.close().await;
                }
                None
            }
        }
    }

    /// The supervisor's printers.
    pub(crate) async fn printers(&mut self) -> Option<Vec<PrinterSummary>> {
        match self.request(ApiOp::ListPrinters(NoArgs {})).await? {
            ApiResult::Printers { printers } => Some(printers),
            _ => None,
        }
    }

    /// Every job, ended ones too.
    pub(crate) async fn jobs(&mut self) -> Option<Vec<JobSummary>> {
        match self
            .request(ApiOp::ListJobs(ListJobs {
                include_ended: true,
                limit: Some(1000),
            }))
            .await?
        {
            ApiResult::Jobs { jobs } => Some(jobs),
            _ => None,
        }
    }

    /// Writes the sample files into `files_dir` and uploads them (a few attempts each).
    pub(crate) async fn upload(&mut self, files_dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(files_dir).context("creating the gcode directory")?;
        for (name, bytes) in SAMPLES {
            let path = files_dir.join(name);
            std::fs::write(&path, bytes).with_context(|| format!("writing {name}"))?;
            let file = gcode::inspect(&path).with_context(|| format!("inspecting {name}"))?;
            let mut done = false;
            for _ in 0..5 {
                if self.api.is_none() {
                    self.api = ApiClient::connect(&self.ep).await.ok();
                }
                if let Some(api) = self.api.as_mut() {
                    match api.upload(&file, |_, _| {}).await {
                        Ok(()) => {
                            done = true;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "upload failed; trying again");
                            self.api = None;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            anyhow::ensure!(done, "could not upload {name}");
            self.files.push(file);
        }
        Ok(())
    }

    /// One round (at most every 500 ms): clear beds, reset halted printers, release held ones
    /// and, while `submit`, keep `waiting` jobs queued or assigned. With `long_jobs` every
    /// fourth job is the second sample (the cylinder, four times longer than the cube).
    pub(crate) async fn operate(&mut self, submit: bool, long_jobs: bool, waiting: usize) {
        if self.last_operate.elapsed() < Duration::from_millis(500) {
            return;
        }
        self.last_operate = Instant::now();
        let Some(printers) = self.printers().await else {
            return;
        };
        let Some(jobs) = self.jobs().await else {
            return;
        };
        let now_ms = self.started.elapsed().as_millis() as u64;
        for act in self.diligent.round(now_ms, &printers, &jobs) {
            match &act {
                Act::Release(p) => tracing::info!(printer = %p, "operator: releases the printer"),
                Act::ClearBed {
                    printer,
                    failed,
                    job,
                } => tracing::info!(%printer, ?job, failed, "operator: clears the bed"),
            }
            let _ = self.request(act.op()).await;
        }
        if !submit || self.files.is_empty() {
            return;
        }
        for _ in 0..Diligent::to_submit(&jobs, waiting) {
            let k = usize::from(long_jobs && self.next_file % 4 == 3);
            self.next_file += 1;
            let file = &self.files[k];
            let op = ApiOp::SubmitJob(SubmitJob {
                name: file.name.clone(),
                sha256: file.sha256.clone(),
                copies: 1,
                priority: 0,
                tags: vec![],
            });
            match self.request(op).await {
                Some(ApiResult::Submitted { job_ids }) => self.submitted.extend(job_ids),
                _ => break,
            }
        }
    }
}
