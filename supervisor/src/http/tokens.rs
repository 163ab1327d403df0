//! API tokens: who may read (viewer) and who may act (operator) over HTTP.
//!
//! `<data_dir>/tokens.toml` (mode 0600) lists each token's name, role and the SHA-256 of the
//! token; the token itself is shown once, when `printloop tokens add` makes it, and never
//! stored. A token is 32 random bytes, so a fast hash is enough (nothing to brute-force, unlike
//! a password). The file is read again whenever it changes: adding or removing a token takes
//! effect without a restart.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use protocol::web::Role;
use protocol::ClientId;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

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

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default, rename = "token")]
    tokens: Vec<TokenEntry>,
}

/// Why the token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// Reading or writing it failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not valid.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
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

/// A file's modification time and length: a change in either means read it again.
type Stamp = Option<(SystemTime, u64)>;

/// The token registry, re-read when its file changes.
#[derive(Debug)]
pub struct Tokens {
    path: PathBuf,
    seen: RwLock<(Stamp, Vec<TokenEntry>)>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn load(path: &Path) -> Result<Vec<TokenEntry>, TokensError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(TokensError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let file: TokenFile = toml::from_str(&text).map_err(|e| TokensError::Invalid {
        path: path.to_owned(),
        reason: e.message().to_owned(),
    })?;
    for t in &file.tokens {
        let hex_ok = t.sha256.len() == 64 && t.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex_ok {
            return Err(TokensError::Invalid {
                path: path.to_owned(),
                reason: format!("token {:?}: sha256 must be 64 hex digits", t.name),
            });
        }
        ClientId::new(t.name.as_str()).map_err(|e| TokensError::Invalid {
            path: path.to_owned(),
            reason: format!("token name {:?}: {e}", t.name),
        })?;
    }
    Ok(file.tokens)
}

fn stamp(path: &Path) -> Stamp {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len()))
}

impl Tokens {
    /// The registry at `path` (absent: no tokens yet). A file that cannot be read is an error
    /// here, at start; later, a bad edit keeps the last good list (and is logged).
    pub fn open(path: PathBuf) -> Result<Self, TokensError> {
        let entries = load(&path)?;
        Ok(Self {
            seen: RwLock::new((stamp(&path), entries)),
            path,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn refresh(&self) {
        let now = stamp(&self.path);
        let same = self.seen.read().map(|g| g.0 == now).unwrap_or(false);
        if same {
            return;
        }
        match load(&self.path) {
            Ok(entries) => {
                if let Ok(mut g) = self.seen.write() {
                    *g = (now, entries);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "token file unreadable; keeping the tokens known before");
                if let Ok(mut g) = self.seen.write() {
                    g.0 = now;
                }
            }
        }
    }

    /// Whether any token exists.
    pub fn any(&self) -> bool {
        self.refresh();
        self.seen.read().map(|g| !g.1.is_empty()).unwrap_or(false)
    }

    /// Who holds `token`, if anyone. Every entry is compared, in constant time each.
    pub fn verify(&self, token: &str) -> Option<Principal> {
        if !token.starts_with(TOKEN_PREFIX) || token.len() > 128 {
            return None;
        }
        self.refresh();
        let want = digest(token);
        let g = self.seen.read().ok()?;
        let mut found = None;
        for t in &g.1 {
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
        self.refresh();
        self.seen.read().map(|g| g.1.clone()).unwrap_or_default()
    }
}

/// Makes a token named `name` with `role`, stores its hash in `path` (made if absent, mode
/// 0600, replaced atomically) and returns the token: the only time it is ever shown.
pub fn add(path: &Path, name: &str, role: Role, now_ms: u64) -> Result<String, TokensError> {
    ClientId::new(name).map_err(|e| TokensError::Name {
        name: name.to_owned(),
        reason: e.to_string(),
    })?;
    let mut tokens = load(path)?;
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
    save(path, tokens)?;
    Ok(token)
}

/// Removes the token named `name`; false when there was none.
pub fn remove(path: &Path, name: &str) -> Result<bool, TokensError> {
    let mut tokens = load(path)?;
    let before = tokens.len();
    tokens.retain(|t| t.name != name);
    if tokens.len() == before {
        return Ok(false);
    }
    save(path, tokens)?;
    Ok(true)
}

fn save(path: &Path, tokens: Vec<TokenEntry>) -> Result<(), TokensError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| TokensError::Io {
        path: path.to_owned(),
        source,
    };
    let text = toml::to_string(&TokenFile { tokens }).map_err(|e| TokensError::Invalid {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let body = format!(
        "# printloop API tokens (printloop tokens add/list/remove). Only hashes are stored.\n{text}"
    );
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("toml.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(body.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
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
