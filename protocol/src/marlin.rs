//! Marlin host-protocol line codec: pure functions, no IO and no clock.
//!
//! Two directions:
//! - host → firmware: [`format_line`] builds `N<n> <cmd>*<checksum>`, [`parse_host_line`]
//!   takes such a line apart (the simulator uses it; a gateway uses it in tests),
//!   [`strip_comment`] drops `;` comments from G-code before it is sent.
//! - firmware → host: [`parse_response`] classifies one line the firmware printed
//!   (`ok`, `Resend:`, `echo:busy:`, temperatures, `Error:`, `start`, `Cap:`, …).
//!
//! Every parser here is total: any input gives a value or a typed error, never a panic.
//! Lines are handled without their terminating `\n` / `\r\n`; trailing line-end characters
//! are tolerated and ignored.

use std::fmt;

/// XOR of every byte, as Marlin computes the checksum of the bytes before `*`.
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |acc, b| acc ^ b)
}

/// Formats a numbered host line `N<n> <cmd>*<checksum>`.
///
/// The result has **no** line terminator: the caller appends `\n` when writing it.
/// `cmd` should already be comment-free and trimmed (see [`strip_comment`]).
pub fn format_line(n: u32, cmd: &str) -> String {
    let body = format!("N{n} {cmd}");
    let cs = checksum(body.as_bytes());
    format!("{body}*{cs}")
}

/// Drops a `;` comment and surrounding whitespace; `None` when nothing is left.
pub fn strip_comment(line: &str) -> Option<&str> {
    let code = match line.find(';') {
        Some(i) => &line[..i],
        None => line,
    };
    let code = code.trim();
    (!code.is_empty()).then_some(code)
}

/// One line from the host, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLine {
    /// The `N` line number, when the line starts with one.
    pub number: Option<u32>,
    /// The command between the line number and the `*` (trimmed), e.g. `G1 X5`.
    pub command: String,
    /// Whether the `*` checksum matches; `None` when the line carries no checksum.
    pub checksum_ok: Option<bool>,
}

/// Why a host line could not be taken apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// Nothing but whitespace.
    #[error("empty line")]
    Empty,
    /// `N` is not followed by a decimal number that fits in `u32`.
    #[error("bad line number {0:?}")]
    BadNumber(String),
    /// A numbered line without `*checksum` (Marlin: `No Checksum with line number`).
    #[error("line {number} has no checksum")]
    MissingChecksum {
        /// The line's number.
        number: u32,
    },
    /// `*` is not followed by a decimal number 0..=255.
    #[error("bad checksum {0:?}")]
    BadChecksum(String),
}

/// Parses `N<n> <cmd>*<cs>` (or a bare command, which Marlin also accepts).
///
/// As Marlin does, the checksum covers every byte from the first non-space character up to
/// the last `*`. A checksum mismatch is not an error: it is reported in
/// [`HostLine::checksum_ok`] so the caller still learns the line number.
pub fn parse_host_line(line: &str) -> Result<HostLine, LineError> {
    let line = line.trim_end_matches(['\r', '\n']).trim_start_matches(' ');
    if line.trim().is_empty() {
        return Err(LineError::Empty);
    }
    let (body, cs) = match line.rfind('*') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    };
    let checksum_ok = match cs {
        Some(text) => {
            let t = text.trim();
            let given: u8 = t
                .parse()
                .map_err(|_| LineError::BadChecksum(text.to_owned()))?;
            Some(given == checksum(body.as_bytes()))
        }
        None => None,
    };
    let (number, command) = match body.strip_prefix('N') {
        Some(rest) => {
            let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            let number: u32 = rest[..digits]
                .parse()
                .map_err(|_| LineError::BadNumber(first_word(rest).to_owned()))?;
            (Some(number), rest[digits..].trim())
        }
        None => (None, body.trim()),
    };
    if let (Some(number), None) = (number, checksum_ok) {
        return Err(LineError::MissingChecksum { number });
    }
    Ok(HostLine {
        number,
        command: command.to_owned(),
        checksum_ok,
    })
}

fn first_word(s: &str) -> &str {
    s.split_whitespace().next().unwrap_or("")
}

/// One temperature sensor: measured value and, when reported, its target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// Measured °C.
    pub actual: f64,
    /// Target °C (`/215.0`), when the firmware printed one.
    pub target: Option<f64>,
}

/// A temperature report (`T:210.3 /215.0 B:59.8 /60.0 @:127 B@:0`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Temps {
    /// Active hotend (`T:`, or `T0:` when only indexed values are printed).
    pub hotend: Option<Reading>,
    /// Heated bed (`B:`).
    pub bed: Option<Reading>,
    /// Hotend heater power, 0..=127 (`@:`).
    pub hotend_power: Option<u32>,
    /// Bed heater power, 0..=127 (`B@:`).
    pub bed_power: Option<u32>,
    /// Any other sensor (`T1:`, `C:`, `P:`, …) in the order printed.
    pub other: Vec<(String, Reading)>,
}

impl Temps {
    /// Parses the temperature tokens of a line; `None` when it holds no reading at all.
    pub fn parse(text: &str) -> Option<Temps> {
        let mut temps = Temps::default();
        // Which reading a following `/target` token belongs to.
        enum Last {
            None,
            Hotend,
            Bed,
            Other,
        }
        let mut last = Last::None;
        let mut any = false;
        for token in text.split_whitespace() {
            if let Some(target) = token.strip_prefix('/') {
                let Ok(target) = target.parse::<f64>() else {
                    continue;
                };
                let slot = match last {
                    Last::Hotend => temps.hotend.as_mut(),
                    Last::Bed => temps.bed.as_mut(),
                    Last::Other => temps.other.last_mut().map(|(_, r)| r),
                    Last::None => None,
                };
                if let Some(r) = slot {
                    r.target = Some(target);
                }
                last = Last::None;
                continue;
            }
            last = Last::None;
            let Some((key, value)) = token.split_once(':') else {
                continue;
            };
            match key {
                "@" => temps.hotend_power = value.parse().ok(),
                "B@" => temps.bed_power = value.parse().ok(),
                "W" => {}
                _ => {
                    // `T:210.3/215.0` (no space) also occurs in some builds.
                    let (actual, target) = match value.split_once('/') {
                        Some((a, t)) => (a, t.parse::<f64>().ok()),
                        None => (value, None),
                    };
                    let Ok(actual) = actual.parse::<f64>() else {
                        continue;
                    };
                    if key.is_empty() || !key.starts_with(|c: char| c.is_ascii_uppercase()) {
                        continue;
                    }
                    let reading = Reading { actual, target };
                    any = true;
                    match key {
                        "T" => {
                            temps.hotend = Some(reading);
                            last = Last::Hotend;
                        }
                        "T0" if temps.hotend.is_none() => {
                            temps.hotend = Some(reading);
                            last = Last::Hotend;
                        }
                        "B" => {
                            temps.bed = Some(reading);
                            last = Last::Bed;
                        }
                        _ => {
                            temps.other.push((key.to_owned(), reading));
                            last = Last::Other;
                        }
                    }
                }
            }
        }
        any.then_some(temps)
    }
}

/// The M115 `FIRMWARE_NAME:` line as `KEY:value` pairs in printed order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareInfo {
    /// `("FIRMWARE_NAME", "Marlin 2.1.2.1 (…)")`, `("UUID", "…")`, …
    pub fields: Vec<(String, String)>,
}

impl FirmwareInfo {
    /// Parses `FIRMWARE_NAME:Marlin 2.1.2.1 SOURCE_CODE_URL:… UUID:…`. Values may hold spaces;
    /// a new field starts at a word that looks like `UPPER_CASE:`.
    pub fn parse(line: &str) -> FirmwareInfo {
        let mut fields: Vec<(String, String)> = Vec::new();
        for word in line.trim().split(' ') {
            let key = word.split_once(':').map(|(k, _)| k).filter(|k| {
                !k.is_empty()
                    && k.starts_with(|c: char| c.is_ascii_uppercase())
                    && k.chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                    && k.len() > 1
            });
            match (key, fields.last_mut()) {
                (Some(k), _) => {
                    let value = &word[k.len() + 1..];
                    fields.push((k.to_owned(), value.to_owned()));
                }
                (None, Some((_, value))) => {
                    value.push(' ');
                    value.push_str(word);
                }
                (None, None) => {}
            }
        }
        FirmwareInfo { fields }
    }

    /// The value of `key`, e.g. `get("UUID")`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `FIRMWARE_NAME`, e.g. `Marlin 2.1.2.1 (printloop-sim)`.
    pub fn name(&self) -> Option<&str> {
        self.get("FIRMWARE_NAME")
    }
}

/// One line printed by the firmware, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// `ok`, `ok N12 P15 B3` (ADVANCED_OK), `ok T:20.0 /0.0 B:…` (answer to M105).
    Ok {
        /// `N` of ADVANCED_OK: the line number of the acknowledged command.
        line: Option<u32>,
        /// `P`: free planner blocks.
        planner_free: Option<u32>,
        /// `B`: free command buffer slots.
        buffer_free: Option<u32>,
        /// Temperatures carried on the ok (M105).
        temps: Option<Temps>,
    },
    /// `Resend: 12`, `rs 12`, `rs N12`: send again from this line number.
    Resend(u32),
    /// `echo:busy: processing` (the text after `busy:`).
    Busy(String),
    /// An auto-report or wait-loop temperature line.
    Temperature(Temps),
    /// `Error:…` or `!!…` (the text after the prefix). See [`is_fatal_error`].
    Error(String),
    /// The `start` banner after a reset.
    Start,
    /// `Cap:AUTOREPORT_TEMP:1` from M115.
    Capability {
        /// `AUTOREPORT_TEMP`.
        name: String,
        /// The flag.
        enabled: bool,
    },
    /// The M115 `FIRMWARE_NAME:` line.
    FirmwareInfo(FirmwareInfo),
    /// A host action, `//action:pause` → `pause`.
    Action(String),
    /// Any other `echo:` line (the text after `echo:`).
    Echo(String),
    /// Anything else, including garbled lines.
    Other(String),
}

impl Response {
    /// True for an `Error:` the firmware does not recover from without a reset.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Response::Error(msg) if is_fatal_error(msg))
    }
}

/// Recognises Marlin's fatal errors (the firmware halts or stops and needs a reset / M999):
/// thermal runaway, heating failed, MINTEMP/MAXTEMP, kill(), `Printer stopped`.
pub fn is_fatal_error(msg: &str) -> bool {
    const FATAL: [&str; 8] = [
        "thermal runaway",
        "thermal malfunction",
        "heating failed",
        "mintemp",
        "maxtemp",
        "printer halted",
        "kill() called",
        "printer stopped",
    ];
    let lower = msg.to_ascii_lowercase();
    FATAL.iter().any(|f| lower.contains(f))
}

/// Classifies one line from the firmware. Never fails: unknown text is [`Response::Other`].
pub fn parse_response(line: &str) -> Response {
    let line = line.trim_end_matches(['\r', '\n']);
    let t = line.trim();
    if t == "ok" {
        return Response::Ok {
            line: None,
            planner_free: None,
            buffer_free: None,
            temps: None,
        };
    }
    if let Some(rest) = t.strip_prefix("ok ") {
        return parse_ok(rest);
    }
    if let Some(rest) = t.strip_prefix("Resend:") {
        return parse_resend(rest)
            .map_or_else(|| Response::Other(line.to_owned()), Response::Resend);
    }
    if let Some(rest) = t.strip_prefix("rs ") {
        return parse_resend(rest)
            .map_or_else(|| Response::Other(line.to_owned()), Response::Resend);
    }
    if let Some(rest) = t.strip_prefix("Error:").or_else(|| t.strip_prefix("!!")) {
        return Response::Error(rest.trim().to_owned());
    }
    if t == "start" {
        return Response::Start;
    }
    if let Some(rest) = t.strip_prefix("echo:") {
        let rest = rest.trim();
        if let Some(busy) = rest.strip_prefix("busy:") {
            return Response::Busy(busy.trim().to_owned());
        }
        return Response::Echo(rest.to_owned());
    }
    if let Some(rest) = t.strip_prefix("//action:") {
        return Response::Action(rest.trim().to_owned());
    }
    if let Some(rest) = t.strip_prefix("Cap:") {
        if let Some((name, flag)) = rest.rsplit_once(':') {
            let enabled = match flag.trim() {
                "1" => Some(true),
                "0" => Some(false),
                _ => None,
            };
            if let (Some(enabled), false) = (enabled, name.is_empty()) {
                return Response::Capability {
                    name: name.to_owned(),
                    enabled,
                };
            }
        }
        return Response::Other(line.to_owned());
    }
    if t.starts_with("FIRMWARE_NAME:") {
        return Response::FirmwareInfo(FirmwareInfo::parse(t));
    }
    if t.starts_with("T:") || t.starts_with("T0:") || t.starts_with("B:") {
        if let Some(temps) = Temps::parse(t) {
            return Response::Temperature(temps);
        }
    }
    Response::Other(line.to_owned())
}

fn parse_ok(rest: &str) -> Response {
    let mut line = None;
    let mut planner_free = None;
    let mut buffer_free = None;
    for token in rest.split_whitespace() {
        let mut chars = token.chars();
        let (Some(key), digits) = (chars.next(), chars.as_str()) else {
            continue;
        };
        let Ok(value) = digits.parse::<u32>() else {
            continue;
        };
        match key {
            'N' => line = Some(value),
            'P' => planner_free = Some(value),
            'B' => buffer_free = Some(value),
            _ => {}
        }
    }
    Response::Ok {
        line,
        planner_free,
        buffer_free,
        temps: Temps::parse(rest),
    }
}

fn parse_resend(rest: &str) -> Option<u32> {
    let rest = rest.trim();
    let rest = rest.strip_prefix('N').unwrap_or(rest).trim();
    rest.parse().ok()
}

impl fmt::Display for Reading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2} /{:.2}", self.actual, self.target.unwrap_or(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn checksum_of_m110_line_matches_marlin_docs() {
        // The canonical example: "N0 M110 N0*125".
        assert_eq!(format_line(0, "M110 N0"), "N0 M110 N0*125");
        assert_eq!(checksum(b""), 0);
        assert_eq!(checksum(b"N1 G28"), b"N1 G28".iter().fold(0, |a, b| a ^ b));
    }

    #[test]
    fn strip_comment_cases() {
        assert_eq!(strip_comment("G28 ; home"), Some("G28"));
        assert_eq!(strip_comment("  G1 X5  "), Some("G1 X5"));
        assert_eq!(strip_comment(";LAYER_CHANGE"), None);
        assert_eq!(strip_comment("   "), None);
        assert_eq!(strip_comment(""), None);
    }

    #[test]
    fn parse_host_line_cases() {
        let ok = parse_host_line("N7 G1 X5*").err();
        assert_eq!(ok, Some(LineError::BadChecksum(String::new())));
        let l = parse_host_line(&format_line(7, "G1 X5")).expect("valid");
        assert_eq!(
            l,
            HostLine {
                number: Some(7),
                command: "G1 X5".into(),
                checksum_ok: Some(true)
            }
        );
        let l = parse_host_line("N7 G1 X5*1\r\n").expect("parses");
        assert_eq!(l.checksum_ok, Some(false));
        assert_eq!(
            parse_host_line("N7 G1 X5"),
            Err(LineError::MissingChecksum { number: 7 })
        );
        assert_eq!(
            parse_host_line("Nx G1*3"),
            Err(LineError::BadNumber("x".into()))
        );
        assert_eq!(
            parse_host_line("N99999999999 G1*3"),
            Err(LineError::BadNumber("99999999999".into()))
        );
        assert_eq!(parse_host_line("  \r\n"), Err(LineError::Empty));
        let bare = parse_host_line("G28").expect("bare");
        assert_eq!((bare.number, bare.checksum_ok), (None, None));
        assert_eq!(bare.command, "G28");
        // Leading spaces are skipped before the checksum, like Marlin.
        let l = parse_host_line(&format!("  {}", format_line(3, "M105"))).expect("ok");
        assert_eq!(l.checksum_ok, Some(true));
        // No space between number and command.
        let body = "N3M105";
        let l = parse_host_line(&format!("{body}*{}", checksum(body.as_bytes()))).expect("ok");
        assert_eq!((l.number, l.command.as_str()), (Some(3), "M105"));
    }

    fn ok(line: Option<u32>, p: Option<u32>, b: Option<u32>) -> Response {
        Response::Ok {
            line,
            planner_free: p,
            buffer_free: b,
            temps: None,
        }
    }

    #[test]
    fn parse_ok_forms() {
        assert_eq!(parse_response("ok"), ok(None, None, None));
        assert_eq!(parse_response("ok\r\n"), ok(None, None, None));
        assert_eq!(
            parse_response("ok N12 P15 B3"),
            ok(Some(12), Some(15), Some(3))
        );
        assert_eq!(parse_response("ok P15 B3"), ok(None, Some(15), Some(3)));
        let Response::Ok { temps, .. } =
            parse_response("ok T:20.00 /0.00 B:21.50 /60.00 @:0 B@:127")
        else {
            panic!("not ok");
        };
        let temps = temps.expect("temps");
        assert_eq!(
            temps.hotend,
            Some(Reading {
                actual: 20.0,
                target: Some(0.0)
            })
        );
        assert_eq!(
            temps.bed,
            Some(Reading {
                actual: 21.5,
                target: Some(60.0)
            })
        );
        assert_eq!((temps.hotend_power, temps.bed_power), (Some(0), Some(127)));
    }

    #[test]
    fn parse_resend_forms() {
        assert_eq!(parse_response("Resend: 12"), Response::Resend(12));
        assert_eq!(parse_response("Resend:12"), Response::Resend(12));
        assert_eq!(parse_response("rs 12"), Response::Resend(12));
        assert_eq!(parse_response("rs N12"), Response::Resend(12));
        assert!(matches!(parse_response("Resend: x"), Response::Other(_)));
    }

    #[test]
    fn parse_other_forms() {
        assert_eq!(
            parse_response("echo:busy: processing"),
            Response::Busy("processing".into())
        );
        let Response::Temperature(t) = parse_response(" T:210.3 /215.0 B:59.8 /60.0 @:127 B@:0")
        else {
            panic!("not temps");
        };
        assert_eq!(t.hotend.map(|r| r.actual), Some(210.3));
        assert_eq!(t.bed.and_then(|r| r.target), Some(60.0));
        let Response::Temperature(t) =
            parse_response("T:25.00 /215.00 B:60.00 /60.00 @:127 B@:0 W:?")
        else {
            panic!("not temps");
        };
        assert_eq!(t.hotend_power, Some(127));
        let Response::Temperature(t) = parse_response("T0:20.0 /0.0 T1:30.0 /0.0 B:20.0 /0.0")
        else {
            panic!("not temps");
        };
        assert_eq!(t.other.len(), 1);
        assert_eq!(t.other[0].0, "T1");
        assert_eq!(parse_response("start"), Response::Start);
        assert_eq!(
            parse_response("Cap:AUTOREPORT_TEMP:1"),
            Response::Capability {
                name: "AUTOREPORT_TEMP".into(),
                enabled: true
            }
        );
        assert!(matches!(parse_response("Cap:X:maybe"), Response::Other(_)));
        assert_eq!(
            parse_response("//action:pause"),
            Response::Action("pause".into())
        );
        assert_eq!(
            parse_response("echo:Unknown command: \"M999\""),
            Response::Echo("Unknown command: \"M999\"".into())
        );
        assert!(matches!(parse_response("T:garbage"), Response::Other(_)));
        assert!(matches!(parse_response("\u{fffd}k N1"), Response::Other(_)));
    }

    #[test]
    fn firmware_info_fields() {
        let Response::FirmwareInfo(info) = parse_response(
            "FIRMWARE_NAME:Marlin 2.1.2.1 (printloop-sim) SOURCE_CODE_URL:github.com/MarlinFirmware/Marlin PROTOCOL_VERSION:1.0 MACHINE_TYPE:printloop-sim EXTRUDER_COUNT:1 UUID:cede2a2f-41a2-4748-9b12-c55c62f367ff",
        ) else {
            panic!("not firmware info");
        };
        assert_eq!(info.name(), Some("Marlin 2.1.2.1 (printloop-sim)"));
        assert_eq!(info.get("EXTRUDER_COUNT"), Some("1"));
        assert_eq!(
            info.get("UUID"),
            Some("cede2a2f-41a2-4748-9b12-c55c62f367ff")
        );
        assert_eq!(info.get("PROTOCOL_VERSION"), Some("1.0"));
    }

    #[test]
    fn fatal_errors() {
        for msg in [
            "Error:Thermal Runaway, system stopped! Heater_ID: 0",
            "Error:Printer halted. kill() called!",
            "Error:MINTEMP triggered, system stopped! Heater_ID: bed",
            "Error: MAXTEMP triggered",
            "Error:Heating failed, system stopped! Heater_ID: 0",
            "!! Printer stopped due to errors",
        ] {
            assert!(parse_response(msg).is_fatal(), "{msg}");
        }
        for msg in [
            "Error:checksum mismatch, Last Line: 3",
            "Error:Line Number is not Last Line Number+1, Last Line: 3",
            "echo:Thermal Runaway", // not an Error line
        ] {
            assert!(!parse_response(msg).is_fatal(), "{msg}");
        }
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in any::<String>()) {
            let _ = parse_response(&s);
            let _ = parse_host_line(&s);
            let _ = strip_comment(&s);
            let _ = FirmwareInfo::parse(&s);
            let _ = Temps::parse(&s);
        }

        #[test]
        fn parsers_never_panic_on_protocol_like_text(s in "[NTBrsokP@:/*;0-9. \\-]{0,40}") {
            let _ = parse_response(&s);
            let _ = parse_host_line(&s);
            let _ = parse_response(&format!("ok {s}"));
        }

        #[test]
        fn format_then_parse_round_trips(n in any::<u32>(), cmd in "[A-Z][0-9]{1,3}( [A-Z][-0-9.]{1,8}){0,4}") {
            let line = format_line(n, &cmd);
            let parsed = parse_host_line(&line).expect("formatted line parses");
            prop_assert_eq!(parsed, HostLine { number: Some(n), command: cmd, checksum_ok: Some(true) });
        }

        #[test]
        fn single_byte_corruption_is_detected(n in 0u32..100_000, cmd in "G1 X[0-9]{1,3}\\.[0-9]{1,3}", pos in any::<prop::sample::Index>(), flip in 1u8..=255) {
            let mut bytes = format_line(n, &cmd).into_bytes();
            let star = bytes.iter().rposition(|&b| b == b'*').expect("has *");
            let i = pos.index(star);
            bytes[i] ^= flip;
            if let Ok(text) = String::from_utf8(bytes) {
                if let Ok(parsed) = parse_host_line(&text) {
                    // Either the number or the checksum must reveal the corruption.
                    prop_assert!(parsed.checksum_ok != Some(true) || parsed.number != Some(n) || parsed.command != cmd);
                }
            }
        }
    }
}
