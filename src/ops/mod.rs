//! The operator's tools: talk to the supervisor's API over MQTT and watch the fleet.
//!
//! - [`Endpoint`]: where the broker is, the topic root, the answer timeout, credentials.
//! - [`ApiClient`]: one MQTT connection with a unique client id (`cli-<pid>-<random>`); it
//!   subscribes to its user's response topic (`api/response/cli`, shared by every run, so a
//!   broker holds one topic per user, not one per run) before it publishes anything, sends one
//!   request at a time and waits (bounded) for the answer with the same correlation id.
//! - [`gcode::inspect`]: checks a file is plain-text G-code and hashes it, streaming.
//! - [`table`]: the tables `jobs list` and `printers` print.
//! - [`watch`]: a fleet view built from the retained `state`/`status`/`queue` topics (pure:
//!   bytes and the time in, lines out) and the loop that draws it.
//! - [`cli`]: the subcommands' arguments and their thin shells.
//!
//! The MQTT event loop runs in its own task ([`mqtt`]); nothing is published from it. Every
//! wait is bounded by the endpoint's timeout.

pub mod cli;
mod client;
pub mod gcode;
mod mqtt;
pub mod table;
pub mod watch;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use protocol::api::ApiErrorCode;
use protocol::Topics;

pub use client::{ApiClient, CHUNK_SIZE};

/// The default broker URL.
pub const DEFAULT_BROKER: &str = "mqtt://127.0.0.1:1883";

/// Where the broker is: `mqtt://host[:port]` or `mqtts://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port (default 1883, or 8883 with TLS).
    pub port: u16,
    /// TLS with the system's root certificates.
    pub tls: bool,
}

impl BrokerUrl {
    /// Parses `mqtt://host[:port]` or `mqtts://host[:port]`; IPv6 hosts go in brackets
    /// (the project's one parser, [`transport::BrokerAddr::parse`]).
    pub fn parse(url: &str) -> Result<Self, OpsError> {
        let addr = transport::BrokerAddr::parse(url).map_err(|e| OpsError::BadBrokerUrl {
            url: url.to_owned(),
            reason: e.0,
        })?;
        Ok(BrokerUrl {
            host: addr.host,
            port: addr.port,
            tls: addr.tls,
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// A user name and password for the broker.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password (never printed).
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Everything needed to reach the supervisor.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The broker.
    pub broker: BrokerUrl,
    /// The topic tree.
    pub topics: Topics,
    /// How long to wait for the broker's and the supervisor's answers.
    pub timeout: Duration,
    /// Broker credentials, if it asks for them.
    pub credentials: Option<Credentials>,
}

impl Endpoint {
    /// An endpoint from the command line's strings.
    pub fn new(broker: &str, root: &str, timeout: Duration) -> Result<Self, OpsError> {
        Ok(Endpoint {
            broker: BrokerUrl::parse(broker)?,
            topics: Topics::new(root).map_err(OpsError::BadTopicRoot)?,
            timeout,
            credentials: None,
        })
    }
}

/// What went wrong talking to the supervisor or reading a file.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Enrolment (`printers add`, `printers revoke`) failed.
    #[error(transparent)]
    Enroll(#[from] crate::enroll::EnrollError),
    /// `--broker` is not a broker URL.
    #[error("invalid broker URL {url:?}: {reason}")]
    BadBrokerUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--topic-root` is not a usable root.
    #[error("{0}")]
    BadTopicRoot(#[source] protocol::TopicError),
    /// The broker could not be reached or refused us.
    #[error("cannot connect to the broker at {broker}: {reason}")]
    Connect {
        /// The broker URL.
        broker: String,
        /// Why (connection refused, bad credentials, …).
        reason: String,
    },
    /// The broker accepted the connection but did not acknowledge something in time.
    #[error("no answer from the broker at {broker} within {secs} s while {what}")]
    BrokerTimeout {
        /// The broker URL.
        broker: String,
        /// What we waited for.
        what: &'static str,
        /// The timeout.
        secs: u64,
    },
    /// The broker refused a subscription (an ACL, usually).
    #[error("the broker at {broker} refused the subscription to {filter} (check its ACL)")]
    SubscribeRefused {
        /// The broker URL.
        broker: String,
        /// The topic filter.
        filter: String,
    },
    /// The connection broke while waiting.
    #[error("lost the connection to the broker at {broker}: {reason}")]
    ConnectionLost {
        /// The broker URL.
        broker: String,
        /// Why.
        reason: String,
    },
    /// The supervisor did not answer in time.
    #[error(
        "no answer from the supervisor at {broker} within {secs} s (is `printloop supervisor` running?)"
    )]
    NoAnswer {
        /// The broker URL.
        broker: String,
        /// The timeout.
        secs: u64,
    },
    /// The supervisor answered `ok: false`.
    #[error("{op} failed ({}): {error}", code_name(code))]
    Refused {
        /// The operation.
        op: &'static str,
        /// The supervisor's reason, for people.
        error: String,
        /// The supervisor's reason, for programs (`None` from a supervisor older than codes).
        code: Option<ApiErrorCode>,
    },
    /// The supervisor answered `ok: true` with something this operation does not return.
    #[error("unexpected answer to {op} from the supervisor: {got}")]
    UnexpectedAnswer {
        /// The operation.
        op: &'static str,
        /// What came back.
        got: String,
    },
    /// The supervisor's upload answers make no sense or make no progress.
    #[error("uploading {path}: {reason}")]
    Upload {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The file is not plain-text G-code.
    #[error("{path}: not a G-code file: {reason}")]
    NotGcode {
        /// The file.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// Reading a file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Writing to the terminal failed.
    #[error("writing the output: {0}")]
    Output(#[source] std::io::Error),
}

/// Unix time in milliseconds (0 if the clock is before 1970).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Replaces control characters (terminal escapes in a job name, say) so that text from the
/// network cannot move the cursor or recolour the terminal; cuts it at `max` characters.
pub(crate) fn printable(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(max)
        .collect();
    if s.chars().count() > max && max > 0 {
        out.pop();
        out.push('…');
    }
    out
}

/// An API error code as it reads on the wire (`printer_not_done`), for messages scripts match.
fn code_name(code: &Option<ApiErrorCode>) -> String {
    code.and_then(|c| serde_json::to_value(c).ok())
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "no code".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let ok = |s: &str| BrokerUrl::parse(s).expect(s);
        assert_eq!(
            ok("mqtt://127.0.0.1:1884"),
            BrokerUrl {
                host: "127.0.0.1".into(),
                port: 1884,
                tls: false
            }
        );
        assert_eq!(ok("mqtt://broker.farm").port, 1883);
        assert_eq!(ok("mqtts://broker.farm/").port, 8883);
        assert!(ok("mqtts://broker.farm").tls);
        let v6 = ok("mqtt://[::1]:1999");
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 1999));
        assert_eq!(v6.to_string(), "mqtt://[::1]:1999");
        assert_eq!(ok("mqtt://[::1]").port, 1883);
        assert_eq!(ok("mqtt://h").to_string(), "mqtt://h:1883");
        for bad in [
            "tcp://x",
            "127.0.0.1:1883",
            "mqtt://",
            "mqtt://:1883",
            "mqtt://h:0",
            "mqtt://h:99999",
            "mqtt://h:x",
            "mqtt://u:p@h:1",
            "mqtt://h:1/path",
            "mqtt://::1",
            "mqtt://[::1",
            "mqtt://[::1]x",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn printable_text() {
        assert_eq!(printable("cube\x1b[2J.gcode", 40), "cube?[2J.gcode");
        assert_eq!(printable("abcdef", 4), "abc…");
        assert_eq!(printable("abcd", 4), "abcd");
    }
}
