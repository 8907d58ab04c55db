//! Change sets (`GET /v1/refreshes/{refreshId}/changes`, SPEC §3) on crafted data
//! through the real pipeline: the change set is exactly the stored diff and agrees
//! with the summary, pages over the four lists, and is the tenant's only.

use refresh_tests::fixtures::{dataset, tx};
use refresh_tests::json::sorted;
use refresh_tests::{Api, app_with_bank, dev_token, fast_worker_config, start_worker};
use serde_json::{Value, json};

fn list(v: &Value, key: &str) -> Vec<Value> {
    v[key].as_array().cloned().unwrap_or_default()
}

/// Every stored transaction of the consent, as the API lists them.
async fn stored(api: &Api, token: &str, consent: &str) -> Vec<Value> {
    let answer = api
        .get(
            &format!("/v1/consents/{consent}/transactions?limit=500"),
            token,
        )
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(answer.body["nextCursor"].is_null());
    list(&answer.body, "items")
}

/// The whole change set, walked `limit` entries at a time: (added, updated, removed, balances).
async fn change_set(api: &Api, token: &str, refresh: &str, limit: u32) -> [Vec<Value>; 4] {
    let mut all: [Vec<Value>; 4] = Default::default();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/refreshes/{refresh}/changes?limit={limit}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let answer = api.get(&path, token).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let mut entries = 0;
        for (i, key) in ["added", "updated", "removed", "balances"]
            .iter()
            .enumerate()
        {
            let items = list(&answer.body, key);
            entries += items.len();
            all[i].extend(items);
        }
        assert!(entries <= limit as usize);
        match &answer.body["nextCursor"] {
            Value::Null => return all,
            Value::String(next) => {
                assert_eq!(entries, limit as usize, "only a full page has a next one");
                cursor = Some(next.clone());
            }
            other => panic!("nextCursor {other}"),
        }
    }
}

fn key(item: &Value) -> (Value, Value, Value) {
    (
        item["accountId"].clone(),
        item["transactionId"].clone(),
        item["bookingDate"].clone(),
    )
}

#[tokio::test]
async fn a_change_set_is_the_stored_diff_and_agrees_with_the_summary() {
    let (app, api, bank) = app_with_bank(&[("stagger.limit", "600")]).await;
    start_worker(&app, &api, fast_worker_config(&app));
    let token = dev_token(&app, Some("acme"), "api:stored_data");
    let key_ = format!("sim-{}", uuid::Uuid::new_v4());
    bank.put_dataset(
        &key_,
        &dataset(
            "Ann",
            "main",
            "100.00",
            vec![
                tx(Some("t1"), "Pending", 3, "5.00"),
                tx(None, "Booked", 2, "10.00"),
                tx(None, "Booked", 2, "20.00"),
                tx(None, "Booked", 1, "30.00"),
                tx(Some("t9"), "Pending", 1, "9.00"),
            ],
        ),
    )
    .await;
    let body = json!({"providerId": "sim", "bankConsentId": key_, "accessToken": key_,
                      "expiresAt": "2099-01-01T00:00:00Z"});
    let answer = api.post("/v1/consents", &token, Some(&body)).await;
    assert_eq!(answer.status, 201, "{answer:?}");
    let consent = answer.body["consentId"].as_str().unwrap().to_owned();
    let initial = answer.body["initialRefresh"]["refreshId"]
        .as_str()
        .unwrap()
        .to_owned();
    let record = api.wait_terminal(&token, &initial).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
    let before = stored(&api, &token, &consent).await;
    let [added, updated, removed, balances] = change_set(&api, &token, &initial, 100).await;
    assert_eq!(
        sorted(&added),
        sorted(&before),
        "the initial load added everything"
    );
    assert!(updated.is_empty() && removed.is_empty());
    assert_eq!(balances.len(), 1);

    // Pending → booked by id (t1), an id-less same-date replacement (day 2), a new
    // row (t5), a rejected pending (t9); day 1's id-less row is not listed again.
    bank.put_dataset(
        &key_,
        &dataset(
            "Ann",
            "main",
            "55.50",
            vec![
                tx(Some("t1"), "Booked", 3, "5.00"),
                tx(None, "Booked", 2, "15.00"),
                tx(Some("t5"), "Booked", 2, "7.00"),
                tx(Some("t9"), "Rejected", 1, "9.00"),
            ],
        ),
    )
    .await;
    let refresh = api.refresh(&token, &consent).await;
    let record = api.wait_terminal(&token, &refresh).await;
    assert_eq!(record["status"], "UPDATED", "{record}");
    let after = stored(&api, &token, &consent).await;

    let [added, updated, removed, balances] = change_set(&api, &token, &refresh, 100).await;
    let summary = &record["summary"];
    assert_eq!(summary["transactionsAdded"], added.len(), "{summary}");
    assert_eq!(summary["transactionsUpdated"], updated.len(), "{summary}");
    assert_eq!(summary["transactionsRemoved"], removed.len(), "{summary}");
    assert_eq!(summary["balancesUpdated"], balances.len(), "{summary}");
    assert_eq!(
        (added.len(), updated.len(), removed.len()),
        (2, 1, 3),
        "{summary}"
    );

    // The stored diff: before, without what was removed or updated, plus what was
    // added and the updated rows as they are now, is what is stored after.
    let replaced: Vec<_> = updated.iter().map(key).collect();
    let mut expected: Vec<Value> = before
        .iter()
        .filter(|t| !removed.contains(t) && !replaced.contains(&key(t)))
        .cloned()
        .collect();
    expected.extend(added.iter().cloned());
    expected.extend(updated.iter().cloned());
    assert_eq!(sorted(&expected), sorted(&after));
    assert!(
        removed.iter().all(|t| before.contains(t)),
        "removed as they were"
    );
    assert!(
        updated.iter().all(|t| after.contains(t)),
        "updated as they are now"
    );
    let amounts = |items: &[Value]| -> Vec<String> {
        let mut out: Vec<String> = items
            .iter()
            .map(|t| format!("{}/{}", t["transactionId"], t["amount"].as_str().unwrap()))
            .collect();
        out.sort();
        out
    };
    assert_eq!(amounts(&added), ["\"t5\"/7.00", "null/15.00"]);
    assert_eq!(amounts(&updated), ["\"t1\"/5.00"]);
    assert_eq!(updated[0]["status"], "BOOKED");
    assert_eq!(
        amounts(&removed),
        ["\"t9\"/9.00", "null/10.00", "null/20.00"]
    );
    assert_eq!(balances[0]["amount"], "55.50");
    assert_eq!(balances[0]["type"], "InterimAvailable");

    // Paged two entries at a time, the same set.
    let paged = change_set(&api, &token, &refresh, 2).await;
    assert_eq!(paged, [added, updated, removed, balances]);

    // Another tenant's refresh is not found; a bad cursor is a 400.
    let other = dev_token(&app, Some("globex"), "api:stored_data");
    let answer = api
        .get(&format!("/v1/refreshes/{refresh}/changes"), &other)
        .await;
    assert_eq!(answer.status, 404, "{answer:?}");
    let answer = api
        .get(
            &format!("/v1/refreshes/{refresh}/changes?cursor=x1"),
            &token,
        )
        .await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert_eq!(answer.body["detail"], "cursor is malformed");

    // Removed with its history row.
    sqlx::query("DELETE FROM refreshes WHERE refresh_id = $1")
        .bind(uuid::Uuid::parse_str(&refresh).unwrap())
        .execute(&app.pg)
        .await
        .unwrap();
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM refresh_changes WHERE refresh_id = $1")
            .bind(uuid::Uuid::parse_str(&refresh).unwrap())
            .fetch_one(&app.pg)
            .await
            .unwrap();
    assert_eq!(left, 0);
}
