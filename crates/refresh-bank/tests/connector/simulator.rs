//! The connector against the simulator: data, paging, each error class,
//! timeouts, and a 5,000-transaction account.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use refresh_bank::{
    BankError, Connector, ConnectorSettings, CreditDebit, ProviderKind, TransactionStatus,
    build_connector,
};
use serde_json::{Value, json};

use crate::support::{connector, long_ago, of_account, quick, refresh, start_sim};

#[tokio::test]
async fn refresh_reads_accounts_balances_and_transactions() {
    let sim = start_sim(100).await;
    let token = "refresh-everything";
    let data = refresh(&sim, quick(), token).await.unwrap();
    let dataset = sim.dataset(token).await;

    let raw_accounts: Vec<&Value> = data.accounts.iter().map(|a| &a.raw).collect();
    assert_eq!(
        raw_accounts,
        dataset["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>()
    );
    let raw_balances: Vec<&Value> = data.balances.iter().map(|b| &b.raw).collect();
    assert_eq!(
        raw_balances,
        dataset["balances"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>()
    );
    let raw_transactions: Vec<&Value> = data.transactions.iter().map(|t| &t.raw).collect();
    let mut expected = Vec::new();
    for account in &data.accounts {
        expected.extend(of_account(&dataset, "transactions", &account.account_id));
    }
    assert_eq!(raw_transactions, expected);
    assert!(data.transactions.len() >= 100);

    assert!(
        data.transactions
            .iter()
            .any(|t| t.status == TransactionStatus::Pending)
    );
    assert!(data.transactions.iter().any(|t| t.transaction_id.is_none()));
    assert!(
        data.transactions
            .iter()
            .any(|t| t.credit_debit == CreditDebit::Credit)
    );
    for t in &data.transactions {
        assert_eq!(t.raw["Amount"]["Amount"], t.amount.as_str());
        assert_eq!(t.raw["TransactionId"].as_str(), t.transaction_id.as_deref());
        assert_eq!(t.booking_date, t.booking_date_time.date_naive());
    }
    let types: HashSet<&str> = data
        .balances
        .iter()
        .map(|b| b.balance_type.as_str())
        .collect();
    assert_eq!(types, HashSet::from(["InterimAvailable", "InterimBooked"]));
    assert!(data.deviations.is_empty(), "{:?}", data.deviations);
    assert!(data.initial.is_none());

    // One bank call per request made, each with the token as the consent key.
    let calls = sim.calls(token).await;
    assert_eq!(calls.len(), data.requests as usize);
    assert!(calls.iter().all(|c| c["status"] == 200));
}

#[tokio::test]
async fn initial_load_reads_every_kind() {
    let sim = start_sim(100).await;
    let token = "initial-everything";
    let data = connector(quick())
        .fetch_initial(&sim.access(token), long_ago())
        .await
        .unwrap();
    let dataset = sim.dataset(token).await;
    let more = data.initial.as_ref().unwrap();
    assert_eq!(
        data.accounts.len(),
        dataset["accounts"].as_array().unwrap().len()
    );
    for (list, items) in [
        ("beneficiaries", &more.beneficiaries),
        ("directDebits", &more.direct_debits),
        ("standingOrders", &more.standing_orders),
        ("scheduledPayments", &more.scheduled_payments),
        ("statements", &more.statements),
        ("products", &more.products),
    ] {
        let raws: Vec<&Value> = items.iter().map(|i| &i.raw).collect();
        let mut expected = Vec::new();
        for account in &data.accounts {
            expected.extend(of_account(&dataset, list, &account.account_id));
        }
        assert_eq!(raws, expected, "{list}");
        for item in items {
            assert_eq!(item.raw["AccountId"], item.account_id.as_str(), "{list}");
        }
    }
    assert_eq!(more.statements.len(), 3 * data.accounts.len());
    assert_eq!(more.products.len(), data.accounts.len());
    // Parties: `/parties` and the `/party` owner, once each per account; the
    // bank's objects carry no AccountId, the item says whose they are.
    assert_eq!(
        more.parties.len(),
        dataset["parties"].as_array().unwrap().len()
    );
    for party in &more.parties {
        assert!(party.raw.get("AccountId").is_none());
        assert_eq!(party.id.as_deref(), party.raw["PartyId"].as_str());
    }
    assert!(data.deviations.is_empty(), "{:?}", data.deviations);
    // accounts, then per account its transaction pages and 9 one-page listings.
    let transaction_pages: usize = data
        .accounts
        .iter()
        .map(|a| {
            of_account(&dataset, "transactions", &a.account_id)
                .len()
                .div_ceil(100)
        })
        .sum();
    assert_eq!(
        data.requests as usize,
        1 + transaction_pages + 9 * data.accounts.len()
    );
}

#[tokio::test]
async fn paging_across_many_pages() {
    let sim = start_sim(3).await;
    let token = "many-pages";
    let data = refresh(&sim, quick(), token).await.unwrap();
    let dataset = sim.dataset(token).await;
    let transactions = dataset["transactions"].as_array().unwrap();
    assert_eq!(data.transactions.len(), transactions.len());
    let mut pages = 0;
    for account in &data.accounts {
        let n = of_account(&dataset, "transactions", &account.account_id).len();
        pages += n.div_ceil(3) + 1; // transactions and balances
    }
    pages += data.accounts.len().div_ceil(3);
    assert_eq!(data.requests as usize, pages);
    assert!(pages > 50, "{pages}");

    let capped = ConnectorSettings {
        max_pages: 5,
        ..quick()
    };
    let err = refresh(&sim, capped, token).await.unwrap_err();
    assert_eq!(
        err,
        BankError::Malformed("transactions: more than 5 pages".into())
    );
}

#[tokio::test]
async fn the_window_starts_at_midnight_utc_of_from_booking() {
    let sim = start_sim(100).await;
    let token = "window";
    let dataset = sim.dataset(token).await;
    let mut times: Vec<DateTime<Utc>> = dataset["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["BookingDateTime"].as_str().unwrap().parse().unwrap())
        .collect();
    times.sort();
    // Mid-afternoon of the day of the 40th newest transaction.
    let day = times[times.len() - 40].date_naive();
    let from = day.and_hms_opt(15, 30, 0).unwrap().and_utc();
    let midnight = day.and_hms_opt(0, 0, 0).unwrap().and_utc();
    let expected = times.iter().filter(|t| **t >= midnight).count();
    let data = connector(quick())
        .fetch_refresh(&sim.access(token), from)
        .await
        .unwrap();
    assert_eq!(data.transactions.len(), expected);
    assert!(expected >= 40 && expected < times.len());
    assert!(
        data.transactions
            .iter()
            .all(|t| t.booking_date_time >= midnight)
    );
}

#[tokio::test]
async fn five_thousand_transactions() {
    let sim = start_sim(100).await;
    let token = "five-thousand";
    let base = DateTime::parse_from_rfc3339("2025-01-01T00:00:00+00:00").unwrap();
    let transactions: Vec<Value> = (0..5_000)
        .map(|i| {
            json!({
                "AccountId": "ACC1",
                "TransactionId": format!("tx-{i:05}"),
                "Amount": {"Amount": format!("{}.{:02}", i / 100, i % 100), "Currency": "GBP"},
                "CreditDebitIndicator": if i % 3 == 0 { "Credit" } else { "Debit" },
                "Status": "Booked",
                "BookingDateTime": (base + chrono::Duration::minutes(i)).to_rfc3339(),
                "TransactionInformation": format!("payment {i}")
            })
        })
        .collect();
    let dataset = json!({
        "accounts": [{"AccountId": "ACC1", "Currency": "GBP", "AccountType": "Personal", "AccountSubType": "CurrentAccount"}],
        "balances": [{"AccountId": "ACC1", "Amount": {"Amount": "10.00", "Currency": "GBP"},
                      "CreditDebitIndicator": "Credit", "Type": "InterimBooked", "DateTime": "2025-01-05T00:00:00+00:00"}],
        "transactions": transactions
    });
    sim.put(token, &dataset).await;
    let started = Instant::now();
    let data = refresh(&sim, quick(), token).await.unwrap();
    let took = started.elapsed();
    assert_eq!(data.transactions.len(), 5_000);
    let ids: HashSet<&str> = data
        .transactions
        .iter()
        .filter_map(|t| t.transaction_id.as_deref())
        .collect();
    assert_eq!(ids.len(), 5_000);
    assert_eq!(data.transactions[4_999].amount.as_str(), "49.99");
    assert_eq!(data.requests, 1 + 1 + 50);
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[tokio::test]
async fn revoked_and_mfa() {
    let sim = start_sim(100).await;
    sim.scenario("revoked", json!({"revoked": true})).await;
    assert_eq!(
        refresh(&sim, quick(), "revoked").await.unwrap_err(),
        BankError::Revoked
    );
    sim.scenario("mfa", json!({"mfaRequired": true})).await;
    assert_eq!(
        refresh(&sim, quick(), "mfa").await.unwrap_err(),
        BankError::MfaRequired
    );
    // MFA is also reported by the initial load, whichever call meets it.
    let err = connector(quick())
        .fetch_initial(&sim.access("mfa"), long_ago())
        .await
        .unwrap_err();
    assert_eq!(err, BankError::MfaRequired);
    // A 401 means the token is gone.
    sim.scenario(
        "unauthorized",
        json!({"failNext": {"count": 1, "status": 401}}),
    )
    .await;
    assert_eq!(
        refresh(&sim, quick(), "unauthorized").await.unwrap_err(),
        BankError::Revoked
    );
}

fn transient(err: BankError) -> (Option<Duration>, String) {
    match err {
        BankError::Transient {
            retry_after,
            reason,
        } => (retry_after, reason),
        other => panic!("expected transient, got {other:?}"),
    }
}

#[tokio::test]
async fn bank_failures_are_transient() {
    let sim = start_sim(100).await;
    for (status, retry_after) in [(500, None), (502, None), (503, Some(1)), (429, Some(1))] {
        let token = format!("fail-{status}");
        sim.scenario(&token, json!({"failNext": {"count": 1, "status": status}}))
            .await;
        let (after, reason) = transient(refresh(&sim, quick(), &token).await.unwrap_err());
        assert_eq!(after, retry_after.map(Duration::from_secs), "{status}");
        assert_eq!(reason, format!("http status {status}"));
        // Used up: the next fetch gets data.
        refresh(&sim, quick(), &token).await.unwrap();
    }
}

#[tokio::test]
async fn a_held_call_times_out() {
    let sim = start_sim(100).await;
    sim.scenario("hang", json!({"hangNext": 1})).await;
    let settings = ConnectorSettings {
        request_timeout: Duration::from_millis(300),
        ..quick()
    };
    let started = Instant::now();
    let (after, reason) = transient(refresh(&sim, settings.clone(), "hang").await.unwrap_err());
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        (after, reason.as_str()),
        (None, "request timed out after 300ms")
    );
    refresh(&sim, settings, "hang").await.unwrap();
}

#[tokio::test]
async fn a_slow_fetch_times_out_as_a_whole() {
    let sim = start_sim(100).await;
    // Each call is quick enough, all of them together are not.
    sim.scenario("slow", json!({"latencyMs": 150})).await;
    let settings = ConnectorSettings {
        request_timeout: Duration::from_secs(2),
        fetch_timeout: Duration::from_millis(400),
        max_pages: 1000,
    };
    let (_, reason) = transient(refresh(&sim, settings, "slow").await.unwrap_err());
    assert_eq!(reason, "fetch took longer than 400ms");
}

#[tokio::test]
async fn no_bank_listening_is_transient() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let access = refresh_bank::ConsentAccess {
        base_url: format!("http://{addr}/open-banking/v3.1/aisp"),
        access_token: "never-shown-token".into(),
        financial_id: "x".into(),
        trace: None,
        bank_consent_id: "x".into(),
    };
    let err = connector(quick())
        .fetch_refresh(&access, long_ago())
        .await
        .unwrap_err();
    let text = format!("{err} {err:?}");
    let (_, reason) = transient(err);
    assert!(reason.starts_with("request failed: "), "{reason}");
    assert!(!text.contains("never-shown-token"));
}

/// A dataset of one account whose one transaction is `tx` (patched over a
/// valid one).
fn with_transaction(patch: Value) -> Value {
    let mut tx = json!({
        "AccountId": "A",
        "TransactionId": "t1",
        "Amount": {"Amount": "12.50", "Currency": "GBP"},
        "CreditDebitIndicator": "Debit",
        "Status": "Booked",
        "BookingDateTime": "2025-02-01T10:00:00+00:00"
    });
    for (k, v) in patch.as_object().unwrap() {
        if v.is_null() {
            tx.as_object_mut().unwrap().remove(k);
        } else {
            tx[k] = v.clone();
        }
    }
    json!({
        "accounts": [{"AccountId": "A"}],
        "balances": [{"AccountId": "A", "Amount": {"Amount": "1.00", "Currency": "GBP"},
                      "CreditDebitIndicator": "Credit", "Type": "InterimBooked",
                      "DateTime": "2025-02-01T00:00:00+00:00"}],
        "transactions": [tx]
    })
}

#[tokio::test]
async fn malformed_payloads_are_refused() {
    let sim = start_sim(100).await;
    for (n, (patch, expected)) in [
        (json!({}), None),
        (
            json!({"Amount": {"Amount": 12.5, "Currency": "GBP"}}),
            Some("transactions: item 0: invalid type: floating point `12.5`, expected a string"),
        ),
        (
            json!({"Amount": {"Amount": "12.505050", "Currency": "GBP"}}),
            Some("transactions: item 0: Amount: malformed amount \"12.505050\": expected an optional '-', 1 to 18 digits, and optionally '.' with 1 to 5 digits"),
        ),
        (
            json!({"Amount": {"Amount": "-12.50", "Currency": "GBP"}}),
            Some("transactions: item 0: Amount: negative amount \"-12.50\": the sign belongs in CreditDebitIndicator"),
        ),
        (
            json!({"Amount": {"Amount": "12.50", "Currency": "£"}}),
            Some("transactions: item 0: Amount: invalid currency \"£\": expected three capital letters"),
        ),
        (
            json!({"BookingDateTime": null}),
            Some("transactions: item 0: missing field `BookingDateTime`"),
        ),
        (
            json!({"Status": "Settled"}),
            Some("transactions: item 0: unknown variant `Settled`, expected one of `Booked`, `Pending`, `Rejected`"),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let token = format!("malformed-{n}");
        sim.put(&token, &with_transaction(patch.clone())).await;
        let got = refresh(&sim, quick(), &token).await;
        match expected {
            None => assert_eq!(got.unwrap().transactions.len(), 1),
            Some(message) => {
                assert_eq!(got.unwrap_err(), BankError::Malformed(message.into()), "{patch}")
            }
        }
    }

    // A float balance, and a float in an initial-load kind.
    let mut dataset = with_transaction(json!({}));
    dataset["balances"][0]["Amount"]["Amount"] = json!(1.0);
    sim.put("malformed-balance", &dataset).await;
    let err = refresh(&sim, quick(), "malformed-balance")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BankError::Malformed(m) if m.starts_with("balances: item 0")),
        "{err:?}"
    );

    let mut dataset = with_transaction(json!({}));
    dataset["directDebits"] = json!([{"AccountId": "A", "MandateIdentification": "M", "Name": "N",
                                      "PreviousPaymentAmount": {"Amount": 9.99, "Currency": "GBP"}}]);
    sim.put("malformed-dd", &dataset).await;
    refresh(&sim, quick(), "malformed-dd").await.unwrap();
    let err = connector(quick())
        .fetch_initial(&sim.access("malformed-dd"), long_ago())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BankError::Malformed(m) if m.starts_with("direct-debits: item 0")),
        "{err:?}"
    );
}

#[tokio::test]
async fn tolerated_deviations_are_counted() {
    let sim = start_sim(100).await;
    let mut dataset =
        with_transaction(json!({"TransactionId": "", "BookingDateTime": "2025-02-01T10:00:00"}));
    let t2 = json!({"AccountId": "A", "TransactionId": "dup", "Amount": {"Amount": "1", "Currency": "GBP"},
                    "CreditDebitIndicator": "Credit", "Status": "Pending", "BookingDateTime": "2025-02-02T10:00:00Z"});
    let mut t3 = t2.clone();
    t3["Status"] = json!("Booked");
    dataset["transactions"]
        .as_array_mut()
        .unwrap()
        .extend([t2, t3]);
    sim.put("deviations", &dataset).await;
    let data = refresh(&sim, quick(), "deviations").await.unwrap();
    assert_eq!(data.transactions.len(), 2);
    assert_eq!(data.transactions[0].transaction_id, None);
    assert_eq!(data.transactions[1].status, TransactionStatus::Booked);
    let deviations: Vec<(&str, u64)> = data.deviations.into_iter().collect();
    assert_eq!(
        deviations,
        [
            ("date_time_without_offset", 1),
            ("duplicate_transaction_id", 1),
            ("transaction_id_empty", 1),
        ]
    );
}

#[tokio::test]
async fn the_factory_builds_an_obie_connector() {
    let sim = start_sim(100).await;
    let kind: ProviderKind = "obie".parse().unwrap();
    let c = build_connector(kind, quick()).unwrap();
    assert_eq!(c.provider_kind(), ProviderKind::Obie);
    let shared: std::sync::Arc<dyn Connector> = c;
    let data = shared
        .fetch_refresh(
            &sim.access("factory"),
            Utc::now() - chrono::Duration::days(7),
        )
        .await
        .unwrap();
    assert!(!data.accounts.is_empty());
}
