//! Uploads over HTTP: the dashboard's chunked, resumable upload (`/api/v1/files/{sha256}`),
//! stored by the same content-addressed file store as the MQTT API's `upload_chunk`, and
//! answered by the machine (which then knows the file).

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use protocol::web::{FileStatus, HttpErrorCode};
use protocol::Sha256Hex;
use serde::Deserialize;

use super::auth::{Operator, Viewer};
use super::errors::{shown, Body, HttpError};
use super::rest::{ask, json, request_id};
use super::App;
use crate::files::MAX_UPLOAD_CHUNK;
use crate::machine::{Caller, Input, UploadOutcome};

/// Largest chunk body of `PUT /api/v1/files/{sha256}`.
pub const MAX_CHUNK: usize = 1024 * 1024;
/// Largest JSON body anywhere else.
pub const MAX_JSON: usize = 64 * 1024;

/// Why a file is refused before it is stored: `None` when it looks like G-code (text, with at
/// least one command or comment line in its first 64 KiB).
pub fn not_gcode(head: &[u8]) -> Option<&'static str> {
    let head = &head[..head.len().min(64 * 1024)];
    if head.starts_with(b"GCDE") {
        return Some("this is binary G-code (.bgcode): printloop streams plain G-code; turn off binary G-code in the slicer's printer settings");
    }
    if head.contains(&0) {
        return Some("this is not G-code: it holds binary data (NUL bytes)");
    }
    let command = head.split(|b| *b == b'\n').any(|line| {
        let line = line.trim_ascii_start();
        let line = match line.strip_prefix(b"N") {
            Some(rest) => rest.trim_ascii_start().trim_ascii_start_matches_digits(),
            None => line,
        };
        match line {
            [b';', ..] => true,
            [c, d, ..] => {
                matches!(c.to_ascii_uppercase(), b'G' | b'M' | b'T') && d.is_ascii_digit()
            }
            _ => false,
        }
    });
    if command {
        None
    } else {
        Some("this is not G-code: no G, M or T command or ';' comment in its first 64 KiB")
    }
}

trait TrimDigits {
    fn trim_ascii_start_matches_digits(&self) -> &[u8];
}

impl TrimDigits for [u8] {
    fn trim_ascii_start_matches_digits(&self) -> &[u8] {
        let n = self.iter().take_while(|b| b.is_ascii_digit()).count();
        self[n..].trim_ascii_start()
    }
}

fn sha(s: &str) -> Result<Sha256Hex, HttpError> {
    Sha256Hex::new(s).map_err(|e| HttpError::invalid(format!("sha256 {:?}: {e}", shown(s, 80))))
}

/// `GET /api/v1/files/{sha256}`: how much of an upload is stored (where to resume).
pub(crate) async fn status(
    State(app): State<App>,
    Viewer(_): Viewer,
    Path(s): Path<String>,
) -> Response {
    let r = async {
        let sha = sha(&s)?;
        let files = app.files.clone();
        let s2 = sha.clone();
        let (complete, received) = tokio::task::spawn_blocking(move || {
            if files.has(&s2) {
                let size = std::fs::metadata(files.path(&s2))
                    .map(|m| m.len())
                    .unwrap_or(0);
                Ok((true, size))
            } else {
                files.upload_received(&s2).map(|r| (false, r))
            }
        })
        .await
        .map_err(|e| HttpError::http(HttpErrorCode::Unavailable, e.to_string()))?
        .map_err(|e| {
            HttpError::api(
                protocol::api::ApiErrorCode::UploadRefused,
                e.to_string(),
                None,
            )
        })?;
        Ok::<_, HttpError>(FileStatus {
            sha256: sha,
            received,
            complete,
        })
    };
    match r.await {
        Ok(s) => json(&s),
        Err(e) => e.into_response(),
    }
}

/// `?offset=…&total_size=…`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChunkQuery {
    offset: u64,
    total_size: u64,
}

/// `PUT /api/v1/files/{sha256}?offset=N&total_size=M`: one chunk (at most 1 MiB), in order.
pub(crate) async fn chunk(
    State(app): State<App>,
    Operator(who): Operator,
    headers: axum::http::HeaderMap,
    Path(s): Path<String>,
    q: Result<Query<ChunkQuery>, axum::extract::rejection::QueryRejection>,
    Body(body): Body,
) -> Response {
    let r = async {
        let Query(q) = q.map_err(|e| {
            HttpError::invalid(format!(
                "query: {} (offset and total_size are required)",
                e.body_text()
            ))
        })?;
        let sha = sha(&s)?;
        let id = request_id(&headers)?;
        let max = app.files.config().max_file_size;
        if q.total_size > max {
            return Err(HttpError::http(
                HttpErrorCode::TooLarge,
                format!(
                    "the file is {} bytes; this farm takes at most {max}",
                    q.total_size
                ),
            ));
        }
        if body.is_empty() {
            return Err(HttpError::invalid("an empty chunk"));
        }
        if q.offset == 0 {
            if let Some(why) = not_gcode(&body) {
                return Err(HttpError::http(HttpErrorCode::NotGcode, why));
            }
        }
        let files = app.files.clone();
        let s2 = sha.clone();
        let now_ms = unix_ms();
        let outcome = tokio::task::spawn_blocking(move || {
            store(&files, &s2, q.offset, q.total_size, &body, now_ms)
        })
        .await
        .map_err(|e| HttpError::http(HttpErrorCode::Unavailable, e.to_string()))?;
        let input = Input::Uploaded {
            caller: Caller::Http(who.name.clone()),
            id: id.clone(),
            outcome,
        };
        ask(&app, who.name, id, input).await
    };
    match r.await {
        Ok(res) => json(&res),
        Err(e) => e.into_response(),
    }
}

/// Stores `data` at `offset` in pieces the file store takes.
pub(crate) fn store(
    files: &crate::files::FileStore,
    sha: &Sha256Hex,
    offset: u64,
    total_size: u64,
    data: &[u8],
    now_ms: u64,
) -> UploadOutcome {
    let mut at = offset;
    let mut last = None;
    for piece in data.chunks(MAX_UPLOAD_CHUNK) {
        match files.upload_chunk(sha, at, total_size, piece, now_ms) {
            Ok(p) => {
                at += piece.len() as u64;
                last = Some(p);
            }
            Err(e) => return UploadOutcome::Failed(e.to_string()),
        }
    }
    match last {
        Some(p) => UploadOutcome::Progress {
            received: p.received,
            total_size: p.total_size,
            complete: p.complete,
        },
        None => UploadOutcome::Failed("an empty chunk".into()),
    }
}

/// The wall clock, Unix ms (the shell's clock: `transport::now`).
pub(crate) fn unix_ms() -> u64 {
    transport::now(std::time::Instant::now()).unix_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcode_is_told_from_other_files() {
        assert_eq!(not_gcode(b"; generated by PrusaSlicer\nG28\n"), None);
        assert_eq!(not_gcode(b"\n\nG1 X10 Y10\n"), None);
        assert_eq!(not_gcode(b"N10 G28*45\n"), None);
        assert!(not_gcode(b"GCDE\x01\x00\x00\x00")
            .expect("binary")
            .contains("bgcode"));
        assert!(not_gcode(b"\x89PNG\r\n\x1a\n\x00\x00").is_some());
        assert!(not_gcode(b"{\"hello\": \"world\"}").is_some());
        assert!(not_gcode(b"").is_some());
    }
}
