//! The stored-data read API of SPEC §3: a consent's accounts, balances, keyset pages
//! of transactions, the kinds kept from the initial connection, and each refresh's
//! change set.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDate, Utc};
use refresh_core::{ConsentId, Problem};
use refresh_pg::{ItemKind, TxFilter, TxKey, TxRow};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::extract::{ApiPath, param, query_pairs};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;

/// Page size of `GET …/transactions` when `limit` is not given.
const DEFAULT_LIMIT: u32 = 100;
/// Largest `limit`.
const MAX_LIMIT: u32 = 500;

fn bad_request(detail: impl Into<String>) -> ApiError {
    ApiError::from(Problem::bad_request(detail))
}

/// The consent's id if the caller may see it, else 404 `consent_not_found`.
async fn readable_consent(
    state: &AppState,
    principal: &Principal,
    raw: &str,
) -> Result<ConsentId, ApiError> {
    let id = super::extract::consent_id(raw)?;
    Ok(super::extract::visible_consent(state, principal, id)
        .await?
        .consent_id)
}

fn account_param(pairs: &[(String, String)]) -> Result<Option<String>, ApiError> {
    match param(pairs, "accountId") {
        Some("") => Err(bad_request("accountId must not be empty")),
        other => Ok(other.map(str::to_owned)),
    }
}

fn date_param(pairs: &[(String, String)], name: &str) -> Result<Option<NaiveDate>, ApiError> {
    param(pairs, name)
        .map(|raw| {
            NaiveDate::parse_from_str(raw, "%Y-%m-%d")
                .ok()
                .filter(|_| raw.len() == 10)
                .ok_or_else(|| bad_request(format!("{name} must be a date (YYYY-MM-DD)")))
        })
        .transpose()
}

fn limit_param(pairs: &[(String, String)]) -> Result<u32, ApiError> {
    match param(pairs, "limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| bad_request(format!("limit must be an integer from 1 to {MAX_LIMIT}"))),
    }
}

/// The opaque cursor: 32 lowercase hex digits, the last item's booking time (µs since
/// the epoch) and row id, each as 8 big-endian bytes.
fn encode_cursor(key: TxKey) -> String {
    let mut bytes = [0_u8; 16];
    bytes[..8].copy_from_slice(&key.booking_date_time.timestamp_micros().to_be_bytes());
    bytes[8..].copy_from_slice(&key.id.to_be_bytes());
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_cursor(raw: &str) -> Option<TxKey> {
    if raw.len() != 32 || !raw.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let half = |s: &str| u64::from_str_radix(s, 16).ok().map(|n| n as i64);
    let micros = half(&raw[..16])?;
    let id = half(&raw[16..])?;
    Some(TxKey {
        booking_date_time: DateTime::from_timestamp_micros(micros)?,
        id,
    })
}

/// A stored transaction.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TransactionItem {
    account_id: String,
    /// The bank's `TransactionId`; null when the bank gave none.
    transaction_id: Option<String>,
    #[schema(value_type = String, format = Date)]
    booking_date: NaiveDate,
    #[serde(serialize_with = "refresh_core::time::millis")]
    booking_date_time: DateTime<Utc>,
    /// `BOOKED` or `PENDING`.
    #[schema(example = "BOOKED")]
    status: String,
    /// Decimal string, unsigned as the bank gave it; the sign is `creditDebitIndicator`.
    #[schema(example = "12.30")]
    amount: String,
    currency: String,
    /// `CREDIT` or `DEBIT`.
    #[schema(example = "DEBIT")]
    credit_debit_indicator: String,
    description: Option<String>,
    #[serde(serialize_with = "refresh_core::time::millis_opt")]
    value_date_time: Option<DateTime<Utc>>,
    /// The bank's `TransactionReference`.
    reference: Option<String>,
}

impl From<TxRow> for TransactionItem {
    fn from(row: TxRow) -> Self {
        Self {
            account_id: row.account_id,
            transaction_id: row.transaction_id,
            booking_date: row.booking_date,
            booking_date_time: row.key.booking_date_time,
            status: row.status.as_str().to_owned(),
            amount: row.amount,
            currency: row.currency,
            credit_debit_indicator: row.credit_debit.as_str().to_owned(),
            description: row.description,
            // A value date the bank wrote unreadably is left out rather than guessed.
            value_date_time: row
                .value_date_time
                .and_then(|raw| DateTime::parse_from_rfc3339(&raw).ok())
                .map(|t| t.to_utc()),
            reference: row.reference,
        }
    }
}

/// `{items, nextCursor}`: a page of transactions, newest first.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TransactionPage {
    items: Vec<TransactionItem>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

/// `{items, nextCursor}`: accounts or balances in the bank-neutral camelCase shape,
/// each with `raw`, the bank's own object (all of them, so `nextCursor` is always null).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StoredList {
    #[schema(value_type = Vec<Object>)]
    items: Vec<Value>,
    #[schema(value_type = Option<String>)]
    next_cursor: Option<()>,
}

/// `{items}`: a kind kept from the initial connection, the bank's objects.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct StoredItems {
    #[schema(value_type = Vec<Object>)]
    items: Vec<Value>,
}

fn ok(body: &impl Serialize) -> Response {
    (StatusCode::OK, Json(body)).into_response()
}

#[utoipa::path(
    get,
    path = "/v1/consents/{consentId}/accounts",
    tag = "stored data",
    summary = "The consent's accounts, bank-neutral: `accountId, status, currency, accountType, accountSubType, nickname, description, openingDate`, and `raw` (the bank's object, with its holder block from the initial connection)",
    params(("consentId" = String, Path, description = "The consent (UUID)")),
    responses(
        (status = 200, description = "`{items, nextCursor: null}`, the accounts in the bank-neutral shape", body = StoredList),
        (status = 404, description = "Unknown or another tenant's consent (`consent_not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
pub(crate) async fn accounts(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath,
) -> Result<Response, ApiError> {
    let consent = readable_consent(&state, &principal, &raw).await?;
    let items = state.store.stored_accounts(consent).await?;
    Ok(ok(&StoredList {
        items,
        next_cursor: None,
    }))
}

#[utoipa::path(
    get,
    path = "/v1/consents/{consentId}/balances",
    tag = "stored data",
    summary = "The consent's balances, by account",
    params(
        ("consentId" = String, Path, description = "The consent (UUID)"),
        ("accountId" = Option<String>, Query, description = "Only this account's balances")
    ),
    responses(
        (status = 200, description = "`{items, nextCursor: null}`, each `{accountId, type, amount, currency, creditDebitIndicator, dateTime, raw}` (`raw`: the bank's object)", body = StoredList),
        (status = 400, description = "Bad query parameter (`bad_request`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown or another tenant's consent (`consent_not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
pub(crate) async fn balances(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath,
    uri: Uri,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(&uri, &["accountId"])?;
    let account = account_param(&pairs)?;
    let consent = readable_consent(&state, &principal, &raw).await?;
    let items = state
        .store
        .stored_balances(consent, account.as_deref())
        .await?;
    Ok(ok(&StoredList {
        items,
        next_cursor: None,
    }))
}

#[utoipa::path(
    get,
    path = "/v1/consents/{consentId}/transactions",
    tag = "stored data",
    summary = "The consent's transactions, newest first, keyset-paginated",
    params(
        ("consentId" = String, Path, description = "The consent (UUID)"),
        ("accountId" = Option<String>, Query, description = "Only this account's transactions"),
        ("from" = Option<String>, Query, format = Date, description = "Booked on or after this date (YYYY-MM-DD)"),
        ("to" = Option<String>, Query, format = Date, description = "Booked on or before this date (YYYY-MM-DD)"),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "Page size, 1 to 500 (default 100)")
    ),
    responses(
        (status = 200, description = "A page; `nextCursor` null on the last", body = TransactionPage),
        (status = 400, description = "Bad query parameter or cursor (`bad_request`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown or another tenant's consent (`consent_not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
pub(crate) async fn transactions(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath,
    uri: Uri,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(&uri, &["accountId", "from", "to", "cursor", "limit"])?;
    let filter = TxFilter {
        account_id: account_param(&pairs)?,
        from: date_param(&pairs, "from")?,
        to: date_param(&pairs, "to")?,
    };
    if let (Some(from), Some(to)) = (filter.from, filter.to)
        && from > to
    {
        return Err(bad_request("from must not be after to"));
    }
    let after = param(&pairs, "cursor")
        .map(|raw| decode_cursor(raw).ok_or_else(|| bad_request("cursor is malformed")))
        .transpose()?;
    let limit = limit_param(&pairs)?;
    let consent = readable_consent(&state, &principal, &raw).await?;
    let page = state
        .store
        .stored_transactions(consent, &filter, after, limit)
        .await?;
    Ok(ok(&TransactionPage {
        items: page.items.into_iter().map(TransactionItem::from).collect(),
        next_cursor: page.next.map(encode_cursor),
    }))
}

/// `{added, updated, removed, balances, nextCursor}`: one page of what a refresh
/// changed, in the order it was applied.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ChangeSet {
    /// Transactions the refresh stored for the first time.
    #[schema(value_type = Vec<TransactionItem>)]
    added: Vec<Value>,
    /// Stored transactions it changed, as they are now (e.g. pending → booked).
    #[schema(value_type = Vec<TransactionItem>)]
    updated: Vec<Value>,
    /// Stored transactions it removed, as they were: the id-less ones a same-date
    /// merge replaced, pending ones the bank no longer returned, rejected ones.
    #[schema(value_type = Vec<TransactionItem>)]
    removed: Vec<Value>,
    /// The balances it set, as `…/balances` lists them.
    #[schema(value_type = Vec<Object>)]
    balances: Vec<Value>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/refreshes/{refreshId}/changes",
    tag = "stored data",
    summary = "What a refresh changed, so a client can apply it instead of re-reading everything; kept as long as the history row",
    params(
        ("refreshId" = String, Path, description = "The refresh (UUID)"),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "Entries per page over the four lists, 1 to 500 (default 100)")
    ),
    responses(
        (status = 200, description = "A page; empty lists for a refresh that did not reach UPDATED", body = ChangeSet),
        (status = 400, description = "Bad query parameter or cursor (`bad_request`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown or another tenant's refresh (`not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
pub(crate) async fn changes(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(raw): ApiPath,
    uri: Uri,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(&uri, &["cursor", "limit"])?;
    let after = param(&pairs, "cursor")
        .map(|raw| {
            raw.parse::<u32>()
                .ok()
                .filter(|n| *n >= 1 && raw.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| bad_request("cursor is malformed"))
        })
        .transpose()?;
    let limit = limit_param(&pairs)?;
    let id = super::extract::refresh_id(&raw)?;
    let visible = state.store.refresh(id).await?.is_some_and(|record| {
        principal
            .scope_tenant()
            .is_none_or(|t| *t == record.tenant_id)
    });
    if !visible {
        return Err(ApiError::from(Problem::not_found("Refresh not found")));
    }
    let page = state.store.refresh_changes(id, after, limit).await?;
    Ok(ok(&ChangeSet {
        added: page.added,
        updated: page.updated,
        removed: page.removed,
        balances: page.balances,
        next_cursor: page.next.map(|n| n.to_string()),
    }))
}

async fn items(
    state: &AppState,
    principal: &Principal,
    raw: &str,
    kind: ItemKind,
) -> Result<Response, ApiError> {
    let consent = readable_consent(state, principal, raw).await?;
    let items = state.store.stored_items(consent, kind).await?;
    Ok(ok(&StoredItems { items }))
}

/// A route serving one kind of `stored_items`.
macro_rules! item_route {
    ($name:ident, $path:tt, $kind:expr, $what:tt) => {
        #[utoipa::path(
            get,
            path = $path,
            tag = "stored data",
            summary = $what,
            params(("consentId" = String, Path, description = "The consent (UUID)")),
            responses(
                (status = 200, description = "`{items}`, the bank's objects as stored at the initial connection", body = StoredItems),
                (status = 404, description = "Unknown or another tenant's consent (`consent_not_found`)", body = Problem, content_type = "application/problem+json"),
                (status = 401, description = "Missing, invalid or expired token (`unauthorized`)", body = Problem, content_type = "application/problem+json"),
                (status = 403, description = "Scope lacks api:stored_data (`insufficient_scope`)", body = Problem, content_type = "application/problem+json")
            ),
            security(("bearer" = []))
        )]
        pub(crate) async fn $name(
            State(state): State<AppState>,
            principal: Principal,
            ApiPath(raw): ApiPath,
        ) -> Result<Response, ApiError> {
            items(&state, &principal, &raw, $kind).await
        }
    };
}

item_route!(
    parties,
    "/v1/consents/{consentId}/parties",
    ItemKind::Parties,
    "The parties of the consent's accounts (each with the `AccountId` it was listed under)"
);
item_route!(
    beneficiaries,
    "/v1/consents/{consentId}/beneficiaries",
    ItemKind::Beneficiaries,
    "The consent's beneficiaries"
);
item_route!(
    direct_debits,
    "/v1/consents/{consentId}/direct-debits",
    ItemKind::DirectDebits,
    "The consent's direct debits"
);
item_route!(
    standing_orders,
    "/v1/consents/{consentId}/standing-orders",
    ItemKind::StandingOrders,
    "The consent's standing orders"
);
item_route!(
    scheduled_payments,
    "/v1/consents/{consentId}/scheduled-payments",
    ItemKind::ScheduledPayments,
    "The consent's scheduled payments"
);
item_route!(
    statements,
    "/v1/consents/{consentId}/statements",
    ItemKind::Statements,
    "The consent's statements"
);
item_route!(
    products,
    "/v1/consents/{consentId}/products",
    ItemKind::Products,
    "The consent's products"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_garbage_is_refused() {
        let check = |micros: i64, id: i64| {
            let key = TxKey {
                booking_date_time: DateTime::from_timestamp_micros(micros).unwrap(),
                id,
            };
            let cursor = encode_cursor(key);
            assert_eq!(cursor.len(), 32);
            assert_eq!(decode_cursor(&cursor), Some(key), "{cursor}");
        };
        check(0, 1);
        check(1_767_225_600_123_456, 42);
        check(-86_400_000_000, i64::MAX);
        for bad in [
            "",
            "zz",
            "0000000000000000000000000000000",
            "000000000000000000000000000000000",
            "0000000000000000000000000000000G",
            "0000000000000000000000000000000A",
            "7fffffffffffffff0000000000000001",
        ] {
            assert_eq!(decode_cursor(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn limits_and_dates() {
        let pairs = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        let limit = |v: &str| limit_param(&pairs("limit", v)).ok();
        assert_eq!(limit_param(&[]).ok(), Some(DEFAULT_LIMIT));
        assert_eq!(limit("1"), Some(1));
        assert_eq!(limit("500"), Some(500));
        for bad in ["0", "501", "-1", "ten", "", "1.5"] {
            assert_eq!(limit(bad), None, "{bad:?}");
        }
        let date = |v: &str| date_param(&pairs("from", v), "from").ok().flatten();
        assert_eq!(date("2026-01-31"), NaiveDate::from_ymd_opt(2026, 1, 31));
        for bad in [
            "2026-02-30",
            "2026-1-31",
            "31/01/2026",
            "2026-01-31T00:00:00Z",
        ] {
            assert_eq!(date(bad), None, "{bad:?}");
        }
    }
}
