//! Template content and the check of a row's `data` against it, made before any quota or API
//! call is spent on a message WeChat would render wrong.

use serde_json::Value;

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
            "data lacks parameter \"{missing}\" of template {template_id}"
        ));
    }
    if let Some(unknown) = given.keys().find(|key| !expected.contains(key)) {
        return Err(format!(
            "data.{unknown} is not a parameter of template {template_id} (its parameters: {})",
            expected.join(", ")
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
