//! Presence (`printers/<id>/status`, `supervisor/status`) and what a printer is (`meta`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::codec::{Payload, Version};
use crate::ids::PrinterId;

/// Online or offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    /// The writer is connected (its birth).
    Online,
    /// The writer is gone: its last will, or a clean goodbye.
    Offline,
}

/// Birth and death of a gateway or of the supervisor. Retained, QoS 1.
///
/// The writer increments `epoch` (kept durably) on every connect; its will carries the same
/// epoch as its birth. A reader ignores an `offline` whose epoch is older than the latest
/// `online` it has seen: that is a late will of a previous connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// Protocol version.
    pub v: Version,
    /// Online or offline.
    pub presence: Presence,
    /// The writer's connection epoch (+1 on every connect, durable).
    pub epoch: u64,
    /// When the writer built this message (Unix ms). For a will: when it connected.
    pub at_ms: u64,
    /// Why it went offline, when it says so itself ("shutdown"); absent in a will.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Payload for Status {
    const SCHEMA: &'static str = "status";
}

impl Status {
    /// A birth.
    pub fn online(epoch: u64, at_ms: u64) -> Self {
        Self {
            v: Version,
            presence: Presence::Online,
            epoch,
            at_ms,
            reason: None,
        }
    }

    /// A will, or a goodbye with a reason.
    pub fn offline(epoch: u64, at_ms: u64, reason: Option<String>) -> Self {
        Self {
            v: Version,
            presence: Presence::Offline,
            epoch,
            at_ms,
            reason,
        }
    }
}

/// The firmware a printer runs, from M115.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Firmware {
    /// `FIRMWARE_NAME` as reported, e.g. "Marlin 2.1.2.1".
    pub name: String,
    /// `PROTOCOL_VERSION` as reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    /// `MACHINE_TYPE` as reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_type: Option<String>,
    /// Enabled capabilities (`Cap:NAME:1` lines), sorted.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// A build volume in millimetres.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildVolume {
    /// X in mm.
    pub x_mm: f64,
    /// Y in mm.
    pub y_mm: f64,
    /// Z in mm.
    pub z_mm: f64,
}

/// What a printer is. Retained, QoS 1; published at every birth, before `state` and `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// Protocol version.
    pub v: Version,
    /// The printer's id (equals the topic level).
    pub printer_id: PrinterId,
    /// The gateway's epoch when this was published.
    pub epoch: u64,
    /// Human-readable name, e.g. "MK3S left".
    pub name: String,
    /// Printer model, e.g. "Prusa MK3S".
    pub model: String,
    /// Firmware as reported by M115; absent until the printer has answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    /// Build volume, if configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_volume: Option<BuildVolume>,
    /// Operator tags that jobs can require (e.g. "petg", "0.6mm").
    #[serde(default)]
    pub tags: Vec<String>,
    /// The gateway's software version.
    pub gateway_version: String,
}

impl Payload for Meta {
    const SCHEMA: &'static str = "meta";
}
