//! Identifiers that travel in topics and payloads.
//!
//! Every identifier is validated when it is built or decoded, so code that holds a `PrinterId`
//! knows it is safe to put in a topic level (no `/`, `+`, `#`, no empty string, bounded length).

use std::borrow::Cow;
use std::fmt;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {rule}")]
pub struct IdError {
    /// Which kind of identifier was being built.
    pub what: &'static str,
    /// The rejected value (truncated to 80 characters).
    pub value: String,
    /// The rule it broke.
    pub rule: &'static str,
}

macro_rules! string_id {
    (
        $(#[$doc:meta])*
        $name:ident, $what:literal, max = $max:literal, pattern = $pattern:literal, rule = $rule:literal,
        check = $check:expr
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Longest accepted value, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                let check: fn(&str) -> bool = $check;
                if value.is_empty() || value.len() > $max || !check(&value) {
                    let mut shown = value;
                    if shown.len() > 80 {
                        let mut cut = 80;
                        while !shown.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        shown.truncate(cut);
                    }
                    return Err(IdError { what: $what, value: shown, rule: $rule });
                }
                Ok(Self(value))
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(value: &str) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": "string",
                    "description": $rule,
                    "pattern": $pattern,
                    "minLength": 1,
                    "maxLength": $max,
                })
            }
        }
    };
}

fn is_slug(s: &str) -> bool {
    let bytes = s.as_bytes();
    (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'_')
}

fn is_token(s: &str) -> bool {
    let bytes = s.as_bytes();
    bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

string_id!(
    /// A printer's id: a topic level, a Home Assistant unique-id part, a redb key.
    PrinterId, "printer id", max = 64, pattern = "^[a-z0-9][a-z0-9_-]{0,63}$",
    rule = "1-64 characters of a-z, 0-9, '-' and '_', starting with a letter or digit",
    check = is_slug
);
string_id!(
    /// A job's id, assigned by the supervisor when a job is accepted; never reused.
    JobId, "job id", max = 64, pattern = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$",
    rule = "1-64 characters of A-Z, a-z, 0-9, '-', '_', '.' and ':', starting with a letter or digit",
    check = is_token
);
string_id!(
    /// A command's id, chosen by its sender; the gateway de-duplicates on it.
    CommandId, "command id", max = 64, pattern = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$",
    rule = "1-64 characters of A-Z, a-z, 0-9, '-', '_', '.' and ':', starting with a letter or digit",
    check = is_token
);
string_id!(
    /// An API client's id: the last level of its response topic.
    ClientId, "client id", max = 64, pattern = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$",
    rule = "1-64 characters of A-Z, a-z, 0-9, '-', '_', '.' and ':', starting with a letter or digit",
    check = is_token
);
string_id!(
    /// A SHA-256 digest in lowercase hex: the name of a G-code file everywhere in printloop.
    Sha256Hex, "sha256", max = 64, pattern = "^[0-9a-f]{64}$",
    rule = "64 lowercase hexadecimal characters",
    check = is_sha256
);

impl Sha256Hex {
    /// The digest of `bytes`.
    pub fn digest(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Self(hex::encode(sha2::Sha256::digest(bytes)))
    }

    /// Wraps a finished hasher's output.
    pub fn from_digest(digest: &[u8; 32]) -> Self {
        Self(hex::encode(digest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printer_ids() {
        assert!(PrinterId::new("p0").is_ok());
        assert!(PrinterId::new("prusa-mk4_02").is_ok());
        for bad in ["", "P0", "a/b", "a+b", "a#", "-x", "ä", &"x".repeat(65)] {
            let err = PrinterId::new(bad).expect_err(bad);
            assert_eq!(err.what, "printer id");
        }
    }

    #[test]
    fn job_and_command_ids() {
        assert!(JobId::new("j-2026-11-22:0001.a").is_ok());
        assert!(CommandId::new("c1").is_ok());
        assert!(JobId::new("a b").is_err());
        assert!(CommandId::new(".x").is_err());
    }

    #[test]
    fn sha256_of_bytes() {
        let d = Sha256Hex::digest(b"abc");
        assert_eq!(
            d.as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(Sha256Hex::new(d.as_str().to_uppercase()).is_err());
    }

    #[test]
    fn decode_rejects_invalid_ids() {
        let err = serde_json::from_str::<PrinterId>("\"a/b\"").expect_err("must reject");
        assert!(err.to_string().contains("invalid printer id"), "{err}");
    }

    #[test]
    fn long_invalid_values_are_truncated_in_errors() {
        let err = PrinterId::new("é".repeat(100)).expect_err("too long");
        assert!(err.value.len() <= 80);
    }
}
