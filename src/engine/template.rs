//! Where a task's virtual tokens sit relative to the input text.
//!
//! Syntax (whitespace-separated): `[P:n]` is n virtual tokens, `{text}` is
//! the first text with the model's leading special token(s) and its closing
//! separator (BERT: `[CLS] text [SEP]`), `{text_pair}` is the second text
//! with its separator(s). Examples:
//!
//! * `[P:20] {text}`: Prompt Tuning / PEFT placement (the default).
//! * `[P:3] {text} [P:3]`: P-Tuning v1 style, prompts on both sides.
//! * `[P:2] {text} [P:2] {text_pair} [P:2]`: prompts between the two texts.
//!
//! Rules: `{text}` exactly once; `{text_pair}` at most once and after
//! `{text}`; when a pair comes in and the template has no `{text_pair}`, the
//! second text follows the first. Virtual tokens take the prompt's rows in
//! order, token type 0, and position ids in sequence order like any token.

use std::fmt;

/// Largest `n` in one `[P:n]` slot: far above any model's position table,
/// and small enough that sums of slots never overflow.
pub const MAX_SLOT: usize = 65_536;

/// One piece of a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// This many virtual tokens, taken in order from the prompt matrix.
    Virtual(usize),
    /// The first text with its special tokens.
    Text,
    /// The second text of a pair with its separator(s).
    Pair,
}

/// A parsed placement template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    segments: Vec<Segment>,
}

impl Template {
    /// `[P:n] {text}`: virtual tokens before the input, as PEFT does.
    pub fn prefix(n: usize) -> Self {
        let mut segments = Vec::with_capacity(2);
        if n > 0 {
            segments.push(Segment::Virtual(n));
        }
        segments.push(Segment::Text);
        Template { segments }
    }

    /// Parses the syntax described in the module docs.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut segments = Vec::new();
        let (mut text, mut pair) = (0, 0);
        for word in s.split_whitespace() {
            match word {
                "{text}" => {
                    text += 1;
                    segments.push(Segment::Text);
                }
                "{text_pair}" => {
                    if text == 0 {
                        return Err(format!(
                            "template {s:?}: {{text_pair}} must come after {{text}}"
                        ));
                    }
                    pair += 1;
                    segments.push(Segment::Pair);
                }
                w => {
                    let n = w
                        .strip_prefix("[P:")
                        .and_then(|r| r.strip_suffix(']'))
                        .and_then(|n| n.parse::<usize>().ok())
                        .filter(|&n| (1..=MAX_SLOT).contains(&n))
                        .ok_or_else(|| {
                            format!(
                                "template {s:?}: expected `[P:n]` (1 ≤ n ≤ {MAX_SLOT}), `{{text}}` or `{{text_pair}}`, found {w:?}"
                            )
                        })?;
                    segments.push(Segment::Virtual(n));
                }
            }
        }
        if text != 1 {
            return Err(format!(
                "template {s:?}: expected {{text}} exactly once, found it {text} times"
            ));
        }
        if pair > 1 {
            return Err(format!(
                "template {s:?}: expected {{text_pair}} at most once, found it {pair} times"
            ));
        }
        Ok(Template { segments })
    }

    /// The pieces in order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Total virtual tokens; must equal the prompt's row count.
    pub fn num_virtual(&self) -> usize {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Virtual(n) => *n,
                _ => 0,
            })
            .sum()
    }

    /// True for the plain PEFT placement (all virtual tokens first).
    pub fn is_prefix(&self) -> bool {
        matches!(
            self.segments.as_slice(),
            [Segment::Text] | [Segment::Virtual(_), Segment::Text]
        )
    }

    /// Whether the template places the second text explicitly.
    pub fn has_pair_slot(&self) -> bool {
        self.segments.contains(&Segment::Pair)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let words: Vec<String> = self
            .segments
            .iter()
            .map(|s| match s {
                Segment::Virtual(n) => format!("[P:{n}]"),
                Segment::Text => "{text}".into(),
                Segment::Pair => "{text_pair}".into(),
            })
            .collect();
        f.write_str(&words.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let t = Template::parse("[P:2] {text} [P:3] {text_pair} [P:1]").unwrap();
        assert_eq!(t.num_virtual(), 6);
        assert!(!t.is_prefix());
        assert!(t.has_pair_slot());
        assert_eq!(Template::parse(&t.to_string()).unwrap(), t);
        assert!(Template::parse("[P:4] {text}").unwrap().is_prefix());
        assert_eq!(
            Template::parse("[P:4] {text}").unwrap(),
            Template::prefix(4)
        );
    }

    #[test]
    fn refuses_malformed_templates_with_the_reason() {
        for (bad, needle) in [
            ("[P:2]", "exactly once"),
            ("{text} {text}", "exactly once"),
            ("{text_pair} {text}", "after {text}"),
            ("{text} {text_pair} {text_pair}", "at most once"),
            ("[P:0] {text}", "[P:n]"),
            ("[P:x] {text}", "[P:x]"),
            ("[P:99999999999] {text}", "[P:99999999999]"),
            ("hello {text}", "hello"),
        ] {
            let err = Template::parse(bad).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }
}
