//! Scenario 7: the gate's Redis state rebuilt from PostgreSQL after Redis lost it
//! (SPEC §2), for 100,000 consents: three admissions each in the last day (counted
//! by the default quota) and one refresh in flight for every tenth, with start
//! slots queued over the next hour. The namespace's Redis keys are deleted first,
//! as after an empty restart.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use refresh_admission::GateRebuild;
use refresh_core::{ConsentId, RequestedBy};

use crate::report::Report;
use crate::{RELAXED, progress};

const CONSENTS: i64 = 100_000;

pub(crate) async fn run(report: &mut Report) -> Result<()> {
    let app = refresh_tests::spawn_app_with(RELAXED).await;
    let api = app.start_ingress().await;
    let pool = api.services.store.pool().clone();
    progress(&format!("rebuild: seeding {CONSENTS} consents"));
    sqlx::query(
        "INSERT INTO consents (consent_id, tenant_id, provider_id, bank_consent_id, \
         access_token_enc, expires_at) \
         SELECT gen_random_uuid(), 'bench' || (g % 50), 'sim', 'bank-' || g, '\\x00'::bytea, \
         now() + interval '90 days' FROM generate_series(1, $1::bigint) g",
    )
    .bind(CONSENTS)
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO refreshes (refresh_id, consent_id, tenant_id, requested_by, status, \
         date_requested, not_before, started_at, finished_at) \
         SELECT gen_random_uuid(), c.consent_id, c.tenant_id, 'API', 'UPDATED', \
         now() - k * interval '5 hours', now() - k * interval '5 hours', \
         now() - k * interval '5 hours', now() - k * interval '5 hours' \
         FROM consents c CROSS JOIN generate_series(1, 3) k",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO refreshes (refresh_id, consent_id, tenant_id, requested_by, status, \
         date_requested, not_before) \
         SELECT gen_random_uuid(), consent_id, tenant_id, 'API', 'INITIALIZED', now(), \
         now() + (row_number() OVER ()) * interval '300 milliseconds' \
         FROM (SELECT consent_id, tenant_id FROM consents ORDER BY consent_id \
               LIMIT $1::bigint / 10) s",
    )
    .bind(CONSENTS)
    .execute(&pool)
    .await?;
    sqlx::query("ANALYZE refreshes").execute(&pool).await?;

    refresh_redis::delete_namespace(&app.redis, &app.namespace).await?;
    let rebuild = GateRebuild::new(api.services.store.clone(), api.services.gate.clone());
    let started = Instant::now();
    let outcome = rebuild
        .rebuild_now()
        .await?
        .context("no other replica holds the rebuild lock")?;
    let elapsed = started.elapsed();

    // A consent with a refresh in flight counts that admission too (it was requested
    // now): one of each, so the check holds whichever rows come first.
    for (in_flight, expected) in [(false, 3), (true, 4)] {
        let sample: uuid::Uuid = sqlx::query_scalar(
            "SELECT consent_id FROM consents c WHERE EXISTS (SELECT 1 FROM refreshes r \
             WHERE r.consent_id = c.consent_id AND r.status = 'INITIALIZED') = $1 LIMIT 1",
        )
        .bind(in_flight)
        .fetch_one(&pool)
        .await?;
        let quota = api
            .services
            .gate
            .quota(ConsentId::from_uuid(sample), RequestedBy::Api)
            .await?
            .context("API requests are counted")?;
        ensure!(
            quota.used == expected,
            "a rebuilt consent {} counts {} admissions, not {expected}",
            if in_flight {
                "with a refresh in flight"
            } else {
                "without a refresh in flight"
            },
            quota.used
        );
    }
    ensure!(
        outcome.locks as i64 == CONSENTS / 10,
        "{} locks rebuilt, not {}",
        outcome.locks,
        CONSENTS / 10
    );
    report.figure(
        "rebuild",
        "seconds_100k",
        "rebuild of 100k consents' gate state (300k admissions, 10k in flight)",
        elapsed.as_secs_f64(),
        "s",
    );
    report.figure(
        "rebuild",
        "quota_sets",
        "quota sets rebuilt",
        outcome.quota_sets as f64,
        "",
    );
    crate::stop(app, api).await;
    Ok(())
}
