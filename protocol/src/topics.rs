//! The topic tree, under a configurable, versioned root (default `printloop/v1`).
//!
//! | topic (under the root)              | writer            | QoS | retained |
//! |-------------------------------------|-------------------|-----|----------|
//! | `printers/<id>/status`              | gateway + its will| 1   | yes      |
//! | `printers/<id>/meta`                | gateway           | 1   | yes      |
//! | `printers/<id>/state`               | gateway           | 1   | yes      |
//! | `printers/<id>/events`              | gateway           | 1   | no       |
//! | `printers/<id>/cmd`                 | supervisor, users | 1   | never    |
//! | `printers/<id>/cmd/result`          | gateway           | 1   | no       |
//! | `printers/<id>/file/request`        | gateway           | 1   | no       |
//! | `printers/<id>/file/chunk`          | supervisor        | 1   | no       |
//! | `supervisor/status`                 | supervisor + will | 1   | yes      |
//! | `queue`                             | supervisor        | 1   | yes      |
//! | `api/request`                       | operators' tools  | 1   | no       |
//! | `api/response/<client>`             | supervisor        | 1   | no       |
//! | `ha/printers/<id>/press`            | Home Assistant    | 0   | no       |
//!
//! Everything a gateway writes or reads is under `printers/<its id>/`, so one broker ACL
//! pattern confines a gateway's credentials to its own printer (see `docs/mosquitto.conf`).

use crate::ids::{ClientId, IdError, PrinterId};

/// The default topic root.
pub const DEFAULT_ROOT: &str = "printloop/v1";

/// What is wrong with a topic root or a topic name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The configured root cannot be used.
    #[error("invalid topic root {root:?}: {why}")]
    BadRoot {
        /// The rejected root.
        root: String,
        /// Why.
        why: &'static str,
    },
    /// The topic is not under this root.
    #[error("topic {0:?} is not under the root")]
    OutsideRoot(String),
    /// Under the root, but not a topic of the tree.
    #[error("unknown topic {0:?}")]
    Unknown(String),
    /// A level that must be an id is not a valid one.
    #[error("topic {topic:?}: {source}")]
    BadId {
        /// The topic.
        topic: String,
        /// The id error.
        source: IdError,
    },
}

/// One topic of the tree, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// `printers/<id>/status`: presence (birth and will).
    Status(PrinterId),
    /// `printers/<id>/meta`: what the printer is.
    Meta(PrinterId),
    /// `printers/<id>/state`: the full state snapshot.
    State(PrinterId),
    /// `printers/<id>/events`: things that happened.
    Events(PrinterId),
    /// `printers/<id>/cmd`: commands to the gateway.
    Cmd(PrinterId),
    /// `printers/<id>/cmd/result`: the gateway's answer to each command.
    CmdResult(PrinterId),
    /// `printers/<id>/file/request`: the gateway asks for a file chunk.
    FileRequest(PrinterId),
    /// `printers/<id>/file/chunk`: the supervisor's answer with the chunk.
    FileChunk(PrinterId),
    /// `supervisor/status`: presence of the supervisor.
    SupervisorStatus,
    /// `queue`: the retained queue snapshot.
    Queue,
    /// `api/request`: operator requests to the supervisor.
    ApiRequest,
    /// `api/response/<client>`: the supervisor's answers to one client.
    ApiResponse(ClientId),
    /// `ha/printers/<id>/press`: a Home Assistant button of printer `<id>` was pressed (the
    /// payload names the action). Outside `printers/<id>/` so a gateway cannot press its own
    /// buttons; only the supervisor reads it.
    HaPress(PrinterId),
}

/// The printer-level topic kinds, for building wildcard filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrinterTopicKind {
    /// `status`
    Status,
    /// `meta`
    Meta,
    /// `state`
    State,
    /// `events`
    Events,
    /// `cmd`
    Cmd,
    /// `cmd/result`
    CmdResult,
    /// `file/request`
    FileRequest,
    /// `file/chunk`
    FileChunk,
}

impl PrinterTopicKind {
    /// Every kind, in tree order.
    pub const ALL: [PrinterTopicKind; 8] = [
        Self::Status,
        Self::Meta,
        Self::State,
        Self::Events,
        Self::Cmd,
        Self::CmdResult,
        Self::FileRequest,
        Self::FileChunk,
    ];

    /// The topic levels after `printers/<id>/`.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Meta => "meta",
            Self::State => "state",
            Self::Events => "events",
            Self::Cmd => "cmd",
            Self::CmdResult => "cmd/result",
            Self::FileRequest => "file/request",
            Self::FileChunk => "file/chunk",
        }
    }

    fn from_suffix(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.suffix() == s)
    }
}

impl Topic {
    /// The printer this topic belongs to, if any.
    pub fn printer(&self) -> Option<&PrinterId> {
        match self {
            Topic::Status(p)
            | Topic::Meta(p)
            | Topic::State(p)
            | Topic::Events(p)
            | Topic::Cmd(p)
            | Topic::CmdResult(p)
            | Topic::FileRequest(p)
            | Topic::FileChunk(p) => Some(p),
            _ => None,
        }
    }

    /// Whether the writer publishes this topic retained.
    pub fn retained(&self) -> bool {
        matches!(
            self,
            Topic::Status(_)
                | Topic::Meta(_)
                | Topic::State(_)
                | Topic::SupervisorStatus
                | Topic::Queue
        )
    }

    fn printer_parts(&self) -> Option<(&PrinterId, PrinterTopicKind)> {
        let kind = match self {
            Topic::Status(_) => PrinterTopicKind::Status,
            Topic::Meta(_) => PrinterTopicKind::Meta,
            Topic::State(_) => PrinterTopicKind::State,
            Topic::Events(_) => PrinterTopicKind::Events,
            Topic::Cmd(_) => PrinterTopicKind::Cmd,
            Topic::CmdResult(_) => PrinterTopicKind::CmdResult,
            Topic::FileRequest(_) => PrinterTopicKind::FileRequest,
            Topic::FileChunk(_) => PrinterTopicKind::FileChunk,
            _ => return None,
        };
        self.printer().map(|p| (p, kind))
    }
}

/// Formats and parses topics under one root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    root: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            root: DEFAULT_ROOT.to_owned(),
        }
    }
}

impl Topics {
    /// A tree under `root`, e.g. `printloop/v1` or `farm-a/printloop/v1`.
    pub fn new(root: impl Into<String>) -> Result<Self, TopicError> {
        let root = root.into();
        let bad = |why| TopicError::BadRoot {
            root: root.clone(),
            why,
        };
        if root.is_empty() {
            return Err(bad("empty"));
        }
        if root.len() > 128 {
            return Err(bad("longer than 128 bytes"));
        }
        if root.starts_with('/') || root.ends_with('/') {
            return Err(bad("starts or ends with '/'"));
        }
        if root.split('/').any(str::is_empty) {
            return Err(bad("has an empty level"));
        }
        if root.contains(['+', '#', '\0']) {
            return Err(bad("contains a wildcard or NUL"));
        }
        if root.starts_with('$') {
            return Err(bad("starts with '$' (reserved by brokers)"));
        }
        Ok(Self { root })
    }

    /// The root.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The topic name of `topic`.
    pub fn format(&self, topic: &Topic) -> String {
        let root = &self.root;
        if let Some((printer, kind)) = topic.printer_parts() {
            return format!("{root}/printers/{printer}/{}", kind.suffix());
        }
        match topic {
            Topic::SupervisorStatus => format!("{root}/supervisor/status"),
            Topic::Queue => format!("{root}/queue"),
            Topic::ApiRequest => format!("{root}/api/request"),
            Topic::ApiResponse(client) => format!("{root}/api/response/{client}"),
            Topic::HaPress(printer) => format!("{root}/ha/printers/{printer}/press"),
            _ => unreachable!("printer topics are formatted above"),
        }
    }

    /// A filter matching `kind` for every printer, e.g. `printloop/v1/printers/+/state`.
    pub fn all_printers(&self, kind: PrinterTopicKind) -> String {
        format!("{}/printers/+/{}", self.root, kind.suffix())
    }

    /// A filter matching every topic of one printer.
    pub fn printer_all(&self, printer: &PrinterId) -> String {
        format!("{}/printers/{printer}/#", self.root)
    }

    /// Parses a topic name of this tree.
    pub fn parse(&self, topic: &str) -> Result<Topic, TopicError> {
        let rest = topic
            .strip_prefix(self.root.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| TopicError::OutsideRoot(topic.to_owned()))?;
        let unknown = || TopicError::Unknown(topic.to_owned());
        let bad_id = |source| TopicError::BadId {
            topic: topic.to_owned(),
            source,
        };
        if let Some(after) = rest.strip_prefix("printers/") {
            let (id, suffix) = after.split_once('/').ok_or_else(unknown)?;
            let kind = PrinterTopicKind::from_suffix(suffix).ok_or_else(unknown)?;
            let p = PrinterId::new(id).map_err(bad_id)?;
            return Ok(match kind {
                PrinterTopicKind::Status => Topic::Status(p),
                PrinterTopicKind::Meta => Topic::Meta(p),
                PrinterTopicKind::State => Topic::State(p),
                PrinterTopicKind::Events => Topic::Events(p),
                PrinterTopicKind::Cmd => Topic::Cmd(p),
                PrinterTopicKind::CmdResult => Topic::CmdResult(p),
                PrinterTopicKind::FileRequest => Topic::FileRequest(p),
                PrinterTopicKind::FileChunk => Topic::FileChunk(p),
            });
        }
        if let Some(id) = rest
            .strip_prefix("ha/printers/")
            .and_then(|r| r.strip_suffix("/press"))
        {
            return PrinterId::new(id).map(Topic::HaPress).map_err(bad_id);
        }
        if let Some(client) = rest.strip_prefix("api/response/") {
            return ClientId::new(client)
                .map(Topic::ApiResponse)
                .map_err(bad_id);
        }
        match rest {
            "supervisor/status" => Ok(Topic::SupervisorStatus),
            "queue" => Ok(Topic::Queue),
            "api/request" => Ok(Topic::ApiRequest),
            _ => Err(unknown()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> PrinterId {
        PrinterId::new(s).expect("valid id")
    }

    #[test]
    fn formats_the_documented_tree() {
        let t = Topics::default();
        let cases = [
            (Topic::Status(p("p0")), "printloop/v1/printers/p0/status"),
            (Topic::Meta(p("p0")), "printloop/v1/printers/p0/meta"),
            (Topic::State(p("p0")), "printloop/v1/printers/p0/state"),
            (Topic::Events(p("p0")), "printloop/v1/printers/p0/events"),
            (Topic::Cmd(p("p0")), "printloop/v1/printers/p0/cmd"),
            (
                Topic::CmdResult(p("p0")),
                "printloop/v1/printers/p0/cmd/result",
            ),
            (
                Topic::FileRequest(p("p0")),
                "printloop/v1/printers/p0/file/request",
            ),
            (
                Topic::FileChunk(p("p0")),
                "printloop/v1/printers/p0/file/chunk",
            ),
            (Topic::SupervisorStatus, "printloop/v1/supervisor/status"),
            (Topic::Queue, "printloop/v1/queue"),
            (Topic::ApiRequest, "printloop/v1/api/request"),
            (
                Topic::ApiResponse(ClientId::new("cli-1").expect("valid")),
                "printloop/v1/api/response/cli-1",
            ),
            (Topic::HaPress(p("p0")), "printloop/v1/ha/printers/p0/press"),
        ];
        for (topic, name) in cases {
            assert_eq!(t.format(&topic), name);
            assert_eq!(t.parse(name).as_ref(), Ok(&topic));
        }
        assert_eq!(
            t.all_printers(PrinterTopicKind::CmdResult),
            "printloop/v1/printers/+/cmd/result"
        );
    }

    #[test]
    fn rejects_foreign_and_bad_topics() {
        let t = Topics::default();
        assert!(matches!(
            t.parse("other/printers/p0/state"),
            Err(TopicError::OutsideRoot(_))
        ));
        assert!(matches!(
            t.parse("printloop/v1x/queue"),
            Err(TopicError::OutsideRoot(_))
        ));
        assert!(matches!(
            t.parse("printloop/v1/printers/p0/nope"),
            Err(TopicError::Unknown(_))
        ));
        assert!(matches!(
            t.parse("printloop/v1/printers/p0"),
            Err(TopicError::Unknown(_))
        ));
        assert!(matches!(
            t.parse("printloop/v1/printers/P0/state"),
            Err(TopicError::BadId { .. })
        ));
        assert!(matches!(
            t.parse("printloop/v1/queue/x"),
            Err(TopicError::Unknown(_))
        ));
        assert!(matches!(
            t.parse("printloop/v1/api/response/"),
            Err(TopicError::BadId { .. })
        ));
        assert!(matches!(
            t.parse("printloop/v1/ha/printers/a/b/press"),
            Err(TopicError::BadId { .. })
        ));
        assert!(matches!(
            t.parse("printloop/v1/ha/printers/p0/pressed"),
            Err(TopicError::Unknown(_))
        ));
    }

    #[test]
    fn validates_roots() {
        assert!(Topics::new("farm-a/printloop/v1").is_ok());
        for bad in ["", "/x", "x/", "a//b", "a/+/b", "a/#", "$SYS/x"] {
            assert!(Topics::new(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    fn arb_printer() -> impl Strategy<Value = PrinterId> {
        "[a-z0-9][a-z0-9_-]{0,63}".prop_map(|s| PrinterId::new(s).expect("pattern matches"))
    }

    fn arb_topic() -> impl Strategy<Value = Topic> {
        prop_oneof![
            arb_printer().prop_map(Topic::Status),
            arb_printer().prop_map(Topic::Meta),
            arb_printer().prop_map(Topic::State),
            arb_printer().prop_map(Topic::Events),
            arb_printer().prop_map(Topic::Cmd),
            arb_printer().prop_map(Topic::CmdResult),
            arb_printer().prop_map(Topic::FileRequest),
            arb_printer().prop_map(Topic::FileChunk),
            Just(Topic::SupervisorStatus),
            Just(Topic::Queue),
            Just(Topic::ApiRequest),
            arb_printer().prop_map(Topic::HaPress),
            "[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
                .prop_map(|s| Topic::ApiResponse(ClientId::new(s).expect("pattern matches"))),
        ]
    }

    proptest! {
        #[test]
        fn format_parse_round_trip(
            root in "[a-z][a-z0-9_-]{0,10}(/[a-z0-9_-]{1,10}){0,3}",
            topic in arb_topic(),
        ) {
            let t = Topics::new(root).expect("generated roots are valid");
            let name = t.format(&topic);
            prop_assert_eq!(t.parse(&name), Ok(topic));
        }

        #[test]
        fn parse_never_panics(name in "\\PC{0,80}") {
            let _ = Topics::default().parse(&name);
            let _ = Topics::default().parse(&format!("printloop/v1/{name}"));
        }
    }
}
