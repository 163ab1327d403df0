//! Enrolment: `printloop printers add|revoke` and `printloop clients …`, run on the
//! supervisor's host. They change the client registry (`<data_dir>/clients.toml`, see
//! [`broker::clients`]) and write what each client needs: a printer's whole gateway config (the
//! Pi's `/etc/printloop/gateway.toml`, or the image's first-boot file), another client's
//! password, Mosquitto's password file and ACL. The embedded broker reads the registry again
//! when it changes; Mosquitto needs its files written again and a reload.
use std::path::{Path, PathBuf};

use broker::clients::{Clients, ClientsError, Role};
use clap::{Args, Subcommand};
use protocol::PrinterId;

/// Where the registry lives: the supervisor's data directory.
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// The supervisor's config file, to find its data directory (default:
    /// /etc/printloop/supervisor.toml when it exists).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The supervisor's data directory (wins over the config file; default: printloop-data).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

impl RegistryArgs {
    /// The registry file these arguments name.
    pub fn path(&self) -> Result<PathBuf, EnrollError> {
        let config = self.config.clone().or_else(|| {
            let packaged = PathBuf::from("/etc/printloop/supervisor.toml");
            (self.data_dir.is_none() && packaged.exists()).then_some(packaged)
        });
        let data_dir = supervisor::cli::data_dir(config.as_deref(), self.data_dir.clone())
            .map_err(|e| EnrollError::Config(e.to_string()))?;
        Ok(data_dir.join(supervisor::run::CLIENTS_FILE))
    }
}

/// `printloop printers add`
#[derive(Debug, Clone, Args)]
pub struct AddPrinterArgs {
    /// The printer's id (a-z, 0-9, '-', '_'); also its gateway's MQTT user name.
    pub printer: PrinterId,
    /// The broker URL the gateway will use, as seen from the Pi (mqtt://HOST:1883, or
    /// mqtts://HOST:8883 with --ca-file).
    #[arg(long, value_name = "URL")]
    pub broker_url: String,
    /// The CA certificate (PEM) the gateway checks the broker against; written into the
    /// config as /etc/printloop/ca.pem (copy the file there).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// The printer's serial device on the Pi; prefer /dev/serial/by-id/… (stable across
    /// re-plugging).
    #[arg(long, default_value = "/dev/ttyUSB0")]
    pub serial: String,
    /// Baud rate.
    #[arg(long, default_value_t = 115_200)]
    pub baud: u32,
    /// Where to write the gateway config (default: ./<id>-printloop-gateway.toml).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// The printer is enrolled already: give it a new password (the old one stops working).
    #[arg(long)]
    pub rotate: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// `printloop printers revoke`
#[derive(Debug, Clone, Args)]
pub struct RevokeArgs {
    /// The printer whose gateway may no longer log in.
    pub printer: PrinterId,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// `printloop clients`
#[derive(Debug, Args)]
pub struct ClientsArgs {
    #[command(subcommand)]
    command: ClientsCommand,
}

#[derive(Debug, Subcommand)]
enum ClientsCommand {
    /// Register a client (not a printer: use `printloop printers add`) and print its password.
    Add {
        /// User name (a-z, 0-9, '-', '_').
        user: String,
        /// supervisor, homeassistant, nodered or operator.
        #[arg(long)]
        role: Role,
        /// Write the password to this file (mode 0600) instead of printing it.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Give a client a new password (the old one stops working) and print it.
    Rotate {
        /// User name.
        user: String,
        /// Write the password to this file (mode 0600) instead of printing it.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Remove a client: it can no longer log in.
    Remove {
        /// User name.
        user: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// List the clients and their roles (never a password or hash).
    List {
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Write Mosquitto's password file and topic ACL from the registry
    /// (`printloop.passwd`, `printloop.acl`); then reload Mosquitto.
    Mosquitto {
        /// The directory to write them to (e.g. /etc/mosquitto/printloop).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The farm's topic root.
        #[arg(long, default_value = protocol::DEFAULT_ROOT)]
        topic_root: String,
        /// Home Assistant's discovery prefix.
        #[arg(long, default_value = "homeassistant")]
        ha_prefix: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The registry.
    #[error(transparent)]
    Clients(#[from] ClientsError),
    /// The supervisor's config.
    #[error("supervisor config: {0}")]
    Config(String),
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
    /// Writing output failed.
    #[error("{}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// `printloop printers add`: registers the gateway and writes its config.
pub fn add_printer(args: AddPrinterArgs) -> Result<(), EnrollError> {
    let url = transport::BrokerAddr::parse(&args.broker_url)
        .map_err(|e| EnrollError::Invalid(format!("--broker-url {:?}: {e}", args.broker_url)))?;
    if url.tls && args.ca_file.is_none() {
        eprintln!(
            "note: no --ca-file: the gateway will check the broker's certificate against the \
             system's CA roots"
        );
    }
    if let Some(ca) = &args.ca_file {
        std::fs::metadata(ca).map_err(|source| EnrollError::Write {
            path: ca.clone(),
            source,
        })?;
    }
    let path = args.registry.path()?;
    let mut clients = Clients::load(&path)?;
    let id = args.printer.as_str();
    let password = match clients.get(id) {
        Some(c) if c.role != Role::Gateway => {
            return Err(EnrollError::Invalid(format!(
                "{id:?} is registered as a {} client: a printer needs a name of its own",
                c.role
            )))
        }
        Some(_) if args.rotate => clients.rotate(id)?,
        Some(_) => {
            return Err(EnrollError::Invalid(format!(
                "printer {id} is enrolled already: pass --rotate to give it a new password \
                 (its gateway must then get the new config), or `printloop printers revoke {id}`"
            )))
        }
        None => clients.add(id, Role::Gateway)?,
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{id}-printloop-gateway.toml")));
    let text = gateway_config(&args, &password);
    // The config first: a registry entry whose password nobody has is worse than a file whose
    // printer is not registered yet (that one is repaired by running the command again).
    broker::clients::write_private(&out, text.as_bytes(), 0o600)?;
    clients.save(&path)?;
    println!(
        "enrolled printer {id} (registry: {})\nits gateway config, with its password: {}\n\n\
         On the Pi: copy it to /etc/printloop/gateway.toml (`apt install ./printloop-gateway_*.deb`)\n\
         or onto the SD card's boot partition as printloop-gateway.toml (the printloop image),\n\
         set [serial] port, and start the gateway. Keep the file private.{}\n\
         With Mosquitto: `printloop clients mosquitto --out /etc/mosquitto/printloop`, then reload it.",
        path.display(),
        out.display(),
        if args.ca_file.is_some() {
            "\nCopy the CA certificate to /etc/printloop/ca.pem on the Pi."
        } else {
            ""
        }
    );
    Ok(())
}

/// The gateway config `printloop printers add` writes (also the image's first-boot file).
pub fn gateway_config(args: &AddPrinterArgs, password: &str) -> String {
    let id = args.printer.as_str();
    let ca = if args.ca_file.is_some() {
        "ca_file = \"/etc/printloop/ca.pem\"\n".to_owned()
    } else {
        "# ca_file = \"/etc/printloop/ca.pem\"   # for mqtts:// with your own CA\n".to_owned()
    };
    format!(
        r#"# printloop-gateway config for printer {id}, made by `printloop printers add {id}`.
# Put it on the Pi as /etc/printloop/gateway.toml (Debian package), or on the SD card's boot
# partition as printloop-gateway.toml (the printloop image reads it at first boot).
# It holds the printer's MQTT password: keep it private, delete copies you no longer need.
id = "{id}"
# name = "{id}"                      # for people
# model = "Prusa MK3S"
# tags = ["pla", "0.4mm"]            # jobs can require tags
data_dir = "/var/lib/printloop/gateway"

[broker]
url = {url}
username = "{id}"
password = {password}
{ca}
[serial]
# Prefer the stable name under /dev/serial/by-id/ (`ls -l /dev/serial/by-id/`): /dev/ttyUSB0
# and /dev/ttyACM0 can swap between two printers when their cables are re-plugged.
port = {serial}
baud = {baud}

# Only read from the image's boot partition at first boot (docs/raspberry-pi.md):
# [system]
# hostname = "printloop-{id}"
# timezone = "Europe/Berlin"
# wifi_ssid = "farm"
# wifi_password = "…"
# wifi_country = "DE"
# ssh_authorized_key = "ssh-ed25519 AAAA… you@laptop"
"#,
        url = toml_string(&args.broker_url),
        serial = toml_string(&args.serial),
        password = toml_string(password),
        baud = args.baud,
    )
}

/// `s` as a TOML string literal, escaped.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// `printloop printers revoke`
pub fn revoke_printer(args: RevokeArgs) -> Result<(), EnrollError> {
    let path = args.registry.path()?;
    let mut clients = Clients::load(&path)?;
    let id = args.printer.as_str();
    match clients.get(id) {
        Some(c) if c.role == Role::Gateway => {}
        Some(c) => {
            return Err(EnrollError::Invalid(format!(
                "{id:?} is a {} client, not a printer: use `printloop clients remove`",
                c.role
            )))
        }
        None => return Err(ClientsError::Unknown(id.to_owned()).into()),
    }
    clients.remove(id)?;
    clients.save(&path)?;
    println!(
        "printer {id} can no longer log in (new connections; the embedded broker reads the \
         registry again at once, Mosquitto after `printloop clients mosquitto` and a reload).\n\
         To remove it from the supervisor's view too: `printloop printers forget {id}`."
    );
    Ok(())
}

/// `printloop clients …`
pub fn clients(args: ClientsArgs) -> Result<(), EnrollError> {
    match args.command {
        ClientsCommand::Add {
            user,
            role,
            password_file,
            registry,
        } => {
            if role == Role::Gateway {
                return Err(EnrollError::Invalid(
                    "a gateway is enrolled with `printloop printers add <id> --broker-url …`, \
                     which also writes its config"
                        .into(),
                ));
            }
            let path = registry.path()?;
            let mut clients = Clients::load(&path)?;
            let password = clients.add(&user, role)?;
            give_password(&user, &password, password_file.as_deref())?;
            clients.save(&path)?;
            eprintln!("registered {user} as {role} in {}", path.display());
        }
        ClientsCommand::Rotate {
            user,
            password_file,
            registry,
        } => {
            let path = registry.path()?;
            let mut clients = Clients::load(&path)?;
            if clients.get(&user).is_some_and(|c| c.role == Role::Gateway) {
                return Err(EnrollError::Invalid(format!(
                    "{user} is a printer: `printloop printers add {user} --rotate …` writes its \
                     new config"
                )));
            }
            let password = clients.rotate(&user)?;
            give_password(&user, &password, password_file.as_deref())?;
            clients.save(&path)?;
        }
        ClientsCommand::Remove { user, registry } => {
            let path = registry.path()?;
            let mut clients = Clients::load(&path)?;
            let c = clients.remove(&user)?;
            clients.save(&path)?;
            eprintln!("removed {user} ({})", c.role);
        }
        ClientsCommand::List { registry } => {
            let path = registry.path()?;
            let clients = Clients::load(&path)?;
            if clients.is_empty() {
                eprintln!("no clients registered in {}", path.display());
            }
            for c in clients.iter() {
                println!("{}\t{}", c.user, c.role);
            }
        }
        ClientsCommand::Mosquitto {
            out,
            topic_root,
            ha_prefix,
            registry,
        } => {
            protocol::Topics::new(topic_root.clone())
                .map_err(|e| EnrollError::Invalid(format!("--topic-root: {e}")))?;
            let path = registry.path()?;
            let clients = Clients::load(&path)?;
            let passwd = out.join("printloop.passwd");
            let acl = out.join("printloop.acl");
            broker::clients::write_private(&passwd, clients.mosquitto_passwd().as_bytes(), 0o640)?;
            broker::clients::write_private(
                &acl,
                clients.mosquitto_acl(&topic_root, &ha_prefix).as_bytes(),
                0o640,
            )?;
            println!(
                "wrote {} and {} ({} clients); in mosquitto.conf: password_file {} / acl_file {}; \
                 then reload Mosquitto (systemctl reload mosquitto)",
                passwd.display(),
                acl.display(),
                clients.iter().count(),
                passwd.display(),
                acl.display()
            );
        }
    }
    Ok(())
}

/// `printloop tokens`: the HTTP API's tokens (dashboard, REST, slicers).
#[derive(Debug, Args)]
pub struct TokensArgs {
    #[command(subcommand)]
    command: TokensCommand,
}

#[derive(Debug, Subcommand)]
enum TokensCommand {
    /// Make a token and print it (shown once; only its hash is kept).
    Add {
        /// Its name (letters, digits, '-', '_', '.'): shown in logs and used as its client name.
        name: String,
        /// viewer (reads everything, changes nothing) or operator (also acts).
        #[arg(long, value_enum)]
        role: TokenRole,
        /// Write the token to this file (mode 0600) instead of printing it.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Remove a token: it stops working at once (no restart).
    Remove {
        /// Its name.
        name: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// List the tokens (names and roles; never a token or hash).
    List {
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

/// A token's role on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TokenRole {
    Viewer,
    Operator,
}

fn tokens_path(registry: &RegistryArgs) -> Result<PathBuf, EnrollError> {
    let clients = registry.path()?;
    Ok(clients.with_file_name(supervisor::http::tokens::TOKENS_FILE))
}

/// Runs `printloop tokens`.
pub fn tokens(args: TokensArgs) -> Result<(), EnrollError> {
    use supervisor::http::tokens;
    let bad = |e: tokens::TokensError| EnrollError::Invalid(e.to_string());
    match args.command {
        TokensCommand::Add {
            name,
            role,
            token_file,
            registry,
        } => {
            let path = tokens_path(&registry)?;
            let role = match role {
                TokenRole::Viewer => protocol::web::Role::Viewer,
                TokenRole::Operator => protocol::web::Role::Operator,
            };
            let now_ms = transport::now(std::time::Instant::now()).unix_ms;
            let token = tokens::add(&path, &name, role, now_ms).map_err(bad)?;
            let role = match role {
                protocol::web::Role::Viewer => "viewer",
                protocol::web::Role::Operator => "operator",
            };
            match token_file {
                Some(f) => {
                    broker::clients::write_private(&f, format!("{token}\n").as_bytes(), 0o600)?;
                    eprintln!("token {name:?} ({role}) is in {}", f.display());
                }
                None => {
                    eprintln!(
                        "token {name:?} ({role}), shown once (only its hash is kept in {}):",
                        path.display()
                    );
                    println!("{token}");
                }
            }
        }
        TokensCommand::Remove { name, registry } => {
            let path = tokens_path(&registry)?;
            if tokens::remove(&path, &name).map_err(bad)? {
                eprintln!("token {name:?} removed");
            } else {
                return Err(EnrollError::Invalid(format!("no token named {name:?}")));
            }
        }
        TokensCommand::List { registry } => {
            let path = tokens_path(&registry)?;
            let list = tokens::Tokens::open(path).map_err(bad)?.list();
            if list.is_empty() {
                eprintln!("no tokens (printloop tokens add NAME --role operator)");
            }
            for t in list {
                let role = match t.role {
                    protocol::web::Role::Viewer => "viewer",
                    protocol::web::Role::Operator => "operator",
                };
                println!("{:<24} {role}", t.name);
            }
        }
    }
    Ok(())
}

/// `printloop webhooks`: URLs that get job and printer events (docs/http.md, "Webhooks").
#[derive(Debug, Args)]
pub struct WebhooksArgs {
    #[command(subcommand)]
    command: WebhooksCommand,
}

#[derive(Debug, Subcommand)]
enum WebhooksCommand {
    /// Register a URL; prints the hook's id and its HMAC key (shown once).
    Add {
        /// Where events are POSTed (http:// or https://).
        url: String,
        /// Only these kinds (comma-separated: job.started, job.finished, job.failed,
        /// printer.awaiting_bed_clear, printer.halted); default all.
        #[arg(long, value_delimiter = ',')]
        events: Vec<String>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Remove a hook by id.
    Remove {
        /// Its id (wh-…).
        id: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// List the hooks (never a key).
    List {
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

/// Runs `printloop webhooks`.
pub fn webhooks(args: WebhooksArgs) -> Result<(), EnrollError> {
    use supervisor::http::webhooks::{self, Hook, WEBHOOKS_FILE};
    let bad = |e: webhooks::WebhooksError| EnrollError::Invalid(e.to_string());
    let path_of = |r: &RegistryArgs| r.path().map(|p| p.with_file_name(WEBHOOKS_FILE));
    match args.command {
        WebhooksCommand::Add {
            url,
            events,
            registry,
        } => {
            let mut kinds = Vec::new();
            for e in &events {
                let k = protocol::web::WebhookKind::ALL
                    .into_iter()
                    .find(|k| k.as_str() == e.trim())
                    .ok_or_else(|| EnrollError::Invalid(format!("unknown event kind {e:?}")))?;
                kinds.push(k);
            }
            let now_ms = transport::now(std::time::Instant::now()).unix_ms;
            let hook = webhooks::add(&path_of(&registry)?, &url, kinds, now_ms).map_err(bad)?;
            eprintln!("webhook {} registered; its HMAC key (shown once):", hook.id);
            println!("{} {}", hook.id, hook.secret);
        }
        WebhooksCommand::Remove { id, registry } => {
            if !webhooks::remove(&path_of(&registry)?, &id).map_err(bad)? {
                return Err(EnrollError::Invalid(format!("no webhook {id:?}")));
            }
            eprintln!("webhook {id} removed");
        }
        WebhooksCommand::List { registry } => {
            let hooks: Vec<Hook> = supervisor::http::registry::load(&path_of(&registry)?)
                .map_err(|e| EnrollError::Invalid(e.to_string()))?;
            for h in hooks {
                let kinds: Vec<&str> = h.events.iter().map(|k| k.as_str()).collect();
                let kinds = if kinds.is_empty() {
                    "all".to_owned()
                } else {
                    kinds.join(",")
                };
                println!("{} {} {kinds}", h.id, h.url);
            }
        }
    }
    Ok(())
}

fn give_password(user: &str, password: &str, file: Option<&Path>) -> Result<(), EnrollError> {
    match file {
        Some(f) => {
            broker::clients::write_private(f, format!("{password}\n").as_bytes(), 0o600)?;
            eprintln!("{user}'s password is in {}", f.display());
        }
        None => {
            eprintln!("{user}'s password (shown once; the registry keeps only a hash):");
            println!("{password}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_gateway_config_is_one_the_gateway_accepts() {
        let args = AddPrinterArgs {
            printer: PrinterId::new("p1").expect("id"),
            broker_url: "mqtts://farm.lan:8883".into(),
            ca_file: Some("ca.pem".into()),
            serial: "/dev/serial/by-id/usb-Prusa_MK3-if00".into(),
            baud: 115_200,
            out: None,
            rotate: false,
            registry: RegistryArgs {
                config: None,
                data_dir: None,
            },
        };
        let text = gateway_config(&args, "pw\"with-quote\\");
        let parsed = gateway::config::FileConfig::parse(&text).expect("the gateway accepts it");
        assert_eq!(parsed.broker.password.as_deref(), Some("pw\"with-quote\\"));
        assert_eq!(parsed.id.as_deref(), Some("p1"));
        assert_eq!(parsed.broker.username.as_deref(), Some("p1"));
        assert_eq!(parsed.broker.url.as_deref(), Some("mqtts://farm.lan:8883"));
        assert_eq!(
            parsed.broker.ca_file.as_deref(),
            Some(Path::new("/etc/printloop/ca.pem"))
        );
        assert_eq!(parsed.serial.baud, Some(115_200));
        let made = broker::clients::new_password().expect("password");
        let text = gateway_config(&args, &made);
        let parsed = gateway::config::FileConfig::parse(&text).expect("valid");
        assert_eq!(parsed.broker.password.as_deref(), Some(made.as_str()));
        // The same file, with its [system] section filled in, is the image's first-boot file.
        let boot = text.replace("# [system]", "[system]").replace(
            "# hostname = \"printloop-p1\"",
            "hostname = \"printloop-p1\"",
        );
        let plan = gateway::firstboot::plan(&boot).expect("a valid first-boot file");
        assert_eq!(plan.hostname, "printloop-p1");
    }
}
