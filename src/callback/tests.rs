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

fn subscription_push(event: &str, element: &str, items: &str) -> (InboundEvent, xml::Fields) {
    let xml = format!(
        "<xml><ToUserName>gh</ToUserName><FromUserName><![CDATA[oSub01]]></FromUserName><CreateTime>1765000000</CreateTime><MsgType>event</MsgType><Event><![CDATA[{event}]]></Event><{element}>{items}</{element}></xml>"
    );
    let fields = xml::parse(&xml).unwrap();
    let base = inbound_event("a", &fields, xml.clone(), 1_765_000_000).unwrap();
    (base, fields)
}

/// One stored event per `<List>` item, each with its template and consent change; the same
/// push again gives the same keys (WeChat's retry), another item another key.
#[test]
fn a_popup_is_stored_as_one_event_per_template() {
    let (base, fields) = subscription_push(
        "subscribe_msg_popup_event",
        "SubscribeMsgPopupEvent",
        "<List><TemplateId>T1</TemplateId><SubscribeStatusString>accept</SubscribeStatusString><PopupScene>2</PopupScene></List>\
         <List><TemplateId>T2</TemplateId><SubscribeStatusString>reject</SubscribeStatusString></List>\
         <List><TemplateId>T3</TemplateId><SubscribeStatusString>maybe</SubscribeStatusString></List>",
    );
    let items = subscription_items(base.clone(), &fields);
    let seen: Vec<_> = items
        .iter()
        .map(|e| (e.template_id.as_deref(), e.consent))
        .collect();
    assert_eq!(
        seen,
        [
            (Some("T1"), Some(ConsentChange::Granted)),
            (Some("T2"), Some(ConsentChange::Withdrawn)),
            (Some("T3"), None),
        ]
    );
    let keys: std::collections::BTreeSet<_> = items.iter().map(|e| &e.dedup_key).collect();
    assert_eq!(keys.len(), 3);
    let again = subscription_items(base, &fields);
    assert_eq!(again[0].dedup_key, items[0].dedup_key);
}

/// A settings change resumes or withdraws; it never grants a one-time send.
#[test]
fn a_settings_change_withdraws_or_resumes() {
    let (base, fields) = subscription_push(
        "subscribe_msg_change_event",
        "SubscribeMsgChangeEvent",
        "<List><TemplateId>T1</TemplateId><SubscribeStatusString>reject</SubscribeStatusString></List>\
         <List><TemplateId>T2</TemplateId><SubscribeStatusString>accept</SubscribeStatusString></List>",
    );
    let items = subscription_items(base, &fields);
    assert_eq!(items[0].consent, Some(ConsentChange::Withdrawn));
    assert_eq!(items[1].consent, Some(ConsentChange::Resumed));
}

/// Each sent item carries its MsgID and a status the join reads as the template event's.
#[test]
fn sent_items_carry_their_msgid_and_a_status_the_join_reads() {
    let item = |code: &str, status: &str, msgid: &str| {
        format!(
            "<List><TemplateId>T</TemplateId><MsgID>{msgid}</MsgID>{code}<ErrorStatus>{status}</ErrorStatus></List>"
        )
    };
    let items = [
        item("<ErrorCode>0</ErrorCode>", "success", "1700827132819554304"),
        item("<ErrorCode>43101</ErrorCode>", "refuse", "2"),
        item("<ErrorCode>10005</ErrorCode>", "system failed", "3"),
        item("", "odd", "4"),
    ]
    .concat();
    let (base, fields) =
        subscription_push("subscribe_msg_sent_event", "SubscribeMsgSentEvent", &items);
    let stored = subscription_items(base, &fields);
    let seen: Vec<_> = stored
        .iter()
        .map(|e| {
            (
                e.msgid,
                crate::domain::lifecycle::delivery_status(e.status.as_deref().unwrap()),
            )
        })
        .collect();
    use crate::domain::status::Status;
    assert_eq!(
        seen,
        [
            (Some(1_700_827_132_819_554_304), Some(Status::Delivered)),
            (Some(2), Some(Status::Blocked)),
            (Some(3), Some(Status::Undelivered)),
            (Some(4), Some(Status::Undelivered)),
        ]
    );
    assert!(stored.iter().all(|e| e.consent.is_none()));
}

/// A template id longer than any WeChat issues is not applied to the ledger, and a value of
/// any length in a status is cut before it is stored.
#[test]
fn hostile_items_are_bounded() {
    let long = "T".repeat(10_000);
    let (base, fields) = subscription_push(
        "subscribe_msg_popup_event",
        "SubscribeMsgPopupEvent",
        &format!(
            "<List><TemplateId>{long}</TemplateId><SubscribeStatusString>accept</SubscribeStatusString></List>"
        ),
    );
    let items = subscription_items(base, &fields);
    assert_eq!(items[0].template_id, None);
    let (base, fields) = subscription_push(
        "subscribe_msg_sent_event",
        "SubscribeMsgSentEvent",
        &format!(
            "<List><TemplateId>T</TemplateId><MsgID>1</MsgID><ErrorCode>5</ErrorCode><ErrorStatus>{long}</ErrorStatus></List>"
        ),
    );
    let items = subscription_items(base, &fields);
    assert!(items[0].status.as_ref().unwrap().chars().count() <= 201);
    assert!(
        items[0].dedup_key.len() < 1_000,
        "{}",
        items[0].dedup_key.len()
    );
}
