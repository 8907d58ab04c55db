//! Scenario `scaleout`: refreshes/s for 1, 2 and 4 `refreshd worker` processes at
//! `worker.concurrency` 4 against a bank that answers in 500 ms (bank-bound, as in
//! production), under one global stagger; and, from the simulator's call log, the
//! most refreshes the bank saw begin in any stagger period.
//!
//! Throughput grows with the processes until the stagger caps the bank starts:
//! beyond `stagger.limit / (period + START_MARGIN)` starts per second, more
//! replicas only wait for start slots.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use refresh_tests::app_with_bank;

use crate::admission::{Http, Ticker};
use crate::progress;
use crate::report::Report;
use crate::workers::{Worker, admit_all, sim_consents};

/// Bank start limit per period: 80 in 10 s (about 7 starts/s with the margin), so
/// 1 and 2 processes (about 2.7 refreshes/s each: three sequential 500 ms calls,
/// four at a time) are below it and 4 are capped by it. Three calls are a refresh of
/// a consent already loaded once (`/accounts`, then the account's balances and
/// transactions); an initial load also fetches the eight listings of each account,
/// eleven calls in all, so the consents are seeded as loaded.
const LIMIT: u32 = 80;
const PERIOD_SECS: u64 = 10;
const LATENCY_MS: &str = "500";
const CONCURRENCY: &str = "4";
/// More than the limit, so every round reaches the steady state past its first period.
const JOBS: usize = 100;
const RUN_LIMIT: Duration = Duration::from_secs(90);

fn settings() -> Vec<(&'static str, String)> {
    vec![
        ("stagger.limit", LIMIT.to_string()),
        ("stagger.period_secs", PERIOD_SECS.to_string()),
        ("stagger.max_delay_secs", "3600".to_owned()),
        ("stagger.scope", "global".to_owned()),
        ("bank_sim.latency_ms", LATENCY_MS.to_owned()),
        ("worker.concurrency", CONCURRENCY.to_owned()),
        // Bank-bound jobs: a process holds no more than it works on, so the queue
        // is shared by every process (a prefetch of 32 would let the first process
        // take most of a round's jobs).
        ("worker.prefetch", CONCURRENCY.to_owned()),
    ]
}

/// The most items of sorted `times` inside any window of `period` (half-open).
fn most_in_any_window(times: &[DateTime<Utc>], period: Duration) -> usize {
    let Ok(period) = chrono::TimeDelta::from_std(period) else {
        return times.len();
    };
    let mut most = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] >= period {
            start += 1;
        }
        most = most.max(end - start + 1);
    }
    most
}

pub(crate) async fn run(report: &mut Report) -> Result<()> {
    crate::workers::refreshd_binary()?;
    let owned = settings();
    let overrides: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    progress("scaleout: starting a namespace, an ingress and the simulator (500 ms latency)");
    let (app, api, bank) = app_with_bank(&overrides).await;
    let counts = [1_usize, 2, 4];
    let consents = sim_consents(&api, &bank, JOBS * counts.len()).await?;
    let ids: Vec<uuid::Uuid> = consents.iter().map(|c| c.id).collect();
    sqlx::query("UPDATE consents SET initial_loaded_at = now() WHERE consent_id = ANY($1)")
        .bind(&ids)
        .execute(&app.pg)
        .await?;
    let http = Http::new(&app, &api.base, &consents)?;
    let since = Utc::now();
    let mut rates = Vec::new();
    for (round, processes) in counts.iter().enumerate() {
        if round > 0 {
            // Each round starts with an empty start log: the previous round's
            // starts count for a period plus the margin.
            tokio::time::sleep(Duration::from_secs(PERIOD_SECS + 1)).await;
        }
        let batch = &consents[round * JOBS..(round + 1) * JOBS];
        let ids: Vec<uuid::Uuid> = batch.iter().map(|c| c.id).collect();
        let admitted = admit_all(&http, batch).await;
        progress(&format!(
            "scaleout: {admitted} jobs queued; starting {processes} worker process(es)"
        ));
        let workers: Vec<Worker> = (0..*processes)
            .map(|_| Worker::spawn_with(&app, &overrides))
            .collect::<Result<_>>()?;
        let started = Instant::now();
        let done = Arc::new(AtomicUsize::new(0));
        let ticker = Ticker::start(format!("scaleout ×{processes}"), done.clone(), admitted);
        let finished = loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let finished: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM refreshes WHERE status <> 'INITIALIZED' AND consent_id = ANY($1)",
            )
            .bind(&ids)
            .fetch_one(&app.pg)
            .await?;
            done.store(usize::try_from(finished)?, Ordering::Relaxed);
            if finished >= i64::try_from(admitted)? || started.elapsed() > RUN_LIMIT {
                break finished;
            }
        };
        drop(ticker);
        drop(workers);
        let (updated, first, last): (i64, Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
            sqlx::query_as(
                "SELECT count(*), min(finished_at), max(finished_at) FROM refreshes \
                 WHERE status = 'UPDATED' AND consent_id = ANY($1)",
            )
            .bind(&ids)
            .fetch_one(&app.pg)
            .await?;
        let span = match (first, last) {
            (Some(a), Some(b)) => (b - a).to_std().unwrap_or_default(),
            _ => started.elapsed(),
        };
        let rate = (updated as f64 - 1.0).max(0.0) / span.as_secs_f64().max(1e-3);
        rates.push(rate);
        let p = processes;
        report.figure(
            "scaleout",
            &format!("refreshes_per_s_{p}"),
            &format!("{p} process(es) × concurrency {CONCURRENCY}, bank 500 ms: refreshes/s"),
            rate,
            "refreshes/s",
        );
        if updated < i64::try_from(admitted)? {
            report.note(
                "scaleout",
                &format!(
                    "{p} process(es): {updated} UPDATED of {admitted} ({finished} finished) within {:.0} s",
                    started.elapsed().as_secs_f64()
                ),
            );
        }
    }
    report.figure(
        "scaleout",
        "stagger_limit",
        &format!("stagger.limit (per {PERIOD_SECS} s)"),
        f64::from(LIMIT),
        "starts",
    );
    let cap =
        f64::from(LIMIT) / (PERIOD_SECS as f64 + refresh_redis::START_MARGIN_MS as f64 / 1000.0);
    report.figure(
        "scaleout",
        "stagger_cap_per_s",
        &format!(
            "stagger cap: limit {LIMIT} per {PERIOD_SECS} s (+{} ms margin)",
            refresh_redis::START_MARGIN_MS
        ),
        cap,
        "starts/s",
    );

    // A refresh begins at the bank with its first call; each consent is refreshed
    // once in this scenario (no failures are injected, so no retry begins again).
    let calls = bank.all_calls(Some(since)).await;
    let mut first_call: HashMap<String, DateTime<Utc>> = HashMap::new();
    for call in &calls {
        let consent = call["bankConsentId"]
            .as_str()
            .context("a logged call names its consent")?;
        let at: DateTime<Utc> = call["at"]
            .as_str()
            .context("a logged call has its time")?
            .parse()?;
        first_call
            .entry(consent.to_owned())
            .and_modify(|t| *t = (*t).min(at))
            .or_insert(at);
    }
    let mut starts: Vec<DateTime<Utc>> = first_call.into_values().collect();
    starts.sort_unstable();
    let most = most_in_any_window(&starts, Duration::from_secs(PERIOD_SECS));
    report.figure(
        "scaleout",
        "max_bank_starts_per_period",
        &format!(
            "most refreshes begun at the bank in any {PERIOD_SECS} s (limit {LIMIT}; {} starts logged)",
            starts.len()
        ),
        most as f64,
        "refreshes",
    );
    crate::stop(app, api).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busiest_window_is_counted() {
        let at = |ms: i64| DateTime::<Utc>::from_timestamp_millis(ms).unwrap();
        let times: Vec<_> = [0, 100, 900, 1000, 1500, 5000].map(at).to_vec();
        assert_eq!(most_in_any_window(&times, Duration::from_secs(1)), 3);
        assert_eq!(most_in_any_window(&times, Duration::from_millis(100)), 1);
        assert_eq!(most_in_any_window(&[], Duration::from_secs(1)), 0);
    }
}
