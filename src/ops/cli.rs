//! The operator subcommands' arguments and their shells: parse, call [`ApiClient`], print.
//!
//! Results go to stdout (job ids, tables, JSON lines), progress and notes to stderr.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use protocol::api::{
    ApiOp, ApiResult, BedClear, JobArgs, ListJobs, NoArgs, PrinterArgs, SetPriority, SubmitJob,
};
use protocol::{JobId, PrinterId};

use super::{gcode, now_ms, table, watch, ApiClient, Credentials, Endpoint, OpsError};

/// Where the supervisor is; shared by every operator subcommand.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// The broker: mqtt://HOST:PORT or mqtts://HOST:PORT.
    #[arg(long, env = "PRINTLOOP_BROKER", default_value = super::DEFAULT_BROKER, global = true)]
    pub broker: String,
    /// The topic root of the farm.
    #[arg(long, env = "PRINTLOOP_TOPIC_ROOT", default_value = protocol::DEFAULT_ROOT, global = true)]
    pub topic_root: String,
    /// How long to wait for the broker and for each answer of the supervisor, in seconds.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=3600),
        global = true
    )]
    pub timeout: u64,
    /// MQTT user name; the password is read from PRINTLOOP_MQTT_PASSWORD.
    #[arg(long, env = "PRINTLOOP_MQTT_USERNAME", global = true)]
    pub username: Option<String>,
}

impl ConnArgs {
    /// The endpoint these arguments name.
    pub fn endpoint(&self) -> Result<Endpoint, OpsError> {
        let mut ep = Endpoint::new(
            &self.broker,
            &self.topic_root,
            Duration::from_secs(self.timeout),
        )?;
        ep.credentials = self.username.as_ref().map(|u| Credentials {
            username: u.clone(),
            password: std::env::var("PRINTLOOP_MQTT_PASSWORD").unwrap_or_default(),
        });
        Ok(ep)
    }
}

/// `printloop jobs …`
#[derive(Debug, Args)]
pub struct JobsArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[command(subcommand)]
    command: JobsCommand,
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// Upload a G-code file (resuming a cut upload) and queue it; prints the job ids.
    Add(AddArgs),
    /// List the queued and running jobs (with --all, ended ones too).
    List(ListArgs),
    /// Cancel a job: a queued job leaves the queue, a running one is stopped.
    Cancel {
        /// The job.
        job: JobId,
    },
    /// Put an ended job back in the queue (a new attempt with a new id).
    Requeue {
        /// The job.
        job: JobId,
    },
    /// Change a queued job's priority (higher runs first).
    Priority {
        /// The job.
        job: JobId,
        /// The new priority.
        #[arg(allow_negative_numbers = true)]
        priority: i32,
    },
}

#[derive(Debug, Args)]
struct AddArgs {
    /// The G-code file.
    file: PathBuf,
    /// How many copies (each is its own job).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    copies: u32,
    /// Higher runs first; equal priorities run in submission order.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Only printers with this tag may take it (repeat for several).
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// The job's name (default: the file name).
    #[arg(long)]
    name: Option<String>,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Include ended jobs (history), newest first.
    #[arg(long)]
    all: bool,
    /// At most this many jobs (the supervisor's default is 100).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: Option<u32>,
    /// One JSON object per job and line instead of a table.
    #[arg(long)]
    json: bool,
}

/// `printloop printers`
#[derive(Debug, Args)]
pub struct PrintersArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// One JSON object per printer and line instead of a table.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: Option<PrintersCommand>,
}

#[derive(Debug, Subcommand)]
enum PrintersCommand {
    /// Pause the job printing on a printer.
    Pause {
        /// The printer.
        printer: PrinterId,
    },
    /// Resume a paused printer's job.
    Resume {
        /// The printer.
        printer: PrinterId,
    },
    /// Decommission a printer: the supervisor forgets it, removes its Home Assistant device
    /// and clears its retained topics (stop its gateway first).
    Forget {
        /// The printer.
        printer: PrinterId,
    },
    /// Enrol a printer (on the supervisor's host): register its gateway's MQTT login and
    /// write the gateway's config with its password (for the Pi, or the image's boot file).
    Add(crate::enroll::AddPrinterArgs),
    /// Withdraw a printer's MQTT login (see also `forget`).
    Revoke(crate::enroll::RevokeArgs),
}

/// `printloop bed-clear`
#[derive(Debug, Args)]
pub struct BedClearArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The printer whose bed a person has cleared.
    printer: PrinterId,
    /// The last print was bad: its job goes back to the queue.
    #[arg(long)]
    failed: bool,
}

/// `printloop release`
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The printer held by the circuit breaker.
    printer: PrinterId,
}

/// `printloop watch`
#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Print one frame once the retained snapshot has arrived, then exit.
    #[arg(long)]
    once: bool,
}

fn print(text: &str) -> Result<(), OpsError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(OpsError::Output)
}

fn unexpected(op: &'static str, got: ApiResult) -> OpsError {
    OpsError::UnexpectedAnswer {
        op,
        got: format!("{got:?}"),
    }
}

/// Connects, runs `f`, and disconnects whatever `f` returned.
async fn with_client<T>(
    conn: &ConnArgs,
    f: impl AsyncFnOnce(&mut ApiClient) -> Result<T, OpsError>,
) -> Result<T, OpsError> {
    let ep = conn.endpoint()?;
    let mut client = ApiClient::connect(&ep).await?;
    let result = f(&mut client).await;
    client.close().await;
    result
}

/// `printloop jobs …`
pub async fn jobs(args: JobsArgs) -> Result<(), OpsError> {
    match args.command {
        JobsCommand::Add(add) => jobs_add(&args.conn, add).await,
        JobsCommand::List(list) => {
            let op = ApiOp::ListJobs(ListJobs {
                include_ended: list.all,
                limit: list.limit,
            });
            let jobs = match with_client(&args.conn, async |c| c.request(op).await).await? {
                ApiResult::Jobs { jobs } => jobs,
                other => return Err(unexpected("list_jobs", other)),
            };
            if list.json {
                let lines: String = jobs.iter().map(json_line).collect();
                print(&lines)
            } else if jobs.is_empty() {
                print(if list.all {
                    "no jobs\n"
                } else {
                    "no queued or running jobs (--all shows ended ones)\n"
                })
            } else {
                print(&table::jobs(&jobs, now_ms()))
            }
        }
        JobsCommand::Cancel { job } => {
            let op = ApiOp::CancelJob(JobArgs {
                job_id: job.clone(),
            });
            done(&args.conn, op, &format!("{job}: cancelled\n")).await
        }
        JobsCommand::Requeue { job } => {
            let op = ApiOp::RequeueJob(JobArgs {
                job_id: job.clone(),
            });
            match with_client(&args.conn, async |c| c.request(op).await).await? {
                ApiResult::Submitted { job_ids } => {
                    let ids: Vec<String> = job_ids.iter().map(ToString::to_string).collect();
                    print(&format!("{job}: requeued as {}\n", ids.join(", ")))
                }
                ApiResult::Done {} => print(&format!("{job}: requeued\n")),
                other => Err(unexpected("requeue_job", other)),
            }
        }
        JobsCommand::Priority { job, priority } => {
            let op = ApiOp::SetPriority(SetPriority {
                job_id: job.clone(),
                priority,
            });
            done(&args.conn, op, &format!("{job}: priority {priority}\n")).await
        }
    }
}

fn json_line<T: serde::Serialize>(value: &T) -> String {
    let mut line = serde_json::to_string(value).unwrap_or_default();
    line.push('\n');
    line
}

/// Runs `op` and prints `message` when it is done.
async fn done(conn: &ConnArgs, op: ApiOp, message: &str) -> Result<(), OpsError> {
    let name = super::client::op_name(&op);
    match with_client(conn, async |c| c.request(op).await).await? {
        ApiResult::Done {} => print(message),
        other => Err(unexpected(name, other)),
    }
}

async fn jobs_add(conn: &ConnArgs, add: AddArgs) -> Result<(), OpsError> {
    // Check the file before touching the network: a wrong file fails fast, even offline.
    let file = gcode::inspect(&add.file)?;
    let ep = conn.endpoint()?;
    eprintln!(
        "{}: {} bytes, {} lines of G-code, sha256 {}",
        add.file.display(),
        file.size,
        file.command_lines,
        file.sha256
    );
    let show_progress = std::io::stderr().is_terminal();
    let mut client = ApiClient::connect(&ep).await?;
    let result = async {
        client
            .upload(&file, |received, total| {
                if show_progress {
                    let pct = received as f64 * 100.0 / total.max(1) as f64;
                    eprint!("\ruploading: {pct:5.1}% ({received} of {total} bytes)");
                    if received == total {
                        eprintln!();
                    }
                }
            })
            .await?;
        let op = ApiOp::SubmitJob(SubmitJob {
            name: add.name.unwrap_or_else(|| file.name.clone()),
            sha256: file.sha256.clone(),
            copies: add.copies,
            priority: add.priority,
            tags: add.tags,
        });
        match client.request(op).await? {
            ApiResult::Submitted { job_ids } => Ok(job_ids),
            other => Err(unexpected("submit_job", other)),
        }
    }
    .await;
    client.close().await;
    let ids = result?;
    print(&ids.iter().map(|id| format!("{id}\n")).collect::<String>())
}

/// `printloop printers`
pub async fn printers(args: PrintersArgs) -> Result<(), OpsError> {
    match args.command {
        Some(PrintersCommand::Add(a)) => return Ok(crate::enroll::add_printer(a)?),
        Some(PrintersCommand::Revoke(a)) => return Ok(crate::enroll::revoke_printer(a)?),
        Some(PrintersCommand::Pause { printer }) => {
            let message = format!("{printer}: pause sent\n");
            let op = ApiOp::PausePrinter(PrinterArgs {
                printer_id: printer,
            });
            return done(&args.conn, op, &message).await;
        }
        Some(PrintersCommand::Resume { printer }) => {
            let message = format!("{printer}: resume sent\n");
            let op = ApiOp::ResumePrinter(PrinterArgs {
                printer_id: printer,
            });
            return done(&args.conn, op, &message).await;
        }
        Some(PrintersCommand::Forget { printer }) => {
            let message = format!("{printer}: forgotten\n");
            let op = ApiOp::ForgetPrinter(PrinterArgs {
                printer_id: printer,
            });
            return done(&args.conn, op, &message).await;
        }
        None => {}
    }
    let op = ApiOp::ListPrinters(NoArgs {});
    let printers = match with_client(&args.conn, async |c| c.request(op).await).await? {
        ApiResult::Printers { printers } => printers,
        other => return Err(unexpected("list_printers", other)),
    };
    if args.json {
        print(&printers.iter().map(json_line).collect::<String>())
    } else if printers.is_empty() {
        print("no printers known to the supervisor\n")
    } else {
        print(&table::printers(&printers))
    }
}

/// `printloop bed-clear`
pub async fn bed_clear(args: BedClearArgs) -> Result<(), OpsError> {
    let message = if args.failed {
        format!(
            "{}: bed marked clear; its last print was marked failed and goes back to the queue\n",
            args.printer
        )
    } else {
        format!("{}: bed marked clear\n", args.printer)
    };
    let op = ApiOp::BedClear(BedClear {
        printer_id: args.printer,
        failed: args.failed,
    });
    done(&args.conn, op, &message).await
}

/// `printloop release`
pub async fn release(args: ReleaseArgs) -> Result<(), OpsError> {
    let message = format!("{}: released, it takes work again\n", args.printer);
    let op = ApiOp::ReleasePrinter(PrinterArgs {
        printer_id: args.printer,
    });
    done(&args.conn, op, &message).await
}

/// `printloop watch`
pub async fn watch(args: WatchArgs) -> Result<(), OpsError> {
    watch::run(&args.conn.endpoint()?, args.once).await
}
