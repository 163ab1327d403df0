//! Just enough G-code parsing for the simulator: the command word and its letter parameters.

/// One command such as `G1 X5 Y-2.5 F1800`, `M117 Hello`, `T0`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Command<'a> {
    /// `G`, `M`, `T` (upper case).
    pub letter: char,
    /// The number after the letter (`1` for `G1`), `None` for a bare letter.
    pub code: Option<u32>,
    /// Everything after the command word, trimmed (for M117/M118 strings).
    pub rest: &'a str,
}

impl<'a> Command<'a> {
    /// Splits the command word off; `None` for an empty line or one not starting with a letter.
    pub fn parse(text: &'a str) -> Option<Command<'a>> {
        let text = text.trim();
        let mut chars = text.char_indices();
        let (_, letter) = chars.next()?;
        if !letter.is_ascii_alphabetic() {
            return None;
        }
        let after = &text[letter.len_utf8()..];
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        // A sub-code such as `M862.3` belongs to the word, not to the parameters.
        let mut word_end = digits;
        if after[digits..].starts_with('.') {
            let sub = &after[digits + 1..];
            word_end += 1 + sub.len() - sub.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        }
        let code = after[..digits].parse().ok();
        Some(Command {
            letter: letter.to_ascii_uppercase(),
            code,
            rest: after[word_end..].trim(),
        })
    }

    /// `G1`, `M73`: the letter and number, for messages.
    pub fn is(&self, letter: char, code: u32) -> bool {
        self.letter == letter && self.code == Some(code)
    }

    /// The value of parameter `p` (`X5` → 5.0); `None` if absent or without a number.
    pub fn param(&self, p: char) -> Option<f64> {
        self.params().find(|(l, _)| *l == p).and_then(|(_, v)| v)
    }

    /// Whether parameter `p` is present (with or without a value).
    pub fn has(&self, p: char) -> bool {
        self.params().any(|(l, _)| l == p)
    }

    /// `(letter, value)` for every parameter, in order.
    pub fn params(&self) -> impl Iterator<Item = (char, Option<f64>)> + '_ {
        let bytes = self.rest.as_bytes();
        let mut i = 0;
        std::iter::from_fn(move || {
            while i < bytes.len() {
                let c = bytes[i] as char;
                i += 1;
                if !c.is_ascii_alphabetic() {
                    continue;
                }
                let start = i;
                while i < bytes.len() && matches!(bytes[i], b'0'..=b'9' | b'.' | b'-' | b'+') {
                    i += 1;
                }
                let value = self.rest.get(start..i).and_then(|s| s.parse::<f64>().ok());
                return Some((c.to_ascii_uppercase(), value.filter(|v| v.is_finite())));
            }
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_words_and_params() {
        let c = Command::parse("G1 X94.915 Y-95.7 E.5 F7800").expect("cmd");
        assert!(c.is('G', 1));
        assert_eq!(c.param('X'), Some(94.915));
        assert_eq!(c.param('Y'), Some(-95.7));
        assert_eq!(c.param('E'), Some(0.5));
        assert_eq!(c.param('F'), Some(7800.0));
        assert_eq!(c.param('Z'), None);
        let c = Command::parse("G1X5Y6").expect("cmd");
        assert_eq!((c.param('X'), c.param('Y')), (Some(5.0), Some(6.0)));
        let c = Command::parse("M862.3 P \"MK3\"").expect("cmd");
        assert!(c.is('M', 862));
        assert!(c.has('P'));
        let c = Command::parse("T0").expect("cmd");
        assert!(c.is('T', 0));
        assert_eq!(Command::parse(""), None);
        assert_eq!(Command::parse("*12"), None);
        let c = Command::parse("M117 Hello world").expect("cmd");
        assert_eq!(c.rest, "Hello world");
        let c = Command::parse("G28").expect("cmd");
        assert_eq!(c.params().count(), 0);
        assert_eq!(Command::parse("G1 X--").and_then(|c| c.param('X')), None);
    }
}
