//! The published OBIE v3.1.11 examples: every JSON block of the resource pages
//! we read goes through the connector's readers, and each one that deviates
//! from `openapi.yaml` is either read past (the deviation counted) or refused,
//! as asserted case by case below.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::read::{self, Resource};
use crate::deviations::Deviations;
use crate::error::BankError;

const REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/reference/obie-aisp-3.1.11"
);

fn reference() -> PathBuf {
    let dir = PathBuf::from(REFERENCE);
    assert!(
        dir.join("openapi.yaml").is_file(),
        "the OBIE reference is missing: expected {} (shared/reference/obie-aisp-3.1.11 beside the repository)",
        dir.display()
    );
    dir
}

/// One ```json block of a page.
struct Example {
    /// 1-based line of the block's first JSON line.
    line: usize,
    text: String,
}

fn examples(page: &str) -> Vec<Example> {
    let path = reference().join(page);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut out = Vec::new();
    let mut block: Option<Example> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start().starts_with("```");
        match (&mut block, fence) {
            (None, true) if line.trim() == "```json" => {
                block = Some(Example {
                    line: i + 2,
                    text: String::new(),
                });
            }
            (None, true) => {
                // Another kind of block: skip to its end by treating it as one
                // we do not keep.
                block = Some(Example {
                    line: 0,
                    text: String::new(),
                });
            }
            (Some(_), true) => {
                if let Some(done) = block.take().filter(|b| b.line != 0) {
                    out.push(done);
                }
            }
            (Some(b), false) => {
                b.text.push_str(line);
                b.text.push('\n');
            }
            (None, false) => {}
        }
    }
    assert!(block.is_none(), "{page}: unterminated code block");
    out
}

/// `openapi.yaml` as JSON, with a validator per response schema.
struct Schemas {
    doc: Value,
}

impl Schemas {
    fn load() -> Self {
        let path = reference().join("openapi.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let yaml: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let openapi: Value = serde_json::to_value(yaml).unwrap();
        Self {
            doc: openapi["components"].clone(),
        }
    }

    fn is_valid(&self, schema: &str, instance: &Value) -> bool {
        let root = serde_json::json!({
            "$ref": format!("#/components/schemas/{schema}"),
            "components": self.doc,
        });
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
            .should_validate_formats(true)
            .build(&root)
            .unwrap();
        validator.is_valid(instance)
    }
}

/// What reading an example gave: `Ok(items, deviations)` or the error.
type Outcome = Result<(usize, BTreeMap<&'static str, u64>), BankError>;

fn read_example(page: &str, json: &Value, bytes: &[u8]) -> Outcome {
    let mut dev = Deviations::default();
    let items = match page {
        "Accounts.md" => read::accounts(bytes, &mut dev).map(|p| p.items.len()),
        "Balances.md" => read::balances(bytes, None, &mut dev).map(|p| p.items.len()),
        "Transactions.md" => read::transactions(bytes, None, &mut dev).map(|p| p.items.len()),
        "Parties.md" => {
            let resource = if json["Data"]["Party"].is_object() {
                Resource::Party
            } else {
                Resource::Parties
            };
            read::parties(bytes, resource, "22289", &mut dev).map(|p| p.items.len())
        }
        "Statements.md" => {
            read::bank_items(bytes, Resource::Statements, None, &mut dev).map(|p| p.items.len())
        }
        other => panic!("no reader for {other}"),
    }?;
    Ok((items, dev.into_map()))
}

fn schema_of(page: &str, json: &Value) -> &'static str {
    match page {
        "Accounts.md" => "OBReadAccount6",
        "Balances.md" => "OBReadBalance1",
        "Transactions.md" => "OBReadTransaction6",
        "Parties.md" if json["Data"]["Party"].is_object() => "OBReadParty2",
        "Parties.md" => "OBReadParty3",
        "Statements.md" => "OBReadStatement2",
        other => panic!("no schema for {other}"),
    }
}

/// What each example must give, in page order: `Ok(items, deviations)` or
/// `Err(())` for refused.
type Expected = Result<(usize, &'static [(&'static str, u64)]), ()>;

fn check_page(schemas: &Schemas, page: &str, expected: &[Expected]) {
    let found = examples(page);
    assert_eq!(
        found.len(),
        expected.len(),
        "{page}: {} JSON examples, {} expectations",
        found.len(),
        expected.len()
    );
    for (example, want) in found.iter().zip(expected) {
        let at = format!("{page}:{}", example.line);
        let json: Option<Value> = serde_json::from_str(&example.text).ok();
        let got = match &json {
            Some(json) => read_example(page, json, example.text.as_bytes()),
            // Not JSON: fed as is, it must be refused.
            None => read_example(page, &Value::Null, example.text.as_bytes()),
        };
        let got_simple = got
            .as_ref()
            .map(|(n, dev)| (*n, dev.clone()))
            .map_err(|e| e.clone());
        match (want, &got_simple) {
            (Ok((n, dev)), Ok((got_n, got_dev))) => {
                let want_dev: BTreeMap<&str, u64> = dev.iter().copied().collect();
                assert_eq!((n, &want_dev), (got_n, got_dev), "{at}");
            }
            (Err(()), Err(BankError::Malformed(_))) => {}
            _ => panic!("{at}: expected {want:?}, got {got_simple:?}"),
        }
        // Tie the expectations to the schema: an example valid against
        // openapi.yaml is read with no deviation; one that is not valid is
        // either read past with a deviation counted, or refused.
        let valid = json
            .as_ref()
            .is_some_and(|j| schemas.is_valid(schema_of(page, j), j));
        match &got_simple {
            Ok((_, dev)) if valid => assert!(dev.is_empty(), "{at}: valid but {dev:?}"),
            Ok((_, dev)) => assert!(!dev.is_empty(), "{at}: invalid, read with no deviation"),
            Err(_) => assert!(!valid, "{at}: valid but refused"),
        }
    }
}

#[test]
fn published_examples_are_read_or_refused_as_expected() {
    let schemas = Schemas::load();
    let none: &[(&str, u64)] = &[];
    check_page(
        &schemas,
        "Accounts.md",
        &[
            // `"OpeningDate": "01-05-2002"`: day-month or month-day cannot be
            // told, so the typed date is left empty (the raw object keeps it).
            Ok((2, &[("date_time_invalid", 1)])),
            Ok((1, none)),
            Ok((2, none)),
        ],
    );
    check_page(
        &schemas,
        "Balances.md",
        &[
            Ok((2, none)),
            // `Data.Balance` is one object instead of an array of one.
            Ok((1, &[("balance_object_not_array", 1)])),
            Ok((1, &[("balance_object_not_array", 1)])),
            Ok((1, &[("balance_object_not_array", 1)])),
            Ok((1, &[("balance_object_not_array", 1)])),
        ],
    );
    check_page(&schemas, "Transactions.md", &[Ok((1, none)), Ok((2, none))]);
    check_page(
        &schemas,
        "Parties.md",
        &[
            Ok((2, none)),
            // `Relationships` is an array of one instead of an object.
            Ok((2, &[("party_relationships_array_not_object", 2)])),
            // `Address` is one object instead of an array.
            Ok((1, &[("party_address_object_not_array", 1)])),
            Ok((1, none)),
        ],
    );
    check_page(
        &schemas,
        "Statements.md",
        &[
            // `Links` and `Meta` inside `Data`.
            Ok((2, &[("links_inside_data", 1)])),
            // Not JSON (a trailing comma, an unclosed array): refused.
            Err(()),
            Ok((3, &[("links_inside_data", 1)])),
        ],
    );
}

#[test]
fn published_examples_keep_the_banks_objects() {
    let example = &examples("Transactions.md")[1];
    let json: Value = serde_json::from_str(&example.text).unwrap();
    let mut dev = Deviations::default();
    let page = read::transactions(example.text.as_bytes(), None, &mut dev).unwrap();
    assert_eq!(page.items[0].raw, json["Data"]["Transaction"][0]);
    assert_eq!(page.items[1].raw, json["Data"]["Transaction"][1]);
    let t = &page.items[1];
    assert_eq!(t.account_id, "31820");
    assert_eq!(t.transaction_id.as_deref(), Some("567"));
    assert_eq!(t.amount.as_str(), "100.00");
    assert_eq!(t.currency, "GBP");
    assert_eq!(t.booking_date.to_string(), "2017-05-02");
    assert_eq!(t.description.as_deref(), Some("Paid the gas bill"));

    let example = &examples("Accounts.md")[0];
    let json: Value = serde_json::from_str(&example.text).unwrap();
    let page = read::accounts(example.text.as_bytes(), &mut dev).unwrap();
    assert_eq!(page.items[0].opening_date, None);
    assert_eq!(page.items[0].raw["OpeningDate"], "01-05-2002");
    assert_eq!(page.items[0].raw, json["Data"]["Account"][0]);
    assert!(Path::new(REFERENCE).is_dir());
}
