//! `printloop sim`: one simulated printer on a pseudo-terminal until Ctrl-C or SIGTERM.
//!
//! With `--control-stdin` the simulator also reads fault commands, one per line, from its
//! standard input (how `printloop chaos` pulls a cable from another process): `cable_pull`,
//! `replug`, `thermal_runaway`, `hang`, `unhang`, `reset`. Each is answered on stdout with
//! `ok <command>` or `error <command>: <reason>`; end of input stops the reading, not the
//! simulator.
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

use crate::{SimConfig, SimControl, SimError, Simulator};

/// Arguments of `printloop sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Where to link the pseudo-terminal's device path (a symlink; a stale one is replaced).
    #[arg(long)]
    pub link: PathBuf,
    /// Wire rate, bits per second (8N1: 10 bits a byte).
    #[arg(long, default_value_t = 250_000)]
    pub baud: u32,
    /// Time scale: 1 = real time, 100 = a hundred times faster (wire, timers, motion, heat).
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Seed for every random choice (fault injection, UUID).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Answer `ok N<line> P<planner free> B<buffer free>` (Marlin ADVANCED_OK).
    #[arg(long)]
    pub advanced_ok: bool,
    /// UART receive buffer, bytes (Marlin RX_BUFFER_SIZE).
    #[arg(long, default_value_t = 128)]
    pub rx_buffer: usize,
    /// Command buffer slots (Marlin BUFSIZE).
    #[arg(long, default_value_t = 4)]
    pub bufsize: usize,
    /// Planner ring size (Marlin BLOCK_BUFFER_SIZE).
    #[arg(long, default_value_t = 16)]
    pub planner_blocks: usize,
    /// Probability per numbered line of a checksum error.
    #[arg(long, default_value_t = 0.0)]
    pub checksum_error_rate: f64,
    /// Line numbers whose first arrival fails its checksum, e.g. `5,17`.
    #[arg(long, value_delimiter = ',')]
    pub checksum_error_lines: Vec<u32>,
    /// Probability per output line of corrupted bytes.
    #[arg(long, default_value_t = 0.0)]
    pub garble_rate: f64,
    /// Motion and heating speed relative to real time, independent of `--speed`
    /// (e.g. 1000000 for instant moves at a true wire rate).
    #[arg(long)]
    pub motion_speed: Option<f64>,
    /// Milliseconds from a port open (reset) to the `start` banner.
    #[arg(long, default_value_t = 0)]
    pub boot_ms: u64,
    /// Simulate a Marlin build without EMERGENCY_PARSER: M108/M112/M410 act only when the main
    /// loop reads their line, not the moment it arrives.
    #[arg(long)]
    pub no_emergency_parser: bool,
    /// Read fault commands from stdin, one per line: cable_pull, replug, thermal_runaway,
    /// hang, unhang, reset.
    #[arg(long)]
    pub control_stdin: bool,
}

/// A fault command read from the control input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlCommand {
    /// Unplug the USB cable.
    CablePull,
    /// Plug it back in.
    Replug,
    /// Thermal runaway (the firmware halts).
    ThermalRunaway,
    /// Stop answering.
    Hang,
    /// Answer again.
    Unhang,
    /// An unexpected reset.
    Reset,
}

impl ControlCommand {
    /// Parses one control line (surrounding white space ignored).
    pub fn parse(line: &str) -> Result<Self, String> {
        Ok(match line.trim() {
            "cable_pull" => Self::CablePull,
            "replug" => Self::Replug,
            "thermal_runaway" => Self::ThermalRunaway,
            "hang" => Self::Hang,
            "unhang" => Self::Unhang,
            "reset" => Self::Reset,
            other => {
                let shown: String = other.chars().take(40).collect();
                return Err(format!(
                    "unknown control command {shown:?} (expected cable_pull, replug, \
                     thermal_runaway, hang, unhang or reset)"
                ));
            }
        })
    }

    /// Carries it out.
    pub async fn apply(self, control: &SimControl) -> Result<(), SimError> {
        match self {
            Self::CablePull => control.cable_pull().await,
            Self::Replug => control.replug().await,
            Self::ThermalRunaway => control.thermal_runaway().await,
            Self::Hang => control.hang().await,
            Self::Unhang => control.unhang().await,
            Self::Reset => control.reset().await,
        }
    }
}

/// Longest control line read; a longer one is rejected as unknown.
const MAX_CONTROL_LINE: usize = 256;

/// Reads control commands from stdin until it ends, answering each on stdout.
async fn control_stdin(control: SimControl) {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        let answer = match ControlCommand::parse(&line[..line.len().min(MAX_CONTROL_LINE)]) {
            Ok(cmd) => match cmd.apply(&control).await {
                Ok(()) => {
                    tracing::info!(command = ?cmd, "control: done");
                    format!("ok {}\n", line.trim())
                }
                Err(e) => {
                    tracing::warn!(command = ?cmd, error = %e, "control: failed");
                    format!("error {}: {e}\n", line.trim())
                }
            },
            Err(e) => {
                tracing::warn!("control: {e}");
                format!("error {e}\n")
            }
        };
        if out.write_all(answer.as_bytes()).await.is_err() || out.flush().await.is_err() {
            return;
        }
    }
}

impl SimArgs {
    /// The simulator configuration these flags describe.
    pub fn config(&self) -> SimConfig {
        SimConfig {
            seed: self.seed,
            baud: self.baud,
            speed: self.speed,
            motion_speed: self.motion_speed,
            advanced_ok: self.advanced_ok,
            rx_buffer: self.rx_buffer,
            bufsize: self.bufsize,
            planner_blocks: self.planner_blocks,
            checksum_error_rate: self.checksum_error_rate,
            checksum_error_lines: self.checksum_error_lines.clone(),
            garble_rate: self.garble_rate,
            boot_time: Duration::from_millis(self.boot_ms),
            emergency_parser: !self.no_emergency_parser,
            ..SimConfig::default()
        }
    }
}

/// Runs the simulator until Ctrl-C or SIGTERM (or until it fails), then removes the link.
pub async fn run(args: SimArgs) -> Result<(), SimError> {
    let config = args.config();
    config.validate()?;
    let mut handle = Simulator::start(config, Some(&args.link))?;
    tracing::info!(
        link = %args.link.display(),
        device = %handle.stats().device.display(),
        baud = args.baud,
        speed = args.speed,
        "simulated printer ready; Ctrl-C to stop"
    );
    let control = args
        .control_stdin
        .then(|| tokio::spawn(control_stdin(handle.control())));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        signal = tokio::signal::ctrl_c() => {
            signal?;
            tracing::info!("stopping the simulator");
            handle.shutdown().await
        }
        _ = term.recv() => {
            tracing::info!("stopping the simulator (SIGTERM)");
            handle.shutdown().await
        }
        ended = handle.stopped() => ended,
    };
    if let Some(task) = control {
        task.abort();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    #[test]
    fn flags_map_onto_the_config() {
        let cli = Cli::parse_from([
            "sim",
            "--link",
            "/tmp/printer0",
            "--baud",
            "115200",
            "--speed",
            "10",
            "--seed",
            "9",
            "--advanced-ok",
            "--rx-buffer",
            "64",
            "--bufsize",
            "8",
            "--planner-blocks",
            "32",
            "--checksum-error-rate",
            "0.01",
            "--checksum-error-lines",
            "5,17",
            "--garble-rate",
            "0.001",
            "--motion-speed",
            "1000",
            "--no-emergency-parser",
        ]);
        let c = cli.sim.config();
        assert_eq!(cli.sim.link, PathBuf::from("/tmp/printer0"));
        assert_eq!((c.baud, c.speed, c.seed), (115_200, 10.0, 9));
        assert!(c.advanced_ok);
        assert_eq!((c.rx_buffer, c.bufsize, c.planner_blocks), (64, 8, 32));
        assert_eq!(c.checksum_error_lines, vec![5, 17]);
        assert_eq!((c.checksum_error_rate, c.garble_rate), (0.01, 0.001));
        assert_eq!(c.motion_speed, Some(1000.0));
        assert!(!c.emergency_parser);
        assert!(c.validate().is_ok());
        let defaults = Cli::parse_from(["sim", "--link", "x"]).sim.config();
        assert_eq!(defaults, SimConfig::default());
        assert!(defaults.emergency_parser);
        assert!(
            Cli::parse_from(["sim", "--link", "x", "--control-stdin"])
                .sim
                .control_stdin
        );
    }

    #[test]
    fn control_commands_parse() {
        assert_eq!(
            ControlCommand::parse(" cable_pull\r"),
            Ok(ControlCommand::CablePull)
        );
        assert_eq!(
            ControlCommand::parse("thermal_runaway"),
            Ok(ControlCommand::ThermalRunaway)
        );
        for good in ["replug", "hang", "unhang", "reset"] {
            assert!(ControlCommand::parse(good).is_ok(), "{good}");
        }
        let e = ControlCommand::parse("explode").expect_err("unknown");
        assert!(e.contains("explode") && e.contains("cable_pull"), "{e}");
    }
}
