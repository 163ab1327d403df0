//! Marlin's `EMERGENCY_PARSER` (`feature/e_parser.h`, 2.1.2): a byte-level state machine that
//! the serial receive interrupt runs on every byte as it arrives — before the byte is stored in
//! the RX ring buffer (so a byte lost to an overflow is still parsed) and whatever the main
//! loop and the command queue are doing. It recognises `M108`, `M112` and `M410`, optionally
//! after a line number, and fires at the end of the line, whatever follows the command word up
//! to there (`N7 M112*38`, `M112 now` and, a Marlin quirk kept here, `M1123` all fire).
//!
//! What firing does is the firmware's business ([`crate::firmware`]); this module only parses.

/// A command the emergency parser recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmergencyCommand {
    /// Cancel a heating wait (`wait_for_heatup = wait_for_user = false`).
    M108,
    /// Emergency stop: `kill()`.
    M112,
    /// Quick stop: drop the planner and stop the steppers.
    M410,
}

impl EmergencyCommand {
    /// `M108`, `M112`, `M410`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::M108 => "M108",
            Self::M112 => "M112",
            Self::M410 => "M410",
        }
    }
}

/// Marlin's `EmergencyParser::State` (the subset without the optional features).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// At the start of a line (spaces and line ends keep it here).
    #[default]
    Reset,
    /// In a line number: digits, `-` and spaces until the `M`.
    N,
    M,
    M1,
    M10,
    M11,
    M4,
    M41,
    /// A whole command word: everything up to the line end is skipped, then it fires.
    Complete(EmergencyCommand),
    /// Not an emergency command: skip to the end of the line.
    Ignore,
}

/// One serial port's parser state (Marlin keeps one per port; the simulator has one port).
#[derive(Debug, Clone, Default)]
pub(crate) struct EmergencyParser {
    state: State,
}

impl EmergencyParser {
    /// Marlin `EmergencyParser::update`: feeds one received byte; returns the command that fires
    /// with it (only ever on a `\n` or `\r`).
    ///
    /// As in Marlin, a line that ends in the middle of a command word (`N5`, `M1`, `M4`) leaves
    /// the parser in its skip state, so the line after it is not parsed at all.
    pub fn update(&mut self, c: u8) -> Option<EmergencyCommand> {
        use EmergencyCommand as C;
        let eol = c == b'\n' || c == b'\r';
        let (next, fired) = match (self.state, c) {
            (State::Reset, b' ' | b'\n' | b'\r') => (State::Reset, None),
            (State::Reset, b'N') => (State::N, None),
            (State::N, b'0'..=b'9' | b'-' | b' ') => (State::N, None),
            (State::Reset | State::N, b'M') => (State::M, None),
            (State::M, b' ') => (State::M, None),
            (State::M, b'1') => (State::M1, None),
            (State::M, b'4') => (State::M4, None),
            (State::M1, b'0') => (State::M10, None),
            (State::M1, b'1') => (State::M11, None),
            (State::M10, b'8') => (State::Complete(C::M108), None),
            (State::M11, b'2') => (State::Complete(C::M112), None),
            (State::M4, b'1') => (State::M41, None),
            (State::M41, b'0') => (State::Complete(C::M410), None),
            (State::Complete(cmd), _) if eol => (State::Reset, Some(cmd)),
            (State::Complete(cmd), _) => (State::Complete(cmd), None),
            (State::Ignore, _) if eol => (State::Reset, None),
            _ => (State::Ignore, None),
        };
        self.state = next;
        fired
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use EmergencyCommand::{M108, M112, M410};

    /// Feeds `input` to a fresh parser; returns what fired, in order.
    fn fired(input: &[u8]) -> Vec<EmergencyCommand> {
        let mut p = EmergencyParser::default();
        input.iter().filter_map(|&c| p.update(c)).collect()
    }

    #[test]
    fn recognises_the_three_commands_in_marlins_forms() {
        let cases: &[(&[u8], &[EmergencyCommand])] = &[
            (b"M112\n", &[M112]),
            (b"M108\r", &[M108]),
            (b"M410\r\n", &[M410]),
            (b"  M112\n", &[M112]),
            (b"N7 M112*38\n", &[M112]),
            (b"N-1 M410*0\n", &[M410]),
            (b"N12M108\n", &[M108]),
            (b"M 112\n", &[M112]),
            (b"M112 S1 ; comment\n", &[M112]),
            // Marlin's quirk: anything after the command word up to the line end.
            (b"M1123\n", &[M112]),
            (b"M4100\n", &[M410]),
            (b"M108\nM112\nM410\n", &[M108, M112, M410]),
            (b"\n\r\nM112\n", &[M112]),
        ];
        for (input, want) in cases {
            assert_eq!(fired(input), *want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn fires_only_at_the_end_of_the_line() {
        let mut p = EmergencyParser::default();
        for &c in b"M112 and more" {
            assert_eq!(p.update(c), None);
        }
        assert_eq!(p.update(b'\r'), Some(M112));
        assert_eq!(p.update(b'\n'), None);
    }

    #[test]
    fn ignores_everything_else() {
        for input in [
            &b"M11\n"[..],
            b"m112\n",
            b"M0112\n",
            b"G1 M112\n",
            b"N5 G1 X1*3\n",
            b"M104 S200\n",
            b"M109 S215\n",
            b"M41\n",
            b"M1\n",
            b"X M112\n",
            b"N1 2 M410x",
        ] {
            assert_eq!(fired(input), [], "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn a_line_ending_inside_a_command_word_hides_the_next_line() {
        // Marlin: EOL in N/M/M1/M4… moves to IGNORE, which only the *next* EOL leaves.
        assert_eq!(fired(b"M1\nM112\nM112\n"), [M112]);
        assert_eq!(fired(b"N5\nM410\n"), []);
        assert_eq!(fired(b"M\nM108\nM108\n"), [M108]);
        // A complete ignored line does not: its own EOL resets.
        assert_eq!(fired(b"G28\nM112\n"), [M112]);
    }
}
