//! The worker's view of the database: starting a bank attempt, and ending a refresh
//! (stored data merged, record, consent and outbox event) in one fenced transaction.
//!
//! The fence is the refresh row itself: every write locks it (`FOR UPDATE`) and goes
//! ahead only while it is `INITIALIZED`, so a redelivered or duplicated job can never
//! write twice, nor after another worker finished the refresh.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDate, Utc};
use refresh_core::{
    Amount, ConsentId, ConsentStatus, CreditDebit, EventId, MergeWindow, RefreshError, RefreshId,
    RefreshRecord, RefreshStatus, RefreshSummary, StoredTransaction, TraceContext, Transaction,
    TxStatus, TxSummary, plan_refresh_merge, relevant_keys,
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
    /// Another delivery of the same job started this attempt first, or still holds
    /// a live lease on the running one: this delivery must not call the bank.
    Raced,
}

/// One account's details as stored: the bank-neutral fields, `data` (the bank's
/// object without the party data); `parties` (the OBIE `Account[]` holder
/// identifications) is written only by the initial load.
#[derive(Clone, Debug, PartialEq)]
pub struct AccountData {
    pub account_id: String,
    pub details: AccountDetails,
    pub data: Value,
    pub parties: Option<Value>,
}

/// The bank-neutral fields of an account, in the OBIE code lists' terms (each
/// connector maps its bank's values to them).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AccountDetails {
    /// e.g. `Enabled`, `Disabled`, `Deleted`.
    pub status: Option<String>,
    /// ISO 4217.
    pub currency: Option<String>,
    /// `Personal` or `Business`.
    pub account_type: Option<String>,
    /// e.g. `CurrentAccount`, `Savings`, `CreditCard`.
    pub account_sub_type: Option<String>,
    pub nickname: Option<String>,
    pub description: Option<String>,
    pub opening_date: Option<DateTime<Utc>>,
}

/// One balance as stored (amount unsigned, as the bank wrote it; the sign is
/// `credit_debit`).
#[derive(Clone, Debug, PartialEq)]
pub struct BalanceData {
    pub account_id: String,
    pub balance_type: String,
    pub credit_debit: CreditDebit,
    pub amount: Amount,
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

/// What the stored data of a consent says about its next fetch (SPEC §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataState {
    /// An initial load has succeeded.
    pub initial_loaded: bool,
    /// The earliest booking date of a transaction stored as `PENDING`: the earlier
    /// of the bank's date and the UTC date of its booking instant.
    pub oldest_pending: Option<NaiveDate>,
}

/// Everything a successful fetch stores.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FetchedData {
    /// An initial load: the consent counts as loaded once it is stored.
    pub initial: bool,
    /// What the fetch covered: stored `PENDING` rows inside it that the bank no
    /// longer returns are removed. The default covers nothing.
    pub window: MergeWindow,
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

type PgTx = sqlx::Transaction<'static, Postgres>;

/// Locks the refresh row; `None` unless it exists and is `INITIALIZED`. Also the
/// refresh's trace context, which its terminal event carries.
async fn lock_initialized(
    tx: &mut PgTx,
    refresh_id: RefreshId,
) -> Result<Option<(RefreshRecord, Option<TraceContext>)>, StoreError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {REFRESH_COLUMNS}, traceparent FROM refreshes WHERE refresh_id = $1 FOR UPDATE"
    )))
    .bind(refresh_id.as_uuid())
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let record = refresh_record(&row)?;
    // Written only from a parsed context; a value that no longer parses is dropped
    // rather than failing the refresh's end.
    let trace = row
        .try_get::<Option<&str>, _>("traceparent")?
        .and_then(|t| t.parse().ok());
    Ok((record.status == RefreshStatus::Initialized).then_some((record, trace)))
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
    traceparent: Option<TraceContext>,
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
    insert_outbox(
        &mut **tx,
        &OutboxEvent::refresh(record, traceparent, event_id, at),
        at,
    )
    .await
}

impl Store {
    /// Whether the consent's initial load has succeeded, and its oldest pending
    /// transaction; `None` when the consent is gone.
    pub async fn data_state(&self, consent_id: ConsentId) -> Result<Option<DataState>, StoreError> {
        let row = sqlx::query(
            "SELECT c.initial_loaded_at IS NOT NULL AS loaded, \
             (SELECT LEAST(min(t.booking_date), min((t.booking_date_time AT TIME ZONE 'UTC')::date)) \
              FROM transactions t WHERE t.consent_id = c.consent_id AND t.status = 'PENDING') AS oldest \
             FROM consents c WHERE c.consent_id = $1",
        )
        .bind(consent_id.as_uuid())
        .fetch_optional(self.pool())
        .await?;
        row.map(|row| {
            Ok(DataState {
                initial_loaded: row.try_get("loaded")?,
                oldest_pending: row.try_get("oldest")?,
            })
        })
        .transpose()
    }

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

    /// Records the start of bank attempt `seen + 1` (its start time, and the first's)
    /// and leases it to the caller until `lease` after `at`, provided the refresh is
    /// still `INITIALIZED` with `seen` attempts and no other delivery holds a live
    /// attempt lease.
    pub async fn start_attempt(
        &self,
        refresh_id: RefreshId,
        seen: u32,
        at: DateTime<Utc>,
        lease: std::time::Duration,
    ) -> Result<AttemptStart, StoreError> {
        let until = at + chrono::TimeDelta::from_std(lease).map_err(corrupt)?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE refreshes SET attempts = attempts + 1, started_at = COALESCE(started_at, $3), \
                    last_started_at = $3, attempt_until = $4 \
             WHERE refresh_id = $1 AND status = 'INITIALIZED' AND attempts = $2 \
               AND (attempt_until IS NULL OR attempt_until <= $3) \
             RETURNING {REFRESH_COLUMNS}, initial, attempts"
        )))
        .bind(refresh_id.as_uuid())
        .bind(i32::try_from(seen).map_err(corrupt)?)
        .bind(at)
        .bind(until)
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

    /// Extends the lease of the running attempt `attempt` (its number, from 1) to
    /// `until`; false if the attempt is no longer the refresh's running one.
    pub async fn renew_attempt(
        &self,
        refresh_id: RefreshId,
        attempt: u32,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE refreshes SET attempt_until = $3 \
             WHERE refresh_id = $1 AND status = 'INITIALIZED' AND attempts = $2 \
               AND attempt_until IS NOT NULL",
        )
        .bind(refresh_id.as_uuid())
        .bind(i32::try_from(attempt).map_err(corrupt)?)
        .bind(until)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Ends the lease of attempt `attempt` without a terminal status (a bank retry, an
    /// attempt abandoned), so the job's next delivery may start the next attempt.
    pub async fn end_attempt(&self, refresh_id: RefreshId, attempt: u32) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE refreshes SET attempt_until = NULL \
             WHERE refresh_id = $1 AND attempts = $2",
        )
        .bind(refresh_id.as_uuid())
        .bind(i32::try_from(attempt).map_err(corrupt)?)
        .execute(self.pool())
        .await?;
        Ok(())
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
        let Some((mut record, trace)) = lock_initialized(&mut tx, refresh_id).await? else {
            tx.rollback().await?;
            return Ok(Finish::Fenced);
        };
        record.finish_error(error, at).map_err(corrupt)?;
        write_terminal(&mut tx, &record, trace, consent_status, event_id, at).await?;
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
        let Some((mut record, trace)) = lock_initialized(&mut tx, refresh_id).await? else {
            tx.rollback().await?;
            return Ok(Finish::Fenced);
        };
        let consent = *record.consent_id.as_uuid();
        if consent_revoked(&mut tx, consent).await? {
            // Revoked while the refresh ran (SPEC §3): store nothing more.
            record
                .finish_error(RefreshError::consent_revoked(), at)
                .map_err(corrupt)?;
            write_terminal(&mut tx, &record, trace, None, event_id, at).await?;
            tx.commit().await?;
            return Ok(Finish::Done(record));
        }
        let (accounts, balances) = write_accounts(&mut tx, consent, data, at).await?;
        let (transactions, mut changes) =
            merge_transactions(&mut tx, consent, refresh_id, data).await?;
        changes.extend(data.balances.iter().map(|b| ("balance", balance_item(b))));
        write_changes(&mut tx, refresh_id, &changes).await?;
        if let Some(items) = &data.items {
            write_items(&mut tx, consent, items, at).await?;
        }
        record
            .finish_updated(RefreshSummary::new(accounts, balances, transactions), at)
            .map_err(corrupt)?;
        write_terminal(&mut tx, &record, trace, None, event_id, at).await?;
        if data.initial {
            // Also a refresh requested as a plain one, when no initial load had
            // succeeded. Its record keeps `initial = false`: that column says the
            // admission was not counted against a quota (the gate rebuild reads it),
            // and this one was.
            sqlx::query("UPDATE consents SET initial_loaded_at = $2 WHERE consent_id = $1")
                .bind(consent)
                .bind(at)
                .execute(&mut *tx)
                .await?;
        }
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
        let d = &account.details;
        sqlx::query(
            "INSERT INTO accounts (consent_id, account_id, data, updated_at, status, currency, \
             account_type, account_sub_type, nickname, description, opening_date) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (consent_id, account_id) DO UPDATE SET data = EXCLUDED.data, \
             updated_at = EXCLUDED.updated_at, status = EXCLUDED.status, \
             currency = EXCLUDED.currency, account_type = EXCLUDED.account_type, \
             account_sub_type = EXCLUDED.account_sub_type, nickname = EXCLUDED.nickname, \
             description = EXCLUDED.description, opening_date = EXCLUDED.opening_date",
        )
        .bind(consent)
        .bind(&account.account_id)
        .bind(&account.data)
        .bind(at)
        .bind(&d.status)
        .bind(&d.currency)
        .bind(&d.account_type)
        .bind(&d.account_sub_type)
        .bind(&d.nickname)
        .bind(&d.description)
        .bind(d.opening_date)
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
        .bind(balance.amount.as_str())
        .bind(&balance.currency)
        .bind(balance.date_time)
        .bind(&balance.data)
        .execute(&mut **tx)
        .await?;
        *slot += 1;
    }
    Ok((data.accounts.len() as u64, data.balances.len() as u64))
}

/// Loads the stored rows relevant to the batch (by key), plans the merge and applies
/// it; returns the counts and the change set (kind, item), which always agree.
async fn merge_transactions(
    tx: &mut PgTx,
    consent: uuid::Uuid,
    refresh_id: RefreshId,
    data: &FetchedData,
) -> Result<(TxSummary, Vec<(&'static str, Value)>), StoreError> {
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
    let window = &data.window;
    if !window.accounts.is_empty() {
        let accounts: Vec<&str> = window.accounts.iter().map(String::as_str).collect();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TX_COLUMNS} FROM transactions WHERE consent_id = $1 AND status = 'PENDING' \
             AND account_id = ANY($2) AND booking_date_time >= $3 AND booking_date >= $4"
        )))
        .bind(consent)
        .bind(&accounts)
        .bind(window.from)
        .bind(window.from.date_naive())
        .fetch_all(&mut **tx)
        .await?;
        // A row may also be one the batch matches by key: pass each once.
        let loaded: BTreeSet<i64> = stored.iter().map(|row| row.row_id).collect();
        for row in &rows {
            let row = stored_transaction(row)?;
            if !loaded.contains(&row.row_id) {
                stored.push(row);
            }
        }
    }
    let plan = plan_refresh_merge(&stored, &data.transactions, &data.rejected, window);
    let by_row: BTreeMap<i64, &Transaction> = stored.iter().map(|r| (r.row_id, &r.tx)).collect();
    let mut changes: Vec<(&'static str, Value)> = Vec::new();
    changes.extend(plan.inserts.iter().map(|t| ("added", change_item(t))));
    changes.extend(
        plan.updates
            .iter()
            .map(|(_, t)| ("updated", change_item(t))),
    );
    for row in &plan.deletes {
        let removed = by_row
            .get(row)
            .ok_or_else(|| corrupt("a planned deletion of a row that was not loaded"))?;
        changes.push(("removed", change_item(removed)));
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
    Ok((plan.summary, changes))
}

/// A transaction as `GET …/transactions` lists it (the same fields and spelling).
fn change_item(t: &Transaction) -> Value {
    let value_date_time = t
        .raw
        .get("ValueDateTime")
        .and_then(Value::as_str)
        .and_then(|raw| DateTime::parse_from_rfc3339(raw).ok())
        .map(|v| v.to_utc());
    serde_json::json!({
        "accountId": t.account_id,
        "transactionId": t.transaction_id,
        "bookingDate": t.booking_date,
        "bookingDateTime": refresh_core::time::format_millis(&t.booking_date_time),
        "status": t.status.as_str(),
        "amount": t.amount.as_str(),
        "currency": t.currency,
        "creditDebitIndicator": t.credit_debit.as_str(),
        "description": t.description,
        "valueDateTime": value_date_time.as_ref().map(refresh_core::time::format_millis),
        "reference": t.raw.get("TransactionReference").and_then(Value::as_str),
    })
}

/// A balance as `GET …/balances` lists it.
fn balance_item(b: &BalanceData) -> Value {
    serde_json::json!({
        "accountId": b.account_id,
        "type": b.balance_type,
        "amount": b.amount.as_str(),
        "currency": b.currency,
        "creditDebitIndicator": b.credit_debit.as_str(),
        "dateTime": refresh_core::time::format_millis(&b.date_time),
        "raw": b.data,
    })
}

/// Writes a refresh's change set, in order.
async fn write_changes(
    tx: &mut PgTx,
    refresh_id: RefreshId,
    changes: &[(&'static str, Value)],
) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let kinds: Vec<&str> = changes.iter().map(|(k, _)| *k).collect();
    let items: Vec<Json<&Value>> = changes.iter().map(|(_, v)| Json(v)).collect();
    sqlx::query(
        "INSERT INTO refresh_changes (refresh_id, seq, kind, item) \
         SELECT $1, c.seq, c.kind, c.item FROM UNNEST($2::text[], $3::jsonb[]) \
         WITH ORDINALITY AS c(kind, item, seq)",
    )
    .bind(refresh_id.as_uuid())
    .bind(&kinds)
    .bind(&items)
    .execute(&mut **tx)
    .await?;
    Ok(())
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
