//! WeChat's display rules for template values since 2023-05-04: `first` and `remark` are not
//! shown, and each keyword value shows at most 20 characters, on one line (docs/limits.md,
//! "WeChat's 2023 content rules"). WeChat cuts a longer value itself, without an error; the
//! daemon applies the rule first, so the row says what the user saw, or fails it if asked to.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

use super::text::{CUT_MARK, cut, echo};

/// The most characters WeChat shows of one keyword value since 2023-05-04.
pub const MAX_VALUE_CHARS: usize = 20;

/// Parameters WeChat no longer shows since 2023-05-04; still accepted (old templates name
/// them) and left as they are.
pub const IGNORED_PARAMETERS: [&str; 2] = ["first", "remark"];

/// Which rules values are held to (`[templates] content_rules`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ContentRules {
    /// The 2023 rules (the default).
    #[serde(rename = "2023")]
    Rules2023,
    /// The 2014 interface page's: none beyond the template's parameters.
    #[serde(rename = "2014")]
    Rules2014,
}

/// What a value over the rules gets (`[templates] overlong`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlong {
    /// Cut to the limit, ending in `…`, as WeChat would show it (the default).
    Cut,
    /// The row fails, naming the parameter and the rule.
    Fail,
}

/// Applies `rules` to every keyword value of `data` (an object of `{"value": …}` items). `Ok`
/// holds the names of the parameters it cut (none with `Overlong::Fail`); `Err` the reason the
/// row fails.
pub fn apply(
    data: &mut Value,
    rules: ContentRules,
    overlong: Overlong,
) -> Result<Vec<String>, String> {
    let mut cut_names = Vec::new();
    if rules == ContentRules::Rules2014 {
        return Ok(cut_names);
    }
    let Some(items) = data.as_object_mut() else {
        return Ok(cut_names);
    };
    for (name, item) in items.iter_mut() {
        if IGNORED_PARAMETERS.contains(&name.as_str()) {
            continue;
        }
        let Some(Value::String(value)) = item.get_mut("value") else {
            continue;
        };
        let Some(shown) = shown(value) else { continue };
        match overlong {
            Overlong::Cut => {
                *value = shown;
                cut_names.push(name.clone());
            }
            Overlong::Fail => return Err(breach(name, value)),
        }
    }
    Ok(cut_names)
}

/// What a user sees of a keyword value under the 2023 rules (the simulator shows deliveries
/// so).
pub fn as_shown(value: &str) -> String {
    shown(value).unwrap_or_else(|| value.to_string())
}

/// What WeChat would show of `value` when it breaks the rules: its first line, at most
/// `MAX_VALUE_CHARS` characters with the last one `…`. `None` when it keeps them.
fn shown(value: &str) -> Option<String> {
    let first_line = value.split(is_line_break).next().unwrap_or_default();
    let broken = first_line.len() < value.len();
    if !broken && first_line.chars().nth(MAX_VALUE_CHARS).is_none() {
        return None;
    }
    // One character fewer than the limit, so that the mark fits within it.
    Some(match cut(first_line, MAX_VALUE_CHARS - 1) {
        Cow::Owned(cut) => cut,
        Cow::Borrowed(line) => format!("{line}{CUT_MARK}"),
    })
}

fn is_line_break(c: char) -> bool {
    matches!(
        c,
        '\n' | '\r' | '\u{0b}' | '\u{0c}' | '\u{85}' | '\u{2028}' | '\u{2029}'
    )
}

/// The reason a value fails the rules; names the parameter, never repeats the value.
fn breach(name: &str, value: &str) -> String {
    if value.contains(is_line_break) {
        format!(
            "data.{} has a line break: WeChat shows keyword values on one line since 2023-05-04 \
             ([templates] overlong = \"fail\")",
            echo(name)
        )
    } else {
        format!(
            "data.{} is {} characters long: WeChat shows at most {MAX_VALUE_CHARS} since \
             2023-05-04 ([templates] overlong = \"fail\")",
            echo(name),
            value.chars().count()
        )
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn data(value: &str) -> Value {
        json!({ "first": {"value": "x".repeat(40)}, "amount": {"value": value}, "remark": {"value": "a\nb"} })
    }

    #[test]
    fn values_within_the_rules_are_left_alone() {
        for value in ["", "39.8元", &"字".repeat(20), &"a".repeat(20)] {
            let mut d = data(value);
            assert_eq!(
                apply(&mut d, ContentRules::Rules2023, Overlong::Fail),
                Ok(vec![])
            );
            assert_eq!(d, data(value));
        }
    }

    #[test]
    fn long_values_are_cut_to_twenty_characters_ending_in_an_ellipsis() {
        let mut d = data(&"字".repeat(21));
        assert_eq!(
            apply(&mut d, ContentRules::Rules2023, Overlong::Cut),
            Ok(vec!["amount".into()])
        );
        let shown = d["amount"]["value"].as_str().unwrap();
        assert_eq!(shown, format!("{}…", "字".repeat(19)));
        assert_eq!(shown.chars().count(), MAX_VALUE_CHARS);
        // first and remark are not shown by WeChat: left as they came.
        assert_eq!(d["first"]["value"], json!("x".repeat(40)));
        assert_eq!(d["remark"]["value"], json!("a\nb"));
    }

    #[test]
    fn a_line_break_keeps_the_first_line() {
        for brk in ["\n", "\r\n", "\u{2028}"] {
            let mut d = data(&format!("已发货{brk}单号 123"));
            assert_eq!(
                apply(&mut d, ContentRules::Rules2023, Overlong::Cut),
                Ok(vec!["amount".into()])
            );
            assert_eq!(d["amount"]["value"], json!("已发货…"));
        }
        let mut d = data(&format!("{}\nmore", "b".repeat(30)));
        apply(&mut d, ContentRules::Rules2023, Overlong::Cut).unwrap();
        assert_eq!(d["amount"]["value"], json!(format!("{}…", "b".repeat(19))));
    }

    #[test]
    fn fail_names_the_parameter_and_the_limit_never_the_value() {
        let mut d = data(&"秘".repeat(25));
        let reason = apply(&mut d, ContentRules::Rules2023, Overlong::Fail).unwrap_err();
        assert!(
            reason.contains("data.amount is 25 characters long"),
            "{reason}"
        );
        assert!(reason.contains("at most 20"), "{reason}");
        assert!(!reason.contains('秘'), "{reason}");
        let mut d = data("a\nb");
        let reason = apply(&mut d, ContentRules::Rules2023, Overlong::Fail).unwrap_err();
        assert!(reason.contains("data.amount has a line break"), "{reason}");
    }

    #[test]
    fn hostile_values_come_out_within_the_rules() {
        for value in [
            "\0".repeat(1 << 20),
            format!("{}\u{202e}", "x".repeat(1 << 20)),
            "\r".into(),
        ] {
            let mut d = data(&value);
            apply(&mut d, ContentRules::Rules2023, Overlong::Cut).unwrap();
            let shown = d["amount"]["value"].as_str().unwrap();
            assert!(shown.chars().count() <= MAX_VALUE_CHARS, "{}", shown.len());
            assert!(!shown.contains(is_line_break));
            // What was cut is already within the rules: a resend cuts nothing more.
            assert_eq!(
                apply(&mut d, ContentRules::Rules2023, Overlong::Cut),
                Ok(vec![])
            );
        }
    }

    #[test]
    fn the_2014_rules_change_nothing() {
        let mut d = data(&"字".repeat(50));
        assert_eq!(
            apply(&mut d, ContentRules::Rules2014, Overlong::Fail),
            Ok(vec![])
        );
        assert_eq!(d, data(&"字".repeat(50)));
    }
}
