//! The Berlin Group NextGenPSD2 1.3 Account Information connector.

mod read;

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderValue, RETRY_AFTER};
use reqwest::{Client, Url};
use serde_json::Value;

use crate::connector::{
    BankData, Connector, ConnectorBuildError, ConnectorSettings, ConsentAccess, FetchFuture,
    InitialData, ProviderKind,
};
use crate::deviations::Deviations;
use crate::error::BankError;
use crate::obie::dedupe_transactions;
use crate::obie::outcome::parse_retry_after;

/// Responses larger than this are refused rather than buffered.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// The `tppMessages[].code`s that say the consent is no longer valid.
const CONSENT_GONE: [&str; 6] = [
    "CONSENT_INVALID",
    "CONSENT_EXPIRED",
    "CONSENT_UNKNOWN",
    "TOKEN_INVALID",
    "TOKEN_EXPIRED",
    "TOKEN_UNKNOWN",
];

/// The NextGenPSD2 1.3 AIS connector.
///
/// A fetch reads `GET {base}/v1/accounts`, then per account `/balances` and
/// `/transactions?bookingStatus=both&dateFrom=YYYY-MM-DD` (the UTC date of
/// `from_booking`), following `_links.next` (absolute or relative) within the
/// bank's origin, at most `max_pages` pages, never the same page twice. Every call
/// carries `Consent-ID` (the bank's consent id), `X-Request-ID` (the refresh's trace
/// id as a UUID, a fresh UUID without a trace), `traceparent` (a child of the
/// refresh's trace context) and,
/// when there is an access token, `Authorization: Bearer`. NextGenPSD2 has no
/// equivalent of the OBIE initial-load kinds: an initial load reads the same three
/// resources (and stores no other kinds). `PSU-IP-Address` is never sent: refreshd
/// does not hold the customer's address, so every call is one without the PSU
/// present.
///
/// Outcomes:
/// - a `tppMessages[].code` starting with `SCA`, or an error that links to
///   `scaRedirect`/`startAuthorisation` → [`BankError::MfaRequired`];
/// - `CONSENT_INVALID`, `CONSENT_UNKNOWN`, `TOKEN_*` (or 401/403 without a code
///   that says otherwise) → [`BankError::Revoked`]; `CONSENT_EXPIRED` →
///   [`BankError::Expired`];
/// - 408, 429 (`ACCESS_EXCEEDED`), 5xx, timeouts, connection errors →
///   [`BankError::Transient`] with the bank's `Retry-After`;
/// - anything else, and bodies that would store wrong data → [`BankError::Malformed`].
#[derive(Debug, Clone)]
pub struct BerlinGroupConnector {
    client: Client,
    settings: ConnectorSettings,
}

impl BerlinGroupConnector {
    /// Builds the HTTP client (rustls with the ring provider, no redirects).
    pub fn new(settings: ConnectorSettings) -> Result<Self, ConnectorBuildError> {
        let client = crate::connector::http_client(&settings)?;
        Ok(Self { client, settings })
    }

    async fn fetch(
        &self,
        access: &ConsentAccess,
        from_booking: DateTime<Utc>,
        initial: bool,
    ) -> Result<BankData, BankError> {
        let limit = self.settings.fetch_timeout;
        let fetch = async {
            let mut session = Session::new(self, access)?;
            session.fetch(from_booking, initial).await
        };
        crate::connector::within_fetch_timeout(limit, fetch).await
    }
}

impl Connector for BerlinGroupConnector {
    fn provider_kind(&self) -> ProviderKind {
        ProviderKind::BerlinGroup
    }

    fn fetch_refresh<'a>(
        &'a self,
        access: &'a ConsentAccess,
        from_booking: DateTime<Utc>,
    ) -> FetchFuture<'a> {
        Box::pin(self.fetch(access, from_booking, false))
    }

    fn fetch_initial<'a>(
        &'a self,
        access: &'a ConsentAccess,
        from_booking: DateTime<Utc>,
    ) -> FetchFuture<'a> {
        Box::pin(self.fetch(access, from_booking, true))
    }
}

struct Session<'a> {
    conn: &'a BerlinGroupConnector,
    access: &'a ConsentAccess,
    base: Url,
    dev: Deviations,
    requests: u32,
}

impl<'a> Session<'a> {
    fn new(conn: &'a BerlinGroupConnector, access: &'a ConsentAccess) -> Result<Self, BankError> {
        let base = crate::connector::base_url(access)?;
        Ok(Self {
            conn,
            access,
            base,
            dev: Deviations::default(),
            requests: 0,
        })
    }

    /// `{base}/v1/accounts[/{id}/{segment}]`, the id percent-encoded.
    fn url(&self, account: Option<(&str, &str)>) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push("v1").push("accounts");
            if let Some((id, segment)) = account {
                path.push(id).push(segment);
            }
        }
        url
    }

    async fn fetch(
        &mut self,
        from_booking: DateTime<Utc>,
        initial: bool,
    ) -> Result<BankData, BankError> {
        let body = self.get(&self.url(None), "accounts").await?;
        let accounts = read::accounts(&body, &mut self.dev)?;
        let mut seen = HashSet::new();
        if let Some(dup) = accounts
            .iter()
            .find(|a| !seen.insert(a.account_id.as_str()))
        {
            return Err(BankError::Malformed(format!(
                "accounts: account {:?} listed twice",
                dup.account_id
            )));
        }
        let date_from = from_booking.date_naive().to_string();
        let mut data = BankData {
            initial: initial.then(InitialData::default),
            ..BankData::default()
        };
        for account in &accounts {
            let id = account.account_id.as_str();
            let body = self
                .get(&self.url(Some((id, "balances"))), "balances")
                .await?;
            data.balances
                .extend(read::balances(&body, id, Utc::now(), &mut self.dev)?);

            let mut url = self.url(Some((id, "transactions")));
            url.query_pairs_mut()
                .append_pair("bookingStatus", "both")
                .append_pair("dateFrom", &date_from);
            let transactions = self.transactions(url, id).await?;
            data.transactions
                .extend(dedupe_transactions(transactions, &mut self.dev));
        }
        data.accounts = accounts;
        data.deviations = std::mem::take(&mut self.dev).into_map();
        data.requests = self.requests;
        Ok(data)
    }

    /// One account's transactions across the pages of `_links.next`.
    async fn transactions(
        &mut self,
        first: Url,
        id: &str,
    ) -> Result<Vec<crate::model::Transaction>, BankError> {
        let mut items = Vec::new();
        let mut visited = HashSet::new();
        let mut url = first;
        let mut pages = 0_u32;
        loop {
            pages += 1;
            visited.insert(url.as_str().to_owned());
            let body = self.get(&url, "transactions").await?;
            let page = read::transactions(&body, id, &mut self.dev)?;
            items.extend(page.items);
            let Some(next) = page.next else {
                return Ok(items);
            };
            let next = url
                .join(&next)
                .map_err(|e| BankError::Malformed(format!("transactions: bad _links.next: {e}")))?;
            if next.origin() != self.base.origin() {
                // Never send the consent's credentials anywhere but to the bank.
                return Err(BankError::Malformed(
                    "transactions: _links.next leaves the bank's origin".into(),
                ));
            }
            if visited.contains(next.as_str()) {
                return Err(BankError::Malformed(
                    "transactions: _links.next loops back to a page already read".into(),
                ));
            }
            if pages >= self.conn.settings.max_pages {
                return Err(BankError::Malformed(format!(
                    "transactions: more than {} pages",
                    self.conn.settings.max_pages
                )));
            }
            url = next;
        }
    }

    async fn get(&mut self, url: &Url, what: &str) -> Result<Vec<u8>, BankError> {
        let trace = self.access.call_trace();
        let request_id = trace.request_id;
        let consent_id = HeaderValue::try_from(self.access.bank_consent_id.as_str())
            .map_err(|_| BankError::Malformed("consent id is not a valid header value".into()))?;
        let mut request = self
            .conn
            .client
            .get(url.clone())
            .header("Consent-ID", consent_id)
            .header("X-Request-ID", &request_id)
            .header(ACCEPT, "application/json");
        if let Some(traceparent) = &trace.traceparent {
            request = request.header("traceparent", traceparent);
        }
        if !self.access.access_token.is_empty() {
            let mut bearer = HeaderValue::try_from(format!("Bearer {}", self.access.access_token))
                .map_err(|_| {
                    BankError::Malformed("access token is not a valid header value".into())
                })?;
            bearer.set_sensitive(true);
            request = request.header(AUTHORIZATION, bearer);
        }
        self.requests += 1;
        let mut response = request.send().await.map_err(|e| self.transport_error(&e))?;
        let status = response.status().as_u16();
        tracing::debug!(what, path = url.path(), status, request_id, "bank call");
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.transport_error(&e))?
        {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(BankError::Malformed(format!(
                    "{what}: response body over {MAX_BODY_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        if (200..300).contains(&status) {
            return Ok(body);
        }
        Err(
            match classify(status, retry_after.as_deref(), &body, Utc::now()) {
                BankError::Malformed(msg) => {
                    BankError::Malformed(format!("{what} {}: {msg}", url.path()))
                }
                other => other,
            },
        )
    }

    fn transport_error(&self, e: &reqwest::Error) -> BankError {
        crate::connector::transport_error(e, self.conn.settings.request_timeout)
    }
}

/// The `tppMessages[].code`s of a NextGenPSD2 error body, and whether it links to
/// an SCA step.
fn error_codes(body: &[u8]) -> (Vec<String>, bool) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return (Vec::new(), false);
    };
    let codes = v
        .get("tppMessages")
        .and_then(Value::as_array)
        .map(|messages| {
            messages
                .iter()
                .filter_map(|m| m.get("code").and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let links_sca = v.get("_links").and_then(Value::as_object).is_some_and(|l| {
        ["scaRedirect", "scaOAuth", "startAuthorisation"]
            .iter()
            .any(|k| l.contains_key(*k))
    });
    (codes, links_sca)
}

/// What a status other than 2xx means.
fn classify(status: u16, retry_after: Option<&str>, body: &[u8], now: DateTime<Utc>) -> BankError {
    let (codes, links_sca) = error_codes(body);
    let has = |code: &str| codes.iter().any(|c| c == code);
    if codes.iter().any(|c| c.starts_with("SCA")) || (links_sca && matches!(status, 401 | 403)) {
        return BankError::MfaRequired;
    }
    if has("CONSENT_EXPIRED") {
        return BankError::Expired;
    }
    if CONSENT_GONE.iter().any(|c| has(c)) {
        return BankError::Revoked;
    }
    match status {
        401 | 403 => BankError::Revoked,
        408 | 429 | 500..=599 => BankError::Transient {
            retry_after: retry_after.and_then(|v| parse_retry_after(v, now)),
            reason: match codes.first() {
                Some(code) => format!("http status {status} {code}"),
                None => format!("http status {status}"),
            },
        },
        _ => BankError::Malformed(match codes.first() {
            Some(code) => format!("unexpected http status {status} {code}"),
            None => format!("unexpected http status {status}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn check(status: u16, body: Value, retry_after: Option<&str>, expected: BankError) {
        let now = DateTime::parse_from_rfc3339("2026-12-02T03:00:00Z")
            .unwrap()
            .to_utc();
        let got = classify(status, retry_after, body.to_string().as_bytes(), now);
        assert_eq!(got, expected, "{status} {body}");
    }

    fn tpp(code: &str) -> Value {
        json!({"tppMessages": [{"category": "ERROR", "code": code, "text": "x"}]})
    }

    #[test]
    fn error_mapping() {
        check(401, tpp("CONSENT_INVALID"), None, BankError::Revoked);
        check(401, tpp("CONSENT_EXPIRED"), None, BankError::Expired);
        check(403, tpp("CONSENT_UNKNOWN"), None, BankError::Revoked);
        check(400, tpp("CONSENT_UNKNOWN"), None, BankError::Revoked);
        check(401, tpp("TOKEN_EXPIRED"), None, BankError::Revoked);
        check(401, json!({}), None, BankError::Revoked);
        check(403, tpp("SERVICE_BLOCKED"), None, BankError::Revoked);
        check(401, tpp("SCA_INVALID"), None, BankError::MfaRequired);
        check(403, tpp("SCA_REQUIRED"), None, BankError::MfaRequired);
        check(
            401,
            json!({"_links": {"scaRedirect": {"href": "https://bank/sca"}}}),
            None,
            BankError::MfaRequired,
        );
        check(
            429,
            tpp("ACCESS_EXCEEDED"),
            Some("120"),
            BankError::Transient {
                retry_after: Some(Duration::from_secs(120)),
                reason: "http status 429 ACCESS_EXCEEDED".into(),
            },
        );
        check(
            503,
            json!("down"),
            None,
            BankError::Transient {
                retry_after: None,
                reason: "http status 503".into(),
            },
        );
        check(
            400,
            tpp("FORMAT_ERROR"),
            None,
            BankError::Malformed("unexpected http status 400 FORMAT_ERROR".into()),
        );
        check(
            404,
            json!({}),
            None,
            BankError::Malformed("unexpected http status 404".into()),
        );
    }
}
