//! The HTTP API commands: consents, refreshes, history (SPEC §3), and the client
//! they share, which turns answers into [`Failure`]s with the right exit code.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use refresh_core::{ConsentId, RefreshId, TenantId};
use serde_json::Value;

use crate::output::{self, field, kv_table, table};
use crate::{Failure, HttpArgs, Outcome};

/// How often `refresh --wait` looks at the record.
const POLL: Duration = Duration::from_millis(500);
/// Longest wait for one answer (a refresh is followed by polling, not one long call).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An HTTP client for one ingress with one token.
#[derive(Clone)]
pub(crate) struct Api {
    base: String,
    token: String,
    client: reqwest::Client,
}

/// An answer from the API.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: Value,
}

impl Answer {
    /// The problem's `code`, when the answer is a problem.
    pub(crate) fn code(&self) -> Option<&str> {
        self.body.get("code").and_then(Value::as_str)
    }

    /// What a person reads about a refusal: the problem's detail (or title), with
    /// the status and code.
    pub(crate) fn refusal(&self) -> String {
        let detail = ["detail", "title", "message"]
            .iter()
            .find_map(|key| self.body.get(*key).and_then(Value::as_str))
            .map_or_else(|| output::compact(&self.body), str::to_owned);
        match self.code() {
            Some(code) => format!("{} {code}: {detail}", self.status),
            None => format!("{}: {detail}", self.status),
        }
    }

    fn success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

impl Api {
    pub(crate) fn new(args: &HttpArgs) -> Result<Self, Failure> {
        let token = args.token.clone().ok_or_else(|| {
            Failure::Usage(
                "no API token: pass --token or set REFRESHCTL_TOKEN (`refreshctl token --tenant T` mints one in development)"
                    .to_owned(),
            )
        })?;
        let base = args.url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Failure::Usage(format!(
                "--url {base:?} must start with http:// or https://"
            )));
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("refreshctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Failure::Refused(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            base,
            token,
            client,
        })
    }

    /// Sends a request; a transport failure is [`Failure::Unreachable`], any answer is `Ok`.
    pub(crate) async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Answer, Failure> {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .query(query);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| self.unreachable(&e))?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(|e| self.unreachable(&e))?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Answer { status, body })
    }

    fn unreachable(&self, error: &reqwest::Error) -> Failure {
        let why = if error.is_timeout() {
            "no answer in time"
        } else if error.is_connect() {
            "cannot connect"
        } else {
            "the connection failed"
        };
        Failure::Unreachable(format!("{}: {why} ({error})", self.base))
    }

    /// A GET that must succeed; its body.
    async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, Failure> {
        let answer = self.send(reqwest::Method::GET, path, query, None).await?;
        if answer.success() {
            Ok(answer.body)
        } else {
            Err(Failure::Refused(answer.refusal()))
        }
    }
}

/// `consents register`.
pub(crate) async fn register(api: Api, body: Value, json: bool) -> Outcome {
    let answer = api
        .send(reqwest::Method::POST, "/v1/consents", &[], Some(&body))
        .await?;
    if !answer.success() {
        return Err(Failure::Refused(answer.refusal()));
    }
    if json {
        println!("{}", output::compact(&answer.body));
    } else {
        let body = &answer.body;
        let initial = &body["initialRefresh"];
        let initial_text = match initial.get("refreshId").and_then(Value::as_str) {
            Some(id) => format!("{id} ({})", field(initial, "status")),
            None => format!("not started: {}", field(&initial["problem"], "detail")),
        };
        print!(
            "{}",
            kv_table(&[
                ("consentId", field(body, "consentId")),
                ("providerId", field(body, "providerId")),
                ("status", field(body, "status")),
                ("expiresAt", field(body, "expiresAt")),
                ("initial load", initial_text),
            ])
        );
    }
    Ok(())
}

/// What `consents list` asks for.
pub(crate) struct ListQuery {
    pub(crate) status: Option<String>,
    pub(crate) tenant: Option<TenantId>,
    pub(crate) limit: u32,
    pub(crate) cursor: Option<String>,
    pub(crate) all: bool,
}

/// `consents list`: `GET /v1/consents`, `{items, nextCursor}`, one page or all.
pub(crate) async fn list(api: Api, query: ListQuery, json: bool) -> Outcome {
    let mut cursor = query.cursor.clone();
    let mut items = Vec::new();
    let next = loop {
        let mut params = vec![("limit", query.limit.to_string())];
        if let Some(status) = &query.status {
            params.push(("status", status.clone()));
        }
        if let Some(tenant) = &query.tenant {
            params.push(("tenantId", tenant.to_string()));
        }
        if let Some(cursor) = &cursor {
            params.push(("cursor", cursor.clone()));
        }
        let page = api.get("/v1/consents", &params).await?;
        let Some(page_items) = page.get("items").and_then(Value::as_array) else {
            return Err(Failure::Refused(format!(
                "unexpected answer to GET /v1/consents (no items): {}",
                output::compact(&page)
            )));
        };
        items.extend(page_items.iter().cloned());
        let next = page
            .get("nextCursor")
            .and_then(Value::as_str)
            .map(str::to_owned);
        match next {
            Some(next) if query.all => cursor = Some(next),
            other => break other,
        }
    };
    if json {
        let page = serde_json::json!({ "items": items, "nextCursor": next });
        println!("{}", output::compact(&page));
        return Ok(());
    }
    let rows = items
        .iter()
        .map(|c| {
            vec![
                field(c, "consentId"),
                field(c, "providerId"),
                field(c, "status"),
                field(c, "expiresAt"),
                field(c, "lastRefreshedAt"),
                yes_no(c.get("refreshing")),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "CONSENT",
                "PROVIDER",
                "STATUS",
                "EXPIRES",
                "LAST REFRESHED",
                "REFRESHING"
            ],
            rows
        )
    );
    if let Some(next) = next {
        eprintln!("more: --cursor {next}");
    }
    Ok(())
}

fn yes_no(value: Option<&Value>) -> String {
    match value.and_then(Value::as_bool) {
        Some(true) => "yes".to_owned(),
        Some(false) => "no".to_owned(),
        None => "-".to_owned(),
    }
}

/// `consent ID`: the consent with its quota, and its last refresh from the history.
pub(crate) async fn consent(api: Api, id: ConsentId, json: bool) -> Outcome {
    let mut consent = api.get(&format!("/v1/consents/{id}"), &[]).await?;
    let history = api
        .get(&format!("/v1/consents/{id}/refreshes"), &[])
        .await?;
    let last = history_items(&history)
        .first()
        .cloned()
        .unwrap_or(Value::Null);
    if json {
        consent["lastRefresh"] = last;
        println!("{}", output::compact(&consent));
        return Ok(());
    }
    let quota = &consent["quota"];
    let quota_text = if quota.is_object() {
        let mut text = format!(
            "{} of {} used ({})",
            field(quota, "used"),
            field(quota, "limit"),
            field(quota, "window")
        );
        if let Some(next) = quota.get("nextRefreshPossibleAt").and_then(Value::as_str) {
            text.push_str(&format!(", next refresh possible at {next}"));
        }
        text
    } else {
        "-".to_owned()
    };
    let last_text = if last.is_null() {
        "none".to_owned()
    } else {
        format!(
            "{} {} ({}, {})",
            field(&last, "refreshId"),
            field(&last, "status"),
            field(&last, "requestedBy"),
            field(&last, "dateRequested")
        )
    };
    print!(
        "{}",
        kv_table(&[
            ("consentId", field(&consent, "consentId")),
            ("providerId", field(&consent, "providerId")),
            ("status", field(&consent, "status")),
            ("expiresAt", field(&consent, "expiresAt")),
            ("lastRefreshedAt", field(&consent, "lastRefreshedAt")),
            ("refreshing", yes_no(consent.get("refreshing"))),
            ("quota", quota_text),
            ("last refresh", last_text),
        ])
    );
    Ok(())
}

fn history_items(body: &Value) -> Vec<Value> {
    body.get("items")
        .or(Some(body))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// `history ID`.
pub(crate) async fn history(api: Api, id: ConsentId, json: bool) -> Outcome {
    let body = api
        .get(&format!("/v1/consents/{id}/refreshes"), &[])
        .await?;
    if json {
        println!("{}", output::compact(&body));
        return Ok(());
    }
    let rows = history_items(&body)
        .iter()
        .map(|r| {
            vec![
                field(r, "dateRequested"),
                field(r, "refreshId"),
                field(r, "requestedBy"),
                field(r, "status"),
                outcome_text(r),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["REQUESTED", "REFRESH", "BY", "STATUS", "RESULT"], rows)
    );
    Ok(())
}

/// `refreshes ID`.
pub(crate) async fn refresh_record(api: Api, id: RefreshId, json: bool) -> Outcome {
    let record = api.get(&format!("/v1/refreshes/{id}"), &[]).await?;
    print_record(&record, json);
    Ok(())
}

fn print_record(record: &Value, json: bool) {
    if json {
        println!("{}", output::compact(record));
        return;
    }
    print!(
        "{}",
        kv_table(&[
            ("refreshId", field(record, "refreshId")),
            ("consentId", field(record, "consentId")),
            ("tenantId", field(record, "tenantId")),
            ("requestedBy", field(record, "requestedBy")),
            ("status", field(record, "status")),
            ("dateRequested", field(record, "dateRequested")),
            ("notBefore", field(record, "notBefore")),
            ("startedAt", field(record, "startedAt")),
            ("finishedAt", field(record, "finishedAt")),
            ("result", outcome_text(record)),
        ])
    );
}

/// The summary or the error of a refresh record, in a few words.
pub(crate) fn outcome_text(record: &Value) -> String {
    if let Some(error) = record.get("error").filter(|e| e.is_object()) {
        return format!("{}: {}", field(error, "code"), field(error, "message"));
    }
    match record.get("summary").filter(|s| s.is_object()) {
        Some(s) => format!(
            "{} accounts, {} balances, transactions +{} ~{} -{}",
            field(s, "accountsUpdated"),
            field(s, "balancesUpdated"),
            field(s, "transactionsAdded"),
            field(s, "transactionsUpdated"),
            field(s, "transactionsRemoved")
        ),
        None => "-".to_owned(),
    }
}

/// `refresh ID [--wait]`: 202 → the record; with `wait`, polls it to its terminal
/// status with a live line; `ERROR` fails (exit 1), as does any refusal.
pub(crate) async fn refresh(api: Api, id: ConsentId, wait: Option<u64>, json: bool) -> Outcome {
    let answer = api
        .send(
            reqwest::Method::POST,
            &format!("/v1/consents/{id}/refresh"),
            &[],
            None,
        )
        .await?;
    if !answer.success() {
        if json {
            println!("{}", output::compact(&answer.body));
        }
        return Err(Failure::Refused(answer.refusal()));
    }
    let Some(wait) = wait else {
        print_record(&answer.body, json);
        return Ok(());
    };
    let refresh_id = field(&answer.body, "refreshId");
    let started = Instant::now();
    let line = ProgressBar::new_spinner();
    line.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    line.enable_steady_tick(Duration::from_millis(120));
    let mut record = answer.body;
    loop {
        let status = field(&record, "status");
        if status != "INITIALIZED" {
            line.finish_and_clear();
            if !json {
                eprintln!("refresh {refresh_id}: {status}");
            }
            print_record(&record, json);
            return if status == "UPDATED" {
                Ok(())
            } else {
                Err(Failure::Refused(format!(
                    "refresh {refresh_id} ended {status}: {}",
                    outcome_text(&record)
                )))
            };
        }
        let phase = if record.get("startedAt").is_some_and(|s| !s.is_null()) {
            "running at the bank".to_owned()
        } else {
            format!("queued, starts at {}", field(&record, "notBefore"))
        };
        line.set_message(format!("refresh {refresh_id}: INITIALIZED ({phase})"));
        if started.elapsed() > Duration::from_secs(wait) {
            line.finish_and_clear();
            return Err(Failure::Refused(format!(
                "refresh {refresh_id} is still INITIALIZED after {wait} s"
            )));
        }
        tokio::time::sleep(POLL).await;
        record = api.get(&format!("/v1/refreshes/{refresh_id}"), &[]).await?;
    }
}
