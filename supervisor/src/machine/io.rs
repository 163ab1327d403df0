//! What goes in and out of the machine: inputs (broker messages, file IO results, ticks,
//! enrolment), outputs (durable mutations, publishes, subscriptions, file IO) for the shell.

use super::*;

/// One publish (QoS 1 unless `qos0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retained?
    pub retain: bool,
    /// Its priority in the shell's outgoing queue.
    pub lane: Lane,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Commit durably before anything after it.
    Persist(Vec<Mutation>),
    /// Subscribe; `qos0` for retained-snapshot wildcards (rumqttd sends at most 100 retained
    /// messages on a QoS 1 wildcard).
    Subscribe {
        /// The filter.
        filter: String,
        /// QoS 0 instead of 1.
        qos0: bool,
    },
    /// Publish.
    Publish(Publish),
    /// Read a chunk from the file store and answer the printer (stateless; done by the shell).
    ServeChunk {
        /// Who asked.
        printer: PrinterId,
        /// The request.
        request: FileChunkRequest,
    },
    /// Store an upload chunk; answer with `Input::Uploaded`.
    StoreUpload {
        /// Who asked.
        client: ClientId,
        /// The request id.
        id: CommandId,
        /// The chunk.
        chunk: UploadChunk,
    },
}

/// The result of storing an upload chunk.
#[derive(Debug, Clone, PartialEq)]
pub enum UploadOutcome {
    /// Stored; `complete` when the whole file is verified.
    Progress {
        /// Bytes stored, contiguous from 0.
        received: u64,
        /// The file's size.
        total_size: u64,
        /// The stored file, once complete and verified.
        complete: Option<FileRecord>,
    },
    /// Refused.
    Failed(String),
}

/// Everything that happens to the supervisor.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Connected to the broker.
    Connected,
    /// Lost the broker.
    Disconnected,
    /// A message.
    Message {
        /// Topic.
        topic: String,
        /// Payload.
        payload: Vec<u8>,
    },
    /// An upload chunk was handled.
    Uploaded {
        /// Who asked.
        client: ClientId,
        /// The request id.
        id: CommandId,
        /// What happened.
        outcome: UploadOutcome,
    },
    /// Time passed.
    Tick,
    /// The printers enrolled in the client registry (`clients.toml`, gateway role), read at
    /// start and whenever the file changes; `None` when there is no registry (a loopback-only
    /// farm, the demo): then every printer that reports is enrolled.
    Enrolled(Option<BTreeSet<PrinterId>>),
}
