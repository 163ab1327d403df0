//! `printloop-gateway`: the process that runs on each printer's Raspberry Pi.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use gateway::config::{broker_url, ConfigError, FileConfig};
use gateway::link::{LinkConfig, StreamMode};
use gateway::machine::CoreConfig;
use gateway::run::{run, Settings};
use protocol::{PrinterId, Topics};

/// Drives one 3D printer over USB serial and connects it to a printloop fleet over MQTT.
///
/// Settings come from `--config FILE` (TOML; see the gateway docs) and flags; a flag wins over
/// the file. The MQTT password is read from the environment variable PRINTLOOP_MQTT_PASSWORD.
#[derive(Debug, Parser)]
#[command(
    name = "printloop-gateway",
    version,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Sub>,
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Printer id (a-z, 0-9, '-', '_'), unique in the fleet.
    #[arg(long)]
    id: Option<String>,
    /// Broker URL: mqtt://HOST:PORT or mqtts://HOST:PORT.
    #[arg(long)]
    broker: Option<String>,
    /// MQTT user name.
    #[arg(long)]
    username: Option<String>,
    /// CA certificate (PEM) to verify an mqtts:// broker.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// MQTT keep-alive in seconds.
    #[arg(long)]
    keepalive: Option<u64>,
    /// The printer's serial device.
    #[arg(long)]
    serial: Option<PathBuf>,
    /// Baud rate.
    #[arg(long)]
    baud: Option<u32>,
    /// Streaming mode: auto (send ahead when the firmware reports ADVANCED_OK) or pingpong.
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Where the state database and the file cache live.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// State heartbeat period in seconds.
    #[arg(long)]
    heartbeat: Option<u64>,
    /// Divide every serial timeout by this factor (for simulated printers running faster than
    /// real time).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Log format on stderr (filter with RUST_LOG, default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Apply the Pi image's first-boot file (`printloop-gateway.toml` on the boot partition):
    /// the gateway's config, host name, time zone, Wi-Fi and ssh key (packaging/image/).
    Firstboot {
        /// The boot partition's file.
        #[arg(long, default_value = "/boot/firmware/printloop-gateway.toml")]
        boot_file: PathBuf,
        /// The root of the system to configure (`/` on the Pi).
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Auto,
    Pingpong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn settings(args: &Args) -> Result<Settings, ConfigError> {
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let missing = |key: &'static str, flag: &str| ConfigError::Invalid {
        key,
        message: format!("missing: set `{key}` in the config file or pass {flag}"),
    };
    let id = args
        .id
        .clone()
        .or(file.id)
        .ok_or_else(|| missing("id", "--id"))?;
    let printer_id = PrinterId::new(id).map_err(|e| ConfigError::Invalid {
        key: "id",
        message: e.to_string(),
    })?;
    let topics = Topics::new(
        file.topic_root
            .unwrap_or_else(|| protocol::DEFAULT_ROOT.into()),
    )
    .map_err(|e| ConfigError::Invalid {
        key: "topic_root",
        message: e.to_string(),
    })?;
    let mut broker = broker_url(
        &args
            .broker
            .clone()
            .or(file.broker.url)
            .unwrap_or_else(|| "mqtt://127.0.0.1:1883".into()),
    )?;
    let serial_port = args
        .serial
        .clone()
        .or(file.serial.port)
        .ok_or_else(|| missing("serial.port", "--serial"))?;
    let data_dir = args
        .data_dir
        .clone()
        .or(file.data_dir)
        .ok_or_else(|| missing("data_dir", "--data-dir"))?;
    let mode = match (args.mode, file.serial.mode.as_deref()) {
        (Some(Mode::Pingpong), _) | (None, Some("pingpong")) => StreamMode::PingPong,
        (Some(Mode::Auto), _) | (None, Some("auto") | None) => StreamMode::Auto,
        (None, Some(other)) => {
            return Err(ConfigError::Invalid {
                key: "serial.mode",
                message: format!("{other:?} is not `auto` or `pingpong`"),
            })
        }
    };
    // Below 0.001 the link's scaled timeouts no longer fit in a Duration.
    if !(args.time_scale.is_finite() && args.time_scale >= 0.001) {
        return Err(ConfigError::Invalid {
            key: "time-scale",
            message: "must be a number of at least 0.001".into(),
        });
    }
    // Seconds to milliseconds; a value that overflows is refused, not wrapped (or a panic).
    let ms = |key: &'static str, s: u64| {
        s.checked_mul(1000).ok_or_else(|| ConfigError::Invalid {
            key,
            message: format!("{s} s is too long"),
        })
    };
    let mut core = CoreConfig::new(printer_id);
    core.topics = topics;
    if let Some(n) = file.name {
        core.name = n;
    }
    if let Some(m) = file.model {
        core.model = m;
    }
    core.tags = file.tags;
    if let Some(h) = args.heartbeat.or(file.timing.heartbeat_s) {
        if h == 0 {
            return Err(ConfigError::Invalid {
                key: "timing.heartbeat_s",
                message: "must be at least 1".into(),
            });
        }
        core.heartbeat_ms = ms("timing.heartbeat_s", h)?;
    }
    if let Some(ms) = file.timing.state_min_interval_ms {
        core.state_min_interval_ms = ms;
    }
    if let Some(s) = file.timing.chunk_timeout_s {
        if s == 0 {
            return Err(ConfigError::Invalid {
                key: "timing.chunk_timeout_s",
                message: "must be at least 1".into(),
            });
        }
        core.chunk_timeout_ms = ms("timing.chunk_timeout_s", s)?;
    }
    let keepalive_s = args.keepalive.or(file.broker.keepalive_s).unwrap_or(15);
    if keepalive_s == 0 {
        return Err(ConfigError::Invalid {
            key: "broker.keepalive_s",
            message: "must be at least 1".into(),
        });
    }
    let link = LinkConfig {
        mode,
        ..LinkConfig::default()
    }
    .scaled(1.0 / args.time_scale);
    broker.username = args.username.clone().or(file.broker.username);
    broker.password = std::env::var("PRINTLOOP_MQTT_PASSWORD")
        .ok()
        .or(file.broker.password);
    broker.ca_file = args.ca_file.clone().or(file.broker.ca_file);
    Ok(Settings {
        core,
        broker,
        keepalive: Duration::from_secs(keepalive_s),
        data_dir,
        serial_port,
        baud: args.baud.or(file.serial.baud).unwrap_or(250_000),
        link,
        max_backoff: Duration::from_secs(30),
    })
}

/// The exit status of a configuration error (sysexits' EX_CONFIG).
const EX_CONFIG: i32 = 78;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    transport::logging::init(args.log_format == LogFormat::Json);
    if let Some(Sub::Firstboot { boot_file, root }) = &args.command {
        return match gateway::firstboot::run(boot_file, root) {
            Ok(outcome) => {
                for w in &outcome.warnings {
                    tracing::warn!("{w}");
                }
                for f in &outcome.written {
                    tracing::info!(file = %f.display(), "written");
                }
                tracing::info!(
                    hostname = %outcome.hostname,
                    applied = %outcome.applied.display(),
                    "first-boot configuration applied"
                );
                Ok(())
            }
            Err(e) => {
                tracing::error!("first-boot configuration NOT applied: {e}");
                std::process::exit(EX_CONFIG);
            }
        };
    }
    let settings = match settings(&args) {
        Ok(s) => s,
        Err(e) => {
            // EX_CONFIG: the unit's RestartPreventExitStatus=78 stops systemd from restarting a
            // gateway that cannot work until a person fixes its config.
            tracing::error!("configuration: {e}");
            std::process::exit(EX_CONFIG);
        }
    };
    tracing::info!(
        printer = %settings.core.printer_id,
        broker = %format!("{}:{}", settings.broker.host, settings.broker.port),
        serial = %settings.serial_port.display(),
        baud = settings.baud,
        data_dir = %settings.data_dir.display(),
        "starting"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                        return;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        };
        run(settings, shutdown).await
    })
    .context("gateway failed")?;
    Ok(())
}
