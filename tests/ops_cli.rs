//! The operator commands (`printloop jobs …`, `printers`, `bed-clear`, `release`) as a user runs
//! them: the real binary as a child process, a real broker, and a fake supervisor in the test
//! that answers the operator API (and keeps uploaded bytes, to check them).

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use protocol::api::{
    ApiErrorCode, ApiOp, ApiRequest, ApiResponse, ApiResult, JobState, JobSummary, PrinterSummary,
};
use protocol::presence::Presence;
use protocol::state::PrinterPhase;
use protocol::{CommandId, JobId, Payload as _, PrinterId, Sha256Hex, Topic, Topics, Version};
use rumqttc::QoS;
use testkit::{BrokerKind, TestBroker, TestClient};

/// Longest a `printloop` invocation may take before the test fails.
const RUN_LIMIT: Duration = Duration::from_secs(30);

/// What the fake supervisor saw and holds.
#[derive(Debug, Default)]
struct Fake {
    /// sha256 → bytes stored so far (contiguous from 0).
    files: HashMap<String, Vec<u8>>,
    /// Every `upload_chunk` as (offset, decoded length).
    chunks: Vec<(u64, usize)>,
    /// Every request, in order.
    requests: Vec<ApiRequest>,
    /// Undecodable requests.
    rejects: Vec<String>,
    next_job: u32,
}

fn ok(id: &CommandId, result: ApiResult) -> ApiResponse {
    ApiResponse {
        v: Version,
        id: id.clone(),
        ok: true,
        result: Some(result),
        error: None,
        code: None,
        retry_after_ms: None,
    }
}

fn refuse(id: &CommandId, code: ApiErrorCode, error: &str) -> ApiResponse {
    ApiResponse {
        v: Version,
        id: id.clone(),
        ok: false,
        result: None,
        error: Some(error.to_owned()),
        code: Some(code),
        retry_after_ms: None,
    }
}

fn job(id: &str, state: JobState, printer: Option<&str>, pct: Option<f64>) -> JobSummary {
    JobSummary {
        job_id: JobId::new(id).expect("job id"),
        name: "cube20.gcode".into(),
        sha256: Sha256Hex::digest(b"cube"),
        state,
        priority: 0,
        printer_id: printer.map(|p| PrinterId::new(p).expect("printer id")),
        progress_pct: pct,
        submitted_at_ms: 1_795_000_000_000,
        started_at_ms: None,
        ended_at_ms: None,
        reason: None,
    }
}

fn known_printer(id: &PrinterId) -> bool {
    matches!(id.as_str(), "p0" | "p1")
}

impl Fake {
    fn answer(&mut self, req: &ApiRequest) -> ApiResponse {
        self.requests.push(req.clone());
        let id = &req.id;
        match &req.op {
            ApiOp::UploadChunk(c) => {
                let data = match base64::engine::general_purpose::STANDARD.decode(&c.data_b64) {
                    Ok(d) => d,
                    Err(e) => {
                        return refuse(id, ApiErrorCode::Invalid, &format!("bad base64: {e}"))
                    }
                };
                if data.len() > 64 * 1024 {
                    return refuse(id, ApiErrorCode::Invalid, "chunk larger than 64 KiB");
                }
                self.chunks.push((c.offset, data.len()));
                let stored = self.files.entry(c.sha256.to_string()).or_default();
                let have = stored.len() as u64;
                // Keep what continues the stored prefix; ignore a chunk that leaves a gap.
                if c.offset <= have && c.offset + data.len() as u64 > have {
                    let skip = usize::try_from(have - c.offset).expect("small");
                    stored.extend_from_slice(&data[skip..]);
                }
                ok(
                    id,
                    ApiResult::Uploaded {
                        received: stored.len() as u64,
                        total_size: c.total_size,
                    },
                )
            }
            ApiOp::SubmitJob(s) => {
                let complete = self
                    .files
                    .get(s.sha256.as_str())
                    .is_some_and(|d| Sha256Hex::digest(d) == s.sha256);
                if !complete {
                    return refuse(
                        id,
                        ApiErrorCode::FileNotStored,
                        &format!("unknown file {}", s.sha256),
                    );
                }
                let job_ids = (0..s.copies)
                    .map(|_| {
                        self.next_job += 1;
                        JobId::new(format!("j-{:06}", 100 + self.next_job)).expect("job id")
                    })
                    .collect();
                ok(id, ApiResult::Submitted { job_ids })
            }
            ApiOp::ListJobs(l) => {
                let mut jobs = vec![
                    job("j-000042", JobState::Printing, Some("p0"), Some(43.6)),
                    job("j-000043", JobState::Queued, None, None),
                ];
                if l.include_ended {
                    jobs.push(job("j-000041", JobState::Done, Some("p1"), None));
                }
                ok(id, ApiResult::Jobs { jobs })
            }
            ApiOp::ListPrinters(_) => ok(
                id,
                ApiResult::Printers {
                    printers: vec![
                        PrinterSummary {
                            printer_id: PrinterId::new("p0").expect("id"),
                            presence: Presence::Online,
                            stale: false,
                            phase: PrinterPhase::Printing,
                            job_id: Some(JobId::new("j-000042").expect("id")),
                            progress_pct: Some(43.6),
                            held: false,
                            consecutive_failures: 0,
                            enrolled: true,
                        },
                        PrinterSummary {
                            printer_id: PrinterId::new("p1").expect("id"),
                            presence: Presence::Offline,
                            stale: false,
                            phase: PrinterPhase::Halted,
                            job_id: None,
                            progress_pct: None,
                            held: true,
                            consecutive_failures: 3,
                            enrolled: true,
                        },
                    ],
                },
            ),
            ApiOp::BedClear(b) if known_printer(&b.printer_id) => ok(id, ApiResult::Done {}),
            ApiOp::BedClear(b) => refuse(
                id,
                ApiErrorCode::UnknownPrinter,
                &format!("unknown printer {:?}", b.printer_id.as_str()),
            ),
            ApiOp::ReleasePrinter(p)
            | ApiOp::PausePrinter(p)
            | ApiOp::ResumePrinter(p)
            | ApiOp::ForgetPrinter(p)
                if known_printer(&p.printer_id) =>
            {
                ok(id, ApiResult::Done {})
            }
            ApiOp::ReleasePrinter(p)
            | ApiOp::PausePrinter(p)
            | ApiOp::ResumePrinter(p)
            | ApiOp::ForgetPrinter(p) => refuse(
                id,
                ApiErrorCode::UnknownPrinter,
                &format!("unknown printer {:?}", p.printer_id.as_str()),
            ),
            ApiOp::CancelJob(_) | ApiOp::SetPriority(_) => ok(id, ApiResult::Done {}),
            ApiOp::RequeueJob(_) => ok(
                id,
                ApiResult::Submitted {
                    job_ids: vec![JobId::new("j-000200").expect("id")],
                },
            ),
        }
    }
}

/// A fake supervisor on `port`: subscribed (SUBACK received) before this returns.
async fn fake_supervisor(port: u16, fake: Arc<Mutex<Fake>>) -> tokio::task::JoinHandle<()> {
    let topics = Topics::default();
    let mut client = TestClient::connect(port, "fake-supervisor")
        .await
        .expect("fake supervisor connects");
    client
        .subscribe(&topics.format(&Topic::ApiRequest), QoS::AtLeastOnce)
        .await
        .expect("fake supervisor subscribes");
    tokio::spawn(async move {
        while let Some(p) = client.recv(Duration::from_secs(300)).await {
            let req = match ApiRequest::decode(&p.payload) {
                Ok(r) => r,
                Err(e) => {
                    fake.lock().expect("lock").rejects.push(e.to_string());
                    continue;
                }
            };
            let response = fake.lock().expect("lock").answer(&req);
            let topic = topics.format(&Topic::ApiResponse(req.client.clone()));
            client
                .publish(&topic, QoS::AtLeastOnce, false, response.encode())
                .await
                .expect("fake supervisor answers");
        }
    })
}

/// Runs `printloop ARGS` against the broker on `port`, bounded by [`RUN_LIMIT`].
async fn printloop(port: u16, args: &[&str]) -> Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_printloop"))
        .args(args)
        .env("PRINTLOOP_BROKER", format!("mqtt://127.0.0.1:{port}"))
        .env_remove("PRINTLOOP_TOPIC_ROOT")
        .env_remove("PRINTLOOP_MQTT_USERNAME")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(RUN_LIMIT, run).await {
        Ok(output) => output.expect("printloop starts"),
        Err(_) => panic!("printloop {args:?} did not exit within {RUN_LIMIT:?}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts success and returns stdout.
fn success(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// Asserts failure and returns stderr.
fn failure(output: &Output, what: &str) -> String {
    assert!(
        !output.status.success(),
        "{what} should have failed:\nstdout: {}\nstderr: {}",
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stderr)
}

/// A G-code file of about `size` bytes whose content differs with `seed`.
fn gcode_file(dir: &Path, name: &str, size: usize, seed: u32) -> (std::path::PathBuf, Vec<u8>) {
    let mut bytes = format!("; generated for a test, seed {seed}\nG28\nM104 S215\n").into_bytes();
    let mut i = 0u32;
    while bytes.len() < size {
        bytes.extend_from_slice(
            format!(
                "G1 X{}.{} Y{} E{} ; move {i}\n",
                i % 200,
                seed,
                (i * 7) % 200,
                i
            )
            .as_bytes(),
        );
        i += 1;
    }
    let path = dir.join(name);
    std::fs::write(&path, &bytes).expect("write gcode");
    (path, bytes)
}

async fn upload_and_submit(kind: BrokerKind) {
    let broker = TestBroker::start(kind).expect("broker starts");
    let port = broker.port();
    let fake = Arc::new(Mutex::new(Fake::default()));
    let _sup = fake_supervisor(port, fake.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, bytes) = gcode_file(dir.path(), "cube.gcode", 200_000, 1);
    let path_s = path.to_str().expect("utf-8 path");

    let out = printloop(
        port,
        &[
            "jobs",
            "add",
            path_s,
            "--copies",
            "2",
            "--priority",
            "-3",
            "--tag",
            "pla",
            "--tag",
            "0.4mm",
            "--timeout",
            "5",
        ],
    )
    .await;
    let stdout = success(&out, "jobs add");
    assert_eq!(stdout, "j-000101\nj-000102\n");

    let fake = fake.lock().expect("lock");
    assert!(
        fake.rejects.is_empty(),
        "undecodable requests: {:?}",
        fake.rejects
    );
    let sha = Sha256Hex::digest(&bytes);
    assert_eq!(
        fake.files.get(sha.as_str()),
        Some(&bytes),
        "byte-exact upload"
    );
    let offsets: Vec<(u64, usize)> = fake.chunks.clone();
    assert_eq!(
        offsets,
        [
            (0, 65536),
            (65536, 65536),
            (131072, 65536),
            (196608, bytes.len() - 196_608)
        ],
        "64 KiB chunks, one after the other"
    );
    let submit = fake.requests.last().expect("a submit");
    match &submit.op {
        ApiOp::SubmitJob(s) => {
            assert_eq!(s.name, "cube.gcode");
            assert_eq!(s.sha256, sha);
            assert_eq!((s.copies, s.priority), (2, -3));
            assert_eq!(s.tags, ["pla", "0.4mm"]);
        }
        other => panic!("last request was {other:?}"),
    }
    // Every request of this invocation came under the CLI's name, with distinct ids.
    let clients: std::collections::HashSet<_> = fake.requests.iter().map(|r| &r.client).collect();
    assert_eq!(clients.len(), 1);
    assert!(clients.iter().all(|c| c.as_str() == "cli"));
    let ids: std::collections::HashSet<_> = fake.requests.iter().map(|r| &r.id).collect();
    assert_eq!(ids.len(), fake.requests.len());
}

#[tokio::test]
async fn jobs_add_uploads_in_64k_chunks_and_submits_on_rumqttd() {
    upload_and_submit(BrokerKind::Embedded).await;
}

#[tokio::test]
async fn jobs_add_uploads_in_64k_chunks_and_submits_on_mosquitto() {
    upload_and_submit(BrokerKind::Mosquitto).await;
}

#[tokio::test]
async fn jobs_add_resumes_from_what_the_supervisor_already_holds() {
    let broker = TestBroker::start(BrokerKind::Embedded).expect("broker starts");
    let port = broker.port();
    let fake = Arc::new(Mutex::new(Fake::default()));
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, bytes) = gcode_file(dir.path(), "benchy.gcode", 300_000, 2);
    let sha = Sha256Hex::digest(&bytes);
    // An earlier upload was cut after 100 000 bytes (not a chunk boundary).
    fake.lock()
        .expect("lock")
        .files
        .insert(sha.to_string(), bytes[..100_000].to_vec());
    let _sup = fake_supervisor(port, fake.clone()).await;

    let out = printloop(
        port,
        &[
            "jobs",
            "add",
            path.to_str().expect("utf-8"),
            "--name",
            "Benchy",
            "--timeout",
            "5",
        ],
    )
    .await;
    assert_eq!(success(&out, "jobs add"), "j-000101\n");
    let fake = fake.lock().expect("lock");
    assert_eq!(
        fake.files.get(sha.as_str()),
        Some(&bytes),
        "byte-exact upload"
    );
    let offsets: Vec<u64> = fake.chunks.iter().map(|c| c.0).collect();
    assert_eq!(
        offsets,
        [0, 100_000, 165_536, 231_072, 296_608],
        "the first answer says 100 000 bytes are there; the upload continues from there"
    );
    match &fake.requests.last().expect("submit").op {
        ApiOp::SubmitJob(s) => assert_eq!((s.name.as_str(), s.copies), ("Benchy", 1)),
        other => panic!("last request was {other:?}"),
    }
}

#[tokio::test]
async fn jobs_add_of_a_stored_file_takes_one_chunk() {
    let broker = TestBroker::start(BrokerKind::Embedded).expect("broker starts");
    let port = broker.port();
    let fake = Arc::new(Mutex::new(Fake::default()));
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, bytes) = gcode_file(dir.path(), "again.gcode", 150_000, 3);
    fake.lock()
        .expect("lock")
        .files
        .insert(Sha256Hex::digest(&bytes).to_string(), bytes.clone());
    let _sup = fake_supervisor(port, fake.clone()).await;
    let out = printloop(port, &["jobs", "add", path.to_str().expect("utf-8")]).await;
    assert_eq!(success(&out, "jobs add"), "j-000101\n");
    assert_eq!(fake.lock().expect("lock").chunks, [(0, 65536)]);
}

#[tokio::test]
async fn jobs_add_refuses_files_that_are_not_gcode_without_a_broker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, &[u8], &str); 4] = [
        ("empty.gcode", b"", "the file is empty"),
        (
            "photo.png",
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
            "binary file",
        ),
        (
            "notes.gcode",
            b"; just a comment\n\nhello\n",
            "no G or M command",
        ),
        ("part.bgcode", b"GCDE\x01\x00\x00\x00", "binary G-code"),
    ];
    // Port 1 on loopback: nothing listens. The file check comes first, so that never matters.
    for (name, content, why) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, content).expect("write");
        let out = printloop(1, &["jobs", "add", path.to_str().expect("utf-8")]).await;
        let stderr = failure(&out, name);
        assert!(
            stderr.contains(&format!("{}: not a G-code file", path.display()))
                && stderr.contains(why),
            "{name}: {stderr}"
        );
        assert!(out.stdout.is_empty());
    }
    let missing = dir.path().join("missing.gcode");
    let out = printloop(1, &["jobs", "add", missing.to_str().expect("utf-8")]).await;
    let stderr = failure(&out, "missing file");
    assert!(
        stderr.contains(&format!("reading {}", missing.display())),
        "{stderr}"
    );
}

#[tokio::test]
async fn jobs_list_prints_a_table_or_json_lines() {
    let broker = TestBroker::start(BrokerKind::Embedded).expect("broker starts");
    let port = broker.port();
    let fake = Arc::new(Mutex::new(Fake::default()));
    let _sup = fake_supervisor(port, fake.clone()).await;

    let out = printloop(port, &["jobs", "list"]).await;
    let table = success(&out, "jobs list");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    for (line, want) in lines.iter().zip([
        ["JOB", "NAME", "STATE", "PRINTER", "PROGRESS", "SUBMITTED"].as_slice(),
        &["j-000042", "cube20.gcode", "printing", "p0", "43.6%", "ago"],
        &["j-000043", "cube20.gcode", "queued", "-", "-", "ago"],
    ]) {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&words[..5], &want[..5], "{table}");
        assert_eq!(*words.last().expect("cells"), want[5], "{table}");
    }

    let out = printloop(port, &["jobs", "list", "--all", "--json"]).await;
    let json = success(&out, "jobs list --all --json");
    let jobs: Vec<JobSummary> = json
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JobSummary per line"))
        .collect();
    assert_eq!(
        jobs.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(),
        ["j-000042", "j-000043", "j-000041"]
    );
    let fake = fake.lock().expect("lock");
    let flags: Vec<bool> = fake
        .requests
        .iter()
        .map(|r| match &r.op {
            ApiOp::ListJobs(l) => l.include_ended,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(flags, [false, true]);
}

/// Every run of the CLI answers under one name (`cli`), so the broker holds one response topic
/// however many runs a cron job or a script makes (it was one per run, and rumqttd never frees a
/// topic's log); runs at the same time share it and each keeps to its own answers.
#[tokio::test]
async fn cli_runs_share_one_response_topic_and_keep_to_their_own_answers() {
    let broker = TestBroker::start(BrokerKind::Embedded).expect("broker starts");
    let port = broker.port();
    let fake = Arc::new(Mutex::new(Fake::default()));
    let _sup = fake_supervisor(port, fake.clone()).await;

    let list = || printloop(port, &["jobs", "list"]);
    let (a, b, c, d) = tokio::join!(list(), list(), list(), list());
    for out in [a, b, c, d] {
        let table = success(&out, "jobs list");
        assert_eq!(table.lines().count(), 3, "{table}");
    }
    let out = printloop(port, &["printers"]).await;
    success(&out, "printers");

    let fake = fake.lock().expect("lock");
    assert_eq!(fake.requests.len(), 5, "{:?}", fake.requests);
    let clients: std::collections::BTreeSet<&str> =
        fake.requests.iter().map(|r| r.client.as_str()).collect();
    assert_eq!(clients, ["cli"].into(), "one response topic for every run");
    let ids: std::collections::BTreeSet<&str> =
        fake.requests.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), 5, "request ids stay unique across runs: {ids:?}");
}

#[tokio::test]
async fn printers_prints_presence_phase_job_and_breaker_state() {
    let broker = TestBroker::start(BrokerKind::Embedded).expect("broker starts");
    let port = broker.port();
    let _sup = fake_supervisor(port, Arc::new(Mutex::new(Fake::default()))).await;

    let out = printloop(port, &["printers"]).await;
    let table = success(&out, "printers");
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec!["PRINTER", "PRESENCE", "PHASE", "JOB", "PROGRESS", "HELD", "FAILURES"],
            vec!["p0", "online", "printing", "j-000042", "43.6%", "-", "0"],
            vec!["p1", "offline", "halted", "-", "-", "held", "3"],
        ],
        "{table}"
    );

    let out = printloop(port, &["printers", "--json"]).await;
    let printers: Vec<PrinterSummary> = success(&out, "printers --json")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a PrinterSummary per line"))
        .collect();
    assert_eq!(printers.len(), 2);
    assert!(printers[1].held);
}

#[tokio::test]
async fn bed_clear_release_cancel_and_requeue() {
    let broker = TestBroker::start(BrokerKind::Embedded).expect("broker starts");
    let port = broker.port();
    let fake = Arc::new(Mutex::new(Fake::default()));
    let _sup = fake_supervisor(port, fake.clone()).await;

    let out = printloop(port, &["bed-clear", "p0", "--failed"]).await;
    assert!(success(&out, "bed-clear").starts_with("p0: bed marked clear"));
    let out = printloop(port, &["bed-clear", "p1"]).await;
    assert_eq!(success(&out, "bed-clear"), "p1: bed marked clear\n");
    let out = printloop(port, &["release", "p1"]).await;
    assert!(success(&out, "release").starts_with("p1: released"));
    let out = printloop(port, &["jobs", "cancel", "j-000043"]).await;
    assert_eq!(success(&out, "cancel"), "j-000043: cancelled\n");
    let out = printloop(port, &["jobs", "requeue", "j-000041"]).await;
    assert_eq!(success(&out, "requeue"), "j-000041: requeued as j-000200\n");

    let ops: Vec<String> = fake
        .lock()
        .expect("lock")
        .requests
        .iter()
        .map(|r| serde_json::to_string(&r.op).expect("json"))
        .collect();
    assert_eq!(
        ops,
        [
            r#"{"op":"bed_clear","args":{"printer_id":"p0","failed":true}}"#,
            r#"{"op":"bed_clear","args":{"printer_id":"p1","failed":false}}"#,
            r#"{"op":"release_printer","args":{"printer_id":"p1"}}"#,
            r#"{"op":"cancel_job","args":{"job_id":"j-000043"}}"#,
            r#"{"op":"requeue_job","args":{"job_id":"j-000041"}}"#,
        ]
    );
}

#[tokio::test]
async fn a_refused_request_prints_the_supervisors_error_and_fails() {
    let broker = TestBroker::start(BrokerKind::Embedded).expect("broker starts");
    let port = broker.port();
    let _sup = fake_supervisor(port, Arc::new(Mutex::new(Fake::default()))).await;
    let out = printloop(port, &["bed-clear", "p9"]).await;
    let stderr = failure(&out, "bed-clear p9");
    assert!(
        stderr.contains(r#"bed_clear failed (unknown_printer): unknown printer "p9""#),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test]
async fn no_supervisor_is_a_clear_timeout() {
    let broker = TestBroker::start(BrokerKind::Embedded).expect("broker starts");
    let port = broker.port();
    let started = std::time::Instant::now();
    let out = printloop(port, &["printers", "--timeout", "1"]).await;
    let stderr = failure(&out, "printers without a supervisor");
    assert!(
        stderr.contains(&format!(
            "no answer from the supervisor at mqtt://127.0.0.1:{port} within 1 s (is `printloop supervisor` running?)"
        )),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_broker_that_refuses_the_connection_is_a_clear_error() {
    let port = testkit::free_port();
    let out = printloop(port, &["jobs", "list", "--timeout", "2"]).await;
    let stderr = failure(&out, "jobs list without a broker");
    assert!(
        stderr.contains(&format!(
            "cannot connect to the broker at mqtt://127.0.0.1:{port}"
        )) && stderr.contains("refused"),
        "{stderr}"
    );
    let out = printloop(port, &["printers", "--broker", "tcp://x"]).await;
    assert!(failure(&out, "bad URL").contains("invalid broker URL \"tcp://x\""));
}
