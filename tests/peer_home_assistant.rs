//! printloop next to a real Home Assistant (2024.3.3 from PyPI, its MQTT integration pointed at
//! a real Mosquitto): the demo fleet plus one printer run as separate processes, and through
//! Home Assistant's REST API the test checks that every printer's entities exist with live
//! values, that a killed gateway's entities turn `unavailable`, and that pressing the pause
//! button pauses the print.
//!
//! Ignored in plain `cargo test` (it needs Home Assistant installed): run
//! `scripts/peer-home-assistant.sh`, which installs it and runs this with `--ignored`, passing
//! the `hass` path in `PRINTLOOP_HASS`.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const USER: &str = "printloop";
const PASSWORD: &str = "printloop-test-password";
/// The demo's and the extra printer's time scale: a print lasts about two minutes.
const SPEED: &str = "10";

/// A child process killed (SIGKILL) and reaped when dropped.
struct Proc {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .stdin(Stdio::null())
            .env("NO_COLOR", "1")
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            name,
            child: Some(child),
            log,
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    fn signal(&mut self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// Signals, then waits up to `grace` for the exit (SIGKILL after that).
    fn stop(&mut self, sig: nix::sys::signal::Signal, grace: Duration) {
        self.signal(sig);
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn assert_running(&mut self) {
        if let Some(c) = &mut self.child {
            if let Ok(Some(status)) = c.try_wait() {
                panic!(
                    "{} exited ({status}); its log:\n{}",
                    self.name,
                    tail(&self.log, 60)
                );
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One HTTP/1.1 request to Home Assistant on 127.0.0.1 (`Connection: close`, body read to the
/// end). Returns the status and the body.
fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<(&str, String)>,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(20)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nAccept: application/json\r\n"
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.map_or((String::new(), None), |(ct, b)| (b, Some(ct)));
    if let Some(ct) = body.1 {
        req.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.0.len()));
    req.push_str(&body.0);
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP header in {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        status,
        if chunked {
            dechunk(rest)
        } else {
            rest.to_owned()
        },
    ))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

fn json_of(port: u16, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> Value {
    let (status, text) = http(
        port,
        method,
        path,
        token,
        body.map(|b| ("application/json", b.to_string())),
    )
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    assert!(
        (200..300).contains(&status),
        "{method} {path}: HTTP {status}: {text}"
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"))
}

/// Polls `f` every 500 ms until it returns `Some`, at most `limit`; `what` names it on failure,
/// with the logs of `procs`.
fn until<T>(
    what: &str,
    limit: Duration,
    procs: &mut [&mut Proc],
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        for p in procs.iter_mut() {
            p.assert_running();
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = procs
                .iter()
                .map(|p| format!("--- {} ---\n{}", p.name, tail(&p.log, 40)))
                .collect();
            panic!("{what}: not within {limit:?}\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Home Assistant's config: HTTP on `http_port`, no default_config, MQTT pre-configured.
fn write_ha_config(dir: &Path, http_port: u16, mqtt_port: u16) {
    std::fs::create_dir_all(dir.join(".storage")).expect("mkdir");
    std::fs::write(
        dir.join("configuration.yaml"),
        format!(
            "homeassistant:\n  name: printloop test\n  latitude: 52.5\n  longitude: 13.4\n  elevation: 0\n  unit_system: metric\n  time_zone: UTC\n  country: DE\n\
             http:\n  server_host: 127.0.0.1\n  server_port: {http_port}\n\
             api:\nauth:\nlogger:\n  default: warning\n  logs:\n    homeassistant.components.mqtt: info\n"
        ),
    )
    .expect("configuration.yaml");
    let entries = json!({
        "version": 1,
        "minor_version": 1,
        "key": "core.config_entries",
        "data": {"entries": [{
            "entry_id": "printlooptestmqtt00000000000001",
            "version": 1,
            "minor_version": 1,
            "domain": "mqtt",
            "title": "Mosquitto",
            "data": {"broker": "127.0.0.1", "port": mqtt_port, "discovery": true},
            "options": {},
            "pref_disable_new_entities": false,
            "pref_disable_polling": false,
            "source": "user",
            "unique_id": null,
            "disabled_by": null
        }]}
    });
    std::fs::write(
        dir.join(".storage/core.config_entries"),
        serde_json::to_vec_pretty(&entries).expect("JSON"),
    )
    .expect("config entries");
}

/// A long-lived access token through the login flow.
fn login(port: u16) -> String {
    let client_id = format!("http://127.0.0.1:{port}/");
    let flow = json_of(
        port,
        "POST",
        "/auth/login_flow",
        None,
        Some(
            json!({"client_id": client_id, "handler": ["homeassistant", null], "redirect_uri": client_id}),
        ),
    );
    let flow_id = flow["flow_id"].as_str().expect("flow id").to_owned();
    let done = json_of(
        port,
        "POST",
        &format!("/auth/login_flow/{flow_id}"),
        None,
        Some(json!({"username": USER, "password": PASSWORD, "client_id": client_id})),
    );
    let code = done["result"]
        .as_str()
        .unwrap_or_else(|| panic!("login refused: {done}"))
        .to_owned();
    let form = format!(
        "grant_type=authorization_code&code={code}&client_id={}",
        client_id.replace(':', "%3A").replace('/', "%2F")
    );
    let (status, text) = http(
        port,
        "POST",
        "/auth/token",
        None,
        Some(("application/x-www-form-urlencoded", form)),
    )
    .expect("token request");
    assert_eq!(status, 200, "token: {text}");
    let v: Value = serde_json::from_str(&text).expect("token JSON");
    v["access_token"].as_str().expect("access token").to_owned()
}

/// Every entity state, by entity id.
fn states(port: u16, token: &str) -> std::collections::BTreeMap<String, Value> {
    match http(port, "GET", "/api/states", Some(token), None) {
        Ok((200, text)) => serde_json::from_str::<Vec<Value>>(&text)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|s| Some((s["entity_id"].as_str()?.to_owned(), s)))
            .collect(),
        _ => Default::default(),
    }
}

fn state_of(all: &std::collections::BTreeMap<String, Value>, id: &str) -> Option<String> {
    all.get(id)
        .and_then(|s| s["state"].as_str())
        .map(str::to_owned)
}

fn live(v: Option<&str>) -> bool {
    v.is_some_and(|s| s != "unknown" && s != "unavailable")
}

fn numeric(v: Option<&str>) -> bool {
    v.and_then(|s| s.parse::<f64>().ok()).is_some()
}

#[test]
#[ignore = "needs a real Home Assistant: run scripts/peer-home-assistant.sh"]
fn home_assistant_sees_the_fleet_tracks_availability_and_pauses_a_print() {
    let t0 = Instant::now();
    let hass = PathBuf::from(std::env::var("PRINTLOOP_HASS").expect(
        "PRINTLOOP_HASS must name the hass executable (scripts/peer-home-assistant.sh sets it)",
    ));
    assert!(hass.is_file(), "{} is not a file", hass.display());
    let dir = tempfile::Builder::new()
        .prefix("printloop-ha-")
        .tempdir()
        .expect("tempdir");
    let broker = testkit::Mosquitto::start().expect("mosquitto");
    let mqtt_port = broker.port();
    let broker_url = format!("mqtt://127.0.0.1:{mqtt_port}");
    let http_port = testkit::free_port();
    let config = dir.path().join("ha");
    write_ha_config(&config, http_port, mqtt_port);

    // A user, then Home Assistant.
    let out = Command::new(&hass)
        .args(["--script", "auth", "-c"])
        .arg(&config)
        .args(["add", USER, PASSWORD])
        .output()
        .expect("hass --script auth");
    assert!(
        out.status.success(),
        "adding the user failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut ha = Proc::spawn(
        "home-assistant",
        Command::new(&hass).arg("-c").arg(&config),
        dir.path(),
    );
    until(
        "Home Assistant's HTTP API",
        Duration::from_secs(120),
        &mut [&mut ha],
        || {
            http(http_port, "GET", "/api/", None, None)
                .ok()
                .filter(|(s, _)| *s == 401)
        },
    );
    let token = login(http_port);
    eprintln!(
        "Home Assistant up after {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // The demo fleet (p0, p1 with its supervisor) on Home Assistant's broker, and p9: a
    // simulator and a gateway of their own, to be killed.
    let printloop = env!("CARGO_BIN_EXE_printloop");
    let mut demo = Proc::spawn(
        "demo",
        Command::new(printloop)
            .args([
                "demo",
                "--printers",
                "2",
                "--jobs",
                "8",
                "--speed",
                SPEED,
                "--broker",
            ])
            .arg(&broker_url)
            .env("RUST_LOG", "info"),
        dir.path(),
    );
    let tty = dir.path().join("p9.tty");
    let mut sim = Proc::spawn(
        "sim-p9",
        Command::new(printloop)
            .args([
                "sim",
                "--advanced-ok",
                "--seed",
                "9",
                "--speed",
                SPEED,
                "--link",
            ])
            .arg(&tty),
        dir.path(),
    );
    until(
        "the p9 simulator's pty",
        Duration::from_secs(20),
        &mut [&mut sim],
        || tty.exists().then_some(()),
    );
    let mut gw = Proc::spawn(
        "gateway-p9",
        Command::new(testkit::gateway_binary())
            .args(["--id", "p9", "--heartbeat", "1", "--keepalive", "2"])
            .arg("--broker")
            .arg(&broker_url)
            .arg("--serial")
            .arg(&tty)
            .arg("--data-dir")
            .arg(dir.path().join("gw-p9"))
            .args(["--time-scale", SPEED])
            .env("RUST_LOG", "info"),
        dir.path(),
    );

    // 1. Every printer's entities exist in Home Assistant with live values.
    let printers = ["p0", "p1", "p9"];
    let fleet = until(
        "every printer's entities with live values",
        Duration::from_secs(150),
        &mut [&mut ha, &mut demo, &mut gw, &mut sim],
        || {
            let all = states(http_port, &token);
            for p in printers {
                let get = |domain: &str, key: &str| {
                    state_of(&all, &format!("{domain}.printloop_{p}_{key}"))
                };
                let ok = live(get("sensor", "phase").as_deref())
                    && numeric(get("sensor", "nozzle_temp").as_deref())
                    && numeric(get("sensor", "nozzle_target").as_deref())
                    && numeric(get("sensor", "bed_temp").as_deref())
                    && numeric(get("sensor", "bed_target").as_deref())
                    && live(get("sensor", "job").as_deref())
                    && get("binary_sensor", "problem").as_deref() == Some("off")
                    && ["pause", "resume", "cancel", "bed_cleared"]
                        .iter()
                        .all(|b| get("button", b).is_some())
                    && all.contains_key(&format!("sensor.printloop_{p}_progress"))
                    && all.contains_key(&format!("sensor.printloop_{p}_remaining"));
                if !ok {
                    return None;
                }
            }
            let queue = all
                .iter()
                .find(|(id, _)| id.starts_with("sensor.") && id.ends_with("fleet_queue_length"))?;
            let printing = all
                .iter()
                .find(|(id, _)| id.starts_with("sensor.") && id.ends_with("fleet_jobs_printing"))?;
            let online = all.iter().find(|(id, _)| {
                id.starts_with("binary_sensor.") && id.ends_with("fleet_supervisor_online")
            })?;
            (numeric(queue.1["state"].as_str())
                && numeric(printing.1["state"].as_str())
                && online.1["state"] == "on")
                .then(|| (queue.0.clone(), all.clone()))
        },
    );
    let (queue_entity, all) = fleet;
    for p in printers {
        eprintln!(
            "{p}: phase {:?}, nozzle {:?}/{:?} °C, bed {:?}/{:?} °C, job {:?}, progress {:?}",
            state_of(&all, &format!("sensor.printloop_{p}_phase")),
            state_of(&all, &format!("sensor.printloop_{p}_nozzle_temp")),
            state_of(&all, &format!("sensor.printloop_{p}_nozzle_target")),
            state_of(&all, &format!("sensor.printloop_{p}_bed_temp")),
            state_of(&all, &format!("sensor.printloop_{p}_bed_target")),
            state_of(&all, &format!("sensor.printloop_{p}_job")),
            state_of(&all, &format!("sensor.printloop_{p}_progress")),
        );
    }
    eprintln!(
        "fleet: {queue_entity} = {:?}; entities seen after {:.1} s",
        state_of(&all, &queue_entity),
        t0.elapsed().as_secs_f64()
    );
    // Live: the nozzle temperature of some printer moves (heating or printing).
    let before: Vec<Option<String>> = printers
        .iter()
        .map(|p| state_of(&all, &format!("sensor.printloop_{p}_nozzle_temp")))
        .collect();
    until(
        "a temperature that changes",
        Duration::from_secs(60),
        &mut [&mut ha, &mut demo],
        || {
            let all = states(http_port, &token);
            let now: Vec<Option<String>> = printers
                .iter()
                .map(|p| state_of(&all, &format!("sensor.printloop_{p}_nozzle_temp")))
                .collect();
            (now != before).then_some(())
        },
    );

    // 2. p9's gateway dies (SIGKILL): Mosquitto sends its will, and its entities turn
    // unavailable in Home Assistant.
    let killed_at = Instant::now();
    let gw_pid = gw.pid();
    gw.stop(nix::sys::signal::Signal::SIGKILL, Duration::from_secs(5));
    until(
        "p9 unavailable after its gateway was killed",
        Duration::from_secs(30),
        &mut [&mut ha],
        || {
            let all = states(http_port, &token);
            let phase = state_of(&all, "sensor.printloop_p9_phase");
            let nozzle = state_of(&all, "sensor.printloop_p9_nozzle_temp");
            let pause = state_of(&all, "button.printloop_p9_pause");
            (phase.as_deref() == Some("unavailable")
                && nozzle.as_deref() == Some("unavailable")
                && pause.as_deref() == Some("unavailable"))
            .then_some(())
        },
    );
    eprintln!(
        "gateway p9 (pid {gw_pid}) killed: unavailable in Home Assistant after {:.1} s",
        killed_at.elapsed().as_secs_f64()
    );
    // The others stay available.
    let all = states(http_port, &token);
    for p in ["p0", "p1"] {
        assert!(
            live(state_of(&all, &format!("sensor.printloop_{p}_phase")).as_deref()),
            "{p} must stay available"
        );
    }

    // 3. The pause button of a printing printer pauses its print.
    let printing = until(
        "a demo printer printing",
        Duration::from_secs(180),
        &mut [&mut ha, &mut demo],
        || {
            let all = states(http_port, &token);
            ["p0", "p1"].into_iter().find(|p| {
                state_of(&all, &format!("sensor.printloop_{p}_phase")).as_deref()
                    == Some("printing")
            })
        },
    );
    let pressed_at = Instant::now();
    let mut presses = 0;
    until(
        &format!("{printing} paused by its pause button"),
        Duration::from_secs(45),
        &mut [&mut ha, &mut demo],
        || {
            let all = states(http_port, &token);
            if state_of(&all, &format!("sensor.printloop_{printing}_phase")).as_deref()
                == Some("paused")
            {
                return Some(());
            }
            // Press (again, if the printer had not reported printing to the supervisor yet:
            // a refused press changes nothing); at most once every 3 s.
            if presses == 0 || pressed_at.elapsed() > Duration::from_secs(3 * presses) {
                presses += 1;
                json_of(
                    http_port,
                    "POST",
                    "/api/services/button/press",
                    Some(&token),
                    Some(json!({"entity_id": format!("button.printloop_{printing}_pause")})),
                );
            }
            None
        },
    );
    eprintln!(
        "{printing} paused {:.1} s after the press ({presses} press(es))",
        pressed_at.elapsed().as_secs_f64()
    );
    // It stays paused (nothing resumes it behind the operator's back), and the job sensor
    // still names the job.
    std::thread::sleep(Duration::from_secs(3));
    let all = states(http_port, &token);
    assert_eq!(
        state_of(&all, &format!("sensor.printloop_{printing}_phase")).as_deref(),
        Some("paused")
    );
    assert!(live(
        state_of(&all, &format!("sensor.printloop_{printing}_job")).as_deref()
    ));

    // Home Assistant took every config and template without complaint.
    let log = std::fs::read_to_string(&ha.log).unwrap_or_default();
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("ERROR")
                || (l.contains("WARNING")
                    && (l.contains("printloop") || l.contains("mqtt") || l.contains("template")))
        })
        .collect();
    assert!(
        complaints.is_empty(),
        "Home Assistant complained:\n{}",
        complaints.join("\n")
    );

    demo.stop(nix::sys::signal::Signal::SIGINT, Duration::from_secs(15));
    sim.stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(5));
    ha.stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(20));
    drop(broker);
    eprintln!(
        "real Home Assistant test: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
