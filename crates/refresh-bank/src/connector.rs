//! The `Connector` trait the worker talks to, its inputs and outputs, and the
//! factory that picks an implementation by provider kind.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use refresh_core::TraceContext;

use crate::berlin_group::BerlinGroupConnector;
use crate::error::BankError;
use crate::model::{Account, Balance, BankItem, Transaction};
use crate::obie::ObieConnector;

/// What a fetch returns; boxed so that `Arc<dyn Connector>` works.
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<BankData, BankError>> + Send + 'a>>;

/// A bank API. One implementation per API family (UK OBIE, Berlin Group
/// NextGenPSD2), chosen by [`ProviderKind`].
pub trait Connector: Send + Sync {
    /// Which API family this connector speaks.
    fn provider_kind(&self) -> ProviderKind;

    /// A plain refresh: accounts, balances and the transactions booked from
    /// `from_booking` on.
    fn fetch_refresh<'a>(
        &'a self,
        access: &'a ConsentAccess,
        from_booking: DateTime<Utc>,
    ) -> FetchFuture<'a>;

    /// The initial connection load: everything `fetch_refresh` loads, plus
    /// parties, beneficiaries, direct debits, standing orders, scheduled
    /// payments, statements and products ([`BankData::initial`] is `Some`).
    fn fetch_initial<'a>(
        &'a self,
        access: &'a ConsentAccess,
        from_booking: DateTime<Utc>,
    ) -> FetchFuture<'a>;
}

/// How to reach one consent at its bank.
#[derive(Clone, PartialEq, Eq)]
pub struct ConsentAccess {
    /// The provider's API root, e.g. `https://bank.example/open-banking/v3.1/aisp`.
    pub base_url: String,
    /// The bank's access token for this consent. A secret: never logged (the
    /// `Debug` output redacts it).
    pub access_token: String,
    /// The bank's id of the consent (NextGenPSD2 `Consent-ID`).
    pub bank_consent_id: String,
    /// The bank's `x-fapi-financial-id`.
    pub financial_id: String,
    /// The refresh's W3C trace context: every call sends a child of it as
    /// `traceparent`, and its trace id (as a UUID) as the dialect's request id.
    pub trace: Option<TraceContext>,
}

/// The trace headers of one bank call.
pub(crate) struct CallTrace {
    /// `traceparent`: a child of the refresh's context (a new span id per call).
    pub traceparent: Option<String>,
    /// The request id (`x-fapi-interaction-id`, `X-Request-ID`): the trace id as a
    /// UUID, so bank-side ids line up with the trace; a fresh UUID without one.
    pub request_id: String,
}

impl ConsentAccess {
    pub(crate) fn call_trace(&self) -> CallTrace {
        let fresh = uuid::Uuid::new_v4();
        match &self.trace {
            Some(trace) => {
                let mut span = [0u8; 8];
                span.copy_from_slice(&fresh.as_bytes()[..8]);
                CallTrace {
                    traceparent: Some(trace.child(span).to_string()),
                    request_id: trace.trace_uuid().to_string(),
                }
            }
            None => CallTrace {
                traceparent: None,
                request_id: fresh.to_string(),
            },
        }
    }
}

impl fmt::Debug for ConsentAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsentAccess")
            .field("base_url", &self.base_url)
            .field("access_token", &"[redacted]")
            .field("bank_consent_id", &self.bank_consent_id)
            .field("financial_id", &self.financial_id)
            .field("trace", &self.trace)
            .finish()
    }
}

/// Limits of a connector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorSettings {
    /// One HTTP request, connect to last body byte.
    pub request_timeout: Duration,
    /// A whole fetch, all requests and pages included.
    pub fetch_timeout: Duration,
    /// Pages followed through `Links.Next` for one listing (one resource of one
    /// account) before the bank's pagination is called broken.
    pub max_pages: u32,
}

impl Default for ConnectorSettings {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            fetch_timeout: Duration::from_secs(120),
            max_pages: 1000,
        }
    }
}

/// The API family of a provider (config `providers.{id}.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// UK Open Banking Read/Write API v3.1, Account Information.
    Obie,
    /// Berlin Group NextGenPSD2 1.3, Account Information Service.
    BerlinGroup,
}

impl ProviderKind {
    /// The config name, e.g. `obie`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Obie => "obie",
            Self::BerlinGroup => "berlin_group",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A provider kind this build does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown provider kind {0:?} (known: obie, berlin_group)")]
pub struct UnknownProviderKind(pub String);

impl FromStr for ProviderKind {
    type Err = UnknownProviderKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "obie" => Ok(Self::Obie),
            "berlin_group" => Ok(Self::BerlinGroup),
            other => Err(UnknownProviderKind(other.to_owned())),
        }
    }
}

/// A connector could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the bank http client")]
pub struct ConnectorBuildError(#[source] pub(crate) reqwest::Error);

/// The HTTP client of every connector: rustls with the ring provider, no redirects
/// (a bank redirecting an API call is refused, never followed), the settings' timeouts.
pub(crate) fn http_client(
    settings: &ConnectorSettings,
) -> Result<reqwest::Client, ConnectorBuildError> {
    // Installing twice is harmless: the first provider stays.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(settings.request_timeout)
        .timeout(settings.request_timeout)
        .user_agent(concat!("refreshd/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(ConnectorBuildError)
}

/// The provider's base URL, refused unless it is an http(s) URL that takes paths.
pub(crate) fn base_url(access: &ConsentAccess) -> Result<reqwest::Url, BankError> {
    reqwest::Url::parse(access.base_url.trim_end_matches('/'))
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && !u.cannot_be_a_base())
        .ok_or_else(|| {
            BankError::Malformed(format!(
                "provider base url {:?} is not an http(s) url",
                access.base_url
            ))
        })
}

/// A request that got no answer: transient, whether it timed out or failed on the way.
pub(crate) fn transport_error(e: &reqwest::Error, request_timeout: Duration) -> BankError {
    if e.is_timeout() {
        BankError::transient(format!(
            "request timed out after {}",
            human(request_timeout)
        ))
    } else {
        BankError::transient(format!("request failed: {}", refresh_core::error_chain(e)))
    }
}

/// A whole fetch, all its pages, within `limit`; past it the fetch is transient.
pub(crate) async fn within_fetch_timeout(
    limit: Duration,
    fetch: impl Future<Output = Result<BankData, BankError>>,
) -> Result<BankData, BankError> {
    match tokio::time::timeout(limit, fetch).await {
        Ok(result) => result,
        Err(_) => Err(BankError::transient(format!(
            "fetch took longer than {}",
            human(limit)
        ))),
    }
}

/// A duration as the errors say it.
pub(crate) fn human(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// Builds the connector for `kind`.
pub fn build_connector(
    kind: ProviderKind,
    settings: ConnectorSettings,
) -> Result<Arc<dyn Connector>, ConnectorBuildError> {
    match kind {
        ProviderKind::Obie => Ok(Arc::new(ObieConnector::new(settings)?)),
        ProviderKind::BerlinGroup => Ok(Arc::new(BerlinGroupConnector::new(settings)?)),
    }
}

/// What a fetch brought back.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BankData {
    pub accounts: Vec<Account>,
    /// The bank's current balances of all accounts.
    pub balances: Vec<Balance>,
    /// Transactions of all accounts booked from the fetch window's start on
    /// (more if the bank ignores the filter). Within one account no two share a
    /// `transaction_id`.
    pub transactions: Vec<Transaction>,
    /// The kinds loaded only at the initial connection; `None` for a refresh.
    pub initial: Option<InitialData>,
    /// Tolerated deviations from the OBIE schema, by kind, e.g.
    /// `balance_object_not_array`: how many times each was read past.
    pub deviations: BTreeMap<&'static str, u64>,
    /// HTTP requests made.
    pub requests: u32,
}

/// The data kinds loaded at the initial connection only.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct InitialData {
    /// `/accounts/{id}/parties`, plus the `/accounts/{id}/party` account owner
    /// when it is not already among them.
    pub parties: Vec<BankItem>,
    pub beneficiaries: Vec<BankItem>,
    pub direct_debits: Vec<BankItem>,
    pub standing_orders: Vec<BankItem>,
    pub scheduled_payments: Vec<BankItem>,
    pub statements: Vec<BankItem>,
    pub products: Vec<BankItem>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_the_token() {
        let access = ConsentAccess {
            base_url: "http://bank".into(),
            access_token: "s3cr3t-token".into(),
            bank_consent_id: "c-1".into(),
            financial_id: "0015800001041RHAAY".into(),
            trace: None,
        };
        let shown = format!("{access:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
        assert!(shown.contains("0015800001041RHAAY"), "{shown}");
    }

    #[test]
    fn provider_kinds() {
        assert_eq!("obie".parse::<ProviderKind>(), Ok(ProviderKind::Obie));
        assert_eq!(ProviderKind::Obie.to_string(), "obie");
        assert_eq!(
            "berlin_group".parse::<ProviderKind>(),
            Ok(ProviderKind::BerlinGroup)
        );
        assert_eq!(ProviderKind::BerlinGroup.to_string(), "berlin_group");
        assert!("fints".parse::<ProviderKind>().is_err());
        for kind in [ProviderKind::Obie, ProviderKind::BerlinGroup] {
            let built = build_connector(kind, ConnectorSettings::default()).unwrap();
            assert_eq!(built.provider_kind(), kind);
        }
    }
}
