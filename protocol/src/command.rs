//! Commands to a gateway (`printers/<id>/cmd`) and its answers (`printers/<id>/cmd/result`).
//!
//! A command is `{v, id, kind, args, expires_at}`. The gateway answers every command it can
//! read an id from on `cmd/result`: `ok`, `duplicate` (that id was handled before; nothing
//! happens again), `expired` (past `expires_at`; nothing happens) or `error` with a reason for
//! people and a [`CommandErrorCode`] for programs.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::codec::{
    decode_envelope, DecodeError, EnvelopeError, EnvelopeSpec, Payload, Version,
    MAX_CONTROL_PAYLOAD,
};
use crate::ids::{ClientId, CommandId, JobId, PrinterId, Sha256Hex};

/// What a command asks the gateway to do. Serialised as `"kind"` + `"args"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", content = "args", rename_all = "snake_case")]
pub enum CommandAction {
    /// Fetch the file (if not cached), verify it, and print it. Refused unless the printer is
    /// `ready`; a job id that already ran on this printer never runs again.
    StartJob(StartJob),
    /// Pause the current job (when `job_id` is given, only if it is the current job).
    Pause(JobRef),
    /// Resume the current job.
    Resume(JobRef),
    /// Cancel the current job.
    Cancel(JobRef),
    /// An operator confirms the bed is clear: `idle`/`finished` → `ready`.
    BedCleared(Empty),
    /// Re-publish meta, state and status (the supervisor's views disagree).
    Rebirth(Empty),
}

impl CommandAction {
    /// The wire name of the kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::StartJob(_) => "start_job",
            Self::Pause(_) => "pause",
            Self::Resume(_) => "resume",
            Self::Cancel(_) => "cancel",
            Self::BedCleared(_) => "bed_cleared",
            Self::Rebirth(_) => "rebirth",
        }
    }
}

/// Every command kind this build understands.
pub const COMMAND_KINDS: [&str; 6] = [
    "start_job",
    "pause",
    "resume",
    "cancel",
    "bed_cleared",
    "rebirth",
];

/// Arguments of `start_job`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartJob {
    /// The job (assigned by the supervisor, never reused).
    pub job_id: JobId,
    /// The printer the job was placed on: any other printer refuses the command, so a copy
    /// replayed on another printer's `cmd` never prints the job twice.
    pub printer_id: PrinterId,
    /// The file to print, by content.
    pub file_sha256: Sha256Hex,
    /// File size in bytes (the gateway checks free space first).
    pub size_bytes: u64,
    /// A name for people.
    pub name: String,
}

/// Arguments naming the job a command is meant for (optional).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRef {
    /// When given, the command applies only if this is the current job (a stale cancel never
    /// hits the next job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
}

/// No arguments.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// A command. QoS 1, **never** retained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("unevaluatedProperties" = false))]
pub struct Command {
    /// Protocol version.
    pub v: Version,
    /// Chosen by the sender, unique per command; the gateway de-duplicates on it.
    pub id: CommandId,
    /// The action (`kind` and `args`).
    #[serde(flatten)]
    pub action: CommandAction,
    /// After this instant (Unix ms) the command is answered `expired` and not carried out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Who sends it (`supervisor`, `homeassistant`, `nodered`, …): the gateway's rate limit is
    /// per client, so a client in a loop is answered `busy` and the others are not slowed down.
    /// Without it the command counts as the shared client `anonymous`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientId>,
}

/// Why a command was rejected; carries its id when one could be read, so the gateway can
/// answer on `cmd/result`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct CommandReject {
    /// The command's id, if the payload had a valid one.
    pub id: Option<CommandId>,
    /// The sending client, if the payload named a valid one.
    pub client: Option<ClientId>,
    /// What was wrong.
    pub error: EnvelopeError,
}

const COMMAND_SPEC: EnvelopeSpec = EnvelopeSpec {
    tag: "kind",
    kinds: &COMMAND_KINDS,
    fields: &["id", "expires_at", "client"],
};

impl CommandReject {
    /// The code the gateway answers this rejection with.
    pub fn code(&self) -> CommandErrorCode {
        match &self.error {
            EnvelopeError::Decode(DecodeError::TooLarge { .. }) => CommandErrorCode::TooLarge,
            EnvelopeError::Decode(
                DecodeError::MissingVersion | DecodeError::UnsupportedVersion { .. },
            ) => CommandErrorCode::UnsupportedVersion,
            EnvelopeError::UnknownKind { .. } => CommandErrorCode::UnknownKind,
            EnvelopeError::Decode(
                DecodeError::Syntax(_) | DecodeError::NotAnObject | DecodeError::Invalid(_),
            )
            | EnvelopeError::BadArgs { .. } => CommandErrorCode::Invalid,
        }
    }
}

impl Command {
    /// A command with no expiry.
    pub fn new(id: CommandId, action: CommandAction) -> Self {
        Self {
            v: Version,
            id,
            action,
            expires_at: None,
            client: None,
        }
    }

    /// The same command, sent as `client`.
    pub fn from_client(mut self, client: ClientId) -> Self {
        self.client = Some(client);
        self
    }

    /// Whether the command has expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at.is_some_and(|at| now_ms > at)
    }

    /// Strictly decodes a command, keeping its id when anything else is wrong.
    pub fn decode(bytes: &[u8]) -> Result<Command, CommandReject> {
        decode_envelope::<Command, CommandAction>(bytes, MAX_CONTROL_PAYLOAD, &COMMAND_SPEC)
            .map_err(|(map, error)| {
                let (id, client) = crate::codec::correlation(map.as_ref());
                CommandReject { id, client, error }
            })
    }

    /// Encodes as compact JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The gateway's answer to a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResultStatus {
    /// Carried out (or, for start_job, accepted and under way).
    Ok,
    /// Refused: `code` says why for programs, `reason` for people. Nothing changed.
    Error,
    /// This id was handled before; nothing happened again.
    Duplicate,
    /// Arrived after `expires_at`; nothing happened.
    Expired,
    /// Its client sent more than its rate allows (`docs/protocol.md`, "Rate limits"): nothing
    /// happened; send it again (a new id is fine) after `retry_after_ms`.
    Busy,
}

/// Why a command was refused (`status: error`, and `busy`): a stable code for programs. Match on
/// it, never on `reason`'s wording, which is for people and may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommandErrorCode {
    /// The command cannot be read (not JSON, a missing, unknown or mistyped field, bad
    /// arguments), or an argument is out of range (`start_job` of an empty file).
    Invalid,
    /// The payload is larger than a command may be; it was not read.
    TooLarge,
    /// No `v`, or a protocol version this gateway does not speak.
    UnsupportedVersion,
    /// A `kind` this gateway does not know (it is older than the sender).
    UnknownKind,
    /// With `status: busy`: its client sent more than its rate allows; nothing happened, retry
    /// after `retry_after_ms`.
    Busy,
    /// A `start_job` for another printer (`printer_id`): a copy replayed here never prints.
    WrongPrinter,
    /// A `start_job` for a job that already ran on this printer: it never runs again.
    AlreadyRan,
    /// A `start_job` for the job this printer already accepted and is still working on (the
    /// same start sent again under a new id).
    AlreadyAccepted,
    /// A `start_job` while the printer is in maintenance.
    Maintenance,
    /// A `start_job` while the printer is not `ready`: its bed is not cleared, a job is on it, or
    /// it is disconnected, in error or halted (its state says which).
    NotReady,
    /// A `start_job` whose file is larger than this printer's whole file cache: it can never
    /// be printed here.
    FileTooLarge,
    /// A `start_job` whose file does not fit in the disk space free now.
    NoDiskSpace,
    /// `pause`, `resume` or `cancel` with no job on the printer.
    NoJob,
    /// `pause`, `resume` or `cancel` naming a job that is not the current one (a stale command
    /// never hits the next job).
    NotCurrentJob,
    /// `pause` of a job that is not printing, or `resume` of one that is not paused.
    WrongStage,
    /// `cancel` of a job that already ended.
    JobEnded,
    /// `resume` while the gateway's link to the printer is not up.
    LinkNotReady,
    /// `bed_cleared` while a job is on the printer (preparing, printing, paused): cancel it
    /// first.
    PrinterHasJob,
}

/// The answer to one command. QoS 1, not retained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandResult {
    /// Protocol version.
    pub v: Version,
    /// The command's id.
    pub id: CommandId,
    /// The outcome.
    pub status: ResultStatus,
    /// Why, for `error` (and context for the others): for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why, for `error` and `busy`: for programs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<CommandErrorCode>,
    /// The gateway's epoch.
    pub epoch: u64,
    /// When it was answered (Unix ms).
    pub at_ms: u64,
    /// For `busy`: when a retry will be admitted, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl Payload for CommandResult {
    const SCHEMA: &'static str = "command-result";
}

/// Commands have a hand-written decoder (to keep the id on errors); the schema and the size
/// limit still come from the trait.
impl Payload for Command {
    const SCHEMA: &'static str = "command";

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Command::decode(bytes).map_err(|r| match r.error {
            EnvelopeError::Decode(d) => d,
            other => DecodeError::Invalid(other.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha() -> Sha256Hex {
        Sha256Hex::digest(b"G28\n")
    }

    #[test]
    fn wire_shape() {
        let c = Command {
            expires_at: Some(1_700_000_000_000),
            ..Command::new(
                CommandId::new("c-1").expect("id"),
                CommandAction::StartJob(StartJob {
                    job_id: JobId::new("j-1").expect("id"),
                    printer_id: PrinterId::new("p0").expect("id"),
                    file_sha256: sha(),
                    size_bytes: 4,
                    name: "cube".into(),
                }),
            )
        };
        let json: serde_json::Value = serde_json::from_slice(&c.encode()).expect("json");
        assert_eq!(json["kind"], "start_job");
        assert_eq!(json["args"]["job_id"], "j-1");
        assert_eq!(json["id"], "c-1");
        assert_eq!(json["v"], 1);
        assert_eq!(Command::decode(&c.encode()), Ok(c));
    }

    #[test]
    fn a_refusal_carries_its_code_and_an_answer_without_one_has_none() {
        let refused = CommandResult {
            v: Version,
            id: CommandId::new("c-2").expect("id"),
            status: ResultStatus::Error,
            reason: Some("job j-1 already ran on this printer (done); it never runs again".into()),
            code: Some(CommandErrorCode::AlreadyRan),
            epoch: 3,
            at_ms: 1_700_000_000_000,
            retry_after_ms: None,
        };
        let json: serde_json::Value = serde_json::from_slice(&refused.encode()).expect("json");
        assert_eq!(json["code"], "already_ran");
        assert_eq!(
            CommandResult::decode(&refused.encode()),
            Ok(refused.clone())
        );
        let ok = CommandResult {
            status: ResultStatus::Ok,
            reason: None,
            code: None,
            ..refused
        };
        let json: serde_json::Value = serde_json::from_slice(&ok.encode()).expect("json");
        assert!(json.get("code").is_none(), "{json}");
        // An answer from a gateway that predates codes still reads.
        let old = br#"{"v":1,"id":"c-3","status":"error","reason":"no job on this printer","epoch":1,"at_ms":5}"#;
        assert_eq!(CommandResult::decode(old).expect("decodes").code, None);
    }

    #[test]
    fn every_kind_round_trips() {
        let actions = [
            CommandAction::Pause(JobRef::default()),
            CommandAction::Resume(JobRef {
                job_id: Some(JobId::new("j").expect("id")),
            }),
            CommandAction::Cancel(JobRef::default()),
            CommandAction::BedCleared(Empty {}),
            CommandAction::Rebirth(Empty {}),
        ];
        for (i, a) in actions.into_iter().enumerate() {
            assert!(COMMAND_KINDS.contains(&a.kind()));
            let c = Command::new(CommandId::new(format!("c{i}")).expect("id"), a);
            assert_eq!(Command::decode(&c.encode()), Ok(c));
        }
    }

    #[test]
    fn args_may_be_omitted_when_empty() {
        let c = Command::decode(br#"{"v":1,"id":"x","kind":"rebirth"}"#).expect("ok");
        assert_eq!(c.action, CommandAction::Rebirth(Empty {}));
    }

    #[test]
    fn rejects_keep_the_id() {
        let cases: &[(&str, Option<&str>, &str, CommandErrorCode)] = &[
            (
                r#"{"v":1,"id":"a","kind":"launch"}"#,
                Some("a"),
                "unknown kind \"launch\"",
                CommandErrorCode::UnknownKind,
            ),
            (
                r#"{"v":1,"id":"b","kind":"start_job","args":{}}"#,
                Some("b"),
                "bad arguments",
                CommandErrorCode::Invalid,
            ),
            (
                r#"{"v":1,"id":"c","kind":"pause","args":{"job":1}}"#,
                Some("c"),
                "bad arguments",
                CommandErrorCode::Invalid,
            ),
            (
                r#"{"v":1,"id":"d","kind":"pause","x":1}"#,
                Some("d"),
                "unknown field `x`",
                CommandErrorCode::Invalid,
            ),
            // A version this build does not speak, or none: still answered (issue #10).
            (
                r#"{"v":2,"id":"e","kind":"pause"}"#,
                Some("e"),
                "unsupported protocol version",
                CommandErrorCode::UnsupportedVersion,
            ),
            (
                r#"{"id":"e2","kind":"pause"}"#,
                Some("e2"),
                "no protocol version",
                CommandErrorCode::UnsupportedVersion,
            ),
            // The same key twice is refused (serde_json alone would keep the last one).
            (
                r#"{"v":1,"id":"h","kind":"pause","kind":"cancel"}"#,
                None,
                "duplicate field `kind`",
                CommandErrorCode::Invalid,
            ),
            (
                r#"{"v":1,"id":"i","kind":"pause","args":{"job_id":"a","job_id":"b"}}"#,
                None,
                "duplicate field `job_id`",
                CommandErrorCode::Invalid,
            ),
            (
                r#"{"v":1,"kind":"pause"}"#,
                None,
                "missing field `id`",
                CommandErrorCode::Invalid,
            ),
            (
                r#"{"v":1,"id":"a b","kind":"pause"}"#,
                None,
                "invalid command id",
                CommandErrorCode::Invalid,
            ),
            (
                r#"{"v":1,"id":"f","kind":7}"#,
                Some("f"),
                "`kind` must be a string",
                CommandErrorCode::Invalid,
            ),
            (
                r#"{"v":1,"id":"g","kind":"pause","expires_at":-3}"#,
                Some("g"),
                "expires_at",
                CommandErrorCode::Invalid,
            ),
            (
                r#"not json"#,
                None,
                "not valid JSON",
                CommandErrorCode::Invalid,
            ),
        ];
        for (input, id, msg, code) in cases {
            let r = Command::decode(input.as_bytes()).expect_err(input);
            assert_eq!(r.id.as_ref().map(CommandId::as_str), *id, "{input}");
            assert!(r.to_string().contains(msg), "{input}: {r}");
            assert_eq!(r.code(), *code, "{input}: {r}");
        }
    }

    #[test]
    fn an_oversized_command_keeps_its_id() {
        let pad = "x".repeat(MAX_CONTROL_PAYLOAD);
        let big = format!(r#"{{"v":1,"id":"big-1","kind":"pause","pad":"{pad}"}}"#);
        let r = Command::decode(big.as_bytes()).expect_err("too large");
        assert_eq!(r.id.as_ref().map(CommandId::as_str), Some("big-1"));
        assert!(r.to_string().contains("exceeds"), "{r}");
        assert_eq!(r.code(), CommandErrorCode::TooLarge);
        // The id may come after the bulk, and a bad id is not answered.
        let late = format!(r#"{{"v":1,"pad":"{pad}","kind":"pause","id":"late"}}"#);
        let r = Command::decode(late.as_bytes()).expect_err("too large");
        assert_eq!(r.id.as_ref().map(CommandId::as_str), Some("late"));
        let bad = format!(r#"{{"v":1,"pad":"{pad}","id":"a b"}}"#);
        assert_eq!(
            Command::decode(bad.as_bytes()).expect_err("too large").id,
            None
        );
        // Past the probe limit nothing is parsed at all.
        let huge = format!(
            r#"{{"id":"h","pad":"{}"}}"#,
            "x".repeat(crate::codec::MAX_ID_PROBE)
        );
        assert_eq!(
            Command::decode(huge.as_bytes()).expect_err("too large").id,
            None
        );
    }

    #[test]
    fn expiry() {
        let mut c = Command::new(
            CommandId::new("x").expect("id"),
            CommandAction::Rebirth(Empty {}),
        );
        assert!(!c.expired(u64::MAX));
        c.expires_at = Some(10);
        assert!(!c.expired(10));
        assert!(c.expired(11));
    }
}
