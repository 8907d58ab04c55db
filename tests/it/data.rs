//! The stored-data read API (SPEC §3) through the real services, the real worker and
//! the bank simulator: what a refresh stored is what the bank has, transactions page
//! newest first with filters, and bad queries and other tenants are refused.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use refresh_tests::{
    Api, Bank, TestApp, app_with_bank, dev_token, fast_worker_config, start_worker,
};
use serde_json::{Value, json};

const STORED: &str = "api:stored_data";

/// A consent of tenant `acme` whose initial load reached `UPDATED`.
struct Refreshed {
    _app: TestApp,
    api: Api,
    token: String,
    consent: String,
    /// The simulator's dataset of the consent, as the bank serves it.
    bank: Value,
    other_tenant: String,
    admin: String,
}

async fn refreshed() -> Refreshed {
    let (app, api, bank) = app_with_bank(&[("stagger.limit", "600")]).await;
    start_worker(&app, &api, fast_worker_config(&app));
    let token = dev_token(&app, Some("acme"), STORED);
    // A fixed key whose simulated dataset has 3 accounts and every data kind (the
    // simulator is this test's own, so the key is not shared): a random key may draw an
    // empty kind and make the comparisons below vacuous.
    let key = "data-test-2".to_owned();
    let data = dataset_in_window(&bank, &key).await;
    let body = json!({ "providerId": "sim", "bankConsentId": key, "accessToken": key, "expiresAt": "2099-01-01T00:00:00Z" });
    let answer = api.post("/v1/consents", &token, Some(&body)).await;
    assert_eq!(answer.status, 201, "{answer:?}");
    let consent = answer.body["consentId"].as_str().unwrap().to_owned();
    let initial = answer.body["initialRefresh"]["refreshId"].as_str().unwrap();
    let record = api.wait_terminal(&token, initial).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
    Refreshed {
        other_tenant: dev_token(&app, Some("globex"), STORED),
        admin: dev_token(&app, None, "api:admin"),
        _app: app,
        api,
        token,
        consent,
        bank: data,
    }
}

/// The simulator's own data for `key`, its transactions kept inside the fetch window.
async fn dataset_in_window(bank: &Bank, key: &str) -> Value {
    let mut data = bank.dataset(key).await;
    let cutoff = Utc::now() - TimeDelta::days(80);
    data["transactions"]
        .as_array_mut()
        .unwrap()
        .retain(|t| instant(&t["BookingDateTime"]) > cutoff);
    bank.put_dataset(key, &data).await;
    data
}

fn instant(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .to_utc()
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v[key].as_array().map(Vec::as_slice).unwrap_or_default()
}

/// Order-free comparison of two lists of JSON objects.
fn sorted(items: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = items.iter().map(|v| canonical(v).to_string()).collect();
    out.sort();
    out
}

/// `value` with every object's keys in name order: key order is not part of JSON's
/// meaning (PostgreSQL's jsonb reorders them; serde_json keeps them as read when a
/// dependency turns on its `preserve_order`).
fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), canonical(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// A bank transaction as the API lists it (timestamps as instants, for comparing).
fn expected_tx(t: &Value) -> Value {
    let booked = instant(&t["BookingDateTime"]);
    json!({
        "accountId": t["AccountId"],
        "transactionId": t.get("TransactionId").cloned().unwrap_or(Value::Null),
        "bookingDate": booked.date_naive().to_string(),
        "bookingDateTime": booked.timestamp(),
        "status": t["Status"].as_str().unwrap().to_uppercase(),
        "amount": t["Amount"]["Amount"],
        "currency": t["Amount"]["Currency"],
        "creditDebitIndicator": t["CreditDebitIndicator"].as_str().unwrap().to_uppercase(),
        "description": t["TransactionInformation"],
        "valueDateTime": t.get("ValueDateTime").map_or(Value::Null, |v| json!(instant(v).timestamp())),
        "reference": t.get("TransactionReference").cloned().unwrap_or(Value::Null),
    })
}

/// An API item in the same terms (and exactly the fields of the contract).
fn listed_tx(item: &Value) -> Value {
    let keys: Vec<&str> = item
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut want = vec![
        "accountId",
        "amount",
        "bookingDate",
        "bookingDateTime",
        "creditDebitIndicator",
        "currency",
        "description",
        "reference",
        "status",
        "transactionId",
        "valueDateTime",
    ];
    want.sort_unstable();
    let mut have = keys.clone();
    have.sort_unstable();
    assert_eq!(have, want, "{item}");
    let mut out = item.clone();
    out["bookingDateTime"] = json!(instant(&item["bookingDateTime"]).timestamp());
    if !item["valueDateTime"].is_null() {
        out["valueDateTime"] = json!(instant(&item["valueDateTime"]).timestamp());
    }
    out
}

/// Every page of `GET …/transactions?{query}` with `limit`; asserts the cursor chain.
async fn walk(r: &Refreshed, query: &str, limit: u32) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let mut path = format!(
            "/v1/consents/{}/transactions?limit={limit}{query}",
            r.consent
        );
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let answer = r.api.get(&path, &r.token).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let page = list(&answer.body, "items");
        assert!(page.len() <= limit as usize);
        items.extend(page.iter().cloned());
        match &answer.body["nextCursor"] {
            Value::Null => return items,
            Value::String(next) => {
                assert_eq!(
                    page.len(),
                    limit as usize,
                    "only a full page has a next one"
                );
                cursor = Some(next.clone());
            }
            other => panic!("nextCursor {other}"),
        }
    }
    panic!("the pages never end");
}

/// The expected transactions, newest first, of those `keep` selects.
fn expected_txs(r: &Refreshed, keep: impl Fn(&Value) -> bool) -> Vec<Value> {
    list(&r.bank, "transactions")
        .iter()
        .filter(|t| keep(t))
        .map(expected_tx)
        .collect()
}

fn assert_same_transactions(listed: &[Value], expected: &[Value]) {
    let listed: Vec<Value> = listed.iter().map(listed_tx).collect();
    for pair in listed.windows(2) {
        assert!(
            pair[0]["bookingDateTime"].as_i64() >= pair[1]["bookingDateTime"].as_i64(),
            "newest first: {} then {}",
            pair[0],
            pair[1]
        );
    }
    assert_eq!(listed.len(), expected.len());
    assert_eq!(sorted(&listed), sorted(expected));
}

#[tokio::test]
async fn accounts_balances_and_the_other_kinds_are_the_banks() {
    let r = refreshed().await;
    let path = |what: &str| format!("/v1/consents/{}/{what}", r.consent);

    let accounts = r.api.get(&path("accounts"), &r.token).await;
    assert_eq!(accounts.status, 200, "{accounts:?}");
    assert_eq!(accounts.body["nextCursor"], Value::Null);
    let bank_accounts = list(&r.bank, "accounts");
    assert!(!bank_accounts.is_empty());
    assert!(
        list(&accounts.body, "items")
            .iter()
            .all(|a| a["Account"].is_array()),
        "each account has its holder block: {}",
        accounts.body
    );
    assert_eq!(sorted(list(&accounts.body, "items")), sorted(bank_accounts));

    let balances = r.api.get(&path("balances"), &r.token).await;
    assert_eq!(balances.status, 200, "{balances:?}");
    assert_eq!(balances.body["nextCursor"], Value::Null);
    assert_eq!(
        sorted(list(&balances.body, "items")),
        sorted(list(&r.bank, "balances"))
    );
    let first = bank_accounts[0]["AccountId"].as_str().unwrap();
    let one = r
        .api
        .get(&format!("{}?accountId={first}", path("balances")), &r.token)
        .await;
    assert_eq!(one.status, 200, "{one:?}");
    let of_first: Vec<Value> = list(&r.bank, "balances")
        .iter()
        .filter(|b| b["AccountId"] == first)
        .cloned()
        .collect();
    assert!(!of_first.is_empty());
    assert_eq!(sorted(list(&one.body, "items")), sorted(&of_first));

    for (route, key) in [
        ("parties", "parties"),
        ("beneficiaries", "beneficiaries"),
        ("direct-debits", "directDebits"),
        ("standing-orders", "standingOrders"),
        ("scheduled-payments", "scheduledPayments"),
        ("statements", "statements"),
        ("products", "products"),
    ] {
        let answer = r.api.get(&path(route), &r.token).await;
        assert_eq!(answer.status, 200, "{route}: {answer:?}");
        let keys: Vec<&String> = answer.body.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["items"], "{route}");
        assert!(!list(&r.bank, key).is_empty(), "the simulator has {key}");
        assert_eq!(
            sorted(list(&answer.body, "items")),
            sorted(list(&r.bank, key)),
            "{route}"
        );
    }
}

#[tokio::test]
async fn transactions_page_newest_first_exactly_once_and_filter() {
    let r = refreshed().await;
    let all = walk(&r, "", 7).await;
    assert!(all.len() > 7 * 3, "several pages: {}", all.len());
    assert_same_transactions(&all, &expected_txs(&r, |_| true));
    assert!(
        all.iter().any(|t| t["transactionId"].is_null()),
        "the simulator's id-less transactions are listed with a null transactionId"
    );
    assert!(all.iter().any(|t| t["status"] == "PENDING"));
    // One page of everything is the same walk.
    let whole = r
        .api
        .get(
            &format!("/v1/consents/{}/transactions?limit=500", r.consent),
            &r.token,
        )
        .await;
    if whole.body["nextCursor"].is_null() {
        assert_eq!(list(&whole.body, "items"), all.as_slice());
    }
    // The default page is 100.
    let default = r
        .api
        .get(
            &format!("/v1/consents/{}/transactions", r.consent),
            &r.token,
        )
        .await;
    assert_eq!(default.status, 200);
    assert_eq!(list(&default.body, "items").len(), all.len().min(100));
    assert_eq!(list(&default.body, "items"), &all[..all.len().min(100)]);

    // By account.
    let mut per_account: BTreeMap<String, usize> = BTreeMap::new();
    for t in list(&r.bank, "transactions") {
        *per_account
            .entry(t["AccountId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let (account, _) = per_account.iter().next().unwrap();
    let listed = walk(&r, &format!("&accountId={account}"), 50).await;
    assert_same_transactions(&listed, &expected_txs(&r, |t| t["AccountId"] == *account));
    assert!(walk(&r, "&accountId=NO-SUCH-ACCOUNT", 50).await.is_empty());

    // By booking date, both ends inclusive.
    let today = Utc::now().date_naive();
    let from = today - TimeDelta::days(30);
    let to = today - TimeDelta::days(10);
    let date_of = |t: &Value| instant(&t["BookingDateTime"]).date_naive();
    let in_range = |t: &Value, from: Option<NaiveDate>, to: Option<NaiveDate>| {
        from.is_none_or(|f| date_of(t) >= f) && to.is_none_or(|d| date_of(t) <= d)
    };
    let listed = walk(&r, &format!("&from={from}&to={to}"), 13).await;
    let expected = expected_txs(&r, |t| in_range(t, Some(from), Some(to)));
    assert!(!expected.is_empty());
    assert_same_transactions(&listed, &expected);
    let listed = walk(&r, &format!("&from={from}"), 100).await;
    assert_same_transactions(
        &listed,
        &expected_txs(&r, |t| in_range(t, Some(from), None)),
    );
    let listed = walk(&r, &format!("&to={to}&accountId={account}"), 100).await;
    assert_same_transactions(
        &listed,
        &expected_txs(&r, |t| {
            in_range(t, None, Some(to)) && t["AccountId"] == *account
        }),
    );
    // A single day, from = to.
    let day = date_of(&list(&r.bank, "transactions")[0]);
    let listed = walk(&r, &format!("&from={day}&to={day}"), 100).await;
    let expected = expected_txs(&r, |t| date_of(t) == day);
    assert!(!expected.is_empty());
    assert_same_transactions(&listed, &expected);
}

#[tokio::test]
async fn bad_queries_are_400_and_other_tenants_consents_404() {
    let r = refreshed().await;
    let tx = format!("/v1/consents/{}/transactions", r.consent);
    for (query, detail) in [
        ("?limit=0", "limit must be an integer from 1 to 500"),
        ("?limit=501", "limit must be an integer from 1 to 500"),
        ("?limit=ten", "limit must be an integer from 1 to 500"),
        ("?limit=", "limit must be an integer from 1 to 500"),
        ("?cursor=abc", "cursor is malformed"),
        ("?cursor=", "cursor is malformed"),
        (
            "?cursor=ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ",
            "cursor is malformed",
        ),
        ("?from=2026-02-30", "from must be a date (YYYY-MM-DD)"),
        ("?to=yesterday", "to must be a date (YYYY-MM-DD)"),
        (
            "?from=2026-03-02&to=2026-03-01",
            "from must not be after to",
        ),
        ("?accountId=", "accountId must not be empty"),
        (
            "?limit=5&limit=6",
            "query parameter \"limit\" is given more than once",
        ),
        (
            "?account_id=A1",
            "unknown query parameter \"account_id\"; expected one of accountId, from, to, cursor, limit",
        ),
    ] {
        let answer = r.api.get(&format!("{tx}{query}"), &r.token).await;
        assert_eq!(answer.status, 400, "{query}: {answer:?}");
        assert_eq!(answer.body["code"], "bad_request", "{query}");
        assert_eq!(answer.body["detail"], detail, "{query}");
        assert_eq!(
            answer.header("content-type"),
            Some("application/problem+json")
        );
    }
    let answer = r
        .api
        .get(
            &format!("/v1/consents/{}/balances?limit=5", r.consent),
            &r.token,
        )
        .await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert_eq!(
        answer.body["detail"],
        "unknown query parameter \"limit\"; expected one of accountId"
    );
    let answer = r
        .api
        .get("/v1/consents/not-a-uuid/transactions", &r.token)
        .await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert_eq!(
        answer.body["detail"],
        "consentId \"not-a-uuid\" is not a UUID"
    );

    let routes = [
        "accounts",
        "balances",
        "transactions",
        "parties",
        "beneficiaries",
        "direct-debits",
        "standing-orders",
        "scheduled-payments",
        "statements",
        "products",
    ];
    let unknown = uuid::Uuid::new_v4();
    for route in routes {
        for (consent, token) in [
            (r.consent.as_str(), r.other_tenant.as_str()),
            (unknown.to_string().as_str(), r.token.as_str()),
        ] {
            let answer = r
                .api
                .get(&format!("/v1/consents/{consent}/{route}"), token)
                .await;
            assert_eq!(answer.status, 404, "{route}: {answer:?}");
            assert_eq!(answer.body["code"], "consent_not_found", "{route}");
        }
        // The operator sees every tenant's consent; no token at all is 401.
        let path = format!("/v1/consents/{}/{route}", r.consent);
        let answer = r.api.get(&path, &r.admin).await;
        assert_eq!(answer.status, 200, "{route}: {answer:?}");
        let answer = r
            .api
            .call(reqwest::Method::GET, &path, None, None, &[])
            .await;
        assert_eq!(answer.status, 401, "{route}: {answer:?}");
    }
}
