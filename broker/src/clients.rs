//! Who may use the farm's broker: the client registry (`clients.toml`), its passwords, and the
//! broker files made from it.
//!
//! Every MQTT client of a farm has a user name, a [`Role`] and a password. The registry keeps
//! only a hash of each password, in Mosquitto's own format (`$7$`: PBKDF2-SHA512, 101 rounds,
//! a 12-byte salt), so one file serves both brokers:
//!
//! - the embedded broker checks logins against it ([`Authenticator`]), re-reading the file when
//!   it changes, so `printloop printers add` takes effect without a restart;
//! - [`Clients::mosquitto_passwd`] and [`Clients::mosquitto_acl`] write Mosquitto's password
//!   file and a least-privilege topic ACL (Mosquitto can enforce one; rumqttd 0.20 cannot).
//!
//! Passwords are made here, 24 random bytes (192 bits) each, and shown once; the low round
//! count is Mosquitto's, and is safe only because no password is a word a person chose.
//!
//! Rules beyond the password: a gateway must connect with its own client id
//! (`printloop-gw-<printer id>`), and no other role may take a gateway's client id, so one
//! credential cannot steal another printer's persistent session and its queued commands.
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::Sha512;
use subtle::ConstantTimeEq as _;

/// Rounds of PBKDF2 in new hashes: Mosquitto's own (`mosquitto_passwd` writes 101).
pub const HASH_ROUNDS: u32 = 101;
const SALT_LEN: usize = 12;
const HASH_LEN: usize = 64;
/// Bytes of randomness in a password made by [`Clients::add`].
const PASSWORD_BYTES: usize = 24;
/// Most rounds a hash in the file may ask for (a hostile file must not stall every login).
const MAX_ROUNDS: u32 = 1_000_000;

/// The client-id prefix of gateways (`printloop-gw-<printer id>`): see the module docs.
pub const GATEWAY_CLIENT_PREFIX: &str = "printloop-gw-";

/// What a client is for; each role has its own rights (see [`Clients::mosquitto_acl`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// One printer's gateway; its user name is the printer id.
    Gateway,
    /// The supervisor on an external broker: the whole tree.
    Supervisor,
    /// Home Assistant: reads the printers and the queue, presses its buttons.
    HomeAssistant,
    /// Node-RED and other integrations: reads the printers, uses the operator API, sends
    /// printer commands (each checked by the gateway).
    NodeRed,
    /// People with the `printloop` CLI: the operator API, `watch`, printer commands.
    Operator,
}

impl Role {
    /// Every role, in a stable order.
    pub const ALL: [Role; 5] = [
        Role::Gateway,
        Role::Supervisor,
        Role::HomeAssistant,
        Role::NodeRed,
        Role::Operator,
    ];

    /// The role's name in files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Supervisor => "supervisor",
            Role::HomeAssistant => "homeassistant",
            Role::NodeRed => "nodered",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a role (one of: {})",
                    Role::ALL.map(Role::as_str).join(", ")
                )
            })
    }
}

/// A password hash in Mosquitto's `$7$rounds$salt$hash` form.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash {
    rounds: u32,
    salt: Vec<u8>,
    hash: [u8; HASH_LEN],
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print hashes into logs.
        f.write_str("PasswordHash(..)")
    }
}

impl PasswordHash {
    /// Hashes `password` with a fresh random salt.
    pub fn new(password: &str) -> Result<Self, ClientsError> {
        let mut salt = vec![0u8; SALT_LEN];
        getrandom::fill(&mut salt).map_err(|e| ClientsError::Random(e.to_string()))?;
        Ok(Self::with_salt(password, salt, HASH_ROUNDS))
    }

    fn with_salt(password: &str, salt: Vec<u8>, rounds: u32) -> Self {
        let mut hash = [0u8; HASH_LEN];
        pbkdf2::pbkdf2_hmac::<Sha512>(password.as_bytes(), &salt, rounds, &mut hash);
        Self { rounds, salt, hash }
    }

    /// Does `password` match? (Constant time in the comparison.)
    pub fn verify(&self, password: &str) -> bool {
        let other = Self::with_salt(password, self.salt.clone(), self.rounds);
        bool::from(self.hash.ct_eq(&other.hash))
    }

    /// Parses `$7$<rounds>$<salt base64>$<hash base64>`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut parts = s.split('$');
        let (Some(""), Some("7"), Some(rounds), Some(salt), Some(hash), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err("not a $7$<rounds>$<salt>$<hash> password hash".into());
        };
        let rounds: u32 = rounds
            .parse()
            .ok()
            .filter(|r| (1..=MAX_ROUNDS).contains(r))
            .ok_or_else(|| format!("rounds must be 1 to {MAX_ROUNDS}"))?;
        let salt = b64
            .decode(salt)
            .ok()
            .filter(|s| !s.is_empty() && s.len() <= 64)
            .ok_or("the salt is not base64 of 1 to 64 bytes")?;
        let hash: [u8; HASH_LEN] = b64
            .decode(hash)
            .ok()
            .and_then(|h| h.try_into().ok())
            .ok_or("the hash is not base64 of 64 bytes")?;
        Ok(Self { rounds, salt, hash })
    }
}

impl fmt::Display for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b64 = base64::engine::general_purpose::STANDARD;
        write!(
            f,
            "$7${}${}${}",
            self.rounds,
            b64.encode(&self.salt),
            b64.encode(self.hash)
        )
    }
}

/// A new random password (base64url, 32 characters, 192 bits).
pub fn new_password() -> Result<String, ClientsError> {
    let mut bytes = [0u8; PASSWORD_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| ClientsError::Random(e.to_string()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// One client of the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// MQTT user name (for a gateway: the printer id).
    pub user: String,
    /// What it may do.
    pub role: Role,
    /// Its password's hash.
    pub hash: PasswordHash,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileForm {
    #[serde(default)]
    client: Vec<FileClient>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileClient {
    user: String,
    role: Role,
    hash: String,
}

/// Why the registry cannot be read, written or changed.
#[derive(Debug, thiserror::Error)]
pub enum ClientsError {
    /// Reading or writing the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid registry; names the entry and key.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        message: String,
    },
    /// A user name that cannot be used.
    #[error("invalid user name {user:?}: {reason}")]
    BadUser {
        /// The name given.
        user: String,
        /// Why.
        reason: String,
    },
    /// The user exists already.
    #[error("{user:?} is already registered (as {role}); remove it first, or rotate its password")]
    Exists {
        /// The user.
        user: String,
        /// Its role.
        role: Role,
    },
    /// No such user.
    #[error("no client {0:?} is registered")]
    Unknown(String),
    /// The system's random source failed.
    #[error("cannot get random bytes: {0}")]
    Random(String),
}

/// Checks a user name: 1 to 64 of `a-z 0-9 - _`, the same alphabet as printer ids, so a
/// user name is always one safe topic level and one safe word in a log.
pub fn validate_user(user: &str) -> Result<(), ClientsError> {
    let bad = |reason: &str| ClientsError::BadUser {
        user: user.chars().take(80).collect(),
        reason: reason.to_owned(),
    };
    if user.is_empty() || user.len() > 64 {
        return Err(bad("it must be 1 to 64 characters long"));
    }
    if !user
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err(bad("use only a-z, 0-9, '-' and '_'"));
    }
    Ok(())
}

/// Why a login was refused (for the broker's log; never contains the password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The user name is not registered.
    #[error("unknown user")]
    UnknownUser,
    /// The password does not match.
    #[error("wrong password")]
    WrongPassword,
    /// A gateway used a client id other than its own, or another role a gateway's id.
    #[error(
        "client id {client_id:?} is not allowed for this user (a gateway must use {expected:?})"
    )]
    ClientId {
        /// What it used.
        client_id: String,
        /// What it must use (a gateway), or "not printloop-gw-…" (other roles).
        expected: String,
    },
}

/// The registry: every client of the broker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Clients {
    clients: BTreeMap<String, Client>,
}

impl Clients {
    /// Reads `path`; a missing file is an empty registry.
    pub fn load(path: &Path) -> Result<Self, ClientsError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).map_err(|message| ClientsError::Parse {
                path: path.to_owned(),
                message,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ClientsError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Parses registry text; the error names the entry and the key.
    pub fn parse(text: &str) -> Result<Self, String> {
        let form: FileForm = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut clients = BTreeMap::new();
        for (i, c) in form.client.into_iter().enumerate() {
            let at = format!("client #{} ({:?})", i + 1, c.user);
            validate_user(&c.user).map_err(|e| format!("{at}: {e}"))?;
            let hash = PasswordHash::parse(&c.hash).map_err(|e| format!("{at}: hash: {e}"))?;
            if clients.contains_key(&c.user) {
                return Err(format!("{at}: the user appears twice"));
            }
            let user = c.user.clone();
            clients.insert(
                user,
                Client {
                    user: c.user,
                    role: c.role,
                    hash,
                },
            );
        }
        Ok(Self { clients })
    }

    /// The registry as file text, with a header for people.
    pub fn to_toml(&self) -> String {
        let form = FileForm {
            client: self
                .clients
                .values()
                .map(|c| FileClient {
                    user: c.user.clone(),
                    role: c.role,
                    hash: c.hash.to_string(),
                })
                .collect(),
        };
        let body = toml::to_string(&form).unwrap_or_default();
        format!(
            "# printloop's MQTT clients. Managed with `printloop printers add` and `printloop clients \
             ...`;\n# hand edits are read too. Hashes are Mosquitto's $7$ format; the passwords \
             themselves are\n# never stored. `printloop clients mosquitto --out DIR` writes \
             Mosquitto's files from this one.\n\n{body}"
        )
    }

    /// Writes the registry to `path` atomically (a temp file renamed over it), mode 0640. When
    /// run as root, the file gets the owner and group of its directory, so the supervisor's
    /// service user can read what `sudo printloop printers add` wrote.
    pub fn save(&self, path: &Path) -> Result<(), ClientsError> {
        write_private(path, self.to_toml().as_bytes(), 0o640)
    }

    /// Registers `user` with `role` and a new password, which is returned (shown once).
    pub fn add(&mut self, user: &str, role: Role) -> Result<String, ClientsError> {
        validate_user(user)?;
        if let Some(c) = self.clients.get(user) {
            return Err(ClientsError::Exists {
                user: user.to_owned(),
                role: c.role,
            });
        }
        let password = new_password()?;
        self.clients.insert(
            user.to_owned(),
            Client {
                user: user.to_owned(),
                role,
                hash: PasswordHash::new(&password)?,
            },
        );
        Ok(password)
    }

    /// Gives `user` a new password (the old one stops working), returned once.
    pub fn rotate(&mut self, user: &str) -> Result<String, ClientsError> {
        let client = self
            .clients
            .get_mut(user)
            .ok_or_else(|| ClientsError::Unknown(user.to_owned()))?;
        let password = new_password()?;
        client.hash = PasswordHash::new(&password)?;
        Ok(password)
    }

    /// Removes `user`.
    pub fn remove(&mut self, user: &str) -> Result<Client, ClientsError> {
        self.clients
            .remove(user)
            .ok_or_else(|| ClientsError::Unknown(user.to_owned()))
    }

    /// One client.
    pub fn get(&self, user: &str) -> Option<&Client> {
        self.clients.get(user)
    }

    /// Every client, by user name.
    pub fn iter(&self) -> impl Iterator<Item = &Client> {
        self.clients.values()
    }

    /// True when nobody is registered.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Checks a login (see the module docs for the client-id rule).
    pub fn check(&self, client_id: &str, user: &str, password: &str) -> Result<Role, Refusal> {
        let client = self.clients.get(user).ok_or(Refusal::UnknownUser)?;
        if !client.hash.verify(password) {
            return Err(Refusal::WrongPassword);
        }
        check_client_id(client.role, user, client_id)?;
        Ok(client.role)
    }

    /// Mosquitto's password file (`password_file`): one `user:$7$…` line per client.
    pub fn mosquitto_passwd(&self) -> String {
        self.clients
            .values()
            .map(|c| format!("{}:{}\n", c.user, c.hash))
            .collect()
    }

    /// Mosquitto's ACL file (`acl_file`): least privilege per role, every printer by name (no
    /// `pattern` lines, which would apply to every user). `root` is the topic root
    /// (`printloop/v1`), `ha_prefix` Home Assistant's discovery prefix.
    pub fn mosquitto_acl(&self, root: &str, ha_prefix: &str) -> String {
        let mut out = String::from(
            "# printloop's topic ACL for Mosquitto 2.x, written by `printloop clients mosquitto` \
             from the\n# client registry: regenerate it after enrolling a printer (do not edit; \
             edits are lost).\n# Anything not granted is denied: publishes are dropped, \
             subscriptions get nothing.\n",
        );
        for c in self.clients.values() {
            let u = &c.user;
            out.push_str(&format!("\n# {u}: {}\nuser {u}\n", c.role));
            let lines: Vec<String> = match c.role {
                Role::Gateway => {
                    let p = format!("{root}/printers/{u}");
                    vec![
                        // What it says: presence (and its will), identity, state, events,
                        // answers to commands, file requests. Never its own `cmd`.
                        // Read too: the gateway re-asserts its own retained topics when anyone
                        // else's message replaces them.
                        format!("topic readwrite {p}/status"),
                        format!("topic readwrite {p}/meta"),
                        format!("topic readwrite {p}/state"),
                        format!("topic readwrite {p}/events"),
                        format!("topic write {p}/cmd/result"),
                        format!("topic write {p}/file/request"),
                        // What it hears: its commands and file chunks, the supervisor's presence.
                        format!("topic read {p}/cmd"),
                        format!("topic read {p}/file/chunk"),
                        format!("topic read {root}/supervisor/status"),
                    ]
                }
                Role::Supervisor => vec![
                    format!("topic readwrite {root}/#"),
                    format!("topic readwrite {ha_prefix}/#"),
                ],
                Role::HomeAssistant => {
                    let mut v = read_printers(root);
                    v.extend([
                        format!("topic write {root}/ha/printers/+/press"),
                        format!("topic read {root}/supervisor/status"),
                        format!("topic read {root}/queue"),
                        format!("topic read {ha_prefix}/#"),
                        format!("topic write {ha_prefix}/status"),
                    ]);
                    v
                }
                Role::NodeRed | Role::Operator => {
                    let mut v = read_printers(root);
                    v.extend([
                        format!("topic write {root}/printers/+/cmd"),
                        format!("topic write {root}/api/request"),
                        format!("topic read {root}/api/response/#"),
                        format!("topic read {root}/supervisor/status"),
                        format!("topic read {root}/queue"),
                    ]);
                    v
                }
            };
            for l in lines {
                out.push_str(&l);
                out.push('\n');
            }
        }
        out
    }
}

fn read_printers(root: &str) -> Vec<String> {
    ["status", "meta", "state", "events", "cmd/result"]
        .iter()
        .map(|t| format!("topic read {root}/printers/+/{t}"))
        .collect()
}

/// The client-id rule: a gateway uses exactly `printloop-gw-<its id>`; nobody else may use a
/// `printloop-gw-` id.
pub fn check_client_id(role: Role, user: &str, client_id: &str) -> Result<(), Refusal> {
    let expected = format!("{GATEWAY_CLIENT_PREFIX}{user}");
    let ok = match role {
        Role::Gateway => client_id == expected,
        _ => !client_id.starts_with(GATEWAY_CLIENT_PREFIX),
    };
    if ok {
        Ok(())
    } else {
        Err(Refusal::ClientId {
            client_id: client_id.chars().take(80).collect(),
            expected: if role == Role::Gateway {
                expected
            } else {
                format!("anything but {GATEWAY_CLIENT_PREFIX}…")
            },
        })
    }
}

/// Writes `bytes` to `path` atomically with `mode`; as root, hands the file to the owner of
/// its directory. Creates the directory (0750) if needed.
pub fn write_private(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ClientsError> {
    use std::io::Write as _;
    use std::os::unix::fs::{
        DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
    };
    let io = |source| ClientsError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&dir)
            .map_err(io)?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        let meta = std::fs::metadata(&dir)?;
        if nix::unistd::geteuid().is_root() {
            let _ = nix::unistd::chown(
                &tmp,
                Some(nix::unistd::Uid::from_raw(meta.uid())),
                Some(nix::unistd::Gid::from_raw(meta.gid())),
            );
        }
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Checks logins for the embedded broker: the registry file (re-read whenever it changes), the
/// listener's static `auth` map from `broker.toml`, and one in-memory credential of the
/// process itself (the supervisor's own connection to the broker it embeds).
pub struct Authenticator {
    file: Option<PathBuf>,
    cache: Mutex<Cache>,
    internal: Option<(String, PasswordHash)>,
}

#[derive(Default)]
struct Cache {
    stamp: Option<(SystemTime, u64)>,
    clients: Clients,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("file", &self.file)
            .field("internal_user", &self.internal.as_ref().map(|(u, _)| u))
            .finish()
    }
}

impl Authenticator {
    /// Logins from the registry at `file` (none if `None`), plus `internal` (user, password).
    pub fn new(
        file: Option<PathBuf>,
        internal: Option<(String, String)>,
    ) -> Result<Self, ClientsError> {
        let internal = match internal {
            Some((user, password)) => Some((user, PasswordHash::new(&password)?)),
            None => None,
        };
        let auth = Self {
            file,
            cache: Mutex::new(Cache::default()),
            internal,
        };
        // A registry that cannot be read is an error at start, not a silent "nobody".
        if let Some(path) = &auth.file {
            let clients = Clients::load(path)?;
            if let Ok(mut c) = auth.cache.lock() {
                c.stamp = stamp(path);
                c.clients = clients;
            }
        }
        Ok(auth)
    }

    /// The registry file, if any.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Registered clients right now (re-reads a changed file).
    pub fn clients(&self) -> Clients {
        self.refresh();
        self.cache
            .lock()
            .map(|c| c.clients.clone())
            .unwrap_or_default()
    }

    fn refresh(&self) {
        let Some(path) = &self.file else { return };
        let now = stamp(path);
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        if now == cache.stamp {
            return;
        }
        match Clients::load(path) {
            Ok(clients) => {
                tracing::info!(
                    file = %path.display(),
                    clients = clients.clients.len(),
                    "client registry loaded"
                );
                cache.clients = clients;
                cache.stamp = now;
            }
            // Keep the last good registry: a half-edited file must not lock everyone out.
            Err(e) => {
                tracing::warn!("client registry not reloaded, keeping the last good one: {e}")
            }
        }
    }

    /// Checks one login; `statics` is the listener's `auth` map from `broker.toml`.
    pub fn check(
        &self,
        client_id: &str,
        user: &str,
        password: &str,
        statics: Option<&std::collections::HashMap<String, String>>,
    ) -> Result<Option<Role>, Refusal> {
        if let Some((u, hash)) = &self.internal {
            if u == user {
                return if hash.verify(password) {
                    Ok(Some(Role::Supervisor))
                } else {
                    Err(Refusal::WrongPassword)
                };
            }
        }
        if let Some(stored) = statics.and_then(|m| m.get(user)) {
            return if bool::from(stored.as_bytes().ct_eq(password.as_bytes())) {
                Ok(None)
            } else {
                Err(Refusal::WrongPassword)
            };
        }
        self.refresh();
        let cache = self.cache.lock().map_err(|_| Refusal::UnknownUser)?;
        cache.clients.check(client_id, user, password).map(Some)
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_round_trip_and_verify() {
        let h = PasswordHash::new("s3cret").expect("hash");
        let text = h.to_string();
        assert!(text.starts_with("$7$101$"), "{text}");
        let back = PasswordHash::parse(&text).expect("parse");
        assert!(back.verify("s3cret"));
        assert!(!back.verify("s3cret "));
        assert!(!back.verify(""));
        assert_eq!(format!("{h:?}"), "PasswordHash(..)");
    }

    #[test]
    fn a_known_mosquitto_hash_verifies() {
        // PBKDF2-HMAC-SHA512("password", salt = b"0123456789ab", 101 rounds): the Python
        // standard library (hashlib.pbkdf2_hmac) computes the same bytes; Mosquitto's own file
        // is checked for real in tests/broker_mosquitto_acl.rs.
        let h = PasswordHash::with_salt("password", b"0123456789ab".to_vec(), 101);
        let again = PasswordHash::parse(&h.to_string()).expect("parse");
        assert!(again.verify("password"));
        assert_eq!(
            h.to_string(),
            "$7$101$MDEyMzQ1Njc4OWFi$uAhjSMFrFKPND0iWyTXsxET36hDBAvu7LqiX1au82iDOT9W7IG9XGjasDAepCB3nZMPp79k+PyCilDXRAZuIVA=="
        );
    }

    #[test]
    fn bad_hashes_are_refused_with_a_reason() {
        for bad in [
            "",
            "plain",
            "$6$abc$def",
            "$7$0$MDEy$AAAA",
            "$7$99999999$MDEy$AAAA",
            "$7$101$!!$AAAA",
            "$7$101$MDEy$AAAA",
            "$7$101$MDEy$AAAA$x",
        ] {
            assert!(PasswordHash::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn registry_add_check_rotate_remove() {
        let mut c = Clients::default();
        let pw = c.add("p1", Role::Gateway).expect("add");
        assert_eq!(pw.len(), 32);
        assert!(matches!(
            c.add("p1", Role::Operator),
            Err(ClientsError::Exists { .. })
        ));
        assert!(matches!(
            c.add("P1", Role::Gateway),
            Err(ClientsError::BadUser { .. })
        ));
        assert_eq!(c.check("printloop-gw-p1", "p1", &pw), Ok(Role::Gateway));
        assert_eq!(
            c.check("printloop-gw-p1", "p1", "nope"),
            Err(Refusal::WrongPassword)
        );
        assert!(matches!(
            c.check("printloop-gw-p2", "p1", &pw),
            Err(Refusal::ClientId { .. })
        ));
        assert_eq!(
            c.check("printloop-gw-p1", "p9", &pw),
            Err(Refusal::UnknownUser)
        );
        let ha = c.add("ha", Role::HomeAssistant).expect("add");
        assert!(matches!(
            c.check("printloop-gw-p1", "ha", &ha),
            Err(Refusal::ClientId { .. })
        ));
        assert_eq!(c.check("hass-1", "ha", &ha), Ok(Role::HomeAssistant));
        let pw2 = c.rotate("p1").expect("rotate");
        assert_eq!(
            c.check("printloop-gw-p1", "p1", &pw),
            Err(Refusal::WrongPassword)
        );
        assert_eq!(c.check("printloop-gw-p1", "p1", &pw2), Ok(Role::Gateway));
        c.remove("p1").expect("remove");
        assert!(matches!(c.remove("p1"), Err(ClientsError::Unknown(_))));
    }

    #[test]
    fn the_file_round_trips_and_bad_files_name_the_entry() {
        let mut c = Clients::default();
        c.add("p1", Role::Gateway).expect("add");
        c.add("sup", Role::Supervisor).expect("add");
        let text = c.to_toml();
        assert!(!text.contains("password ="), "{text}");
        assert_eq!(Clients::parse(&text).expect("parse"), c);
        let e = Clients::parse("[[client]]\nuser = \"x\"\nrole = \"wizard\"\nhash = \"\"\n")
            .expect_err("role");
        assert!(e.contains("wizard"), "{e}");
        let e = Clients::parse("[[client]]\nuser = \"Bad\"\nrole = \"gateway\"\nhash = \"\"\n")
            .expect_err("user");
        assert!(e.contains("client #1"), "{e}");
        let e = Clients::parse(
            "[[client]]\nuser = \"a\"\nrole = \"gateway\"\nhash = \"x\"\nextra = 1\n",
        )
        .expect_err("unknown key");
        assert!(e.contains("extra"), "{e}");
    }

    #[test]
    fn save_is_private_and_load_of_a_missing_file_is_empty() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/clients.toml");
        assert!(Clients::load(&path).expect("missing").is_empty());
        let mut c = Clients::default();
        c.add("p1", Role::Gateway).expect("add");
        c.save(&path).expect("save");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert_eq!(Clients::load(&path).expect("load"), c);
    }

    /// docs/mosquitto.acl is this generator's output for the documented example registry,
    /// so the page cannot drift from what `printloop clients mosquitto` writes (issue #10,
    /// item 14: the hand-written file let Home Assistant publish any printer's `cmd`).
    #[test]
    fn the_documented_acl_is_the_generated_one() {
        let mut c = Clients::default();
        for (name, role) in [
            ("p1", Role::Gateway),
            ("p2", Role::Gateway),
            ("supervisor", Role::Supervisor),
            ("homeassistant", Role::HomeAssistant),
            ("nodered", Role::NodeRed),
        ] {
            c.add(name, role).expect("add");
        }
        let want = c.mosquitto_acl("printloop/v1", "homeassistant");
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/mosquitto.acl");
        let docs = std::fs::read_to_string(&path).expect("docs/mosquitto.acl");
        if std::env::var_os("PRINTLOOP_BLESS").is_some() {
            std::fs::write(&path, &want).expect("write docs/mosquitto.acl");
            return;
        }
        assert_eq!(
            docs, want,
            "docs/mosquitto.acl is stale: PRINTLOOP_BLESS=1 cargo test -p broker documented_acl"
        );
        let ha = want.split("user homeassistant\n").nth(1).expect("ha block");
        let ha = ha.split("\n\n").next().expect("block");
        assert!(!ha.contains("/cmd\n") && !ha.contains("file/"), "{ha}");
    }

    #[test]
    fn the_acl_confines_a_gateway_to_its_own_printer() {
        let mut c = Clients::default();
        c.add("p1", Role::Gateway).expect("add");
        c.add("ha", Role::HomeAssistant).expect("add");
        let acl = c.mosquitto_acl("printloop/v1", "homeassistant");
        let p1: Vec<&str> = acl
            .split("user p1\n")
            .nth(1)
            .expect("p1 block")
            .split("\n\n")
            .next()
            .expect("block")
            .lines()
            .collect();
        assert!(p1
            .iter()
            .all(|l| l.contains("printers/p1/") || l.ends_with("supervisor/status")));
        assert!(p1.contains(&"topic read printloop/v1/printers/p1/cmd"));
        assert!(!p1
            .iter()
            .any(|l| l.starts_with("topic write") && l.ends_with("/cmd")));
        assert!(!acl.contains("pattern"));
        let passwd = c.mosquitto_passwd();
        assert_eq!(passwd.lines().count(), 2);
        assert!(passwd.lines().all(|l| l.contains(":$7$101$")));
    }

    #[test]
    fn the_authenticator_reloads_a_changed_file_and_keeps_a_good_one_over_a_bad_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("clients.toml");
        let auth = Authenticator::new(
            Some(path.clone()),
            Some(("printloop-supervisor".into(), "internal".into())),
        )
        .expect("auth");
        assert_eq!(
            auth.check(
                "printloop-supervisor",
                "printloop-supervisor",
                "internal",
                None
            ),
            Ok(Some(Role::Supervisor))
        );
        assert_eq!(
            auth.check("x", "p1", "whatever", None),
            Err(Refusal::UnknownUser)
        );
        let mut c = Clients::default();
        let pw = c.add("p1", Role::Gateway).expect("add");
        c.save(&path).expect("save");
        assert_eq!(
            auth.check("printloop-gw-p1", "p1", &pw, None),
            Ok(Some(Role::Gateway))
        );
        std::fs::write(&path, "this is not toml [").expect("write");
        assert_eq!(
            auth.check("printloop-gw-p1", "p1", &pw, None),
            Ok(Some(Role::Gateway)),
            "a broken file keeps the last good registry"
        );
        let statics = std::collections::HashMap::from([("legacy".to_owned(), "pw".to_owned())]);
        assert_eq!(auth.check("c", "legacy", "pw", Some(&statics)), Ok(None));
        assert_eq!(
            auth.check("c", "legacy", "px", Some(&statics)),
            Err(Refusal::WrongPassword)
        );
    }
}
