//! Bounding and escaping text that came from outside (a row, a push, WeChat's answer) before
//! it is echoed into a reason, a log line or a report cell.

use std::borrow::Cow;

/// How much of an input value a reason repeats: enough to recognise it, not enough for one
/// hostile value to make `last_error` (or a log line) megabytes long.
pub const ECHO_CHARS: usize = 200;

/// The mark left where text was cut.
pub const CUT_MARK: char = '…';

/// `text` unchanged when it has at most `max_chars` characters, else its first `max_chars`
/// characters (cut on a character boundary) followed by `…`.
pub fn cut(text: &str, max_chars: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max_chars) {
        None => Cow::Borrowed(text),
        Some((end, _)) => {
            let mut out = String::with_capacity(end + CUT_MARK.len_utf8());
            out.push_str(&text[..end]);
            out.push(CUT_MARK);
            Cow::Owned(out)
        }
    }
}

/// [`cut`] to [`ECHO_CHARS`]: the bound for input repeated in a reason.
pub fn echo(text: &str) -> Cow<'_, str> {
    cut(text, ECHO_CHARS)
}

/// Control characters (newlines, ESC, NUL, DEL, C1), the Unicode line and paragraph
/// separators and the invisible format characters (bidi overrides, zero-width marks) written
/// as Rust-style escapes (`\n`, `\u{1b}`, `\u{202e}`), so a value can neither start a new line,
/// drive a terminal nor reorder what a log viewer shows; other text unchanged.
pub fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// How much of an outside value a log line repeats.
pub const LOGGED_CHARS: usize = 64;

/// An outside value as a log line may carry it: cut to [`LOGGED_CHARS`] and its control
/// characters escaped, so that no row, push or request can write a line of its own (or ANSI
/// codes) into a text log.
pub fn loggable(text: &str) -> String {
    loggable_within(text, LOGGED_CHARS)
}

/// [`loggable`] with a bound of the caller's: for an error, whose text may echo outside input
/// but needs more than a value's room to be read.
pub fn loggable_within(text: &str, max_chars: usize) -> String {
    escape_control(&cut(text, max_chars)).into_owned()
}

/// Characters that can forge or disguise a log line.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn separators_and_bidi_overrides_are_escaped_too() {
        let text = "a\u{2028}b\u{202e}c\u{200b}d";
        assert_eq!(escape_control(text), "a\\u{2028}b\\u{202e}c\\u{200b}d");
    }

    #[test]
    fn short_text_is_kept_and_long_text_cut_on_a_char_boundary() {
        assert_eq!(cut("abc", 3), "abc");
        assert!(matches!(cut("abc", 3), Cow::Borrowed(_)));
        assert_eq!(cut("abcd", 3), "abc…");
        assert_eq!(cut("你好世界", 2), "你好…");
        assert_eq!(cut("", 0), "");
        assert_eq!(cut("x", 0), "…");
        assert_eq!(echo(&"长".repeat(100_000)).chars().count(), ECHO_CHARS + 1);
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_control("a\nb\u{1b}[31m\0"), "a\\nb\\u{1b}[31m\\u{0}");
        assert_eq!(escape_control("您好 ok"), "您好 ok");
        assert_eq!(escape_control("\u{9b}"), "\\u{9b}");
    }

    proptest! {
        #[test]
        fn cut_is_a_bounded_prefix(text in ".{0,300}", max in 0usize..250) {
            let out = cut(&text, max);
            prop_assert!(out.chars().count() <= max + 1);
            if text.chars().count() <= max {
                prop_assert_eq!(&*out, text.as_str());
            } else {
                let kept = out.strip_suffix(CUT_MARK).expect("marked as cut");
                prop_assert!(text.starts_with(kept));
                prop_assert_eq!(kept.chars().count(), max);
            }
        }

        #[test]
        fn escaped_text_has_no_control_characters(text in any::<String>()) {
            prop_assert!(!escape_control(&text).chars().any(char::is_control));
        }
    }
}
