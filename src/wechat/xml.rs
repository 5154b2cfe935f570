//! The flat XML WeChat pushes: `<xml><Field><![CDATA[value]]></Field>…</xml>`.
//!
//! A DOCTYPE is refused outright, so no entity can be declared or expanded (no billion laughs,
//! no external entities); only the five predefined references and numeric character references
//! are resolved. Nested elements are kept as their text under the outer name.

use std::collections::BTreeMap;

use quick_xml::Reader;
use quick_xml::events::Event;

use crate::domain::text::echo;

/// Bounds that keep a hostile body cheap to reject.
const MAX_FIELDS: usize = 256;
const MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    #[error("XML with a DOCTYPE or entity declaration is refused")]
    Doctype,
    #[error("unknown entity reference &{0};")]
    UnknownEntity(String),
    #[error("the root element is not <xml>")]
    NotWeChatXml,
    #[error("too many fields or too deeply nested")]
    TooLarge,
    #[error("malformed XML: {0}")]
    Malformed(String),
}

/// The top-level fields of one push, by element name, and the `<List>` items nested one level
/// below them (subscription events: `<SubscribeMsgPopupEvent><List>…</List>…`), in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields(
    pub BTreeMap<String, String>,
    pub Vec<BTreeMap<String, String>>,
);

impl Fields {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn int(&self, name: &str) -> Option<i64> {
        self.get(name).and_then(|v| v.trim().parse().ok())
    }

    /// The `<List>` items of the push, each by its fields' names.
    pub fn list_items(&self) -> &[BTreeMap<String, String>] {
        &self.1
    }
}

/// A `<List>` item being read: its fields so far, and the one open.
#[derive(Default)]
struct Item {
    fields: BTreeMap<String, String>,
    field: String,
    text: String,
}

#[derive(PartialEq)]
enum Root {
    Before,
    Open,
    Closed,
}

pub fn parse(xml: &str) -> Result<Fields, XmlError> {
    // No trimming: it would eat the spaces around entity references. Whitespace between
    // fields is outside any field and ignored.
    let mut reader = Reader::from_str(xml);
    let mut fields = Fields::default();
    let mut root = Root::Before;
    // Elements open below <xml>; at depth 1 we are inside a field.
    let mut depth = 0usize;
    let mut field = String::new();
    let mut text = String::new();
    let mut item: Option<Item> = None;
    loop {
        let event = reader.read_event().map_err(|e| malformed(&e))?;
        match event {
            Event::DocType(_) => return Err(XmlError::Doctype),
            Event::Decl(_) | Event::Comment(_) | Event::PI(_) => {}
            Event::Start(start) => {
                let name = start.local_name().as_ref().to_string();
                match root {
                    Root::Before if name == "xml" => root = Root::Open,
                    Root::Before => return Err(XmlError::NotWeChatXml),
                    Root::Closed => return Err(XmlError::Malformed("content after </xml>".into())),
                    Root::Open => {
                        depth += 1;
                        if depth > MAX_DEPTH {
                            return Err(XmlError::TooLarge);
                        }
                        if depth == 1 {
                            field = name;
                            text.clear();
                        } else if depth == 2 && name == "List" {
                            item = Some(Item::default());
                        } else if depth == 3
                            && let Some(item) = item.as_mut()
                        {
                            item.field = name;
                            item.text.clear();
                        }
                    }
                }
            }
            Event::Empty(start) => match root {
                Root::Open if depth == 0 => {
                    let name = start.local_name().as_ref().to_string();
                    insert(&mut fields, name, String::new())?;
                }
                Root::Open => {}
                Root::Before => return Err(XmlError::NotWeChatXml),
                Root::Closed => return Err(XmlError::Malformed("content after </xml>".into())),
            },
            Event::Text(t) if depth > 0 => {
                push_text(&mut text, &mut item, depth, &t.xml10_content())
            }
            Event::CData(c) if depth > 0 => push_text(&mut text, &mut item, depth, &c.into_inner()),
            Event::GeneralRef(r) if depth > 0 => {
                let c = match r.resolve_char_ref() {
                    Ok(Some(c)) => c,
                    Ok(None) => {
                        predefined(&r).ok_or_else(|| XmlError::UnknownEntity(echo(&r).into()))?
                    }
                    Err(e) => return Err(malformed(&e)),
                };
                push_text(&mut text, &mut item, depth, c.encode_utf8(&mut [0; 4]));
            }
            Event::Text(_) | Event::CData(_) | Event::GeneralRef(_) => {}
            Event::End(_) => match root {
                Root::Open if depth == 0 => root = Root::Closed,
                Root::Open => {
                    if depth == 1 {
                        insert(
                            &mut fields,
                            std::mem::take(&mut field),
                            std::mem::take(&mut text),
                        )?;
                    } else if depth == 2
                        && let Some(done) = item.take()
                    {
                        if fields.1.len() >= MAX_FIELDS {
                            return Err(XmlError::TooLarge);
                        }
                        fields.1.push(done.fields);
                    } else if depth == 3
                        && let Some(item) = item.as_mut()
                    {
                        if item.fields.len() >= MAX_FIELDS {
                            return Err(XmlError::TooLarge);
                        }
                        let name = std::mem::take(&mut item.field);
                        let value = std::mem::take(&mut item.text);
                        item.fields.entry(name).or_insert(value);
                    }
                    depth -= 1;
                }
                _ => return Err(XmlError::Malformed("unbalanced end tag".into())),
            },
            Event::Eof => break,
        }
    }
    if root != Root::Closed {
        return Err(XmlError::NotWeChatXml);
    }
    Ok(fields)
}

/// Text inside a field; inside a `<List>` item's field too.
fn push_text(text: &mut String, item: &mut Option<Item>, depth: usize, piece: &str) {
    text.push_str(piece);
    if depth == 3
        && let Some(item) = item.as_mut()
    {
        item.text.push_str(piece);
    }
}

/// quick-xml's messages quote names from the input (a mismatched end tag of any length).
fn malformed(error: &dyn std::fmt::Display) -> XmlError {
    XmlError::Malformed(echo(&error.to_string()).into_owned())
}

fn predefined(name: &str) -> Option<char> {
    match name {
        "amp" => Some('&'),
        "lt" => Some('<'),
        "gt" => Some('>'),
        "quot" => Some('"'),
        "apos" => Some('\''),
        _ => None,
    }
}

fn insert(fields: &mut Fields, name: String, value: String) -> Result<(), XmlError> {
    if fields.0.len() >= MAX_FIELDS {
        return Err(XmlError::TooLarge);
    }
    fields.0.entry(name).or_insert(value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_event_of_the_2014_page_parses() {
        let xml = "<xml><ToUserName><![CDATA[gh_7f083739789a]]></ToUserName>\n<FromUserName><![CDATA[oia2TjuEGTNoeX76QEjQNrcURxG8]]></FromUserName>\n<CreateTime>1395658920</CreateTime><MsgType><![CDATA[event]]></MsgType>\n<Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event><MsgID>200163836</MsgID>\n<Status><![CDATA[failed: system failed]]></Status></xml>";
        let fields = parse(xml).unwrap();
        assert_eq!(
            fields.get("FromUserName"),
            Some("oia2TjuEGTNoeX76QEjQNrcURxG8")
        );
        assert_eq!(fields.int("MsgID"), Some(200163836));
        assert_eq!(fields.get("Status"), Some("failed: system failed"));
        assert_eq!(fields.int("CreateTime"), Some(1395658920));
    }

    #[test]
    fn entities_and_nesting_are_handled() {
        let fields = parse(
            "<?xml version=\"1.0\"?><xml><A>x &amp; y &#20320;</A><B><C>in</C></B><D/></xml>",
        )
        .unwrap();
        assert_eq!(fields.get("A"), Some("x & y 你"));
        assert_eq!(fields.get("B"), Some("in"));
        assert_eq!(fields.get("D"), Some(""));
    }

    /// WxJava's WxMpXmlMessageTest and wechatpy's test_events carry this push.
    #[test]
    fn list_items_of_a_subscription_event_are_read_in_order() {
        let xml = "<xml><ToUserName><![CDATA[gh_123456789abc]]></ToUserName><FromUserName><![CDATA[otFpruAK8D-E6EfStSYonYSBZ8_4]]></FromUserName><CreateTime>1610969440</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[subscribe_msg_popup_event]]></Event><SubscribeMsgPopupEvent><List><TemplateId><![CDATA[VRR0UEO9VJOLs0MHlU0OilqX6MVFDwH3_3gz3Oc0NIc]]></TemplateId><SubscribeStatusString><![CDATA[accept]]></SubscribeStatusString><PopupScene>2</PopupScene></List><List><TemplateId><![CDATA[9nLIlbOQZC5Y89AZteFEux3WCXRRRG5Wfzkpssu4bLI]]></TemplateId><SubscribeStatusString><![CDATA[reject]]></SubscribeStatusString><PopupScene>2</PopupScene></List></SubscribeMsgPopupEvent></xml>";
        let fields = parse(xml).unwrap();
        assert_eq!(fields.get("Event"), Some("subscribe_msg_popup_event"));
        let items = fields.list_items();
        assert_eq!(items.len(), 2);
        assert_eq!(
            items[0]["TemplateId"],
            "VRR0UEO9VJOLs0MHlU0OilqX6MVFDwH3_3gz3Oc0NIc"
        );
        assert_eq!(items[0]["SubscribeStatusString"], "accept");
        assert_eq!(items[1]["SubscribeStatusString"], "reject");
        assert_eq!(items[1]["PopupScene"], "2");
        let many = format!(
            "<xml><E>{}</E></xml>",
            "<List><TemplateId>t</TemplateId></List>".repeat(300)
        );
        assert_eq!(parse(&many), Err(XmlError::TooLarge));
    }

    #[test]
    fn hostile_or_broken_xml_is_refused() {
        let bomb = "<?xml version=\"1.0\"?><!DOCTYPE lolz [<!ENTITY lol \"lol\"><!ENTITY lol2 \"&lol;&lol;\">]><xml><A>&lol2;</A></xml>";
        assert_eq!(parse(bomb), Err(XmlError::Doctype));
        assert_eq!(
            parse("<xml><A>&lol;</A></xml>"),
            Err(XmlError::UnknownEntity("lol".into()))
        );
        assert_eq!(parse("<root><A>1</A></root>"), Err(XmlError::NotWeChatXml));
        assert_eq!(parse("<xml><A>1</A>"), Err(XmlError::NotWeChatXml));
        assert!(matches!(
            parse("<xml><A>1</B></xml>"),
            Err(XmlError::Malformed(_))
        ));
        assert!(matches!(
            parse("<xml></xml><xml></xml>"),
            Err(XmlError::Malformed(_))
        ));
        let deep = format!("<xml>{}{}</xml>", "<a>".repeat(20), "</a>".repeat(20));
        assert_eq!(parse(&deep), Err(XmlError::TooLarge));
        assert_eq!(parse(""), Err(XmlError::NotWeChatXml));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_text_is_parsed_or_refused_without_panic(text in ".{0,400}") {
            if let Err(e) = parse(&text) {
                readable(&e)?;
            }
        }

        #[test]
        fn xml_like_fragments_are_parsed_or_refused_without_panic(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("<xml>".to_string()), Just("</xml>".to_string()), Just("<A>".to_string()),
                    Just("</A>".to_string()), Just("<B/>".to_string()), Just("<![CDATA[".to_string()),
                    Just("]]>".to_string()), Just("&amp;".to_string()), Just("&#x4f60;".to_string()),
                    Just("&#99999999;".to_string()), Just("&bogus;".to_string()), Just("<!DOCTYPE x>".to_string()),
                    Just("<?xml version=\"1.0\"?>".to_string()), Just("<!-- c -->".to_string()), "[a-z0-9 <>&;/]{0,8}",
                ],
                0..40,
            )
        ) {
            let text = parts.concat();
            match parse(&text) {
                Ok(fields) => prop_assert!(fields.0.len() <= MAX_FIELDS),
                Err(e) => readable(&e)?,
            }
        }

        /// Nesting below `<xml>`: up to MAX_DEPTH levels are read (as the outer field's
        /// text), deeper is refused as too deep.
        #[test]
        fn nesting_is_read_up_to_the_bound(depth in 1usize..40, leaf in "[a-z0-9 ]{0,10}") {
            let xml = format!("<xml>{}{leaf}{}</xml>", "<a>".repeat(depth), "</a>".repeat(depth));
            match parse(&xml) {
                Ok(fields) => {
                    prop_assert!(depth <= MAX_DEPTH);
                    prop_assert_eq!(fields.get("a"), Some(leaf.as_str()));
                }
                Err(e) => {
                    prop_assert!(depth > MAX_DEPTH);
                    prop_assert_eq!(e, XmlError::TooLarge);
                }
            }
        }

        /// Any text, escaped or in CDATA, reads back as itself (line ends aside: XML reads
        /// `\r\n` as `\n`).
        #[test]
        fn escaped_and_cdata_values_read_back(value in "[^\r]{0,200}", cdata in any::<bool>()) {
            let inner = if cdata {
                prop_assume!(!value.contains("]]>"));
                format!("<![CDATA[{value}]]>")
            } else {
                value.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
            };
            let fields = parse(&format!("<xml><F>{inner}</F></xml>")).unwrap();
            prop_assert_eq!(fields.get("F"), Some(value.as_str()));
        }

        /// Any entity name: the five predefined ones resolve, others are refused; the refusal
        /// repeats a bounded part of the name.
        #[test]
        fn any_entity_reference_is_resolved_or_refused(name in prop_oneof![
            "[a-zA-Z_][a-zA-Z0-9._-]{0,20}",
            "[^;&<]{1,30}",
            Just("amp".to_string()), Just("lt".to_string()), Just("quot".to_string()),
            "x{1000,3000}",
        ]) {
            match parse(&format!("<xml><F>a&{name};b</F></xml>")) {
                Ok(fields) => {
                    let c = predefined(&name).expect("only predefined entities resolve");
                    prop_assert_eq!(fields.get("F").map(str::to_string), Some(format!("a{c}b")));
                }
                Err(e) => readable(&e)?,
            }
        }

        /// Any numeric character reference: the character when it is one, else refused.
        #[test]
        fn any_character_reference_is_resolved_or_refused(n in prop_oneof![any::<u32>(), 0u32..0x110000], hex in any::<bool>()) {
            let reference = if hex { format!("&#x{n:x};") } else { format!("&#{n};") };
            match parse(&format!("<xml><F>{reference}</F></xml>")) {
                Ok(fields) => {
                    let c = char::from_u32(n).expect("only characters resolve");
                    prop_assert_eq!(fields.get("F").map(str::to_string), Some(c.to_string()));
                }
                Err(e) => readable(&e)?,
            }
        }

        /// A DOCTYPE anywhere (before, inside or after the root) is refused as such or as
        /// malformed, never read.
        #[test]
        fn a_doctype_anywhere_is_refused(at in 0usize..4, decl in r#"[a-zA-Z <>!\[\]"%;&]{0,40}"#) {
            let parts = ["<?xml version=\"1.0\"?>", "<xml>", "<A>1</A>", "</xml>"];
            let mut xml = String::new();
            for (i, part) in parts.iter().enumerate() {
                if i == at {
                    xml.push_str(&format!("<!DOCTYPE x [{decl}]>"));
                }
                xml.push_str(part);
            }
            let e = parse(&xml).unwrap_err();
            readable(&e)?;
        }

        /// Fields by the number: up to MAX_FIELDS distinct ones are read, more are refused.
        #[test]
        fn the_number_of_fields_is_bounded(n in 0usize..600) {
            let xml = format!("<xml>{}</xml>", (0..n).map(|i| format!("<F{i}>{i}</F{i}>")).collect::<String>());
            match parse(&xml) {
                Ok(fields) => {
                    prop_assert!(n <= MAX_FIELDS);
                    prop_assert_eq!(fields.0.len(), n);
                }
                Err(e) => {
                    prop_assert!(n > MAX_FIELDS);
                    prop_assert_eq!(e, XmlError::TooLarge);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(crate::proptest_support::cases(8))]

        /// Huge values and names (up to 1 MB): read whole, and a mismatched huge end tag gives
        /// a bounded message.
        #[test]
        fn huge_values_and_names_are_read_or_refused_with_a_bounded_message(
            len in 1usize..1_000_000,
            c in prop_oneof![Just('x'), Just('长')],
        ) {
            let big: String = std::iter::repeat_n(c, len).collect();
            let fields = parse(&format!("<xml><F><![CDATA[{big}]]></F><{big}>v</{big}></xml>")).unwrap();
            prop_assert_eq!(fields.get("F").map(str::len), Some(big.len()));
            prop_assert_eq!(fields.get(&big), Some("v"));
            let e = parse(&format!("<xml><A>1</{big}></xml>")).unwrap_err();
            readable(&e)?;
        }
    }

    /// A refusal is a non-empty message of bounded length.
    fn readable(e: &XmlError) -> Result<(), TestCaseError> {
        let text = e.to_string();
        prop_assert!(!text.trim().is_empty());
        prop_assert!(
            text.chars().count() <= 300,
            "{} chars: {e:?}",
            text.chars().count()
        );
        Ok(())
    }

    /// What the bound guards against: quick-xml quotes a mismatched end tag whole.
    #[test]
    fn a_megabyte_end_tag_is_not_echoed_whole() {
        let e = parse(&format!("<xml><A>1</{}></xml>", "B".repeat(1 << 20))).unwrap_err();
        assert!(matches!(e, XmlError::Malformed(_)), "{e:?}");
        assert!(e.to_string().len() < 400, "{} bytes", e.to_string().len());
    }
}
