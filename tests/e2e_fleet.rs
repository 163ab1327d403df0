//! The whole loop with real processes (issue #4): simulated Marlin printers on pseudo-terminals
//! (in the test process), one `printloop-gateway` child process per printer, the `printloop
//! supervisor` as a child process, and a broker the test controls — `printloop broker` (rumqttd,
//! which forgets everything when it restarts) or a real Mosquitto. The test plays the operator
//! with the real CLI (`printloop jobs add`, `jobs list --json`, `printers --json`, `bed-clear`)
//! and watches the topic tree with its own MQTT client.
//!
//! Every scenario runs on both brokers, every wait is bounded, and every scenario asserts the
//! invariants of design §5: a job is never on two printers, never started twice, never lost.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use printer_sim::{SimConfig, SimHandle, Simulator};
use protocol::api::{JobState, JobSummary, PrinterSummary, QueueSnapshot};
use protocol::command::{
    Command as PrinterCommand, CommandAction, CommandErrorCode, CommandResult, ResultStatus,
};
use protocol::presence::{Presence, Status};
use protocol::state::{Event, EventKind, JobStage, PrinterPhase, StateSnapshot};
use protocol::{JobId, Payload};
use rumqttc::QoS;
use testkit::{BrokerProcess, MosquittoGuard, TestClient};

use testkit::proxy::{LinkMode, Proxy};

/// The longest any one condition may take to come true.
const WAIT: Duration = Duration::from_secs(60);
/// How often the recorded topic tree is checked.
const POLL: Duration = Duration::from_millis(100);
/// How often the operator's CLI asks the supervisor (each is a process and an MQTT session:
/// not too often on 2 cores, where the simulated printers run 20× faster than real time).
const CLI_POLL: Duration = Duration::from_millis(500);
const ROOT: &str = "printloop/v1";

/// Supervisor timing for tests: re-send a silent start after 2 s, flag a silent printer's job
/// after 30 s (never reached in a passing run).
/// The gateways' `--time-scale`: their real serial timeouts (10 s per answer, probed twice),
/// not scaled to the simulators' speed. On the shared 2-core test host the whole VM has been
/// seen to freeze for 15–20 s (every process at once: both brokers dropped their clients in
/// the same millisecond); a gateway whose timeouts are divided by the speed then wakes up,
/// finds its deadline past before it reads the printer's pending answer, and interrupts a
/// healthy print. That is the host, not the loop under test.
const GATEWAY_TIME_SCALE: f64 = 1.0;

const SUPERVISOR_TOML: &str = "[timing]\ncommand_retry_s = 2\nstep_timeout_s = 30\n";

fn gcode_path(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/gcode")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing (../shared must sit beside the repo)",
        path.display()
    );
    path
}

/// Lines the printer executes for a file (comments and blank lines are not sent).
fn gcode_lines(path: &Path) -> u64 {
    let text = std::fs::read(path).expect("read gcode");
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| protocol::marlin::strip_comment(l).is_some())
        .count() as u64
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rumqttd,
    Mosquitto,
    /// Mosquitto secured as an operator does it (`printloop printers add`, `printloop clients
    /// mosquitto`, `scripts/farm-ca.sh`): no anonymous client, the generated password file and
    /// ACL, and the gateways and the supervisor on `mqtts://` with the farm's CA.
    MosquittoTls,
}

/// A broker the test can kill and start again on the same port.
enum Broker {
    /// `printloop broker` from the shipped broker.toml: it keeps nothing across a restart.
    Rumqttd(BrokerProcess),
    /// Mosquitto with persistence off: it keeps nothing either.
    Mosquitto(MosquittoGuard),
    /// Mosquitto with the farm's files and a TLS listener (persistence off).
    Secure(Box<testkit::SecureFarm>),
}

impl Broker {
    fn start(kind: Kind, printers: usize) -> Self {
        match kind {
            Kind::Rumqttd => Broker::Rumqttd(
                BrokerProcess::start(
                    env!("CARGO_BIN_EXE_printloop"),
                    testkit::shipped_broker_toml(),
                )
                .expect("printloop broker starts"),
            ),
            Kind::Mosquitto => {
                Broker::Mosquitto(testkit::Mosquitto::start().expect("mosquitto starts"))
            }
            Kind::MosquittoTls => Broker::Secure(Box::new(
                testkit::SecureFarm::start(
                    Path::new(env!("CARGO_BIN_EXE_printloop")),
                    &testkit::SecureFarmSpec {
                        printers: (0..printers).map(|i| format!("p{i}")).collect(),
                        clients: vec![
                            ("sup".into(), "supervisor".into()),
                            ("operator".into(), "operator".into()),
                        ],
                    },
                )
                .expect("the secured Mosquitto starts"),
            )),
        }
    }

    fn port(&self) -> u16 {
        match self {
            Broker::Rumqttd(b) => b.v4_port(),
            Broker::Mosquitto(m) => m.port(),
            Broker::Secure(f) => f.mosquitto.port(),
        }
    }

    fn kill(&mut self) {
        match self {
            Broker::Rumqttd(b) => b.kill(),
            Broker::Mosquitto(m) => m.kill(),
            Broker::Secure(f) => f.mosquitto.kill(),
        }
    }

    fn start_again(&mut self) {
        match self {
            Broker::Rumqttd(b) => b.start_again().expect("broker starts again"),
            Broker::Mosquitto(m) => m.start_again().expect("mosquitto starts again"),
            Broker::Secure(f) => f.mosquitto.start_again().expect("mosquitto starts again"),
        }
    }

    /// The secured farm, if this is one.
    fn secure(&self) -> Option<&testkit::SecureFarm> {
        match self {
            Broker::Secure(f) => Some(f),
            _ => None,
        }
    }

    /// (user, password) for `user` on a secured broker.
    fn login(&self, user: &str) -> Option<(String, String)> {
        self.secure()
            .map(|f| (user.to_owned(), f.password(user).to_owned()))
    }
}

/// One message seen on the topic tree.
#[derive(Debug, Clone)]
struct Seen {
    topic: String,
    payload: Vec<u8>,
}

type Record = Arc<Mutex<Vec<Seen>>>;

/// Subscribes to everything but file chunks and forwards what arrives into `record` until the
/// connection ends (a broker restart): then [`Fleet::reconnect_recorder`] starts a new one.
async fn start_recorder(
    port: u16,
    name: &str,
    record: Record,
    login: Option<(String, String)>,
) -> tokio::task::JoinHandle<()> {
    let mut options = testkit::mqtt_options(name, port);
    if let Some((user, password)) = login {
        options.set_credentials(user, password);
    }
    let mut client = TestClient::connect_with(options)
        .await
        .expect("recorder connects");
    for filter in [
        format!("{ROOT}/printers/+/+"),
        format!("{ROOT}/printers/+/cmd/result"),
        format!("{ROOT}/supervisor/status"),
        format!("{ROOT}/queue"),
    ] {
        client
            .subscribe(&filter, QoS::AtLeastOnce)
            .await
            .expect("recorder subscribes");
    }
    tokio::spawn(async move {
        while let Some(p) = client.recv(Duration::from_secs(3600)).await {
            record.lock().expect("record").push(Seen {
                topic: p.topic,
                payload: p.payload.to_vec(),
            });
        }
    })
}

/// Everything one scenario runs: broker, printers, gateways, supervisor, recorder.
struct Fleet {
    kind: Kind,
    broker: Broker,
    dir: tempfile::TempDir,
    sims: Vec<SimHandle>,
    speed: f64,
    gateways: Vec<Option<Child>>,
    supervisor: Option<Child>,
    record: Record,
    recorder: tokio::task::JoinHandle<()>,
    recorders: u32,
    /// (printer, job on it, phase) the operator has cleared, and when.
    cleared: HashMap<(String, Option<String>, PrinterPhase), Instant>,
}

impl Fleet {
    /// Broker, recorder and `printers` simulated printers (no processes yet).
    async fn new(kind: Kind, printers: usize, speed: f64) -> Self {
        let broker = Broker::start(kind, printers);
        let dir = tempfile::tempdir().expect("tempdir");
        let sims = (0..printers)
            .map(|i| {
                Simulator::start(
                    SimConfig {
                        speed,
                        motion_speed: Some(20_000.0),
                        advanced_ok: true,
                        seed: 7 + i as u64,
                        ..SimConfig::default()
                    },
                    Some(&dir.path().join(format!("printer{i}"))),
                )
                .expect("simulator starts")
            })
            .collect();
        let record = Record::default();
        let recorder = start_recorder(
            broker.port(),
            "e2e-recorder-0",
            record.clone(),
            broker.login("sup"),
        )
        .await;
        Fleet {
            kind,
            broker,
            dir,
            sims,
            speed,
            gateways: (0..printers).map(|_| None).collect(),
            supervisor: None,
            record,
            recorder,
            recorders: 0,
            cleared: HashMap::new(),
        }
    }

    /// The whole fleet on `kind`: every gateway and the supervisor connected and reporting.
    async fn start(kind: Kind, printers: usize, speed: f64) -> Self {
        let mut fleet = Self::new(kind, printers, speed).await;
        for i in 0..printers {
            let port = fleet.broker.port();
            fleet.spawn_gateway(i, port);
        }
        fleet.spawn_supervisor();
        fleet.await_fleet_up().await;
        fleet
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.broker.port())
    }

    fn log_file(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(name))
            .expect("log file")
    }

    fn spawn_gateway(&mut self, i: usize, port: u16) {
        let mut command = Command::new(testkit::gateway_binary());
        match self.broker.secure() {
            // The config `printloop printers add` wrote (mqtts:// URL, user, password); the CA
            // is in the test's temp dir instead of /etc/printloop.
            Some(farm) => command
                .arg("--config")
                .arg(&farm.gateway_configs[&format!("p{i}")])
                .arg("--ca-file")
                .arg(&farm.ca),
            None => command
                .arg("--broker")
                .arg(format!("mqtt://127.0.0.1:{port}")),
        };
        let child = command
            .args([
                "--id",
                &format!("p{i}"),
                "--heartbeat",
                "1",
                "--keepalive",
                "2",
            ])
            .arg("--serial")
            .arg(self.sims[i].path())
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("gw{i}")))
            .arg("--time-scale")
            .arg(GATEWAY_TIME_SCALE.min(self.speed).to_string())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(self.log_file(&format!("gw{i}.log")))
            .spawn()
            .expect("gateway starts");
        self.gateways[i] = Some(child);
    }

    fn spawn_supervisor(&mut self) {
        let config = self.dir.path().join("supervisor.toml");
        std::fs::write(&config, SUPERVISOR_TOML).expect("write supervisor config");
        let mut command = Command::new(env!("CARGO_BIN_EXE_printloop"));
        command.arg("supervisor");
        match self.broker.secure() {
            Some(farm) => command
                .arg("--broker")
                .arg(format!("mqtts://localhost:{}", farm.tls_port))
                .arg("--ca-file")
                .arg(&farm.ca)
                .args(["--username", "sup"])
                .env("PRINTLOOP_MQTT_PASSWORD", farm.password("sup")),
            None => command.arg("--broker").arg(self.url()),
        };
        let child = command
            .arg("--data-dir")
            .arg(self.dir.path().join("sup"))
            .arg("--config")
            .arg(&config)
            .args(["--metrics", "off", "--http", "off"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(self.log_file("supervisor.log"))
            .spawn()
            .expect("supervisor starts");
        self.supervisor = Some(child);
    }

    /// SIGKILL: no goodbye, only the will.
    fn kill_supervisor(&mut self) {
        if let Some(mut c) = self.supervisor.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn reconnect_recorder(&mut self) {
        self.recorder.abort();
        self.recorders += 1;
        let name = format!("e2e-recorder-{}", self.recorders);
        let deadline = Instant::now() + WAIT;
        loop {
            let mut options = testkit::mqtt_options("e2e-probe", self.broker.port());
            if let Some((user, password)) = self.broker.login("sup") {
                options.set_credentials(user, password);
            }
            match TestClient::connect_with(options).await {
                Ok(c) => {
                    let _ = c.disconnect().await;
                    break;
                }
                Err(e) if Instant::now() > deadline => panic!("broker unreachable: {e}"),
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
        self.recorder = start_recorder(
            self.broker.port(),
            &name,
            self.record.clone(),
            self.broker.login("sup"),
        )
        .await;
    }

    fn logs(&self) -> String {
        let mut s = format!("--- broker: {:?}; supervisor log (tail) ---\n", self.kind);
        s += &tail(&self.dir.path().join("supervisor.log"), 60);
        for i in 0..self.gateways.len() {
            s += &format!("\n--- gateway p{i} log (tail) ---\n");
            s += &tail(&self.dir.path().join(format!("gw{i}.log")), 40);
        }
        s
    }

    // ----- the recorded topic tree -----

    fn seen(&self, suffix: &str) -> Vec<Seen> {
        self.record
            .lock()
            .expect("record")
            .iter()
            .filter(|m| m.topic.ends_with(suffix))
            .cloned()
            .collect()
    }

    /// Printer `p`'s events, de-duplicated on (epoch, seq) (QoS 1 and the outbox may re-send).
    fn events(&self, p: &str) -> Vec<Event> {
        let mut seen = HashSet::new();
        self.seen(&format!("/printers/{p}/events"))
            .iter()
            .filter_map(|m| Event::decode(&m.payload).ok())
            .filter(|e| seen.insert((e.epoch, e.seq)))
            .collect()
    }

    fn states(&self, p: &str) -> Vec<StateSnapshot> {
        self.seen(&format!("/printers/{p}/state"))
            .iter()
            .filter_map(|m| StateSnapshot::decode(&m.payload).ok())
            .collect()
    }

    fn statuses(&self, suffix: &str) -> Vec<Status> {
        self.seen(suffix)
            .iter()
            .filter_map(|m| Status::decode(&m.payload).ok())
            .collect()
    }

    /// Commands published to printer `p` (by anyone), in order.
    fn commands(&self, p: &str) -> Vec<PrinterCommand> {
        self.seen(&format!("/printers/{p}/cmd"))
            .iter()
            .filter_map(|m| PrinterCommand::decode(&m.payload).ok())
            .collect()
    }

    fn results(&self, p: &str) -> Vec<CommandResult> {
        self.seen(&format!("/printers/{p}/cmd/result"))
            .iter()
            .filter_map(|m| CommandResult::decode(&m.payload).ok())
            .collect()
    }

    /// Every distinct `job_started` event of every printer: job id → printers that started it.
    fn starts(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for i in 0..self.gateways.len() {
            let p = format!("p{i}");
            for e in self.events(&p) {
                if let EventKind::JobStarted { job_id } = e.event {
                    out.entry(job_id.as_str().to_owned())
                        .or_default()
                        .push(p.clone());
                }
            }
        }
        out
    }

    /// `start_job` commands for `job` sent to `p`.
    fn start_commands(&self, p: &str, job: &str) -> Vec<PrinterCommand> {
        self.commands(p)
            .into_iter()
            .filter(|c| matches!(&c.action, CommandAction::StartJob(s) if s.job_id.as_str() == job))
            .collect()
    }

    /// Waits until `f` holds for the recorded topic tree.
    async fn until_seen(&self, what: &str, f: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !f(self) {
            if Instant::now() > deadline {
                panic!(
                    "timed out after {WAIT:?} waiting for {what}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The last `status` retained for printer `p` or the supervisor, as seen so far.
    fn last_status(&self, suffix: &str) -> Option<Status> {
        self.statuses(suffix).pop()
    }

    /// The supervisor's last retained queue snapshot (its open jobs: `done` ones leave it).
    fn queue(&self) -> Option<QueueSnapshot> {
        self.seen(&format!("{ROOT}/queue"))
            .iter()
            .rev()
            .find_map(|m| QueueSnapshot::decode(&m.payload).ok())
    }

    /// Where job `id` stands in the last queue snapshot; `Done` once it was listed and left.
    fn queued_state(&self, id: &str) -> Option<JobState> {
        let q = self.queue()?;
        match q.jobs.iter().find(|j| j.job_id.as_str() == id) {
            Some(j) => Some(j.state),
            None => {
                let listed = self
                    .seen(&format!("{ROOT}/queue"))
                    .iter()
                    .filter_map(|m| QueueSnapshot::decode(&m.payload).ok())
                    .any(|q| q.jobs.iter().any(|j| j.job_id.as_str() == id));
                (listed && !q.truncated).then_some(JobState::Done)
            }
        }
    }

    fn all_queued_in(&self, ids: &[String], state: JobState) -> bool {
        ids.iter().all(|id| self.queued_state(id) == Some(state))
    }

    // ----- the operator's CLI -----

    async fn cli(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_printloop"));
        cmd.args(args)
            .arg("--broker")
            .arg(self.url())
            .args(["--timeout", "10"])
            .env("NO_COLOR", "1")
            .kill_on_drop(true);
        if let Some((user, password)) = self.broker.login("operator") {
            cmd.args(["--username", &user])
                .env("PRINTLOOP_MQTT_PASSWORD", password);
        }
        let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
            .await
            .map_err(|_| format!("printloop {args:?} did not finish in 30 s"))?
            .map_err(|e| format!("printloop {args:?}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "printloop {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    async fn cli_ok(&self, args: &[&str]) -> String {
        match self.cli(args).await {
            Ok(s) => s,
            Err(e) => panic!("{e}\n{}", self.logs()),
        }
    }

    /// `printloop jobs add FILE --copies N`: the new job ids.
    async fn add_jobs(&self, file: &Path, copies: u32) -> Vec<String> {
        let out = self
            .cli_ok(&[
                "jobs",
                "add",
                file.to_str().expect("utf-8 path"),
                "--copies",
                &copies.to_string(),
            ])
            .await;
        let ids: Vec<String> = out.lines().map(|l| l.trim().to_owned()).collect();
        assert_eq!(ids.len(), copies as usize, "job ids printed: {out:?}");
        for id in &ids {
            JobId::new(id.clone()).expect("a job id");
        }
        ids
    }

    /// `printloop jobs list --all --json`.
    async fn jobs(&self) -> Vec<JobSummary> {
        self.cli_ok(&["jobs", "list", "--all", "--json"])
            .await
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// `printloop printers --json`.
    async fn printers(&self) -> Vec<PrinterSummary> {
        self.cli_ok(&["printers", "--json"])
            .await
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    async fn job(&self, id: &str) -> JobSummary {
        self.jobs()
            .await
            .into_iter()
            .find(|j| j.job_id.as_str() == id)
            .unwrap_or_else(|| panic!("job {id} is lost: the supervisor does not list it"))
    }

    /// Waits (on the retained queue) until job `id` is `state`, then confirms it with
    /// `printloop jobs list --json`.
    async fn until_job(&self, id: &str, state: JobState) -> JobSummary {
        self.until_seen(&format!("job {id} {state:?} in the queue snapshot"), |f| {
            f.queued_state(id) == Some(state)
        })
        .await;
        let j = self.job(id).await;
        assert_eq!(
            j.state, state,
            "the CLI agrees with the queue snapshot: {j:?}"
        );
        j
    }

    /// Polls `printers` until `f` holds.
    async fn until_printers(
        &self,
        what: &str,
        f: impl Fn(&[PrinterSummary]) -> bool,
    ) -> Vec<PrinterSummary> {
        let deadline = Instant::now() + WAIT;
        loop {
            let printers = self.printers().await;
            if f(&printers) {
                return printers;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {WAIT:?} waiting for {what}; printers: {printers:#?}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(CLI_POLL).await;
        }
    }

    /// Every printer online and reporting to the supervisor, and the supervisor online.
    async fn await_fleet_up(&self) {
        // Its birth follows its subscriptions: from now on operator requests reach it.
        self.until_seen("the supervisor online", |f| {
            f.last_status("/supervisor/status")
                .is_some_and(|s| s.presence == Presence::Online)
        })
        .await;
        let n = self.gateways.len();
        self.until_printers("every printer online and connected to its printer", |ps| {
            ps.len() == n
                && ps.iter().all(|p| {
                    p.presence == Presence::Online
                        && !p.stale
                        && p.phase != PrinterPhase::Disconnected
                })
        })
        .await;
    }

    /// `printloop bed-clear P`. A job's `job_ended` event can reach the supervisor a moment
    /// before the printer's `state` with the new phase; until then it refuses ("it is not
    /// done"), and the operator tries again.
    async fn bed_clear(&self, p: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.cli(&["bed-clear", p]).await {
                Ok(out) => {
                    assert!(out.contains("bed marked clear"), "{out}");
                    return;
                }
                Err(e) if e.contains("(printer_not_done)") && Instant::now() < deadline => {
                    tokio::time::sleep(POLL).await;
                }
                Err(e) => panic!("{e}\n{}", self.logs()),
            }
        }
    }

    /// One round of the operator: clears the bed of every idle or finished printer, as the
    /// printers report it (once per printer, job and phase; again after 10 s if nothing changed;
    /// a refusal because the supervisor has not heard of the end yet is tried again).
    async fn operate(&mut self) {
        for i in 0..self.gateways.len() {
            let p = format!("p{i}");
            let Some(st) = self.states(&p).pop() else {
                continue;
            };
            if !matches!(st.phase, PrinterPhase::Idle | PrinterPhase::Finished)
                || self
                    .last_status(&format!("/printers/{p}/status"))
                    .is_none_or(|s| s.presence != Presence::Online)
            {
                continue;
            }
            let key = (
                p.clone(),
                st.job.as_ref().map(|j| j.job_id.as_str().to_owned()),
                st.phase,
            );
            if self
                .cleared
                .get(&key)
                .is_some_and(|at| at.elapsed() < Duration::from_secs(10))
            {
                continue;
            }
            match self.cli(&["bed-clear", &p]).await {
                Ok(_) => {
                    self.cleared.insert(key, Instant::now());
                }
                Err(e) => eprintln!("operator: {e} (tried again)"),
            }
        }
    }

    /// Plays the operator until `f` holds for the recorded topic tree.
    async fn operate_until(&mut self, what: &str, f: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + WAIT * 2;
        loop {
            self.operate().await;
            if f(self) {
                return;
            }
            if Instant::now() > deadline {
                let last: Vec<_> = (0..self.gateways.len())
                    .map(|i| {
                        let p = format!("p{i}");
                        (
                            self.states(&p).pop().map(|s| (s.epoch, s.seq, s.phase)),
                            self.last_status(&format!("/printers/{p}/status")),
                        )
                    })
                    .collect();
                panic!(
                    "timed out waiting for {what}; queue: {:#?}\nlast printer states: {last:?}\n{}",
                    self.queue(),
                    self.logs()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until printer `i`'s firmware has executed at least `n` commands.
    async fn until_executed(&self, i: usize, n: u64) {
        let mut stats = self.sims[i].watch_stats();
        let r =
            tokio::time::timeout(WAIT, stats.wait_for(|s| s.firmware.commands_executed >= n)).await;
        assert!(
            matches!(r, Ok(Ok(_))),
            "printer {i} did not execute {n} commands within {WAIT:?}\n{}",
            self.logs()
        );
    }

    /// The invariant of every scenario: each job id started exactly once, on one printer.
    fn assert_each_job_started_once(&self, jobs: &[String]) {
        let starts = self.starts();
        for j in jobs {
            assert_eq!(
                starts.get(j).map(Vec::len),
                Some(1),
                "job {j} must start exactly once on exactly one printer; job_started: {starts:?}\n{}",
                self.logs()
            );
        }
        assert!(
            starts.keys().all(|k| jobs.contains(k)),
            "only the submitted jobs ran: {starts:?}"
        );
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.recorder.abort();
        self.kill_supervisor();
        for g in self.gateways.iter_mut() {
            if let Some(mut c) = g.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn by_id<'a>(jobs: &'a [JobSummary], id: &str) -> Option<&'a JobSummary> {
    jobs.iter().find(|j| j.job_id.as_str() == id)
}

fn all_in(jobs: &[JobSummary], ids: &[String], state: JobState) -> bool {
    ids.iter()
        .all(|id| by_id(jobs, id).is_some_and(|j| j.state == state))
}

// ----- 1. nominal -----

async fn nominal(kind: Kind) {
    let mut fleet = Fleet::start(kind, 2, 10.0).await;
    let file = gcode_path("cube20.gcode");
    let total = gcode_lines(&file);
    let ids = fleet.add_jobs(&file, 3).await;
    fleet
        .operate_until("all 3 jobs done", |f| f.all_queued_in(&ids, JobState::Done))
        .await;
    let jobs = fleet.jobs().await;
    assert!(all_in(&jobs, &ids, JobState::Done), "{jobs:#?}");
    fleet.assert_each_job_started_once(&ids);
    // Each job on exactly one printer, and the printer the supervisor recorded is the one that
    // started it.
    let starts = fleet.starts();
    let mut per_printer: HashMap<String, u64> = HashMap::new();
    for id in &ids {
        let j = by_id(&jobs, id).expect("listed");
        let started_on = &starts[id][0];
        assert_eq!(
            j.printer_id.as_ref().map(|p| p.as_str()),
            Some(started_on.as_str()),
            "{j:?}"
        );
        assert!(
            j.started_at_ms.is_some() && j.ended_at_ms.is_some(),
            "{j:?}"
        );
        *per_printer.entry(started_on.clone()).or_default() += 1;
    }
    // Every line of every print reached a printer's firmware.
    for (i, sim) in fleet.sims.iter().enumerate() {
        let ran = per_printer.get(&format!("p{i}")).copied().unwrap_or(0);
        let executed = sim.stats().firmware.commands_executed;
        assert!(
            executed >= ran * total,
            "p{i} ran {ran} jobs but executed only {executed} commands"
        );
    }
    // Every job ended `finished` on its printer, as the gateways reported.
    for i in 0..2 {
        for e in fleet.events(&format!("p{i}")) {
            if let EventKind::JobEnded { outcome, .. } = e.event {
                assert_eq!(outcome, JobStage::Finished, "{e:?}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nominal_on_rumqttd() {
    nominal(Kind::Rumqttd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nominal_on_mosquitto() {
    nominal(Kind::Mosquitto).await;
}

/// The whole loop on a secured farm: every process logs in with the credentials enrolment made,
/// Mosquitto enforces the generated ACL, and the gateways and the supervisor talk TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nominal_over_tls_with_the_generated_acl() {
    nominal(Kind::MosquittoTls).await;
}

// ----- 2. deferred start -----

async fn deferred_start(kind: Kind) {
    let fleet = Fleet::start(kind, 1, 10.0).await;
    fleet
        .until_printers("p0 idle (bed not cleared)", |ps| {
            ps.iter().any(|p| p.phase == PrinterPhase::Idle)
        })
        .await;
    let file = gcode_path("cube20.gcode");
    let id = fleet.add_jobs(&file, 1).await.remove(0);
    let j = fleet.until_job(&id, JobState::Assigned).await;
    assert_eq!(j.printer_id.as_ref().map(|p| p.as_str()), Some("p0"));
    // Longer than the supervisor's start retry (2 s): it must not push a start at a printer
    // whose bed nobody cleared. This is a window in which nothing may happen, not a sync.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        fleet.start_commands("p0", &id).is_empty(),
        "no start_job while the bed is not clear: {:?}",
        fleet.commands("p0")
    );
    assert_eq!(fleet.job(&id).await.state, JobState::Assigned);
    assert!(fleet.starts().is_empty());

    fleet.bed_clear("p0").await;
    fleet.until_job(&id, JobState::Finished).await;
    let starts = fleet.start_commands("p0", &id);
    assert!(!starts.is_empty());
    let results = fleet.results("p0");
    let accepted = starts
        .iter()
        .filter(|c| {
            results
                .iter()
                .any(|r| r.id == c.id && r.status == ResultStatus::Ok)
        })
        .count();
    assert_eq!(accepted, 1, "one start accepted: {starts:?} {results:?}");
    fleet.bed_clear("p0").await;
    fleet.until_job(&id, JobState::Done).await;
    fleet.assert_each_job_started_once(std::slice::from_ref(&id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_start_on_rumqttd() {
    deferred_start(Kind::Rumqttd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_start_on_mosquitto() {
    deferred_start(Kind::Mosquitto).await;
}

// ----- 3. supervisor kill -9 mid-print -----

/// Every start of `job` other than the one accepted was answered `duplicate` or refused as
/// already accepted or already run: the printer never executed a second start.
fn assert_single_accepted_start(fleet: &Fleet, p: &str, job: &str) {
    let starts = fleet.start_commands(p, job);
    let results = fleet.results(p);
    let mut ok = 0;
    for c in &starts {
        let r: Vec<&CommandResult> = results.iter().filter(|r| r.id == c.id).collect();
        for r in r {
            match r.status {
                ResultStatus::Ok => ok += 1,
                // Nothing happened on the printer (busy: over the rate, sent again later).
                ResultStatus::Duplicate | ResultStatus::Busy => {}
                ResultStatus::Error | ResultStatus::Expired => assert!(
                    matches!(
                        r.code,
                        Some(CommandErrorCode::AlreadyAccepted | CommandErrorCode::AlreadyRan)
                    ) || r.status == ResultStatus::Expired,
                    "a re-sent start is refused because the job is already there: {r:?}"
                ),
            }
        }
    }
    assert_eq!(
        ok,
        1,
        "exactly one start of {job} accepted: {starts:?} {results:?}\n{}",
        fleet.logs()
    );
}

async fn supervisor_kill_9(kind: Kind) {
    let mut fleet = Fleet::start(kind, 1, 10.0).await;
    let file = gcode_path("cube20.gcode");
    let total = gcode_lines(&file);
    let id = fleet.add_jobs(&file, 1).await.remove(0);
    fleet
        .operate_until("the job printing", |f| {
            f.queued_state(&id) == Some(JobState::Printing)
        })
        .await;
    fleet
        .until_seen("p0 printing past line 500", |f| {
            f.states("p0").iter().any(|s| {
                s.phase == PrinterPhase::Printing && s.job.as_ref().is_some_and(|j| j.line > 500)
            })
        })
        .await;
    let before = fleet
        .last_status("/supervisor/status")
        .expect("supervisor status seen");
    assert_eq!(before.presence, Presence::Online);
    fleet.kill_supervisor();
    fleet
        .until_seen("the supervisor's will (offline, same epoch)", |f| {
            f.last_status("/supervisor/status")
                .is_some_and(|s| s.presence == Presence::Offline && s.epoch == before.epoch)
        })
        .await;
    let still_printing = fleet.sims[0].stats().firmware.commands_executed < total;
    fleet.spawn_supervisor();
    fleet
        .until_seen("the supervisor back online with a new epoch", |f| {
            f.last_status("/supervisor/status")
                .is_some_and(|s| s.presence == Presence::Online && s.epoch > before.epoch)
        })
        .await;
    let j = fleet.until_job(&id, JobState::Finished).await;
    assert_eq!(j.printer_id.as_ref().map(|p| p.as_str()), Some("p0"));
    assert!(still_printing, "the supervisor was killed mid-print");
    fleet.assert_each_job_started_once(std::slice::from_ref(&id));
    assert_single_accepted_start(&fleet, "p0", &id);
    let executed = fleet.sims[0].stats().firmware.commands_executed;
    assert!(
        executed >= total && executed < total + total / 2,
        "one print's worth of commands: {executed} for {total} lines"
    );
    // The restarted supervisor drives the loop on: harvest, done.
    fleet.bed_clear("p0").await;
    fleet.until_job(&id, JobState::Done).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisor_kill_9_mid_print_on_rumqttd() {
    supervisor_kill_9(Kind::Rumqttd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisor_kill_9_mid_print_on_mosquitto() {
    supervisor_kill_9(Kind::Mosquitto).await;
}

// ----- 4. broker restart mid-print -----

async fn broker_restart(kind: Kind) {
    let mut fleet = Fleet::start(kind, 2, 10.0).await;
    let file = gcode_path("cube20.gcode");
    let total = gcode_lines(&file);
    let ids = fleet.add_jobs(&file, 3).await;
    let printing_now = |jobs: &[JobSummary]| {
        jobs.iter()
            .filter(|j| j.state == JobState::Printing)
            .count()
    };
    fleet
        .operate_until("two jobs printing", |f| {
            f.queue().is_some_and(|q| printing_now(&q.jobs) == 2)
        })
        .await;
    fleet
        .until_seen("both printers past line 300", |f| {
            (0..2).all(|i| {
                f.states(&format!("p{i}")).iter().any(|s| {
                    s.phase == PrinterPhase::Printing
                        && s.job.as_ref().is_some_and(|j| j.line > 300)
                })
            })
        })
        .await;
    let sup_before = fleet.last_status("/supervisor/status").expect("seen");
    let gw_before: Vec<u64> = (0..2)
        .map(|i| {
            fleet
                .last_status(&format!("/printers/p{i}/status"))
                .expect("seen")
                .epoch
        })
        .collect();
    let printed_before: Vec<u64> = fleet
        .sims
        .iter()
        .map(|s| s.stats().firmware.commands_executed)
        .collect();

    fleet.broker.kill();
    // The outage: the printers keep printing without the broker.
    for (i, before) in printed_before.iter().enumerate() {
        fleet.until_executed(i, before + 200).await;
    }
    fleet.broker.start_again();
    fleet.reconnect_recorder().await;

    fleet
        .until_seen("everyone reconnected with new epochs", |f| {
            f.last_status("/supervisor/status")
                .is_some_and(|s| s.presence == Presence::Online && s.epoch > sup_before.epoch)
                && (0..2).all(|i| {
                    f.last_status(&format!("/printers/p{i}/status"))
                        .is_some_and(|s| s.presence == Presence::Online && s.epoch > gw_before[i])
                })
        })
        .await;
    // The retained state comes back (rumqttd and this Mosquitto forgot it).
    fleet
        .until_seen("fresh retained state from both printers", |f| {
            (0..2).all(|i| {
                f.states(&format!("p{i}"))
                    .last()
                    .is_some_and(|s| s.epoch > gw_before[i])
            })
        })
        .await;
    fleet
        .operate_until("all 3 jobs done after the broker restart", |f| {
            f.all_queued_in(&ids, JobState::Done)
        })
        .await;
    let jobs = fleet.jobs().await;
    assert!(all_in(&jobs, &ids, JobState::Done), "{jobs:#?}");
    fleet.assert_each_job_started_once(&ids);
    let starts = fleet.starts();
    for id in &ids {
        let j = by_id(&jobs, id).expect("listed");
        assert_eq!(
            j.printer_id.as_ref().map(|p| p.as_str()),
            Some(starts[id][0].as_str())
        );
    }
    let executed: u64 = fleet
        .sims
        .iter()
        .map(|s| s.stats().firmware.commands_executed)
        .sum();
    assert!(
        executed >= 3 * total && executed < 4 * total,
        "three prints' worth of commands: {executed} for 3 × {total} lines"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_print_on_rumqttd() {
    broker_restart(Kind::Rumqttd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_print_on_mosquitto() {
    broker_restart(Kind::Mosquitto).await;
}

// ----- 5. a print that ends while its gateway is cut off -----

async fn finished_while_cut_off(kind: Kind) {
    let mut fleet = Fleet::new(kind, 1, 10.0).await;
    let proxy = Proxy::start(fleet.broker.port())
        .await
        .expect("proxy starts");
    fleet.spawn_gateway(0, proxy.port());
    fleet.spawn_supervisor();
    fleet.await_fleet_up().await;
    let file = gcode_path("cube20.gcode");
    let total = gcode_lines(&file);
    let id = fleet.add_jobs(&file, 1).await.remove(0);
    fleet
        .operate_until("the job printing", |f| {
            f.queued_state(&id) == Some(JobState::Printing)
        })
        .await;
    fleet
        .until_seen("p0 printing past line 300", |f| {
            f.states("p0").iter().any(|s| {
                s.phase == PrinterPhase::Printing && s.job.as_ref().is_some_and(|j| j.line > 300)
            })
        })
        .await;
    let epoch = fleet
        .last_status("/printers/p0/status")
        .expect("seen")
        .epoch;

    proxy.set(LinkMode::Cut);
    fleet
        .until_printers("p0 offline or stale to the supervisor", |ps| {
            ps.iter().any(|p| {
                p.printer_id.as_str() == "p0" && (p.presence == Presence::Offline || p.stale)
            })
        })
        .await;
    fleet.until_executed(0, total).await;
    // The print is over on the printer; the supervisor cannot know, and does not move the job.
    let j = fleet.job(&id).await;
    assert_eq!(
        (j.state, j.printer_id.as_ref().map(|p| p.as_str())),
        (JobState::Printing, Some("p0")),
        "a job on a printer nobody hears from stays where it is"
    );

    proxy.set(LinkMode::Pass);
    let j = fleet.until_job(&id, JobState::Finished).await;
    assert_eq!(j.printer_id.as_ref().map(|p| p.as_str()), Some("p0"));
    fleet
        .until_seen(
            "the job_ended event (from the outbox) after reconnect",
            |f| {
                f.events("p0").iter().any(|e| {
                matches!(&e.event, EventKind::JobEnded { job_id, outcome: JobStage::Finished, .. }
                    if job_id.as_str() == id)
            })
            },
        )
        .await;
    assert!(
        fleet
            .last_status("/printers/p0/status")
            .is_some_and(|s| s.epoch > epoch),
        "the gateway reconnected with a new epoch"
    );
    fleet.assert_each_job_started_once(std::slice::from_ref(&id));
    fleet.bed_clear("p0").await;
    fleet.until_job(&id, JobState::Done).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_while_cut_off_on_rumqttd() {
    finished_while_cut_off(Kind::Rumqttd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_while_cut_off_on_mosquitto() {
    finished_while_cut_off(Kind::Mosquitto).await;
}

// ----- 6. a start command delivered twice -----

async fn start_delivered_twice(kind: Kind) {
    let mut fleet = Fleet::start(kind, 1, 10.0).await;
    let file = gcode_path("cube20.gcode");
    let total = gcode_lines(&file);
    let id = fleet.add_jobs(&file, 1).await.remove(0);
    // The supervisor's own start: accepted.
    fleet.operate().await;
    fleet
        .until_seen("the supervisor's start accepted", |f| {
            f.start_commands("p0", &id).iter().any(|c| {
                f.results("p0")
                    .iter()
                    .any(|r| r.id == c.id && r.status == ResultStatus::Ok)
            })
        })
        .await;
    let original = fleet
        .start_commands("p0", &id)
        .into_iter()
        .find(|c| {
            fleet
                .results("p0")
                .iter()
                .any(|r| r.id == c.id && r.status == ResultStatus::Ok)
        })
        .expect("seen");

    let mut ctl = TestClient::connect(fleet.broker.port(), "e2e-ctl")
        .await
        .expect("controller connects");
    let topic = format!("{ROOT}/printers/p0/cmd");
    // The same command again (a QoS 1 redelivery), twice, then a copy with a new id.
    for _ in 0..2 {
        ctl.publish(&topic, QoS::AtLeastOnce, false, original.encode())
            .await
            .expect("publish");
    }
    let copy = PrinterCommand {
        id: protocol::CommandId::new("e2e-copy-1").expect("id"),
        ..original.clone()
    };
    ctl.publish(&topic, QoS::AtLeastOnce, false, copy.encode())
        .await
        .expect("publish");
    fleet
        .until_seen("answers to the copies", |f| {
            let r = f.results("p0");
            r.iter().filter(|r| r.id == original.id).count() >= 3
                && r.iter().any(|r| r.id == copy.id)
        })
        .await;
    let results = fleet.results("p0");
    let same: Vec<ResultStatus> = results
        .iter()
        .filter(|r| r.id == original.id)
        .map(|r| r.status)
        .collect();
    assert_eq!(
        same,
        vec![
            ResultStatus::Ok,
            ResultStatus::Duplicate,
            ResultStatus::Duplicate
        ]
    );
    let r = results.iter().find(|r| r.id == copy.id).expect("seen");
    assert_eq!(r.status, ResultStatus::Error, "{r:?}");
    assert_eq!(r.code, Some(CommandErrorCode::AlreadyAccepted), "{r:?}");

    fleet.until_job(&id, JobState::Finished).await;
    // After the harvest the printer is ready; a late copy of the start must not run the job
    // again ("a job id that ended never runs again").
    fleet.bed_clear("p0").await;
    fleet.until_job(&id, JobState::Done).await;
    fleet
        .until_seen("p0 ready", |f| {
            f.states("p0")
                .last()
                .is_some_and(|s| s.phase == PrinterPhase::Ready)
        })
        .await;
    let late = PrinterCommand {
        id: protocol::CommandId::new("e2e-copy-2").expect("id"),
        ..original.clone()
    };
    ctl.publish(&topic, QoS::AtLeastOnce, false, late.encode())
        .await
        .expect("publish");
    fleet
        .until_seen("the answer to the late copy", |f| {
            f.results("p0").iter().any(|r| r.id == late.id)
        })
        .await;
    let r = fleet
        .results("p0")
        .into_iter()
        .find(|r| r.id == late.id)
        .expect("seen");
    assert_eq!(r.status, ResultStatus::Error, "{r:?}");
    assert_eq!(r.code, Some(CommandErrorCode::AlreadyRan), "{r:?}");
    fleet.assert_each_job_started_once(std::slice::from_ref(&id));
    let executed = fleet.sims[0].stats().firmware.commands_executed;
    assert!(
        executed >= total && executed < total + total / 2,
        "one print's worth of commands: {executed} for {total} lines"
    );
    let _ = ctl.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_delivered_twice_on_rumqttd() {
    start_delivered_twice(Kind::Rumqttd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_delivered_twice_on_mosquitto() {
    start_delivered_twice(Kind::Mosquitto).await;
}
