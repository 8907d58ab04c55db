//! Comparing JSON as values, not as text: object keys in any order, lists as multisets.

use std::collections::BTreeMap;

use serde_json::Value;

/// Order-free comparison of two lists of JSON objects: each item as canonical text,
/// sorted.
pub fn sorted(items: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = items.iter().map(canonical).collect();
    out.sort();
    out
}

/// `value` as JSON with every object's keys in order, whatever order it was built in.
pub fn canonical(value: &Value) -> String {
    fn sort(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let sorted: BTreeMap<&String, Value> =
                    map.iter().map(|(k, v)| (k, sort(v))).collect();
                serde_json::to_value(sorted).unwrap_or_default()
            }
            Value::Array(items) => Value::Array(items.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    sort(value).to_string()
}
