//! The worker's view of the database: starting a bank attempt, and ending a refresh
//! (stored data merged, record, consent and outbox event) in one fenced transaction.
//!
//! The fence is the refresh row itself: every write locks it (`FOR UPDATE`) and goes
//! ahead only while it is `INITIALIZED`, so a redelivered or duplicated job can never
//! write twice, nor after another worker finished the refresh.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDate, Utc};
use refresh_core::{
    Amount, CloudEvent, ConsentStatus, CreditDebit, EventId, RefreshError, RefreshId,
    RefreshRecord, RefreshStatus, RefreshSummary, StoredTransaction, Transaction, TxStatus,
    TxSummary, plan_transaction_merge, relevant_keys,
};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{Postgres, Row};

use crate::store::{
    OutboxEvent, REFRESH_COLUMNS, Store, StoreError, corrupt, insert_outbox, refresh_record,
};

/// A refresh as the worker needs it: the record, whether it is the initial load, and
/// the bank attempts started so far.
#[derive(Clone, Debug, PartialEq)]
pub struct JobState {
    pub record: RefreshRecord,
    pub initial: bool,
    pub attempts: u32,
}

/// What [`Store::start_attempt`] found.
#[derive(Clone, Debug, PartialEq)]
pub enum AttemptStart {
    /// The attempt is recorded (`attempts` is now this attempt's number, from 1).
    Started(JobState),
    /// The refresh is terminal (or gone): nothing to do.
    Finished,
    /// Another delivery of the same job started this attempt first.
    Raced,
}

/// One account's details as stored: `data` without the party data; `parties` (the
/// OBIE `Account[]` holder identifications) is written only by the initial load.
#[derive(Clone, Debug, PartialEq)]
pub struct AccountData {
    pub account_id: String,
    pub data: Value,
    pub parties: Option<Value>,
}

/// One balance as stored (amount unsigned, as the bank wrote it; the sign is
/// `credit_debit`).
#[derive(Clone, Debug, PartialEq)]
pub struct BalanceData {
    pub account_id: String,
    pub balance_type: String,
    pub credit_debit: CreditDebit,
    pub amount: String,
    pub currency: String,
    pub date_time: DateTime<Utc>,
    pub data: Value,
}

/// An item of the kinds loaded at the initial connection only.
#[derive(Clone, Debug, PartialEq)]
pub struct ItemData {
    /// `parties`, `beneficiaries`, `direct_debits`, `standing_orders`,
    /// `scheduled_payments`, `statements`, `products` or `offers`.
    pub kind: &'static str,
    pub account_id: Option<String>,
    pub data: Value,
}

/// Everything a successful fetch stores.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FetchedData {
    pub accounts: Vec<AccountData>,
    pub balances: Vec<BalanceData>,
    /// Booked and pending transactions, merged by the refresh rules.
    pub transactions: Vec<Transaction>,
    /// (account, transaction id) of transactions the bank reports as rejected: a
    /// stored row with that key (a pending one) is removed, nothing is inserted.
    pub rejected: Vec<(String, String)>,
    /// The initial load's other kinds; `None` on a plain refresh.
    pub items: Option<Vec<ItemData>>,
}

/// How a fenced finish went.
#[derive(Clone, Debug, PartialEq)]
pub enum Finish {
    /// Committed: the terminal record (its event is in the outbox).
    Done(RefreshRecord),
    /// The refresh was no longer `INITIALIZED`: nothing was written.
    Fenced,
}

const TX_COLUMNS: &str = "id, account_id, transaction_id, booking_date, booking_date_time, \
     status, amount, currency, credit_debit, description, data";

fn stored_transaction(row: &PgRow) -> Result<StoredTransaction, StoreError> {
    Ok(StoredTransaction {
        row_id: row.try_get("id")?,
        tx: Transaction {
            account_id: row.try_get("account_id")?,
            transaction_id: row.try_get("transaction_id")?,
            booking_date: row.try_get("booking_date")?,
            booking_date_time: row.try_get("booking_date_time")?,
            status: row
                .try_get::<&str, _>("status")?
                .parse::<TxStatus>()
                .map_err(corrupt)?,
            amount: Amount::parse(row.try_get::<&str, _>("amount")?).map_err(corrupt)?,
            currency: row.try_get("currency")?,
            credit_debit: row
                .try_get::<&str, _>("credit_debit")?
                .parse::<CreditDebit>()
                .map_err(corrupt)?,
            description: row.try_get("description")?,
            raw: row.try_get("data")?,
        },
    })
}

fn outbox_event(record: &RefreshRecord, event_id: EventId, at: DateTime<Utc>) -> OutboxEvent {
    let event = CloudEvent::refresh(record, event_id, at);
    OutboxEvent {
        event_id: event.id,
        routing_key: event.routing_key(),
        // Serializing plain data with string keys cannot fail.
        payload: serde_json::to_value(&event).unwrap_or_default(),
    }
}

type PgTx = sqlx::Transaction<'static, Postgres>;

/// Locks the refresh row; `None` unless it exists and is `INITIALIZED`.
async fn lock_initialized(
    tx: &mut PgTx,
    refresh_id: RefreshId,
) -> Result<Option<RefreshRecord>, StoreError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {REFRESH_COLUMNS} FROM refreshes WHERE refresh_id = $1 FOR UPDATE"
    )))
    .bind(refresh_id.as_uuid())
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let record = refresh_record(&row)?;
    Ok((record.status == RefreshStatus::Initialized).then_some(record))
}

/// Whether the consent is `REVOKED`, its row share-locked until the transaction
/// ends: a revoke either committed before (and this refresh stores nothing) or
/// waits until the refresh has finished. A revoke locks only the consent row, so
/// the order refresh row, then consent row cannot deadlock with it.
async fn consent_revoked(tx: &mut PgTx, consent: uuid::Uuid) -> Result<bool, StoreError> {
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM consents WHERE consent_id = $1 FOR SHARE")
            .bind(consent)
            .fetch_optional(&mut **tx)
            .await?;
    Ok(status.as_deref() == Some(ConsentStatus::Revoked.as_str()))
}

/// Writes the terminal record, the consent's change and the event.
async fn write_terminal(
    tx: &mut PgTx,
    record: &RefreshRecord,
    consent_status: Option<ConsentStatus>,
    event_id: EventId,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let summary = record
        .summary
        .as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(corrupt)?;
    sqlx::query(
        "UPDATE refreshes SET status = $2, started_at = $3, finished_at = $4, error_code = $5, \
         error_message = $6, summary = $7 WHERE refresh_id = $1",
    )
    .bind(record.refresh_id.as_uuid())
    .bind(record.status.as_str())
    .bind(record.started_at)
    .bind(record.finished_at)
    .bind(record.error.as_ref().map(|e| e.code.as_str()))
    .bind(record.error.as_ref().map(|e| e.message.as_str()))
    .bind(summary)
    .execute(&mut **tx)
    .await?;
    if record.status == RefreshStatus::Updated {
        sqlx::query(
            "UPDATE consents SET last_refreshed_at = $2, last_refresh_id = $3, updated_at = $2 \
             WHERE consent_id = $1",
        )
        .bind(record.consent_id.as_uuid())
        .bind(at)
        .bind(record.refresh_id.as_uuid())
        .execute(&mut **tx)
        .await?;
    }
    if let Some(status) = consent_status {
        crate::lifecycle::transition(tx, record.consent_id, status, at).await?;
    }
    insert_outbox(&mut **tx, &outbox_event(record, event_id, at), at).await
}

impl Store {
    /// The refresh with its `initial` flag and attempt count.
    pub async fn job_state(&self, refresh_id: RefreshId) -> Result<Option<JobState>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {REFRESH_COLUMNS}, initial, attempts FROM refreshes WHERE refresh_id = $1"
        )))
        .bind(refresh_id.as_uuid())
        .fetch_optional(self.pool())
        .await?;
        row.map(|row| job_state(&row)).transpose()
    }

    /// Records the start of bank attempt `seen + 1` (and the first start time),
    /// provided the refresh is still `INITIALIZED` with `seen` attempts.
    pub async fn start_attempt(
        &self,
        refresh_id: RefreshId,
        seen: u32,
        at: DateTime<Utc>,
    ) -> Result<AttemptStart, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE refreshes SET attempts = attempts + 1, started_at = COALESCE(started_at, $3) \
             WHERE refresh_id = $1 AND status = 'INITIALIZED' AND attempts = $2 \
             RETURNING {REFRESH_COLUMNS}, initial, attempts"
        )))
        .bind(refresh_id.as_uuid())
        .bind(i32::try_from(seen).map_err(corrupt)?)
        .bind(at)
        .fetch_optional(self.pool())
        .await?;
        if let Some(row) = row {
            return Ok(AttemptStart::Started(job_state(&row)?));
        }
        Ok(match self.job_state(refresh_id).await? {
            Some(state) if state.record.status == RefreshStatus::Initialized => AttemptStart::Raced,
            _ => AttemptStart::Finished,
        })
    }

    /// Ends the refresh as `ERROR` (the consent becoming `consent_status` if given),
    /// with its event, in one transaction fenced on the refresh being `INITIALIZED`.
    pub async fn finish_error(
        &self,
        refresh_id: RefreshId,
        error: RefreshError,
        consent_status: Option<ConsentStatus>,
        event_id: EventId,
        at: DateTime<Utc>,
    ) -> Result<Finish, StoreError> {
        let mut tx = self.pool().begin().await?;
        let Some(mut record) = lock_initialized(&mut tx, refresh_id).await? else {
            tx.rollback().await?;
            return Ok(Finish::Fenced);
        };
        record.finish_error(error, at).map_err(corrupt)?;
        write_terminal(&mut tx, &record, consent_status, event_id, at).await?;
        tx.commit().await?;
        Ok(Finish::Done(record))
    }

    /// Stores a fetch by the refresh rules (SPEC §5) and ends the refresh as
    /// `UPDATED` with its summary and event, all in one transaction fenced on the
    /// refresh being `INITIALIZED`. Only the stored transactions the batch can
    /// touch are read.
    pub async fn finish_updated(
        &self,
        refresh_id: RefreshId,
        data: &FetchedData,
        event_id: EventId,
        at: DateTime<Utc>,
    ) -> Result<Finish, StoreError> {
        let mut tx = self.pool().begin().await?;
        let Some(mut record) = lock_initialized(&mut tx, refresh_id).await? else {
            tx.rollback().await?;
            return Ok(Finish::Fenced);
        };
        let consent = *record.consent_id.as_uuid();
        if consent_revoked(&mut tx, consent).await? {
            // Revoked while the refresh ran (SPEC §3): store nothing more.
            record
                .finish_error(RefreshError::consent_revoked(), at)
                .map_err(corrupt)?;
            write_terminal(&mut tx, &record, None, event_id, at).await?;
            tx.commit().await?;
            return Ok(Finish::Done(record));
        }
        let (accounts, balances) = write_accounts(&mut tx, consent, data, at).await?;
        let transactions = merge_transactions(&mut tx, consent, refresh_id, data).await?;
        if let Some(items) = &data.items {
            write_items(&mut tx, consent, items, at).await?;
        }
        record
            .finish_updated(RefreshSummary::new(accounts, balances, transactions), at)
            .map_err(corrupt)?;
        write_terminal(&mut tx, &record, None, event_id, at).await?;
        tx.commit().await?;
        Ok(Finish::Done(record))
    }
}

fn job_state(row: &PgRow) -> Result<JobState, StoreError> {
    Ok(JobState {
        record: refresh_record(row)?,
        initial: row.try_get("initial")?,
        attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).map_err(corrupt)?,
    })
}

/// Upserts the accounts (party data only on the initial load) and replaces the
/// balances of every account the fetch reported; returns (accounts, balances) stored.
async fn write_accounts(
    tx: &mut PgTx,
    consent: uuid::Uuid,
    data: &FetchedData,
    at: DateTime<Utc>,
) -> Result<(u64, u64), StoreError> {
    for account in &data.accounts {
        sqlx::query(
            "INSERT INTO accounts (consent_id, account_id, data, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (consent_id, account_id) DO UPDATE SET data = EXCLUDED.data, \
             updated_at = EXCLUDED.updated_at",
        )
        .bind(consent)
        .bind(&account.account_id)
        .bind(&account.data)
        .bind(at)
        .execute(&mut **tx)
        .await?;
        if let Some(parties) = &account.parties {
            sqlx::query(
                "INSERT INTO account_parties (consent_id, account_id, data, loaded_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (consent_id, account_id) DO UPDATE \
                 SET data = EXCLUDED.data, loaded_at = EXCLUDED.loaded_at",
            )
            .bind(consent)
            .bind(&account.account_id)
            .bind(parties)
            .bind(at)
            .execute(&mut **tx)
            .await?;
        }
    }
    let replaced: BTreeSet<&str> = data
        .accounts
        .iter()
        .map(|a| a.account_id.as_str())
        .chain(data.balances.iter().map(|b| b.account_id.as_str()))
        .collect();
    let replaced: Vec<&str> = replaced.into_iter().collect();
    sqlx::query("DELETE FROM balances WHERE consent_id = $1 AND account_id = ANY($2)")
        .bind(consent)
        .bind(&replaced)
        .execute(&mut **tx)
        .await?;
    let mut position: BTreeMap<&str, i32> = BTreeMap::new();
    for balance in &data.balances {
        let slot = position.entry(balance.account_id.as_str()).or_default();
        sqlx::query(
            "INSERT INTO balances (consent_id, account_id, position, balance_type, credit_debit, \
             amount, currency, date_time, data) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(consent)
        .bind(&balance.account_id)
        .bind(*slot)
        .bind(&balance.balance_type)
        .bind(balance.credit_debit.as_str())
        .bind(&balance.amount)
        .bind(&balance.currency)
        .bind(balance.date_time)
        .bind(&balance.data)
        .execute(&mut **tx)
        .await?;
        *slot += 1;
    }
    Ok((data.accounts.len() as u64, data.balances.len() as u64))
}

/// Loads the stored rows relevant to the batch (by key), plans the merge and applies it.
async fn merge_transactions(
    tx: &mut PgTx,
    consent: uuid::Uuid,
    refresh_id: RefreshId,
    data: &FetchedData,
) -> Result<TxSummary, StoreError> {
    let keys = relevant_keys(&data.transactions);
    let (mut id_accounts, mut ids): (Vec<&str>, Vec<&str>) = keys
        .ids
        .iter()
        .map(|(a, i)| (a.as_str(), i.as_str()))
        .unzip();
    for (account, id) in &data.rejected {
        id_accounts.push(account);
        ids.push(id);
    }
    let mut stored = Vec::new();
    if !ids.is_empty() {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TX_COLUMNS} FROM transactions WHERE consent_id = $1 AND transaction_id IS NOT NULL \
             AND (account_id, transaction_id) IN (SELECT * FROM UNNEST($2::text[], $3::text[]))"
        )))
        .bind(consent)
        .bind(&id_accounts)
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
        for row in &rows {
            stored.push(stored_transaction(row)?);
        }
    }
    if !keys.idless_dates.is_empty() {
        let (accounts, dates): (Vec<&str>, Vec<NaiveDate>) = keys
            .idless_dates
            .iter()
            .map(|(a, d)| (a.as_str(), *d))
            .unzip();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TX_COLUMNS} FROM transactions WHERE consent_id = $1 AND transaction_id IS NULL \
             AND (account_id, booking_date) IN (SELECT * FROM UNNEST($2::text[], $3::date[]))"
        )))
        .bind(consent)
        .bind(&accounts)
        .bind(&dates)
        .fetch_all(&mut **tx)
        .await?;
        for row in &rows {
            stored.push(stored_transaction(row)?);
        }
    }
    let mut plan = plan_transaction_merge(&stored, &data.transactions);
    // Rejected at the bank: the stored (pending) row of that key goes.
    let rejected: BTreeSet<(&str, &str)> = data
        .rejected
        .iter()
        .map(|(a, i)| (a.as_str(), i.as_str()))
        .collect();
    for row in &stored {
        if let Some(id) = row.tx.transaction_id.as_deref()
            && rejected.contains(&(row.tx.account_id.as_str(), id))
        {
            plan.deletes.push(row.row_id);
            plan.summary.removed += 1;
        }
    }
    if !plan.deletes.is_empty() {
        sqlx::query("DELETE FROM transactions WHERE consent_id = $1 AND id = ANY($2)")
            .bind(consent)
            .bind(&plan.deletes)
            .execute(&mut **tx)
            .await?;
    }
    for (row_id, t) in &plan.updates {
        sqlx::query(
            "UPDATE transactions SET booking_date = $2, booking_date_time = $3, status = $4, \
             amount = $5, currency = $6, credit_debit = $7, description = $8, data = $9, \
             refresh_id = $10 WHERE id = $1",
        )
        .bind(row_id)
        .bind(t.booking_date)
        .bind(t.booking_date_time)
        .bind(t.status.as_str())
        .bind(t.amount.as_str())
        .bind(&t.currency)
        .bind(t.credit_debit.as_str())
        .bind(&t.description)
        .bind(&t.raw)
        .bind(refresh_id.as_uuid())
        .execute(&mut **tx)
        .await?;
    }
    if !plan.inserts.is_empty() {
        let inserts = &plan.inserts;
        let col = |f: fn(&Transaction) -> &str| inserts.iter().map(|t| f(t)).collect::<Vec<_>>();
        let transaction_ids: Vec<Option<&str>> = inserts
            .iter()
            .map(|t| t.transaction_id.as_deref())
            .collect();
        let dates: Vec<NaiveDate> = inserts.iter().map(|t| t.booking_date).collect();
        let times: Vec<DateTime<Utc>> = inserts.iter().map(|t| t.booking_date_time).collect();
        let descriptions: Vec<Option<&str>> =
            inserts.iter().map(|t| t.description.as_deref()).collect();
        let raws: Vec<Json<&Value>> = inserts.iter().map(|t| Json(&t.raw)).collect();
        sqlx::query(
            "INSERT INTO transactions (consent_id, account_id, transaction_id, booking_date, \
             booking_date_time, status, amount, currency, credit_debit, description, data, refresh_id) \
             SELECT $1, * , $12 FROM UNNEST($2::text[], $3::text[], $4::date[], $5::timestamptz[], \
             $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::jsonb[])",
        )
        .bind(consent)
        .bind(col(|t| &t.account_id))
        .bind(&transaction_ids)
        .bind(&dates)
        .bind(&times)
        .bind(col(|t| t.status.as_str()))
        .bind(col(|t| t.amount.as_str()))
        .bind(col(|t| &t.currency))
        .bind(col(|t| t.credit_debit.as_str()))
        .bind(&descriptions)
        .bind(&raws)
        .bind(refresh_id.as_uuid())
        .execute(&mut **tx)
        .await?;
    }
    Ok(plan.summary)
}

/// Replaces the initial load's other kinds.
async fn write_items(
    tx: &mut PgTx,
    consent: uuid::Uuid,
    items: &[ItemData],
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM stored_items WHERE consent_id = $1")
        .bind(consent)
        .execute(&mut **tx)
        .await?;
    let mut position: BTreeMap<&str, i32> = BTreeMap::new();
    for item in items {
        let slot = position.entry(item.kind).or_default();
        sqlx::query(
            "INSERT INTO stored_items (consent_id, kind, position, account_id, data, loaded_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(consent)
        .bind(item.kind)
        .bind(*slot)
        .bind(&item.account_id)
        .bind(&item.data)
        .bind(at)
        .execute(&mut **tx)
        .await?;
        *slot += 1;
    }
    Ok(())
}
