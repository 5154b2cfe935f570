//! Template content and the check of a row's `data` against it, made before any quota or API
//! call is spent on a message WeChat would render wrong.

use serde_json::Value;

use super::text::echo;

/// The parameter names of a template's content, `{{first.DATA}}` → `first`, in order, once each.
pub fn parameters(content: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut rest = content;
    while let Some(start) = rest.find("{{") {
        rest = &rest[start + 2..];
        let Some(end) = rest.find("}}") else { break };
        if let Some(name) = rest[..end].trim().strip_suffix(".DATA")
            && !name.is_empty()
            && !names.iter().any(|n| n == name)
        {
            names.push(name.to_string());
        }
        rest = &rest[end + 2..];
    }
    names
}

/// Every parameter of the template must be in `data`, and nothing else may be.
pub fn check_data(template_id: &str, content: &str, data: &Value) -> Result<(), String> {
    let expected = parameters(content);
    let Some(given) = data.as_object() else {
        return Err("data must be a JSON object".into());
    };
    if let Some(missing) = expected
        .iter()
        .find(|name| !given.contains_key(name.as_str()))
    {
        return Err(format!(
            "data lacks parameter \"{}\" of template {}",
            echo(missing),
            echo(template_id)
        ));
    }
    if let Some(unknown) = given.keys().find(|key| !expected.contains(key)) {
        // The key is the app's and the content WeChat's: both echoed only in part.
        return Err(format!(
            "data.{} is not a parameter of template {} (its parameters: {})",
            echo(unknown),
            echo(template_id),
            echo(&expected.join(", "))
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const CONTENT: &str = "{{first.DATA}}\n商品：{{keynote1.DATA}}\n金额：{{ keynote2.DATA }}\n{{remark.DATA}}{{first.DATA}}{{ bad }}";

    #[test]
    fn parameters_are_read_in_order_once() {
        assert_eq!(
            parameters(CONTENT),
            ["first", "keynote1", "keynote2", "remark"]
        );
        assert!(parameters("no parameters {{ unclosed").is_empty());
    }

    #[test]
    fn data_must_match_the_template() {
        let full = json!({"first": {"value": "a"}, "keynote1": {"value": "b"}, "keynote2": {"value": "c"}, "remark": {"value": "d"}});
        assert_eq!(check_data("T", CONTENT, &full), Ok(()));
        let mut missing = full.clone();
        missing.as_object_mut().unwrap().remove("keynote2");
        assert_eq!(
            check_data("T", CONTENT, &missing).unwrap_err(),
            "data lacks parameter \"keynote2\" of template T"
        );
        let mut extra = full.clone();
        extra
            .as_object_mut()
            .unwrap()
            .insert("keynote9".into(), json!({"value": "x"}));
        let err = check_data("T", CONTENT, &extra).unwrap_err();
        assert!(
            err.starts_with("data.keynote9 is not a parameter of template T"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::{Map, json};

    use super::*;

    /// Template content: text with `{{`, `}}`, `.DATA` and multi-byte characters mixed in.
    fn content() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                Just("{{".to_string()),
                Just("}}".to_string()),
                Just(".DATA".to_string()),
                Just(" ".to_string()),
                "[a-z长]{0,6}",
                ".{0,4}",
            ],
            0..30,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        #[test]
        fn parameters_of_any_content_are_found_without_panic(content in content()) {
            let names = parameters(&content);
            for name in &names {
                prop_assert!(!name.is_empty());
                prop_assert!(content.contains(&format!("{name}.DATA")), "{name:?} not in {content:?}");
            }
            let mut unique = names.clone();
            unique.sort();
            unique.dedup();
            prop_assert_eq!(unique.len(), names.len());
        }

        /// Data with exactly the content's parameters passes; any other set is refused with a
        /// bounded reason that names `data`.
        #[test]
        fn data_is_checked_against_any_content(
            content in content(),
            keys in prop::collection::vec(".{0,10}", 0..5),
            exact in any::<bool>(),
        ) {
            let keys = if exact { parameters(&content) } else { keys };
            let data: Map<String, Value> = keys.iter().map(|k| (k.clone(), json!({"value": "v"}))).collect();
            let result = check_data("TPL", &content, &Value::Object(data.clone()));
            let mut expected = parameters(&content);
            expected.sort();
            let mut given: Vec<String> = data.keys().cloned().collect();
            given.sort();
            prop_assert_eq!(result.is_ok(), expected == given, "{:?}", result);
            if let Err(reason) = result {
                prop_assert!(reason.starts_with("data"), "{reason}");
                prop_assert!(reason.chars().count() <= 700, "{} chars", reason.chars().count());
            }
        }
    }

    /// A key as long as `data` allows and a template with hundreds of parameters: the reason
    /// repeats a few hundred characters of each.
    #[test]
    fn long_keys_and_long_parameter_lists_are_cut_in_the_reason() {
        let content: String = (0..500).map(|i| format!("{{{{p{i}.DATA}}}}")).collect();
        let data: Map<String, Value> = parameters(&content)
            .into_iter()
            .chain(["k".repeat(60_000)])
            .map(|k| (k, json!({"value": "v"})))
            .collect();
        let reason = check_data("TPL", &content, &Value::Object(data)).unwrap_err();
        assert!(reason.starts_with("data.kkk"), "{reason}");
        assert!(
            reason.chars().count() < 500,
            "{} chars",
            reason.chars().count()
        );
        assert_eq!(reason.matches('…').count(), 2, "{reason}");
    }
}
