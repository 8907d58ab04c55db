//! The fetch window and the pending rule (SPEC §5) through the real pipeline, on
//! crafted simulator data: pending transactions are fetched again until they book,
//! pending ones the bank no longer returns go, the window never reaches past
//! `worker.history_days`, and a consent whose initial load failed is loaded next time.

use chrono::{NaiveDate, TimeDelta, Utc};
use refresh_tests::fixtures::{dataset, tx};
use refresh_tests::{
    Api, Bank, TestApp, app_with_bank, dev_token, fast_worker_config, start_worker,
};
use serde_json::{Value, json};

const STORED: &str = "api:stored_data";

async fn started(max_attempts: u32) -> (TestApp, Api, Bank, String) {
    let (app, api, bank) = app_with_bank(&[("stagger.limit", "600")]).await;
    let mut config = fast_worker_config(&app);
    config.max_attempts = max_attempts;
    start_worker(&app, &api, config);
    let token = dev_token(&app, Some("acme"), STORED);
    (app, api, bank, token)
}

/// Registers a consent with the simulator key `key`; returns (consentId, initial refreshId).
async fn register(api: &Api, token: &str, key: &str) -> (String, String) {
    let body = json!({ "providerId": "sim", "bankConsentId": key, "accessToken": key, "expiresAt": "2099-01-01T00:00:00Z" });
    let answer = api.post("/v1/consents", token, Some(&body)).await;
    assert_eq!(answer.status, 201, "{answer:?}");
    (
        answer.body["consentId"].as_str().unwrap().to_owned(),
        answer.body["initialRefresh"]["refreshId"]
            .as_str()
            .unwrap()
            .to_owned(),
    )
}

/// Requests a refresh and waits for it; returns its record.
async fn refreshed(api: &Api, token: &str, consent: &str) -> Value {
    let id = api.refresh(token, consent).await;
    api.wait_terminal(token, &id).await
}

fn date(days_ago: i64) -> NaiveDate {
    (Utc::now() - TimeDelta::days(days_ago)).date_naive()
}

fn summary(added: u64, updated: u64, removed: u64) -> Value {
    json!({"accountsUpdated": 1, "balancesUpdated": 1, "transactionsAdded": added,
           "transactionsUpdated": updated, "transactionsRemoved": removed})
}

type Row = (Option<String>, String, String, NaiveDate);

fn row(id: Option<&str>, status: &str, amount: &str, days_ago: i64) -> Row {
    (
        id.map(str::to_owned),
        status.to_owned(),
        amount.to_owned(),
        date(days_ago),
    )
}

/// The consent's stored transactions, oldest first.
async fn rows(app: &TestApp, consent: &str) -> Vec<Row> {
    sqlx::query_as(
        "SELECT transaction_id, status, amount, booking_date FROM transactions WHERE consent_id = $1 \
         ORDER BY booking_date, transaction_id NULLS FIRST, amount",
    )
    .bind(uuid::Uuid::parse_str(consent).unwrap())
    .fetch_all(&app.pg)
    .await
    .unwrap()
}

/// The `fromBookingDateTime` of every transactions call for `key`, in order.
async fn windows(bank: &Bank, key: &str) -> Vec<String> {
    bank.calls(key)
        .await
        .iter()
        .filter(|c| c["path"].as_str().unwrap().ends_with("/transactions"))
        .map(|c| {
            let query = c["query"].as_str().unwrap_or_default().replace("%3A", ":");
            query
                .split('&')
                .find_map(|pair| pair.strip_prefix("fromBookingDateTime="))
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

fn from(days_ago: i64) -> String {
    format!("{}T00:00:00", date(days_ago))
}

#[tokio::test]
async fn a_nine_day_old_pending_books_with_a_new_amount() {
    let (app, api, bank, token) = started(5).await;
    let key = format!("sim-{}", uuid::Uuid::new_v4());
    let before = vec![
        tx(Some("p9"), "Pending", 9, "12.00"),
        tx(Some("b1"), "Booked", 1, "3.00"),
    ];
    bank.put_dataset(&key, &dataset("Ann", "main", "10.00", before))
        .await;
    let (consent, initial) = register(&api, &token, &key).await;
    let record = api.wait_terminal(&token, &initial).await;
    assert_eq!(record["summary"], summary(2, 0, 0), "{record}");

    // Booked a day later, for a different amount (a tip, a currency conversion).
    let after = vec![
        tx(Some("p9"), "Booked", 8, "12.50"),
        tx(Some("b1"), "Booked", 1, "3.00"),
    ];
    bank.put_dataset(&key, &dataset("Ann", "main", "10.00", after))
        .await;
    let record = refreshed(&api, &token, &consent).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
    assert_eq!(record["summary"], summary(0, 1, 0), "{record}");
    assert_eq!(
        rows(&app, &consent).await,
        [
            row(Some("p9"), "BOOKED", "12.50", 8),
            row(Some("b1"), "BOOKED", "3.00", 1)
        ]
    );

    // Nothing pending any more: the next refresh goes back to the overlap.
    let record = refreshed(&api, &token, &consent).await;
    assert_eq!(record["summary"], summary(0, 0, 0), "{record}");
    assert_eq!(
        windows(&bank, &key).await,
        [from(90), from(9), from(7)],
        "initial load, then back to the pending's date, then the overlap"
    );
}

#[tokio::test]
async fn an_idless_pending_booked_under_an_id_on_another_date_leaves_one_transaction() {
    let (app, api, bank, token) = started(5).await;
    let key = format!("sim-{}", uuid::Uuid::new_v4());
    let before = vec![
        tx(None, "Pending", 3, "20.00"),
        tx(None, "Booked", 4, "7.00"),
    ];
    bank.put_dataset(&key, &dataset("Ann", "main", "10.00", before))
        .await;
    let (consent, initial) = register(&api, &token, &key).await;
    let record = api.wait_terminal(&token, &initial).await;
    assert_eq!(record["summary"], summary(2, 0, 0), "{record}");

    // The bank books it the day before, with an id; the booked id-less one of
    // day 4 drops out of the listing but stays stored (BOOKED is never removed).
    let after = vec![tx(Some("x1"), "Booked", 2, "20.00")];
    bank.put_dataset(&key, &dataset("Ann", "main", "10.00", after))
        .await;
    let record = refreshed(&api, &token, &consent).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
    assert_eq!(record["summary"], summary(1, 0, 1), "{record}");
    assert_eq!(
        rows(&app, &consent).await,
        [
            row(None, "BOOKED", "7.00", 4),
            row(Some("x1"), "BOOKED", "20.00", 2)
        ]
    );
}

#[tokio::test]
async fn a_hundred_day_old_pending_does_not_widen_the_window_past_history_days() {
    let (app, api, bank, token) = started(5).await;
    let key = format!("sim-{}", uuid::Uuid::new_v4());
    let listed = vec![tx(Some("b1"), "Booked", 1, "1.00")];
    bank.put_dataset(&key, &dataset("Ann", "main", "10.00", listed))
        .await;
    let (consent, initial) = register(&api, &token, &key).await;
    let record = api.wait_terminal(&token, &initial).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
    // A pending transaction stored back when, 100 days old, that the bank no longer lists.
    let booked_at = (Utc::now() - TimeDelta::days(100))
        .date_naive()
        .and_hms_opt(10, 0, 0)
        .unwrap()
        .and_utc();
    sqlx::query(
        "INSERT INTO transactions (consent_id, account_id, transaction_id, booking_date, \
         booking_date_time, status, amount, currency, credit_debit, description, data, refresh_id) \
         VALUES ($1, 'A1', 'p100', $2, $3, 'PENDING', '5.00', 'GBP', 'DEBIT', 'old', '{}', $4)",
    )
    .bind(uuid::Uuid::parse_str(&consent).unwrap())
    .bind(booked_at.date_naive())
    .bind(booked_at)
    .bind(uuid::Uuid::parse_str(&initial).unwrap())
    .execute(&app.pg)
    .await
    .unwrap();

    let record = refreshed(&api, &token, &consent).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
    assert_eq!(record["summary"], summary(0, 0, 0), "{record}");
    assert_eq!(windows(&bank, &key).await, [from(90), from(90)]);
    assert_eq!(
        rows(&app, &consent).await,
        [
            row(Some("p100"), "PENDING", "5.00", 100),
            row(Some("b1"), "BOOKED", "1.00", 1)
        ],
        "outside the window, so neither fetched nor removed"
    );
}

#[tokio::test]
async fn a_consent_whose_initial_load_failed_is_loaded_by_its_next_refresh() {
    let (app, api, bank, token) = started(2).await;
    let key = format!("sim-{}", uuid::Uuid::new_v4());
    let listed = vec![tx(Some("b1"), "Booked", 1, "1.00")];
    bank.put_dataset(&key, &dataset("Ann", "main", "10.00", listed))
        .await;
    bank.scenario(&key, &json!({"failNext": {"count": 2, "status": 503}}))
        .await;
    let (consent, initial) = register(&api, &token, &key).await;
    let record = api.wait_terminal(&token, &initial).await;
    assert_eq!(record["status"], "ERROR", "{record}");
    assert_eq!(record["error"]["code"], "bank_unavailable");

    let count = |sql: &'static str| {
        let pg = app.pg.clone();
        let consent = uuid::Uuid::parse_str(&consent).unwrap();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .bind(consent)
                .fetch_one(&pg)
                .await
                .unwrap()
        }
    };
    let beneficiary_calls = |calls: &[Value]| {
        calls
            .iter()
            .filter(|c| c["path"].as_str().unwrap().ends_with("/beneficiaries"))
            .count()
    };

    // A plain request, but nothing was ever loaded: an initial load.
    let record = refreshed(&api, &token, &consent).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
    assert_eq!(beneficiary_calls(&bank.calls(&key).await), 1);
    assert_eq!(
        count("SELECT count(*) FROM stored_items WHERE consent_id = $1 AND kind = 'beneficiaries'")
            .await,
        1
    );
    assert_eq!(
        count("SELECT count(*) FROM account_parties WHERE consent_id = $1").await,
        1
    );
    assert_eq!(
        count(
            "SELECT count(*) FROM consents WHERE consent_id = $1 AND initial_loaded_at IS NOT NULL"
        )
        .await,
        1
    );

    // Loaded now: the next one is a plain refresh.
    let record = refreshed(&api, &token, &consent).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
    assert_eq!(beneficiary_calls(&bank.calls(&key).await), 1);
    assert_eq!(windows(&bank, &key).await, [from(90), from(7)]);
}
