//! A Berlin Group NextGenPSD2 consent (provider `sim_bg`, the simulator's Berlin
//! Group dialect) through the whole pipeline: registered, loaded, refreshed to
//! UPDATED with the merge rules holding (pending booked by id, id-less same-date
//! replacement, a pending the bank dropped), served in the bank-neutral shape, and
//! revoked at the bank.

use chrono::{NaiveDate, TimeDelta, Utc};
use refresh_tests::fixtures::{dataset, day, tx};
use refresh_tests::{app_with_bank, dev_token, fast_worker_config, start_worker};
use serde_json::{Value, json};

fn date(days_ago: i64) -> NaiveDate {
    (Utc::now() - TimeDelta::days(days_ago)).date_naive()
}

/// A pending card payment as a NextGenPSD2 bank sends it: no `transactionId`, no
/// `bookingDate`, only `entryReference` and `transactionDate`.
fn card_payment(days_ago: i64) -> Value {
    json!({"AccountId": "A1", "Status": "Pending", "BookingDateTime": day(days_ago),
           "BerlinGroup": {"entryReference": "E1", "transactionDate": date(days_ago).to_string(),
                           "transactionAmount": {"currency": "GBP", "amount": "-4.00"},
                           "remittanceInformationUnstructured": "card"}})
}

type Row = (Option<String>, String, String, String, NaiveDate);

fn row(id: Option<&str>, status: &str, amount: &str, cd: &str, days_ago: i64) -> Row {
    (
        id.map(str::to_owned),
        status.to_owned(),
        amount.to_owned(),
        cd.to_owned(),
        date(days_ago),
    )
}

#[tokio::test]
async fn a_berlin_group_consent_is_refreshed_by_the_merge_rules() {
    let (app, api, bank) =
        app_with_bank(&[("stagger.limit", "600"), ("bank_sim.page_size", "2")]).await;
    start_worker(&app, &api, fast_worker_config(&app));
    let token = dev_token(&app, Some("acme"), "api:stored_data");
    let key = format!("bg-{}", uuid::Uuid::new_v4());
    bank.put_dataset(
        &key,
        &dataset(
            "Ann",
            "main",
            "100.00",
            vec![
                tx(Some("p9"), "Pending", 9, "12.00"),
                tx(None, "Booked", 2, "10.00"),
                tx(None, "Booked", 2, "20.00"),
                card_payment(3),
                tx(Some("b1"), "Booked", 1, "1.00"),
            ],
        ),
    )
    .await;
    let body = json!({"providerId": "sim_bg", "bankConsentId": key, "accessToken": key,
                      "expiresAt": "2099-01-01T00:00:00Z"});
    let answer = api.post("/v1/consents", &token, Some(&body)).await;
    assert_eq!(answer.status, 201, "{answer:?}");
    let consent = answer.body["consentId"].as_str().unwrap().to_owned();
    let initial = answer.body["initialRefresh"]["refreshId"].as_str().unwrap();
    let record = api.wait_terminal(&token, initial).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
    assert_eq!(record["summary"]["transactionsAdded"], 5, "{record}");

    // The bank books p9 a day later for a new amount, re-lists day 2 as one
    // transaction, drops the card payment, and books a new one.
    bank.put_dataset(
        &key,
        &dataset(
            "Ann",
            "main",
            "55.50",
            vec![
                tx(Some("p9"), "Booked", 8, "12.50"),
                tx(None, "Booked", 2, "15.00"),
                tx(Some("t5"), "Booked", 2, "7.00"),
                tx(Some("b1"), "Booked", 1, "1.00"),
            ],
        ),
    )
    .await;
    let id = api.refresh(&token, &consent).await;
    let record = api.wait_terminal(&token, &id).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
    assert_eq!(
        record["summary"],
        json!({"accountsUpdated": 1, "balancesUpdated": 1, "transactionsAdded": 2,
               "transactionsUpdated": 1, "transactionsRemoved": 3}),
        "{record}"
    );
    let uuid = uuid::Uuid::parse_str(&consent).unwrap();
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT transaction_id, status, amount, credit_debit, booking_date FROM transactions \
         WHERE consent_id = $1 ORDER BY booking_date, transaction_id NULLS FIRST, amount",
    )
    .bind(uuid)
    .fetch_all(&app.pg)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            row(Some("p9"), "BOOKED", "12.50", "DEBIT", 8),
            row(None, "BOOKED", "15.00", "DEBIT", 2),
            row(Some("t5"), "BOOKED", "7.00", "DEBIT", 2),
            row(Some("b1"), "BOOKED", "1.00", "DEBIT", 1),
        ]
    );
    let balance: (String, String, String) = sqlx::query_as(
        "SELECT balance_type, amount, credit_debit FROM balances WHERE consent_id = $1",
    )
    .bind(uuid)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(
        balance,
        ("InterimAvailable".into(), "55.50".into(), "CREDIT".into())
    );

    // Served in the same bank-neutral shape as an OBIE consent's, the bank's object in `raw`.
    let accounts = api
        .get(&format!("/v1/consents/{consent}/accounts"), &token)
        .await;
    assert_eq!(accounts.status, 200, "{accounts:?}");
    let account = &accounts.body["items"][0];
    assert_eq!(
        (
            &account["accountId"],
            &account["status"],
            &account["currency"],
            &account["accountType"],
            &account["accountSubType"],
            &account["nickname"]
        ),
        (
            &json!("A1"),
            &json!("Enabled"),
            &json!("GBP"),
            &json!("Personal"),
            &json!("CurrentAccount"),
            &json!("main")
        ),
        "{account}"
    );
    assert_eq!(account["raw"]["resourceId"], "A1", "{account}");
    assert_eq!(account["raw"]["cashAccountType"], "CACC", "{account}");
    let balances = api
        .get(&format!("/v1/consents/{consent}/balances"), &token)
        .await;
    let balance = &balances.body["items"][0];
    assert_eq!(
        (
            &balance["type"],
            &balance["amount"],
            &balance["creditDebitIndicator"]
        ),
        (
            &json!("InterimAvailable"),
            &json!("55.50"),
            &json!("CREDIT")
        ),
        "{balance}"
    );
    assert_eq!(
        balance["raw"]["balanceType"], "interimAvailable",
        "{balance}"
    );
    assert_eq!(
        balance["raw"]["balanceAmount"]["amount"], "55.50",
        "{balance}"
    );

    // Every call went to the Berlin Group dialect; the refresh asked from the pending's date.
    let calls = bank.calls(&key).await;
    assert!(
        calls.iter().all(|c| c["path"]
            .as_str()
            .unwrap()
            .starts_with("/berlin-group/v1/accounts")),
        "{calls:?}"
    );
    let queries: Vec<&str> = calls
        .iter()
        .filter(|c| c["path"].as_str().unwrap().ends_with("/transactions"))
        .map(|c| c["query"].as_str().unwrap())
        .collect();
    assert!(
        queries.contains(&format!("bookingStatus=both&dateFrom={}", date(9)).as_str()),
        "{queries:?}"
    );
    assert!(
        queries.iter().any(|q| q.ends_with("page=2")),
        "pages followed: {queries:?}"
    );

    // Revoked at the bank (401 CONSENT_INVALID): the consent becomes REVOKED.
    bank.scenario(&key, &json!({"revoked": true})).await;
    let id = api.refresh(&token, &consent).await;
    let record = api.wait_terminal(&token, &id).await;
    assert_eq!(record["status"], "ERROR", "{record}");
    assert_eq!(record["error"]["code"], "consent_revoked");
    let view = api.get(&format!("/v1/consents/{consent}"), &token).await;
    assert_eq!(view.body["status"], "REVOKED", "{view:?}");
}
