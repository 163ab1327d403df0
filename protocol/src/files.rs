//! Content-addressed file delivery: the gateway **pulls** chunks of a file by its sha256
//! (`printers/<id>/file/request` → `printers/<id>/file/chunk`).
//!
//! Pulling gives back-pressure for free (one chunk in flight, or a small window) and resumes
//! after a cut from the last verified offset. Each chunk carries its own sha256; the whole file
//! is verified against its name before a print may start.

use base64::Engine as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::codec::{Payload, Version, MAX_CHUNK_PAYLOAD};
use crate::ids::{CommandId, Sha256Hex};

/// Largest chunk a gateway may ask for, in bytes (before base64).
pub const MAX_CHUNK_LEN: u32 = 64 * 1024;

/// A gateway asks for `len` bytes of a file from `offset`. QoS 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileChunkRequest {
    /// Protocol version.
    pub v: Version,
    /// Echoed in the answer, to match it (and to drop answers to older requests).
    pub request_id: CommandId,
    /// The file.
    pub sha256: Sha256Hex,
    /// Where the chunk starts.
    pub offset: u64,
    /// How many bytes (at most 65536).
    pub len: u32,
}

impl Payload for FileChunkRequest {
    const SCHEMA: &'static str = "file-chunk-request";
}

/// Why a chunk cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChunkErrorCode {
    /// The supervisor does not hold that file.
    NotFound,
    /// Offset past the end, or a length of 0 or over the limit.
    BadRange,
    /// The supervisor failed to read its own store.
    Unavailable,
}

/// The answer to a [`FileChunkRequest`]. QoS 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum FileChunkResponse {
    /// The chunk.
    Ok {
        /// Protocol version.
        v: Version,
        /// The request's id.
        request_id: CommandId,
        /// The file.
        sha256: Sha256Hex,
        /// Where the chunk starts.
        offset: u64,
        /// The whole file's size.
        total_size: u64,
        /// sha256 of the decoded chunk.
        chunk_sha256: Sha256Hex,
        /// The bytes, standard base64.
        data_b64: String,
    },
    /// No chunk.
    Error {
        /// Protocol version.
        v: Version,
        /// The request's id.
        request_id: CommandId,
        /// The file.
        sha256: Sha256Hex,
        /// What went wrong.
        code: ChunkErrorCode,
        /// For people.
        message: String,
    },
}

impl Payload for FileChunkResponse {
    const SCHEMA: &'static str = "file-chunk-response";
    const MAX_LEN: usize = MAX_CHUNK_PAYLOAD;
}

/// Why a received chunk is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The base64 text does not decode.
    #[error("chunk data is not valid base64: {0}")]
    Base64(String),
    /// The bytes do not hash to `chunk_sha256`.
    #[error("chunk at offset {offset} does not match its sha256")]
    Mismatch {
        /// The chunk's offset.
        offset: u64,
    },
    /// Longer than [`MAX_CHUNK_LEN`], or running past `total_size`.
    #[error("chunk at offset {offset} has a bad length {len}")]
    BadLength {
        /// The chunk's offset.
        offset: u64,
        /// Its decoded length.
        len: usize,
    },
}

impl FileChunkResponse {
    /// Builds the answer carrying `data`, which starts at `offset` of a file of `total_size`.
    pub fn chunk(
        request_id: CommandId,
        sha256: Sha256Hex,
        offset: u64,
        total_size: u64,
        data: &[u8],
    ) -> Self {
        Self::Ok {
            v: Version,
            request_id,
            sha256,
            offset,
            total_size,
            chunk_sha256: Sha256Hex::digest(data),
            data_b64: base64::engine::general_purpose::STANDARD.encode(data),
        }
    }

    /// The request id this answers.
    pub fn request_id(&self) -> &CommandId {
        match self {
            Self::Ok { request_id, .. } | Self::Error { request_id, .. } => request_id,
        }
    }
}

/// Decodes and verifies the data of an `ok` chunk.
pub fn verify_chunk(
    offset: u64,
    total_size: u64,
    chunk_sha256: &Sha256Hex,
    data_b64: &str,
) -> Result<Vec<u8>, ChunkError> {
    // Bound the work before decoding: base64 is 4 characters per 3 bytes.
    if data_b64.len() > (MAX_CHUNK_LEN as usize).div_ceil(3) * 4 {
        return Err(ChunkError::BadLength {
            offset,
            len: data_b64.len() / 4 * 3,
        });
    }
    let data = base64::engine::general_purpose::STANDARD
        .decode(data_b64)
        .map_err(|e| ChunkError::Base64(e.to_string()))?;
    let end = offset.checked_add(data.len() as u64);
    // The text bound above lets up to 2 bytes past the limit through: check the real length.
    let too_long = data.len() > MAX_CHUNK_LEN as usize;
    if data.is_empty() || too_long || end.is_none_or(|end| end > total_size) {
        return Err(ChunkError::BadLength {
            offset,
            len: data.len(),
        });
    }
    if &Sha256Hex::digest(&data) != chunk_sha256 {
        return Err(ChunkError::Mismatch { offset });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_round_trip_and_verify() {
        let file = b"G28\nG1 X10 F3000\n";
        let sha = Sha256Hex::digest(file);
        let r = FileChunkResponse::chunk(
            CommandId::new("r1").expect("id"),
            sha.clone(),
            4,
            file.len() as u64,
            &file[4..],
        );
        let decoded = FileChunkResponse::decode(&r.encode()).expect("decode");
        assert_eq!(decoded, r);
        let FileChunkResponse::Ok {
            offset,
            total_size,
            chunk_sha256,
            data_b64,
            ..
        } = decoded
        else {
            panic!("expected ok");
        };
        assert_eq!(
            verify_chunk(offset, total_size, &chunk_sha256, &data_b64).expect("valid"),
            &file[4..]
        );
        // Tampering is caught.
        assert_eq!(
            verify_chunk(offset, total_size, &sha, &data_b64),
            Err(ChunkError::Mismatch { offset: 4 })
        );
        assert!(matches!(
            verify_chunk(offset, 5, &chunk_sha256, &data_b64),
            Err(ChunkError::BadLength { .. })
        ));
        assert!(matches!(
            verify_chunk(0, 100, &chunk_sha256, "!!!"),
            Err(ChunkError::Base64(_))
        ));
        assert!(matches!(
            verify_chunk(u64::MAX, u64::MAX, &chunk_sha256, &data_b64),
            Err(ChunkError::BadLength { .. })
        ));
    }

    #[test]
    fn oversized_chunk_text_is_refused_before_decoding() {
        let big = "A".repeat(200_000);
        let sha = Sha256Hex::digest(b"");
        assert!(matches!(
            verify_chunk(0, u64::MAX, &sha, &big),
            Err(ChunkError::BadLength { .. })
        ));
    }
}
