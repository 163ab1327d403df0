//! `printloop-gateway`: the process that runs on each printer's Raspberry Pi.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use gateway::config::{ConfigError, FileConfig, Flags};
use gateway::link::StreamMode;
use gateway::run::{run, Settings};

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

/// The flags that override the config file.
fn flags(args: &Args) -> Flags {
    Flags {
        id: args.id.clone(),
        broker: args.broker.clone(),
        username: args.username.clone(),
        ca_file: args.ca_file.clone(),
        keepalive_s: args.keepalive,
        serial: args.serial.clone(),
        baud: args.baud,
        mode: args.mode.map(|m| match m {
            Mode::Auto => StreamMode::Auto,
            Mode::Pingpong => StreamMode::PingPong,
        }),
        data_dir: args.data_dir.clone(),
        heartbeat_s: args.heartbeat,
        time_scale: args.time_scale,
    }
}

fn settings(args: &Args) -> Result<Settings, ConfigError> {
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    gateway::config::settings(file, &flags(args))
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
