//! The read side of the stored data (SPEC §3): accounts with their party data,
//! balances, keyset pages of transactions, and the initial load's other kinds.

use chrono::{DateTime, NaiveDate, Utc};
use refresh_core::{ConsentId, CreditDebit, TxStatus};
use serde_json::{Value, json};
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder, Row};

use crate::store::{Store, StoreError, corrupt};

/// The OBIE key of an account's holder block, kept in `account_parties`.
const PARTY_KEY: &str = "Account";

/// A position in the transaction order (`booking_date_time DESC, id DESC`): a page
/// holds the transactions strictly after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxKey {
    pub booking_date_time: DateTime<Utc>,
    pub id: i64,
}

/// What a page of transactions is filtered on (dates inclusive, on the booking date).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxFilter {
    pub account_id: Option<String>,
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
}

/// One stored transaction as the API lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct TxRow {
    pub key: TxKey,
    pub account_id: String,
    pub transaction_id: Option<String>,
    pub booking_date: NaiveDate,
    pub status: TxStatus,
    pub amount: String,
    pub currency: String,
    pub credit_debit: CreditDebit,
    pub description: Option<String>,
    /// The bank's `ValueDateTime`, as it wrote it.
    pub value_date_time: Option<String>,
    /// The bank's `TransactionReference`.
    pub reference: Option<String>,
}

/// A page of transactions; `next` is set when more follow.
#[derive(Clone, Debug, PartialEq)]
pub struct TxPage {
    pub items: Vec<TxRow>,
    pub next: Option<TxKey>,
}

/// A page of a refresh's change set, in the order it was written (added, updated,
/// removed, balances); `next` is the last position read when more follow.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChangePage {
    pub added: Vec<Value>,
    pub updated: Vec<Value>,
    pub removed: Vec<Value>,
    pub balances: Vec<Value>,
    pub next: Option<u32>,
}

/// The kinds of `stored_items` the API serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemKind {
    Parties,
    Beneficiaries,
    DirectDebits,
    StandingOrders,
    ScheduledPayments,
    Statements,
    Products,
}

impl ItemKind {
    /// The `stored_items.kind` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Parties => "parties",
            Self::Beneficiaries => "beneficiaries",
            Self::DirectDebits => "direct_debits",
            Self::StandingOrders => "standing_orders",
            Self::ScheduledPayments => "scheduled_payments",
            Self::Statements => "statements",
            Self::Products => "products",
        }
    }
}

fn tx_row(row: &PgRow) -> Result<TxRow, StoreError> {
    Ok(TxRow {
        key: TxKey {
            booking_date_time: row.try_get("booking_date_time")?,
            id: row.try_get("id")?,
        },
        account_id: row.try_get("account_id")?,
        transaction_id: row.try_get("transaction_id")?,
        booking_date: row.try_get("booking_date")?,
        status: row
            .try_get::<&str, _>("status")?
            .parse::<TxStatus>()
            .map_err(corrupt)?,
        amount: row.try_get("amount")?,
        currency: row.try_get("currency")?,
        credit_debit: row
            .try_get::<&str, _>("credit_debit")?
            .parse::<CreditDebit>()
            .map_err(corrupt)?,
        description: row.try_get("description")?,
        value_date_time: row.try_get("value_date_time")?,
        reference: row.try_get("reference")?,
    })
}

/// RFC 3339 UTC with milliseconds, as the API writes instants.
fn instant(t: DateTime<Utc>) -> String {
    refresh_core::time::format_millis(&t)
}

/// The account object with its holder block put back (`Account[]` from the initial
/// connection); an account without stored party data is returned as it is.
fn with_parties(data: Value, parties: Option<Value>) -> Value {
    match (data, parties.and_then(|p| p.get(PARTY_KEY).cloned())) {
        (Value::Object(mut map), Some(holders)) => {
            map.insert(PARTY_KEY.to_owned(), holders);
            Value::Object(map)
        }
        (data, _) => data,
    }
}

impl Store {
    /// A consent's accounts in the bank-neutral shape, by account id: `accountId,
    /// status, currency, accountType, accountSubType, nickname, description,
    /// openingDate`, and `raw`, the bank's object with its holder block (`Account[]`
    /// from the initial connection, for OBIE).
    pub async fn stored_accounts(&self, consent: ConsentId) -> Result<Vec<Value>, StoreError> {
        let rows = sqlx::query(
            "SELECT a.account_id, a.status, a.currency, a.account_type, a.account_sub_type, \
             a.nickname, a.description, a.opening_date, a.data, p.data AS parties \
             FROM accounts a LEFT JOIN account_parties p \
             ON p.consent_id = a.consent_id AND p.account_id = a.account_id \
             WHERE a.consent_id = $1 ORDER BY a.account_id",
        )
        .bind(consent.as_uuid())
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                let opening: Option<DateTime<Utc>> = row.try_get("opening_date")?;
                Ok(json!({
                    "accountId": row.try_get::<String, _>("account_id")?,
                    "status": row.try_get::<Option<String>, _>("status")?,
                    "currency": row.try_get::<Option<String>, _>("currency")?,
                    "accountType": row.try_get::<Option<String>, _>("account_type")?,
                    "accountSubType": row.try_get::<Option<String>, _>("account_sub_type")?,
                    "nickname": row.try_get::<Option<String>, _>("nickname")?,
                    "description": row.try_get::<Option<String>, _>("description")?,
                    "openingDate": opening.map(instant),
                    "raw": with_parties(row.try_get("data")?, row.try_get("parties")?),
                }))
            })
            .collect()
    }

    /// A consent's balances in the bank-neutral shape (`accountId, type, amount,
    /// currency, creditDebitIndicator, dateTime`, and `raw`, the bank's object), by
    /// account then as the bank listed them; only `account_id`'s when given.
    pub async fn stored_balances(
        &self,
        consent: ConsentId,
        account_id: Option<&str>,
    ) -> Result<Vec<Value>, StoreError> {
        let rows = sqlx::query(
            "SELECT account_id, balance_type, amount, currency, credit_debit, date_time, data \
             FROM balances WHERE consent_id = $1 \
             AND ($2::text IS NULL OR account_id = $2) ORDER BY account_id, position",
        )
        .bind(consent.as_uuid())
        .bind(account_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(json!({
                    "accountId": row.try_get::<String, _>("account_id")?,
                    "type": row.try_get::<String, _>("balance_type")?,
                    "amount": row.try_get::<String, _>("amount")?,
                    "currency": row.try_get::<String, _>("currency")?,
                    "creditDebitIndicator": row.try_get::<String, _>("credit_debit")?,
                    "dateTime": instant(row.try_get("date_time")?),
                    "raw": row.try_get::<Value, _>("data")?,
                }))
            })
            .collect()
    }

    /// Up to `limit` entries of refresh `refresh`'s change set after position `after`.
    pub async fn refresh_changes(
        &self,
        refresh: refresh_core::RefreshId,
        after: Option<u32>,
        limit: u32,
    ) -> Result<ChangePage, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, kind, item FROM refresh_changes WHERE refresh_id = $1 AND seq > $2 \
             ORDER BY seq LIMIT $3",
        )
        .bind(refresh.as_uuid())
        .bind(i32::try_from(after.unwrap_or(0)).map_err(corrupt)?)
        .bind(i64::from(limit) + 1)
        .fetch_all(self.pool())
        .await?;
        let mut page = ChangePage::default();
        let more = rows.len() > limit as usize;
        for row in rows.iter().take(limit as usize) {
            let item: Value = row.try_get("item")?;
            match row.try_get::<&str, _>("kind")? {
                "added" => page.added.push(item),
                "updated" => page.updated.push(item),
                "removed" => page.removed.push(item),
                "balance" => page.balances.push(item),
                other => return Err(corrupt(format!("unknown change kind {other:?}"))),
            }
            if more {
                page.next = Some(u32::try_from(row.try_get::<i32, _>("seq")?).map_err(corrupt)?);
            }
        }
        Ok(page)
    }

    /// Up to `limit` transactions after `after`, newest first (booking time, then
    /// insertion), matching `filter`. One more row is read to know whether more follow.
    pub async fn stored_transactions(
        &self,
        consent: ConsentId,
        filter: &TxFilter,
        after: Option<TxKey>,
        limit: u32,
    ) -> Result<TxPage, StoreError> {
        let mut query = QueryBuilder::<Postgres>::new(
            "SELECT id, account_id, transaction_id, booking_date, booking_date_time, status, \
             amount, currency, credit_debit, description, \
             data->>'ValueDateTime' AS value_date_time, \
             data->>'TransactionReference' AS reference \
             FROM transactions WHERE consent_id = ",
        );
        query.push_bind(*consent.as_uuid());
        if let Some(account) = &filter.account_id {
            query.push(" AND account_id = ").push_bind(account.clone());
        }
        if let Some(from) = filter.from {
            query.push(" AND booking_date >= ").push_bind(from);
        }
        if let Some(to) = filter.to {
            query.push(" AND booking_date <= ").push_bind(to);
        }
        if let Some(key) = after {
            // A row comparison, so the (…, booking_date_time DESC, id DESC) indexes serve it.
            query
                .push(" AND (booking_date_time, id) < (")
                .push_bind(key.booking_date_time)
                .push(", ")
                .push_bind(key.id)
                .push(")");
        }
        query
            .push(" ORDER BY booking_date_time DESC, id DESC LIMIT ")
            .push_bind(i64::from(limit) + 1);
        let rows = query.build().fetch_all(self.pool()).await?;
        let mut items = rows.iter().map(tx_row).collect::<Result<Vec<_>, _>>()?;
        let more = items.len() > limit as usize;
        items.truncate(limit as usize);
        let next = if more {
            items.last().map(|t| t.key)
        } else {
            None
        };
        Ok(TxPage { items, next })
    }

    /// The stored items of `kind` (the bank's objects), in the order they were loaded.
    /// Party objects, which the bank lists per account without naming it, get the
    /// `AccountId` they were listed under.
    pub async fn stored_items(
        &self,
        consent: ConsentId,
        kind: ItemKind,
    ) -> Result<Vec<Value>, StoreError> {
        let rows = sqlx::query(
            "SELECT account_id, data FROM stored_items WHERE consent_id = $1 AND kind = $2 \
             ORDER BY position",
        )
        .bind(consent.as_uuid())
        .bind(kind.as_str())
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                let mut data: Value = row.try_get("data")?;
                let account: Option<String> = row.try_get("account_id")?;
                if let (Value::Object(map), Some(account)) = (&mut data, account) {
                    map.entry("AccountId").or_insert(Value::String(account));
                }
                Ok(data)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_holder_block_goes_back_into_the_account() {
        let check = |data: Value, parties: Option<Value>, expected: Value| {
            assert_eq!(with_parties(data, parties), expected);
        };
        let holders = json!([{"SchemeName": "UK.OBIE.SortCodeAccountNumber", "Name": "Ms A"}]);
        check(
            json!({"AccountId": "a1"}),
            Some(json!({ "Account": holders })),
            json!({"AccountId": "a1", "Account": holders}),
        );
        check(json!({"AccountId": "a1"}), None, json!({"AccountId": "a1"}));
        check(
            json!({"AccountId": "a1"}),
            Some(json!({})),
            json!({"AccountId": "a1"}),
        );
    }
}
