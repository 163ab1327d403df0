//! Home Assistant MQTT discovery: the retained config messages that make every printer a device
//! in Home Assistant, and the buttons' press messages coming back. Pure: topics and payloads in,
//! topics and payloads out (the [`crate::machine`] decides when to publish them).
//!
//! Home Assistant 2024.3 (the newest that runs on Python 3.11) knows only per-component
//! discovery topics, `<prefix>/<component>/<node_id>/<object_id>/config`; the device-based
//! `<prefix>/device/<id>/config` came later (2024.12). So every entity gets its own config and
//! the entities of one printer share one `device` block — which every Home Assistant version
//! understands. See `docs/home-assistant.md`.
//!
//! Nothing here is read from Home Assistant except the press payload and `<prefix>/status`;
//! entity states come straight from the retained `printers/<id>/state`, `status`,
//! `supervisor/status` and `queue` topics through `value_template`s.

use protocol::presence::Meta;
use protocol::{PrinterId, Topic, Topics};
use serde_json::{json, Value};

/// The Home Assistant settings (`[ha]` in the supervisor's TOML).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaConfig {
    /// Publish discovery and handle presses at all.
    pub enabled: bool,
    /// Home Assistant's discovery prefix (its MQTT integration's setting).
    pub discovery_prefix: String,
    /// The re-publish after `<prefix>/status` = `online` waits a random 0..=this many ms, so a
    /// Home Assistant restart does not meet every publisher at the same instant.
    pub republish_jitter_ms: u64,
}

impl Default for HaConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            discovery_prefix: "homeassistant".into(),
            republish_jitter_ms: 5_000,
        }
    }
}

/// Checks a discovery prefix: one or more topic levels, no wildcards, not `$`-reserved.
pub fn validate_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() || prefix.len() > 64 {
        return Err("must be 1 to 64 characters".into());
    }
    if prefix.starts_with('/') || prefix.ends_with('/') || prefix.split('/').any(str::is_empty) {
        return Err("must not start or end with '/' or have an empty level".into());
    }
    if prefix.contains(['+', '#', '\0']) || prefix.starts_with('$') {
        return Err("must not contain wildcards or start with '$'".into());
    }
    Ok(())
}

/// What a Home Assistant button asks for (the press payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PressAction {
    /// Pause the print.
    Pause,
    /// Resume the paused print.
    Resume,
    /// Cancel the print.
    Cancel,
    /// A person cleared the bed (the print on it is taken as good).
    BedCleared,
}

impl PressAction {
    /// Every action, in button order.
    pub const ALL: [PressAction; 4] = [Self::Pause, Self::Resume, Self::Cancel, Self::BedCleared];

    /// The press payload and the object id of the button.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Cancel => "cancel",
            Self::BedCleared => "bed_cleared",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Pause => "Pause",
            Self::Resume => "Resume",
            Self::Cancel => "Cancel print",
            Self::BedCleared => "Bed cleared",
        }
    }

    fn icon(self) -> &'static str {
        match self {
            Self::Pause => "mdi:pause",
            Self::Resume => "mdi:play",
            Self::Cancel => "mdi:stop",
            Self::BedCleared => "mdi:broom",
        }
    }

    /// Parses a press payload (surrounding white space ignored; at most 32 bytes).
    pub fn parse(payload: &[u8]) -> Result<Self, String> {
        if payload.len() > 32 {
            return Err(format!("press payload of {} bytes", payload.len()));
        }
        let text = std::str::from_utf8(payload)
            .map_err(|_| "press payload is not UTF-8".to_owned())?
            .trim();
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == text)
            .ok_or_else(|| {
                format!("unknown press {text:?} (expected pause, resume, cancel or bed_cleared)")
            })
    }
}

/// One retained discovery message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `<prefix>/<component>/<node_id>/<object_id>/config`.
    pub topic: String,
    /// The JSON config (empty removes the entity).
    pub payload: Vec<u8>,
}

/// The identifier prefix: `printloop` for the default topic root; with another root its levels
/// are added (`farm-a/printloop/v1` → `printloop_farm-a_printloop_v1`), so two farms on one
/// Home Assistant never share an id.
fn id_base(topics: &Topics) -> String {
    if topics.root() == protocol::DEFAULT_ROOT {
        return "printloop".into();
    }
    let root: String = topics
        .root()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("printloop_{root}")
}

/// The Home Assistant device identifier of a printer (`printloop_<printer>`).
pub fn printer_device_id(topics: &Topics, printer: &PrinterId) -> String {
    format!("{}_{printer}", id_base(topics))
}

/// The Home Assistant device identifier of the fleet, `printloop__fleet`: two `_`, so that it
/// never equals a printer's (a printer named `fleet` is `printloop_fleet`).
fn fleet_device_id(topics: &Topics) -> String {
    format!("{}__fleet", id_base(topics))
}

/// The topic Home Assistant announces itself on (`<prefix>/status`: `online`/`offline`).
pub fn ha_status_topic(cfg: &HaConfig) -> String {
    format!("{}/status", cfg.discovery_prefix)
}

const PRESENCE_TEMPLATE: &str = "{{ value_json.presence }}";

fn availability(topic: String) -> Value {
    json!({
        "topic": topic,
        "value_template": PRESENCE_TEMPLATE,
        "payload_available": "online",
        "payload_not_available": "offline",
    })
}

fn origin() -> Value {
    json!({"name": "printloop", "sw": env!("CARGO_PKG_VERSION")})
}

/// What one entity of a printer is.
struct Entity {
    component: &'static str,
    key: &'static str,
    body: Value,
}

fn sensor(key: &'static str, name: &str, template: &str, extra: Value) -> Entity {
    let mut body = json!({"name": name, "value_template": template});
    merge(&mut body, extra);
    Entity {
        component: "sensor",
        key,
        body,
    }
}

fn merge(into: &mut Value, extra: Value) {
    if let (Some(into), Value::Object(extra)) = (into.as_object_mut(), extra) {
        into.extend(extra);
    }
}

fn temperature(key: &'static str, name: &str, heater: &str, field: &str) -> Entity {
    sensor(
        key,
        name,
        &format!(
            "{{{{ value_json.temps.{heater}.{field} if value_json.temps is defined else None }}}}"
        ),
        json!({
            "device_class": "temperature",
            "unit_of_measurement": "°C",
            "state_class": "measurement",
            "suggested_display_precision": 1,
        }),
    )
}

/// The entities of one printer, state-topic based (buttons are added separately).
fn printer_entities() -> Vec<Entity> {
    vec![
        sensor(
            "phase",
            "Phase",
            "{{ value_json.phase }}",
            json!({"icon": "mdi:printer-3d"}),
        ),
        sensor(
            "progress",
            "Progress",
            "{{ value_json.job.progress_pct if value_json.job is defined else None }}",
            json!({
                "unit_of_measurement": "%",
                "state_class": "measurement",
                "suggested_display_precision": 1,
                "icon": "mdi:progress-clock",
            }),
        ),
        sensor(
            "remaining",
            "Remaining time",
            "{{ value_json.job.remaining_s if value_json.job is defined and value_json.job.remaining_s is defined else None }}",
            json!({"device_class": "duration", "unit_of_measurement": "s"}),
        ),
        temperature("nozzle_temp", "Nozzle temperature", "nozzle", "actual"),
        temperature("nozzle_target", "Nozzle target", "nozzle", "target"),
        temperature("bed_temp", "Bed temperature", "bed", "actual"),
        temperature("bed_target", "Bed target", "bed", "target"),
        sensor(
            "job",
            "Current job",
            "{{ value_json.job.name if value_json.job is defined else 'none' }}",
            json!({
                "icon": "mdi:file-document-outline",
                "json_attributes_template":
                    "{{ value_json.job | tojson if value_json.job is defined else '{}' }}",
            }),
        ),
        Entity {
            component: "binary_sensor",
            key: "problem",
            body: json!({
                "name": "Problem",
                "device_class": "problem",
                "value_template":
                    "{{ 'ON' if value_json.phase in ['error', 'halted'] else 'OFF' }}",
                "json_attributes_template":
                    "{{ {'error': value_json.error} | tojson if value_json.error is defined else '{}' }}",
            }),
        },
    ]
}

/// Every discovery config topic of one printer (to publish, or to clear when it is forgotten).
pub fn printer_config_topics(cfg: &HaConfig, topics: &Topics, printer: &PrinterId) -> Vec<String> {
    let node = printer_device_id(topics, printer);
    printer_entities()
        .iter()
        .map(|e| (e.component, e.key))
        .chain(PressAction::ALL.iter().map(|a| ("button", a.as_str())))
        .map(|(component, key)| format!("{}/{component}/{node}/{key}/config", cfg.discovery_prefix))
        .collect()
}

/// The discovery configs of one printer: sensors, the problem binary sensor and the buttons,
/// sharing one device. `meta` names the device when the printer has published it.
pub fn printer_configs(
    cfg: &HaConfig,
    topics: &Topics,
    printer: &PrinterId,
    meta: Option<&Meta>,
) -> Vec<Config> {
    let node = printer_device_id(topics, printer);
    let state_topic = topics.format(&Topic::State(printer.clone()));
    let status_topic = topics.format(&Topic::Status(printer.clone()));
    let supervisor_topic = topics.format(&Topic::SupervisorStatus);
    let mut device = json!({
        "identifiers": [node],
        "name": meta.map_or_else(|| printer.to_string(), |m| m.name.clone()),
        "manufacturer": "printloop",
        "model": meta.map_or_else(|| "3D printer".to_owned(), |m| m.model.clone()),
        "via_device": fleet_device_id(topics),
    });
    if let Some(m) = meta {
        let sw = match &m.firmware {
            Some(f) => format!("{} (gateway {})", f.name, m.gateway_version),
            None => format!("gateway {}", m.gateway_version),
        };
        merge(&mut device, json!({"sw_version": sw}));
    }
    let mut out = Vec::new();
    let mut push = |component: &str, key: &str, mut body: Value| {
        let unique_id = format!("{node}_{key}");
        merge(
            &mut body,
            json!({
                "unique_id": unique_id,
                "object_id": unique_id,
                "has_entity_name": true,
                "device": device.clone(),
                "origin": origin(),
            }),
        );
        out.push(Config {
            topic: format!("{}/{component}/{node}/{key}/config", cfg.discovery_prefix),
            payload: body.to_string().into_bytes(),
        });
    };
    for e in printer_entities() {
        let mut body = e.body;
        merge(
            &mut body,
            json!({
                "state_topic": state_topic,
                "availability": [availability(status_topic.clone())],
            }),
        );
        if body.get("json_attributes_template").is_some() {
            merge(&mut body, json!({"json_attributes_topic": state_topic}));
        }
        push(e.component, e.key, body);
    }
    let press_topic = topics.format(&Topic::HaPress(printer.clone()));
    for a in PressAction::ALL {
        // A press goes through the supervisor: the button needs it and the printer online.
        push(
            "button",
            a.as_str(),
            json!({
                "name": a.label(),
                "icon": a.icon(),
                "command_topic": press_topic,
                "payload_press": a.as_str(),
                "qos": 0,
                "retain": false,
                "availability_mode": "all",
                "availability": [
                    availability(status_topic.clone()),
                    availability(supervisor_topic.clone()),
                ],
            }),
        );
    }
    out
}

/// The discovery configs of the fleet device: queue length, jobs printing, supervisor online.
pub fn fleet_configs(cfg: &HaConfig, topics: &Topics) -> Vec<Config> {
    let node = fleet_device_id(topics);
    let queue = topics.format(&Topic::Queue);
    let supervisor = topics.format(&Topic::SupervisorStatus);
    let device = json!({
        "identifiers": [node],
        "name": "printloop fleet",
        "manufacturer": "printloop",
        "model": "supervisor",
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    let counted = |key: &str, name: &str, count: &str, icon: &str| {
        (
            "sensor",
            key.to_owned(),
            json!({
                "name": name,
                "state_topic": queue,
                "value_template": format!("{{{{ value_json.counts.{count} }}}}"),
                "unit_of_measurement": "jobs",
                "state_class": "measurement",
                "icon": icon,
                "availability": [availability(supervisor.clone())],
            }),
        )
    };
    let entities = [
        counted("queue_length", "Queue length", "queued", "mdi:tray-full"),
        counted(
            "jobs_printing",
            "Jobs printing",
            "printing",
            "mdi:printer-3d-nozzle",
        ),
        (
            "binary_sensor",
            "supervisor_online".to_owned(),
            json!({
                "name": "Supervisor online",
                "device_class": "connectivity",
                "state_topic": supervisor,
                "value_template": "{{ 'ON' if value_json.presence == 'online' else 'OFF' }}",
            }),
        ),
    ];
    entities
        .into_iter()
        .map(|(component, key, mut body)| {
            let unique_id = format!("{node}_{key}");
            merge(
                &mut body,
                json!({
                    "unique_id": unique_id,
                    "object_id": unique_id,
                    "has_entity_name": true,
                    "device": device.clone(),
                    "origin": origin(),
                }),
            );
            Config {
                topic: format!("{}/{component}/{node}/{key}/config", cfg.discovery_prefix),
                payload: body.to_string().into_bytes(),
            }
        })
        .collect()
}

/// A fast, deterministic jitter in `0..=max` from a seed (the machine reads no clock and has
/// no random source; the shell's times make a good enough seed).
pub fn jitter(seed: u64, max: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    // splitmix64
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z % (max + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::presence::Firmware;
    use protocol::state::{
        Heater, JobProgress, JobStage, PrinterPhase, StateSnapshot, Temperatures,
    };
    use protocol::{JobId, Payload as _, Sha256Hex, Version};

    fn p(s: &str) -> PrinterId {
        PrinterId::new(s).expect("valid id")
    }

    fn parse(c: &Config) -> Value {
        serde_json::from_slice(&c.payload).expect("config is JSON")
    }

    fn meta() -> Meta {
        Meta {
            v: Version,
            printer_id: p("p0"),
            epoch: 3,
            name: "MK3S left".into(),
            model: "Prusa MK3S".into(),
            firmware: Some(Firmware {
                name: "Marlin 2.1.2.1".into(),
                ..Firmware::default()
            }),
            build_volume: None,
            tags: vec![],
            gateway_version: "0.1.0".into(),
        }
    }

    /// A snapshot with every optional field the templates may read filled in.
    fn full_state() -> Value {
        let s = StateSnapshot {
            v: Version,
            epoch: 1,
            seq: 2,
            at_ms: 3,
            heartbeat_s: 10,
            phase: PrinterPhase::Error,
            bed_clear: false,
            maintenance: false,
            job: Some(JobProgress {
                job_id: JobId::new("j-1").expect("id"),
                file_sha256: Sha256Hex::digest(b"x"),
                name: "cube.gcode".into(),
                stage: JobStage::Printing,
                line: 1,
                total_lines: 2,
                progress_pct: 50.0,
                remaining_s: Some(60),
                transferred_bytes: None,
                size_bytes: 10,
                started_at_ms: None,
                ended_at_ms: None,
                reason: None,
            }),
            temps: Some(Temperatures {
                nozzle: Heater {
                    actual: 200.0,
                    target: 215.0,
                },
                bed: Heater {
                    actual: 59.0,
                    target: 60.0,
                },
            }),
            last_command: None,
            recent_jobs: vec![],
            error: Some("thermal runaway".into()),
        };
        serde_json::from_slice(&s.encode()).expect("state is JSON")
    }

    /// Every `value_json.a.b` path in `template`.
    fn paths(template: &str) -> Vec<Vec<String>> {
        template
            .match_indices("value_json")
            .map(|(i, _)| {
                template[i + "value_json".len()..]
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
                    .next()
                    .unwrap_or("")
                    .split('.')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .collect()
    }

    fn resolves(doc: &Value, path: &[String]) -> bool {
        let mut v = doc;
        for key in path {
            match v.get(key) {
                Some(next) => v = next,
                None => return false,
            }
        }
        true
    }

    #[test]
    fn printer_configs_share_one_device_with_stable_unique_ids() {
        let cfg = HaConfig::default();
        let topics = Topics::default();
        let configs = printer_configs(&cfg, &topics, &p("p0"), Some(&meta()));
        assert_eq!(configs.len(), 13, "9 sensors/binary sensors + 4 buttons");
        let topics_listed = printer_config_topics(&cfg, &topics, &p("p0"));
        assert_eq!(
            configs.iter().map(|c| c.topic.clone()).collect::<Vec<_>>(),
            topics_listed,
            "the removal list covers exactly what is published"
        );
        let mut unique = std::collections::BTreeSet::new();
        for c in &configs {
            let v = parse(c);
            let uid = v["unique_id"].as_str().expect("unique_id").to_owned();
            assert!(uid.starts_with("printloop_p0_"), "{uid}");
            assert!(unique.insert(uid.clone()), "duplicate unique id {uid}");
            assert_eq!(v["object_id"], Value::String(uid.clone()));
            assert_eq!(v["device"]["identifiers"], json!(["printloop_p0"]));
            assert_eq!(v["device"]["name"], "MK3S left");
            assert_eq!(v["device"]["via_device"], "printloop__fleet");
            // <prefix>/<component>/<node_id>/<object_id>/config, as HA 2024.3 matches it.
            let parts: Vec<&str> = c.topic.split('/').collect();
            assert_eq!(parts.len(), 5, "{}", c.topic);
            assert_eq!(parts[0], "homeassistant");
            assert!(["sensor", "binary_sensor", "button"].contains(&parts[1]));
            assert_eq!(parts[2], "printloop_p0");
            assert_eq!(parts[4], "config");
            assert_eq!(uid, format!("printloop_p0_{}", parts[3]));
        }
        // Stable: the same inputs give byte-identical configs, and the unique ids do not
        // depend on meta (a renamed printer keeps its entities).
        assert_eq!(
            configs,
            printer_configs(&cfg, &topics, &p("p0"), Some(&meta()))
        );
        let bare = printer_configs(&cfg, &topics, &p("p0"), None);
        let ids = |cs: &[Config]| -> Vec<Value> {
            cs.iter().map(|c| parse(c)["unique_id"].clone()).collect()
        };
        assert_eq!(ids(&configs), ids(&bare));
        assert_eq!(parse(&bare[0])["device"]["name"], "p0");
    }

    #[test]
    fn availability_is_the_printer_status_and_buttons_need_the_supervisor_too() {
        let configs = printer_configs(&HaConfig::default(), &Topics::default(), &p("p7"), None);
        for c in &configs {
            let v = parse(c);
            let avail = v["availability"].as_array().expect("availability list");
            assert_eq!(avail[0]["topic"], "printloop/v1/printers/p7/status");
            assert_eq!(avail[0]["value_template"], "{{ value_json.presence }}");
            assert_eq!(avail[0]["payload_available"], "online");
            assert_eq!(avail[0]["payload_not_available"], "offline");
            if c.topic.contains("/button/") {
                assert_eq!(avail[1]["topic"], "printloop/v1/supervisor/status");
                assert_eq!(v["availability_mode"], "all");
                assert_eq!(v["command_topic"], "printloop/v1/ha/printers/p7/press");
                let press = v["payload_press"].as_str().expect("payload");
                assert!(PressAction::parse(press.as_bytes()).is_ok());
                assert_eq!(v["qos"], 0);
            } else {
                assert_eq!(avail.len(), 1);
                assert_eq!(v["state_topic"], "printloop/v1/printers/p7/state");
            }
        }
    }

    #[test]
    fn templates_read_fields_the_state_and_status_really_have() {
        let state = full_state();
        let status: Value =
            serde_json::from_slice(&protocol::presence::Status::online(1, 2).encode())
                .expect("status JSON");
        let queue: Value = serde_json::from_slice(
            &protocol::api::QueueSnapshot {
                v: Version,
                epoch: 1,
                seq: 1,
                at_ms: 1,
                counts: Default::default(),
                jobs: vec![],
                truncated: false,
            }
            .encode(),
        )
        .expect("queue JSON");
        let topics = Topics::default();
        let cfg = HaConfig::default();
        let mut all = printer_configs(&cfg, &topics, &p("p0"), None);
        all.extend(fleet_configs(&cfg, &topics));
        let mut checked = 0;
        for c in &all {
            let v = parse(c);
            let doc_for = |topic: &Value| -> &Value {
                match topic.as_str().unwrap_or("") {
                    t if t.ends_with("/state") => &state,
                    t if t.ends_with("/queue") => &queue,
                    _ => &status,
                }
            };
            let mut templates = vec![];
            for (tpl, topic) in [
                ("value_template", "state_topic"),
                ("json_attributes_template", "json_attributes_topic"),
            ] {
                if let Some(t) = v.get(tpl).and_then(Value::as_str) {
                    templates.push((t.to_owned(), doc_for(&v[topic])));
                }
            }
            for a in v["availability"].as_array().into_iter().flatten() {
                let t = a["value_template"].as_str().expect("template").to_owned();
                templates.push((t, &status));
            }
            for (t, doc) in templates {
                for path in paths(&t) {
                    assert!(
                        !path.is_empty() && resolves(doc, &path),
                        "{}: template {t:?} reads value_json.{} which the payload lacks",
                        c.topic,
                        path.join(".")
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 25, "only {checked} paths checked");
        // The checker itself catches a wrong field name.
        assert!(!resolves(
            &state,
            &paths("{{ value_json.temps.hotend.actual }}")[0]
        ));
        assert!(resolves(
            &state,
            &paths("{{ value_json.temps.nozzle.target }}")[0]
        ));
    }

    #[test]
    fn fleet_device_and_other_roots_and_prefixes() {
        let cfg = HaConfig {
            discovery_prefix: "ha/disc".into(),
            ..HaConfig::default()
        };
        let topics = Topics::new("farm-a/printloop/v1").expect("root");
        let fleet = fleet_configs(&cfg, &topics);
        let names: Vec<&str> = fleet.iter().map(|c| c.topic.as_str()).collect();
        assert_eq!(
            names,
            [
                "ha/disc/sensor/printloop_farm-a_printloop_v1__fleet/queue_length/config",
                "ha/disc/sensor/printloop_farm-a_printloop_v1__fleet/jobs_printing/config",
                "ha/disc/binary_sensor/printloop_farm-a_printloop_v1__fleet/supervisor_online/config",
            ]
        );
        let q = parse(&fleet[0]);
        assert_eq!(q["state_topic"], "farm-a/printloop/v1/queue");
        assert_eq!(q["value_template"], "{{ value_json.counts.queued }}");
        assert_eq!(
            q["unique_id"],
            "printloop_farm-a_printloop_v1__fleet_queue_length"
        );
        let online = parse(&fleet[2]);
        assert!(online.get("availability").is_none(), "it must show offline");
        let printer = printer_configs(&cfg, &topics, &p("p0"), None);
        assert!(printer[0]
            .topic
            .starts_with("ha/disc/sensor/printloop_farm-a_printloop_v1_p0/"));
        assert_eq!(ha_status_topic(&cfg), "ha/disc/status");
    }

    #[test]
    fn press_payloads_and_prefixes_are_validated() {
        assert_eq!(PressAction::parse(b"pause"), Ok(PressAction::Pause));
        assert_eq!(
            PressAction::parse(b" bed_cleared\n"),
            Ok(PressAction::BedCleared)
        );
        for bad in [&b""[..], b"PAUSE", b"launch", b"\xff\xfe", &[b'a'; 33]] {
            assert!(PressAction::parse(bad).is_err(), "{bad:?}");
        }
        assert!(validate_prefix("homeassistant").is_ok());
        assert!(validate_prefix("a/b").is_ok());
        for bad in ["", "/a", "a/", "a//b", "a/#", "+", "$SYS"] {
            assert!(validate_prefix(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn jitter_stays_in_bounds_and_varies() {
        let values: std::collections::BTreeSet<u64> = (0..200).map(|s| jitter(s, 5_000)).collect();
        assert!(values.iter().all(|&v| v <= 5_000));
        assert!(values.len() > 150, "jitter barely varies: {}", values.len());
        assert_eq!(jitter(42, 0), 0);
    }
}
