//! Human output: aligned tables and key/value blocks, and JSON fields as text.

use serde_json::Value;

/// A JSON value on one line.
pub(crate) fn compact(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| value.to_string())
}

/// `value[key]` as a person reads it: strings without quotes, `-` for null or missing.
pub(crate) fn field(value: &Value, key: &str) -> String {
    match value.get(key) {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => compact(other),
    }
}

/// Columns padded to their widest cell, a header row first; the last column is not padded.
pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            if i == last {
                text.push_str(&cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count());
                text.push_str(&cell);
                text.push_str(&" ".repeat(pad + 2));
            }
        }
        text.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

/// `key  value` lines, keys padded.
pub(crate) fn kv_table(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(key, value)| format!("{key:<width$}  {value}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns() {
        let rows = vec![
            vec!["a".to_owned(), "long value".to_owned(), "x".to_owned()],
            vec!["bbb".to_owned(), "v".to_owned(), "y".to_owned()],
        ];
        assert_eq!(
            table(&["K", "VALUE", "LAST"], rows),
            "K    VALUE       LAST\na    long value  x\nbbb  v           y\n"
        );
        assert_eq!(
            kv_table(&[("id", "1".to_owned()), ("status", "UPDATED".to_owned())]),
            "id      1\nstatus  UPDATED\n"
        );
        let value = serde_json::json!({"s": "text", "n": 3, "z": null});
        assert_eq!(
            [
                field(&value, "s"),
                field(&value, "n"),
                field(&value, "z"),
                field(&value, "missing")
            ],
            ["text", "3", "-", "-"]
        );
    }
}
