//! Strict decoding and encoding of payloads.
//!
//! Every payload is a JSON object with a protocol version field `v`. Decoding is strict: the
//! size is bounded before parsing, the version is checked before the shape, and unknown fields
//! are rejected. Each failure is a typed [`DecodeError`], never a panic.

use std::borrow::Cow;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The protocol version this build speaks. Carried in every payload as `"v"`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest control payload (everything except file chunks), in bytes.
pub const MAX_CONTROL_PAYLOAD: usize = 64 * 1024;

/// Largest file-chunk payload, in bytes: a 64 KiB chunk as base64 plus its envelope.
pub const MAX_CHUNK_PAYLOAD: usize = 128 * 1024;

/// The `v` field: serialises as [`PROTOCOL_VERSION`] and accepts nothing else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Version;

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(PROTOCOL_VERSION)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let found = u64::deserialize(d)?;
        if found == u64::from(PROTOCOL_VERSION) {
            Ok(Version)
        } else {
            Err(serde::de::Error::custom(format!(
                "unsupported protocol version {found}, this build speaks {PROTOCOL_VERSION}"
            )))
        }
    }
}

impl JsonSchema for Version {
    fn schema_name() -> Cow<'static, str> {
        "Version".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Protocol version; this document describes version 1.",
            "type": "integer",
            "const": PROTOCOL_VERSION,
        })
    }
}

/// Why a payload was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than the limit for its topic; not parsed at all.
    #[error("payload of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Payload size.
        len: usize,
        /// The limit that applied.
        max: usize,
    },
    /// Not JSON (or not UTF-8).
    #[error("payload is not valid JSON: {0}")]
    Syntax(String),
    /// JSON, but not an object.
    #[error("payload is not a JSON object")]
    NotAnObject,
    /// No `v` field.
    #[error("payload has no protocol version field \"v\"")]
    MissingVersion,
    /// A `v` this build does not speak.
    #[error("unsupported protocol version {found}, this build speaks {PROTOCOL_VERSION}")]
    UnsupportedVersion {
        /// The `v` value as found (JSON text).
        found: String,
    },
    /// Right version, wrong shape: a missing, unknown or mistyped field, a bad id.
    #[error("invalid payload: {0}")]
    Invalid(String),
}

/// A JSON object as parsed.
pub type Object = serde_json::Map<String, serde_json::Value>;

/// Parses `bytes` into a JSON object after checking its size and version.
pub fn decode_object(bytes: &[u8], max: usize) -> Result<Object, DecodeError> {
    decode_object_keeping(bytes, max).map_err(|(_, e)| e)
}

/// Largest payload over its limit from which [`decode_envelope`] still reads the correlation
/// fields (`id`), so that the sender gets an answer. Beyond it, nothing is parsed. Above the
/// largest packet a printloop client reads (1 MiB and a little), so never the limit in practice.
pub const MAX_ID_PROBE: usize = 2 * 1024 * 1024;

/// [`decode_object`], but a payload with the wrong (or no) version, or over the limit, still
/// yields the fields that could be read, for an answer to its sender.
pub(crate) fn decode_object_keeping(
    bytes: &[u8],
    max: usize,
) -> Result<Object, (Option<Object>, DecodeError)> {
    if bytes.len() > max {
        let too_large = DecodeError::TooLarge {
            len: bytes.len(),
            max,
        };
        return Err((probe_fields(bytes), too_large));
    }
    let map = match strict_from_slice(bytes) {
        Ok(serde_json::Value::Object(map)) => map,
        Ok(_) => return Err((None, DecodeError::NotAnObject)),
        Err(e) => return Err((None, DecodeError::Syntax(e))),
    };
    match map.get("v") {
        Some(v) if v.as_u64() == Some(u64::from(PROTOCOL_VERSION)) => Ok(map),
        None => Err((Some(map), DecodeError::MissingVersion)),
        Some(v) => {
            let found = v.to_string();
            Err((Some(map), DecodeError::UnsupportedVersion { found }))
        }
    }
}

/// The top-level string fields `id` and `client` of an oversized payload, read without
/// keeping anything else (bounded by [`MAX_ID_PROBE`]).
fn probe_fields(bytes: &[u8]) -> Option<Object> {
    #[derive(Deserialize)]
    struct Probe {
        id: Option<String>,
        client: Option<String>,
    }
    if bytes.len() > MAX_ID_PROBE {
        return None;
    }
    // Valid UTF-8 throughout, like any JSON text (serde_json skips ignored keys unchecked).
    let text = std::str::from_utf8(bytes).ok()?;
    let p: Probe = serde_json::from_str(text).ok()?;
    let mut map = Object::new();
    for (k, v) in [("id", p.id), ("client", p.client)] {
        if let Some(v) = v.filter(|v| v.len() <= 256) {
            map.insert(k.to_owned(), serde_json::Value::String(v));
        }
    }
    Some(map)
}

/// Parses JSON like `serde_json::from_slice::<Value>`, but an object with the same key twice
/// is an error (serde_json would keep the last silently, so two readers of one payload could
/// disagree about it).
pub fn strict_from_slice(bytes: &[u8]) -> Result<serde_json::Value, String> {
    serde_json::from_slice::<StrictValue>(bytes)
        .map(|s| s.0)
        .map_err(|e| e.to_string())
}

struct StrictValue(serde_json::Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
        Ok(b.into())
    }
    fn visit_i64<E>(self, n: i64) -> Result<Self::Value, E> {
        Ok(n.into())
    }
    fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
        Ok(n.into())
    }
    fn visit_f64<E>(self, n: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, Into::into))
    }
    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(s.into())
    }
    fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
        Ok(s.into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(serde_json::Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Object::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(v) = map.next_value()?;
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate field `{}`",
                    key.escape_debug()
                )));
            }
            out.insert(key, v);
        }
        Ok(serde_json::Value::Object(out))
    }
}

/// Decodes a payload of type `T`, bounded by `max` bytes.
pub fn decode_with_limit<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, DecodeError> {
    let map = decode_object(bytes, max)?;
    from_value_with_path(serde_json::Value::Object(map)).map_err(DecodeError::Invalid)
}

/// Deserialises `value`, naming the path of the offending field in the error
/// (`args.job_id: invalid job id …`).
pub(crate) fn from_value_with_path<T: DeserializeOwned>(
    value: serde_json::Value,
) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.into_inner().to_string()
        } else {
            format!("{path}: {}", e.into_inner())
        }
    })
}

/// A payload type of the protocol: knows its size limit and its schema's file name.
pub trait Payload: Serialize + DeserializeOwned + JsonSchema {
    /// The schema's name: `schemas/<SCHEMA>.schema.json`.
    const SCHEMA: &'static str;
    /// Largest accepted encoding, in bytes.
    const MAX_LEN: usize = MAX_CONTROL_PAYLOAD;

    /// Strictly decodes a payload.
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_with_limit(bytes, Self::MAX_LEN)
    }

    /// Encodes as compact JSON.
    fn encode(&self) -> Vec<u8> {
        // Serialising these plain data types cannot fail: no maps with non-string keys, no
        // custom serialisers that error.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// What is wrong with a tagged envelope (`{v, …, <tag>, args}`: commands and API requests).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The envelope did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A kind (`kind` / `op`) this build does not know.
    #[error("unknown {tag} {kind:?}")]
    UnknownKind {
        /// The tag's name.
        tag: &'static str,
        /// The value found.
        kind: String,
    },
    /// A known kind with bad arguments.
    #[error("bad arguments for {kind}: {message}")]
    BadArgs {
        /// The kind.
        kind: String,
        /// What was wrong.
        message: String,
    },
}

/// Describes one adjacently tagged envelope type.
pub(crate) struct EnvelopeSpec {
    /// The tag field, e.g. `kind`.
    pub tag: &'static str,
    /// Known tag values.
    pub kinds: &'static [&'static str],
    /// Allowed top-level fields besides `v`, the tag and `args`.
    pub fields: &'static [&'static str],
}

/// The `id` and `client` of an envelope that failed to decode, when they are valid: what is
/// needed to answer it.
pub(crate) fn correlation(
    map: Option<&serde_json::Map<String, serde_json::Value>>,
) -> (Option<crate::CommandId>, Option<crate::ClientId>) {
    let field = |name: &str| map.and_then(|m| m.get(name)).and_then(|v| v.as_str());
    (
        field("id").and_then(|s| crate::CommandId::new(s).ok()),
        field("client").and_then(|s| crate::ClientId::new(s).ok()),
    )
}

/// Decodes an envelope strictly. On error, returns the parsed object (when there was one) so the
/// caller can still read the correlation fields it needs to answer.
pub(crate) fn decode_envelope<T: DeserializeOwned, A: DeserializeOwned>(
    bytes: &[u8],
    max: usize,
    spec: &EnvelopeSpec,
) -> Result<
    T,
    (
        Option<serde_json::Map<String, serde_json::Value>>,
        EnvelopeError,
    ),
> {
    let mut map = decode_object_keeping(bytes, max).map_err(|(map, e)| (map, e.into()))?;
    let invalid = |m: String| EnvelopeError::Decode(DecodeError::Invalid(m));
    let known = |k: &str| k == "v" || k == spec.tag || k == "args" || spec.fields.contains(&k);
    if let Some(unknown) = map.keys().find(|k| !known(k)) {
        let e = invalid(format!("unknown field `{unknown}`"));
        return Err((Some(map), e));
    }
    let kind = match map.get(spec.tag) {
        Some(serde_json::Value::String(k)) => k.clone(),
        Some(_) => {
            let e = invalid(format!("field `{}` must be a string", spec.tag));
            return Err((Some(map), e));
        }
        None => {
            let e = invalid(format!("missing field `{}`", spec.tag));
            return Err((Some(map), e));
        }
    };
    if !spec.kinds.contains(&kind.as_str()) {
        let e = EnvelopeError::UnknownKind {
            tag: spec.tag,
            kind,
        };
        return Err((Some(map), e));
    }
    let args = match map.remove("args") {
        None | Some(serde_json::Value::Null) => serde_json::Value::Object(Default::default()),
        Some(a) => a,
    };
    let mut probe = serde_json::Map::new();
    probe.insert(spec.tag.to_owned(), serde_json::Value::String(kind.clone()));
    probe.insert("args".to_owned(), args.clone());
    if let Err(message) = from_value_with_path::<A>(serde_json::Value::Object(probe)) {
        let e = EnvelopeError::BadArgs { kind, message };
        return Err((Some(map), e));
    }
    map.insert("args".to_owned(), args);
    match from_value_with_path::<T>(serde_json::Value::Object(map.clone())) {
        Ok(t) => Ok(t),
        Err(e) => Err((Some(map), invalid(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Probe {
        v: Version,
        n: u32,
    }
    impl Payload for Probe {
        const SCHEMA: &'static str = "probe";
        const MAX_LEN: usize = 64;
    }

    #[test]
    fn round_trip() {
        let p = Probe { v: Version, n: 7 };
        assert_eq!(p.encode(), br#"{"v":1,"n":7}"#);
        assert_eq!(Probe::decode(&p.encode()), Ok(p));
    }

    #[test]
    fn typed_errors() {
        let cases: &[(&[u8], DecodeError)] = &[
            (b"{", DecodeError::Syntax(String::new())),
            (b"\xff\xfe", DecodeError::Syntax(String::new())),
            (b"[1,2]", DecodeError::NotAnObject),
            (b"{\"n\":1}", DecodeError::MissingVersion),
            (
                b"{\"v\":2,\"n\":1}",
                DecodeError::UnsupportedVersion { found: "2".into() },
            ),
            (b"{\"v\":1}", DecodeError::Invalid(String::new())),
            (
                b"{\"v\":1,\"n\":1,\"x\":0}",
                DecodeError::Invalid(String::new()),
            ),
            (b"{\"v\":1,\"n\":-1}", DecodeError::Invalid(String::new())),
            (&[b' '; 65], DecodeError::TooLarge { len: 65, max: 64 }),
            (
                b"{\"v\":1,\"n\":1,\"n\":2}",
                DecodeError::Syntax(String::new()),
            ),
        ];
        for (input, want) in cases {
            let got = Probe::decode(input).expect_err("must reject");
            assert_eq!(
                std::mem::discriminant(&got),
                std::mem::discriminant(want),
                "{:?} -> {got}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn unknown_field_is_named() {
        let err = Probe::decode(br#"{"v":1,"n":1,"extra":true}"#).expect_err("reject");
        assert!(err.to_string().contains("extra"), "{err}");
    }
}
