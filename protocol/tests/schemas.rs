//! The committed JSON Schemas equal what the Rust types generate, every payload example in
//! `docs/` validates against its schema **and** decodes with the Rust type, and the schemas
//! reject what the decoders reject.
//!
//! Regenerate the schemas after changing a type:
//! `UPDATE_SCHEMAS=1 cargo test -p protocol --test schemas`.

use std::path::{Path, PathBuf};

use protocol::schema::{self, PayloadSchema};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("protocol/ has a parent")
        .to_path_buf()
}

fn schema_path(name: &str) -> PathBuf {
    repo_root()
        .join("schemas")
        .join(format!("{name}.schema.json"))
}

#[test]
fn committed_schemas_match_the_types() {
    let update = std::env::var_os("UPDATE_SCHEMAS").is_some();
    let mut drifted = Vec::new();
    for PayloadSchema { name, schema, .. } in schema::all() {
        let want = schema::render(&schema);
        let path = schema_path(name);
        if update {
            std::fs::write(&path, &want).expect("write schema");
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(have) if have == want => {}
            Ok(_) => drifted.push(format!("{} differs from the type", path.display())),
            Err(e) => drifted.push(format!("{}: {e}", path.display())),
        }
    }
    // No stray schema files for payloads that no longer exist.
    let known: Vec<String> = schema::all()
        .iter()
        .map(|s| format!("{}.schema.json", s.name))
        .collect();
    for entry in std::fs::read_dir(repo_root().join("schemas")).expect("schemas/ exists") {
        let file = entry.expect("dir entry").file_name();
        let file = file.to_string_lossy();
        if file.ends_with(".schema.json") && !known.iter().any(|k| *k == file) {
            drifted.push(format!("schemas/{file} belongs to no payload type"));
        }
    }
    assert!(
        drifted.is_empty(),
        "schemas drifted from the Rust types:\n  {}\nregenerate with: UPDATE_SCHEMAS=1 cargo test -p protocol --test schemas",
        drifted.join("\n  ")
    );
}

/// A fenced ```json block whose info string names a schema: ```json schema=state
#[derive(Debug)]
struct Example {
    file: PathBuf,
    line: usize,
    schema: String,
    /// `schema=state invalid`: an example of what must be rejected.
    invalid: bool,
    body: String,
}

fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            markdown_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "md") {
            out.push(path);
        }
    }
}

fn examples() -> Vec<Example> {
    let mut files = Vec::new();
    markdown_files(&repo_root().join("docs"), &mut files);
    files.push(repo_root().join("README.md"));
    let mut found = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let mut lines = text.lines().enumerate();
        while let Some((n, line)) = lines.next() {
            let Some(info) = line.trim_start().strip_prefix("```json") else {
                continue;
            };
            let mut words = info.split_whitespace();
            let schema = words
                .clone()
                .find_map(|w| w.strip_prefix("schema="))
                .map(str::to_owned);
            let invalid = words.any(|w| w == "invalid");
            let mut body = String::new();
            for (_, l) in lines.by_ref() {
                if l.trim_start().starts_with("```") {
                    break;
                }
                body.push_str(l);
                body.push('\n');
            }
            if let Some(schema) = schema {
                found.push(Example {
                    file: file.clone(),
                    line: n + 1,
                    schema,
                    invalid,
                    body,
                });
            }
        }
    }
    found
}

#[test]
fn docs_examples_validate_against_schemas_and_types() {
    let schemas = schema::all();
    let examples = examples();
    let mut failures = Vec::new();
    for ex in &examples {
        let Some(s) = schemas.iter().find(|s| s.name == ex.schema) else {
            failures.push(format!(
                "{}:{}: unknown schema {:?}",
                ex.file.display(),
                ex.line,
                ex.schema
            ));
            continue;
        };
        let where_ = format!("{}:{} ({})", ex.file.display(), ex.line, ex.schema);
        let value: serde_json::Value = match serde_json::from_str(&ex.body) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("{where_}: not JSON: {e}"));
                continue;
            }
        };
        let validator = jsonschema::validator_for(&s.schema).expect("generated schema compiles");
        let schema_ok = validator.is_valid(&value);
        let type_ok = (s.decode)(ex.body.as_bytes());
        match (ex.invalid, schema_ok, type_ok) {
            (false, true, Ok(())) | (true, false, Err(_)) => {}
            (false, _, r) => failures.push(format!(
                "{where_}: schema valid = {schema_ok}, decode = {r:?}; errors: {:?}",
                validator
                    .iter_errors(&value)
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
            )),
            (true, s_ok, r) => failures.push(format!(
                "{where_}: marked invalid but schema valid = {s_ok}, decode = {r:?}"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every payload has at least one documented, valid example.
    for s in &schemas {
        assert!(
            examples.iter().any(|e| e.schema == s.name && !e.invalid),
            "no valid example of {} in docs/",
            s.name
        );
    }
}

/// The integrator's guide shows one valid example of every payload (the test above checks each
/// against its schema and its type).
#[test]
fn integrations_guide_has_an_example_of_every_payload() {
    let guide = repo_root().join("docs").join("integrations.md");
    let examples: Vec<Example> = examples()
        .into_iter()
        .filter(|e| e.file == guide && !e.invalid)
        .collect();
    let missing: Vec<&str> = schema::all()
        .iter()
        .map(|s| s.name)
        .filter(|name| !examples.iter().any(|e| e.schema == *name))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/integrations.md has no example of: {}",
        missing.join(", ")
    );
}

mod no_panic {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Arbitrary bytes never panic any decoder.
        #[test]
        fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            for s in protocol::schema::all() {
                let _ = (s.decode)(&bytes);
            }
            let _ = protocol::command::Command::decode(&bytes);
            let _ = protocol::api::ApiRequest::decode(&bytes);
        }

        /// JSON objects with the right version and random fields never panic and never pass
        /// when they carry a field no payload has.
        #[test]
        fn versioned_objects(
            keys in proptest::collection::vec("[a-z_]{1,12}", 0..6),
            val in prop_oneof![Just("1".to_string()), Just("\"x\"".to_string()), Just("null".to_string()), Just("{}".to_string()), Just("[]".to_string()), Just("-1".to_string())],
        ) {
            let mut body = String::from("{\"v\":1,\"zz_unknown\":0");
            for k in &keys {
                body.push_str(&format!(",\"{k}\":{val}"));
            }
            body.push('}');
            for s in protocol::schema::all() {
                prop_assert!((s.decode)(body.as_bytes()).is_err(), "{} accepted {body}", s.name);
            }
        }
    }
}
