//! `broker.toml`: rumqttd's own configuration format, read strictly.
//!
//! The file deserialises into [`rumqttd::Config`] unchanged, so anything in rumqttd's documentation
//! applies. On top of that we reject what rumqttd would silently accept: unknown keys (rumqttd
//! ignores them, e.g. `max_inflight_size` from its own example file), a configuration with no
//! listener, port 0 (rumqttd cannot tell us which port it got), zero-sized limits, and TLS files
//! that do not exist (rumqttd would only notice on the first TLS connection).
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::Path;

use crate::BrokerError;

/// The MQTT protocol a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ListenerKind {
    /// MQTT 3.1.1 over TCP (`[v4.<key>]`).
    V4,
    /// MQTT 5 over TCP (`[v5.<key>]`).
    V5,
    /// MQTT 3.1.1 over websockets (`[ws.<key>]`).
    Ws,
}

impl ListenerKind {
    /// The table name in `broker.toml`.
    pub fn section(self) -> &'static str {
        match self {
            ListenerKind::V4 => "v4",
            ListenerKind::V5 => "v5",
            ListenerKind::Ws => "ws",
        }
    }
}

/// One listener of the configuration, as the broker will bind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Protocol of the listener.
    pub kind: ListenerKind,
    /// The key under the protocol table: `1` for `[v4.1]`.
    pub key: String,
    /// rumqttd's `name` of the listener (used as its thread name and in its logs).
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Whether it is a TLS listener.
    pub tls: bool,
}

impl Listener {
    /// Whether clients must log in: every listener that is reachable from beyond loopback
    /// (printloop refuses anonymous clients there, whatever `broker.toml` says).
    pub fn requires_auth(&self) -> bool {
        !self.addr.ip().is_loopback()
    }

    /// The listener's path in `broker.toml`, e.g. `v4.1`.
    pub fn config_key(&self) -> String {
        format!("{}.{}", self.kind.section(), self.key)
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, {}{})",
            self.config_key(),
            self.name,
            self.addr,
            if self.tls { ", tls" } else { "" }
        )
    }
}

/// A validated broker configuration: a [`rumqttd::Config`] plus where it came from.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    origin: String,
    config: rumqttd::Config,
    authenticator: Option<std::sync::Arc<crate::clients::Authenticator>>,
}

impl BrokerConfig {
    /// Reads, parses and validates a `broker.toml`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, BrokerError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| BrokerError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses and validates configuration text; `origin` names it in errors (usually the path).
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, BrokerError> {
        let parse_error = |e: toml::de::Error| BrokerError::Parse {
            origin: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        };
        let table: toml::Table = toml::from_str(text).map_err(parse_error)?;
        let config: rumqttd::Config = toml::from_str(text).map_err(parse_error)?;

        // rumqttd's types do not deny unknown fields: find keys the typed config dropped.
        let known =
            toml::Value::try_from(&config).map_err(|e| BrokerError::Serialize(e.to_string()))?;
        if let Some(key) = first_unknown_key(&table, &known, "") {
            return Err(BrokerError::UnknownKey {
                origin: origin.to_owned(),
                key,
            });
        }

        let config = BrokerConfig {
            origin: origin.to_owned(),
            config,
            authenticator: None,
        };
        config.validate()?;
        Ok(config)
    }

    /// Wraps a [`rumqttd::Config`] built in code (validated like a file).
    pub fn from_rumqttd(config: rumqttd::Config, origin: &str) -> Result<Self, BrokerError> {
        let config = BrokerConfig {
            origin: origin.to_owned(),
            config,
            authenticator: None,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks logins with `auth` (the client registry): on every listener beyond loopback, and on
    /// loopback listeners too when `everywhere`. Without an authenticator, listeners beyond
    /// loopback still refuse anonymous clients (see [`Listener::requires_auth`]).
    pub fn set_authenticator(&mut self, auth: std::sync::Arc<crate::clients::Authenticator>) {
        self.authenticator = Some(auth);
    }

    /// The authenticator, if one was set.
    pub fn authenticator(&self) -> Option<&std::sync::Arc<crate::clients::Authenticator>> {
        self.authenticator.as_ref()
    }

    /// Where this configuration came from (a path, or a description).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The rumqttd configuration.
    pub fn rumqttd(&self) -> &rumqttd::Config {
        &self.config
    }

    /// The rumqttd configuration, for changes this crate has no helper for.
    /// [`crate::EmbeddedBroker::start`] validates again.
    pub fn rumqttd_mut(&mut self) -> &mut rumqttd::Config {
        &mut self.config
    }

    /// The rumqttd configuration, by value.
    pub fn into_rumqttd(self) -> rumqttd::Config {
        self.config
    }

    /// The rumqttd configuration the broker runs: as loaded, plus a login check on every
    /// listener beyond loopback (the registry's, or one that refuses everyone but the
    /// listener's static `auth` map when no registry is set).
    pub(crate) fn secured_rumqttd(&self) -> Result<rumqttd::Config, BrokerError> {
        let mut config = self.config.clone();
        let auth = match &self.authenticator {
            Some(a) => a.clone(),
            None => std::sync::Arc::new(
                crate::clients::Authenticator::new(None, None)
                    .map_err(|e| BrokerError::Stopped(e.to_string()))?,
            ),
        };
        for (kind, servers) in [
            (ListenerKind::V4, config.v4.as_mut()),
            (ListenerKind::V5, config.v5.as_mut()),
            (ListenerKind::Ws, config.ws.as_mut()),
        ] {
            for (key, server) in servers.into_iter().flatten() {
                if server.listen.ip().is_loopback() {
                    continue;
                }
                let listener = format!("{}.{key}", kind.section());
                let statics = server.connections.auth.clone();
                let auth = auth.clone();
                // A hostile client can try a thousand logins a second: log the first refusal of
                // each second and count the rest, so the log stays readable and bounded.
                let quiet =
                    std::sync::Arc::new(std::sync::Mutex::new((None::<std::time::Instant>, 0u64)));
                tracing::info!(
                    listener = %listener,
                    addr = %server.listen,
                    registry = %auth.file().map_or("none".into(), |p| p.display().to_string()),
                    "listener is reachable beyond loopback: every client must log in"
                );
                server.connections.set_auth_handler(
                    move |client_id: String, user: String, password: String| {
                        let verdict = auth.check(&client_id, &user, &password, statics.as_ref());
                        let log = verdict.is_err()
                            && quiet.lock().is_ok_and(|mut q| {
                                let due = q.0.is_none_or(|t| t.elapsed().as_secs() >= 1);
                                if due {
                                    q.0 = Some(std::time::Instant::now());
                                } else {
                                    q.1 += 1;
                                }
                                due
                            });
                        if let (true, Err(reason)) = (log, &verdict) {
                            let suppressed = quiet
                                .lock()
                                .map(|mut q| std::mem::take(&mut q.1))
                                .unwrap_or(0);
                            tracing::warn!(
                                listener = %listener,
                                client_id = ?client_id.chars().take(80).collect::<String>(),
                                user = ?user.chars().take(80).collect::<String>(),
                                refusals_not_logged = suppressed,
                                "MQTT login refused: {reason}"
                            );
                        }
                        std::future::ready(verdict.is_ok())
                    },
                );
            }
        }
        Ok(config)
    }

    /// All MQTT listeners (v4, v5, websockets), sorted by their key in the file.
    pub fn listeners(&self) -> Vec<Listener> {
        let mut out = Vec::new();
        for (kind, servers) in self.servers() {
            for (key, s) in servers {
                out.push(Listener {
                    kind,
                    key: key.clone(),
                    name: s.name.clone(),
                    addr: s.listen,
                    tls: s.tls.is_some(),
                });
            }
        }
        out.sort_by(|a, b| (a.kind, &a.key).cmp(&(b.kind, &b.key)));
        out
    }

    /// The first listener of a kind (lowest key), if any.
    pub fn first_listener(&self, kind: ListenerKind) -> Option<Listener> {
        self.listeners().into_iter().find(|l| l.kind == kind)
    }

    /// Changes the address of the listener `config_key` (e.g. `v4.1`).
    pub fn set_listen(&mut self, config_key: &str, addr: SocketAddr) -> Result<(), BrokerError> {
        let have = self
            .listeners()
            .iter()
            .map(Listener::config_key)
            .collect::<Vec<_>>()
            .join(", ");
        let unknown = || BrokerError::UnknownListener {
            key: config_key.to_owned(),
            have: have.clone(),
        };
        let (section, key) = config_key.split_once('.').ok_or_else(unknown)?;
        let servers = match section {
            "v4" => self.config.v4.as_mut(),
            "v5" => self.config.v5.as_mut(),
            "ws" => self.config.ws.as_mut(),
            _ => None,
        };
        let server = servers.and_then(|s| s.get_mut(key)).ok_or_else(unknown)?;
        server.listen = addr;
        Ok(())
    }

    /// Changes the port of the listener `config_key`, keeping its IP address.
    pub fn set_port(&mut self, config_key: &str, port: u16) -> Result<(), BrokerError> {
        let listener = self
            .listeners()
            .into_iter()
            .find(|l| l.config_key() == config_key);
        let ip = listener.map_or(IpAddr::from([127, 0, 0, 1]), |l| l.addr.ip());
        self.set_listen(config_key, SocketAddr::new(ip, port))
    }

    /// Moves every listener (and the console, if configured) to a free port on its own IP
    /// address; see [`free_port`] for the race this leaves open.
    pub fn with_free_ports(mut self) -> Result<Self, BrokerError> {
        for listener in self.listeners() {
            let port = free_port(listener.addr.ip())?;
            self.set_port(&listener.config_key(), port)?;
        }
        if let Some(console) = self.config.console.as_mut() {
            let ip = console
                .listen
                .parse::<SocketAddr>()
                .map_or(IpAddr::from([127, 0, 0, 1]), |a| a.ip());
            console.listen = SocketAddr::new(ip, free_port(ip)?).to_string();
        }
        Ok(self)
    }

    /// Serialises the configuration as TOML (comments of the original file are not kept).
    pub fn to_toml_string(&self) -> Result<String, BrokerError> {
        toml::to_string(&self.config).map_err(|e| BrokerError::Serialize(e.to_string()))
    }

    fn servers(
        &self,
    ) -> impl Iterator<
        Item = (
            ListenerKind,
            &std::collections::HashMap<String, rumqttd::ServerSettings>,
        ),
    > {
        [
            (ListenerKind::V4, self.config.v4.as_ref()),
            (ListenerKind::V5, self.config.v5.as_ref()),
            (ListenerKind::Ws, self.config.ws.as_ref()),
        ]
        .into_iter()
        .filter_map(|(kind, s)| s.map(|s| (kind, s)))
    }

    fn invalid(&self, key: impl Into<String>, reason: impl Into<String>) -> BrokerError {
        BrokerError::Invalid {
            origin: self.origin.clone(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// Checks what rumqttd would accept but cannot work. Called by every constructor and again
    /// before the broker starts.
    pub fn validate(&self) -> Result<(), BrokerError> {
        let listeners = self.listeners();
        if listeners.is_empty() {
            return Err(self.invalid(
                "v4",
                "no listener: add at least one [v4.<name>] or [v5.<name>] table with `listen`",
            ));
        }

        let router = &self.config.router;
        for (key, value) in [
            ("router.max_connections", router.max_connections as u64),
            (
                "router.max_outgoing_packet_count",
                router.max_outgoing_packet_count,
            ),
            ("router.max_segment_size", router.max_segment_size as u64),
            ("router.max_segment_count", router.max_segment_count as u64),
        ] {
            if value == 0 {
                return Err(self.invalid(key, "must be greater than 0"));
            }
        }

        if router.max_segment_size < 1024 {
            // rumqttd panics in its router thread below 1 KiB.
            return Err(self.invalid("router.max_segment_size", "must be at least 1024 bytes"));
        }

        for (filter, segment) in router.custom_segment.iter().flatten() {
            let key = format!("router.custom_segment.'{filter}'");
            if segment.max_segment_size < 1024 {
                return Err(self.invalid(
                    format!("{key}.max_segment_size"),
                    "must be at least 1024 bytes",
                ));
            }
            if segment.max_segment_count == 0 {
                return Err(
                    self.invalid(format!("{key}.max_segment_count"), "must be greater than 0")
                );
            }
        }

        let mut seen: BTreeMap<SocketAddr, String> = BTreeMap::new();
        for (kind, servers) in self.servers() {
            for (key, s) in servers {
                let at = format!("{}.{key}", kind.section());
                if s.listen.port() == 0 {
                    return Err(self.invalid(
                        format!("{at}.listen"),
                        "port 0 is not supported: rumqttd does not report the port it bound; \
                         pick a port (tests: BrokerConfig::with_free_ports)",
                    ));
                }
                if let Some(other) = seen.insert(s.listen, at.clone()) {
                    return Err(self.invalid(
                        format!("{at}.listen"),
                        format!("{} is also the address of `{other}`", s.listen),
                    ));
                }
                if s.name.trim().is_empty() {
                    return Err(self.invalid(format!("{at}.name"), "must not be empty"));
                }
                let c = &s.connections;
                if c.connection_timeout_ms == 0 {
                    return Err(self.invalid(
                        format!("{at}.connections.connection_timeout_ms"),
                        "must be greater than 0",
                    ));
                }
                if c.max_payload_size == 0 {
                    return Err(self.invalid(
                        format!("{at}.connections.max_payload_size"),
                        "must be greater than 0",
                    ));
                }
                if c.max_inflight_count == 0 {
                    return Err(self.invalid(
                        format!("{at}.connections.max_inflight_count"),
                        "must be greater than 0",
                    ));
                }
                if let Some(tls) = &s.tls {
                    if !tls.validate_paths() {
                        return Err(self.invalid(
                            format!("{at}.tls"),
                            "a certificate, key or CA file does not exist",
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Returns a port that was free on `ip` a moment ago: binds `ip:0`, reads the port the kernel
/// chose, and closes the socket.
///
/// **Race:** rumqttd (and Mosquitto) take a fixed `SocketAddr`, so the port is free only until
/// someone else binds it; another test starting at the same time can take it between this call
/// and the broker's bind. The kernel hands out ephemeral ports round-robin, which makes this
/// rare; [`crate::EmbeddedBroker::start`] re-checks right before binding and fails with
/// [`BrokerError::Bind`] instead of serving on a port someone else owns.
pub fn free_port(ip: IpAddr) -> Result<u16, BrokerError> {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))
        .map_err(|source| BrokerError::FreePort { ip, source })?;
    let port = listener
        .local_addr()
        .map_err(|source| BrokerError::FreePort { ip, source })?
        .port();
    Ok(port)
}

/// The first key path present in `input` but absent from `known` (tables only).
fn first_unknown_key(input: &toml::Table, known: &toml::Value, prefix: &str) -> Option<String> {
    for (key, value) in input {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let Some(known_value) = known.get(key) else {
            return Some(path);
        };
        if let toml::Value::Table(inner) = value {
            if let Some(found) = first_unknown_key(inner, known_value, &path) {
                return Some(found);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
id = 0
[router]
max_connections = 10
max_outgoing_packet_count = 10
max_segment_size = 1024
max_segment_count = 2
[v4.1]
name = "v4-1"
listen = "127.0.0.1:1883"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 1000
max_payload_size = 1024
max_inflight_count = 10
"#;

    fn err(text: &str) -> String {
        match BrokerConfig::from_toml_str(text, "test.toml") {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn minimal_config_loads() {
        let c = BrokerConfig::from_toml_str(MINIMAL, "test.toml").expect("valid");
        let l = c.listeners();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].config_key(), "v4.1");
        assert_eq!(l[0].addr, "127.0.0.1:1883".parse().expect("addr"));
    }

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let text = MINIMAL.replace(
            "max_inflight_count = 10",
            "max_inflight_count = 10\nmax_inflight_size = 1024",
        );
        assert_eq!(
            err(&text),
            "test.toml: unknown key `v4.1.connections.max_inflight_size`"
        );
        let text = format!("colour = \"blue\"\n{MINIMAL}");
        assert_eq!(err(&text), "test.toml: unknown key `colour`");
    }

    #[test]
    fn missing_listener_is_rejected() {
        let text = MINIMAL.split("[v4.1]").next().expect("prefix");
        assert!(
            err(text).starts_with("test.toml: `v4`: no listener"),
            "{}",
            err(text)
        );
    }

    #[test]
    fn wrong_type_names_the_file_and_position() {
        let text = MINIMAL.replace("max_connections = 10", "max_connections = \"ten\"");
        let e = err(&text);
        assert!(e.starts_with("test.toml: "), "{e}");
        assert!(e.contains("max_connections"), "{e}");
    }

    #[test]
    fn zero_limits_and_port_zero_are_rejected() {
        let text = MINIMAL.replace("max_segment_count = 2", "max_segment_count = 0");
        assert_eq!(
            err(&text),
            "test.toml: `router.max_segment_count`: must be greater than 0"
        );
        let text = MINIMAL.replace("127.0.0.1:1883", "127.0.0.1:0");
        assert!(err(&text).starts_with("test.toml: `v4.1.listen`: port 0"));
    }

    #[test]
    fn custom_segments_are_checked_like_the_default() {
        let text = MINIMAL.replace(
            "max_segment_count = 2\n",
            "max_segment_count = 2\n[router.custom_segment.'a/+/b']\nmax_segment_size = 10\nmax_segment_count = 1\n",
        );
        assert_eq!(
            err(&text),
            "test.toml: `router.custom_segment.'a/+/b'.max_segment_size`: must be at least 1024 bytes"
        );
    }

    #[test]
    fn duplicate_addresses_are_rejected() {
        let text = format!(
            "{MINIMAL}\n{}",
            MINIMAL
                .split("[v4.1]")
                .nth(1)
                .expect("listener")
                .replace("v4.1", "v5.1")
                .replace("name = \"v4-1\"", "[v5.1]\nname = \"v5-1\"")
        );
        assert_eq!(
            err(&text),
            "test.toml: `v5.1.listen`: 127.0.0.1:1883 is also the address of `v4.1`"
        );
    }

    #[test]
    fn missing_tls_files_are_rejected() {
        let text = format!(
            "{MINIMAL}\n[v4.1.tls]\ncertpath = \"/nonexistent/cert.pem\"\nkeypath = \"/nonexistent/key.pem\"\n"
        );
        assert_eq!(
            err(&text),
            "test.toml: `v4.1.tls`: a certificate, key or CA file does not exist"
        );
    }

    #[test]
    fn ports_can_be_overridden() {
        let mut c = BrokerConfig::from_toml_str(MINIMAL, "test.toml").expect("valid");
        c.set_port("v4.1", 4242).expect("known listener");
        assert_eq!(c.listeners()[0].addr.port(), 4242);
        let e = c.set_port("v5.9", 1).expect_err("unknown listener");
        assert_eq!(
            e.to_string(),
            "no listener `v5.9` in the broker config (have: v4.1)"
        );
        let c = c.with_free_ports().expect("free ports");
        assert_ne!(c.listeners()[0].addr.port(), 4242);
        let again = BrokerConfig::from_toml_str(&c.to_toml_string().expect("toml"), "again")
            .expect("round trip");
        assert_eq!(again.listeners(), c.listeners());
    }

    #[test]
    fn shipped_broker_toml_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../broker.toml");
        let c = BrokerConfig::load(&path).expect("shipped broker.toml loads");
        let keys: Vec<_> = c.listeners().iter().map(|l| l.to_string()).collect();
        assert_eq!(
            keys,
            ["v4.1 (v4-1, 127.0.0.1:1883)", "v5.1 (v5-1, 127.0.0.1:1884)"]
        );
        let r = c.rumqttd();
        for servers in [&r.v4, &r.v5].into_iter().flatten() {
            for s in servers.values() {
                assert!(
                    s.connections.max_payload_size >= 128 * 1024,
                    "file chunks must fit"
                );
            }
        }
    }
}
