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
    /// Append these ended jobs to the history archive, durably, **before** the batch's
    /// mutations are committed (they remove the jobs from the store).
    Archive(Vec<JobRecord>),
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
        caller: Caller,
        /// The request id.
        id: CommandId,
        /// The chunk.
        chunk: UploadChunk,
    },
    /// Something a webhook tells: the shell puts it in the durable outbox in the same commit
    /// as the batch's mutations, and delivers it from there.
    Notify(protocol::web::WebhookEvent),
    /// The answer to an HTTP caller's request (`Input::Http`): the shell hands it to the
    /// waiting HTTP handler. MQTT callers are answered by a `Publish`.
    Reply {
        /// Whose request.
        client: ClientId,
        /// The answer (its `id` is the request's).
        response: ApiResponse,
    },
}

/// Who asked, and so where the answer goes. The two kinds never share request ids: an HTTP
/// token named `cli` and an MQTT client named `cli` are different callers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    /// An MQTT client: answered on `api/response/<client>`.
    Mqtt(ClientId),
    /// An HTTP API token (by name): answered by [`Output::Reply`].
    Http(ClientId),
}

impl Caller {
    /// The client name (the rate limit and the log use it).
    pub fn client(&self) -> &ClientId {
        match self {
            Caller::Mqtt(c) | Caller::Http(c) => c,
        }
    }

    /// Where the answer to request `id` is remembered (a repeat gets it again). MQTT keys are
    /// `<client>/<id>` as before; HTTP keys start with `@`, which no client id can.
    pub(super) fn answer_key(&self, id: &CommandId) -> String {
        match self {
            Caller::Mqtt(c) => format!("{c}/{id}"),
            Caller::Http(c) => format!("@http/{c}/{id}"),
        }
    }
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
    /// An operator request that came over HTTP (the REST API, the dashboard, a slicer): its
    /// `client` is the API token's name; answered by [`Output::Reply`].
    Http(ApiRequest),
    /// An upload chunk was handled.
    Uploaded {
        /// Who asked.
        caller: Caller,
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
