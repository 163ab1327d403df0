//! A small registry file of the supervisor's data directory (`tokens.toml`, `webhooks.toml`):
//! a TOML list of entries, private (mode 0600, it may hold secrets), replaced atomically, and
//! read again whenever it changes, so `printloop tokens …` / `printloop webhooks …` take
//! effect without a restart. A bad edit keeps the last good list (and is logged).

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why a registry file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
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
}

/// An entry's own checks (beyond its TOML shape).
pub trait Entry: Clone + Serialize + DeserializeOwned {
    /// The TOML table name of each entry (`[[token]]`).
    const KEY: &'static str;
    /// The file's first line.
    const HEADER: &'static str;
    /// Why the entry is not usable, if it is not.
    fn check(&self) -> Result<(), String>;
}

/// Reads the entries of `path` (none when it does not exist).
pub fn load<T: Entry>(path: &Path) -> Result<Vec<T>, RegistryError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(RegistryError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let invalid = |reason: String| RegistryError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| invalid(e.message().to_owned()))?;
    let list = table
        .remove(T::KEY)
        .unwrap_or(toml::Value::Array(Vec::new()));
    if let Some(k) = table.keys().next() {
        return Err(invalid(format!(
            "unknown key {k:?} (only [[{}]] entries)",
            T::KEY
        )));
    }
    let entries: Vec<T> = list
        .try_into()
        .map_err(|e: toml::de::Error| invalid(e.message().to_owned()))?;
    for e in &entries {
        e.check().map_err(invalid)?;
    }
    Ok(entries)
}

/// Writes `entries` to `path` (mode 0600, replaced atomically).
pub fn save<T: Entry>(path: &Path, entries: &[T]) -> Result<(), RegistryError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| RegistryError::Io {
        path: path.to_owned(),
        source,
    };
    let mut table = toml::Table::new();
    table.insert(
        T::KEY.to_owned(),
        toml::Value::try_from(entries).map_err(|e| RegistryError::Invalid {
            path: path.to_owned(),
            reason: e.to_string(),
        })?,
    );
    let text = toml::to_string(&table).map_err(|e| RegistryError::Invalid {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
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
    f.write_all(format!("{}\n{text}", T::HEADER).as_bytes())
        .map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// A file's modification time and length: a change in either means read it again.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len()))
}

/// A registry file, read again when it changes.
#[derive(Debug)]
pub struct Watched<T> {
    path: PathBuf,
    seen: RwLock<(Stamp, Vec<T>)>,
}

impl<T: Entry> Watched<T> {
    /// The registry at `path`; an unreadable file is an error here, at start.
    pub fn open(path: PathBuf) -> Result<Self, RegistryError> {
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

    /// The entries as the file has them now.
    pub fn entries(&self) -> Vec<T> {
        let now = stamp(&self.path);
        let same = self.seen.read().map(|g| g.0 == now).unwrap_or(false);
        if !same {
            match load(&self.path) {
                Ok(entries) => {
                    if let Ok(mut g) = self.seen.write() {
                        *g = (now, entries);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "registry file unreadable; keeping the entries known before");
                    if let Ok(mut g) = self.seen.write() {
                        g.0 = now;
                    }
                }
            }
        }
        self.seen.read().map(|g| g.1.clone()).unwrap_or_default()
    }
}
