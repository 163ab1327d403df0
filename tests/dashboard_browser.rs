//! The dashboard in a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven
//! over WebDriver) against the demo farm: the tiles appear and their progress moves; "Bed
//! cleared" and "Pause" on a tile change the printer's retained state on the broker; a G-code
//! file dropped on the queue board is printed, and the history shows it. Screenshots of the
//! grid, the queue and the history go to `PRINTLOOP_SCREENSHOTS` when it is set (the README's
//! come from there).
//!
//! Ignored in plain `cargo test` (it needs Chromium): `scripts/peer-browser.sh` installs it and
//! runs this with `--ignored`.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use testkit::http::request;
use testkit::{DemoFarm, DemoOptions, TestClient};

const T: Duration = Duration::from_secs(30);
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver and one browser session; both gone on drop.
struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let exe = std::env::var("PRINTLOOP_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let mut driver = Command::new(&exe)
            .args(["--port=0", "--log-level=WARNING"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting {exe}: {e} (scripts/peer-browser.sh installs it)")
            });
        let out = driver.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let port: u16 = loop {
            let line = rx
                .recv_timeout(T)
                .expect("chromedriver says where it listens");
            if let Some(rest) = line.split("started successfully on port ").nth(1) {
                break rest.trim_end_matches('.').trim().parse().expect("port");
            }
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let profile = tempfile::tempdir().expect("profile dir");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": std::env::var("PRINTLOOP_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1400,900", format!("--user-data-dir={}", profile.path().display())]
            }
        }}});
        let r = wd(addr, "POST", "/session", Some(caps));
        let session = r["sessionId"].as_str().expect("a session").to_owned();
        let mut b = Browser {
            driver,
            addr,
            session,
            _profile: profile,
        };
        b.post(
            "/timeouts",
            json!({"implicit": 0, "pageLoad": 30000, "script": 30000}),
        );
        b
    }

    fn post(&mut self, path: &str, body: Value) -> Value {
        wd(
            self.addr,
            "POST",
            &format!("/session/{}{path}", self.session),
            Some(body),
        )
    }

    fn go(&mut self, url: &str) {
        self.post("/url", json!({ "url": url }));
    }

    fn script(&mut self, js: &str, args: Value) -> Value {
        self.post("/execute/sync", json!({ "script": js, "args": args }))
    }

    /// Waits (bounded) until `css` matches an element, returning its WebDriver id.
    fn wait(&mut self, css: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let r = wd_raw(
                self.addr,
                "POST",
                &format!("/session/{}/element", self.session),
                Some(json!({"using": "css selector", "value": css})),
            );
            if let Some(id) = r["value"][ELEMENT].as_str() {
                return id.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "{css} did not appear within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn click(&mut self, css: &str) {
        let id = self.wait(css, T);
        self.post(&format!("/element/{id}/click"), json!({}));
    }

    fn text(&mut self, css: &str) -> String {
        self.script(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            json!([css]),
        )
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// Waits until `f` holds for the text of `css`.
    fn wait_text(&mut self, css: &str, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let t = self.text(css);
            if f(&t) {
                return t;
            }
            assert!(Instant::now() < deadline, "{what}: {css} reads {t:?}");
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    fn screenshot(&mut self, name: &str) {
        let Some(dir) = std::env::var_os("PRINTLOOP_SCREENSHOTS") else {
            return;
        };
        let r = wd(
            self.addr,
            "GET",
            &format!("/session/{}/screenshot", self.session),
            None,
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(r.as_str().expect("base64"))
            .expect("png");
        assert!(png.starts_with(b"\x89PNG"));
        let path = PathBuf::from(dir).join(format!("{name}.png"));
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, png).expect("write screenshot");
        eprintln!("screenshot {}", path.display());
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = request(
            self.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            &[],
            b"",
            Duration::from_secs(10),
        );
        let _ = request(
            self.addr,
            "GET",
            "/shutdown",
            &[],
            b"",
            Duration::from_secs(5),
        );
        // chromedriver leaves its browser behind when killed: kill the whole group.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.driver.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.driver.wait();
    }
}

fn wd_raw(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Value {
    let b = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    let r = request(
        addr,
        method,
        path,
        &[("Content-Type", "application/json")],
        &b,
        T,
    )
    .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e:#}"));
    r.json().unwrap_or(Value::Null)
}

fn wd(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Value {
    let v = wd_raw(addr, method, path, body);
    assert!(
        v["value"]["error"].is_null(),
        "WebDriver {method} {path}: {}",
        v["value"]
    );
    v["value"].clone()
}

/// The printer's retained `state` on the broker.
async fn retained_state(port: u16, printer: &str) -> Value {
    let mut c = TestClient::connect(
        port,
        &format!("browser-test-{printer}-{}", std::process::id()),
    )
    .await
    .expect("connect");
    c.subscribe(
        &format!("printloop/v1/printers/{printer}/state"),
        rumqttc::QoS::AtLeastOnce,
    )
    .await
    .expect("subscribe");
    let p = c
        .recv(Duration::from_secs(5))
        .await
        .expect("a retained state");
    let _ = c.disconnect().await;
    serde_json::from_slice(&p.payload).expect("state JSON")
}

fn wait_retained(farm: &DemoFarm, printer: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = rt.block_on(retained_state(farm.broker_port, printer));
        if f(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: retained state {s}");
        std::thread::sleep(Duration::from_millis(150));
    }
}

fn progress(b: &mut Browser, printer: &str) -> f64 {
    b.script(
        "const f = document.querySelector(`#grid [data-printer=\"${arguments[0]}\"] .bar-fill`); \
         return f && f.style.width ? parseFloat(f.style.width) : -1;",
        json!([printer]),
    )
    .as_f64()
    .unwrap_or(-1.0)
}

#[test]
#[ignore = "needs Chromium: scripts/peer-browser.sh"]
fn the_dashboard_runs_the_day_in_a_real_browser() {
    // Slow enough that progress is seen moving, fast enough for a short test.
    let opts = DemoOptions {
        printers: 3,
        jobs: 2,
        speed: 8.0,
        manual: true,
    };
    let farm = DemoFarm::start(std::path::Path::new(env!("CARGO_BIN_EXE_printloop")), &opts)
        .expect("demo farm");
    let mut b = Browser::start();
    let base = format!("http://{}", farm.http);

    // Sign in with the demo's link; the token leaves the address bar.
    b.go(&format!("{base}/#token={}", farm.operator));
    b.wait("#grid [data-printer=\"p0\"]", T);
    b.wait("#grid [data-printer=\"p2\"]", T);
    let url = b.script("return location.href", json!([]));
    assert!(
        !url.as_str().unwrap_or_default().contains("token="),
        "{url}"
    );
    b.wait("#conn[data-state=\"live\"]", T);

    // Bed cleared on p0's tile: the printer's retained state says so, and it starts its job.
    b.wait(
        "#grid [data-printer=\"p0\"] button[data-action=\"bed-clear\"]",
        Duration::from_secs(60),
    );
    b.click("#grid [data-printer=\"p0\"] button[data-action=\"bed-clear\"]");
    b.wait_text(
        "#grid [data-printer=\"p0\"] .t-result",
        "the printer's answer",
        |t| t.to_lowercase().contains("ok"),
    );
    wait_retained(&farm, "p0", "p0 took its job", |s| {
        s["job"].is_object() && s["phase"] != "idle"
    });
    b.wait_text("#grid [data-printer=\"p0\"] .t-phase", "p0 printing", |t| {
        t.to_lowercase().contains("printing")
    });

    // Progress moves on the tile.
    let first = progress(&mut b, "p0");
    let deadline = Instant::now() + Duration::from_secs(60);
    while progress(&mut b, "p0") <= first.max(0.0) {
        assert!(Instant::now() < deadline, "p0's progress stayed at {first}");
        std::thread::sleep(Duration::from_millis(200));
    }
    b.click("#grid [data-printer=\"p1\"] button[data-action=\"bed-clear\"]");
    b.wait_text("#grid [data-printer=\"p1\"] .t-phase", "p1 printing", |t| {
        t.to_lowercase().contains("printing")
    });
    b.screenshot("dashboard-grid");

    // Pause on p0's tile: the retained state is paused; resume it again.
    b.click("#grid [data-printer=\"p0\"] button[data-action=\"pause\"]");
    wait_retained(&farm, "p0", "p0 paused", |s| s["phase"] == "paused");
    b.wait_text(
        "#grid [data-printer=\"p0\"] .t-phase",
        "p0 paused on its tile",
        |t| t.to_lowercase().contains("paused"),
    );
    b.click("#grid [data-printer=\"p0\"] button[data-action=\"resume\"]");
    wait_retained(&farm, "p0", "p0 printing again", |s| {
        s["phase"] == "printing"
    });

    // A file dropped on the queue board: uploaded, queued, and printed on p2 once its bed is
    // cleared.
    b.go(&format!("{base}/#/queue"));
    b.wait("#drop", T);
    let mut gcode = String::from("; dropped on the dashboard\nG28\nM104 S200\n");
    for i in 0..120 {
        gcode.push_str(&format!("G1 X{} Y{} F3000\n", i % 100, (i * 7) % 100));
    }
    b.script(
        "const dt = new DataTransfer(); dt.items.add(new File([arguments[0]], 'dropped.gcode', {type: 'text/x-gcode'})); \
         const z = document.getElementById('drop'); \
         for (const t of ['dragenter', 'dragover', 'drop']) z.dispatchEvent(new DragEvent(t, {dataTransfer: dt, bubbles: true, cancelable: true}));",
        json!([gcode]),
    );
    b.wait("#submit:not([disabled])", T);
    b.click("#submit");
    let queued = b.wait_text("#submit-result", "the dropped file queued", |t| {
        t.contains("j-")
    });
    let job = queued
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .find(|w| w.starts_with("j-"))
        .expect("a job id")
        .to_owned();
    b.wait(&format!("#queue-body tr[data-job=\"{job}\"]"), T);
    b.screenshot("dashboard-queue");
    b.go(&format!("{base}/#/grid"));
    b.click("#grid [data-printer=\"p2\"] button[data-action=\"bed-clear\"]");
    farm.wait_job(&job, "finished", Duration::from_secs(120))
        .expect("the dropped file's job prints");

    // The history shows it.
    b.go(&format!("{base}/#/history"));
    b.wait(
        &format!("#history-body tr[data-job=\"{job}\"]"),
        Duration::from_secs(30),
    );
    b.screenshot("dashboard-history");
    let errors = b.script("return (window.__printloopErrors || []).length", json!([]));
    assert_eq!(errors.as_u64().unwrap_or(0), 0);
}
