//! Streaming throughput of the serial link against the simulator at a true 250 000 baud.
//!
//! `cargo bench -p gateway --bench streaming` streams 20 000 G-code lines (the first 20 000
//! non-comment lines of `cylinder30.gcode`, many short segments) to a simulated Marlin board
//! twice: ping-pong, and send-ahead (the board answers with ADVANCED_OK). Motion and heating
//! are made practically instant (`--motion-speed 1e6`) so the wire is the limit.
//!
//! The simulator runs in its own process (`printloop sim`, built with `cargo build --release
//! --bin printloop` when it is not there yet) so that this process holds only the gateway
//! side and its peak RSS (VmHWM) is the gateway's.
//!
//! The last line printed is one JSON object:
//! `{"lines", "wire_limit_lines_per_s", "pingpong_lines_per_s", "sendahead_lines_per_s",
//!   "sendahead_pct_of_wire", "gateway_peak_rss_kb"}` where the wire limit is
//! `(250000 / 10) / average bytes per line on the wire` (`N<n> <cmd>*<cs>\n`).
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gateway::link::{gcode_lines, LinkConfig, LinkEvent, StreamMode};
use gateway::serial::SerialLink;
use protocol::marlin;

const BAUD: u32 = 250_000;
const LINES: usize = 20_000;
/// Print lines start after `N0 M110 N0`, `N1 M115`, `N2 M155 S2`.
const FIRST_PRINT_LINE: u32 = 3;

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The `printloop` binary, built in release mode if neither build is there.
fn printloop_binary() -> Result<PathBuf, String> {
    let target = target_dir();
    let release = target.join("release/printloop");
    if !release.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        eprintln!("building printloop (release) for the simulator process…");
        let status = Command::new(cargo)
            .args(["build", "--release", "--bin", "printloop"])
            .current_dir(workspace_root())
            .status()
            .map_err(|e| format!("cargo build: {e}"))?;
        if !status.success() {
            let debug = target.join("debug/printloop");
            if debug.exists() {
                return Ok(debug);
            }
            return Err(format!("cargo build --bin printloop failed: {status}"));
        }
    }
    Ok(release)
}

struct Sim {
    child: Child,
}

impl Sim {
    fn start(bin: &Path, link: &Path, advanced_ok: bool) -> Result<Sim, String> {
        let mut cmd = Command::new(bin);
        cmd.args(["sim", "--link"])
            .arg(link)
            .args(["--baud", &BAUD.to_string(), "--motion-speed", "1000000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .env("RUST_LOG", "warn");
        if advanced_ok {
            cmd.arg("--advanced-ok");
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawning the simulator: {e}"))?;
        let mut sim = Sim { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !link.exists() {
            if Instant::now() > deadline {
                return Err("the simulator did not create its device link".into());
            }
            if let Ok(Some(status)) = sim.child.try_wait() {
                return Err(format!("the simulator exited: {status}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(sim)
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Run {
    lines_per_s: f64,
    peak_in_flight: usize,
    resends: u64,
}

async fn stream(link_path: &Path, mode: StreamMode, lines: &[String]) -> Result<Run, String> {
    let cfg = LinkConfig {
        mode,
        ..LinkConfig::default()
    };
    let (link, mut events) = SerialLink::spawn(link_path, BAUD, cfg);
    let wait_ready = async {
        loop {
            match events.recv().await {
                Some(LinkEvent::Ready { .. }) => return Ok(()),
                Some(_) => {}
                None => return Err("link task ended".to_owned()),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait_ready)
        .await
        .map_err(|_| "no Ready within 20 s".to_owned())??;
    let total = lines.len() as u64;
    let start = Instant::now();
    let submit = async {
        for chunk in lines.chunks(128) {
            link.submit(chunk.to_vec())
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok::<(), String>(())
    };
    let acked = async {
        loop {
            match events.recv().await {
                Some(LinkEvent::Acked { seq }) if seq >= total => return Ok(()),
                Some(
                    e @ (LinkEvent::Fatal { .. }
                    | LinkEvent::Reset { .. }
                    | LinkEvent::Timeout { .. }
                    | LinkEvent::LinkError { .. }
                    | LinkEvent::Disconnected { .. }),
                ) => return Err(format!("{e:?}")),
                Some(_) => {}
                None => return Err("link task ended".to_owned()),
            }
        }
    };
    let (s, a) = tokio::time::timeout(Duration::from_secs(600), async {
        tokio::join!(submit, acked)
    })
    .await
    .map_err(|_| "streaming took over 600 s".to_owned())?;
    s?;
    a?;
    let elapsed = start.elapsed();
    let status = link.status().borrow().clone();
    link.close().await.map_err(|e| e.to_string())?;
    Ok(Run {
        lines_per_s: total as f64 / elapsed.as_secs_f64(),
        peak_in_flight: status.stats.peak_in_flight,
        resends: status.stats.resend_requests,
    })
}

fn vm_hwm_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> Result<(), String> {
    // `cargo bench` passes `--bench`; a filter argument that does not match skips the run.
    if let Some(filter) = std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        if !"streaming".contains(filter.as_str()) {
            return Ok(());
        }
    }
    let path = workspace_root().join("../shared/data/gcode/cylinder30.gcode");
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let lines: Vec<String> = gcode_lines(&text).take(LINES).map(str::to_owned).collect();
    drop(text);
    if lines.len() < LINES {
        return Err(format!("only {} lines in {}", lines.len(), path.display()));
    }
    let wire_bytes: usize = lines
        .iter()
        .enumerate()
        .map(|(i, l)| marlin::format_line(FIRST_PRINT_LINE + i as u32, l).len() + 1)
        .sum();
    let avg = wire_bytes as f64 / lines.len() as f64;
    let wire_limit = (f64::from(BAUD) / 10.0) / avg;

    let bin = printloop_binary()?;
    let dir = std::env::temp_dir().join(format!("printloop-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;

    let mut results = Vec::new();
    for (name, mode, advanced) in [
        ("ping-pong", StreamMode::PingPong, false),
        ("send-ahead", StreamMode::Auto, true),
    ] {
        let link = dir.join(format!("printer-{name}"));
        let _sim = Sim::start(&bin, &link, advanced)?;
        let run = rt.block_on(stream(&link, mode, &lines))?;
        eprintln!(
            "{name:>10}: {:7.1} lines/s ({:5.1} % of the wire limit {:.1}), peak in flight {}, resends {}",
            run.lines_per_s,
            100.0 * run.lines_per_s / wire_limit,
            wire_limit,
            run.peak_in_flight,
            run.resends
        );
        results.push(run);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (pp, sa) = (&results[0], &results[1]);
    // Keys in the documented order (serde_json's map would sort them).
    let json = format!(
        "{{\"lines\":{},\"wire_limit_lines_per_s\":{:.1},\"pingpong_lines_per_s\":{:.1},\"sendahead_lines_per_s\":{:.1},\"sendahead_pct_of_wire\":{:.1},\"gateway_peak_rss_kb\":{}}}",
        lines.len(),
        wire_limit,
        pp.lines_per_s,
        sa.lines_per_s,
        100.0 * sa.lines_per_s / wire_limit,
        vm_hwm_kb()
    );
    eprintln!("average {avg:.2} bytes per line on the wire");
    println!("{json}");
    Ok(())
}
