//! File delivery benchmark (issue #13): how fast a G-code file goes from the operator's disk to
//! the supervisor (`printloop jobs add`, a real child process) and from the supervisor to a
//! printer's gateway (the gateway's pull), on loopback and through a link with a round trip.
//!
//! `cargo bench -p printloop --bench files -- [--size-mb 50,200] [--rtt-ms 0,20] [--no-cut]`
//!
//! One farm per case, in this process: the embedded broker (rumqttd, `broker.toml`), the real
//! supervisor, a simulated Marlin printer on a pty driven by the real gateway, and two
//! [`testkit::proxy`] delay lines — one between the gateway and the broker, one between the
//! operator's `printloop jobs add` and the broker — each holding every byte `rtt/2` each way
//! (a farm's Wi-Fi or a remote office). The supervisor sits beside the broker.
//!
//! What is printed, per case (human lines, then one JSON object per case):
//! - `upload_mb_s`: file size over the wall time of `printloop jobs add` (upload + queue).
//! - `pull_mb_s`: file size over the time from the gateway's first chunk request to its
//!   `file_verified` event (every chunk verified, the whole file hashed and checked), less the
//!   outage below (`pull_s` is the whole time, `outage_s` the cut: from cutting the link to the
//!   first chunk after it came back).
//! - The resume after a cut (unless `--no-cut`): when 40 % of the file has been served the
//!   gateway's link is cut for 2 s. `resent_verified_bytes` counts bytes served again below what
//!   the gateway had reported stored before the cut (must be 0); `resent_bytes` counts every
//!   byte served more than once (what was on the wire when the link went).
//!
//! MB is 10^6 bytes.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use protocol::{PrinterId, Topic, Topics};
use rumqttc::QoS;
use testkit::proxy::{LinkMode, Proxy};
use testkit::{EmbeddedBroker, TestClient};
use tokio::sync::watch;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Longest a case may take before it is abandoned (a 200 MB file at 1 MB/s each way fits).
const CASE_LIMIT: Duration = Duration::from_secs(900);

#[derive(Debug, Clone)]
struct Args {
    sizes_mb: Vec<u64>,
    rtts_ms: Vec<u64>,
    cut: bool,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut args = Args {
        sizes_mb: vec![50, 200],
        rtts_ms: vec![0, 20],
        cut: true,
    };
    let list = |v: Option<String>, what: &str| -> Result<Vec<u64>, BoxError> {
        let v = v.ok_or_else(|| format!("{what} needs a value"))?;
        v.split(',')
            .map(|x| {
                x.trim()
                    .parse::<u64>()
                    .map_err(|e| format!("{what} {x:?}: {e}").into())
            })
            .collect()
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--size-mb" => args.sizes_mb = list(it.next(), "--size-mb")?,
            "--rtt-ms" => args.rtts_ms = list(it.next(), "--rtt-ms")?,
            "--no-cut" => args.cut = false,
            "--bench" => {} // cargo bench passes it
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    if args.sizes_mb.iter().any(|&s| s == 0 || s > 2000) {
        return Err("--size-mb must be 1 to 2000".into());
    }
    if args.rtts_ms.iter().any(|&r| r > 2000) {
        return Err("--rtt-ms must be 0 to 2000".into());
    }
    Ok(args)
}

fn main() -> Result<(), BoxError> {
    let args = parse_args()?;
    // The farm's own warnings (a chunk asked again, a busy upload) on stderr; RUST_LOG for more.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut failed = Vec::new();
    for &size in &args.sizes_mb {
        for &rtt in &args.rtts_ms {
            let report = rt.block_on(async {
                tokio::time::timeout(CASE_LIMIT, case(size, rtt, args.cut))
                    .await
                    .map_err(|_| -> BoxError { format!("over {CASE_LIMIT:?}").into() })?
            });
            match report {
                Ok(r) => {
                    if r.resent_verified_bytes > 0 {
                        failed.push(format!(
                            "{size} MB / {rtt} ms: {} verified bytes sent again",
                            r.resent_verified_bytes
                        ));
                    }
                    println!("{}", serde_json::to_string(&r)?);
                }
                Err(e) => failed.push(format!("{size} MB / {rtt} ms: {e}")),
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; ").into())
    }
}

#[derive(Debug, serde::Serialize)]
struct Report {
    size_mb: u64,
    rtt_ms: u64,
    upload_s: f64,
    upload_mb_s: f64,
    pull_s: f64,
    outage_s: f64,
    pull_mb_s: f64,
    chunks_served: usize,
    serve_ms_median: f64,
    turn_ms_median: f64,
    cut: bool,
    stored_before_cut: u64,
    resent_bytes: u64,
    resent_verified_bytes: u64,
}

/// Writes a valid G-code file of at least `size` bytes ([`testkit::gcode::write_repeated`]).
fn write_gcode(path: &Path, size: u64) -> Result<(), BoxError> {
    let label = format!("file bench {}", std::process::id());
    Ok(testkit::gcode::write_repeated(path, size, &label)?)
}

fn mb_s(bytes: u64, d: Duration) -> f64 {
    (bytes as f64 / 1e6 / d.as_secs_f64() * 100.0).round() / 100.0
}

/// What the observer learned from the file topics.
#[derive(Default)]
struct Seen {
    first_request: Option<Instant>,
    verified: Option<Instant>,
    /// Every served chunk's offset → (times served, length).
    served: BTreeMap<u64, (u32, u64)>,
    served_bytes: u64,
    /// `job.transferred_bytes` of the gateway's latest state.
    stored: u64,
    /// Bytes served again below `stored_before_cut`.
    resent_verified: u64,
    /// When each request was seen, by offset (the latest).
    asked: BTreeMap<u64, Instant>,
    /// Request seen → its chunk seen (the supervisor and the broker), ms.
    serve_ms: Vec<f64>,
    /// A chunk seen → the next request seen (the broker and the gateway), ms.
    turn_ms: Vec<f64>,
    last_chunk: Option<Instant>,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2] * 100.0).round() / 100.0
}

async fn case(size_mb: u64, rtt_ms: u64, cut: bool) -> Result<Report, BoxError> {
    let dir = tempfile::Builder::new()
        .prefix("printloop-files-bench-")
        .tempdir()?;
    let file = dir.path().join("big.gcode");
    write_gcode(&file, size_mb * 1_000_000)?;
    let size = std::fs::metadata(&file)?.len();
    eprintln!("files: {size_mb} MB ({size} bytes), round trip {rtt_ms} ms");

    let broker = EmbeddedBroker::start()?;
    let port = broker.v4_port();
    let delay = LinkMode::Delay(Duration::from_millis(rtt_ms / 2));
    let gw_link = Proxy::start(port).await?;
    let cli_link = Proxy::start(port).await?;
    gw_link.set(delay);
    cli_link.set(delay);

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let direct =
        transport::BrokerAddr::parse(&format!("mqtt://127.0.0.1:{port}")).map_err(|e| e.0)?;
    let sup = tokio::spawn(supervisor::run::run(
        supervisor::run::Settings {
            machine: Default::default(),
            broker: supervisor::run::BrokerTarget::External(direct),
            data_dir: dir.path().join("supervisor"),
            metrics: None,
            http: None,
            keepalive: Duration::from_secs(5),
        },
        stopped(stop_rx.clone()),
        None,
    ));

    let id = PrinterId::new("p0")?;
    let tty = dir.path().join("p0.tty");
    let sim = printer_sim::Simulator::start(
        printer_sim::SimConfig {
            seed: 1,
            speed: 50.0,
            advanced_ok: true,
            ..Default::default()
        },
        Some(&tty),
    )?;
    let via = transport::BrokerAddr::parse(&format!("mqtt://127.0.0.1:{}", gw_link.port()))
        .map_err(|e| e.0)?;
    let gw = tokio::spawn(gateway::run::run(
        gateway::run::Settings {
            core: gateway::machine::CoreConfig::new(id.clone()),
            broker: via,
            keepalive: Duration::from_secs(5),
            data_dir: dir.path().join("gateway"),
            serial_port: tty,
            baud: 250_000,
            link: gateway::link::LinkConfig::default().scaled(1.0 / 50.0),
            max_backoff: Duration::from_secs(1),
        },
        stopped(stop_rx.clone()),
    ));

    // The observer, beside the broker: chunk requests and answers, the gateway's state and
    // events.
    let topics = Topics::new(protocol::DEFAULT_ROOT)?;
    let mut obs = TestClient::connect(port, "files-bench-observer").await?;
    for t in [
        Topic::FileRequest(id.clone()),
        Topic::FileChunk(id.clone()),
        Topic::State(id.clone()),
        Topic::Events(id.clone()),
    ] {
        obs.subscribe(&topics.format(&t), QoS::AtLeastOnce).await?;
    }
    let state_topic = topics.format(&Topic::State(id.clone()));
    let request_topic = topics.format(&Topic::FileRequest(id.clone()));
    let chunk_topic = topics.format(&Topic::FileChunk(id.clone()));
    let events_topic = topics.format(&Topic::Events(id.clone()));

    // The printer online before the upload (its first state).
    let online = Instant::now() + Duration::from_secs(30);
    loop {
        let left = online.saturating_duration_since(Instant::now());
        let p = obs
            .recv(left)
            .await
            .ok_or("the gateway never published its state")?;
        if p.topic == state_topic {
            break;
        }
    }

    // Upload and queue, as an operator does.
    let t0 = Instant::now();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_printloop"))
        .args(["jobs", "add", "--timeout", "60", "--broker"])
        .arg(format!("mqtt://127.0.0.1:{}", cli_link.port()))
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .await?;
    let upload = t0.elapsed();
    if !out.status.success() {
        return Err(format!(
            "printloop jobs add failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    eprintln!(
        "files:   upload {:.1} s = {} MB/s",
        upload.as_secs_f64(),
        mb_s(size, upload)
    );

    // A new printer waits for a person to say its bed is clear; then the job goes to it.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_printloop"))
        .args(["bed-clear", "p0", "--broker"])
        .arg(format!("mqtt://127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .output()
        .await?;
    if !out.status.success() {
        return Err(format!(
            "printloop bed-clear failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }

    // The pull: watch it to the end, cutting the link once on the way.
    let mut seen = Seen::default();
    let mut cut_at: Option<(Instant, u64)> = None;
    let mut healed = false;
    // From the cut to the first chunk after it: the outage, left out of `pull_mb_s`.
    let mut outage: Option<Duration> = None;
    let deadline = Instant::now() + CASE_LIMIT;
    while seen.verified.is_none() {
        if let Some((at, _)) = cut_at {
            if !healed && at.elapsed() >= Duration::from_secs(2) {
                gw_link.set(delay);
                healed = true;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(p) = obs.recv(left.min(Duration::from_millis(200))).await else {
            if Instant::now() >= deadline {
                return Err("the file was never verified".into());
            }
            continue;
        };
        if p.topic == request_topic {
            let now = Instant::now();
            seen.first_request.get_or_insert(now);
            if let Some(last) = seen.last_chunk.take() {
                seen.turn_ms.push((now - last).as_secs_f64() * 1e3);
            }
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) {
                if let Some(o) = v["offset"].as_u64() {
                    seen.asked.insert(o, now);
                }
            }
        } else if p.topic == chunk_topic {
            let v: serde_json::Value = serde_json::from_slice(&p.payload)?;
            if v["status"] != "ok" {
                return Err(format!("the supervisor refused a chunk: {v}").into());
            }
            let offset = v["offset"].as_u64().ok_or("chunk without offset")?;
            let len = v["data_b64"].as_str().map_or(0, |d| {
                let pad = d.bytes().rev().take_while(|&b| b == b'=').count();
                (d.len() / 4 * 3 - pad) as u64
            });
            let now = Instant::now();
            if let Some(asked) = seen.asked.get(&offset) {
                seen.serve_ms.push((now - *asked).as_secs_f64() * 1e3);
            }
            seen.last_chunk = Some(now);
            if let (Some((at, _)), None, true) = (cut_at, outage, healed) {
                outage = Some(now - at);
            }
            let e = seen.served.entry(offset).or_insert((0, len));
            e.0 += 1;
            seen.served_bytes += len;
            if let Some((_, stored)) = cut_at {
                if e.0 > 1 && offset < stored {
                    seen.resent_verified += len;
                }
            }
            if cut && cut_at.is_none() && seen.served_bytes * 10 >= size * 4 {
                gw_link.set(LinkMode::Cut);
                cut_at = Some((Instant::now(), seen.stored));
                eprintln!(
                    "files:   link cut at {} bytes served, {} stored",
                    seen.served_bytes, seen.stored
                );
            }
        } else if p.topic == state_topic {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) {
                if let Some(b) = v["job"]["transferred_bytes"].as_u64() {
                    seen.stored = seen.stored.max(b);
                }
            }
        } else if p.topic == events_topic {
            let v: serde_json::Value = serde_json::from_slice(&p.payload)?;
            let kind = v["kind"].as_str().or_else(|| v["event"]["kind"].as_str());
            if kind == Some("file_verified") {
                seen.verified = Some(Instant::now());
            } else if kind == Some("job_ended") || kind == Some("job_failed") {
                return Err(format!("the job ended before its file was verified: {v}").into());
            }
        }
    }
    let pull = seen
        .verified
        .zip(seen.first_request)
        .map(|(v, f)| v - f)
        .ok_or("no chunk request seen")?;
    let outage = outage.unwrap_or_default();
    let moving = pull.saturating_sub(outage);
    eprintln!(
        "files:   pull {:.1} s, {:.1} s of it with the link down = {} MB/s while up",
        pull.as_secs_f64(),
        outage.as_secs_f64(),
        mb_s(size, moving)
    );
    let (serve_ms, turn_ms) = (median(&mut seen.serve_ms), median(&mut seen.turn_ms));
    eprintln!(
        "files:   as seen beside the broker: request → chunk {serve_ms} ms (median), \
         chunk → next request {turn_ms} ms"
    );
    let resent: u64 = seen
        .served
        .values()
        .map(|&(n, len)| u64::from(n.saturating_sub(1)) * len)
        .sum();

    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), gw).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), sup).await;
    let _ = sim.shutdown().await;
    drop(broker);
    Ok(Report {
        size_mb,
        rtt_ms,
        upload_s: upload.as_secs_f64(),
        upload_mb_s: mb_s(size, upload),
        pull_s: pull.as_secs_f64(),
        outage_s: outage.as_secs_f64(),
        pull_mb_s: mb_s(size, moving),
        chunks_served: seen.served.len(),
        serve_ms_median: serve_ms,
        turn_ms_median: turn_ms,
        cut,
        stored_before_cut: cut_at.map_or(0, |(_, s)| s),
        resent_bytes: resent,
        resent_verified_bytes: seen.resent_verified,
    })
}
