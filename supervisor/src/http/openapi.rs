//! The OpenAPI 3.1 document of `/api/v1` (`docs/openapi.json`, served at
//! `/api/v1/openapi.json`): paths from the table below, schemas generated from the Rust types
//! the server answers with (schemars), so the document cannot describe a shape the code does
//! not have. A test fails when the committed copy drifts.

use axum::response::{IntoResponse, Response};
use protocol::api::{ApiResult, JobSummary, SubmitJob};
use protocol::web::{
    ErrorBody, FileStatus, FleetView, History, PrinterDetail, SessionInfo, SignIn,
};
use schemars::generate::SchemaSettings;
use serde_json::{json, Map, Value};

use super::rest::{BedClearBody, PriorityBody};
use super::webhooks::{HookInfo, HookList, NewHook};
use protocol::web::WebhookEvent;

/// Who may call an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Nobody,
    Viewer,
    Operator,
}

struct Op {
    method: &'static str,
    path: &'static str,
    id: &'static str,
    summary: &'static str,
    need: Need,
    /// The request body's schema name (JSON), if any.
    body: Option<&'static str>,
    /// Success status and its schema name (`None`: no body).
    ok: (u16, Option<&'static str>),
    /// Query parameters: (name, JSON type, description).
    query: &'static [(&'static str, &'static str, &'static str)],
    /// Takes `Idempotency-Key`.
    idempotent: bool,
}

const OPS: &[Op] = &[
    Op { method: "get", path: "/api/v1/session", id: "whoami", summary: "Who is signed in", need: Need::Viewer, body: None, ok: (200, Some("SessionInfo")), query: &[], idempotent: false },
    Op { method: "post", path: "/api/v1/session", id: "signIn", summary: "Sign a browser in with a token (sets the session cookie; needs the X-Printloop header)", need: Need::Nobody, body: Some("SignIn"), ok: (200, Some("SessionInfo")), query: &[], idempotent: false },
    Op { method: "delete", path: "/api/v1/session", id: "signOut", summary: "Sign out (clears the cookie)", need: Need::Nobody, body: None, ok: (204, None), query: &[], idempotent: false },
    Op { method: "get", path: "/api/v1/fleet", id: "fleet", summary: "The dashboard's view: every printer's tile, counts, the queue board, recent ends", need: Need::Viewer, body: None, ok: (200, Some("FleetView")), query: &[], idempotent: false },
    Op { method: "get", path: "/api/v1/printers", id: "listPrinters", summary: "List printers (list_printers)", need: Need::Viewer, body: None, ok: (200, Some("ApiResult")), query: &[], idempotent: false },
    Op { method: "get", path: "/api/v1/printers/{printer_id}", id: "printer", summary: "A printer's page: its tile, recent activity, jobs", need: Need::Viewer, body: None, ok: (200, Some("PrinterDetail")), query: &[], idempotent: false },
    Op { method: "delete", path: "/api/v1/printers/{printer_id}", id: "forgetPrinter", summary: "Forget a decommissioned printer (forget_printer)", need: Need::Operator, body: None, ok: (200, Some("ApiResult")), query: &[], idempotent: true },
    Op { method: "post", path: "/api/v1/printers/{printer_id}/bed-clear", id: "bedClear", summary: "The bed is clear; `failed` sends the print on it back to the queue (bed_clear)", need: Need::Operator, body: Some("BedClearBody"), ok: (200, Some("ApiResult")), query: &[], idempotent: true },
    Op { method: "post", path: "/api/v1/printers/{printer_id}/pause", id: "pausePrinter", summary: "Pause the printing job (pause_printer)", need: Need::Operator, body: None, ok: (200, Some("ApiResult")), query: &[], idempotent: true },
    Op { method: "post", path: "/api/v1/printers/{printer_id}/resume", id: "resumePrinter", summary: "Resume a paused job (resume_printer)", need: Need::Operator, body: None, ok: (200, Some("ApiResult")), query: &[], idempotent: true },
    Op { method: "post", path: "/api/v1/printers/{printer_id}/release", id: "releasePrinter", summary: "Release a printer held by the circuit breaker (release_printer)", need: Need::Operator, body: None, ok: (200, Some("ApiResult")), query: &[], idempotent: true },
    Op { method: "get", path: "/api/v1/jobs", id: "listJobs", summary: "List jobs (list_jobs)", need: Need::Viewer, body: None, ok: (200, Some("ApiResult")), query: &[("include_ended", "boolean", "Include ended jobs, newest first"), ("limit", "integer", "At most this many (default 100, at most 1000)")], idempotent: false },
    Op { method: "post", path: "/api/v1/jobs", id: "submitJob", summary: "Queue a stored file (submit_job)", need: Need::Operator, body: Some("SubmitJob"), ok: (201, Some("ApiResult")), query: &[], idempotent: true },
    Op { method: "post", path: "/api/v1/jobs/{job_id}/cancel", id: "cancelJob", summary: "Cancel a job (cancel_job)", need: Need::Operator, body: None, ok: (200, Some("ApiResult")), query: &[], idempotent: true },
    Op { method: "post", path: "/api/v1/jobs/{job_id}/requeue", id: "requeueJob", summary: "Queue an ended job again as a new attempt (requeue_job)", need: Need::Operator, body: None, ok: (200, Some("ApiResult")), query: &[], idempotent: true },
    Op { method: "put", path: "/api/v1/jobs/{job_id}/priority", id: "setPriority", summary: "Change a queued job's priority (set_priority)", need: Need::Operator, body: Some("PriorityBody"), ok: (200, Some("ApiResult")), query: &[], idempotent: true },
    Op { method: "get", path: "/api/v1/history", id: "history", summary: "Ended jobs, newest first, and per-printer use over 24 h", need: Need::Viewer, body: None, ok: (200, Some("History")), query: &[("limit", "integer", "At most this many jobs (default 200, at most 10000)")], idempotent: false },
    Op { method: "get", path: "/api/v1/history.csv", id: "historyCsv", summary: "Ended jobs as CSV", need: Need::Viewer, body: None, ok: (200, None), query: &[("limit", "integer", "At most this many jobs (default 10000)")], idempotent: false },
    Op { method: "get", path: "/api/v1/files/{sha256}", id: "fileStatus", summary: "How much of an upload is stored (where to resume)", need: Need::Viewer, body: None, ok: (200, Some("FileStatus")), query: &[], idempotent: false },
    Op { method: "put", path: "/api/v1/files/{sha256}", id: "uploadChunk", summary: "Store one chunk (raw bytes, at most 1 MiB) at `offset`, in order (upload_chunk)", need: Need::Operator, body: None, ok: (200, Some("ApiResult")), query: &[("offset", "integer", "Where this chunk starts (the bytes stored so far)"), ("total_size", "integer", "The whole file's size")], idempotent: false },
    Op { method: "get", path: "/api/v1/webhooks", id: "listWebhooks", summary: "Registered webhooks (never their secrets)", need: Need::Operator, body: None, ok: (200, Some("HookList")), query: &[], idempotent: false },
    Op { method: "post", path: "/api/v1/webhooks", id: "addWebhook", summary: "Register a webhook: events are POSTed as WebhookEvent, signed; the answer carries its secret, once", need: Need::Operator, body: Some("NewHook"), ok: (201, Some("HookInfo")), query: &[], idempotent: false },
    Op { method: "delete", path: "/api/v1/webhooks/{id}", id: "removeWebhook", summary: "Remove a webhook (its undelivered events are dropped)", need: Need::Operator, body: None, ok: (204, None), query: &[], idempotent: false },
    Op { method: "get", path: "/api/v1/stream", id: "stream", summary: "Live updates (text/event-stream): `fleet`, then `tiles`, `queue`, `history`, at most 4 frames a second", need: Need::Viewer, body: None, ok: (200, None), query: &[], idempotent: false },
];

fn path_params(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .collect()
}

/// The document.
pub fn document() -> Value {
    let mut gen = SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas".into())
        .into_generator();
    // Each named type becomes a component; their own parts land beside them.
    let mut named = Map::new();
    macro_rules! add {
        ($($t:ty => $name:literal),* $(,)?) => {
            $( named.insert($name.to_owned(), gen.subschema_for::<$t>().to_value()); )*
        };
    }
    add!(
        ApiResult => "ApiResult",
        SubmitJob => "SubmitJob",
        JobSummary => "JobSummary",
        ErrorBody => "ErrorBody",
        FleetView => "FleetView",
        PrinterDetail => "PrinterDetail",
        History => "History",
        FileStatus => "FileStatus",
        SessionInfo => "SessionInfo",
        SignIn => "SignIn",
        BedClearBody => "BedClearBody",
        PriorityBody => "PriorityBody",
        HookList => "HookList",
        HookInfo => "HookInfo",
        NewHook => "NewHook",
        WebhookEvent => "WebhookEvent",
    );
    let mut schemas: Map<String, Value> = gen.take_definitions(true).into_iter().collect();
    // A type schemars inlined (no $ref) is still given its name.
    for (name, s) in named {
        if s.get("$ref").is_none() {
            schemas.insert(name, s);
        }
    }
    let r = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}") });
    let error = |what: &str| json!({ "description": what, "content": { "application/json": { "schema": r("ErrorBody") } } });
    let mut paths = Map::new();
    for op in OPS {
        let mut params: Vec<Value> = path_params(op.path)
            .into_iter()
            .map(|p| json!({ "name": p, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        for (name, ty, desc) in op.query {
            params.push(json!({ "name": name, "in": "query", "required": op.id == "uploadChunk", "description": desc, "schema": { "type": ty } }));
        }
        if op.idempotent {
            params.push(json!({ "name": "Idempotency-Key", "in": "header", "required": false, "description": "A repeat with the same key gets the first answer; nothing happens twice", "schema": { "type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$" } }));
        }
        let mut responses = Map::new();
        let ok = match (op.ok.1, op.id) {
            (Some(s), _) => {
                json!({ "description": "Done", "content": { "application/json": { "schema": r(s) } } })
            }
            (None, "historyCsv") => {
                json!({ "description": "CSV", "content": { "text/csv": { "schema": { "type": "string" } } } })
            }
            (None, "stream") => {
                json!({ "description": "Server-Sent Events", "content": { "text/event-stream": { "schema": { "type": "string" } } } })
            }
            (None, _) => json!({ "description": "Done" }),
        };
        responses.insert(op.ok.0.to_string(), ok);
        responses.insert(
            "400".into(),
            error("Invalid request (a bad id, body or query)"),
        );
        if op.need != Need::Nobody {
            responses.insert("401".into(), error("No token, or an unknown one"));
        }
        if op.need == Need::Operator || op.id == "signIn" {
            responses.insert(
                "403".into(),
                error("A viewer's token, or a cookie-signed change without X-Printloop: 1"),
            );
        }
        if op.path.contains('{') {
            responses.insert("404".into(), error("No such printer, job or file"));
        }
        if op.need == Need::Operator {
            responses.insert(
                "409".into(),
                error("Refused in the current state (the code says why)"),
            );
            responses.insert(
                "429".into(),
                error("Busy: more requests than the token's rate; nothing was done"),
            );
        }
        if op.id == "uploadChunk" {
            responses.insert("413".into(), error("Larger than the farm takes"));
            responses.insert("415".into(), error("Not G-code"));
        }
        responses.insert(
            "503".into(),
            error("The supervisor is not answering; try again"),
        );
        let mut o = json!({
            "operationId": op.id,
            "summary": op.summary,
            "parameters": params,
            "responses": responses,
        });
        if op.need == Need::Nobody {
            o["security"] = json!([]);
        }
        match (op.body, op.id) {
            (Some(b), _) => {
                o["requestBody"] = json!({ "required": op.id != "bedClear", "content": { "application/json": { "schema": r(b) } } });
            }
            (None, "uploadChunk") => {
                o["requestBody"] = json!({ "required": true, "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } } });
            }
            _ => {}
        }
        let entry = paths
            .entry(op.path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        entry[op.method] = o;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "printloop supervisor HTTP API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The MQTT operator API's operations over HTTP, with the same refusals and idempotency, and the dashboard's reads. See docs/http.md.",
            "license": { "name": "Apache-2.0", "identifier": "Apache-2.0" }
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "servers": [{ "url": "/" }],
        "security": [{ "bearer": [] }, { "apiKey": [] }, { "cookie": [] }],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer", "description": "An API token (printloop tokens add)" },
                "apiKey": { "type": "apiKey", "in": "header", "name": "X-Api-Key" },
                "cookie": { "type": "apiKey", "in": "cookie", "name": "printloop_session", "description": "Set by POST /api/v1/session; changes also need the header X-Printloop: 1" }
            }
        }
    })
}

/// The document as committed (`docs/openapi.json`): pretty, with a final newline.
pub fn document_text() -> String {
    let mut s = serde_json::to_string_pretty(&document()).unwrap_or_default();
    s.push('\n');
    s
}

/// `GET /api/v1/openapi.json` (open: it holds no farm data).
pub(crate) async fn serve() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        document_text(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed document is the one the code generates. After changing an API type or
    /// the table above: `PRINTLOOP_BLESS=1 cargo test -p supervisor openapi` rewrites it.
    #[test]
    fn the_committed_openapi_document_is_the_generated_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
        let now = document_text();
        if std::env::var_os("PRINTLOOP_BLESS").is_some() {
            std::fs::write(&path, &now).expect("write docs/openapi.json");
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == now,
            "docs/openapi.json differs from the API the code serves; if the change is meant, \
             run `PRINTLOOP_BLESS=1 cargo test -p supervisor openapi` and commit the file"
        );
    }

    #[test]
    fn every_reference_resolves_and_every_operation_is_documented() {
        let doc = document();
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = piece.split('"').next().expect("name");
            assert!(
                schemas.contains_key(name),
                "{name} is referenced but not defined"
            );
        }
        let paths = doc["paths"].as_object().expect("paths");
        assert_eq!(
            paths
                .values()
                .map(|p| p.as_object().map_or(0, |o| o.len()))
                .sum::<usize>(),
            OPS.len()
        );
        // The same operations as the MQTT API, every one of them.
        for op in protocol::api::API_OPS {
            let covered = OPS.iter().any(|o| o.summary.contains(&format!("({op})")))
                || op == "upload_chunk" && OPS.iter().any(|o| o.id == "uploadChunk");
            assert!(covered, "the MQTT API's {op} has no HTTP operation");
        }
    }
}
