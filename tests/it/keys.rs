//! Rotating the key of bank tokens at rest (SPEC §7 `crypto.key`, `crypto.retired_keys`):
//! refreshes keep reaching the bank with the right token while the roles restart with a
//! new key, `refreshd rekey` and the scheduler re-encrypt every stored token, a retired
//! key can then go, a token sealed with a key nobody has ends its refresh `ERROR`, and
//! a bad retired key stops a role with exit 64.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use chrono::Utc;
use refresh_pg::{KeyId, TokenCipher};
use refresh_tests::{
    Api, TestApp, WorkerProcess, app_with_bank, dev_token, ingress_with, refreshd_binary,
    role_command, test_settings,
};
use secrecy::SecretString;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const STORED: &str = "api:stored_data";
/// The dev environment's `crypto.key`.
const KEY_A: &str = "ZGV2LWtleS1ub3QtZm9yLXByb2R1Y3Rpb24tMzJieXQ=";
/// 32 × `B`.
const KEY_B: &str = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";
/// 32 × `C`: a key no role is given.
const KEY_C: &str = "Q0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0M=";

fn key(b64: &str) -> [u8; 32] {
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
        .try_into()
        .unwrap()
}

/// Fast leases and a stagger that does not hold the test up.
const FAST: [(&str, &str); 3] = [
    ("lock.lease_secs", "5"),
    ("stagger.limit", "100"),
    ("stagger.period_secs", "1"),
];

fn with_fast<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut all = FAST.to_vec();
    all.extend_from_slice(extra);
    all
}

/// Each stored token's first 12 bytes (`MAGIC || key id`), by consent.
async fn headers(app: &TestApp) -> Vec<(uuid::Uuid, Vec<u8>)> {
    sqlx::query_as(
        "SELECT consent_id, substring(access_token_enc FROM 1 FOR 12) FROM consents ORDER BY 1",
    )
    .fetch_all(&app.pg)
    .await
    .unwrap()
}

/// Whether every stored token is sealed with the key `b64`.
async fn all_sealed_with(app: &TestApp, b64: &str) -> bool {
    headers(app).await.iter().all(|(_, h)| *h == header_of(b64))
}

fn header_of(b64: &str) -> Vec<u8> {
    [b"rk1:".as_slice(), KeyId::of(&key(b64)).as_bytes()].concat()
}

/// Waits until every refresh of `ids` is terminal; their `(status, error code, message)`.
async fn terminal(
    app: &TestApp,
    ids: &[String],
    workers: &mut [&mut WorkerProcess],
) -> Vec<(String, Option<String>, Option<String>)> {
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|i| i.parse().unwrap()).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let rows: Vec<(uuid::Uuid, String, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT refresh_id, status, error_code, error_message FROM refreshes \
             WHERE refresh_id = ANY($1)",
        )
        .bind(&uuids)
        .fetch_all(&app.pg)
        .await
        .unwrap();
        if rows.len() == ids.len() && rows.iter().all(|r| r.1 != "INITIALIZED") {
            return uuids
                .iter()
                .map(|id| {
                    let r = rows.iter().find(|r| r.0 == *id).unwrap();
                    (r.1.clone(), r.2.clone(), r.3.clone())
                })
                .collect();
        }
        for worker in workers.iter_mut() {
            worker.assert_running();
        }
        assert!(
            Instant::now() < deadline,
            "refreshes still INITIALIZED after 90 s: {rows:?}; worker logs:\n{}",
            workers
                .iter()
                .map(|w| w.log())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn refresh_all(api: &Api, token: &str, consents: &[String]) -> Vec<String> {
    futures_util::future::join_all(consents.iter().map(|c| api.refresh(token, c))).await
}

fn all_updated(outcomes: &[(String, Option<String>, Option<String>)]) {
    for outcome in outcomes {
        assert_eq!(outcome.0, "UPDATED", "{outcomes:?}");
    }
}

#[tokio::test]
async fn refreshes_reach_the_bank_with_the_right_token_across_a_key_rotation() {
    let (app, api_a, bank) = app_with_bank(&FAST).await;
    let token = dev_token(&app, Some("acme"), STORED);
    // Consents sealed with key A (the ingress's key), refreshed by a worker with key A.
    let mut consents = Vec::new();
    for _ in 0..8 {
        consents.push(api_a.seed_consent("acme", None, None).await.to_string());
    }
    assert!(
        all_sealed_with(&app, KEY_A).await,
        "tokens name the key that sealed them"
    );
    let mut worker_a = WorkerProcess::spawn(&app, &FAST);
    let first = refresh_all(&api_a, &token, &consents).await;

    // Mid-stream: worker A is killed, an ingress and a worker with key B current and
    // key A retired take over; new consents are sealed with B.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let updated: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM refreshes WHERE status = 'UPDATED' AND refresh_id = ANY($1)",
        )
        .bind(
            first
                .iter()
                .map(|i| i.parse::<uuid::Uuid>().unwrap())
                .collect::<Vec<_>>(),
        )
        .fetch_one(&app.pg)
        .await
        .unwrap();
        if updated >= 2 {
            break;
        }
        worker_a.assert_running();
        assert!(Instant::now() < deadline, "worker A refreshed nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker_a.kill();
    let rotated = with_fast(&[("crypto.key", KEY_B), ("crypto.retired_keys", KEY_A)]);
    let mut worker_b = WorkerProcess::spawn(&app, &rotated);
    let mut settings_b = test_settings(&app.namespace, &[("crypto.key", KEY_B)]);
    settings_b.crypto.retired_keys = vec![SecretString::from(KEY_A)];
    let api_b = ingress_with(&app, &settings_b).await.unwrap();
    for _ in 0..2 {
        consents.push(api_b.seed_consent("acme", None, None).await.to_string());
    }
    all_updated(&terminal(&app, &first, &mut [&mut worker_b]).await);
    let second = refresh_all(&api_b, &token, &consents).await;
    all_updated(&terminal(&app, &second, &mut [&mut worker_b]).await);
    // The bank knows a consent by its token: each was called with its own.
    for consent in &consents {
        assert!(
            !bank.calls(&format!("token-{consent}")).await.is_empty(),
            "the bank never saw the token of {consent}"
        );
    }
    let sealed = headers(&app).await;
    assert_eq!(
        sealed
            .iter()
            .filter(|(_, h)| *h == header_of(KEY_A))
            .count(),
        8,
        "until a re-encryption, the first tokens stay sealed with A"
    );

    // `refreshd rekey` seals every token with B, with its progress and a summary.
    let output = role_command(&refreshd_binary(), "rekey", &app, &rotated)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "rekey failed: {stderr}");
    let b_id = KeyId::of(&key(KEY_B)).to_string();
    assert!(
        stderr.contains(&format!(
            "rekey: 10 stored tokens, 8 to re-encrypt with crypto.key {b_id}"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "rekey: done: 8 re-encrypted with {b_id}; 0 cannot be decrypted; tokens by key: {b_id}=10"
        )),
        "{stderr}"
    );
    assert!(
        all_sealed_with(&app, KEY_B).await,
        "no token is sealed with A any more"
    );
    // Run again, it has nothing to do.
    let again = role_command(&refreshd_binary(), "rekey", &app, &rotated)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("0 to re-encrypt"));

    // Key A can go: a worker with key B only refreshes every consent.
    worker_b.kill();
    let mut worker_b_only = WorkerProcess::spawn(&app, &with_fast(&[("crypto.key", KEY_B)]));
    let third = refresh_all(&api_b, &token, &consents).await;
    all_updated(&terminal(&app, &third, &mut [&mut worker_b_only]).await);

    // A token sealed with a key nobody has: the refresh ends ERROR internal_error,
    // naming the key, the worker logs it and keeps running.
    let victim: uuid::Uuid = consents[0].parse().unwrap();
    let foreign = TokenCipher::new(&key(KEY_C))
        .encrypt(
            &SecretString::from(format!("token-{victim}")),
            victim.as_bytes(),
        )
        .unwrap();
    sqlx::query("UPDATE consents SET access_token_enc = $2 WHERE consent_id = $1")
        .bind(victim)
        .bind(&foreign)
        .execute(&app.pg)
        .await
        .unwrap();
    let calls_before = bank.calls(&format!("token-{victim}")).await.len();
    let fourth = api_b.refresh(&token, &consents[0]).await;
    let outcome = terminal(
        &app,
        std::slice::from_ref(&fourth),
        &mut [&mut worker_b_only],
    )
    .await;
    let c_id = KeyId::of(&key(KEY_C)).to_string();
    let reason = format!(
        "the stored token was encrypted with key {c_id}, which is neither crypto.key nor one of crypto.retired_keys"
    );
    assert_eq!(
        outcome[0],
        (
            "ERROR".to_owned(),
            Some("internal_error".to_owned()),
            Some(format!("The refresh could not be run: {reason}"))
        )
    );
    let record = api_b.wait_terminal(&token, &fourth).await;
    assert_eq!(record["error"]["code"], "internal_error", "{record}");
    assert_eq!(
        bank.calls(&format!("token-{victim}")).await.len(),
        calls_before,
        "the bank is not called without a token"
    );
    worker_b_only.assert_running();
    let log = worker_b_only.log();
    assert!(
        log.contains("its bank token cannot be decrypted") && log.contains(&c_id),
        "the worker logs the cause: {log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    drop(api_a);
}

/// Lines of a worker's log that say a refresh ended `UPDATED`.
fn updated_lines(worker: &WorkerProcess) -> usize {
    worker.log().matches("refresh UPDATED").count()
}

#[tokio::test]
async fn old_and_new_processes_side_by_side_through_a_rotation_all_reach_the_bank() {
    // The rollout of OPERATIONS.md: first every role learns the new key B as a retired
    // key ("old": A current, B retired), then every role switches ("new": B current,
    // A retired). While the second restart rolls, old and new ingresses, workers and
    // schedulers run side by side: tokens of both keys are written and re-encrypted
    // back and forth, and every refresh still reaches the bank with its token.
    let (app, _api, bank) = app_with_bank(&FAST).await;
    let token = dev_token(&app, Some("acme"), STORED);
    let old = with_fast(&[("crypto.key", KEY_A), ("crypto.retired_keys", KEY_B)]);
    let new = with_fast(&[("crypto.key", KEY_B), ("crypto.retired_keys", KEY_A)]);
    let ingress = |current: &str, retired: &str| {
        let mut settings = test_settings(
            &app.namespace,
            &[("crypto.key", current), ("crypto.rekey_batch_size", "3")],
        );
        settings.crypto.retired_keys = vec![SecretString::from(retired)];
        settings
    };
    let (settings_old, settings_new) = (ingress(KEY_A, KEY_B), ingress(KEY_B, KEY_A));
    let api_old = ingress_with(&app, &settings_old).await.unwrap();
    let api_new = ingress_with(&app, &settings_new).await.unwrap();
    let scheduler = |settings: &refreshd::Settings, api: &Api| {
        refreshd::scheduler::build(
            settings,
            &api.services,
            &api.metrics,
            refresh_admission::AdmissionMetrics::default(),
            Arc::new(Notify::new()),
            &tokio_util::task::TaskTracker::new(),
        )
    };
    let (scheduler_old, scheduler_new) = (
        scheduler(&settings_old, &api_old),
        scheduler(&settings_new, &api_new),
    );
    let mut worker_old = WorkerProcess::spawn_logged(&app, "worker", &old, "info");
    let mut worker_new = WorkerProcess::spawn_logged(&app, "worker", &new, "info");

    let mut consents = Vec::new();
    let mut both_keys_at_once = false;
    let mut all = Vec::new();
    for round in 0..3 {
        // Each round registers through both ingresses (one token sealed with A, one
        // with B), refreshes every consent through one or the other, and lets both
        // schedulers re-encrypt a batch while the refreshes run.
        consents.push(api_old.seed_consent("acme", None, None).await.to_string());
        consents.push(api_new.seed_consent("acme", None, None).await.to_string());
        consents.push(api_new.seed_consent("acme", None, None).await.to_string());
        let sealed = headers(&app).await;
        both_keys_at_once |= sealed.iter().any(|(_, h)| *h == header_of(KEY_A))
            && sealed.iter().any(|(_, h)| *h == header_of(KEY_B));
        let (to_old, to_new): (Vec<_>, Vec<_>) = consents
            .iter()
            .cloned()
            .enumerate()
            .partition(|(i, _)| (i + round) % 2 == 0);
        let to_old: Vec<String> = to_old.into_iter().map(|(_, c)| c).collect();
        let to_new: Vec<String> = to_new.into_iter().map(|(_, c)| c).collect();
        let never = CancellationToken::new();
        let (ids_old, ids_new, ..) = tokio::join!(
            refresh_all(&api_old, &token, &to_old),
            refresh_all(&api_new, &token, &to_new),
            scheduler_old.tick(Utc::now(), &never),
            scheduler_new.tick(Utc::now(), &never),
        );
        let ids = [ids_old, ids_new].concat();
        all_updated(&terminal(&app, &ids, &mut [&mut worker_old, &mut worker_new]).await);
        all.extend(ids);
    }
    assert!(
        both_keys_at_once,
        "tokens of both keys were in use together"
    );
    assert_eq!(all.len(), 3 + 6 + 9);
    for consent in &consents {
        assert!(
            !bank.calls(&format!("token-{consent}")).await.is_empty(),
            "the bank never saw the token of {consent}"
        );
    }
    let (by_old, by_new) = (updated_lines(&worker_old), updated_lines(&worker_new));
    assert!(
        by_old > 0 && by_new > 0,
        "both workers refreshed: old {by_old}, new {by_new}"
    );
    assert_eq!(by_old + by_new, all.len());

    // The old processes are gone: the new scheduler seals every token with B.
    worker_old.kill();
    drop(scheduler_old);
    let mut ticks = 0;
    loop {
        let report = scheduler_new
            .tick(Utc::now(), &CancellationToken::new())
            .await
            .unwrap();
        if report.to_rekey == 0 {
            break;
        }
        ticks += 1;
        assert!(ticks < 10, "the new scheduler re-encrypts 3 per tick");
    }
    assert!(
        all_sealed_with(&app, KEY_B).await,
        "every token is sealed with B"
    );
    worker_new.assert_running();
}

#[tokio::test]
async fn the_scheduler_re_encrypts_tokens_a_bounded_batch_per_tick() {
    let (app, api_a, _bank) = app_with_bank(&[]).await;
    let mut consents = Vec::new();
    for _ in 0..5 {
        consents.push(api_a.seed_consent("acme", None, None).await);
    }
    // One token sealed before tokens named their key (`nonce || ciphertext`) stays
    // readable and is re-encrypted too.
    let legacy = {
        let id = consents[4];
        let sealed = TokenCipher::new(&key(KEY_A))
            .encrypt(
                &SecretString::from(format!("token-{id}")),
                id.as_uuid().as_bytes(),
            )
            .unwrap();
        sealed[12..].to_vec()
    };
    sqlx::query("UPDATE consents SET access_token_enc = $2 WHERE consent_id = $1")
        .bind(consents[4].as_uuid())
        .bind(&legacy)
        .execute(&app.pg)
        .await
        .unwrap();
    let mut settings_b = test_settings(
        &app.namespace,
        &[("crypto.key", KEY_B), ("crypto.rekey_batch_size", "2")],
    );
    settings_b.crypto.retired_keys = vec![SecretString::from(KEY_A)];
    let api_b = ingress_with(&app, &settings_b).await.unwrap();
    let scheduler = refreshd::scheduler::build(
        &settings_b,
        &api_b.services,
        &api_b.metrics,
        refresh_admission::AdmissionMetrics::default(),
        Arc::new(Notify::new()),
        &tokio_util::task::TaskTracker::new(),
    );
    let mut progress = Vec::new();
    for _ in 0..4 {
        let report = scheduler
            .tick(Utc::now(), &CancellationToken::new())
            .await
            .unwrap();
        progress.push((report.rekeyed, report.to_rekey));
    }
    assert_eq!(progress, [(2, 3), (2, 1), (1, 0), (0, 0)]);
    assert!(
        all_sealed_with(&app, KEY_B).await,
        "every token is sealed with B"
    );
    let metrics = api_b.metrics.render();
    assert!(
        metrics.contains("scheduler_tokens_rekeyed_total 5"),
        "{metrics}"
    );
    assert!(metrics.contains("scheduler_tokens_to_rekey 0"), "{metrics}");
    // With key B only, every token still opens, with the consent's own token.
    let b_only = refresh_pg::Store::new(app.pg.clone(), TokenCipher::new(&key(KEY_B)));
    for consent in consents {
        let token = b_only.access_token(consent).await.unwrap().unwrap();
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(&token),
            format!("token-{consent}")
        );
    }
}

#[tokio::test]
async fn a_bad_retired_key_stops_a_role_with_exit_64_naming_it() {
    let app = refresh_tests::spawn_app().await;
    for role in ["worker", "scheduler", "ingress", "rekey"] {
        let output = role_command(
            &refreshd_binary(),
            role,
            &app,
            &[("crypto.retired_keys", &format!("{KEY_B},bm90LTMy"))],
        )
        .output()
        .unwrap();
        assert_eq!(output.status.code(), Some(64), "{role}");
        assert_eq!(
            String::from_utf8_lossy(&output.stderr).trim(),
            "refreshd: bad configuration: crypto.retired_keys[1]: must decode to exactly 32 bytes",
            "{role}"
        );
    }
}
