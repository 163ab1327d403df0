//! The board's serial input: the receive interrupt (RX buffer, overruns, the emergency parser's
//! tap) and Marlin 2.1's `get_serial_commands`. A numbered line is queued only if its `N` follows
//! `last_n` (or it is M110) and its checksum matches; any error empties RX and asks for a resend.
use std::time::Duration;

use protocol::marlin;

use super::{Firmware, MAX_CMD_SIZE};
use crate::e_parser::EmergencyCommand;

/// A command in the command buffer: the line's `N` (if any) and the text without it.
#[derive(Debug, Clone)]
pub(super) struct Queued {
    pub(super) number: Option<u32>,
    pub(super) text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum InputState {
    Normal,
    /// In a `;` comment or past MAX_CMD_SIZE: skip to end of line.
    Eol,
}

enum LineError {
    LineNumber,
    Checksum,
    NoChecksum,
}

impl Firmware {
    /// The serial receive interrupt, for one byte arriving at `at`.
    pub(super) fn on_byte(&mut self, at: Duration, b: u8) {
        self.stats.bytes_in += 1;
        self.stats.first_byte_in_at.get_or_insert(at);
        self.stats.last_byte_in_at = Some(at);
        // The emergency parser sees every byte, whether or not the ring buffer has room for
        // it; not while booting (no firmware yet) or halted (kill() ends with interrupts off).
        let parsed = if self.cfg.emergency_parser && !self.halted && self.booting_until.is_none() {
            self.e_parser.update(b)
        } else {
            None
        };
        if self.hung || self.halted || self.booting_until.is_some() {
            self.stats.bytes_ignored += 1;
        } else if self.rx.len() >= self.cfg.rx_buffer {
            self.stats.rx_overflow_bytes += 1;
        } else {
            self.rx.push_back(b);
        }
        if let Some(cmd) = parsed {
            self.emergency_parsed(at, cmd);
        }
    }

    /// Marlin `get_serial_commands`: move bytes from RX into lines while the queue has room.
    pub(super) fn read_serial(&mut self) {
        while self.ring.len() < self.cfg.bufsize && !self.halted && !self.in_quickstop() {
            let Some(b) = self.rx.pop_front() else {
                return;
            };
            match b {
                b'\n' | b'\r' => {
                    self.input_state = InputState::Normal;
                    if self.line.is_empty() {
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    self.line_done(&line);
                }
                _ if self.input_state == InputState::Eol => {}
                b';' => self.input_state = InputState::Eol,
                0x08 => {
                    self.line.pop();
                }
                _ => {
                    self.line.push(b);
                    if self.line.len() >= MAX_CMD_SIZE - 1 {
                        self.input_state = InputState::Eol;
                    }
                }
            }
        }
    }

    fn line_done(&mut self, line: &[u8]) {
        let start = line.iter().position(|&b| b != b' ').unwrap_or(line.len());
        let cmd = &line[start..];
        let mut number = None;
        let mut text = cmd;
        if cmd.first() == Some(&b'N') {
            let m110 = find(cmd, b"M110").is_some();
            let npos = if m110 {
                cmd.iter()
                    .skip(4)
                    .position(|&b| b == b'N')
                    .map_or(0, |p| p + 4)
            } else {
                0
            };
            let gcode_n = strtol(&cmd[npos + 1..]);
            // Wrapping: `N9223372036854775807` (or an `M110 N` that large) must not panic.
            if gcode_n != self.last_n.wrapping_add(1) && !m110 {
                return self.line_error(LineError::LineNumber);
            }
            let Some(apos) = cmd.iter().rposition(|&b| b == b'*') else {
                return self.line_error(LineError::NoChecksum);
            };
            if strtol(&cmd[apos + 1..]) != i64::from(marlin::checksum(&cmd[..apos])) {
                return self.line_error(LineError::Checksum);
            }
            let own_n = strtol(&cmd[1..]);
            let injected = match self
                .checksum_error_lines
                .iter()
                .position(|&n| i64::from(n) == own_n)
            {
                Some(i) => {
                    self.checksum_error_lines.swap_remove(i);
                    true
                }
                None => self.rng.chance(self.cfg.checksum_error_rate),
            };
            if injected {
                self.stats.injected_checksum_errors += 1;
                return self.line_error(LineError::Checksum);
            }
            self.last_n = gcode_n;
            number = u32::try_from(own_n).ok();
            let digits = cmd[1..]
                .iter()
                .position(|b| !b.is_ascii_digit())
                .map_or(cmd.len(), |p| p + 1);
            text = &cmd[digits..apos];
        } else if let Some(apos) = cmd.iter().rposition(|&b| b == b'*') {
            // Marlin's parser ends a command at `*` even without a line number.
            text = &cmd[..apos];
        }
        let text = String::from_utf8_lossy(text).trim().to_owned();
        if !self.cfg.emergency_parser {
            // Without EMERGENCY_PARSER, Marlin handles these when the line is read (and M410
            // again when it executes). With it, the parser has acted on the bytes already.
            let now = self.now;
            if text == "M112" || text.starts_with("M112 ") {
                self.kill();
                self.log_kill(now, false);
                return;
            }
            if text == "M410" || text.starts_with("M410 ") {
                let effect = self.quickstop();
                self.log_emergency(now, EmergencyCommand::M410, false, effect);
            }
        }
        self.stats.lines_accepted += 1;
        self.ring.push_back(Queued { number, text });
    }

    fn line_error(&mut self, kind: LineError) {
        let msg = match kind {
            LineError::LineNumber => {
                self.stats.line_number_errors += 1;
                "Line Number is not Last Line Number+1"
            }
            LineError::Checksum => {
                self.stats.checksum_errors += 1;
                "checksum mismatch"
            }
            LineError::NoChecksum => {
                self.stats.missing_checksum_errors += 1;
                "No Checksum with line number"
            }
        };
        let last = self.last_n;
        self.emit(&format!("Error:{msg}, Last Line: {last}"));
        // Marlin empties the RX buffer and starts a fresh line.
        self.rx.clear();
        self.line.clear();
        self.input_state = InputState::Normal;
        self.emit(&format!("Resend: {}", last.wrapping_add(1)));
        self.emit("ok");
        self.stats.resends_requested += 1;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// C `strtol(s, NULL, 10)`: leading spaces, optional sign, digits; 0 when there are none.
pub(super) fn strtol(s: &[u8]) -> i64 {
    let mut i = s.iter().take_while(|b| **b == b' ').count();
    let negative = match s.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let mut v: i64 = 0;
    while let Some(d) = s.get(i).filter(|b| b.is_ascii_digit()) {
        v = v.saturating_mul(10).saturating_add(i64::from(d - b'0'));
        i += 1;
    }
    if negative {
        -v
    } else {
        v
    }
}
