//! Unit tests of the callback's checks on what a request carries.

use super::*;

#[test]
fn the_window_holds_for_any_timestamp() {
    let now = 1_700_000_000;
    assert!(within_window(now, now - 300, 300));
    assert!(within_window(now, now + 300, 300));
    assert!(!within_window(now, now - 301, 300));
    assert!(!within_window(now, now + 301, 300));
    // `now - timestamp` overflows for these; abs_diff does not.
    assert!(!within_window(now, i64::MIN, 300));
    assert!(!within_window(now, i64::MAX, 300));
    assert!(!within_window(i64::MAX, i64::MIN, 300));
    assert!(within_window(i64::MIN, i64::MAX, u64::MAX));
    assert!(!within_window(i64::MIN, i64::MAX, u64::MAX - 1));
    assert!(within_window(now, i64::MIN, u64::MAX));
}

#[test]
fn logged_request_text_is_escaped_and_bounded() {
    let forged = "x\n2026-01-01T00:00:00Z  INFO forged line\u{1b}[31m";
    let logged = loggable(forged);
    assert!(
        !logged.contains('\n') && !logged.contains('\u{1b}'),
        "{logged}"
    );
    assert!(
        logged.contains("\\n") && logged.contains("\\u{1b}"),
        "{logged}"
    );
    let long = "账".repeat(1000);
    let logged = loggable(&long);
    assert_eq!(logged.chars().count(), LOGGED_CHARS + 1);
    assert!(logged.ends_with('…'));
    assert_eq!(loggable("default"), "default");
}

fn fields(create_time: &str, from: &str) -> xml::Fields {
    xml::parse(&format!(
        "<xml><ToUserName>gh</ToUserName><FromUserName><![CDATA[{from}]]></FromUserName><CreateTime>{create_time}</CreateTime><MsgType>event</MsgType><Event>unsubscribe</Event></xml>"
    ))
    .unwrap()
}

#[test]
fn event_times_out_of_range_become_the_time_received() {
    let received = 1_750_000_000;
    let kept = |t: &str| {
        inbound_event("a", &fields(t, "o1"), String::new(), received)
            .unwrap()
            .create_time
    };
    assert_eq!(kept("1700000000"), Some(1_700_000_000));
    assert_eq!(kept("946684800"), Some(946_684_800));
    assert_eq!(kept("1750086400"), Some(1_750_086_400));
    for odd in [
        "9223372036854775807",
        "-9223372036854775808",
        "99999999999999999999",
        "946684799",
        "1750086401",
        "0",
        "soon",
    ] {
        assert_eq!(kept(odd), Some(received), "{odd}");
    }
    // WeChat's retries of an odd push still share one key.
    let key = |t: &str, at: i64| {
        inbound_event("a", &fields(t, "o1"), String::new(), at)
            .unwrap()
            .dedup_key
    };
    assert_eq!(
        key("9223372036854775807", received),
        key("9223372036854775807", received + 7)
    );
    assert_eq!(key(" 0017 ", received), "event:o1:17:unsubscribe:");
}

#[test]
fn nul_is_stored_as_the_replacement_character() {
    let event = inbound_event(
        "a",
        &fields("1700000000", "o\0x"),
        "<xml>\0</xml>".into(),
        1_700_000_000,
    )
    .unwrap();
    assert_eq!(event.from_user.as_deref(), Some("o\u{FFFD}x"));
    assert_eq!(event.raw_xml, "<xml>\u{FFFD}</xml>");
    assert!(!event.dedup_key.contains('\0'));
}

#[test]
fn signed_pushes_are_forgotten_after_twice_the_window() {
    let now = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
    assert_eq!(
        forget_before(now, 300),
        DateTime::from_timestamp(1_699_999_400, 0).unwrap()
    );
    // A huge window keeps everything, without overflow or a time PostgreSQL refuses.
    assert_eq!(forget_before(now, u64::MAX), DateTime::UNIX_EPOCH);
    assert_eq!(forget_before(now, 4_000_000_000), DateTime::UNIX_EPOCH);
}
