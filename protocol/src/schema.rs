//! JSON Schemas of every payload, generated from the Rust types.
//!
//! `schemas/<name>.schema.json` holds the committed copies; `cargo test -p protocol` fails when
//! they differ from what the types generate. Regenerate with
//! `UPDATE_SCHEMAS=1 cargo test -p protocol --test schemas`.

use schemars::JsonSchema;

use crate::api::{ApiRequest, ApiResponse, QueueSnapshot};
use crate::codec::Payload;
use crate::command::{Command, CommandResult};
use crate::files::{FileChunkRequest, FileChunkResponse};
use crate::presence::{Meta, Status};
use crate::state::{Event, StateSnapshot};

/// One payload's schema.
#[derive(Debug, Clone)]
pub struct PayloadSchema {
    /// The file stem in `schemas/` (`<name>.schema.json`).
    pub name: &'static str,
    /// The schema document.
    pub schema: serde_json::Value,
    /// Decodes `bytes` strictly with the Rust type, so docs examples are checked by both.
    pub decode: fn(&[u8]) -> Result<(), String>,
}

fn entry<T: Payload + JsonSchema>() -> PayloadSchema {
    let mut schema = schemars::schema_for!(T).to_value();
    if let Some(obj) = schema.as_object_mut() {
        obj.insert(
            "$comment".into(),
            format!(
                "printloop protocol v{}, generated from the Rust type {}; do not edit by hand",
                crate::PROTOCOL_VERSION,
                std::any::type_name::<T>()
            )
            .into(),
        );
    }
    PayloadSchema {
        name: T::SCHEMA,
        schema,
        decode: |bytes| T::decode(bytes).map(drop).map_err(|e| e.to_string()),
    }
}

/// Every payload of the protocol.
pub fn all() -> Vec<PayloadSchema> {
    vec![
        entry::<Status>(),
        entry::<Meta>(),
        entry::<StateSnapshot>(),
        entry::<Event>(),
        entry::<Command>(),
        entry::<CommandResult>(),
        entry::<FileChunkRequest>(),
        entry::<FileChunkResponse>(),
        entry::<ApiRequest>(),
        entry::<ApiResponse>(),
        entry::<QueueSnapshot>(),
    ]
}

/// The schema document as it is committed: pretty JSON with a final newline.
pub fn render(schema: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(schema).unwrap_or_default();
    s.push('\n');
    s
}
