//! What the link tells the rest of the gateway.
use std::collections::BTreeMap;

use protocol::marlin::{self, Temps};

/// The firmware's identity and capabilities, from `M115`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FirmwareInfo {
    /// The `FIRMWARE_NAME:` line's fields (`FIRMWARE_NAME`, `UUID`, `MACHINE_TYPE`, …).
    pub fields: Vec<(String, String)>,
    /// Every `Cap:NAME:0|1` line.
    pub capabilities: BTreeMap<String, bool>,
    /// Whether the firmware answers with `ok N<line> P<planner> B<buffer>` (seen on the wire,
    /// not announced by M115).
    pub advanced_ok: bool,
}

impl FirmwareInfo {
    /// `FIRMWARE_NAME`, e.g. `Marlin 2.1.2.1 (printloop-sim)`.
    pub fn name(&self) -> Option<&str> {
        self.get("FIRMWARE_NAME")
    }

    /// One field of the `FIRMWARE_NAME:` line, e.g. `get("UUID")`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether `Cap:<name>:1` was reported.
    pub fn has(&self, capability: &str) -> bool {
        self.capabilities.get(capability).copied().unwrap_or(false)
    }

    pub(crate) fn absorb(&mut self, info: marlin::FirmwareInfo) {
        self.fields = info.fields;
    }
}

/// Which timer ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    /// Nothing at all came back from the printer, probes included: the link is dead or the
    /// firmware hangs.
    Silent,
    /// Bytes still arrive (temperature reports) but no line was acknowledged, probes
    /// included.
    NoAck,
    /// The handshake (`M110`, `M115`) was not answered.
    Handshake,
}

/// Something the rest of the gateway may want to know. Produced by
/// [`Link::poll_event`](super::Link::poll_event); `Disconnected` only by the serial shell.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkEvent {
    /// Handshake done: the link streams from now on.
    Ready {
        /// What `M115` said.
        firmware: FirmwareInfo,
    },
    /// The print line with this sequence number (1 = the first line ever
    /// [submitted](super::Link::submit), as `submit` returned it) was acknowledged by the
    /// firmware. Lines are acknowledged in order, so it also says that every earlier line
    /// still queued at the time was acknowledged.
    Acked {
        /// The line's sequence number.
        seq: u64,
    },
    /// A temperature report (auto-report, `M105`'s `ok T:`, or a heating wait line).
    Temperatures(Temps),
    /// `//action:<text>` host action (pause, resume, cancel, …).
    Action(String),
    /// An `echo:` or other informational line.
    Message(String),
    /// A non-fatal `Error:` line that is not part of line-number/checksum handling.
    FirmwareError {
        /// Text after `Error:`.
        message: String,
    },
    /// The firmware halted (thermal runaway, MINTEMP/MAXTEMP, `kill()`): it needs a reset.
    /// Streaming stops; queued lines stay until [`Link::clear`](super::Link::clear).
    Fatal {
        /// Text after `Error:`.
        message: String,
    },
    /// The firmware printed `start` after the handshake: it reset, and whatever it was doing
    /// is lost. Queued print lines are dropped; the link handshakes again.
    Reset {
        /// Print lines that were queued or in flight and will never be sent.
        dropped: u64,
    },
    /// The printer stopped answering (see [`TimeoutKind`]). Streaming stops until the port
    /// is opened again.
    Timeout {
        /// Which timer.
        kind: TimeoutKind,
    },
    /// The host protocol cannot go on (a `Resend:` for a line no longer kept). Streaming stops
    /// until the port is opened again.
    LinkError {
        /// What happened.
        message: String,
    },
    /// A line that is not valid text or not printable: counted and dropped.
    Garbage {
        /// The line, lossily decoded and shortened.
        line: String,
    },
    /// The port went away (read error, EOF, unplugged). Produced by the serial shell.
    Disconnected {
        /// Why.
        reason: String,
    },
}

impl LinkEvent {
    /// Events that may be replaced by a newer one of the same kind when the consumer is slow.
    pub fn is_coalescable(&self) -> bool {
        matches!(
            self,
            LinkEvent::Temperatures(_) | LinkEvent::Acked { .. } | LinkEvent::Message(_)
        )
    }
}
