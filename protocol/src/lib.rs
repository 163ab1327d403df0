//! printloop's wire contract: the topic tree, every payload, and the Marlin line codec.
//!
//! This crate does no IO and reads no clock: time is always passed in (Unix milliseconds).
//! Everything that comes from outside is decoded strictly, with a bounded size, into typed
//! values or a typed error — never a panic. The JSON Schemas in `schemas/` are generated from
//! these types ([`schema::all`]) and a test fails when they drift.

pub mod api;
pub mod codec;
pub mod command;
pub mod files;
pub mod ids;
pub mod limit;
pub mod marlin;
pub mod presence;
pub mod schema;
pub mod state;
pub mod topics;
pub mod web;

pub use codec::{DecodeError, EnvelopeError, Payload, Version, PROTOCOL_VERSION};
pub use ids::{ClientId, CommandId, IdError, JobId, PrinterId, Sha256Hex};
pub use topics::{PrinterTopicKind, Topic, TopicError, Topics, DEFAULT_ROOT};

/// The time, passed in to every pure machine: a monotonic clock for deadlines, the wall clock
/// for timestamps. The shells read the clocks (`transport::now`); nothing here does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic milliseconds (any origin).
    pub mono_ms: u64,
    /// Unix milliseconds.
    pub unix_ms: u64,
}
