//! G-code dispatch: `execute` runs the head command of the queue once its CPU time is up and
//! says whether it is done (`ok`), printed its own answer (M105) or must wait. Stateless handlers
//! (M115, M118, unknown commands) live here; moves in `motion`, heater waits in `temperature`.
use std::time::Duration;

use super::{AfterSync, Firmware, Next, Wait, FIRMWARE_VERSION};
use crate::e_parser::EmergencyCommand;
use crate::gcode::Command;

impl Firmware {
    pub(super) fn execute(&mut self) -> Next {
        let Some(text) = self.ring.front().map(|q| q.text.clone()) else {
            return Next::NoOk;
        };
        if text.is_empty() {
            return Next::Ok;
        }
        let Some(cmd) = Command::parse(&text) else {
            return self.unknown(&text);
        };
        let now = self.now;
        let f = self.motion_factor;
        match (cmd.letter, cmd.code) {
            ('G', Some(0 | 1)) => self.linear_move(&cmd),
            ('G', Some(2 | 3)) => self.arc_move(&cmd),
            ('G', Some(4)) => {
                let secs = cmd.param('S').unwrap_or(0.0) + cmd.param('P').unwrap_or(0.0) / 1000.0;
                let d = Duration::from_secs_f64((secs.max(0.0) / f).min(1e6));
                Next::Wait(Wait::Sync(AfterSync::Dwell(d)))
            }
            ('G', Some(20 | 21)) => Next::Ok,
            ('G', Some(28)) => Next::Wait(Wait::Sync(AfterSync::Home(self.home(&cmd)))),
            ('G', Some(90)) => {
                self.relative = false;
                self.relative_e = false;
                Next::Ok
            }
            ('G', Some(91)) => {
                self.relative = true;
                self.relative_e = true;
                Next::Ok
            }
            ('G', Some(92)) => {
                let mut any = false;
                for (i, axis) in ['X', 'Y', 'Z', 'E'].into_iter().enumerate() {
                    if let Some(v) = cmd.param(axis) {
                        self.position[i] = v;
                        any = true;
                    }
                }
                if !any {
                    self.position = [0.0; 4];
                }
                Next::Ok
            }
            ('M', Some(17 | 18 | 84)) => {
                if cmd.params().next().is_some() {
                    Next::Ok
                } else {
                    Next::Wait(Wait::Sync(AfterSync::Ok))
                }
            }
            ('M', Some(27)) => {
                self.emit("Not SD printing");
                Next::Ok
            }
            ('M', Some(31)) => {
                self.emit("echo:Print time: 0s");
                Next::Ok
            }
            ('M', Some(73)) => {
                if let Some(p) = cmd.param('P') {
                    self.stats.progress.percent = Some(p.clamp(0.0, 100.0) as u32);
                }
                if let Some(r) = cmd.param('R') {
                    self.stats.progress.remaining_minutes = Some(r.max(0.0) as u32);
                }
                Next::Ok
            }
            ('M', Some(82)) => {
                self.relative_e = false;
                Next::Ok
            }
            ('M', Some(83)) => {
                self.relative_e = true;
                Next::Ok
            }
            ('M', Some(104 | 140)) => {
                if let Some(s) = cmd.param('S') {
                    let heater = if cmd.is('M', 140) {
                        &mut self.bed
                    } else {
                        &mut self.hotend
                    };
                    heater.set_target(now, f, s);
                }
                Next::Ok
            }
            ('M', Some(105)) => {
                let line = format!("ok {}", self.temps_text());
                self.emit(&line);
                Next::NoOk
            }
            ('M', Some(106)) => {
                self.fan = cmd.param('S').unwrap_or(255.0).clamp(0.0, 255.0) as u32;
                Next::Ok
            }
            ('M', Some(107)) => {
                self.fan = 0;
                Next::Ok
            }
            ('M', Some(109 | 190)) => self.wait_heater(&cmd),
            ('M', Some(110)) => {
                if let Some(n) = cmd.param('N') {
                    self.last_n = n as i64;
                }
                Next::Ok
            }
            ('M', Some(114)) => {
                let [x, y, z, e] = self.position;
                self.emit(&format!(
                    "X:{x:.2} Y:{y:.2} Z:{z:.2} E:{e:.2} Count X:{} Y:{} Z:{}",
                    (x * 80.0).round() as i64,
                    (y * 80.0).round() as i64,
                    (z * 400.0).round() as i64
                ));
                Next::Ok
            }
            ('M', Some(115)) => {
                self.m115();
                Next::Ok
            }
            ('M', Some(118)) => {
                self.m118(cmd.rest);
                Next::Ok
            }
            ('M', Some(155)) => {
                let secs = cmd.param('S').unwrap_or(0.0).clamp(0.0, 60.0);
                self.autoreport = (secs >= 1.0).then(|| {
                    let interval = Duration::from_secs(secs as u64);
                    (interval, now + interval)
                });
                Next::Ok
            }
            ('M', Some(220)) => {
                if let Some(s) = cmd.param('S') {
                    self.feed_percent = s.clamp(10.0, 999.0);
                }
                Next::Ok
            }
            ('M', Some(400)) => Next::Wait(Wait::Sync(AfterSync::Ok)),
            ('M', Some(500)) => {
                self.emit("echo:Settings Stored (662 bytes; crc 31585)");
                Next::Ok
            }
            ('M', Some(501..=503)) => {
                if cmd.is('M', 503) {
                    self.emit("echo:; Steps per unit:");
                    self.emit("echo: M92 X80.00 Y80.00 Z400.00 E93.00");
                }
                Next::Ok
            }
            // With EMERGENCY_PARSER these three are no-ops here (gcode.cpp `case 108: case 112:
            // case 410: break;`): the parser acted when the line arrived. Without it, M108 has
            // nothing to cancel by the time it runs (lines are read only between commands).
            ('M', Some(108)) => Next::Ok,
            ('M', Some(112)) if !self.cfg.emergency_parser => {
                // A spelling the early check missed (`M0112`): Marlin's M112() kills too.
                self.kill();
                self.log_kill(now, false);
                Next::NoOk
            }
            ('M', Some(410)) if !self.cfg.emergency_parser => {
                // M410(): quickstop_stepper(), whose one-second hold delays this ok.
                let effect = self.quickstop();
                self.log_emergency(now, EmergencyCommand::M410, false, effect);
                Next::Wait(Wait::Sync(AfterSync::Ok))
            }
            ('M', Some(112 | 410)) => Next::Ok,
            ('M', Some(75..=78 | 80 | 81 | 111 | 117 | 119 | 121 | 120 | 201..=209)) => Next::Ok,
            ('M', Some(211 | 221 | 300 | 302 | 412 | 413 | 420 | 851 | 900 | 907 | 999)) => {
                Next::Ok
            }
            ('T', Some(0)) => Next::Ok,
            ('T', Some(n)) => {
                self.emit(&format!("echo:Invalid extruder {n}"));
                Next::Ok
            }
            _ => self.unknown(&text),
        }
    }

    fn unknown(&mut self, text: &str) -> Next {
        self.stats.unknown_commands += 1;
        self.emit(&format!("echo:Unknown command: \"{text}\""));
        Next::Ok
    }

    fn m115(&mut self) {
        let info = format!(
            "FIRMWARE_NAME:{FIRMWARE_VERSION} (printloop-sim) SOURCE_CODE_URL:github.com/MarlinFirmware/Marlin PROTOCOL_VERSION:1.0 MACHINE_TYPE:printloop-sim EXTRUDER_COUNT:1 UUID:{}",
            self.uuid
        );
        self.emit(&info);
        for (cap, on) in [
            ("SERIAL_XON_XOFF", false),
            ("BINARY_FILE_TRANSFER", false),
            ("EEPROM", true),
            ("VOLUMETRIC", true),
            ("AUTOREPORT_POS", false),
            ("AUTOREPORT_TEMP", true),
            ("PROGRESS", true),
            ("PRINT_JOB", true),
            ("AUTOLEVEL", false),
            ("RUNOUT", false),
            ("Z_PROBE", false),
            ("LEVELING_DATA", false),
            ("BUILD_PERCENT", true),
            ("SOFTWARE_POWER", false),
            ("TOGGLE_LIGHTS", false),
            ("CASE_LIGHT_BRIGHTNESS", false),
            ("EMERGENCY_PARSER", self.cfg.emergency_parser),
            ("HOST_ACTION_COMMANDS", true),
            ("PROMPT_SUPPORT", false),
            ("SDCARD", false),
            ("AUTOREPORT_SD_STATUS", false),
            ("THERMAL_PROTECTION", true),
            ("MOTION_MODES", false),
            ("ARCS", true),
            ("BABYSTEPPING", false),
            ("CHAMBER_TEMPERATURE", false),
        ] {
            self.emit(&format!("Cap:{cap}:{}", u8::from(on)));
        }
    }

    /// `M118 [A1] [E1] [Pn] text`: A1 prefixes `//`, E1 prefixes `echo:`.
    fn m118(&mut self, rest: &str) {
        let mut prefix = "";
        let mut text = rest;
        loop {
            let t = text.trim_start();
            let flag = t.get(..2);
            match flag {
                Some("A1") => prefix = "//",
                Some("E1") => prefix = "echo:",
                Some(p) if p.starts_with('P') && p[1..].chars().all(|c| c.is_ascii_digit()) => {}
                _ => break,
            }
            text = &t[2..];
        }
        self.emit(&format!("{prefix}{}", text.trim()));
    }
}
