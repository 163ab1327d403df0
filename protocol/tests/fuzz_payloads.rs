//! Fuzzing every decoder of `protocol` that takes outside input: the MQTT payload of every
//! topic, topic names, file chunks and Marlin lines.
//!
//! Structure-aware: the seeds are the valid examples in `docs/` (each checked by
//! `tests/schemas.rs`), mutated as JSON trees (a field replaced by a huge number, a long or
//! odd string, a deep nest, another type; a field dropped, renamed or added; `v` changed) and
//! as bytes (flips, truncation, splices, invalid UTF-8, padding past the size limit), plus
//! raw random bytes. Each input is checked against an oracle of what the design promises:
//!
//! - no panic, and nothing parsed past the size limit (`TooLarge` before any parsing);
//! - the envelope errors in the documented order: not JSON → `Syntax`, not an object →
//!   `NotAnObject`, no `v` → `MissingVersion`, another `v` → `UnsupportedVersion`;
//! - a command or API request whose `v` is 1 and whose id (and client) can be read is
//!   rejected with that id (and client), so the sender gets an answer;
//! - whatever is accepted re-encodes to something that decodes to the same value.
//!
//! Cases: `FUZZ_CASES` (or `PROPTEST_CASES`) per property, default small enough for
//! `cargo test`; `PROPTEST_RNG_SEED` replays a run. `scripts/fuzz.sh` runs a longer one.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::Config;
use protocol::api::ApiRequest;
use protocol::codec::{DecodeError, EnvelopeError, MAX_CHUNK_PAYLOAD};
use protocol::command::Command;
use protocol::files::{verify_chunk, ChunkError, MAX_CHUNK_LEN};
use protocol::marlin;
use protocol::{ClientId, CommandId, Payload, Sha256Hex, Topic, TopicError, Topics};
use serde_json::Value;

/// Cases per property: `FUZZ_CASES`, else `PROPTEST_CASES`, else `default` × `FUZZ_SCALE`.
fn config(default: u32) -> Config {
    let env = |k: &str| std::env::var(k).ok()?.parse::<u32>().ok();
    // FUZZ_CASES fixes the count; FUZZ_SCALE multiplies this test's default.
    let cases = env("FUZZ_CASES")
        .or_else(|| env("PROPTEST_CASES"))
        .unwrap_or_else(|| default.saturating_mul(env("FUZZ_SCALE").unwrap_or(1)));
    Config {
        cases,
        // Shrinking a 64 KiB input byte by byte takes long; a few seconds finds a small one.
        max_shrink_time: 20_000,
        ..Config::default()
    }
}

// ---- seeds: the docs' examples ---------------------------------------------------------------

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("protocol/ has a parent")
        .to_path_buf()
}

/// `(schema name, example text)` for every valid ```json schema=… block in docs/ and README.
fn seeds() -> &'static [(String, String)] {
    static SEEDS: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("docs"))
            .expect("docs/")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "md"))
            .collect();
        files.push(repo_root().join("README.md"));
        files.sort();
        let mut out = Vec::new();
        for file in files {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            let mut lines = text.lines();
            while let Some(line) = lines.next() {
                let Some(info) = line.trim_start().strip_prefix("```json") else {
                    continue;
                };
                let words: Vec<&str> = info.split_whitespace().collect();
                let schema = words.iter().find_map(|w| w.strip_prefix("schema="));
                let mut body = String::new();
                for l in lines.by_ref() {
                    if l.trim_start().starts_with("```") {
                        break;
                    }
                    body.push_str(l);
                    body.push('\n');
                }
                if let (Some(schema), false) = (schema, words.contains(&"invalid")) {
                    out.push((schema.to_owned(), body));
                }
            }
        }
        for name in [
            "status",
            "meta",
            "state",
            "event",
            "command",
            "command-result",
            "file-chunk-request",
            "file-chunk-response",
            "api-request",
            "api-response",
            "queue",
        ] {
            assert!(
                out.iter().any(|(s, _)| s == name),
                "no example of {name} in docs/ to fuzz from"
            );
        }
        out
    })
}

// ---- the oracle ------------------------------------------------------------------------------

/// What the envelope layer must say about `bytes`, before the payload's own shape is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Envelope {
    TooLarge,
    Syntax,
    NotAnObject,
    MissingVersion,
    UnsupportedVersion,
    /// `{"v":1,…}`: the shape decides.
    V1,
}

fn envelope(bytes: &[u8], max: usize) -> (Envelope, Option<serde_json::Map<String, Value>>) {
    if bytes.len() > max {
        // Over the limit, a decoder may still read the id to answer, but only one it carries.
        let m = serde_json::from_slice::<Value>(bytes)
            .ok()
            .and_then(|v| match v {
                Value::Object(m) => Some(m),
                _ => None,
            });
        return (Envelope::TooLarge, m);
    }
    if has_duplicate_keys(bytes) {
        return (Envelope::Syntax, None);
    }
    match serde_json::from_slice::<Value>(bytes) {
        Err(_) => (Envelope::Syntax, None),
        Ok(Value::Object(m)) => match m.get("v") {
            None => (Envelope::MissingVersion, Some(m)),
            Some(v) if v.as_u64() == Some(1) => (Envelope::V1, Some(m)),
            Some(_) => (Envelope::UnsupportedVersion, Some(m)),
        },
        Ok(_) => (Envelope::NotAnObject, None),
    }
}

/// Whether some object in `bytes` (valid JSON) has the same key twice. The oracle's own walk,
/// independent of the codec's.
fn has_duplicate_keys(bytes: &[u8]) -> bool {
    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
    struct Walk(bool);
    impl<'de> Deserialize<'de> for Walk {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(WalkVisitor)
        }
    }
    struct WalkVisitor;
    impl<'de> Visitor<'de> for WalkVisitor {
        type Value = Walk;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<Walk, E> {
            Ok(Walk(false))
        }
        fn visit_i64<E>(self, _: i64) -> Result<Walk, E> {
            Ok(Walk(false))
        }
        fn visit_u64<E>(self, _: u64) -> Result<Walk, E> {
            Ok(Walk(false))
        }
        fn visit_f64<E>(self, _: f64) -> Result<Walk, E> {
            Ok(Walk(false))
        }
        fn visit_str<E>(self, _: &str) -> Result<Walk, E> {
            Ok(Walk(false))
        }
        fn visit_unit<E>(self) -> Result<Walk, E> {
            Ok(Walk(false))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Walk, A::Error> {
            let mut dup = false;
            while let Some(Walk(d)) = a.next_element()? {
                dup |= d;
            }
            Ok(Walk(dup))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Walk, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut dup = false;
            while let Some(k) = a.next_key::<String>()? {
                dup |= !seen.insert(k);
                let Walk(d) = a.next_value()?;
                dup |= d;
            }
            Ok(Walk(dup))
        }
    }
    serde_json::from_slice::<Walk>(bytes).is_ok_and(|w| w.0)
}

fn kind_of(e: &DecodeError) -> Envelope {
    match e {
        DecodeError::TooLarge { .. } => Envelope::TooLarge,
        DecodeError::Syntax(_) => Envelope::Syntax,
        DecodeError::NotAnObject => Envelope::NotAnObject,
        DecodeError::MissingVersion => Envelope::MissingVersion,
        DecodeError::UnsupportedVersion { .. } => Envelope::UnsupportedVersion,
        DecodeError::Invalid(_) => Envelope::V1,
    }
}

fn check_payload<T: Payload + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Result<(), String> {
    let (want, _) = envelope(bytes, T::MAX_LEN);
    match T::decode(bytes) {
        Ok(value) => {
            if want != Envelope::V1 {
                return Err(format!(
                    "{}: accepted, but the envelope is {want:?}",
                    T::SCHEMA
                ));
            }
            let again = T::decode(&value.encode());
            if again.as_ref() != Ok(&value) {
                return Err(format!(
                    "{}: does not round-trip: {value:?} -> {again:?}",
                    T::SCHEMA
                ));
            }
        }
        Err(e) => {
            if kind_of(&e) != want {
                return Err(format!(
                    "{}: {e} ({:?}), expected {want:?}",
                    T::SCHEMA,
                    kind_of(&e)
                ));
            }
            if let DecodeError::TooLarge { len, max } = e {
                if (len, max) != (bytes.len(), T::MAX_LEN) {
                    return Err(format!("{}: TooLarge {{ {len}, {max} }}", T::SCHEMA));
                }
            }
        }
    }
    Ok(())
}

fn readable<T: std::str::FromStr>(
    m: &Option<serde_json::Map<String, Value>>,
    k: &str,
) -> Option<T> {
    m.as_ref()?.get(k)?.as_str()?.parse().ok()
}

fn check_command(bytes: &[u8]) -> Result<(), String> {
    let (want, map) = envelope(bytes, Command::MAX_LEN);
    match Command::decode(bytes) {
        Ok(c) => {
            if want != Envelope::V1 {
                return Err(format!("command accepted, but the envelope is {want:?}"));
            }
            if Command::decode(&c.encode()).as_ref() != Ok(&c) {
                return Err(format!("command does not round-trip: {c:?}"));
            }
        }
        Err(r) => {
            let got = match &r.error {
                EnvelopeError::Decode(d) => kind_of(d),
                EnvelopeError::UnknownKind { .. } | EnvelopeError::BadArgs { .. } => Envelope::V1,
            };
            if got != want {
                return Err(format!("command: {r} ({got:?}), expected {want:?}"));
            }
            let id: Option<CommandId> = readable(&map, "id");
            if want == Envelope::V1 && id.is_some() && r.id != id {
                return Err(format!("command reject lost its id {id:?}: {r:?}"));
            }
            // Over the limit the decoder reads the id without parsing the rest into values
            // (which the oracle's `Value` parse cannot always do: nesting past 128 levels):
            // the id it names must at least be in the payload as a string.
            let carried = match (&r.id, want) {
                (Some(got), Envelope::TooLarge) => std::str::from_utf8(bytes)
                    .is_ok_and(|t| t.contains(&format!("\"{}\"", got.as_str()))),
                (got, _) => got.is_none() || *got == id,
            };
            if !carried {
                return Err(format!(
                    "command reject names an id it did not carry: {r:?}"
                ));
            }
        }
    }
    Ok(())
}

fn check_api_request(bytes: &[u8]) -> Result<(), String> {
    let (want, map) = envelope(bytes, <ApiRequest as Payload>::MAX_LEN);
    match ApiRequest::decode(bytes) {
        Ok(req) => {
            if want != Envelope::V1 {
                return Err(format!("request accepted, but the envelope is {want:?}"));
            }
            let enc = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
            if ApiRequest::decode(&enc).as_ref() != Ok(&req) {
                return Err(format!("request does not round-trip: {req:?}"));
            }
        }
        Err(r) => {
            let got = match &r.error {
                EnvelopeError::Decode(d) => kind_of(d),
                EnvelopeError::UnknownKind { .. } | EnvelopeError::BadArgs { .. } => Envelope::V1,
            };
            if got != want {
                return Err(format!("api request: {r} ({got:?}), expected {want:?}"));
            }
            let id: Option<CommandId> = readable(&map, "id");
            let client: Option<ClientId> = readable(&map, "client");
            if want == Envelope::V1 && (r.id != id || r.client != client) {
                return Err(format!(
                    "api reject lost its id/client {id:?}/{client:?}: {r:?}"
                ));
            }
        }
    }
    Ok(())
}

/// Every check, whatever the seed's type: a payload arrives on one topic, but a buggy or
/// hostile publisher can put anything there, so every decoder sees every input.
fn check_all(bytes: &[u8]) -> Result<(), String> {
    use protocol::api::{ApiResponse, QueueSnapshot};
    use protocol::command::CommandResult;
    use protocol::files::{FileChunkRequest, FileChunkResponse};
    use protocol::presence::{Meta, Status};
    use protocol::state::{Event, StateSnapshot};
    check_payload::<Status>(bytes)?;
    check_payload::<Meta>(bytes)?;
    check_payload::<StateSnapshot>(bytes)?;
    check_payload::<Event>(bytes)?;
    check_payload::<CommandResult>(bytes)?;
    check_payload::<FileChunkRequest>(bytes)?;
    check_payload::<FileChunkResponse>(bytes)?;
    check_payload::<ApiResponse>(bytes)?;
    check_payload::<QueueSnapshot>(bytes)?;
    check_payload::<Command>(bytes)?;
    check_payload::<ApiRequest>(bytes)?;
    check_command(bytes)?;
    check_api_request(bytes)?;
    if let Ok(FileChunkResponse::Ok {
        offset,
        total_size,
        chunk_sha256,
        data_b64,
        ..
    }) = FileChunkResponse::decode(bytes)
    {
        check_chunk(offset, total_size, &chunk_sha256, &data_b64)?;
    }
    Ok(())
}

// ---- mutations -------------------------------------------------------------------------------

/// A replacement value for a JSON node.
fn arb_value() -> impl Strategy<Value = Value> {
    let big = || {
        prop_oneof![
            Just(Value::from(u64::MAX)),
            Just(Value::from(i64::MIN)),
            Just(Value::from(1e308)),
            Just(Value::from(-0.0)),
            Just(Value::from(1.5)),
            Just(Value::from(0)),
            Just(Value::from(1)),
            Just(Value::from(2)),
            Just(Value::from(-1)),
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("JSON has no NaN/inf", |f| f.is_finite())
                .prop_map(Value::from),
        ]
    };
    let strings = prop_oneof![
        "[a-z0-9_.:-]{0,70}".prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        // Long, up to past the control limit once encoded.
        (1usize..70_000).prop_map(|n| Value::from("x".repeat(n))),
        Just(Value::from("a".repeat(64))),
        Just(Value::from("a".repeat(65))),
        Just(Value::from("\u{0}\u{fffd}/+#")),
        Just(Value::from(
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        )),
    ];
    let leaf = prop_oneof![
        big(),
        strings,
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        Just(Value::Array(vec![])),
        Just(Value::Object(Default::default())),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,10}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[derive(Debug, Clone)]
enum TreeOp {
    /// Replace the node at the chosen path.
    Replace(Value),
    /// Wrap it in `depth` arrays (serde_json stops at 128).
    Nest(usize),
    /// Remove it from its parent.
    Remove,
    /// Add a field to the chosen object (or the root).
    Add(String, Value),
    /// Rename a field.
    Rename(String),
}

fn arb_tree_op() -> impl Strategy<Value = TreeOp> {
    prop_oneof![
        4 => arb_value().prop_map(TreeOp::Replace),
        1 => prop_oneof![1usize..200, Just(127), Just(128), Just(5000)].prop_map(TreeOp::Nest),
        2 => Just(TreeOp::Remove),
        1 => ("[a-z_]{1,12}", arb_value()).prop_map(|(k, v)| TreeOp::Add(k, v)),
        1 => "[a-z_]{1,12}".prop_map(TreeOp::Rename),
    ]
}

#[derive(Debug, Clone)]
enum ByteOp {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    /// Pad with spaces to `MAX + n` bytes (the limit of the seed's type, or the largest).
    PadPast(usize),
}

fn arb_byte_op() -> impl Strategy<Value = ByteOp> {
    prop_oneof![
        3 => (any::<usize>(), 1u8..=255).prop_map(|(i, x)| ByteOp::Flip(i, x)),
        2 => any::<usize>().prop_map(ByteOp::Truncate),
        2 => (
            any::<usize>(),
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 1..8),
                Just(b"\xff\xfe".to_vec()),
                Just(b"\xc3".to_vec()),
                Just(b"\\u0000".to_vec()),
                Just(b"\\ud800".to_vec()),
                Just(b"}".to_vec()),
                Just(b",\"v\":1".to_vec()),
                Just(b"[".repeat(200)),
            ]
        )
            .prop_map(|(i, b)| ByteOp::Insert(i, b)),
        1 => (0usize..3).prop_map(ByteOp::PadPast),
    ]
}

/// The deepest a mutated tree may get. Past serde_json's recursion limit (128) by far, which is
/// what the deep cases test, but bounded: the harness itself (and serde_json's encoder and
/// `Value`'s drop) recurse, and two `Nest(5000)` edits once overflowed the test thread's stack.
const MAX_TREE_DEPTH: usize = 5_200;

/// Every path in `v` (object keys and array indices), the root first. Iterative: the tree may
/// be thousands of levels deep.
fn paths(v: &Value) -> Vec<Vec<PathSeg>> {
    let mut out = Vec::new();
    let mut todo = vec![(v, Vec::new())];
    while let Some((v, here)) = todo.pop() {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    let mut p = here.clone();
                    p.push(PathSeg::Key(k.clone()));
                    todo.push((child, p));
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    let mut p = here.clone();
                    p.push(PathSeg::Index(i));
                    todo.push((child, p));
                }
            }
            _ => {}
        }
        out.push(here);
    }
    out
}

/// How many levels deep `v` goes (a scalar is 0).
fn tree_depth(v: &Value) -> usize {
    let mut deepest = 0;
    let mut todo = vec![(v, 0usize)];
    while let Some((v, d)) = todo.pop() {
        deepest = deepest.max(d);
        match v {
            Value::Object(m) => todo.extend(m.values().map(|c| (c, d + 1))),
            Value::Array(a) => todo.extend(a.iter().map(|c| (c, d + 1))),
            _ => {}
        }
    }
    deepest
}

#[derive(Debug, Clone)]
enum PathSeg {
    Key(String),
    Index(usize),
}

fn node<'a>(v: &'a mut Value, path: &[PathSeg]) -> Option<&'a mut Value> {
    let mut cur = v;
    for seg in path {
        cur = match (seg, cur) {
            (PathSeg::Key(k), Value::Object(m)) => m.get_mut(k)?,
            (PathSeg::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn apply_tree(v: &mut Value, pick: usize, op: &TreeOp) {
    let all = paths(v);
    let path = &all[pick % all.len()];
    match op {
        TreeOp::Replace(new) => {
            if let Some(n) = node(v, path) {
                *n = new.clone();
            }
        }
        TreeOp::Nest(depth) => {
            let room = MAX_TREE_DEPTH.saturating_sub(tree_depth(v));
            if let Some(n) = node(v, path) {
                let mut x = n.take();
                for _ in 0..(*depth).min(room) {
                    x = Value::Array(vec![x]);
                }
                *n = x;
            }
        }
        TreeOp::Remove | TreeOp::Rename(_) => {
            let Some((last, parent)) = path.split_last() else {
                return;
            };
            let Some(p) = node(v, parent) else { return };
            let removed = match (last, p) {
                (PathSeg::Key(k), Value::Object(m)) => m.remove(k).map(|x| (x, Some(m))),
                (PathSeg::Index(i), Value::Array(a)) if *i < a.len() => Some((a.remove(*i), None)),
                _ => None,
            };
            if let (TreeOp::Rename(to), Some((x, Some(m)))) = (op, removed) {
                m.insert(to.clone(), x);
            }
        }
        TreeOp::Add(k, new) => {
            let target = node(v, path).filter(|n| n.is_object());
            let target = match target {
                Some(t) => t,
                None => v,
            };
            if let Value::Object(m) = target {
                m.insert(k.clone(), new.clone());
            }
        }
    }
}

fn apply_bytes(bytes: &mut Vec<u8>, op: &ByteOp) {
    match op {
        ByteOp::Flip(i, x) => {
            if !bytes.is_empty() {
                let i = i % bytes.len();
                bytes[i] ^= x;
            }
        }
        ByteOp::Truncate(i) => {
            let n = i % (bytes.len() + 1);
            bytes.truncate(n);
        }
        ByteOp::Insert(i, b) => {
            let i = i % (bytes.len() + 1);
            bytes.splice(i..i, b.iter().copied());
        }
        ByteOp::PadPast(which) => {
            let max = [
                protocol::codec::MAX_CONTROL_PAYLOAD,
                MAX_CHUNK_PAYLOAD,
                <protocol::api::QueueSnapshot as Payload>::MAX_LEN,
            ][*which];
            let want = max + 1;
            if bytes.len() < want {
                bytes.resize(want, b' ');
            }
        }
    }
}

// ---- files ----------------------------------------------------------------------------------

fn check_chunk(offset: u64, total: u64, sha: &Sha256Hex, b64: &str) -> Result<(), String> {
    match verify_chunk(offset, total, sha, b64) {
        Ok(data) => {
            let fits = offset
                .checked_add(data.len() as u64)
                .is_some_and(|end| end <= total);
            if data.is_empty() || data.len() > MAX_CHUNK_LEN as usize || !fits {
                return Err(format!(
                    "verify_chunk accepted {} bytes at {offset} of {total} (limit {MAX_CHUNK_LEN})",
                    data.len()
                ));
            }
            if &Sha256Hex::digest(&data) != sha {
                return Err("verify_chunk accepted data that does not hash to its sha".into());
            }
        }
        Err(ChunkError::BadLength { .. } | ChunkError::Base64(_) | ChunkError::Mismatch { .. }) => {
        }
    }
    Ok(())
}

// ---- topics ---------------------------------------------------------------------------------

fn arb_topic_name() -> impl Strategy<Value = String> {
    let levels = prop_oneof![
        Just("printers/p0/state".to_owned()),
        Just("printers/p0/cmd/result".to_owned()),
        Just("printers/p0/file/chunk".to_owned()),
        Just("supervisor/status".to_owned()),
        Just("queue".to_owned()),
        Just("api/request".to_owned()),
        Just("api/response/cli-1".to_owned()),
        "[a-z0-9/+#_.:-]{0,40}",
        any::<String>(),
    ];
    let root = prop_oneof![
        4 => Just("printloop/v1/".to_owned()),
        1 => Just("printloop/v1".to_owned()),
        1 => Just("printloop/v2/".to_owned()),
        1 => Just(String::new()),
    ];
    (
        root,
        levels,
        proptest::collection::vec((any::<usize>(), any::<char>()), 0..3),
    )
        .prop_map(|(root, rest, edits)| {
            let mut s = format!("{root}{rest}");
            for (i, c) in edits {
                let mut i = i % (s.len() + 1);
                while !s.is_char_boundary(i) {
                    i -= 1;
                }
                s.insert(i, c);
            }
            s
        })
}

// ---- properties -----------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(200))]

    /// A docs example, mutated as a JSON tree (1-4 edits), then as bytes (0-2 edits).
    #[test]
    fn mutated_payloads(
        seed in any::<prop::sample::Index>(),
        tree_ops in proptest::collection::vec((any::<usize>(), arb_tree_op()), 1..5),
        byte_ops in proptest::collection::vec(arb_byte_op(), 0..3),
    ) {
        let seeds = seeds();
        let (_, text) = &seeds[seed.index(seeds.len())];
        let mut v: Value = serde_json::from_str(text).expect("docs examples are JSON");
        for (pick, op) in &tree_ops {
            apply_tree(&mut v, *pick, op);
        }
        let mut bytes = serde_json::to_vec(&v).expect("a Value encodes");
        for op in &byte_ops {
            apply_bytes(&mut bytes, op);
        }
        if let Err(e) = check_all(&bytes) {
            return Err(TestCaseError::fail(format!("{e}\ninput: {}", String::from_utf8_lossy(&bytes))));
        }
    }

    /// Two examples spliced at random points.
    #[test]
    fn spliced_payloads(a in any::<prop::sample::Index>(), b in any::<prop::sample::Index>(), i in any::<usize>(), j in any::<usize>()) {
        let seeds = seeds();
        let x = seeds[a.index(seeds.len())].1.as_bytes();
        let y = seeds[b.index(seeds.len())].1.as_bytes();
        let mut bytes = x[..i % (x.len() + 1)].to_vec();
        bytes.extend_from_slice(&y[j % (y.len() + 1)..]);
        if let Err(e) = check_all(&bytes) {
            return Err(TestCaseError::fail(format!("{e}\ninput: {}", String::from_utf8_lossy(&bytes))));
        }
    }

    /// Raw bytes, and raw bytes behind a valid-looking prefix.
    #[test]
    fn raw_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600), prefix in prop_oneof![Just(&b""[..]), Just(&b"{\"v\":1,"[..]), Just(&b"{\"v\":1,\"id\":\"c1\",\"kind\":\"pause\",\"args\":"[..])]) {
        let mut input = prefix.to_vec();
        input.extend_from_slice(&bytes);
        if let Err(e) = check_all(&input) {
            return Err(TestCaseError::fail(format!("{e}\ninput: {input:?}")));
        }
    }

    /// Topic names: parsing never panics, and accepts only the canonical spelling of a topic.
    #[test]
    fn topic_names(name in arb_topic_name()) {
        let t = Topics::default();
        match t.parse(&name) {
            Ok(topic) => prop_assert_eq!(t.format(&topic), name),
            Err(TopicError::OutsideRoot(_)) => prop_assert!(!name.starts_with("printloop/v1/")),
            Err(TopicError::Unknown(_) | TopicError::BadId { .. }) => prop_assert!(name.starts_with("printloop/v1/")),
            Err(e @ TopicError::BadRoot { .. }) => return Err(TestCaseError::fail(format!("parse gave {e}"))),
        }
    }

    /// Chunk verification: anything accepted is within the limits and hashes to its sha.
    #[test]
    fn chunks(
        len in prop_oneof![0usize..64, (MAX_CHUNK_LEN as usize - 4)..(MAX_CHUNK_LEN as usize + 4)],
        offset in prop_oneof![Just(0u64), any::<u64>(), Just(u64::MAX - 1)],
        slack in prop_oneof![Just(0u64), any::<u64>()],
        tamper in any::<Option<(usize, char)>>(),
        right_sha in any::<bool>(),
    ) {
        let data = vec![b'G'; len];
        let mut b64 = base64_encode(&data);
        if let Some((i, c)) = tamper {
            let i = i % (b64.len() + 1);
            b64.insert(i, c);
        }
        let sha = if right_sha { Sha256Hex::digest(&data) } else { Sha256Hex::digest(b"other") };
        let total = offset.saturating_add(len as u64).saturating_add(slack);
        if let Err(e) = check_chunk(offset, total, &sha, &b64) {
            return Err(TestCaseError::fail(e));
        }
    }

    /// Lines from the firmware and from a host: real lines, mutated. Total functions: no
    /// panic, and the classification survives surrounding whitespace.
    #[test]
    fn marlin_lines(
        line in prop_oneof![
            Just("ok N12 P15 B3".to_owned()),
            Just("ok T:210.3 /215.0 B:59.8 /60.0 @:127 B@:0".to_owned()),
            Just("Resend: 12".to_owned()),
            Just("rs N4294967295".to_owned()),
            Just("Error:checksum mismatch, Last Line: 3".to_owned()),
            Just("echo:busy: processing".to_owned()),
            Just("Cap:AUTOREPORT_TEMP:1".to_owned()),
            Just("FIRMWARE_NAME:Marlin 2.1.2.1 (x) SOURCE_CODE_URL:github.com UUID:a".to_owned()),
            Just(" T:25.00 /0.00 B:60.00 /60.00 T0:1 T1:2 C:3 @:0 B@:0 W:?".to_owned()),
            Just("//action:pause".to_owned()),
            Just(marlin::format_line(7, "G1 X5 Y-3.2 E0.1")),
            Just(marlin::format_line(u32::MAX, "M110 N0")),
        ],
        edits in proptest::collection::vec((any::<usize>(), prop_oneof![any::<char>(), Just('*'), Just(':'), Just('/'), Just('N'), Just(' '), Just('9')]), 0..4),
        cut in any::<Option<usize>>(),
    ) {
        let mut s = line;
        for (i, c) in edits {
            let mut i = i % (s.len() + 1);
            while !s.is_char_boundary(i) { i -= 1; }
            s.insert(i, c);
        }
        if let Some(c) = cut {
            let mut c = c % (s.len() + 1);
            while !s.is_char_boundary(c) { c -= 1; }
            s.truncate(c);
        }
        let r = marlin::parse_response(&s);
        let _ = r.is_fatal();
        let _ = marlin::strip_comment(&s);
        let h = marlin::parse_host_line(&s);
        prop_assert_eq!(marlin::parse_host_line(&format!("{s}\r\n")), h);
        prop_assert_eq!(marlin::parse_response(&format!("{s}\r\n")), marlin::parse_response(&s));
    }
}

fn base64_encode(data: &[u8]) -> String {
    // The protocol's own encoder: a chunk response built from `data`.
    let sha = Sha256Hex::digest(data);
    match protocol::files::FileChunkResponse::chunk(
        CommandId::new("r").expect("id"),
        sha,
        0,
        data.len() as u64,
        data,
    ) {
        protocol::files::FileChunkResponse::Ok { data_b64, .. } => data_b64,
        protocol::files::FileChunkResponse::Error { .. } => unreachable!("chunk() builds Ok"),
    }
}

// ---- targeted cases: the limits named in the design ------------------------------------------

/// A nest deeper than serde_json's recursion limit (128) is a syntax error, not a stack
/// overflow; one inside the limit reaches the shape check.
#[test]
fn deep_nesting_is_a_typed_error() {
    for depth in [126usize, 127, 5_000, 30_000] {
        let body = format!(
            "{{\"v\":1,\"id\":\"c1\",\"kind\":\"pause\",\"args\":{}{}}}",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        check_all(body.as_bytes()).unwrap_or_else(|e| panic!("depth {depth}: {e}"));
        let r = Command::decode(body.as_bytes()).expect_err("never a command");
        if depth > 126 {
            assert!(
                matches!(r.error, EnvelopeError::Decode(DecodeError::Syntax(ref m)) if m.contains("recursion")),
                "depth {depth}: {r:?}"
            );
        } else {
            assert!(
                matches!(r.error, EnvelopeError::BadArgs { .. }),
                "depth {depth}: {r:?}"
            );
            assert_eq!(r.id.as_ref().map(CommandId::as_str), Some("c1"));
        }
    }
}

/// Past the limit the payload is refused by its length alone, however it looks inside (a
/// garbage payload and a perfect one get the same answer, so nothing was parsed).
#[test]
fn oversize_is_refused_before_parsing() {
    use protocol::state::StateSnapshot;
    for (_, text) in seeds() {
        for max in [
            protocol::codec::MAX_CONTROL_PAYLOAD,
            MAX_CHUNK_PAYLOAD,
            1024 * 1024,
        ] {
            let mut good = text.clone().into_bytes();
            good.resize(max + 1, b' ');
            let mut bad = vec![b'['; max + 1];
            bad[0] = 0xff;
            for bytes in [&good, &bad] {
                check_all(bytes).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
    let big = vec![b' '; StateSnapshot::MAX_LEN + 1];
    assert_eq!(
        StateSnapshot::decode(&big),
        Err(DecodeError::TooLarge {
            len: StateSnapshot::MAX_LEN + 1,
            max: StateSnapshot::MAX_LEN
        })
    );
}

/// Numbers past `u64`, negative where unsigned, fractions where integers: `Invalid`, naming
/// the field; never a wrapped or truncated value.
#[test]
fn out_of_range_numbers_are_invalid() {
    use protocol::presence::Status;
    for epoch in ["18446744073709551616", "-1", "1.5", "1e400", "1e19"] {
        let body = format!("{{\"v\":1,\"presence\":\"online\",\"epoch\":{epoch},\"at_ms\":0}}");
        let e = Status::decode(body.as_bytes()).expect_err(epoch);
        match e {
            DecodeError::Invalid(m) => assert!(m.contains("epoch"), "{epoch}: {m}"),
            DecodeError::Syntax(m) => assert!(epoch == "1e400", "{epoch}: {m}"),
            other => panic!("{epoch}: {other:?}"),
        }
    }
    for v in [
        "2",
        "0",
        "\"1\"",
        "1.0",
        "-1",
        "18446744073709551617",
        "null",
    ] {
        let body = format!("{{\"v\":{v},\"presence\":\"online\",\"epoch\":1,\"at_ms\":0}}");
        assert!(
            matches!(
                Status::decode(body.as_bytes()),
                Err(DecodeError::UnsupportedVersion { .. })
            ),
            "v={v}"
        );
    }
}

/// The decoded length of a chunk is bounded by `MAX_CHUNK_LEN` exactly, not by the base64
/// text's length (87384 characters decode to up to 65538 bytes).
#[test]
fn chunk_one_byte_past_the_limit_is_refused() {
    for len in [
        MAX_CHUNK_LEN as usize,
        MAX_CHUNK_LEN as usize + 1,
        MAX_CHUNK_LEN as usize + 2,
    ] {
        let data = vec![b'G'; len];
        let sha = Sha256Hex::digest(&data);
        let got = verify_chunk(0, u64::MAX, &sha, &base64_encode(&data));
        if len <= MAX_CHUNK_LEN as usize {
            assert_eq!(got.map(|d| d.len()), Ok(len));
        } else {
            assert!(
                matches!(got, Err(ChunkError::BadLength { len: l, .. }) if l == len),
                "{len}: {got:?}"
            );
        }
    }
}

#[test]
fn a_topic_level_with_wildcards_or_nul_is_a_bad_id() {
    let t = Topics::default();
    for name in [
        "printloop/v1/printers/+/state",
        "printloop/v1/printers/#/state",
        "printloop/v1/printers/p\u{0}/state",
        "printloop/v1/api/response/a/b",
    ] {
        assert!(
            matches!(
                t.parse(name),
                Err(TopicError::BadId { .. }) | Err(TopicError::Unknown(_))
            ),
            "{name:?}"
        );
    }
    assert_eq!(
        t.parse("printloop/v1/printers/p0/state"),
        Ok(Topic::State("p0".parse().expect("id")))
    );
}
