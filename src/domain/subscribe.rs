//! Subscription notifications (订阅通知): the typed values of their data, checked before any
//! request by the type prefix of each key (`thing1` is a `thing`), as WeChat documents them.
//!
//! Sources: the subscription-message pages of WeChat's documentation (订阅消息 › 参数值内容
//!限制, the same table for Mini Programs and Official Accounts) and the SDKs that repeat it
//! (WxJava, wechatpy, EasyWeChat). What the pages say loosely is decided here and marked
//! "ours": which date and time layouts count as "年月日" and "24小时制", and which characters
//! count as a "symbol". docs/subscribe.md lists each rule with its source.

use std::fmt;

use serde::Deserialize;

/// Whether a subscription notification needs a consent in the ledger before it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ConsentPolicy {
    /// Only with a consent the ledger holds (from WeChat's popup events); without one the row
    /// waits `held` up to `consent_wait_secs`, then fails.
    #[default]
    Ledger,
    /// Sent whatever the ledger says; WeChat decides (43101: failed, and the ledger learns).
    /// For consents given before the daemon saw the events, or pushes routed elsewhere.
    Trust,
}

/// `[subscribe]`: how subscription notifications are sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubscribeSettings {
    pub consent: ConsentPolicy,
    /// How long a row waits for a consent, from when it was first due (default 7 days).
    pub consent_wait_secs: u64,
    /// Sends per subscription template per month; 0 (the default): no limit of ours, as
    /// WeChat publishes none (the user's consent is the limit).
    pub monthly_per_template: u32,
    /// Whether `/wxaapi/newtmpl/gettemplate` is synced with the template list.
    pub sync_templates: bool,
}

/// The longest `consent_wait_secs` accepted: ten years.
pub const MAX_CONSENT_WAIT_SECS: u64 = 10 * 366 * 86_400;

impl Default for SubscribeSettings {
    fn default() -> Self {
        SubscribeSettings {
            consent: ConsentPolicy::Ledger,
            consent_wait_secs: 7 * 86_400,
            monthly_per_template: 0,
            sync_templates: true,
        }
    }
}

impl SubscribeSettings {
    pub fn consent_wait(&self) -> chrono::Duration {
        chrono::Duration::seconds(self.consent_wait_secs.min(MAX_CONSENT_WAIT_SECS) as i64)
    }

    /// The monthly limit a reservation is made with.
    pub fn monthly_limit(&self) -> u32 {
        match self.monthly_per_template {
            0 => u32::MAX,
            n => n,
        }
    }
}

/// A key's type, read from its name without the trailing digits (`thing12` → `thing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// 事物: at most 20 characters of any kind.
    Thing,
    /// 数字: at most 32 digits, a decimal point allowed.
    Number,
    /// 字母: at most 32 Latin letters.
    Letter,
    /// 符号: at most 5 symbols.
    Symbol,
    /// 字符串: at most 32 digits, letters or symbols.
    CharacterString,
    /// 时间: a 24-hour time, optionally after a date; or a range of two joined by `~`.
    Time,
    /// 日期: a date, optionally followed by a 24-hour time; or a range joined by `~`.
    Date,
    /// 金额: one currency symbol and at most 10 digits, decimals allowed, `元` allowed last.
    Amount,
    /// 电话: at most 17 digits and symbols.
    PhoneNumber,
    /// 车牌: at most 8 characters; the first and last may be Chinese, the rest letters or digits.
    CarNumber,
    /// 姓名: at most 10 Chinese characters, or at most 20 letters or symbols.
    Name,
    /// 汉字: at most 5 Chinese characters.
    Phrase,
    /// 枚举值 (`enum`, and `const` in Official Account templates): one of the template's listed
    /// values, which no call tells us; not checked here (WeChat answers 47003).
    Enum,
    /// `short_thing`, seen in Official Account templates; its bound is not documented: not
    /// checked beyond being text without control characters.
    ShortThing,
}

impl ValueType {
    /// The type of a data key, or `None` for a key no subscription template has.
    pub fn of_key(key: &str) -> Option<ValueType> {
        let prefix = key.trim_end_matches(|c: char| c.is_ascii_digit());
        Some(match prefix {
            "thing" => ValueType::Thing,
            "number" => ValueType::Number,
            "letter" => ValueType::Letter,
            "symbol" => ValueType::Symbol,
            "character_string" => ValueType::CharacterString,
            "time" => ValueType::Time,
            "date" => ValueType::Date,
            "amount" => ValueType::Amount,
            "phone_number" => ValueType::PhoneNumber,
            "car_number" => ValueType::CarNumber,
            "name" => ValueType::Name,
            "phrase" => ValueType::Phrase,
            "enum" | "const" => ValueType::Enum,
            "short_thing" => ValueType::ShortThing,
            _ => return None,
        })
    }

    /// The rule in words, as the reason on a refused row repeats it.
    pub fn rule(self) -> &'static str {
        match self {
            ValueType::Thing => "thing: at most 20 characters",
            ValueType::Number => "number: at most 32 digits, a decimal point allowed",
            ValueType::Letter => "letter: at most 32 Latin letters",
            ValueType::Symbol => "symbol: at most 5 symbols",
            ValueType::CharacterString => {
                "character_string: at most 32 digits, Latin letters or symbols"
            }
            ValueType::Time => {
                "time: a 24-hour time such as 15:01, optionally after a date \
                 (2019年10月1日 15:01), or two joined by ~"
            }
            ValueType::Date => {
                "date: a date such as 2019年10月1日 or 2019-10-01, optionally followed by a \
                 24-hour time, or two joined by ~"
            }
            ValueType::Amount => {
                "amount: one currency symbol and at most 10 digits, decimals allowed, 元 allowed \
                 at the end (¥39.80)"
            }
            ValueType::PhoneNumber => {
                "phone_number: at most 17 digits and symbols (+86-0766-66888866)"
            }
            ValueType::CarNumber => {
                "car_number: at most 8 characters, the first and last may be Chinese, the rest \
                 Latin letters or digits (粤A8Z888挂)"
            }
            ValueType::Name => {
                "name: at most 10 Chinese characters, or at most 20 Latin letters or symbols"
            }
            ValueType::Phrase => "phrase: at most 5 Chinese characters",
            ValueType::Enum => "enum: one of the template's values (not checked here)",
            ValueType::ShortThing => "short_thing: text without control characters",
        }
    }

    /// Whether `value` keeps this type's rule.
    pub fn admits(self, value: &str) -> bool {
        let count = value.chars().count();
        let all = |f: fn(char) -> bool| value.chars().all(f);
        if value.is_empty() {
            return false;
        }
        match self {
            ValueType::Thing => count <= 20 && all(|c| !c.is_control()),
            ValueType::Number => count <= 32 && is_decimal(value),
            ValueType::Letter => count <= 32 && all(|c| c.is_ascii_alphabetic()),
            ValueType::Symbol => count <= 5 && all(is_symbol),
            ValueType::CharacterString => {
                count <= 32 && all(|c| c.is_ascii_alphanumeric() || is_symbol(c))
            }
            ValueType::Time => range(value, |part| date_time(part, false)),
            ValueType::Date => range(value, |part| date_time(part, true)),
            ValueType::Amount => amount(value),
            ValueType::PhoneNumber => {
                count <= 17
                    && value.chars().any(|c| c.is_ascii_digit())
                    && all(|c| c.is_ascii_digit() || is_symbol(c))
            }
            ValueType::CarNumber => car_number(value),
            ValueType::Name => {
                (count <= 10 && all(is_chinese))
                    || (count <= 20 && all(|c| c.is_ascii_alphabetic() || is_symbol(c) || c == ' '))
                    // Mixed Chinese and letters counts as a Chinese name (WeChat's words).
                    || (count <= 10 && all(|c| is_chinese(c) || c.is_ascii_alphabetic() || c == '·'))
            }
            ValueType::Phrase => count <= 5 && all(is_chinese),
            ValueType::Enum | ValueType::ShortThing => {
                count <= crate::domain::message::MAX_ID_CHARS && all(|c| !c.is_control())
            }
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.rule().split(':').next().unwrap_or_default())
    }
}

/// A printable ASCII character that is neither a letter, a digit nor a space (ours: WeChat
/// says "符号" without a list), or a full-width punctuation mark.
fn is_symbol(c: char) -> bool {
    (c.is_ascii_graphic() && !c.is_ascii_alphanumeric())
        || matches!(c, '\u{3000}'..='\u{303F}' | '\u{FF01}'..='\u{FF0F}' | '\u{FF1A}'..='\u{FF20}' | '¥' | '￥')
}

/// A CJK unified ideograph (basic block and extension A).
fn is_chinese(c: char) -> bool {
    matches!(c, '\u{4E00}'..='\u{9FFF}' | '\u{3400}'..='\u{4DBF}')
}

/// Digits with at most one decimal point, neither first nor last; a leading minus allowed.
fn is_decimal(value: &str) -> bool {
    let digits = value.strip_prefix('-').unwrap_or(value);
    let mut parts = digits.split('.');
    let whole = parts.next().unwrap_or_default();
    let fraction = parts.next();
    parts.next().is_none()
        && !whole.is_empty()
        && whole.chars().all(|c| c.is_ascii_digit())
        && fraction.is_none_or(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_digit()))
}

/// One value, or two joined by `~` (a period), each passing `one`.
fn range(value: &str, one: impl Fn(&str) -> bool) -> bool {
    match value.split_once('~') {
        Some((from, to)) => one(from.trim()) && one(to.trim()),
        None => one(value.trim()),
    }
}

/// A date (`2019年10月1日`, `2019-10-01`, `2019/10/01`, `2019.10.01`, or without the year:
/// `10月1日`), a 24-hour time (`15:01`, `15:01:30`), or a date and a time. `date_first`: the
/// date is required (a `date` value) rather than the time (a `time` value).
fn date_time(value: &str, date_first: bool) -> bool {
    let (date, time) = match value.split_once(char::is_whitespace) {
        Some((date, time)) => (Some(date), Some(time.trim())),
        None if date_first => (Some(value), None),
        None => (None, Some(value)),
    };
    // "2019年10月1日15:01" without a space is how some SDK examples write it.
    let (date, time) = match (date, time) {
        (Some(d), None) if d.contains('日') && !d.ends_with('日') => {
            let end = d.find('日').unwrap_or_default() + '日'.len_utf8();
            (Some(&d[..end]), Some(&d[end..]))
        }
        other => other,
    };
    if date_first && date.is_none() {
        return false;
    }
    if !date_first && time.is_none() {
        return false;
    }
    date.is_none_or(is_date) && time.is_none_or(is_time)
}

/// WeChat's footnote: "y年m月d日, y年m月, m月d日, or joined by - / . (2018-01-01, 2018-01,
/// 01-01)"; `号` for `日` is ours.
fn is_date(text: &str) -> bool {
    let chinese = text.contains('月');
    let numbers: Vec<&str> = if chinese {
        let trimmed = text
            .strip_suffix('日')
            .or_else(|| text.strip_suffix('号'))
            .or_else(|| text.strip_suffix('月').filter(|t| t.contains('年')));
        let Some(trimmed) = trimmed else { return false };
        trimmed.split(['年', '月']).collect()
    } else {
        text.split(['-', '/', '.']).collect()
    };
    // Two numbers: a year and a month (`2019年10月`, `2018-01`) or a month and a day.
    let year_month = numbers.len() == 2
        && if chinese {
            text.contains('年')
        } else {
            numbers[0].len() == 4
        };
    let parsed: Option<Vec<u32>> = numbers
        .iter()
        .map(|n| {
            (!n.is_empty() && n.len() <= 4 && n.chars().all(|c| c.is_ascii_digit()))
                .then(|| n.parse().ok())
                .flatten()
        })
        .collect();
    match parsed.as_deref() {
        Some([year, month, day]) => {
            (1..=9999).contains(year) && (1..=12).contains(month) && (1..=31).contains(day)
        }
        Some([year, month]) if year_month => (1..=9999).contains(year) && (1..=12).contains(month),
        Some([month, day]) => (1..=12).contains(month) && (1..=31).contains(day),
        _ => false,
    }
}

fn is_time(text: &str) -> bool {
    let parts: Vec<&str> = text.split([':', '：']).collect();
    let ok = |n: &str, max: u32| {
        (1..=2).contains(&n.len())
            && n.chars().all(|c| c.is_ascii_digit())
            && n.parse::<u32>().is_ok_and(|v| v <= max)
    };
    match parts.as_slice() {
        [h, m] => ok(h, 24) && ok(m, 59),
        [h, m, s] => ok(h, 24) && ok(m, 59) && ok(s, 59),
        _ => false,
    }
}

/// One currency symbol (before or after) and at most 10 digits with decimals; `元` may end it
/// (ours: the symbol may be omitted when `元` ends the value, as WeChat's example `39.8元`).
fn amount(value: &str) -> bool {
    const SYMBOLS: [char; 6] = ['¥', '￥', '$', '€', '£', '＄'];
    let mut rest = value.trim();
    let mut symbols = 0;
    if let Some(c) = rest.chars().next()
        && SYMBOLS.contains(&c)
    {
        rest = &rest[c.len_utf8()..];
        symbols += 1;
    }
    if let Some(stripped) = rest.strip_suffix('元') {
        rest = stripped;
        symbols += 1;
    }
    let digits = rest.chars().filter(char::is_ascii_digit).count();
    symbols >= 1 && digits <= 10 && is_decimal(rest) && !rest.starts_with('-')
}

fn car_number(value: &str) -> bool {
    let chars: Vec<char> = value.chars().collect();
    if chars.is_empty() || chars.len() > 8 {
        return false;
    }
    let last = chars.len() - 1;
    chars
        .iter()
        .enumerate()
        .all(|(i, &c)| c.is_ascii_alphanumeric() || ((i == 0 || i == last) && is_chinese(c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admits(key: &str, value: &str) -> bool {
        ValueType::of_key(key).expect("a known type").admits(value)
    }

    #[test]
    fn keys_are_typed_by_their_prefix() {
        assert_eq!(ValueType::of_key("thing1"), Some(ValueType::Thing));
        assert_eq!(ValueType::of_key("thing12"), Some(ValueType::Thing));
        assert_eq!(
            ValueType::of_key("character_string3"),
            Some(ValueType::CharacterString)
        );
        assert_eq!(
            ValueType::of_key("phone_number9"),
            Some(ValueType::PhoneNumber)
        );
        assert_eq!(ValueType::of_key("const3"), Some(ValueType::Enum));
        assert_eq!(ValueType::of_key("first"), None);
        assert_eq!(ValueType::of_key("keyword1"), None);
    }

    #[test]
    fn each_type_admits_wechats_examples_and_refuses_past_its_bounds() {
        let cases: &[(&str, &str, bool)] = &[
            ("thing1", "订单已发货", true),
            ("thing1", &"长".repeat(20), true),
            ("thing1", &"长".repeat(21), false),
            ("thing1", "", false),
            ("number1", "39.80", true),
            ("number1", &"9".repeat(32), true),
            ("number1", &"9".repeat(33), false),
            ("number1", "12a", false),
            ("number1", "1.2.3", false),
            ("letter1", "ABCdef", true),
            ("letter1", "abc1", false),
            ("symbol1", "%+-", true),
            ("symbol1", "%%%%%%", false),
            ("symbol1", "a", false),
            ("character_string1", "SO-2026-0001", true),
            ("character_string1", &"x".repeat(33), false),
            ("character_string1", "订单", false),
            ("time1", "15:01", true),
            ("time1", "2019年10月1日 15:01", true),
            ("time1", "15:01~16:00", true),
            ("time1", "25:00", false),
            ("time1", "tomorrow", false),
            ("date1", "2019年10月1日", true),
            ("date1", "2019-10-01", true),
            ("date1", "2019年10月1日 15:01", true),
            ("date1", "2019年10月1日~2019年10月7日", true),
            ("date1", "2019-13-01", false),
            ("date1", "2019年10月", true),
            ("date1", "2018-01", true),
            ("date1", "01-01", true),
            ("date1", "10月1日", true),
            ("date1", "2019年", false),
            ("date1", "13-01", false),
            ("date1", "soon", false),
            ("amount1", "¥39.80", true),
            ("amount1", "39.8元", true),
            ("amount1", "39.80", false),
            ("amount1", "¥12345678901", false),
            ("phone_number1", "+86-0766-66888866", true),
            ("phone_number1", "123456789012345678", false),
            ("phone_number1", "call me", false),
            ("car_number1", "粤A8Z888挂", true),
            ("car_number1", "粤A8Z8888挂", false),
            ("car_number1", "A粤8Z88", false),
            ("name1", "张三", true),
            ("name1", "John Smith", true),
            ("name1", &"张".repeat(11), false),
            ("phrase1", "配送中", true),
            ("phrase1", "配送中ok", false),
            ("phrase1", "一二三四五六", false),
        ];
        for (key, value, expected) in cases {
            assert_eq!(admits(key, value), *expected, "{key} = {value:?}");
        }
    }

    #[test]
    fn every_rule_names_its_type() {
        for key in [
            "thing1",
            "number1",
            "letter1",
            "symbol1",
            "character_string1",
            "time1",
            "date1",
            "amount1",
            "phone_number1",
            "car_number1",
            "name1",
            "phrase1",
            "enum1",
            "short_thing1",
        ] {
            let t = ValueType::of_key(key).unwrap();
            assert!(key.starts_with(&t.to_string()), "{key}: {}", t.rule());
        }
    }
}
