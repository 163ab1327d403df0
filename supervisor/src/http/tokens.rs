//! API tokens: who may read (viewer) and who may act (operator) over HTTP.
//!
//! `<data_dir>/tokens.toml` (mode 0600) lists each token's name, role and the SHA-256 of the
//! token; the token itself is shown once, when `printloop tokens add` makes it, and never
//! stored. A token is 32 random bytes, so a fast hash is enough (nothing to brute-force, unlike
//! a password). The file is read again whenever it changes: adding or removing a token takes
//! effect without a restart.

use std::path::{Path, PathBuf};

use protocol::web::Role;
use protocol::ClientId;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::registry::{load, save, Entry, RegistryError, Watched};

/// The token file's name in the supervisor's data directory.
pub const TOKENS_FILE: &str = "tokens.toml";
/// Every token starts with this (easy to spot in a config, and by secret scanners).
pub const TOKEN_PREFIX: &str = "plt_";

/// One token as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Its name: the client name of its requests (rate limit, logs, request ids).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of the token, hex.
    pub sha256: String,
    /// When it was made (Unix ms).
    pub created_at_ms: u64,
}

impl Entry for TokenEntry {
    const KEY: &'static str = "token";
    const HEADER: &'static str =
        "# printloop API tokens (printloop tokens add/list/remove). Only hashes are stored.";

    fn check(&self) -> Result<(), String> {
        let hex_ok = self.sha256.len() == 64 && self.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex_ok {
            return Err(format!(
                "token {:?}: sha256 must be 64 hex digits",
                self.name
            ));
        }
        ClientId::new(self.name.as_str())
            .map(|_| ())
            .map_err(|e| format!("token name {:?}: {e}", self.name))
    }
}

/// Why the token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// The file.
    #[error(transparent)]
    File(#[from] RegistryError),
    /// A name is not usable.
    #[error("token name {name:?}: {reason}")]
    Name {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// No randomness.
    #[error("no random source: {0}")]
    Random(String),
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name.
    pub name: ClientId,
    /// Its role.
    pub role: Role,
}

/// The token registry, re-read when its file changes.
#[derive(Debug)]
pub struct Tokens(Watched<TokenEntry>);

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    /// The registry at `path` (absent: no tokens yet).
    pub fn open(path: PathBuf) -> Result<Self, TokensError> {
        Ok(Self(Watched::open(path)?))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Whether any token exists.
    pub fn any(&self) -> bool {
        !self.0.entries().is_empty()
    }

    /// Who holds `token`, if anyone. Every entry is compared, in constant time each.
    pub fn verify(&self, token: &str) -> Option<Principal> {
        if !token.starts_with(TOKEN_PREFIX) || token.len() > 128 {
            return None;
        }
        let want = digest(token);
        let mut found = None;
        for t in &self.0.entries() {
            let Ok(stored) = hex::decode(&t.sha256) else {
                continue;
            };
            if bool::from(stored.as_slice().ct_eq(&want)) {
                found = Some(Principal {
                    name: ClientId::new(t.name.as_str()).ok()?,
                    role: t.role,
                });
            }
        }
        found
    }

    /// The tokens (without secrets).
    pub fn list(&self) -> Vec<TokenEntry> {
        self.0.entries()
    }
}

/// Makes a token named `name` with `role`, stores its hash in `path` (made if absent, mode
/// 0600, replaced atomically) and returns the token: the only time it is ever shown.
pub fn add(path: &Path, name: &str, role: Role, now_ms: u64) -> Result<String, TokensError> {
    ClientId::new(name).map_err(|e| TokensError::Name {
        name: name.to_owned(),
        reason: e.to_string(),
    })?;
    let mut tokens: Vec<TokenEntry> = load(path)?;
    if tokens.iter().any(|t| t.name == name) {
        return Err(TokensError::Name {
            name: name.to_owned(),
            reason: "a token with this name exists: remove it first".into(),
        });
    }
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| TokensError::Random(e.to_string()))?;
    let token = format!("{TOKEN_PREFIX}{}", hex::encode(raw));
    tokens.push(TokenEntry {
        name: name.to_owned(),
        role,
        sha256: hex::encode(digest(&token)),
        created_at_ms: now_ms,
    });
    save(path, &tokens)?;
    Ok(token)
}

/// Removes the token named `name`; false when there was none.
pub fn remove(path: &Path, name: &str) -> Result<bool, TokensError> {
    let mut tokens: Vec<TokenEntry> = load(path)?;
    let before = tokens.len();
    tokens.retain(|t| t.name != name);
    if tokens.len() == before {
        return Ok(false);
    }
    save(path, &tokens)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_shown_once_stored_hashed_and_verified_by_role() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TOKENS_FILE);
        let op = add(&path, "alice", Role::Operator, 1).expect("add");
        let view = add(&path, "wall", Role::Viewer, 2).expect("add");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(!text.contains(&op) && !text.contains(&view), "{text}");
        let mode = std::fs::metadata(&path).expect("meta").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let tokens = Tokens::open(path.clone()).expect("open");
        assert_eq!(tokens.verify(&op).expect("known").role, Role::Operator);
        assert_eq!(tokens.verify(&view).expect("known").name.as_str(), "wall");
        assert_eq!(tokens.verify("plt_0000"), None);
        assert_eq!(tokens.verify(&op[..op.len() - 1]), None);
        assert!(
            add(&path, "alice", Role::Viewer, 3).is_err(),
            "names are unique"
        );
        assert!(add(&path, "bad name", Role::Viewer, 3).is_err());
        assert!(remove(&path, "alice").expect("remove"));
        assert_eq!(tokens.verify(&op), None, "a removed token stops working");
    }
}
