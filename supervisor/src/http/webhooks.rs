//! Webhooks: job started / finished / failed, a bed to clear, a printer halted, POSTed as JSON
//! (`protocol::web::WebhookEvent`) to the URLs an operator registered, signed with HMAC-SHA256.
//!
//! Durable: the machine's `Output::Notify` goes into the store's outbox **in the same commit**
//! as the state change it tells of, so a supervisor killed at any moment loses none. A
//! delivery task, apart from the loop, sends each hook its events in order (one run per hook
//! at a time, on the blocking pool: a slow hook holds up no other), retries with capped
//! back-off (1 s doubling to 5 min) and deletes an event once every hook it was meant for
//! answered 2xx. At least once: a supervisor killed between a hook's 2xx and that commit
//! sends the event again, with the same `id` (deduplicate on it).
//!
//! Signature: `X-Printloop-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
//! (the time is in what is signed, so an old delivery cannot be replayed as new).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac as _};
use protocol::web::{WebhookEvent, WebhookKind};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::Notify;

use super::auth::Operator;
use super::errors::{Body, HttpError};
use super::registry::{load, save, Entry, RegistryError, Watched};
use super::rest::{json, parse};
use super::App;
use crate::model::Mutation;
use crate::store::Store;

/// The registry's file name in the data directory.
pub const WEBHOOKS_FILE: &str = "webhooks.toml";
/// Longest wait between two tries of a failing hook.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long one delivery may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Events read from the outbox at a time (a hook's run takes at most these).
const ROUND: usize = 500;

/// A registered hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    /// Its id (`wh-…`).
    pub id: String,
    /// Where events are POSTed (http:// or https://).
    pub url: String,
    /// The HMAC key (hex); shown once, when the hook is made.
    pub secret: String,
    /// The kinds it wants (empty: all).
    #[serde(default)]
    pub events: Vec<WebhookKind>,
    /// When it was registered (Unix ms).
    pub created_at_ms: u64,
}

impl Hook {
    fn wants(&self, kind: WebhookKind) -> bool {
        self.events.is_empty() || self.events.contains(&kind)
    }
}

impl Entry for Hook {
    const KEY: &'static str = "webhook";
    const HEADER: &'static str =
        "# printloop webhooks (printloop webhooks add/list/remove). Holds each hook's HMAC key.";

    fn check(&self) -> Result<(), String> {
        check_url(&self.url)?;
        if self.secret.len() < 32 || !self.secret.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "webhook {}: secret must be at least 32 hex digits",
                self.id
            ));
        }
        Ok(())
    }
}

/// Why a URL cannot be a hook.
pub fn check_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?}: a webhook URL starts with http:// or https://"))?;
    if url.len() > 2048
        || rest.is_empty()
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{:?}: not a usable URL",
            super::errors::shown(url, 100)
        ));
    }
    Ok(())
}

/// Why a hook cannot be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum WebhooksError {
    /// The file.
    #[error(transparent)]
    File(#[from] RegistryError),
    /// The request.
    #[error("{0}")]
    Invalid(String),
}

fn random_hex(n: usize) -> Result<String, WebhooksError> {
    let mut raw = vec![0u8; n];
    getrandom::fill(&mut raw)
        .map_err(|e| WebhooksError::Invalid(format!("no random source: {e}")))?;
    Ok(hex::encode(raw))
}

/// Registers a hook; returns it (with its secret: the only time it is shown).
pub fn add(
    path: &std::path::Path,
    url: &str,
    events: Vec<WebhookKind>,
    now_ms: u64,
) -> Result<Hook, WebhooksError> {
    check_url(url).map_err(WebhooksError::Invalid)?;
    let mut hooks: Vec<Hook> = load(path)?;
    if hooks.len() >= 32 {
        return Err(WebhooksError::Invalid("32 webhooks at most".into()));
    }
    let hook = Hook {
        id: format!("wh-{}", random_hex(6)?),
        url: url.to_owned(),
        secret: random_hex(32)?,
        events,
        created_at_ms: now_ms,
    };
    hooks.push(hook.clone());
    save(path, &hooks)?;
    Ok(hook)
}

/// Removes a hook; false when there was none. Its undelivered events are dropped.
pub fn remove(path: &std::path::Path, id: &str) -> Result<bool, WebhooksError> {
    let mut hooks: Vec<Hook> = load(path)?;
    let before = hooks.len();
    hooks.retain(|h| h.id != id);
    if hooks.len() == before {
        return Ok(false);
    }
    save(path, &hooks)?;
    Ok(true)
}

/// An event waiting in the outbox, with the hooks that still have to take it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// The event.
    pub event: WebhookEvent,
    /// Hook ids still to deliver to.
    pub hooks: Vec<String>,
}

/// The loop's side: turns the machine's notices into outbox mutations.
pub struct Outbox {
    hooks: Arc<Watched<Hook>>,
    next_seq: u64,
    wake: Arc<Notify>,
}

impl Outbox {
    /// Mutations that put `events` in the outbox, for every hook that wants each (none when no
    /// hook does). Commit them with the batch; then call [`Outbox::wake`].
    pub fn enqueue(&mut self, events: Vec<WebhookEvent>) -> Vec<Mutation> {
        if events.is_empty() {
            return Vec::new();
        }
        let hooks = self.hooks.entries();
        let mut muts = Vec::new();
        for event in events {
            let ids: Vec<String> = hooks
                .iter()
                .filter(|h| h.wants(event.kind))
                .map(|h| h.id.clone())
                .collect();
            if ids.is_empty() {
                continue;
            }
            let entry = OutboxEntry { event, hooks: ids };
            match serde_json::to_vec(&entry) {
                Ok(bytes) => {
                    muts.push(Mutation::PutOutbox {
                        seq: self.next_seq,
                        entry: bytes,
                    });
                    self.next_seq += 1;
                }
                Err(e) => tracing::error!(error = %e, "a webhook event does not encode"),
            }
        }
        muts
    }

    /// Tells the delivery task there is new work (after the commit).
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// Starts the delivery task over `store`'s outbox; returns the loop's side.
pub fn start(data_dir: PathBuf, store: Arc<Store>) -> Result<Outbox, WebhooksError> {
    let hooks = Arc::new(Watched::<Hook>::open(data_dir.join(WEBHOOKS_FILE))?);
    let pending = store
        .outbox(usize::MAX)
        .map_err(|e| WebhooksError::Invalid(e.to_string()))?;
    let next_seq = pending.last().map_or(1, |(s, _)| s + 1);
    if !pending.is_empty() {
        tracing::info!(
            events = pending.len(),
            "webhook events waiting from before the restart"
        );
    }
    let wake = Arc::new(Notify::new());
    tokio::spawn(deliver(hooks.clone(), store, wake.clone()));
    Ok(Outbox {
        hooks,
        next_seq,
        wake,
    })
}

/// Per hook: when it may be tried again, and the current back-off.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Instant,
    wait: Duration,
}

/// A hook's delivery run ended: the events it took, and whether it stopped on a failure.
type Finished = (String, Vec<u64>, bool);

/// The delivery task: each hook has at most one delivery run at a time, on the blocking pool,
/// so a slow or dead hook holds up no other.
async fn deliver(hooks: Arc<Watched<Hook>>, store: Arc<Store>, wake: Arc<Notify>) {
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Finished>();
    let mut busy: HashSet<String> = HashSet::new();
    let mut backoff: HashMap<String, Backoff> = HashMap::new();
    loop {
        let next = start_runs(&hooks, &store, &mut busy, &backoff, &done_tx).await;
        let wait = next.map_or(Duration::from_secs(30), |t| {
            t.saturating_duration_since(Instant::now())
        });
        tokio::select! {
            _ = wake.notified() => {}
            Some((id, taken, ok)) = done_rx.recv() => {
                busy.remove(&id);
                if ok {
                    backoff.remove(&id);
                } else {
                    let wait = backoff
                        .get(&id)
                        .map_or(Duration::from_secs(1), |b| (b.wait * 2).min(MAX_BACKOFF));
                    backoff.insert(id.clone(), Backoff { until: Instant::now() + wait, wait });
                }
                record(&store, &id, taken).await;
            }
            _ = tokio::time::sleep(wait.max(Duration::from_millis(50))) => {}
        }
    }
}

/// Reads the outbox; drops hooks that no longer exist from it; starts a run for every hook
/// that has events, is not running and is not backing off. Returns when the next back-off
/// ends, if any hook waits.
async fn start_runs(
    hooks: &Watched<Hook>,
    store: &Arc<Store>,
    busy: &mut HashSet<String>,
    backoff: &HashMap<String, Backoff>,
    done: &tokio::sync::mpsc::UnboundedSender<Finished>,
) -> Option<Instant> {
    let entries = read(store).await;
    let registered: BTreeMap<String, Hook> = hooks
        .entries()
        .into_iter()
        .map(|h| (h.id.clone(), h))
        .collect();
    let mut stale = Vec::new();
    let mut queues: BTreeMap<String, Vec<(u64, WebhookEvent)>> = BTreeMap::new();
    for (seq, mut e) in entries {
        let before = e.hooks.len();
        e.hooks.retain(|h| registered.contains_key(h));
        if e.hooks.len() != before {
            stale.push(outbox_write(seq, &e));
        }
        for h in &e.hooks {
            let ready =
                !busy.contains(h) && backoff.get(h).is_none_or(|b| b.until <= Instant::now());
            if ready {
                queues
                    .entry(h.clone())
                    .or_default()
                    .push((seq, e.event.clone()));
            }
        }
    }
    if !stale.is_empty() {
        apply(store, stale).await;
    }
    for (id, queue) in queues {
        let hook = registered[&id].clone();
        busy.insert(id);
        let done = done.clone();
        tokio::task::spawn_blocking(move || {
            let mut taken = Vec::new();
            for (seq, event) in queue {
                if let Err(e) = post(&hook, &event) {
                    tracing::warn!(hook = %hook.id, event = %event.id, error = %e, "webhook delivery failed; retrying later");
                    let _ = done.send((hook.id, taken, false));
                    return;
                }
                taken.push(seq);
            }
            let _ = done.send((hook.id, taken, true));
        });
    }
    backoff
        .iter()
        .filter(|(id, _)| !busy.contains(*id))
        .map(|(_, b)| b.until)
        .min()
}

/// The outbox's first events, decoded (an unreadable one is dropped, and logged).
async fn read(store: &Arc<Store>) -> Vec<(u64, OutboxEntry)> {
    let s = store.clone();
    let rows = match tokio::task::spawn_blocking(move || s.outbox(ROUND)).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "the webhook outbox cannot be read");
            return Vec::new();
        }
        Err(_) => return Vec::new(),
    };
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (seq, bytes) in rows {
        match serde_json::from_slice::<OutboxEntry>(&bytes) {
            Ok(e) => out.push((seq, e)),
            Err(e) => {
                tracing::error!(seq, error = %e, "an unreadable webhook event is dropped");
                bad.push(Mutation::RemoveOutbox(seq));
            }
        }
    }
    if !bad.is_empty() {
        apply(store, bad).await;
    }
    out
}

/// Hook `id` took the events `taken`: it is struck from them; an event every hook took goes.
/// Only this task changes existing outbox entries (the loop only adds new ones).
async fn record(store: &Arc<Store>, id: &str, taken: Vec<u64>) {
    if taken.is_empty() {
        return;
    }
    let mut muts = Vec::new();
    for (seq, mut e) in read(store).await {
        if taken.contains(&seq) {
            e.hooks.retain(|h| h != id);
            muts.push(outbox_write(seq, &e));
        }
    }
    apply(store, muts).await;
}

fn outbox_write(seq: u64, e: &OutboxEntry) -> Mutation {
    if e.hooks.is_empty() {
        return Mutation::RemoveOutbox(seq);
    }
    match serde_json::to_vec(e) {
        Ok(entry) => Mutation::PutOutbox { seq, entry },
        Err(_) => Mutation::RemoveOutbox(seq),
    }
}

async fn apply(store: &Arc<Store>, muts: Vec<Mutation>) {
    let s = store.clone();
    match tokio::task::spawn_blocking(move || s.apply(&muts)).await {
        Ok(Ok(())) | Err(_) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "webhook deliveries cannot be recorded (they will be sent again)")
        }
    }
}

/// The signature header's value for `body` at `t` (Unix seconds).
pub fn signature(secret_hex: &str, t: u64, body: &[u8]) -> String {
    let key = hex::decode(secret_hex).unwrap_or_default();
    let mut mac =
        <Hmac<Sha256> as hmac::Mac>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

fn post(hook: &Hook, event: &WebhookEvent) -> Result<(), String> {
    let body = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    let t = super::upload::unix_ms() / 1000;
    let agent = ureq::AgentBuilder::new()
        .timeout(DELIVERY_TIMEOUT)
        .redirects(0)
        .user_agent(concat!("printloop/", env!("CARGO_PKG_VERSION")))
        .build();
    match agent
        .post(&hook.url)
        .set("Content-Type", "application/json")
        .set("X-Printloop-Event", event.kind.as_str())
        .set("X-Printloop-Delivery", &event.id)
        .set("X-Printloop-Signature", &signature(&hook.secret, t, &body))
        .send_bytes(&body)
    {
        Ok(r) if (200..300).contains(&r.status()) => Ok(()),
        Ok(r) => Err(format!("answered {}", r.status())),
        Err(ureq::Error::Status(code, _)) => Err(format!("answered {code}")),
        Err(e) => Err(e.to_string()),
    }
}

// ----- the REST side: GET/POST /api/v1/webhooks, DELETE /api/v1/webhooks/{id} -----

/// A hook as listed (never its secret).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct HookInfo {
    /// Its id.
    pub id: String,
    /// Its URL.
    pub url: String,
    /// The kinds it gets (empty: all).
    pub events: Vec<WebhookKind>,
    /// The HMAC key (hex): only in the answer that made the hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// `POST /api/v1/webhooks`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewHook {
    /// Where to POST (http:// or https://).
    pub url: String,
    /// The kinds wanted (absent or empty: all).
    #[serde(default)]
    pub events: Vec<WebhookKind>,
}

/// The list.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct HookList {
    /// The hooks.
    pub webhooks: Vec<HookInfo>,
}

fn info(h: Hook, secret: bool) -> HookInfo {
    HookInfo {
        id: h.id,
        url: h.url,
        events: h.events,
        secret: secret.then_some(h.secret),
    }
}

fn path_of(app: &App) -> PathBuf {
    app.data_dir.join(WEBHOOKS_FILE)
}

fn failed(e: WebhooksError) -> HttpError {
    match e {
        WebhooksError::Invalid(m) => HttpError::invalid(m),
        WebhooksError::File(f) => {
            HttpError::http(protocol::web::HttpErrorCode::Unavailable, f.to_string())
        }
    }
}

/// `GET /api/v1/webhooks` (operator: the URLs may carry secrets of their own).
pub(crate) async fn list(State(app): State<App>, Operator(_): Operator) -> Response {
    match load::<Hook>(&path_of(&app)) {
        Ok(hooks) => json(&HookList {
            webhooks: hooks.into_iter().map(|h| info(h, false)).collect(),
        }),
        Err(e) => failed(e.into()).into_response(),
    }
}

/// `POST /api/v1/webhooks`: register a hook (201, with its secret).
pub(crate) async fn create(
    State(app): State<App>,
    Operator(who): Operator,
    Body(body): Body,
) -> Response {
    let r = async {
        let n: NewHook = parse(&body)?;
        let now_ms = super::upload::unix_ms();
        let hook = add(&path_of(&app), &n.url, n.events, now_ms).map_err(failed)?;
        tracing::info!(by = %who.name, hook = %hook.id, "webhook registered");
        Ok::<_, HttpError>(info(hook, true))
    };
    match r.await {
        Ok(h) => (StatusCode::CREATED, json(&h)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `DELETE /api/v1/webhooks/{id}`.
pub(crate) async fn delete(
    State(app): State<App>,
    Operator(who): Operator,
    Path(id): Path<String>,
) -> Response {
    match remove(&path_of(&app), &id) {
        Ok(true) => {
            tracing::info!(by = %who.name, hook = %super::errors::shown(&id, 40), "webhook removed");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => HttpError::http(
            protocol::web::HttpErrorCode::NotFound,
            format!("no webhook {:?}", super::errors::shown(&id, 40)),
        )
        .into_response(),
        Err(e) => failed(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_covers_the_time_and_the_body() {
        let secret = "00".repeat(32);
        let a = signature(&secret, 1, b"{}");
        assert!(a.starts_with("t=1,v1="));
        assert_ne!(a, signature(&secret, 2, b"{}"));
        assert_ne!(
            a.split(",v1=").nth(1),
            signature(&secret, 1, b"{ }").split(",v1=").nth(1)
        );
        assert_ne!(a, signature(&"11".repeat(32), 1, b"{}"));
    }

    #[test]
    fn urls_must_be_http() {
        assert!(check_url("http://127.0.0.1:9/x").is_ok());
        assert!(check_url("https://hooks.example/x?y=1").is_ok());
        assert!(check_url("file:///etc/passwd").is_err());
        assert!(check_url("http://a b").is_err());
        assert!(check_url("http://").is_err());
    }
}
