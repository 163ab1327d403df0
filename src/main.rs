//! `printloop`: the operator's binary. Each subcommand is a thin shell over a library crate.
use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

mod adversary;
mod chaos;
mod demo;
mod enroll;
mod ops;

#[derive(Debug, Parser)]
#[command(
    name = "printloop",
    version,
    about = "Run a farm of 3D printers over MQTT"
)]
struct Cli {
    /// Log format on stderr (filter with RUST_LOG, default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
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
    /// Run the supervisor: the job queue and every fleet decision (embeds the broker by default).
    Supervisor(supervisor::cli::SupervisorArgs),
    /// A whole farm in one process: broker, supervisor, simulated printers with real gateways.
    Demo(demo::DemoArgs),
    /// Submit, list, cancel and requeue print jobs (asks the supervisor).
    Jobs(ops::cli::JobsArgs),
    /// List the printers as the supervisor sees them.
    Printers(ops::cli::PrintersArgs),
    /// Confirm that a person cleared a printer's bed (`--failed`: the print was bad).
    BedClear(ops::cli::BedClearArgs),
    /// The farm's MQTT logins: register Home Assistant, Node-RED, the supervisor or operators;
    /// write Mosquitto's password file and ACL (printers: `printloop printers add`).
    Clients(enroll::ClientsArgs),
    /// The HTTP API's tokens for the dashboard, scripts and slicers (viewer or operator).
    Tokens(enroll::TokensArgs),
    /// URLs that get job and printer events, signed (webhooks).
    Webhooks(enroll::WebhooksArgs),
    /// Let a printer held by the circuit breaker take work again.
    Release(ops::cli::ReleaseArgs),
    /// Watch the printers' progress live (from the retained MQTT topics).
    Watch(ops::cli::WatchArgs),
    /// Run the whole system as processes under seeded faults and check its invariants
    /// (one JSON line on stdout; exit status 1 on any violation).
    Chaos(chaos::ChaosArgs),
    /// Attack the system as a hostile MQTT client, class by class (issue #10), measuring
    /// command latency and state gaps; checks the stores and logs afterwards (one JSON line
    /// per class and a summary on stdout; exit status 1 on any violation).
    Adversary(adversary::AdversaryArgs),
}

fn init_logging(format: LogFormat) {
    transport::logging::init(format == LogFormat::Json);
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
        Command::Supervisor(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(supervisor::cli::run(args))
            .or_else(|e| match e {
                // EX_CONFIG: the unit's RestartPreventExitStatus=78 stops systemd from
                // restarting a supervisor that cannot work until a person fixes its config.
                supervisor::cli::CliError::Config(e) => {
                    tracing::error!("configuration: {e}");
                    std::process::exit(78)
                }
                other => Err(other),
            })
            .context("supervisor failed"),
        Command::Demo(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(demo::run(args))
            .context("demo failed"),
        Command::Chaos(args) => {
            let passed = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(chaos::run(args))
                .context("chaos run failed")?;
            if !passed {
                // The report (and each violation) has been printed; only the status is left.
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Adversary(args) => {
            let passed = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(adversary::run(args))
                .context("adversary run failed")?;
            if !passed {
                // Every line (and each violation) has been printed; only the status is left.
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Clients(args) => enroll::clients(args).map_err(anyhow::Error::from),
        Command::Tokens(args) => enroll::tokens(args).map_err(anyhow::Error::from),
        Command::Webhooks(args) => enroll::webhooks(args).map_err(anyhow::Error::from),
        Command::Jobs(args) => operator(ops::cli::jobs(args)),
        Command::Printers(args) => operator(ops::cli::printers(args)),
        Command::BedClear(args) => operator(ops::cli::bed_clear(args)),
        Command::Release(args) => operator(ops::cli::release(args)),
        Command::Watch(args) => operator(ops::cli::watch(args)),
    }
}

/// Runs an operator command on a small runtime; its error is the whole message (no context
/// added: it already names the broker, the file or the supervisor's reason).
fn operator(
    command: impl std::future::Future<Output = Result<(), ops::OpsError>>,
) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(command)
        .map_err(anyhow::Error::from)
}
