//! The shipped Node-RED flow (`docs/node-red/flow.json`) in a real Node-RED 4 against a real
//! fleet: two simulated Marlin printers on pseudo-terminals, a `printloop-gateway` child process
//! each, the `printloop supervisor` child process, and a broker (Mosquitto, and `printloop
//! broker`, the embedded rumqttd as a process).
//!
//! Node-RED runs headless with the flow file exactly as shipped; the test drives it the way a
//! person clicks its buttons (the admin API's `POST /inject/<id>`) and reads what it shows (its
//! `GET /printloop/fleet` endpoint). It asserts that every printer's state arrives in Node-RED
//! with live values, that "bed cleared" and "submit job" (a real G-code file uploaded in chunks
//! through the supervisor API) make the supervisor queue and start the job, and that a pause
//! sent from the flow reaches the gateway (its retained `state` turns `paused`, naming the flow's
//! command id), a resume brings the print back, and a cancel ends the job, which the flow's
//! "print ended" recipe reports from the `job_ended` event.
//!
//! It needs Node-RED, so it is `#[ignore]`d in the plain `cargo test` run:
//! `scripts/peer-node-red.sh` installs Node-RED 4 from npm (once) and runs it with `--ignored`,
//! giving the path in `PRINTLOOP_NODE_RED`. Without that variable the test fails (never skips).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use printer_sim::{SimConfig, SimHandle, Simulator};
use protocol::api::QueueSnapshot;
use protocol::presence::{Presence, Status};
use protocol::state::{PrinterPhase, StateSnapshot};
use protocol::Payload;
use rumqttc::QoS;
use serde_json::Value;
use testkit::{BrokerProcess, MosquittoGuard, TestClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROOT: &str = "printloop/v1";
/// The longest any one condition may take to come true.
const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(200);
/// The printers' wire runs this much faster than real time, motion and heating practically
/// instantly: cube20.gcode then streams for about 3 minutes, far longer than the test needs
/// (a shorter print could end before the pause on a host that freezes for seconds).
const SPEED: f64 = 2.0;
const PRINTERS: usize = 2;
const SUPERVISOR_TOML: &str = "[timing]\ncommand_retry_s = 2\nstep_timeout_s = 60\n";
/// Every node type the flow may use: Node-RED's core nodes, nothing from the palette.
const CORE_NODES: [&str; 14] = [
    "tab",
    "comment",
    "mqtt-broker",
    "mqtt in",
    "mqtt out",
    "json",
    "function",
    "change",
    "switch",
    "inject",
    "debug",
    "file in",
    "http in",
    "http response",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn flow_file() -> PathBuf {
    repo().join("docs/node-red/flow.json")
}

fn shipped_flow() -> Vec<Value> {
    let text = std::fs::read_to_string(flow_file()).expect("docs/node-red/flow.json");
    serde_json::from_str(&text).expect("flow.json is a JSON array of nodes")
}

/// The id of the flow's node of `kind` named `name`.
fn node_id(flow: &[Value], kind: &str, name: &str) -> String {
    flow.iter()
        .find(|n| n["type"] == kind && n["name"] == name)
        .and_then(|n| n["id"].as_str())
        .unwrap_or_else(|| panic!("flow.json has no {kind} node named {name:?}"))
        .to_owned()
}

fn node_red_program() -> PathBuf {
    let path = std::env::var_os("PRINTLOOP_NODE_RED").map(PathBuf::from).expect(
        "PRINTLOOP_NODE_RED is not set: run scripts/peer-node-red.sh (it installs Node-RED 4 and sets it)",
    );
    assert!(
        path.is_file(),
        "PRINTLOOP_NODE_RED={} is not a file",
        path.display()
    );
    path
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A child process killed (SIGKILL) and reaped on drop.
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Mosquitto,
    Rumqttd,
}

enum Broker {
    Mosquitto(MosquittoGuard),
    Rumqttd(BrokerProcess),
}

impl Broker {
    fn start(kind: Kind) -> Self {
        match kind {
            Kind::Mosquitto => {
                Broker::Mosquitto(testkit::Mosquitto::start().expect("mosquitto starts"))
            }
            Kind::Rumqttd => Broker::Rumqttd(
                BrokerProcess::start(
                    env!("CARGO_BIN_EXE_printloop"),
                    testkit::shipped_broker_toml(),
                )
                .expect("printloop broker starts"),
            ),
        }
    }

    fn port(&self) -> u16 {
        match self {
            Broker::Mosquitto(m) => m.port(),
            Broker::Rumqttd(b) => b.v4_port(),
        }
    }
}

/// What the test's own MQTT client saw (everything but file chunks).
type Record = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// The fleet, Node-RED, and the test's view of both.
struct Rig {
    dir: tempfile::TempDir,
    // Dropped in this order: Node-RED and the processes first, then the simulators and broker.
    node_red: Option<Kid>,
    processes: Vec<Kid>,
    _sims: Vec<SimHandle>,
    broker: Broker,
    record: Record,
    recorder: tokio::task::JoinHandle<()>,
    http_port: u16,
    flow: Vec<Value>,
    started: Instant,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.recorder.abort();
        self.node_red.take();
        self.processes.clear();
    }
}

impl Rig {
    async fn start(kind: Kind) -> Self {
        let started = Instant::now();
        let flow = shipped_flow();
        let node_red = node_red_program();
        let broker = Broker::start(kind);
        let port = broker.port();
        let url = format!("mqtt://127.0.0.1:{port}");
        let dir = tempfile::tempdir().expect("tempdir");
        let log = |name: &str| std::fs::File::create(dir.path().join(name)).expect("log file");

        // The test's recorder subscribes before anything publishes.
        let record = Record::default();
        let first = recorder_session(port, 0)
            .await
            .unwrap_or_else(|e| panic!("the test's recorder cannot connect: {e}"));
        let recorder = tokio::spawn(record_until_aborted(port, first, record.clone()));

        // The printers and their gateways, then the supervisor.
        let mut sims = Vec::new();
        let mut processes = Vec::new();
        for i in 0..PRINTERS {
            let sim = Simulator::start(
                SimConfig {
                    speed: SPEED,
                    motion_speed: Some(20_000.0),
                    advanced_ok: true,
                    seed: 11 + i as u64,
                    ..SimConfig::default()
                },
                Some(&dir.path().join(format!("printer{i}"))),
            )
            .expect("simulator starts");
            let gw = Command::new(testkit::gateway_binary())
                .args([
                    "--id",
                    &format!("p{i}"),
                    "--heartbeat",
                    "1",
                    "--keepalive",
                    "5",
                ])
                .arg("--broker")
                .arg(&url)
                .arg("--serial")
                .arg(sim.path())
                .arg("--data-dir")
                .arg(dir.path().join(format!("gw{i}")))
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .stdout(Stdio::null())
                .stderr(log(&format!("gw{i}.log")))
                .spawn()
                .expect("gateway starts");
            processes.push(Kid(gw));
            sims.push(sim);
        }
        let config = dir.path().join("supervisor.toml");
        std::fs::write(&config, SUPERVISOR_TOML).expect("supervisor.toml");
        let sup = Command::new(env!("CARGO_BIN_EXE_printloop"))
            .arg("supervisor")
            .arg("--broker")
            .arg(&url)
            .arg("--data-dir")
            .arg(dir.path().join("sup"))
            .arg("--config")
            .arg(&config)
            .args(["--metrics", "off", "--http", "off"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log("supervisor.log"))
            .spawn()
            .expect("supervisor starts");
        processes.push(Kid(sup));

        // Node-RED, headless, with the flow file as shipped.
        let user_dir = dir.path().join("node-red");
        std::fs::create_dir_all(&user_dir).expect("userDir");
        std::fs::copy(flow_file(), user_dir.join("flows.json")).expect("copy flow.json");
        std::fs::write(
            user_dir.join("settings.js"),
            "module.exports = {\n  uiHost: \"127.0.0.1\",\n  flowFile: \"flows.json\",\n  \
             credentialSecret: false,\n  editorTheme: { projects: { enabled: false } },\n  \
             telemetry: { enabled: false },\n  logging: { console: { level: \"info\" } },\n};\n",
        )
        .expect("settings.js");
        let http_port = testkit::free_port();
        let nr = Command::new(node_red)
            .arg("--userDir")
            .arg(&user_dir)
            .args(["--port", &http_port.to_string()])
            .arg("--settings")
            .arg(user_dir.join("settings.js"))
            .arg("flows.json")
            .env("PRINTLOOP_MQTT_HOST", "127.0.0.1")
            .env("PRINTLOOP_MQTT_PORT", port.to_string())
            .env("PRINTLOOP_PRINTER", "p0")
            .env(
                "PRINTLOOP_GCODE_FILE",
                repo().join("assets/gcode/cube20.gcode"),
            )
            .stdin(Stdio::null())
            .stdout(log("node-red.log"))
            .stderr(log("node-red.err"))
            .spawn()
            .expect("node-red starts");

        let rig = Rig {
            dir,
            node_red: Some(Kid(nr)),
            processes,
            _sims: sims,
            broker,
            record,
            recorder,
            http_port,
            flow,
            started,
        };
        rig.until("Node-RED connected to the broker", || {
            let log =
                std::fs::read_to_string(rig.dir.path().join("node-red.log")).unwrap_or_default();
            log.contains("Connected to broker").then_some(())
        })
        .await;
        rig.step(&format!(
            "Node-RED up on :{http_port}, broker {kind:?} on :{}",
            rig.broker.port()
        ));
        rig
    }

    fn step(&self, what: &str) {
        eprintln!("[{:>6.1} s] {what}", self.started.elapsed().as_secs_f64());
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for name in [
            "node-red.log",
            "node-red.err",
            "supervisor.log",
            "gw0.log",
            "gw1.log",
        ] {
            s += &format!("\n--- {name} (tail) ---\n");
            s += &tail(&self.dir.path().join(name), 30);
        }
        s
    }

    /// Polls `f` until it returns something; panics with every log after [`WAIT`].
    async fn until<T>(&self, what: &str, f: impl Fn() -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {WAIT:?} waiting for {what}{}",
                self.logs()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Like [`until`](Self::until), over what Node-RED's `GET /printloop/fleet` shows.
    async fn until_node_red<T>(&self, what: &str, f: impl Fn(&Value) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            let last = match http(self.http_port, "GET", "/printloop/fleet").await {
                Ok(body) => match serde_json::from_str::<Value>(&body) {
                    Ok(v) => {
                        if let Some(out) = f(&v) {
                            return out;
                        }
                        v
                    }
                    Err(e) => panic!("/printloop/fleet answered no JSON ({e}): {body}"),
                },
                Err(e) => Value::String(e),
            };
            assert!(
                Instant::now() < deadline,
                "timed out after {WAIT:?} waiting for Node-RED to show {what}; it shows:\n{last:#}{}",
                self.logs()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Presses one of the flow's inject buttons, as a person does in the editor.
    async fn press(&self, name: &str) {
        let id = node_id(&self.flow, "inject", name);
        let body = http(self.http_port, "POST", &format!("/inject/{id}"))
            .await
            .unwrap_or_else(|e| panic!("pressing {name:?}: {e}{}", self.logs()));
        assert_eq!(body.trim(), "OK", "pressing {name:?}");
        self.step(&format!("pressed {name:?} in Node-RED"));
    }

    fn states(&self, p: &str) -> Vec<StateSnapshot> {
        let topic = format!("{ROOT}/printers/{p}/state");
        self.record
            .lock()
            .expect("record")
            .iter()
            .filter(|(t, _)| *t == topic)
            .filter_map(|(_, b)| StateSnapshot::decode(b).ok())
            .collect()
    }

    fn last_state(&self, p: &str) -> Option<StateSnapshot> {
        self.states(p).pop()
    }

    fn last_queue(&self) -> Option<QueueSnapshot> {
        let topic = format!("{ROOT}/queue");
        self.record
            .lock()
            .expect("record")
            .iter()
            .rev()
            .filter(|(t, _)| *t == topic)
            .find_map(|(_, b)| QueueSnapshot::decode(b).ok())
    }

    fn supervisor_online(&self) -> bool {
        let topic = format!("{ROOT}/supervisor/status");
        self.record
            .lock()
            .expect("record")
            .iter()
            .rev()
            .filter(|(t, _)| *t == topic)
            .find_map(|(_, b)| Status::decode(b).ok())
            .is_some_and(|s| s.presence == Presence::Online)
    }
}

/// The filters the test's recorder subscribes to.
fn recorded_filters() -> [String; 6] {
    [
        format!("{ROOT}/printers/+/state"),
        format!("{ROOT}/printers/+/status"),
        format!("{ROOT}/printers/+/cmd"),
        format!("{ROOT}/printers/+/cmd/result"),
        format!("{ROOT}/supervisor/status"),
        format!("{ROOT}/queue"),
    ]
}

/// One connection of the test's recorder, subscribed.
async fn recorder_session(port: u16, n: u32) -> Result<TestClient, testkit::Error> {
    let mut client = TestClient::connect(port, &format!("node-red-test-recorder-{n}")).await?;
    for filter in recorded_filters() {
        client.subscribe(&filter, QoS::AtLeastOnce).await?;
    }
    Ok(client)
}

/// Records what arrives until the task is aborted. The shared 2-core host has been seen to
/// freeze long enough for the broker to drop every client: then it connects again (the retained
/// topics come back with the new subscription), at most 100 times.
async fn record_until_aborted(port: u16, first: TestClient, record: Record) {
    let mut client = Some(first);
    for n in 1..=100 {
        if let Some(mut c) = client.take() {
            while let Some(p) = c.recv(Duration::from_secs(3600)).await {
                record
                    .lock()
                    .expect("record")
                    .push((p.topic, p.payload.to_vec()));
            }
        }
        tokio::time::sleep(POLL).await;
        client = recorder_session(port, n).await.ok();
    }
}

/// One HTTP/1.1 request to Node-RED on loopback; the body of a 200 answer.
async fn http(port: u16, method: &str, path: &str) -> Result<String, String> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(String::from_utf8_lossy(&buf).into_owned())
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| format!("{method} {path}: no answer within 10 s"))??;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{method} {path}: not HTTP: {raw}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{method} {path}: {head}"));
    }
    // Node-RED answers JSON with a Content-Length; a chunked body is decoded here.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).map_err(|e| format!("chunk: {e}"))?;
            if n == 0 {
                break;
            }
            out.push_str(after.get(..n).ok_or("short chunk")?);
            rest = after.get(n + 2..).unwrap_or("");
        }
        return Ok(out);
    }
    Ok(body.to_owned())
}

fn printer<'a>(fleet: &'a Value, id: &str) -> Option<&'a Value> {
    fleet["printers"]
        .as_array()?
        .iter()
        .find(|p| p["printer_id"] == id)
}

fn api_entry<'a>(fleet: &'a Value, op: &str) -> Option<&'a Value> {
    fleet["api"]
        .as_array()?
        .iter()
        .rev()
        .find(|e| e["op"] == op)
}

/// The id of the last command of `kind` the flow sent.
fn sent_command(fleet: &Value, kind: &str) -> Option<String> {
    fleet["commands"]
        .as_array()?
        .iter()
        .rev()
        .find(|c| c["kind"] == kind && c["printer"] == "p0")
        .and_then(|c| c["id"].as_str())
        .map(str::to_owned)
}

fn result_of<'a>(fleet: &'a Value, id: &str) -> Option<&'a Value> {
    fleet["results"].as_array()?.iter().find(|r| r["id"] == id)
}

/// The flow as shipped: only core nodes, commands never retained, QoS 1 everywhere.
#[test]
fn shipped_flow_uses_core_nodes_and_the_documented_topics() {
    let flow = shipped_flow();
    for n in &flow {
        let kind = n["type"].as_str().unwrap_or("?");
        assert!(
            CORE_NODES.contains(&kind),
            "flow.json uses a non-core node {kind:?}"
        );
        match kind {
            "mqtt out" => {
                assert_eq!(n["qos"], "1", "{n}");
                assert_eq!(
                    n["retain"], "false",
                    "a command must never be retained: {n}"
                );
            }
            "mqtt in" => {
                assert_eq!(n["qos"], "1", "{n}");
                let topic = n["topic"].as_str().expect("topic");
                let ok = [
                    "printers/+/state",
                    "printers/+/status",
                    "printers/+/events",
                    "printers/+/cmd/result",
                    "queue",
                    "api/response/node-red",
                ]
                .iter()
                .any(|t| topic == format!("{ROOT}/{t}"));
                assert!(ok, "undocumented subscription {topic:?}");
            }
            "mqtt-broker" => {
                assert_eq!(n["broker"], "${PRINTLOOP_MQTT_HOST}");
                assert_eq!(n["port"], "${PRINTLOOP_MQTT_PORT}");
                assert_eq!(n["protocolVersion"], "4", "MQTT 3.1.1");
            }
            _ => {}
        }
    }
    for name in [
        "pause printer",
        "resume printer",
        "bed cleared",
        "submit job",
    ] {
        node_id(&flow, "inject", name);
    }
}

async fn flow_against_a_real_fleet(kind: Kind) {
    let rig = Rig::start(kind).await;

    // 1. Every printer's state arrives in Node-RED, with live values.
    let live = |fleet: &Value, id: &str| {
        printer(fleet, id).is_some_and(|p| {
            p["presence"] == "online"
                && p["stale"] == false
                && matches!(p["phase"].as_str(), Some("idle" | "ready"))
                && p["nozzle_c"].as_f64().is_some()
                && p["bed_c"].as_f64().is_some()
                && p["heartbeat_s"].as_u64().is_some()
        })
    };
    let first = rig
        .until_node_red("both printers online with temperatures", |f| {
            (live(f, "p0") && live(f, "p1")).then(|| f.clone())
        })
        .await;
    // And they stay live: the heartbeats keep coming (seq moves).
    let seq0 = printer(&first, "p0")
        .and_then(|p| p["seq"].as_u64())
        .unwrap_or(0);
    rig.until_node_red("p0's state moving on (heartbeats)", |f| {
        printer(f, "p0")
            .and_then(|p| p["seq"].as_u64())
            .filter(|s| *s > seq0)
    })
    .await;
    rig.step("Node-RED shows p0 and p1 online, idle, with temperatures and fresh heartbeats");

    // 2. "bed cleared" through the supervisor API: p0 becomes ready.
    rig.until("the supervisor online", || {
        rig.supervisor_online().then_some(())
    })
    .await;
    rig.press("bed cleared").await;
    rig.until_node_red("bed_clear answered ok", |f| {
        api_entry(f, "bed_clear").map(|e| assert_eq!(e["ok"], true, "bed_clear: {e}"))
    })
    .await;
    rig.until_node_red("p0 ready", |f| {
        printer(f, "p0").filter(|p| p["phase"] == "ready").map(drop)
    })
    .await;
    rig.step("bed cleared from Node-RED: p0 ready");

    // 3. "submit job": the G-code file is uploaded in chunks and queued; the supervisor starts
    // it on p0 (the only ready printer).
    rig.press("submit job").await;
    let submitted = rig
        .until_node_red("submit_job answered", |f| {
            api_entry(f, "submit_job").cloned()
        })
        .await;
    assert_eq!(submitted["ok"], true, "submit_job: {submitted}");
    assert_eq!(
        submitted["sha256"], "03ab417c94be0b5209793ee0a79f9d843017afaba4ca8807e1763652aa8fcb37",
        "the flow hashed cube20.gcode"
    );
    let job = submitted["job_ids"][0]
        .as_str()
        .expect("a job id")
        .to_owned();
    rig.until("the job in the supervisor's retained queue", || {
        rig.last_queue()
            .filter(|q| q.jobs.iter().any(|j| j.job_id.as_str() == job))
            .map(drop)
    })
    .await;
    rig.step(&format!(
        "job {job} submitted from Node-RED is in the supervisor's queue"
    ));
    rig.until_node_red("the job printing on p0, with progress", |f| {
        printer(f, "p0")
            .filter(|p| {
                p["phase"] == "printing"
                    && p["job_id"] == job.as_str()
                    && p["progress_pct"].as_f64().is_some_and(|x| x > 0.0)
            })
            .map(drop)
    })
    .await;
    rig.until_node_red("the queue shown in Node-RED", |f| {
        f["queue"]["jobs"]
            .as_array()
            .filter(|jobs| jobs.iter().any(|j| j["job_id"] == job.as_str()))
            .map(drop)
    })
    .await;
    rig.step("p0 printing the job, progress shown in Node-RED");

    // 4. Pause from the flow: the command reaches the gateway, which pauses the print.
    rig.press("pause printer").await;
    let pause_id = rig
        .until_node_red("the pause command sent", |f| sent_command(f, "pause"))
        .await;
    let paused = rig
        .until("p0's retained state paused by the flow's command", || {
            rig.last_state("p0").filter(|s| {
                s.phase == PrinterPhase::Paused
                    && s.last_command
                        .as_ref()
                        .is_some_and(|c| c.id.as_str() == pause_id)
            })
        })
        .await;
    let paused_line = paused.job.as_ref().map_or(0, |j| j.line);
    rig.until_node_red("the pause's result and p0 paused", |f| {
        let ok = result_of(f, &pause_id).is_some_and(|r| r["status"] == "ok");
        let shown = printer(f, "p0").is_some_and(|p| p["phase"] == "paused");
        (ok && shown).then_some(())
    })
    .await;
    rig.step(&format!(
        "pause {pause_id} from Node-RED: gateway paused at line {paused_line}, result ok"
    ));

    // 5. Resume: printing again, and the print moves on.
    rig.press("resume printer").await;
    let resume_id = rig
        .until_node_red("the resume command sent", |f| sent_command(f, "resume"))
        .await;
    rig.until("p0 printing again past the pause", || {
        rig.last_state("p0").filter(|s| {
            s.phase == PrinterPhase::Printing
                && s.last_command
                    .as_ref()
                    .is_some_and(|c| c.id.as_str() == resume_id)
                && s.job.as_ref().is_some_and(|j| j.line > paused_line)
        })
    })
    .await;
    rig.until_node_red("the resume's result", |f| {
        result_of(f, &resume_id)
            .filter(|r| r["status"] == "ok")
            .map(drop)
    })
    .await;
    rig.step(&format!(
        "resume {resume_id} from Node-RED: p0 printing again"
    ));

    // 6. Cancel from the flow: the job ends, and the flow's "notify me when a print ends"
    // recipe reports it from the job_ended event.
    rig.press("cancel printer").await;
    let cancel_id = rig
        .until_node_red("the cancel command sent", |f| sent_command(f, "cancel"))
        .await;
    rig.until("p0's job cancelled by the flow's command", || {
        rig.last_state("p0").filter(|s| {
            s.phase == PrinterPhase::Finished
                && s.last_command
                    .as_ref()
                    .is_some_and(|c| c.id.as_str() == cancel_id)
                && s.job.as_ref().is_some_and(|j| {
                    j.job_id.as_str() == job && j.stage == protocol::state::JobStage::Cancelled
                })
        })
    })
    .await;
    rig.until_node_red("the notification of the job's end", |f| {
        f["ended"]
            .as_array()?
            .iter()
            .find(|e| e["job_id"] == job.as_str() && e["printer"] == "p0")
            .map(|e| assert_eq!(e["outcome"], "cancelled", "{e}"))
    })
    .await;
    rig.step(&format!(
        "cancel {cancel_id} from Node-RED: job ended, the flow notified it"
    ));

    // Nothing the flow sent to a printer was retained (a retained command would run again on
    // every reconnect): a new subscriber gets no command.
    let mut probe = TestClient::connect(rig.broker.port(), "node-red-test-probe")
        .await
        .expect("probe connects");
    probe
        .subscribe(&format!("{ROOT}/printers/+/cmd"), QoS::AtLeastOnce)
        .await
        .expect("probe subscribes");
    probe
        .expect_no_message(Duration::from_secs(1), "commands are never retained")
        .await;
    rig.step("no retained command on the broker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Node-RED: run scripts/peer-node-red.sh"]
async fn node_red_flow_on_mosquitto() {
    flow_against_a_real_fleet(Kind::Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Node-RED: run scripts/peer-node-red.sh"]
async fn node_red_flow_on_rumqttd() {
    flow_against_a_real_fleet(Kind::Rumqttd).await;
}
