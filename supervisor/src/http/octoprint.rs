//! Slicers' "Send to printer" in OctoPrint's dialect: PrusaSlicer, OrcaSlicer, Cura and
//! OctoPrint's own client can put a job straight into printloop's queue.
//!
//! - `GET /api/version` answers like OctoPrint (the slicer's "Test" button wants an `api` key
//!   and a `text` that starts with `OctoPrint`).
//! - `POST /api/files/local` takes the multipart upload (`file`, `print`, `select`, `path`);
//!   `print=true` queues it. printloop's own fields, in the form or the query: `copies`,
//!   `priority`, `tags` (comma-separated).
//!
//! The key is an API token in `X-Api-Key`; uploading needs an operator's, asking the version a
//! viewer's.

use std::io::Write as _;

use axum::extract::{Multipart, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use protocol::api::{ApiOp, ApiRequest, ApiResult, SubmitJob};
use protocol::web::HttpErrorCode;
use protocol::{Sha256Hex, Version};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::auth::{Operator, Viewer};
use super::errors::HttpError;
use super::rest::{ask, json, request_id};
use super::upload::{not_gcode, store, unix_ms};
use super::App;
use crate::machine::{Caller, Input};

/// The OctoPrint version we answer as (its API is what slicers speak).
const OCTOPRINT_VERSION: &str = "1.11.8";

/// `GET /api/version`.
pub(crate) async fn version(Viewer(_): Viewer) -> Response {
    json(&serde_json::json!({
        "api": "0.1",
        "server": OCTOPRINT_VERSION,
        "text": format!("OctoPrint {OCTOPRINT_VERSION} (printloop {})", env!("CARGO_PKG_VERSION")),
    }))
}

/// printloop's fields, also accepted in the query.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Extras {
    copies: Option<String>,
    priority: Option<String>,
    tags: Option<String>,
    print: Option<String>,
}

/// What the form said.
#[derive(Debug, Default)]
struct Form {
    file: Option<Received>,
    print: bool,
    copies: u32,
    priority: i32,
    tags: Vec<String>,
}

/// The file as it came in, in a temporary file beside the store.
#[derive(Debug)]
struct Received {
    name: String,
    sha256: Sha256Hex,
    size: u64,
    tmp: tempfile::NamedTempFile,
}

fn truthy(s: &str) -> bool {
    matches!(
        s.trim().to_ascii_lowercase().as_str(),
        "true" | "1" | "yes" | "on"
    )
}

/// A job name from a file name: the last path part, control characters replaced, at most 200
/// bytes.
fn job_name(file_name: &str) -> String {
    let base = file_name
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or(file_name)
        .trim();
    let mut name: String = base
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    while name.len() > 200 {
        name.pop();
    }
    if name.is_empty() {
        "upload.gcode".into()
    } else {
        name
    }
}

impl Form {
    fn set(&mut self, key: &str, value: &str) -> Result<(), HttpError> {
        match key {
            "print" => self.print = truthy(value),
            "copies" => {
                self.copies = value.trim().parse().map_err(|_| {
                    HttpError::invalid(format!(
                        "copies must be a number 1 to 1000, not {:?}",
                        super::errors::shown(value, 20)
                    ))
                })?
            }
            "priority" => {
                self.priority = value.trim().parse().map_err(|_| {
                    HttpError::invalid(format!(
                        "priority must be an integer, not {:?}",
                        super::errors::shown(value, 20)
                    ))
                })?
            }
            "tags" => {
                self.tags = value
                    .split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect()
            }
            // OctoPrint's `select`, `path`, `userdata`: nothing to do here.
            _ => {}
        }
        Ok(())
    }
}

async fn receive(app: &App, mut multipart: Multipart, form: &mut Form) -> Result<(), HttpError> {
    let bad = |e: axum::extract::multipart::MultipartError| {
        HttpError::invalid(format!(
            "the multipart body cannot be read: {}",
            e.body_text()
        ))
    };
    let max = app.files.config().max_file_size;
    while let Some(mut field) = multipart.next_field().await.map_err(bad)? {
        let key = field.name().unwrap_or_default().to_owned();
        if key != "file" {
            let value = field.text().await.map_err(bad)?;
            if value.len() > 4096 {
                return Err(HttpError::invalid(format!(
                    "form field {key:?} is too long"
                )));
            }
            form.set(&key, &value)?;
            continue;
        }
        if form.file.is_some() {
            return Err(HttpError::invalid("one file per upload"));
        }
        let name = job_name(field.file_name().unwrap_or("upload.gcode"));
        let dir = app.files.incoming_dir();
        let mut tmp = tempfile::Builder::new()
            .prefix("octoprint-")
            .tempfile_in(&dir)
            .map_err(|e| {
                HttpError::http(
                    HttpErrorCode::Unavailable,
                    format!("cannot store the upload: {e}"),
                )
            })?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut head = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(bad)? {
            size += chunk.len() as u64;
            if size > max {
                return Err(HttpError::http(
                    HttpErrorCode::TooLarge,
                    format!("the file is larger than this farm takes ({max} bytes)"),
                ));
            }
            if head.len() < 64 * 1024 {
                head.extend_from_slice(&chunk[..chunk.len().min(64 * 1024 - head.len())]);
            }
            hasher.update(&chunk);
            tmp.write_all(&chunk).map_err(|e| {
                HttpError::http(
                    HttpErrorCode::Unavailable,
                    format!("cannot store the upload: {e}"),
                )
            })?;
        }
        if size == 0 {
            return Err(HttpError::invalid("the file is empty"));
        }
        if let Some(why) = not_gcode(&head) {
            return Err(HttpError::http(HttpErrorCode::NotGcode, why));
        }
        let sha256 = Sha256Hex::new(hex::encode(hasher.finalize()))
            .map_err(|e| HttpError::invalid(e.to_string()))?;
        form.file = Some(Received {
            name,
            sha256,
            size,
            tmp,
        });
    }
    Ok(())
}

/// `POST /api/files/local`.
pub(crate) async fn upload(
    State(app): State<App>,
    Operator(who): Operator,
    headers: axum::http::HeaderMap,
    Query(extras): Query<Extras>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    let r = async {
        let multipart = multipart.map_err(|e| {
            HttpError::invalid(format!(
                "expected a multipart/form-data upload with a `file` part: {}",
                e.body_text()
            ))
        })?;
        let mut form = Form {
            copies: 1,
            ..Form::default()
        };
        for (k, v) in [
            ("copies", &extras.copies),
            ("priority", &extras.priority),
            ("tags", &extras.tags),
            ("print", &extras.print),
        ] {
            if let Some(v) = v {
                form.set(k, v)?;
            }
        }
        receive(&app, multipart, &mut form).await?;
        let Some(file) = form.file.take() else {
            return Err(HttpError::invalid("no `file` part in the upload"));
        };
        // Into the content-addressed store, through the same checks as every upload.
        let files = app.files.clone();
        let (sha, size) = (file.sha256.clone(), file.size);
        let tmp = file.tmp;
        let outcome = tokio::task::spawn_blocking(move || {
            let mut f = tmp.reopen().map_err(|e| e.to_string())?;
            let mut at = 0u64;
            let mut buf = vec![0u8; 1024 * 1024];
            let mut last = None;
            loop {
                let n = std::io::Read::read(&mut f, &mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                last = Some(store(&files, &sha, at, size, &buf[..n], unix_ms()));
                at += n as u64;
                if let Some(crate::machine::UploadOutcome::Failed(_)) = &last {
                    break;
                }
            }
            last.ok_or_else(|| "the file is empty".to_owned())
        })
        .await
        .map_err(|e| HttpError::http(HttpErrorCode::Unavailable, e.to_string()))?
        .map_err(|e| {
            HttpError::http(
                HttpErrorCode::Unavailable,
                format!("cannot store the upload: {e}"),
            )
        })?;
        let id = request_id(&headers)?;
        ask(
            &app,
            who.name.clone(),
            id.clone(),
            Input::Uploaded {
                caller: Caller::Http(who.name.clone()),
                id,
                outcome,
            },
        )
        .await?;
        let mut job_ids = Vec::new();
        if form.print {
            let id = request_id(&axum::http::HeaderMap::new())?;
            let req = ApiRequest {
                v: Version,
                id: id.clone(),
                client: who.name.clone(),
                op: ApiOp::SubmitJob(SubmitJob {
                    name: file.name.clone(),
                    sha256: file.sha256.clone(),
                    copies: form.copies,
                    priority: form.priority,
                    tags: form.tags.clone(),
                }),
            };
            if let ApiResult::Submitted { job_ids: ids } =
                ask(&app, who.name.clone(), id, Input::Http(req)).await?
            {
                job_ids = ids;
            }
            tracing::info!(client = %who.name, jobs = ?job_ids.iter().map(|j| j.as_str()).collect::<Vec<_>>(), "slicer upload queued");
        }
        Ok::<_, HttpError>(serde_json::json!({
            "done": true,
            "files": {
                "local": {
                    "name": file.name,
                    "display": file.name,
                    "path": file.name,
                    "origin": "local",
                    "refs": {
                        "resource": format!("/api/v1/files/{}", file.sha256),
                    },
                }
            },
            "printloop": {
                "sha256": file.sha256,
                "size": file.size,
                "job_ids": job_ids,
            },
        }))
    };
    match r.await {
        Ok(body) => {
            let mut resp = (StatusCode::CREATED, json(&body)).into_response();
            resp.headers_mut().insert(
                header::LOCATION,
                header::HeaderValue::from_static("/api/v1/jobs"),
            );
            resp
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_from_file_names_are_tamed() {
        assert_eq!(job_name("benchy.gcode"), "benchy.gcode");
        assert_eq!(job_name("../../etc/passwd"), "passwd");
        assert_eq!(job_name("C:\\prints\\a.gcode"), "a.gcode");
        assert_eq!(job_name("a\x1b[31mred.gcode"), "a?[31mred.gcode");
        assert_eq!(job_name(""), "upload.gcode");
        assert!(job_name(&"x".repeat(500)).len() <= 200);
    }
}
