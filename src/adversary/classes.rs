//! The attack classes, one function each: what the hostile client sends, and the violations
//! that only the class itself can see (an API request without an answer, a file chunk served
//! to a stranger, a replayed start accepted). The probe's figures, the retained topics and the
//! supervisor's view are checked for every class by the runner.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use protocol::api::{ApiOp, ApiRequest, ListJobs, SubmitJob};
use protocol::{ClientId, CommandId, JobId, Payload as _, PrinterId, Sha256Hex, Topic, Version};
use serde_json::{json, Value};

use super::attacker::{Attacker, Shot};
use super::probe::Probe;

/// Every class, in the order they run.
pub const CLASSES: [&str; 10] = [
    "oversized",
    "malformed",
    "flood_cmd",
    "flood_cmd_max",
    "flood_api",
    "forged_retained",
    "replay",
    "unknown_printer",
    "file_pull",
    "log_injection",
];

/// Text the log-injection job's name tries to start a log line with.
pub const FORGED_LOG_TEXT: &str = "FORGED-LOG-LINE";

/// What a class did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Messages the attacker published.
    pub messages_sent: u64,
    /// Violations the class saw itself.
    pub violations: Vec<String>,
    /// Class-specific figures for the report.
    pub details: BTreeMap<&'static str, Value>,
    /// Jobs the attacker submitted that the supervisor accepted (they must finish too).
    pub jobs: Vec<JobId>,
    /// The flood outruns what the broker delivers to one gateway: the commands stuck behind it
    /// (or dropped by the broker) are the broker's limit, reported but not a violation; the
    /// printer must still keep printing and reporting, and recover once the flood stops.
    pub past_the_broker: bool,
}

/// The paced command flood: the rate issue #10 observed (5 000 commands a second).
pub const FLOOD_RATE: u64 = 5_000;

/// What a class needs besides the attacker.
pub struct Ctx<'a> {
    /// The attacker.
    pub attacker: &'a mut Attacker,
    /// The probe (for the real epochs).
    pub probe: &'a Probe,
    /// How long a flood lasts.
    pub attack: Duration,
    /// The file every job prints.
    pub job_file: (Sha256Hex, u64),
    /// A stored file no job prints.
    pub idle_file: Sha256Hex,
}

fn pid(s: &str) -> PrinterId {
    PrinterId::new(s).unwrap_or_else(|_| unreachable!("{s} is a valid printer id"))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Every topic a client can write, for printer `p0` (retained where the real writer retains).
fn writable(a: &Attacker) -> Vec<(String, bool)> {
    let t = a.topics();
    let p = pid("p0");
    vec![
        (t.format(&Topic::Cmd(p.clone())), false),
        (t.format(&Topic::Events(p.clone())), false),
        (t.format(&Topic::State(p.clone())), true),
        (t.format(&Topic::Status(p.clone())), true),
        (t.format(&Topic::Meta(p.clone())), true),
        (t.format(&Topic::FileRequest(p.clone())), false),
        (t.format(&Topic::FileChunk(p)), false),
        (t.format(&Topic::ApiRequest), false),
        (t.format(&Topic::SupervisorStatus), true),
    ]
}

/// Runs class `name`.
pub async fn run(name: &str, ctx: &mut Ctx<'_>) -> Outcome {
    match name {
        "oversized" => oversized(ctx).await,
        "malformed" => malformed(ctx).await,
        "flood_cmd" => flood_cmd(ctx, Some(FLOOD_RATE)).await,
        "flood_cmd_max" => {
            let mut o = flood_cmd(ctx, None).await;
            o.past_the_broker = true;
            o
        }
        "flood_api" => flood_api(ctx).await,
        "forged_retained" => forged_retained(ctx).await,
        "replay" => replay(ctx).await,
        "unknown_printer" => unknown_printer(ctx).await,
        "file_pull" => file_pull(ctx).await,
        "log_injection" => log_injection(ctx).await,
        other => Outcome {
            violations: vec![format!("unknown class {other}")],
            ..Default::default()
        },
    }
}

/// A JSON object with a readable id (a command, or an API request on `api/request`), padded
/// with a `pad` field to exactly `size` bytes.
fn padded(id: &str, api: bool, size: usize) -> Vec<u8> {
    let head = if api {
        format!(r#"{{"v":1,"id":"{id}","client":"attacker","op":"list_jobs","args":{{}},"pad":""#)
    } else {
        format!(r#"{{"v":1,"id":"{id}","kind":"rebirth","args":{{}},"pad":""#)
    };
    let tail = "\"}";
    let mut out = head.into_bytes();
    out.resize(size.saturating_sub(tail.len()).max(out.len()), b'a');
    out.extend_from_slice(tail.as_bytes());
    out
}

/// 900 KiB and 1.9 MiB on every writable topic, each on a connection of its own.
async fn oversized(ctx: &mut Ctx<'_>) -> Outcome {
    let mut o = Outcome::default();
    let (mut acked, mut dropped, mut silent) = (0u64, BTreeMap::new(), 0u64);
    let api = ctx.attacker.topics().format(&Topic::ApiRequest);
    for size in [900 * 1024, 1_992_294] {
        for (topic, retain) in writable(ctx.attacker) {
            o.messages_sent += 1;
            let id = format!("attacker-big-{}", o.messages_sent);
            let payload = padded(&id, topic == api, size);
            match ctx.attacker.one_shot(&topic, payload, retain).await {
                Shot::Acked => acked += 1,
                Shot::Dropped(_) => {
                    let short = topic
                        .strip_prefix(ctx.attacker.topics().root())
                        .unwrap_or(&topic)
                        .to_owned();
                    *dropped
                        .entry(format!("{short} ({} KiB)", size / 1024))
                        .or_insert(0u64) += 1;
                }
                Shot::NoAnswer => silent += 1,
            }
        }
    }
    o.details.insert("acked", json!(acked));
    o.details.insert("connection_dropped", json!(dropped));
    o.details.insert("no_answer", json!(silent));
    o
}

/// Tiny deterministic noise (xorshift), so a run is reproducible.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed & 0xff) as u8
        })
        .collect()
}

fn malformed_payloads(tag: &str) -> Vec<Vec<u8>> {
    let deep = 10_000;
    let mut nested = format!(r#"{{"v":1,"id":"attacker-deep-{tag}","kind":"rebirth","args":"#);
    nested.push_str(&"[".repeat(deep));
    nested.push_str(&"]".repeat(deep));
    nested.push('}');
    let mut objects = String::new();
    for _ in 0..deep {
        objects.push_str(r#"{"a":"#);
    }
    objects.push('1');
    objects.push_str(&"}".repeat(deep));
    vec![
        noise(4096, 0x5eed_0000 + tag.len() as u64),
        [
            &b"\xff\xfe\xfd{\"v\":1,\"id\":\"attacker-utf8-"[..],
            tag.as_bytes(),
            b"\",\"kind\":\"rebirth\xc3\x28\",\"args\":{}}",
        ]
        .concat(),
        nested.into_bytes(),
        objects.into_bytes(),
        format!(
            r#"{{"v":1,"id":"attacker-dup-{tag}","kind":"rebirth","kind":"cancel","args":{{}},"args":{{}}}}"#
        )
        .into_bytes(),
        format!(r#"{{"v":2,"id":"attacker-v2-{tag}","kind":"rebirth","args":{{}}}}"#).into_bytes(),
        format!(r#"{{"v":1,"id":"attacker-trunc-{tag}","kind":"reb"#).into_bytes(),
        b"\0\0\0\0{\"v\":1}\0".to_vec(),
        // An empty payload deletes a retained message.
        Vec::new(),
        format!(
            r#"{{"v":1,"id":"attacker-types-{tag}","kind":7,"args":[],"epoch":"7","seq":-1,"at_ms":null,"heartbeat_s":1e99,"phase":"idle","bed_clear":"no","presence":"online","printer_id":7}}"#
        )
        .into_bytes(),
    ]
}

/// Garbage, invalid UTF-8, deep nesting, duplicate keys, `"v":2`, wrong types, truncation, NUL
/// bytes and an empty payload, on every writable topic (the last one sent on a retained topic
/// is the wrong-types one, so it stays retained unless the topic's owner re-asserts it).
async fn malformed(ctx: &mut Ctx<'_>) -> Outcome {
    let mut o = Outcome::default();
    let mut not_queued = 0u64;
    for (k, (topic, retain)) in writable(ctx.attacker).into_iter().enumerate() {
        for payload in malformed_payloads(&k.to_string()) {
            o.messages_sent += 1;
            if !ctx.attacker.send(&topic, payload, retain).await {
                not_queued += 1;
            }
        }
    }
    if not_queued > 0 {
        o.details.insert("not_queued", json!(not_queued));
    }
    o
}

/// Valid commands with readable ids on p0's `cmd`, `rate` a second (paced in 10 ms steps), or
/// as fast as the connection takes them.
async fn flood_cmd(ctx: &mut Ctx<'_>, rate: Option<u64>) -> Outcome {
    let mut o = Outcome::default();
    let topic = ctx.attacker.topics().format(&Topic::Cmd(pid("p0")));
    let start = Instant::now();
    let unpaced = rate.is_none();
    let batch = rate.map_or(200, |r| (r / 100).max(1));
    let mut step = tokio::time::interval(Duration::from_millis(10));
    step.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while start.elapsed() < ctx.attack {
        if rate.is_some() {
            step.tick().await;
        }
        for _ in 0..batch {
            let n = o.messages_sent;
            let id = format!("attacker-flood-{n}");
            let payload = match n % 3 {
                0 => json!({"v": 1, "id": id, "client": "attacker", "kind": "rebirth",
                            "args": {}}),
                1 => json!({"v": 1, "id": id, "client": "attacker", "kind": "pause",
                            "args": {"job_id": "attacker-none"}}),
                _ => json!({"v": 1, "id": id, "client": "attacker", "kind": "resume",
                            "args": {"job_id": "attacker-none"}}),
            };
            if !ctx
                .attacker
                .send(&topic, payload.to_string().into_bytes(), false)
                .await
            {
                break;
            }
            o.messages_sent += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = o.messages_sent as f64 / secs.max(0.001);
    o.details.insert("rate_per_s", json!(rate.round()));
    if rate < 2000.0 && unpaced {
        o.details.insert(
            "note",
            json!(format!(
                "the attacker reached only {rate:.0} msg/s (aim: 2000)"
            )),
        );
    }
    o
}

/// 10 000 `list_jobs` requests in a burst from client `attacker`; every one must be answered,
/// `ok` or an error that says busy.
async fn flood_api(ctx: &mut Ctx<'_>) -> Outcome {
    const N: u64 = 10_000;
    let mut o = Outcome::default();
    let topic = ctx.attacker.topics().format(&Topic::ApiRequest);
    let Ok(client) = ClientId::new("attacker") else {
        unreachable!("`attacker` is a valid client id")
    };
    let mut ids = Vec::new();
    let start = Instant::now();
    for n in 0..N {
        let id = format!("attacker-api-{n}");
        let Ok(cid) = CommandId::new(id.clone()) else {
            continue;
        };
        let req = ApiRequest {
            v: Version,
            id: cid,
            client: client.clone(),
            op: ApiOp::ListJobs(ListJobs {
                include_ended: false,
                limit: None,
            }),
        };
        if !ctx.attacker.send(&topic, req.encode(), false).await {
            break;
        }
        o.messages_sent += 1;
        ids.push(id);
    }
    let burst_s = start.elapsed().as_secs_f64();
    // Wait (bounded) for the answers: until all arrived or none came for 5 s (at most 30 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (0usize, Instant::now());
    loop {
        let got = ctx
            .attacker
            .heard(|i| ids.iter().filter(|id| i.api.contains_key(*id)).count())
            .unwrap_or(0);
        if got == ids.len() || Instant::now() > deadline {
            break;
        }
        if got != last.0 {
            last = (got, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut ok, mut busy, mut other, mut missing) = (0u64, 0u64, BTreeMap::new(), 0u64);
    ctx.attacker.heard(|i| {
        for id in &ids {
            match i.api.get(id) {
                Some((true, _)) => ok += 1,
                Some((false, Some(e))) if e.to_lowercase().contains("busy") => busy += 1,
                Some((false, e)) => {
                    *other
                        .entry(e.clone().unwrap_or_else(|| "(no reason)".into()))
                        .or_insert(0u64) += 1
                }
                None => missing += 1,
            }
        }
    });
    o.details
        .insert("burst_s", json!((burst_s * 10.0).round() / 10.0));
    o.details.insert(
        "responses",
        json!({"ok": ok, "busy": busy, "other_errors": other.values().sum::<u64>(), "missing": missing}),
    );
    if missing > 0 {
        o.violations.push(format!(
            "flood_api: {missing} of {} requests got no response",
            ids.len()
        ));
    }
    for (e, n) in other {
        o.violations.push(format!(
            "flood_api: {n} requests answered with an error that does not say busy: {e:?}"
        ));
    }
    o
}

/// Retained forgeries of a real printer's presence, state and identity, and of the
/// supervisor's presence.
async fn forged_retained(ctx: &mut Ctx<'_>) -> Outcome {
    let mut o = Outcome::default();
    let t = ctx.attacker.topics().clone();
    let now = unix_ms();
    let huge_epoch: u64 = 1_000_000_000_000;
    let (epoch0, _) = ctx.probe.last_seq(0).unwrap_or((1, 1));
    let epoch1 = ctx.probe.epoch(1).unwrap_or(1);
    let sup_epoch = ctx.probe.sup_epoch().unwrap_or(1);
    let forgeries = [
        (
            Topic::Status(pid("p0")),
            json!({"v": 1, "presence": "offline", "epoch": huge_epoch, "at_ms": now}),
        ),
        (
            Topic::State(pid("p0")),
            json!({"v": 1, "epoch": epoch0, "seq": 9_000_000_000_000_000u64, "at_ms": now,
                   "heartbeat_s": 2, "phase": "idle", "bed_clear": false}),
        ),
        (
            Topic::Meta(pid("p0")),
            json!({"v": 1, "printer_id": "p0", "epoch": huge_epoch, "name": "forged",
                   "model": "forged", "tags": [], "gateway_version": "0.0.0"}),
        ),
        // An old epoch: a late will as a reader would take it.
        (
            Topic::Status(pid("p1")),
            json!({"v": 1, "presence": "offline", "epoch": epoch1.saturating_sub(1), "at_ms": now}),
        ),
        (
            Topic::SupervisorStatus,
            json!({"v": 1, "presence": "offline", "epoch": sup_epoch + 1_000_000, "at_ms": now}),
        ),
    ];
    let mut undecodable = Vec::new();
    for (topic, payload) in forgeries {
        let bytes = payload.to_string().into_bytes();
        let valid = match &topic {
            Topic::Status(_) | Topic::SupervisorStatus => {
                protocol::presence::Status::decode(&bytes).is_ok()
            }
            Topic::State(_) => protocol::state::StateSnapshot::decode(&bytes).is_ok(),
            Topic::Meta(_) => protocol::presence::Meta::decode(&bytes).is_ok(),
            _ => true,
        };
        if !valid {
            undecodable.push(t.format(&topic));
        }
        ctx.attacker.send(&t.format(&topic), bytes, true).await;
        o.messages_sent += 1;
    }
    if !undecodable.is_empty() {
        // The suite's own mistake: a forgery the protocol does not even accept proves nothing.
        o.details
            .insert("forgeries_that_do_not_decode", json!(undecodable));
    }
    o
}

/// A start the supervisor sent to p0, copied onto p1's `cmd` (and p0's) under new ids, and
/// pre-sent command ids a supervisor might use next.
async fn replay(ctx: &mut Ctx<'_>) -> Outcome {
    let mut o = Outcome::default();
    let t = ctx.attacker.topics().clone();
    // A start the attacker saw on p0's cmd, or (when its login may not read commands) one built
    // from what p0's state says it prints. Waits for one, bounded.
    let deadline = Instant::now() + ctx.attack.max(Duration::from_secs(5));
    let mut source = "none";
    let mut start: Option<Value> = None;
    while start.is_none() && Instant::now() < deadline {
        start = ctx
            .attacker
            .heard(|i| {
                if let Some(raw) = i.starts.get("p0") {
                    return serde_json::from_slice::<Value>(raw)
                        .ok()
                        .map(|v| ("sniffed", v));
                }
                let state: Value = serde_json::from_slice(i.states.get("p0")?).ok()?;
                let job = state.get("job")?;
                Some((
                    "rebuilt from p0's state",
                    json!({"v": 1, "id": "x", "kind": "start_job", "args": {
                        "job_id": job["job_id"], "printer_id": "p0",
                        "file_sha256": job["file_sha256"], "size_bytes": job["size_bytes"],
                        "name": job["name"]}}),
                ))
            })
            .flatten()
            .map(|(s, v)| {
                source = s;
                v
            });
        if start.is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    o.details.insert("start_source", json!(source));
    let mut replay_ids = Vec::new();
    if let Some(mut cmd) = start {
        if let Some(m) = cmd.as_object_mut() {
            m.remove("expires_at");
        }
        for (k, target) in ["p1", "p0"].into_iter().enumerate() {
            let id = format!("attacker-replay-{k}");
            cmd["id"] = json!(id);
            ctx.attacker
                .send(
                    &t.format(&Topic::Cmd(pid(target))),
                    cmd.to_string().into_bytes(),
                    false,
                )
                .await;
            o.messages_sent += 1;
            replay_ids.push((id, target, cmd["args"]["job_id"].clone()));
        }
    } else {
        o.details.insert(
            "note",
            json!("no start_job to replay was seen within the class"),
        );
    }
    // Pre-claim the ids that follow the newest supervisor id seen, with and without its
    // digest, on both printers (a harmless command each).
    let newest = ctx.attacker.heard(|i| i.sup_ids.last().cloned()).flatten();
    let mut claimed = 0u64;
    if let Some(id) = &newest {
        let parts: Vec<&str> = id.split('-').collect();
        if let (Some(epoch), Some(n)) = (
            parts.get(1),
            parts.get(2).and_then(|n| n.parse::<u64>().ok()),
        ) {
            let digest = parts.get(3).copied();
            for k in 1..=20 {
                let mut guesses = vec![format!("sup-{epoch}-{}", n + k)];
                if let Some(d) = digest {
                    guesses.push(format!("sup-{epoch}-{}-{d}", n + k));
                }
                for g in guesses {
                    for p in ["p0", "p1"] {
                        let payload = json!({"v": 1, "id": g, "kind": "pause",
                                             "args": {"job_id": "attacker-none"}});
                        ctx.attacker
                            .send(
                                &t.format(&Topic::Cmd(pid(p))),
                                payload.to_string().into_bytes(),
                                false,
                            )
                            .await;
                        o.messages_sent += 1;
                        claimed += 1;
                    }
                }
            }
        }
    }
    o.details.insert("pre_claimed_ids", json!(claimed));
    o.details.insert("newest_supervisor_id_seen", json!(newest));
    // The answers to the replays.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (id, target, job) in replay_ids {
        let answer = ctx
            .attacker
            .heard(|i| i.results.get(&id).cloned())
            .flatten();
        match answer {
            Some((_, status, reason)) => {
                o.details.insert(
                    if target == "p1" {
                        "replay_on_p1"
                    } else {
                        "replay_on_p0"
                    },
                    json!({"status": status, "reason": reason}),
                );
                if status == "ok" {
                    o.violations.push(format!(
                        "replay: {target} accepted a copy of the supervisor's start_job for job {job} under a new id"
                    ));
                }
            }
            None => {
                o.details.insert(
                    if target == "p1" {
                        "replay_on_p1"
                    } else {
                        "replay_on_p0"
                    },
                    json!("no answer seen"),
                );
            }
        }
    }
    o
}

/// Retained meta, status and state for `ghost`, then a forged `job_ended` (finished) from it
/// for every job in the retained queue.
async fn unknown_printer(ctx: &mut Ctx<'_>) -> Outcome {
    let mut o = Outcome::default();
    let t = ctx.attacker.topics().clone();
    let g = pid("ghost");
    let now = unix_ms();
    let retained = [
        (
            Topic::Meta(g.clone()),
            json!({"v": 1, "printer_id": "ghost", "epoch": 1, "name": "ghost", "model": "ghost",
                   "tags": [], "gateway_version": "0.1.0"}),
        ),
        (
            Topic::State(g.clone()),
            json!({"v": 1, "epoch": 1, "seq": 1, "at_ms": now, "heartbeat_s": 2,
                   "phase": "ready", "bed_clear": true}),
        ),
        (
            Topic::Status(g.clone()),
            json!({"v": 1, "presence": "online", "epoch": 1, "at_ms": now}),
        ),
    ];
    for (topic, payload) in retained {
        ctx.attacker
            .send(&t.format(&topic), payload.to_string().into_bytes(), true)
            .await;
        o.messages_sent += 1;
    }
    // Let the supervisor take the ghost in (and maybe give it work), then end its "jobs".
    tokio::time::sleep(Duration::from_secs(2)).await;
    let jobs: Vec<String> = ctx
        .attacker
        .heard(|i| {
            i.queue
                .as_ref()
                .and_then(|q| serde_json::from_slice::<Value>(q).ok())
                .and_then(|q| {
                    q["jobs"].as_array().map(|a| {
                        a.iter()
                            .filter_map(|j| j["job_id"].as_str().map(str::to_owned))
                            .collect()
                    })
                })
                .unwrap_or_default()
        })
        .unwrap_or_default();
    for (k, job) in jobs.iter().enumerate() {
        let event = json!({"v": 1, "epoch": 1, "seq": 2 + k as u64, "at_ms": unix_ms(),
            "event": {"kind": "job_ended", "job_id": job, "outcome": "finished", "line": 1}});
        ctx.attacker
            .send(
                &t.format(&Topic::Events(g.clone())),
                event.to_string().into_bytes(),
                false,
            )
            .await;
        o.messages_sent += 1;
    }
    o.details.insert("forged_job_ended", json!(jobs.len()));
    o
}

/// File chunk requests for a stored file no job prints, under a real printer and under
/// `ghost`; any chunk served is a violation.
async fn file_pull(ctx: &mut Ctx<'_>) -> Outcome {
    let mut o = Outcome::default();
    let t = ctx.attacker.topics().clone();
    let files = [
        ("idle", ctx.idle_file.clone()),
        ("job", ctx.job_file.0.clone()),
    ];
    for printer in ["p1", "ghost"] {
        for (which, sha) in &files {
            // The job's file under p1 is a stranger's pull only when p1 is not printing it; the
            // idle file always is. Ask for the idle file under both, the job's under ghost.
            if *which == "job" && printer == "p1" {
                continue;
            }
            let id = format!("attacker-pull-{printer}-{which}");
            let req = json!({"v": 1, "request_id": id, "sha256": sha.as_str(), "offset": 0,
                             "len": 65536});
            ctx.attacker
                .send(
                    &t.format(&Topic::FileRequest(pid(printer))),
                    req.to_string().into_bytes(),
                    false,
                )
                .await;
            o.messages_sent += 1;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let chunks = ctx.attacker.heard(|i| i.chunks.clone()).unwrap_or_default();
    let mut answers = BTreeMap::new();
    for (printer, id, status) in chunks {
        if status == "ok" {
            o.violations.push(format!(
                "file_pull: a chunk was served for {id} under {printer}, which has no job with that file"
            ));
        }
        answers.insert(id, status);
    }
    o.details.insert("answers", json!(answers));
    o
}

/// A job whose name carries a newline, a line that looks like a log line, and ANSI escapes.
async fn log_injection(ctx: &mut Ctx<'_>) -> Outcome {
    let mut o = Outcome::default();
    let t = ctx.attacker.topics().clone();
    let name = format!(
        "cube20.gcode\n{FORGED_LOG_TEXT} ERROR supervisor: printer p0 on fire\x1b[31m red\x1b[0m\r\n{FORGED_LOG_TEXT} again"
    );
    let (Ok(id), Ok(client)) = (CommandId::new("attacker-log-1"), ClientId::new("attacker")) else {
        unreachable!("valid ids")
    };
    let req = ApiRequest {
        v: Version,
        id,
        client,
        op: ApiOp::SubmitJob(SubmitJob {
            name,
            sha256: ctx.job_file.0.clone(),
            copies: 1,
            priority: 0,
            tags: vec![],
        }),
    };
    ctx.attacker
        .send(&t.format(&Topic::ApiRequest), req.encode(), false)
        .await;
    o.messages_sent += 1;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut answer = None;
    while answer.is_none() && Instant::now() < deadline {
        answer = ctx
            .attacker
            .heard(|i| i.api.get("attacker-log-1").cloned())
            .flatten();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match answer {
        Some((true, _)) => {
            o.jobs = ctx
                .attacker
                .heard(|i| i.api_jobs.get("attacker-log-1").cloned())
                .flatten()
                .unwrap_or_default();
            o.details.insert("submitted", json!(o.jobs));
        }
        Some((false, e)) => {
            o.details.insert("refused", json!(e));
        }
        None => {
            o.details.insert("submitted", json!("no answer"));
        }
    }
    o
}
