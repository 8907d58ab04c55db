//! Scenario 4: merging 1,000 new transactions into one consent's stored history of
//! 10k, then 100k, then 1M transactions, through `Store::finish_updated` (the
//! worker's finishing transaction). The history is grown in place with
//! `INSERT … SELECT generate_series(…)`, so each size is the whole table.

use std::time::Instant;

use anyhow::{Context, Result};
use chrono::{NaiveDate, TimeDelta, Utc};
use refresh_core::{Amount, CreditDebit, EventId, RefreshId, Transaction, TxStatus};
use refresh_pg::{FetchedData, Finish, Store};
use refresh_tests::spawn_app_with;
use serde_json::json;
use uuid::Uuid;

use crate::report::Report;
use crate::stats::{ms, percentile};
use crate::{RELAXED, progress};

const SIZES: &[(i64, &str)] = &[(10_000, "10k"), (100_000, "100k"), (1_000_000, "1m")];
const NEW: usize = 1_000;
const RUNS: usize = 5;
const ACCOUNT: &str = "bench-account";

/// `count` transactions with fresh ids, like a bank page of new activity.
fn batch(tag: &str, count: usize) -> Result<Vec<Transaction>> {
    let day = NaiveDate::from_ymd_opt(2025, 6, 1).context("a valid date")?;
    (0..count)
        .map(|i| {
            let at = day.and_hms_opt(12, 0, 0).context("a valid time")?.and_utc()
                + TimeDelta::seconds(i as i64);
            Ok(Transaction {
                account_id: ACCOUNT.to_owned(),
                transaction_id: Some(format!("{tag}-{i}")),
                booking_date: at.date_naive(),
                booking_date_time: at,
                status: TxStatus::Booked,
                amount: Amount::parse("12.34")?,
                currency: "GBP".to_owned(),
                credit_debit: CreditDebit::Debit,
                description: Some("Card payment".to_owned()),
                raw: json!({"TransactionId": format!("{tag}-{i}"), "Amount": {"Amount": "12.34", "Currency": "GBP"}}),
            })
        })
        .collect()
}

/// An INITIALIZED refresh of the consent (what admission writes), for one merge.
async fn initialized(store: &Store, consent: Uuid) -> Result<RefreshId> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO refreshes (refresh_id, consent_id, tenant_id, requested_by, status, \
         date_requested, not_before) VALUES ($1, $2, 'bench', 'API', 'INITIALIZED', now(), now())",
    )
    .bind(id)
    .bind(consent)
    .execute(store.pool())
    .await?;
    Ok(RefreshId::from_uuid(id))
}

/// Grows the consent's stored history to `to` rows (from `from`).
async fn grow(store: &Store, consent: Uuid, from: i64, to: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO transactions (consent_id, account_id, transaction_id, booking_date, \
         booking_date_time, status, amount, currency, credit_debit, description, data, refresh_id) \
         SELECT $1, $2, 'hist-' || g, date '2020-01-01' + (g / 500)::int, \
         timestamptz '2020-01-01 00:00:00+00' + g * interval '1 minute', 'BOOKED', \
         (g % 10000)::text || '.99', 'GBP', CASE WHEN g % 7 = 0 THEN 'CREDIT' ELSE 'DEBIT' END, \
         'History ' || g, jsonb_build_object('TransactionId', 'hist-' || g, 'Amount', \
         jsonb_build_object('Amount', (g % 10000)::text || '.99', 'Currency', 'GBP')), $3 \
         FROM generate_series($4::bigint + 1, $5::bigint) g",
    )
    .bind(consent)
    .bind(ACCOUNT)
    .bind(Uuid::new_v4())
    .bind(from)
    .bind(to)
    .execute(store.pool())
    .await
    .context("bulk-load the history")?;
    sqlx::query("ANALYZE transactions")
        .execute(store.pool())
        .await?;
    Ok(())
}

pub(crate) async fn run(report: &mut Report) -> Result<()> {
    progress("merge: starting a namespace");
    let app = spawn_app_with(RELAXED).await;
    let api = app.start_ingress().await;
    let store = api.services.store.clone();
    let consent = api.seed_consent("bench", None, None).await;
    let consent_uuid = *consent.as_uuid();
    let mut stored = 0_i64;
    let mut medians = Vec::new();
    for (size, name) in SIZES {
        progress(&format!(
            "merge: loading the history to {name} transactions"
        ));
        let load = Instant::now();
        grow(&store, consent_uuid, stored, *size).await?;
        progress(&format!(
            "merge: loaded in {:.1} s",
            load.elapsed().as_secs_f64()
        ));
        stored = *size;
        let mut times = Vec::new();
        // One warm-up merge (caches, plans), then the measured ones.
        for run in 0..=RUNS {
            let refresh = initialized(&store, consent_uuid).await?;
            let data = FetchedData {
                transactions: batch(&format!("new-{name}-{run}"), NEW)?,
                ..FetchedData::default()
            };
            let started = Instant::now();
            let finish = store
                .finish_updated(
                    refresh,
                    &data,
                    EventId::from_uuid(Uuid::now_v7()),
                    Utc::now(),
                )
                .await?;
            let took = started.elapsed();
            let Finish::Done(record) = finish else {
                anyhow::bail!("merge fenced unexpectedly");
            };
            let added = record.summary.map_or(0, |s| s.transactions_added);
            anyhow::ensure!(added == NEW as u64, "merge added {added}, expected {NEW}");
            stored += NEW as i64;
            if run > 0 {
                times.push(ms(took));
            }
            progress(&format!(
                "merge: {name} run {run}/{RUNS}: {:.1} ms",
                ms(took)
            ));
        }
        let median = percentile(&mut times, 0.5).unwrap_or(f64::NAN);
        report.figure(
            "merge",
            &format!("ms_{name}"),
            &format!("merge 1,000 new into {name} stored (median of {RUNS})"),
            median,
            "ms",
        );
        medians.push(median);
    }
    if let (Some(first), Some(last)) = (medians.first(), medians.last()) {
        report.figure(
            "merge",
            "ratio_1m_10k",
            "merge time 1M ÷ 10k",
            last / first,
            "×",
        );
    }
    crate::stop(app, api).await;
    Ok(())
}
