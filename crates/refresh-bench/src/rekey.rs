//! Scenario 8: a key rotation's re-encryption (SPEC §7 `crypto.retired_keys`): 20,000
//! stored bank tokens sealed with the old key, then re-encrypted with the new one in
//! batches of `crypto.rekey_batch_size` (1,000), as `refreshd rekey` does and as the
//! scheduler does one batch per tick.

use std::time::Instant;

use anyhow::{Result, ensure};
use refresh_pg::{Store, TokenCipher};
use secrecy::SecretString;

use crate::report::Report;
use crate::{RELAXED, progress};

const TOKENS: usize = 20_000;
const BATCH: i64 = 1_000;

pub(crate) async fn run(report: &mut Report) -> Result<()> {
    let app = refresh_tests::spawn_app_with(RELAXED).await;
    let (old, new) = ([1_u8; 32], [2_u8; 32]);
    let sealing = TokenCipher::new(&old);
    progress(&format!(
        "rekey: seeding {TOKENS} tokens sealed with the old key"
    ));
    for chunk in 0..TOKENS / 1_000 {
        let mut ids = Vec::with_capacity(1_000);
        let mut sealed = Vec::with_capacity(1_000);
        for i in 0..1_000 {
            let id = uuid::Uuid::new_v4();
            let token = SecretString::from(format!("bench-token-{chunk}-{i}"));
            sealed.push(sealing.encrypt(&token, id.as_bytes())?);
            ids.push(id);
        }
        sqlx::query(
            "INSERT INTO consents (consent_id, tenant_id, provider_id, bank_consent_id, \
             access_token_enc, expires_at) \
             SELECT id, 'bench', 'sim', 'bank-' || id, enc, now() + interval '90 days' \
             FROM UNNEST($1::uuid[], $2::bytea[]) AS v(id, enc)",
        )
        .bind(&ids)
        .bind(&sealed)
        .execute(&app.pg)
        .await?;
    }
    let store = Store::new(app.pg.clone(), TokenCipher::with_retired(&new, &[old]));
    ensure!(store.token_keys().await?.to_rekey == TOKENS as u64);

    let started = Instant::now();
    let mut after = None;
    let mut rekeyed = 0;
    let mut slowest_batch = 0.0_f64;
    loop {
        let batch_started = Instant::now();
        let batch = store.rekey_batch(after, BATCH).await?;
        slowest_batch = slowest_batch.max(batch_started.elapsed().as_secs_f64());
        rekeyed += batch.rekeyed;
        if batch.examined < BATCH as u64 {
            break;
        }
        after = batch.last;
    }
    let elapsed = started.elapsed().as_secs_f64();
    ensure!(
        rekeyed == TOKENS as u64,
        "{rekeyed} re-encrypted, not {TOKENS}"
    );
    ensure!(store.token_keys().await?.to_rekey == 0);
    report.figure(
        "rekey",
        "tokens_per_s",
        "stored tokens re-encrypted with a new key per second (batches of 1000)",
        rekeyed as f64 / elapsed,
        "/s",
    );
    report.figure(
        "rekey",
        "slowest_batch_ms",
        "slowest batch of 1000 (one scheduler tick's re-encryption)",
        slowest_batch * 1000.0,
        "ms",
    );
    drop(app);
    Ok(())
}
