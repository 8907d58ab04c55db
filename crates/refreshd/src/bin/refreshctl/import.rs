//! `consents import FILE`: many registrations from CSV or JSON lines, a bounded
//! number in flight, a progress bar, every bad line reported with its line number
//! (and never stopping the rest), and a summary by outcome.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::DateTime;
use futures_util::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::Api;
use crate::output::{self, table};
use crate::{Failure, Outcome};

/// The formats `consents import` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Comma-separated, a header row naming the columns.
    Csv,
    /// One JSON object a line.
    Jsonl,
}

/// One consent to register, as written in the file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Line {
    #[serde(default)]
    pub(crate) consent_id: Option<String>,
    #[serde(default)]
    pub(crate) provider_id: String,
    #[serde(default)]
    pub(crate) bank_consent_id: String,
    #[serde(default)]
    pub(crate) access_token: String,
    #[serde(default)]
    pub(crate) expires_at: String,
}

impl Line {
    /// The `POST /v1/consents` body, or why this line cannot be one.
    pub(crate) fn validate(&self) -> Result<Value, String> {
        let required = [
            ("providerId", &self.provider_id),
            ("bankConsentId", &self.bank_consent_id),
            ("accessToken", &self.access_token),
            ("expiresAt", &self.expires_at),
        ];
        if let Some((name, _)) = required.iter().find(|(_, v)| v.trim().is_empty()) {
            return Err(format!("{name} is missing"));
        }
        if DateTime::parse_from_rfc3339(self.expires_at.trim()).is_err() {
            return Err(format!(
                "expiresAt {:?} is not an RFC 3339 time (e.g. 2027-01-31T00:00:00Z)",
                self.expires_at
            ));
        }
        let consent_id = self
            .consent_id
            .as_deref()
            .map(str::trim)
            .filter(|id| !id.is_empty());
        if let Some(id) = consent_id
            && id.parse::<uuid::Uuid>().is_err()
        {
            return Err(format!("consentId {id:?} is not a UUID"));
        }
        let mut body = json!({
            "providerId": self.provider_id.trim(),
            "bankConsentId": self.bank_consent_id.trim(),
            "accessToken": self.access_token.trim(),
            "expiresAt": self.expires_at.trim(),
        });
        if let Some(id) = consent_id {
            body["consentId"] = Value::String(id.to_owned());
        }
        Ok(body)
    }
}

/// A line of the file: its number (1-based) and what it holds.
struct Numbered {
    line: u64,
    parsed: Result<Value, String>,
}

/// What became of one line.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum LineOutcome {
    Registered,
    /// The consent (its id, or provider + bank consent id) was registered before.
    Exists,
    /// The line is not a consent (reported with its number).
    Invalid,
    /// The API refused it, with this problem code.
    Refused(String),
    /// The API did not answer.
    Unreachable,
}

impl LineOutcome {
    fn label(&self) -> String {
        match self {
            Self::Registered => "registered".to_owned(),
            Self::Exists => "already registered".to_owned(),
            Self::Invalid => "invalid line".to_owned(),
            Self::Refused(code) => format!("refused: {code}"),
            Self::Unreachable => "unreachable".to_owned(),
        }
    }

    fn key(&self) -> String {
        match self {
            Self::Registered => "registered".to_owned(),
            Self::Exists => "exists".to_owned(),
            Self::Invalid => "invalid".to_owned(),
            Self::Refused(code) => format!("refused:{code}"),
            Self::Unreachable => "unreachable".to_owned(),
        }
    }
}

/// Reads the file into numbered lines (bad ones carry their reason).
fn read(path: &Path, format: Option<Format>) -> Result<Vec<Numbered>, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?;
    let format = format.unwrap_or_else(|| {
        let csv = path
            .extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("csv"));
        if csv { Format::Csv } else { Format::Jsonl }
    });
    match format {
        Format::Jsonl => Ok(read_jsonl(&text)),
        Format::Csv => read_csv(&text),
    }
}

fn read_jsonl(text: &str) -> Vec<Numbered> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, raw)| Numbered {
            line: index as u64 + 1,
            parsed: serde_json::from_str::<Line>(raw)
                .map_err(|e| format!("not a consent object: {}", json_reason(&e)))
                .and_then(|line| line.validate()),
        })
        .collect()
}

/// serde_json's message without its "at line 1 column N" (the line is ours to name).
fn json_reason(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rfind(" at line ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

const CSV_COLUMNS: [&str; 5] = [
    "consentId",
    "providerId",
    "bankConsentId",
    "accessToken",
    "expiresAt",
];

fn read_csv(text: &str) -> Result<Vec<Numbered>, Failure> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| Failure::Usage(format!("line 1: cannot read the header row: {e}")))?
        .clone();
    let mut index = BTreeMap::new();
    for (position, name) in headers.iter().enumerate() {
        if !CSV_COLUMNS.contains(&name) {
            return Err(Failure::Usage(format!(
                "line 1: unknown column {name:?} (the columns are {})",
                CSV_COLUMNS.join(", ")
            )));
        }
        index.insert(name.to_owned(), position);
    }
    if let Some(missing) = CSV_COLUMNS[1..].iter().find(|c| !index.contains_key(**c)) {
        return Err(Failure::Usage(format!(
            "line 1: the header row lacks the column {missing}"
        )));
    }
    let mut lines = Vec::new();
    let mut record = csv::StringRecord::new();
    loop {
        let line_number = reader.position().line();
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let line = record.position().map_or(line_number, csv::Position::line);
                let get = |name: &str| {
                    index
                        .get(name)
                        .and_then(|i| record.get(*i))
                        .unwrap_or_default()
                        .to_owned()
                };
                let consent_id = Some(get("consentId")).filter(|id| !id.is_empty());
                let parsed = Line {
                    consent_id,
                    provider_id: get("providerId"),
                    bank_consent_id: get("bankConsentId"),
                    access_token: get("accessToken"),
                    expires_at: get("expiresAt"),
                }
                .validate();
                lines.push(Numbered { line, parsed });
            }
            Err(error) => {
                let line = error.position().map_or(line_number, csv::Position::line);
                let reason = match error.kind() {
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => format!("{len} fields where the header has {expected_len}"),
                    csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".to_owned(),
                    _ => error.to_string(),
                };
                lines.push(Numbered {
                    line,
                    parsed: Err(reason),
                });
                if !matches!(
                    error.kind(),
                    csv::ErrorKind::UnequalLengths { .. } | csv::ErrorKind::Utf8 { .. }
                ) {
                    break; // an I/O error: nothing more can be read
                }
            }
        }
    }
    Ok(lines)
}

/// `consents import FILE`.
pub(crate) async fn run(
    api: Api,
    path: &Path,
    format: Option<Format>,
    concurrency: usize,
    json: bool,
) -> Outcome {
    let lines = read(path, format)?;
    let total = lines.len() as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} consents [{elapsed_precise}, {per_sec}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let results: Vec<(u64, LineOutcome, Option<String>)> = futures_util::stream::iter(lines)
        .map(|numbered| {
            let api = api.clone();
            async move {
                let (outcome, detail) = register(&api, numbered.parsed).await;
                (numbered.line, outcome, detail)
            }
        })
        .buffer_unordered(concurrency)
        .inspect(|(line, outcome, detail)| {
            if let Some(detail) = detail {
                // Shown above the bar, and also when stderr is not a terminal.
                bar.suspend(|| eprintln!("line {line}: {}: {detail}", outcome.label()));
            }
            bar.inc(1);
        })
        .collect()
        .await;
    bar.finish_and_clear();

    let mut counts: BTreeMap<LineOutcome, u64> = BTreeMap::new();
    for (_, outcome, _) in &results {
        *counts.entry(outcome.clone()).or_default() += 1;
    }
    let mut failures: Vec<&(u64, LineOutcome, Option<String>)> =
        results.iter().filter(|(_, _, d)| d.is_some()).collect();
    failures.sort_by_key(|(line, _, _)| *line);
    let count = |o: &LineOutcome| counts.get(o).copied().unwrap_or(0);
    if json {
        let outcomes: serde_json::Map<String, Value> = counts
            .iter()
            .map(|(o, n)| (o.key(), Value::from(*n)))
            .collect();
        let failures: Vec<Value> = failures
            .iter()
            .map(|(line, outcome, detail)| {
                json!({ "line": line, "outcome": outcome.key(), "detail": detail })
            })
            .collect();
        let summary = json!({
            "lines": total,
            "registered": count(&LineOutcome::Registered),
            "outcomes": outcomes,
            "failures": failures,
        });
        println!("{}", output::compact(&summary));
    } else {
        let rows = counts
            .iter()
            .map(|(o, n)| vec![o.label(), n.to_string()])
            .collect();
        print!("{}", table(&["OUTCOME", "LINES"], rows));
    }
    let unreachable = count(&LineOutcome::Unreachable);
    let done = count(&LineOutcome::Registered) + count(&LineOutcome::Exists);
    if unreachable > 0 {
        Err(Failure::Unreachable(format!(
            "{unreachable} of {total} lines not registered: the API did not answer"
        )))
    } else if done < total {
        Err(Failure::Refused(format!(
            "{} of {total} lines not registered (see the lines above)",
            total - done
        )))
    } else {
        Ok(())
    }
}

/// Registers one line; a detail comes with every outcome that is not a success.
async fn register(api: &Api, parsed: Result<Value, String>) -> (LineOutcome, Option<String>) {
    let body = match parsed {
        Ok(body) => body,
        Err(reason) => return (LineOutcome::Invalid, Some(reason)),
    };
    let answer = match api
        .send(reqwest::Method::POST, "/v1/consents", &[], Some(&body))
        .await
    {
        Ok(answer) => answer,
        Err(failure) => {
            let detail = match failure {
                Failure::Unreachable(m)
                | Failure::Refused(m)
                | Failure::Usage(m)
                | Failure::Config(m) => m,
            };
            return (LineOutcome::Unreachable, Some(detail));
        }
    };
    if answer.status == 201 {
        return (LineOutcome::Registered, None);
    }
    match answer.code() {
        Some("consent_exists") => (LineOutcome::Exists, None),
        code => (
            LineOutcome::Refused(code.unwrap_or("http_error").to_owned()),
            Some(answer.refusal()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes(lines: &[Numbered]) -> Vec<(u64, Result<(), String>)> {
        lines
            .iter()
            .map(|n| (n.line, n.parsed.as_ref().map(|_| ()).map_err(Clone::clone)))
            .collect()
    }

    #[test]
    fn json_lines_are_numbered_and_bad_ones_say_why() {
        let text = concat!(
            r#"{"providerId":"sim","bankConsentId":"b1","accessToken":"t1","expiresAt":"2030-01-01T00:00:00Z"}"#,
            "\n\n",
            "not json\n",
            r#"{"providerId":"sim","bankConsentId":"b2","accessToken":"t2","expiresAt":"soon"}"#,
            "\n",
            r#"{"providerId":"sim","bankConsentId":"b3","expiresAt":"2030-01-01T00:00:00Z"}"#,
            "\n",
            r#"{"providerId":"sim","bankConsentId":"b4","accessToken":"t","expiresAt":"2030-01-01T00:00:00Z","consentId":"x"}"#,
            "\n",
        );
        assert_eq!(
            outcomes(&read_jsonl(text)),
            [
                (1, Ok(())),
                (3, Err("not a consent object: expected ident".to_owned())),
                (
                    4,
                    Err(
                        "expiresAt \"soon\" is not an RFC 3339 time (e.g. 2027-01-31T00:00:00Z)"
                            .to_owned()
                    )
                ),
                (5, Err("accessToken is missing".to_owned())),
                (6, Err("consentId \"x\" is not a UUID".to_owned())),
            ]
        );
    }

    #[test]
    fn csv_rows_are_numbered_by_their_line_in_the_file() {
        let text = "providerId,bankConsentId,accessToken,expiresAt\n\
                    sim,b1,t1,2030-01-01T00:00:00Z\n\
                    sim,b2,t2\n\
                    sim,b3,t3,2030-01-01T00:00:00Z\n\
                    sim,,t4,2030-01-01T00:00:00Z\n";
        assert_eq!(
            outcomes(&read_csv(text).unwrap()),
            [
                (2, Ok(())),
                (3, Err("3 fields where the header has 4".to_owned())),
                (4, Ok(())),
                (5, Err("bankConsentId is missing".to_owned())),
            ]
        );
        assert!(matches!(
            read_csv("provider,bankConsentId\n"),
            Err(Failure::Usage(m)) if m.starts_with("line 1: unknown column \"provider\"")
        ));
    }
}
