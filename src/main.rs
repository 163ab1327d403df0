//! `printloop`: the operator's binary. Each subcommand is a thin shell over a library crate.
use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "printloop", version, about = "Run a farm of 3D printers over MQTT")]
struct Cli {
    /// Log format on stderr (filter with RUST_LOG, default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the embedded MQTT broker (rumqttd) from a broker.toml.
    Broker(broker::cli::BrokerArgs),
    /// Run a simulated Marlin printer on a pseudo-terminal.
    Sim(printer_sim::cli::SimArgs),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        // rumqttd runs its own threads and blocks; it needs no tokio runtime of ours.
        Command::Broker(args) => broker::cli::run(args).context("broker failed"),
        Command::Sim(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(printer_sim::cli::run(args))
            .context("simulator failed"),
    }
}
