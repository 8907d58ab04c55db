//! The UK Open Banking (OBIE) Read/Write API v3.1 Account Information connector.

pub(crate) mod outcome;
mod read;
mod wire;

#[cfg(test)]
mod examples_tests;

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderValue, RETRY_AFTER};
use reqwest::{Client, Url};

use crate::connector::{
    BankData, Connector, ConnectorBuildError, ConnectorSettings, ConsentAccess, FetchFuture,
    InitialData, ProviderKind,
};
use crate::deviations::{self as dv, Deviations};
use crate::error::BankError;
use crate::model::{BankItem, Transaction};
use read::{Page, Resource};

pub use outcome::SCA_ERROR_CODE;

/// Responses larger than this are refused rather than buffered.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// The UK Open Banking v3.1 AIS connector.
///
/// A fetch reads `GET /accounts`, then per account `/balances` and
/// `/transactions?fromBookingDateTime=…` (from the start of the UTC day of
/// `from_booking`, so that every booking date in the batch is complete: the
/// by-date merge of id-less transactions relies on it), following `Links.Next`
/// within the bank's origin, at most `max_pages` pages per listing, never the
/// same page twice. The initial load adds, per account, `/parties`, `/party`,
/// `/beneficiaries`, `/direct-debits`, `/standing-orders`,
/// `/scheduled-payments`, `/statements` and `/product`.
///
/// Outcomes:
/// - 401, or 403 for a data call → [`BankError::Revoked`];
/// - 401/403 whose OBIE error body has an `Errors[].ErrorCode` of
///   `UK.OBIE.Reauthenticate` (or a bank code with a part starting `SCA`) →
///   [`BankError::MfaRequired`] (the convention the simulator follows);
/// - 408, 425, 429, 5xx, timeouts, connection errors →
///   [`BankError::Transient`] with the bank's `Retry-After`;
/// - bad JSON, schema violations that would store wrong data, other statuses,
///   redirects, endless pagination → [`BankError::Malformed`].
///
/// The optional initial-load listings may be outside the consent's
/// permissions: a 403 (without an SCA code), 404, 405 or 501 there skips that
/// listing and counts `optional_resource_unavailable`.
#[derive(Debug, Clone)]
pub struct ObieConnector {
    client: Client,
    settings: ConnectorSettings,
}

impl ObieConnector {
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
            let data = session.fetch(from_booking, initial).await;
            tracing::debug!(
                requests = session.requests,
                ok = data.is_ok(),
                initial,
                "bank fetch finished"
            );
            data
        };
        crate::connector::within_fetch_timeout(limit, fetch).await
    }
}

impl Connector for ObieConnector {
    fn provider_kind(&self) -> ProviderKind {
        ProviderKind::Obie
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

/// One fetch: the consent, its base URL, and what was counted on the way.
struct Session<'a> {
    conn: &'a ObieConnector,
    access: &'a ConsentAccess,
    base: Url,
    dev: Deviations,
    requests: u32,
}

impl<'a> Session<'a> {
    fn new(conn: &'a ObieConnector, access: &'a ConsentAccess) -> Result<Self, BankError> {
        let base = crate::connector::base_url(access)?;
        Ok(Self {
            conn,
            access,
            base,
            dev: Deviations::default(),
            requests: 0,
        })
    }

    /// `{base}/accounts[/{id}/{segment}]`, the id percent-encoded.
    fn url(&self, account: Option<&str>, resource: Resource) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push("accounts");
            if let Some(account) = account {
                path.push(account).push(resource.segment());
            }
        }
        url
    }

    async fn fetch(
        &mut self,
        from_booking: DateTime<Utc>,
        initial: bool,
    ) -> Result<BankData, BankError> {
        let accounts = self
            .list(
                self.url(None, Resource::Accounts),
                Resource::Accounts,
                false,
                read::accounts,
            )
            .await?;
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
        let from = from_booking.format("%Y-%m-%dT00:00:00").to_string();
        let mut data = BankData {
            initial: initial.then(InitialData::default),
            ..BankData::default()
        };
        for account in &accounts {
            let id = account.account_id.as_str();
            let url = self.url(Some(id), Resource::Balances);
            let balances = self
                .list(url, Resource::Balances, false, |b, d| {
                    read::balances(b, Some(id), d)
                })
                .await?;
            data.balances.extend(balances);

            let mut url = self.url(Some(id), Resource::Transactions);
            url.query_pairs_mut()
                .append_pair("fromBookingDateTime", &from);
            let transactions = self
                .list(url, Resource::Transactions, false, |b, d| {
                    read::transactions(b, Some(id), d)
                })
                .await?;
            data.transactions
                .extend(dedupe_transactions(transactions, &mut self.dev));

            if let Some(more) = data.initial.as_mut() {
                self.fetch_initial_kinds(id, more).await?;
            }
        }
        data.accounts = accounts;
        data.deviations = std::mem::take(&mut self.dev).into_map();
        data.requests = self.requests;
        Ok(data)
    }

    async fn fetch_initial_kinds(
        &mut self,
        id: &str,
        more: &mut InitialData,
    ) -> Result<(), BankError> {
        for resource in [Resource::Parties, Resource::Party] {
            let parties = self
                .list(self.url(Some(id), resource), resource, true, |b, d| {
                    read::parties(b, resource, id, d)
                })
                .await?;
            for party in parties {
                let known = more
                    .parties
                    .iter()
                    .any(|p| p.account_id == party.account_id && p.id == party.id);
                if !known {
                    more.parties.push(party);
                }
            }
        }
        let listings: [(Resource, &mut Vec<BankItem>); 6] = [
            (Resource::Beneficiaries, &mut more.beneficiaries),
            (Resource::DirectDebits, &mut more.direct_debits),
            (Resource::StandingOrders, &mut more.standing_orders),
            (Resource::ScheduledPayments, &mut more.scheduled_payments),
            (Resource::Statements, &mut more.statements),
            (Resource::Product, &mut more.products),
        ];
        for (resource, into) in listings {
            let items = self
                .list(self.url(Some(id), resource), resource, true, |b, d| {
                    read::bank_items(b, resource, Some(id), d)
                })
                .await?;
            into.extend(items);
        }
        Ok(())
    }

    /// Reads a listing across its pages.
    async fn list<T>(
        &mut self,
        first: Url,
        resource: Resource,
        optional: bool,
        mut parse: impl FnMut(&[u8], &mut Deviations) -> Result<Page<T>, BankError>,
    ) -> Result<Vec<T>, BankError> {
        let mut items = Vec::new();
        let mut visited = HashSet::new();
        let mut url = first;
        let mut pages = 0_u32;
        loop {
            pages += 1;
            visited.insert(url.as_str().to_owned());
            // Only the first page of an optional listing may be "not there".
            let Some(body) = self.get(&url, resource, optional && pages == 1).await? else {
                self.dev.note(dv::OPTIONAL_RESOURCE_UNAVAILABLE);
                return Ok(items);
            };
            let page = parse(&body, &mut self.dev)?;
            items.extend(page.items);
            let Some(next) = page.next else {
                return Ok(items);
            };
            let next = url.join(&next).map_err(|e| {
                BankError::Malformed(format!("{}: bad Links.Next: {e}", resource.segment()))
            })?;
            if next.origin() != self.base.origin() {
                // Never send the token anywhere but to the bank.
                return Err(BankError::Malformed(format!(
                    "{}: Links.Next leaves the bank's origin",
                    resource.segment()
                )));
            }
            if visited.contains(next.as_str()) {
                return Err(BankError::Malformed(format!(
                    "{}: Links.Next loops back to a page already read",
                    resource.segment()
                )));
            }
            if pages >= self.conn.settings.max_pages {
                return Err(BankError::Malformed(format!(
                    "{}: more than {} pages",
                    resource.segment(),
                    self.conn.settings.max_pages
                )));
            }
            url = next;
        }
    }

    /// One GET; `None` when an optional listing is not available.
    async fn get(
        &mut self,
        url: &Url,
        resource: Resource,
        optional: bool,
    ) -> Result<Option<Vec<u8>>, BankError> {
        let trace = self.access.call_trace();
        let interaction_id = trace.request_id;
        let mut bearer = HeaderValue::try_from(format!("Bearer {}", self.access.access_token))
            .map_err(|_| BankError::Malformed("access token is not a valid header value".into()))?;
        bearer.set_sensitive(true);
        self.requests += 1;
        let mut request = self
            .conn
            .client
            .get(url.clone())
            .header(AUTHORIZATION, bearer)
            .header("x-fapi-financial-id", &self.access.financial_id)
            .header("x-fapi-interaction-id", &interaction_id)
            .header(ACCEPT, "application/json");
        if let Some(traceparent) = &trace.traceparent {
            request = request.header("traceparent", traceparent);
        }
        let sent = request.send().await;
        let mut response = sent.map_err(|e| self.transport_error(&e))?;
        let status = response.status().as_u16();
        tracing::debug!(
            resource = resource.segment(),
            path = url.path(),
            status,
            interaction_id,
            "bank call"
        );
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
                    "{}: response body over {MAX_BODY_BYTES} bytes",
                    resource.segment()
                )));
            }
            body.extend_from_slice(&chunk);
        }
        if (200..300).contains(&status) {
            return Ok(Some(body));
        }
        outcome::classify(status, retry_after.as_deref(), &body, optional, Utc::now())
            .map(|()| None)
            .map_err(|e| match e {
                BankError::Malformed(msg) => {
                    BankError::Malformed(format!("{} {}: {msg}", resource.segment(), url.path()))
                }
                other => other,
            })
    }

    fn transport_error(&self, e: &reqwest::Error) -> BankError {
        crate::connector::transport_error(e, self.conn.settings.request_timeout)
    }
}

/// Within one account, one transaction per `TransactionId`: the last one read.
pub(crate) fn dedupe_transactions(
    items: Vec<Transaction>,
    dev: &mut Deviations,
) -> Vec<Transaction> {
    let mut out: Vec<Transaction> = Vec::with_capacity(items.len());
    let mut at: HashMap<String, usize> = HashMap::new();
    for t in items {
        if let Some(id) = &t.transaction_id {
            if let Some(&i) = at.get(id) {
                dev.note(dv::DUPLICATE_TRANSACTION_ID);
                out[i] = t;
                continue;
            }
            at.insert(id.clone(), out.len());
        }
        out.push(t);
    }
    out
}
