//! `printloop demo`: a whole print farm in one process.
//!
//! The embedded broker, the supervisor, and N simulated Marlin printers, each on its own
//! pseudo-terminal and driven by a real gateway — the same code that runs on a Raspberry Pi.
//! The demo submits M jobs (real slicer output built into the binary), plays the operator who
//! clears the beds (every such action is logged as the operator's), and shows live progress.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use protocol::api::{ApiOp, ApiResult, JobState, ListJobs, NoArgs, SubmitJob};
use protocol::PrinterId;
use supervisor::operator::{Act, Diligent};
use tokio::sync::watch;

use crate::ops::gcode::{self, SAMPLES};
use crate::ops::{ApiClient, Endpoint};

/// Arguments of `printloop demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Simulated printers.
    #[arg(long, default_value_t = 3)]
    printers: u32,
    /// Jobs to submit.
    #[arg(long, default_value_t = 6)]
    jobs: u32,
    /// How much faster than real time the printers run.
    #[arg(long, default_value_t = 50.0)]
    speed: f64,
    /// Exit when every job has ended, printing one JSON line with the figures.
    #[arg(long)]
    exit_when_done: bool,
    /// With --exit-when-done: give up (exit 1) after this many seconds. Without it the demo
    /// runs until Ctrl-C.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Use this broker (mqtt://HOST:PORT, e.g. the Mosquitto your Home Assistant uses) instead
    /// of starting the embedded one.
    #[arg(long, value_name = "URL")]
    broker: Option<String>,
    /// Put the embedded broker on free ports instead of broker.toml's (several demos side by
    /// side: two demos racing for 1883 could each take the other's broker for its own).
    #[arg(long)]
    free_ports: bool,
    /// Serve the dashboard here (a free loopback port when this one is taken; "off": none).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: String,
    /// No simulated operator: beds wait for you to clear them (from the dashboard or
    /// `printloop bed-clear`), as on a real farm.
    #[arg(long)]
    manual: bool,
    /// Keep the farm's state (database, files, tokens) here instead of a temporary directory.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

/// The demo's directory (kept, or temporary).
struct Dir(PathBuf);

impl Dir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=64).contains(&args.printers),
        "--printers must be 1 to 64"
    );
    anyhow::ensure!((0..=1000).contains(&args.jobs), "--jobs must be 0 to 1000");
    anyhow::ensure!(
        args.speed.is_finite() && (0.1..=1000.0).contains(&args.speed),
        "--speed must be 0.1 to 1000"
    );
    let started = Instant::now();
    let temp = match &args.data_dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("printloop-demo-")
                .tempdir()
                .context("creating the demo's directory")?,
        ),
    };
    let dir = match (&args.data_dir, &temp) {
        (Some(d), _) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            Dir(d.clone())
        }
        (None, Some(t)) => Dir(t.path().to_owned()),
        (None, None) => unreachable!("a temporary directory is made when none is given"),
    };

    // 1. The broker: the one named, or the embedded one on broker.toml's ports (free ones if
    // they are taken).
    let addr = match &args.broker {
        Some(url) => transport::BrokerAddr::parse(url)
            .map_err(|e| anyhow::anyhow!("--broker {url:?}: {}", e.0))?,
        None => start_embedded_broker(args.free_ports)?,
    };
    let url = format!("mqtt://{}:{}", addr.host, addr.port);
    println!("demo: broker at {url} (watch from another terminal: printloop watch --broker {url})");

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    // 2. The supervisor, with an operator's API token for the dashboard (the demo's own: it
    // lives in the demo's temporary directory and goes with it).
    let sup_dir = dir.path().join("supervisor");
    let http = match args.http.as_str() {
        "off" => None,
        a => {
            let want: std::net::SocketAddr = a
                .parse()
                .map_err(|e| anyhow::anyhow!("--http {a:?}: {e}"))?;
            // Taken (another demo, another program): any free port on the same address.
            match std::net::TcpListener::bind(want) {
                Ok(_) => Some(want),
                Err(_) => Some(std::net::SocketAddr::new(want.ip(), 0)),
            }
        }
    };
    let tokens_file = sup_dir.join(supervisor::http::tokens::TOKENS_FILE);
    // A kept directory has the last run's demo token: a new one replaces it.
    let _ = supervisor::http::tokens::remove(&tokens_file, "demo");
    let token =
        supervisor::http::tokens::add(&tokens_file, "demo", protocol::web::Role::Operator, 0)
            .context("making the demo's API token")?;
    let sup_settings = supervisor::run::Settings {
        machine: supervisor::machine::SupervisorConfig {
            command_retry: Duration::from_millis(5_000),
            ..Default::default()
        },
        broker: supervisor::run::BrokerTarget::External(addr.clone()),
        data_dir: sup_dir,
        metrics: None,
        http,
        keepalive: Duration::from_secs(5),
    };
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let sup = tokio::spawn(supervisor::run::run(
        sup_settings,
        stopped(stop_rx.clone()),
        Some(ready_tx),
    ));
    let handle = ready_rx.await.context("the supervisor did not start")?;
    if let Some(web) = handle.http {
        println!("demo: dashboard at http://{web}/#token={token}");
    }

    // 3. The printers: a simulator on a pty each, driven by a real gateway.
    let mut sims = Vec::new();
    let mut gateways = Vec::new();
    for i in 0..args.printers {
        let id = PrinterId::new(format!("p{i}")).context("printer id")?;
        let link = dir.path().join(format!("{id}.tty"));
        let sim = printer_sim::Simulator::start(
            printer_sim::SimConfig {
                seed: u64::from(i) + 1,
                speed: args.speed,
                advanced_ok: true,
                ..Default::default()
            },
            Some(&link),
        )
        .with_context(|| format!("starting simulated printer {id}"))?;
        let mut core = gateway::machine::CoreConfig::new(id.clone());
        core.name = format!("Demo printer {i}");
        core.model = "printloop-sim".into();
        core.heartbeat = Duration::from_millis(((10_000.0 / args.speed) as u64).max(1_000));
        let settings = gateway::run::Settings {
            core,
            broker: addr.clone(),
            keepalive: Duration::from_secs(5),
            data_dir: dir.path().join(format!("{id}-state")),
            serial_port: link,
            baud: 250_000,
            link: gateway::link::LinkConfig::default().scaled(1.0 / args.speed),
            max_backoff: Duration::from_secs(2),
        };
        gateways.push(tokio::spawn(gateway::run::run(
            settings,
            stopped(stop_rx.clone()),
        )));
        sims.push(sim);
    }

    // 4. The jobs, as an operator submits them.
    let ep =
        Endpoint::new(&url, protocol::DEFAULT_ROOT, Duration::from_secs(10)).context("endpoint")?;
    let mut api = ApiClient::connect(&ep)
        .await
        .context("connecting to the supervisor's API")?;
    let mut files = Vec::new();
    for (name, bytes) in SAMPLES {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {name}"))?;
        let file = gcode::inspect(&path).with_context(|| format!("inspecting {name}"))?;
        api.upload(&file, |_, _| {})
            .await
            .with_context(|| format!("uploading {name}"))?;
        files.push(file);
    }
    let mut submitted = 0;
    for n in 0..args.jobs {
        let f = &files[n as usize % files.len()];
        let op = ApiOp::SubmitJob(SubmitJob {
            name: SAMPLES[n as usize % SAMPLES.len()].0.into(),
            sha256: f.sha256.clone(),
            copies: 1,
            priority: 0,
            tags: vec![],
        });
        if let ApiResult::Submitted { job_ids } =
            api.request(op).await.context("submitting a job")?
        {
            submitted += job_ids.len();
        }
    }
    println!(
        "demo: {} printers, {submitted} jobs queued at {}x speed",
        args.printers, args.speed
    );

    // 5. The operator: clears beds, judges prints, and watches.
    let mut operator = Diligent::new();
    let mut last_frame = Instant::now() - Duration::from_secs(10);
    // One listener for the whole loop: a Ctrl-C that lands while a request is under way is
    // kept, not lost.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let outcome = loop {
        if args.exit_when_done && started.elapsed() > Duration::from_secs(args.timeout) {
            break Err(anyhow::anyhow!("not done after {} s", args.timeout));
        }
        let printers = match api.request(ApiOp::ListPrinters(NoArgs {})).await {
            Ok(ApiResult::Printers { printers }) => printers,
            Ok(_) | Err(_) => Vec::new(),
        };
        let jobs = match api
            .request(ApiOp::ListJobs(ListJobs {
                include_ended: true,
                limit: Some(1000),
            }))
            .await
        {
            Ok(ApiResult::Jobs { jobs }) => jobs,
            Ok(_) | Err(_) => Vec::new(),
        };
        // The operator model shared with `printloop chaos` and the simulation.
        let now_ms = started.elapsed().as_millis() as u64;
        let acts = if args.manual {
            Vec::new()
        } else {
            operator.round(now_ms, &printers, &jobs)
        };
        for act in acts {
            let what = match &act {
                Act::Release(_) => "releases the printer held after repeated failures".to_owned(),
                Act::ClearBed {
                    job: Some(j),
                    failed,
                    ..
                } => {
                    let state = jobs.iter().find(|s| &s.job_id == j).map(|s| s.state);
                    format!(
                        "takes the print of {j} off the bed ({}{}); bed cleared",
                        state.map_or("?".into(), |s| format!("{s:?}").to_lowercase()),
                        if *failed {
                            ", judged failed: requeued"
                        } else {
                            ""
                        }
                    )
                }
                Act::ClearBed { job: None, .. } => "confirms the bed is empty; bed cleared".into(),
            };
            tracing::info!(printer = %act.printer(), "operator: {what}");
            println!("operator: {} {what}", act.printer());
            if let Err(e) = api.request(act.op()).await {
                tracing::warn!(printer = %act.printer(), error = %e, "operator: refused");
            }
        }
        let done = jobs.iter().filter(|j| j.state == JobState::Done).count();
        let failed = jobs
            .iter()
            .filter(|j| {
                matches!(
                    j.state,
                    JobState::Failed
                        | JobState::Interrupted
                        | JobState::TimedOut
                        | JobState::Cancelled
                )
            })
            .count();
        let in_flight = jobs
            .iter()
            .filter(|j| {
                !matches!(
                    j.state,
                    JobState::Done
                        | JobState::Failed
                        | JobState::Interrupted
                        | JobState::TimedOut
                        | JobState::Cancelled
                )
            })
            .count();
        if last_frame.elapsed() >= Duration::from_secs(2) {
            last_frame = Instant::now();
            let mut line = format!(
                "[{:>5.1}s] done {done}/{submitted}",
                started.elapsed().as_secs_f64()
            );
            for p in &printers {
                let pct = p.progress_pct.unwrap_or(0.0);
                let bar = "#".repeat((pct / 10.0).round() as usize);
                line.push_str(&format!(
                    " | {} {:<9} [{bar:<10}] {:>5.1}%",
                    p.printer_id,
                    format!("{:?}", p.phase).to_lowercase(),
                    pct
                ));
            }
            println!("{line}");
        }
        if args.exit_when_done && !jobs.is_empty() && in_flight == 0 {
            break Ok((done, failed));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = &mut ctrl_c => {
                println!("demo: stopping (Ctrl-C)");
                break Ok((done, failed));
            }
        }
    };

    let _ = stop_tx.send(true);
    api.close().await;
    for g in gateways {
        let _ = tokio::time::timeout(Duration::from_secs(3), g).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), sup).await;
    for s in sims {
        let _ = tokio::time::timeout(Duration::from_secs(2), s.shutdown()).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    match outcome {
        Ok((finished, failed)) => {
            println!(
                "{}",
                serde_json::json!({
                    "printers": args.printers,
                    "jobs": submitted,
                    "finished": finished,
                    "failed": failed,
                    "elapsed_s": (elapsed * 10.0).round() / 10.0,
                })
            );
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The embedded broker on the built-in broker.toml's ports, or on free ones if they are taken.
fn start_embedded_broker(free_ports: bool) -> anyhow::Result<transport::BrokerAddr> {
    let config = broker::BrokerConfig::from_toml_str(
        include_str!("../broker.toml"),
        "broker.toml (built in)",
    )
    .context("the built-in broker.toml")?;
    if free_ports {
        let moved = config.with_free_ports().context("finding free ports")?;
        return supervisor::run::start_broker(
            &supervisor::run::BrokerTarget::Embedded(Box::new(moved)),
            None,
        )
        .context("starting the embedded broker");
    }
    let target = supervisor::run::BrokerTarget::Embedded(Box::new(config.clone()));
    match supervisor::run::start_broker(&target, None) {
        Ok(a) => Ok(a),
        Err(e) => {
            tracing::warn!(error = %e, "the default broker ports are taken; using free ones");
            let moved = config.with_free_ports().context("finding free ports")?;
            supervisor::run::start_broker(
                &supervisor::run::BrokerTarget::Embedded(Box::new(moved)),
                None,
            )
            .context("starting the embedded broker")
        }
    }
}
