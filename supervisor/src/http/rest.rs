//! `/api/v1`: the MQTT API's operations over HTTP, answered by the same machine code (rate
//! limits, idempotent request ids, refusals), and the dashboard's reads.

use axum::extract::{Path, Query as UrlQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use protocol::api::{
    ApiOp, ApiRequest, ApiResult, BedClear, JobArgs, ListJobs, NoArgs, PrinterArgs, SetPriority,
    SubmitJob,
};
use protocol::web::HttpErrorCode;
use protocol::{ClientId, CommandId, JobId, PrinterId, Version};
use serde::Deserialize;
use std::time::Duration;
use tokio::sync::oneshot;

use super::auth::{Operator, Viewer};
use super::errors::{shown, Body, HttpError};
use super::{App, Call, Query, ANSWER_WITHIN};
use crate::machine::Input;

/// A JSON body.
pub(crate) fn json<T: serde::Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "an answer does not serialise");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Strictly reads a JSON body (unknown fields refused), naming where it is wrong.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, HttpError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let at = e.path().to_string();
        let inner = e.into_inner();
        if at == "." {
            HttpError::invalid(format!("the body is not the JSON expected: {inner}"))
        } else {
            HttpError::invalid(format!(
                "the body is not the JSON expected: at {at}: {inner}"
            ))
        }
    })
}

/// The request id: the `Idempotency-Key` header (a repeat gets the first answer and nothing
/// happens twice), or a fresh one.
pub(crate) fn request_id(headers: &HeaderMap) -> Result<CommandId, HttpError> {
    match headers.get("idempotency-key") {
        Some(v) => {
            let s = v.to_str().map_err(|_| {
                HttpError::invalid(
                    "Idempotency-Key must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
                )
            })?;
            CommandId::new(s)
                .map_err(|e| HttpError::invalid(format!("Idempotency-Key {:?}: {e}", shown(s, 64))))
        }
        None => {
            let mut raw = [0u8; 12];
            getrandom::fill(&mut raw)
                .map_err(|e| HttpError::http(HttpErrorCode::Unavailable, e.to_string()))?;
            CommandId::new(format!("h-{}", hex::encode(raw)))
                .map_err(|e| HttpError::http(HttpErrorCode::Unavailable, e.to_string()))
        }
    }
}

/// Hands `input` to the loop and waits for the machine's answer to `(client, id)`.
pub(crate) async fn ask(
    app: &App,
    client: ClientId,
    id: CommandId,
    input: Input,
) -> Result<ApiResult, HttpError> {
    let (tx, rx) = oneshot::channel();
    let call = Call::Machine {
        input,
        client,
        id,
        reply: tx,
    };
    let unavailable = || {
        HttpError::http(
            HttpErrorCode::Unavailable,
            "the supervisor is not answering (stopping or overloaded); try again",
        )
    };
    app.calls.try_send(call).map_err(|_| unavailable())?;
    let resp = tokio::time::timeout(ANSWER_WITHIN, rx)
        .await
        .map_err(|_| unavailable())?
        .map_err(|_| unavailable())?;
    if resp.ok {
        resp.result
            .ok_or_else(|| HttpError::invalid("an empty answer"))
    } else {
        Err(HttpError::refused(resp))
    }
}

/// Runs one operation for `who`.
async fn op(
    app: &App,
    who: &super::tokens::Principal,
    headers: &HeaderMap,
    op: ApiOp,
) -> Result<ApiResult, HttpError> {
    let id = request_id(headers)?;
    let req = ApiRequest {
        v: Version,
        id: id.clone(),
        client: who.name.clone(),
        op,
    };
    ask(app, who.name.clone(), id, Input::Http(req)).await
}

fn done(r: Result<ApiResult, HttpError>) -> Response {
    match r {
        Ok(r) => json(&r),
        Err(e) => e.into_response(),
    }
}

fn printer_id(s: &str) -> Result<PrinterId, HttpError> {
    PrinterId::new(s).map_err(|e| HttpError::invalid(format!("printer id {:?}: {e}", shown(s, 64))))
}

fn job_id(s: &str) -> Result<JobId, HttpError> {
    JobId::new(s).map_err(|e| HttpError::invalid(format!("job id {:?}: {e}", shown(s, 64))))
}

/// `GET /api/v1/printers`.
pub(crate) async fn list_printers(
    State(app): State<App>,
    Viewer(who): Viewer,
    headers: HeaderMap,
) -> Response {
    done(op(&app, &who, &headers, ApiOp::ListPrinters(NoArgs {})).await)
}

/// `?include_ended=…&limit=…`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    #[serde(default)]
    include_ended: bool,
    limit: Option<u32>,
}

/// `GET /api/v1/jobs`.
pub(crate) async fn list_jobs(
    State(app): State<App>,
    Viewer(who): Viewer,
    headers: HeaderMap,
    q: Result<UrlQuery<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(UrlQuery(q)) => q,
        Err(e) => return HttpError::invalid(format!("query: {}", e.body_text())).into_response(),
    };
    let l = ListJobs {
        include_ended: q.include_ended,
        limit: q.limit,
    };
    done(op(&app, &who, &headers, ApiOp::ListJobs(l)).await)
}

/// `POST /api/v1/jobs`: queue a stored file (201).
pub(crate) async fn submit(
    State(app): State<App>,
    Operator(who): Operator,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let s: SubmitJob = match parse(&body) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    match op(&app, &who, &headers, ApiOp::SubmitJob(s)).await {
        Ok(r) => (StatusCode::CREATED, json(&r)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /api/v1/jobs/{job_id}/cancel`.
pub(crate) async fn cancel(
    State(app): State<App>,
    Operator(who): Operator,
    headers: HeaderMap,
    Path(job): Path<String>,
) -> Response {
    let r = async {
        let job_id = job_id(&job)?;
        op(&app, &who, &headers, ApiOp::CancelJob(JobArgs { job_id })).await
    };
    done(r.await)
}

/// `POST /api/v1/jobs/{job_id}/requeue`.
pub(crate) async fn requeue(
    State(app): State<App>,
    Operator(who): Operator,
    headers: HeaderMap,
    Path(job): Path<String>,
) -> Response {
    let r = async {
        let job_id = job_id(&job)?;
        op(&app, &who, &headers, ApiOp::RequeueJob(JobArgs { job_id })).await
    };
    done(r.await)
}

/// `{"priority": n}`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PriorityBody {
    /// Higher runs first.
    pub priority: i32,
}

/// `PUT /api/v1/jobs/{job_id}/priority`.
pub(crate) async fn priority(
    State(app): State<App>,
    Operator(who): Operator,
    headers: HeaderMap,
    Path(job): Path<String>,
    Body(body): Body,
) -> Response {
    let r = async {
        let job_id = job_id(&job)?;
        let b: PriorityBody = parse(&body)?;
        op(
            &app,
            &who,
            &headers,
            ApiOp::SetPriority(SetPriority {
                job_id,
                priority: b.priority,
            }),
        )
        .await
    };
    done(r.await)
}

/// `{"failed": bool}` (the body may be empty).
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BedClearBody {
    /// The print on the bed failed: its job goes back to the queue.
    #[serde(default)]
    pub failed: bool,
}

/// `POST /api/v1/printers/{printer_id}/bed-clear`.
pub(crate) async fn bed_clear(
    State(app): State<App>,
    Operator(who): Operator,
    headers: HeaderMap,
    Path(printer): Path<String>,
    Body(body): Body,
) -> Response {
    let r = async {
        let printer_id = printer_id(&printer)?;
        let b: BedClearBody = if body.iter().all(u8::is_ascii_whitespace) {
            BedClearBody::default()
        } else {
            parse(&body)?
        };
        op(
            &app,
            &who,
            &headers,
            ApiOp::BedClear(BedClear {
                printer_id,
                failed: b.failed,
            }),
        )
        .await
    };
    done(r.await)
}

async fn printer_op(
    app: App,
    who: super::tokens::Principal,
    headers: HeaderMap,
    printer: String,
    make: fn(PrinterArgs) -> ApiOp,
) -> Response {
    let r = async {
        let printer_id = printer_id(&printer)?;
        op(&app, &who, &headers, make(PrinterArgs { printer_id })).await
    };
    done(r.await)
}

/// A handler that runs one operation on the printer its path names.
macro_rules! printer_action {
    ($(#[$doc:meta])* $name:ident => $op:path) => {
        $(#[$doc])*
        pub(crate) async fn $name(
            State(app): State<App>,
            Operator(who): Operator,
            headers: HeaderMap,
            Path(p): Path<String>,
        ) -> Response {
            printer_op(app, who, headers, p, $op).await
        }
    };
}

printer_action!(
    /// `POST /api/v1/printers/{printer_id}/pause`.
    pause => ApiOp::PausePrinter
);
printer_action!(
    /// `POST /api/v1/printers/{printer_id}/resume`.
    resume => ApiOp::ResumePrinter
);
printer_action!(
    /// `POST /api/v1/printers/{printer_id}/release`.
    release => ApiOp::ReleasePrinter
);
printer_action!(
    /// `DELETE /api/v1/printers/{printer_id}`: forget a decommissioned printer.
    forget => ApiOp::ForgetPrinter
);

async fn query<T>(
    app: &App,
    make: impl FnOnce(oneshot::Sender<T>) -> Query,
) -> Result<T, HttpError> {
    let (tx, rx) = oneshot::channel();
    let unavailable = || {
        HttpError::http(
            HttpErrorCode::Unavailable,
            "the supervisor is not answering (stopping or overloaded); try again",
        )
    };
    app.calls
        .try_send(Call::Query(make(tx)))
        .map_err(|_| unavailable())?;
    tokio::time::timeout(ANSWER_WITHIN, rx)
        .await
        .map_err(|_| unavailable())?
        .map_err(|_| unavailable())
}

/// `GET /api/v1/printers/{printer_id}`: its page.
pub(crate) async fn printer(
    State(app): State<App>,
    Viewer(_): Viewer,
    Path(p): Path<String>,
) -> Response {
    let r = async {
        let id = printer_id(&p)?;
        query(&app, |tx| Query::Printer(id.clone(), tx))
            .await?
            .ok_or_else(|| {
                HttpError::api(
                    protocol::api::ApiErrorCode::UnknownPrinter,
                    format!("no printer {id}"),
                    None,
                )
            })
    };
    match r.await {
        Ok(d) => json(&d),
        Err(e) => e.into_response(),
    }
}

/// `?limit=…`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HistoryQuery {
    limit: Option<u32>,
}

async fn history_of(app: &App, limit: Option<u32>) -> Result<protocol::web::History, HttpError> {
    let limit = limit.unwrap_or(200).clamp(1, 10_000) as usize;
    query(app, |tx| Query::History(limit, tx)).await
}

/// `GET /api/v1/history`: ended jobs and per-printer use.
pub(crate) async fn history(
    State(app): State<App>,
    Viewer(_): Viewer,
    q: Result<UrlQuery<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let limit = match q {
        Ok(UrlQuery(q)) => q.limit,
        Err(e) => return HttpError::invalid(format!("query: {}", e.body_text())).into_response(),
    };
    match history_of(&app, limit).await {
        Ok(h) => json(&h),
        Err(e) => e.into_response(),
    }
}

/// A CSV field: quoted when it needs to be, and never a formula (a spreadsheet runs a cell
/// that starts with `=`, `+`, `-` or `@`; a job name is anyone's text).
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

fn iso(ms: Option<u64>) -> String {
    ms.map(|ms| {
        let secs = (ms / 1000) as i64;
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (y, m, d) = crate::history::civil(days);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )
    })
    .unwrap_or_default()
}

/// `GET /api/v1/history.csv`: ended jobs for a spreadsheet.
pub(crate) async fn history_csv(
    State(app): State<App>,
    Viewer(_): Viewer,
    q: Result<UrlQuery<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let limit = match q {
        Ok(UrlQuery(q)) => q.limit.or(Some(10_000)),
        Err(e) => return HttpError::invalid(format!("query: {}", e.body_text())).into_response(),
    };
    let h = match history_of(&app, limit).await {
        Ok(h) => h,
        Err(e) => return e.into_response(),
    };
    let mut out = String::from(
        "job_id,name,printer_id,state,submitted_at,started_at,ended_at,duration_s,reason\n",
    );
    for j in &h.jobs {
        let state = serde_json::to_value(j.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let duration = match (j.started_at_ms, j.ended_at_ms) {
            (Some(s), Some(e)) if e >= s => ((e - s) / 1000).to_string(),
            _ => String::new(),
        };
        let row = [
            csv_field(j.job_id.as_str()),
            csv_field(&j.name),
            csv_field(j.printer_id.as_ref().map_or("", PrinterId::as_str)),
            state,
            iso(Some(j.submitted_at_ms)),
            iso(j.started_at_ms),
            iso(j.ended_at_ms),
            duration,
            csv_field(j.reason.as_deref().unwrap_or("")),
        ];
        out.push_str(&row.join(","));
        out.push('\n');
    }
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"printloop-history.csv\"",
            ),
        ],
        out,
    )
        .into_response()
}

/// `GET /api/v1/fleet`: the dashboard's first paint, from the latest frame.
pub(crate) async fn fleet(State(app): State<App>, Viewer(_): Viewer) -> Response {
    app.watchers.asked_ms.store(
        super::upload::unix_ms(),
        std::sync::atomic::Ordering::Relaxed,
    );
    let mut rx = app.frames.clone();
    let _ = tokio::time::timeout(Duration::from_secs(2), super::stream::fresh(&mut rx)).await;
    let frame = rx.borrow().clone();
    (
        [(header::CONTENT_TYPE, "application/json")],
        frame.fleet_json(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_never_formulas() {
        assert_eq!(csv_field("benchy"), "benchy");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_field("-2+3"), "'-2+3");
    }

    #[test]
    fn times_are_iso_utc() {
        assert_eq!(iso(Some(0)), "1970-01-01T00:00:00Z");
        assert_eq!(iso(Some(1_796_688_000_000)), "2026-12-08T00:00:00Z");
        assert_eq!(iso(Some(951_782_400_000)), "2000-02-29T00:00:00Z");
        assert_eq!(iso(None), "");
    }
}
