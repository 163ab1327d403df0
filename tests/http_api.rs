//! The supervisor's HTTP API against the demo farm (`printloop demo`: embedded broker,
//! supervisor, simulated printers with real gateways), as a script, a dashboard or a slicer
//! would use it. Every answer is checked against the committed OpenAPI document
//! (`docs/openapi.json`): its status must be documented for the operation and its body must
//! match the documented schema. The last check is that every documented operation was called.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::Digest as _;
use testkit::http::{request, Response};
use testkit::{DemoFarm, DemoOptions};

const T: Duration = Duration::from_secs(20);

fn printloop() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_printloop"))
}

/// The OpenAPI document and the operations answered so far.
struct Spec {
    doc: Value,
    seen: BTreeSet<(String, String)>,
}

impl Spec {
    fn load() -> Spec {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
        let doc = serde_json::from_str(&std::fs::read_to_string(path).expect("docs/openapi.json"))
            .expect("the OpenAPI document is JSON");
        Spec {
            doc,
            seen: BTreeSet::new(),
        }
    }

    /// Fails unless `resp` is a documented answer of `method template`.
    fn check(&mut self, method: &str, template: &str, resp: &Response) {
        let op = &self.doc["paths"][template][method];
        assert!(
            op.is_object(),
            "{method} {template} is not in the OpenAPI document"
        );
        let documented = &op["responses"][resp.status.to_string()];
        assert!(
            documented.is_object(),
            "{method} {template} answered {} which the document does not list: {}",
            resp.status,
            resp.text()
        );
        if let Some(schema) = documented["content"]["application/json"]["schema"].as_object() {
            let mut root = Value::Object(schema.clone());
            root["components"] = self.doc["components"].clone();
            let validator = jsonschema::draft202012::new(&root).expect("the schema compiles");
            let body = resp.json().expect("a JSON body");
            let errors: Vec<String> = validator
                .iter_errors(&body)
                .map(|e| format!("{} at {}", e, e.instance_path))
                .collect();
            assert!(
                errors.is_empty(),
                "{method} {template} {}: the body does not match the document: {errors:?}\n{body}",
                resp.status
            );
        }
        self.seen.insert((method.to_owned(), template.to_owned()));
    }

    fn unseen(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (path, ops) in self.doc["paths"].as_object().expect("paths") {
            for method in ops.as_object().expect("ops").keys() {
                if !self.seen.contains(&(method.clone(), path.clone())) {
                    out.push(format!("{method} {path}"));
                }
            }
        }
        out
    }
}

struct Api {
    addr: SocketAddr,
    token: String,
}

impl Api {
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        extra: &[(&str, &str)],
    ) -> Response {
        let auth = format!("Bearer {}", self.token);
        let mut headers = vec![("Authorization", auth.as_str())];
        headers.extend_from_slice(extra);
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        if !bytes.is_empty() {
            headers.push(("Content-Type", "application/json"));
        }
        request(
            self.addr,
            method.to_uppercase().as_str(),
            path,
            &headers,
            &bytes,
            T,
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"))
    }

    fn put_bytes(&self, path: &str, data: &[u8]) -> Response {
        let auth = format!("Bearer {}", self.token);
        request(
            self.addr,
            "PUT",
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/octet-stream"),
            ],
            data,
            T,
        )
        .expect("PUT")
    }
}

/// A G-code file that prints in a few seconds at the demo's speed.
fn gcode(lines: usize, tag: &str) -> Vec<u8> {
    let mut s = format!("; {tag}\nG28\nM104 S200\nM140 S60\nG90\n");
    for i in 0..lines {
        s.push_str(&format!("G1 X{} Y{} F3000\n", i % 200, (i * 7) % 200));
    }
    s.push_str("M104 S0\nM140 S0\n");
    s.into_bytes()
}

fn sha(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

fn code(r: &Response) -> String {
    r.json()
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Waits (bounded) until `f` holds for the fleet view.
fn wait_fleet(api: &Api, spec: &mut Spec, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = api.call("get", "/api/v1/fleet", None, &[]);
        spec.check("get", "/api/v1/fleet", &r);
        let v = r.json().expect("json");
        if f(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within 60 s; last view {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tile<'a>(fleet: &'a Value, printer: &str) -> &'a Value {
    fleet["printers"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["printer_id"] == printer))
        .unwrap_or(&Value::Null)
}

/// Reads a Server-Sent Events stream for `within`, returning (event, data) pairs.
fn read_stream(
    addr: SocketAddr,
    token: &str,
    within: Duration,
) -> (u16, Vec<(String, String)>, usize) {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    write!(
        s,
        "GET /api/v1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .expect("write");
    let deadline = Instant::now() + within;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut events = Vec::new();
    let (mut event, mut data) = (String::new(), String::new());
    for line in text.lines() {
        if let Some(e) = line
            .strip_prefix("event: ")
            .or_else(|| line.strip_prefix("event:"))
        {
            event = e.trim().to_owned();
        } else if let Some(d) = line
            .strip_prefix("data: ")
            .or_else(|| line.strip_prefix("data:"))
        {
            data.push_str(d);
        } else if line.trim().is_empty() && !event.is_empty() {
            events.push((std::mem::take(&mut event), std::mem::take(&mut data)));
        }
    }
    (status, events, raw.len())
}

/// Every operation of the REST API, as an operator's script uses it: a file uploaded in chunks
/// and resumed, jobs queued (idempotently), reprioritised, paused, resumed, cancelled,
/// requeued, printed; beds cleared; refusals typed; history and CSV; the live stream. Every
/// answer matches the OpenAPI document and every documented operation is exercised.
#[test]
fn every_rest_operation_answers_as_documented_and_prints_a_job() {
    let farm = DemoFarm::start(printloop(), &DemoOptions::default()).expect("demo farm");
    let api = Api {
        addr: farm.http,
        token: farm.operator.clone(),
    };
    let mut spec = Spec::load();

    let r = api.call("get", "/api/v1/session", None, &[]);
    spec.check("get", "/api/v1/session", &r);
    assert_eq!(r.json().expect("json")["role"], "operator");

    // Both printers up, both waiting for their beds to be cleared (manual demo).
    let fleet = wait_fleet(&api, &mut spec, "two printers online", |v| {
        v["printers"].as_array().is_some_and(|a| {
            a.len() == 2
                && a.iter()
                    .all(|t| t["presence"] == "online" && t["phase"] == "idle")
        })
    });
    assert_eq!(fleet["counts"]["total"], 2);
    let r = api.call("get", "/api/v1/printers", None, &[]);
    spec.check("get", "/api/v1/printers", &r);
    assert_eq!(
        r.json().expect("json")["printers"].as_array().map(Vec::len),
        Some(2)
    );

    // Upload in two chunks, the second after asking where to resume (as after a cut).
    // Long enough that p0 is still printing after a pause and a resume on a loaded machine
    // (400 lines once finished before the cancel below came).
    let file = gcode(2000, "http api test");
    let digest = sha(&file);
    let path = format!("/api/v1/files/{digest}");
    let r = api.call("get", &path, None, &[]);
    spec.check("get", "/api/v1/files/{sha256}", &r);
    assert_eq!(r.json().expect("json")["received"], 0);
    let half = file.len() / 2;
    let total = file.len();
    let r = api.put_bytes(
        &format!("{path}?offset=0&total_size={total}"),
        &file[..half],
    );
    spec.check("put", "/api/v1/files/{sha256}", &r);
    assert_eq!(r.json().expect("json")["received"], half);
    let r = api.call("get", &path, None, &[]);
    let resume = r.json().expect("json")["received"]
        .as_u64()
        .expect("received") as usize;
    assert_eq!(resume, half);
    // A chunk that leaves a gap is refused, naming where to resume.
    let r = api.put_bytes(
        &format!("{path}?offset={}&total_size={total}", half + 10),
        &file[half + 10..],
    );
    spec.check("put", "/api/v1/files/{sha256}", &r);
    assert_eq!(
        (r.status, code(&r).as_str()),
        (409, "upload_refused"),
        "{}",
        r.text()
    );
    assert!(r.text().contains(&format!("offset {half}")), "{}", r.text());
    let r = api.put_bytes(
        &format!("{path}?offset={resume}&total_size={total}"),
        &file[resume..],
    );
    spec.check("put", "/api/v1/files/{sha256}", &r);
    assert_eq!(r.json().expect("json")["received"], total);
    let r = api.call("get", &path, None, &[]);
    assert_eq!(r.json().expect("json")["complete"], true);

    // Submit three copies, idempotently: the repeat gets the same jobs.
    let body = json!({"name": "http-test.gcode", "sha256": digest, "copies": 3, "priority": 1, "tags": []});
    let r = api.call(
        "post",
        "/api/v1/jobs",
        Some(body.clone()),
        &[("Idempotency-Key", "submit-1")],
    );
    spec.check("post", "/api/v1/jobs", &r);
    assert_eq!(r.status, 201, "{}", r.text());
    let ids: Vec<String> =
        serde_json::from_value(r.json().expect("json")["job_ids"].clone()).expect("ids");
    assert_eq!(ids.len(), 3);
    let again = api.call(
        "post",
        "/api/v1/jobs",
        Some(body),
        &[("Idempotency-Key", "submit-1")],
    );
    assert_eq!(
        again.json().expect("json")["job_ids"],
        json!(ids),
        "a repeat is answered, not done again"
    );
    let r = api.call("get", "/api/v1/jobs?include_ended=true&limit=50", None, &[]);
    spec.check("get", "/api/v1/jobs", &r);
    let jobs = r.json().expect("json")["jobs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        jobs.iter()
            .filter(|j| j["name"] == "http-test.gcode")
            .count(),
        3
    );

    // Refusals, typed and documented.
    let r = api.call("post", "/api/v1/jobs/j-999999/cancel", None, &[]);
    spec.check("post", "/api/v1/jobs/{job_id}/cancel", &r);
    assert_eq!((r.status, code(&r).as_str()), (404, "unknown_job"));
    let r = api.call("post", "/api/v1/printers/nope/pause", None, &[]);
    spec.check("post", "/api/v1/printers/{printer_id}/pause", &r);
    assert_eq!((r.status, code(&r).as_str()), (404, "unknown_printer"));
    let r = api.call("post", "/api/v1/printers/p0/resume", None, &[]);
    spec.check("post", "/api/v1/printers/{printer_id}/resume", &r);
    assert_eq!(
        (r.status, code(&r).as_str()),
        (409, "wrong_phase"),
        "{}",
        r.text()
    );
    let r = api.call("delete", "/api/v1/printers/p0", None, &[]);
    spec.check("delete", "/api/v1/printers/{printer_id}", &r);
    assert_eq!((r.status, code(&r).as_str()), (409, "printer_online"));
    let r = api.call("post", "/api/v1/jobs/..%2Fx/cancel", None, &[]);
    assert_eq!(
        (r.status, code(&r).as_str()),
        (400, "invalid"),
        "{}",
        r.text()
    );

    // The last copy waits in the queue (two printers): its priority can change; a started
    // one's cannot.
    let r = api.call(
        "put",
        &format!("/api/v1/jobs/{}/priority", ids[2]),
        Some(json!({"priority": 5})),
        &[],
    );
    spec.check("put", "/api/v1/jobs/{job_id}/priority", &r);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = api.call(
        "put",
        &format!("/api/v1/jobs/{}/priority", ids[0]),
        Some(json!({"priority": 5})),
        &[],
    );
    assert_eq!(
        (r.status, code(&r).as_str()),
        (409, "not_queued"),
        "{}",
        r.text()
    );

    // Beds cleared: both printers take a job.
    for p in ["p0", "p1"] {
        let r = api.call(
            "post",
            &format!("/api/v1/printers/{p}/bed-clear"),
            None,
            &[],
        );
        spec.check("post", "/api/v1/printers/{printer_id}/bed-clear", &r);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let fleet = wait_fleet(&api, &mut spec, "p0 printing", |v| {
        tile(v, "p0")["phase"] == "printing"
    });
    let on_p0 = tile(&fleet, "p0")["job"]["job_id"]
        .as_str()
        .expect("job on p0")
        .to_owned();

    // Pause and resume p0; the printer's state says so.
    let r = api.call("post", "/api/v1/printers/p0/pause", None, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    spec.check("post", "/api/v1/printers/{printer_id}/pause", &r);
    wait_fleet(&api, &mut spec, "p0 paused", |v| {
        tile(v, "p0")["phase"] == "paused"
    });
    let r = api.call("post", "/api/v1/printers/p0/resume", None, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    wait_fleet(&api, &mut spec, "p0 printing again", |v| {
        tile(v, "p0")["phase"] == "printing"
    });

    // Cancel p0's job (paused again first: a paused job cannot end on its own before the
    // cancel arrives); a second cancel is refused; the cancelled job can be requeued.
    let r = api.call("post", "/api/v1/printers/p0/pause", None, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    wait_fleet(&api, &mut spec, "p0 paused again", |v| {
        tile(v, "p0")["phase"] == "paused"
    });
    let r = api.call("post", &format!("/api/v1/jobs/{on_p0}/cancel"), None, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    wait_fleet(&api, &mut spec, "p0's job cancelled", |v| {
        !matches!(tile(v, "p0")["phase"].as_str(), Some("printing" | "paused"))
    });
    let r = api.call("post", &format!("/api/v1/jobs/{on_p0}/cancel"), None, &[]);
    assert_eq!(
        (r.status, code(&r).as_str()),
        (409, "job_ended"),
        "{}",
        r.text()
    );
    let r = api.call("post", &format!("/api/v1/jobs/{on_p0}/requeue"), None, &[]);
    spec.check("post", "/api/v1/jobs/{job_id}/requeue", &r);
    assert_eq!(r.status, 200, "{}", r.text());

    // p1 finishes its print; its bed is cleared and the print judged good.
    wait_fleet(&api, &mut spec, "p1 finished", |v| {
        tile(v, "p1")["awaiting_bed_clear"] == true && tile(v, "p1")["phase"] != "printing"
    });
    let r = api.call(
        "post",
        "/api/v1/printers/p1/bed-clear",
        Some(json!({"failed": false})),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = api.call("post", "/api/v1/printers/p1/release", None, &[]);
    spec.check("post", "/api/v1/printers/{printer_id}/release", &r);
    assert_eq!(r.status, 200, "{}", r.text());

    // History, its CSV, the printer's page.
    let r = api.call("get", "/api/v1/history", None, &[]);
    spec.check("get", "/api/v1/history", &r);
    let h = r.json().expect("json");
    assert!(
        h["jobs"].as_array().is_some_and(|j| j
            .iter()
            .any(|j| j["state"] == "done" || j["state"] == "cancelled")),
        "{h}"
    );
    assert_eq!(h["utilisation"].as_array().map(Vec::len), Some(2));
    let r = api.call("get", "/api/v1/history.csv", None, &[]);
    spec.check("get", "/api/v1/history.csv", &r);
    let csv = r.text();
    assert!(csv.starts_with("job_id,name,printer_id,state,"), "{csv}");
    assert!(
        csv.contains(&format!("{on_p0},http-test.gcode,p0,cancelled")),
        "{csv}"
    );
    let r = api.call("get", "/api/v1/printers/p0", None, &[]);
    spec.check("get", "/api/v1/printers/{printer_id}", &r);
    let page = r.json().expect("json");
    assert!(
        page["events"].as_array().is_some_and(|e| e
            .iter()
            .any(|e| e["text"].as_str().is_some_and(|t| t.contains("job_ended")))),
        "{page}"
    );
    assert!(page["jobs"]
        .as_array()
        .is_some_and(|j| j.iter().any(|j| j["job_id"] == on_p0.as_str())));

    // The live stream: the whole fleet first, then only what changes, at most 4 frames a second.
    let (status, events, bytes) = read_stream(farm.http, &farm.operator, Duration::from_secs(3));
    spec.check(
        "get",
        "/api/v1/stream",
        &Response {
            status,
            headers: vec![],
            body: vec![],
        },
    );
    assert_eq!(
        events.first().map(|e| e.0.as_str()),
        Some("fleet"),
        "{events:?}"
    );
    let first: Value = serde_json::from_str(&events[0].1).expect("fleet is JSON");
    assert_eq!(first["printers"].as_array().map(Vec::len), Some(2));
    let frames = events.iter().filter(|e| e.0 == "tiles").count();
    assert!(
        frames >= 1,
        "a printing fleet changes within 3 s: {events:?}"
    );
    assert!(frames <= 13, "{frames} tile frames in 3 s: not coalesced");
    eprintln!("stream: {} events, {bytes} bytes in 3 s", events.len());

    // Webhooks: registered (the key shown once), listed (never the key), removed.
    let r = api.call(
        "post",
        "/api/v1/webhooks",
        Some(json!({"url": "http://127.0.0.1:9/hook", "events": ["job.finished"]})),
        &[],
    );
    spec.check("post", "/api/v1/webhooks", &r);
    assert_eq!(r.status, 201, "{}", r.text());
    let hook = r.json().expect("json");
    let r = api.call("get", "/api/v1/webhooks", None, &[]);
    spec.check("get", "/api/v1/webhooks", &r);
    assert!(!r.text().contains(hook["secret"].as_str().expect("secret")));
    let r = api.call(
        "post",
        "/api/v1/webhooks",
        Some(json!({"url": "gopher://x"})),
        &[],
    );
    spec.check("post", "/api/v1/webhooks", &r);
    assert_eq!((r.status, code(&r).as_str()), (400, "invalid"));
    let id = hook["id"].as_str().expect("id");
    let r = api.call("delete", &format!("/api/v1/webhooks/{id}"), None, &[]);
    spec.check("delete", "/api/v1/webhooks/{id}", &r);
    assert_eq!(r.status, 204);
    let r = api.call("delete", &format!("/api/v1/webhooks/{id}"), None, &[]);
    spec.check("delete", "/api/v1/webhooks/{id}", &r);
    assert_eq!((r.status, code(&r).as_str()), (404, "not_found"));

    // Sessions (a browser's) and the document itself.
    let r = request(
        farm.http,
        "POST",
        "/api/v1/session",
        &[("X-Printloop", "1")],
        json!({"token": farm.viewer}).to_string().as_bytes(),
        T,
    )
    .expect("sign in");
    spec.check("post", "/api/v1/session", &r);
    let r = request(farm.http, "DELETE", "/api/v1/session", &[], b"", T).expect("sign out");
    spec.check("delete", "/api/v1/session", &r);
    assert!(r
        .header("set-cookie")
        .is_some_and(|c| c.contains("Max-Age=0")));
    let r = request(farm.http, "GET", "/api/v1/openapi.json", &[], b"", T).expect("openapi");
    assert_eq!(
        r.json().expect("json"),
        spec.doc,
        "the server serves the committed document"
    );

    assert_eq!(
        spec.unseen(),
        Vec::<String>::new(),
        "documented operations no test called"
    );
}

/// Who may do what: no token, a wrong token, a viewer, a browser's cookie with and without the
/// CSRF header; and bad input of every kind answered with a 4xx naming the problem, with
/// nothing stored or changed. `/metrics` keeps every metric it had.
#[test]
fn access_needs_a_token_of_the_right_role_and_bad_input_changes_nothing() {
    let farm = DemoFarm::start(printloop(), &DemoOptions::default()).expect("demo farm");
    let op = Api {
        addr: farm.http,
        token: farm.operator.clone(),
    };
    let viewer = Api {
        addr: farm.http,
        token: farm.viewer.clone(),
    };

    let r = request(farm.http, "GET", "/api/v1/fleet", &[], b"", T).expect("get");
    assert_eq!((r.status, code(&r).as_str()), (401, "unauthorized"));
    assert!(r.header("www-authenticate").is_some());
    let wrong = Api {
        addr: farm.http,
        // The operator's token with its last character changed (never to itself).
        token: {
            let (head, last) = farm.operator.split_at(farm.operator.len() - 1);
            format!("{head}{}", if last == "0" { "1" } else { "0" })
        },
    };
    let r = wrong.call("get", "/api/v1/fleet", None, &[]);
    assert_eq!((r.status, code(&r).as_str()), (401, "unauthorized"));
    let r = request(
        farm.http,
        "GET",
        "/api/v1/fleet",
        &[("X-Api-Key", &farm.viewer)],
        b"",
        T,
    )
    .expect("get");
    assert_eq!(
        r.status, 200,
        "a viewer reads (X-Api-Key, as slicers send it)"
    );
    for (method, path) in [
        ("post", "/api/v1/printers/p0/pause"),
        ("post", "/api/v1/jobs"),
        ("delete", "/api/v1/printers/p0"),
    ] {
        let r = viewer.call(method, path, Some(json!({})), &[]);
        assert_eq!(
            (r.status, code(&r).as_str()),
            (403, "forbidden"),
            "{method} {path}: {}",
            r.text()
        );
    }

    // A browser: signing in needs the CSRF header; then the cookie reads, and changes need the
    // header too.
    let body = json!({"token": farm.operator}).to_string();
    let r = request(
        farm.http,
        "POST",
        "/api/v1/session",
        &[],
        body.as_bytes(),
        T,
    )
    .expect("sign in");
    assert_eq!((r.status, code(&r).as_str()), (403, "forbidden"));
    let r = request(
        farm.http,
        "POST",
        "/api/v1/session",
        &[("X-Printloop", "1")],
        b"{\"token\":\"plt_nope\"}",
        T,
    )
    .expect("sign in");
    assert_eq!((r.status, code(&r).as_str()), (401, "unauthorized"));
    let r = request(
        farm.http,
        "POST",
        "/api/v1/session",
        &[("X-Printloop", "1")],
        body.as_bytes(),
        T,
    )
    .expect("sign in");
    assert_eq!(r.status, 200);
    let set = r.header("set-cookie").expect("a cookie").to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().expect("cookie").to_owned();
    let r = request(
        farm.http,
        "GET",
        "/api/v1/fleet",
        &[("Cookie", &cookie)],
        b"",
        T,
    )
    .expect("get");
    assert_eq!(r.status, 200);
    let r = request(
        farm.http,
        "POST",
        "/api/v1/printers/p0/release",
        &[("Cookie", &cookie)],
        b"",
        T,
    )
    .expect("post");
    assert_eq!(
        (r.status, code(&r).as_str()),
        (403, "forbidden"),
        "a cross-site form cannot act"
    );
    let r = request(
        farm.http,
        "POST",
        "/api/v1/printers/p0/release",
        &[("Cookie", &cookie), ("X-Printloop", "1")],
        b"",
        T,
    )
    .expect("post");
    assert_eq!(r.status, 200, "{}", r.text());

    // Bad input: a 4xx that names the problem; nothing stored or queued.
    let before = op
        .call("get", "/api/v1/jobs?include_ended=true", None, &[])
        .json()
        .expect("json");
    let r = op.call("post", "/api/v1/jobs", None, &[]);
    assert_eq!(
        (r.status, code(&r).as_str()),
        (400, "invalid"),
        "{}",
        r.text()
    );
    let r = request(
        farm.http,
        "POST",
        "/api/v1/jobs",
        &[("Authorization", &format!("Bearer {}", farm.operator))],
        b"{\"name\": ",
        T,
    )
    .expect("post");
    assert_eq!((r.status, code(&r).as_str()), (400, "invalid"));
    assert!(r.text().contains("JSON"), "{}", r.text());
    let r = op.call(
        "post",
        "/api/v1/jobs",
        Some(json!({"name": "x", "sha256": "00", "colour": "red"})),
        &[],
    );
    assert_eq!((r.status, code(&r).as_str()), (400, "invalid"));
    let r = op.call(
        "post",
        "/api/v1/jobs",
        Some(json!({"name": "x", "sha256": "a".repeat(64)})),
        &[],
    );
    assert_eq!(
        (r.status, code(&r).as_str()),
        (409, "file_not_stored"),
        "{}",
        r.text()
    );
    let r = op.call(
        "post",
        "/api/v1/jobs",
        Some(json!({"name": "x".repeat(100_000), "sha256": "a".repeat(64)})),
        &[],
    );
    assert_eq!(r.status, 413, "an oversized JSON body: {}", r.text());
    let png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR".to_vec();
    let r = op.put_bytes(
        &format!(
            "/api/v1/files/{}?offset=0&total_size={}",
            sha(&png),
            png.len()
        ),
        &png,
    );
    assert_eq!(
        (r.status, code(&r).as_str()),
        (415, "not_gcode"),
        "{}",
        r.text()
    );
    let r = op.call("get", &format!("/api/v1/files/{}", sha(&png)), None, &[]);
    assert_eq!(
        r.json().expect("json")["received"],
        0,
        "nothing of it was stored"
    );
    let big = gcode(10, "big");
    let r = op.put_bytes(
        &format!(
            "/api/v1/files/{}?offset=0&total_size={}",
            sha(&big),
            1u64 << 40
        ),
        &big,
    );
    assert_eq!(
        (r.status, code(&r).as_str()),
        (413, "too_large"),
        "{}",
        r.text()
    );
    let lie = gcode(10, "lie");
    let r = op.put_bytes(
        &format!(
            "/api/v1/files/{}?offset=0&total_size={}",
            "b".repeat(64),
            lie.len()
        ),
        &lie,
    );
    assert_eq!(
        (r.status, code(&r).as_str()),
        (409, "upload_refused"),
        "a file whose digest is not its name: {}",
        r.text()
    );
    let r = op.call("get", "/api/v1/nowhere", None, &[]);
    assert_eq!((r.status, code(&r).as_str()), (404, "not_found"));
    let after = op
        .call("get", "/api/v1/jobs?include_ended=true", None, &[])
        .json()
        .expect("json");
    assert_eq!(before, after, "bad requests changed the jobs");

    // Headers that keep the page to itself.
    let r = request(farm.http, "GET", "/", &[], b"", T).expect("index");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-security-policy")
        .is_some_and(|c| c.contains("default-src 'self'")));
    assert_eq!(r.header("x-frame-options"), Some("DENY"));

    // /metrics: every metric of before, on the loopback listener without a token.
    let r = request(farm.http, "GET", "/metrics", &[], b"", T).expect("metrics");
    assert_eq!(r.status, 200);
    let text = r.text();
    for name in [
        "printloop_printers{presence=\"online\"}",
        "printloop_printers_phase{phase=\"idle\"}",
        "printloop_printers_held",
        "printloop_jobs{state=\"queued\"}",
        "printloop_dispatch_latency_seconds_bucket{le=\"0.05\"}",
        "printloop_dispatch_latency_seconds_sum",
        "printloop_dispatch_latency_seconds_count",
        "printloop_reconciliations_total",
        "printloop_command_retries_total",
        "printloop_starts_total",
        "printloop_rebirths_total",
        "printloop_rejected_messages_total",
        "printloop_refused_file_requests_total",
        "printloop_foreign_jobs_total",
        "printloop_busy_requests_total",
        "printloop_busy_commands_total",
        "printloop_report_resets_total",
        "printloop_supervisor_epoch",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "/metrics lacks {name}:\n{text}"
        );
    }
}
