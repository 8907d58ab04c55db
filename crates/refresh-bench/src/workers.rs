//! Scenario 3: worker throughput from a pre-filled `jobs` queue to UPDATED, against
//! the simulator (zero latency, 100 transactions per fetch), for 1, 2 and 4
//! `refreshd worker` processes; their CPU per refresh and peak RSS.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt as _;
use futures_util::stream;
use refresh_tests::{Api, Bank, TestApp, app_with_bank};
use serde_json::Value;

use crate::admission::{Http, Seeded, TENANTS, Ticker};
use crate::report::Report;
use crate::stats::{cpu_time, machine_busy, peak_rss_mib};
use crate::{RELAXED, progress};

const JOBS: usize = 1_500;
const RUN_LIMIT: Duration = Duration::from_secs(40);
const TRANSACTIONS_PER_FETCH: usize = 100;

/// `refreshd` next to this binary (`target/release/refreshd` under `make bench`).
pub(crate) fn refreshd_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let binary = exe
        .parent()
        .map(|dir| dir.join("refreshd"))
        .context("the bench binary has a folder")?;
    anyhow::ensure!(
        binary.is_file(),
        "{} is missing: run `cargo build --release -p refreshd`",
        binary.display()
    );
    Ok(binary)
}

/// A `refreshd {role}` child (a worker unless named otherwise); SIGKILLed when dropped.
pub(crate) struct Worker(Child);

impl Worker {
    pub(crate) fn spawn(app: &TestApp) -> Result<Self> {
        Self::spawn_with(app, RELAXED)
    }

    /// A worker with the dev settings plus `overrides` (as `("worker.concurrency", "4")`).
    pub(crate) fn spawn_with(app: &TestApp, overrides: &[(&str, &str)]) -> Result<Self> {
        Self::spawn_role(app, "worker", overrides)
    }

    /// `refreshd {role}` (`ingress`, `scheduler`, `bank-sim`, …) on `app`'s namespace,
    /// configured like a worker.
    pub(crate) fn spawn_role(
        app: &TestApp,
        role: &str,
        overrides: &[(&str, &str)],
    ) -> Result<Self> {
        let mut command = refresh_tests::role_command(&refreshd_binary()?, role, app, overrides);
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawn `refreshd {role}`"))?;
        Ok(Self(child))
    }

    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }

    /// How the process ended, if it has.
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().ok().flatten()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One account with its first 100 transactions: the dataset every consent gets.
async fn template(bank: &Bank) -> Value {
    let mut data = bank.dataset("bench-template").await;
    let account = data["accounts"][0]["AccountId"].clone();
    for kind in ["accounts", "balances", "transactions"] {
        if let Some(items) = data[kind].as_array_mut() {
            items.retain(|item| item["AccountId"] == account);
            items.truncate(if kind == "transactions" {
                TRANSACTIONS_PER_FETCH
            } else {
                usize::MAX
            });
        }
    }
    data
}

/// `count` consents seeded through the store (real encrypted tokens), each with the
/// template dataset at the simulator.
pub(crate) async fn sim_consents(api: &Api, bank: &Bank, count: usize) -> Result<Vec<Seeded>> {
    let dataset = Arc::new(template(bank).await);
    let done = Arc::new(AtomicUsize::new(0));
    let _ticker = Ticker::start("seeding consents".into(), done.clone(), count);
    let seeded: Vec<Seeded> = stream::iter(0..count)
        .map(|i| {
            let (dataset, done) = (dataset.clone(), done.clone());
            async move {
                let tenant = format!("bench{:02}", i % TENANTS);
                let id = api.seed_consent(&tenant, None, None).await;
                bank.put_dataset(&format!("token-{id}"), &dataset).await;
                done.fetch_add(1, Ordering::Relaxed);
                Seeded {
                    id: *id.as_uuid(),
                    tenant,
                }
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    Ok(seeded)
}

async fn count_status(app: &TestApp, ids: &[uuid::Uuid], status: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM refreshes WHERE status = $2 AND consent_id = ANY($1)",
    )
    .bind(ids)
    .bind(status)
    .fetch_one(&app.pg)
    .await?)
}

/// Admits a refresh for each consent (no worker runs yet): the jobs wait in `jobs`.
pub(crate) async fn admit_all(http: &Http, consents: &[Seeded]) -> usize {
    let done = Arc::new(AtomicUsize::new(0));
    let _ticker = Ticker::start("pre-filling jobs".into(), done.clone(), consents.len());
    stream::iter(consents)
        .map(|c| {
            let done = done.clone();
            async move {
                let (status, _) = http.refresh(c).await;
                done.fetch_add(1, Ordering::Relaxed);
                usize::from(status == 202)
            }
        })
        .buffer_unordered(32)
        .fold(0, |a, b| async move { a + b })
        .await
}

pub(crate) async fn run(report: &mut Report) -> Result<()> {
    refreshd_binary()?;
    progress("worker: starting a namespace, an ingress and the simulator");
    let (app, api, bank) = app_with_bank(RELAXED).await;
    let counts = [1_usize, 2, 4];
    let consents = sim_consents(&api, &bank, JOBS * counts.len()).await?;
    let http = Http::new(&app, &api.base, &consents)?;
    let mut peak_rss = 0.0_f64;
    for (round, processes) in counts.iter().enumerate() {
        let batch = &consents[round * JOBS..(round + 1) * JOBS];
        let ids: Vec<uuid::Uuid> = batch.iter().map(|c| c.id).collect();
        let admitted = admit_all(&http, batch).await;
        progress(&format!(
            "worker: {admitted} jobs queued; starting {processes} worker process(es)"
        ));
        let busy_before = machine_busy();
        let workers: Vec<Worker> = (0..*processes)
            .map(|_| Worker::spawn(&app))
            .collect::<Result<_>>()?;
        let started = Instant::now();
        let done = Arc::new(AtomicUsize::new(0));
        let ticker = Ticker::start(format!("worker ×{processes}"), done.clone(), admitted);
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let finished = count_status(&app, &ids, "UPDATED").await?
                + count_status(&app, &ids, "ERROR").await?;
            done.store(usize::try_from(finished)?, Ordering::Relaxed);
            if finished >= i64::try_from(admitted)? || started.elapsed() > RUN_LIMIT {
                break;
            }
        }
        drop(ticker);
        let wall = started.elapsed();
        let cpu: Duration = workers.iter().filter_map(|w| cpu_time(w.pid())).sum();
        for w in &workers {
            peak_rss = peak_rss.max(peak_rss_mib(w.pid()).unwrap_or(0.0));
        }
        let busy = match (busy_before, machine_busy()) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        drop(workers);
        let (updated, errors) = (
            count_status(&app, &ids, "UPDATED").await?,
            count_status(&app, &ids, "ERROR").await?,
        );
        // Throughput between the first and the last refresh to finish: the process
        // start-up is not counted.
        let (first, last): (
            Option<chrono::DateTime<chrono::Utc>>,
            Option<chrono::DateTime<chrono::Utc>>,
        ) = sqlx::query_as(
            "SELECT min(finished_at), max(finished_at) FROM refreshes \
                 WHERE status = 'UPDATED' AND consent_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_one(&app.pg)
        .await?;
        let span = match (first, last) {
            (Some(a), Some(b)) => (b - a).to_std().unwrap_or_default(),
            _ => wall,
        };
        let rate = (updated as f64 - 1.0).max(0.0) / span.as_secs_f64().max(1e-3);
        let p = processes;
        report.figure(
            "worker",
            &format!("jobs_per_s_{p}"),
            &format!("{p} process(es): jobs/s to UPDATED"),
            rate,
            "jobs/s",
        );
        report.figure(
            "worker",
            &format!("cpu_ms_{p}"),
            &format!("{p} process(es): worker CPU per refresh"),
            cpu.as_secs_f64() * 1000.0 / updated.max(1) as f64,
            "ms",
        );
        if let Some(busy) = busy {
            let cores =
                std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
            let full = busy.as_secs_f64() / (wall.as_secs_f64() * cores);
            report.figure(
                "worker",
                &format!("cpu_full_{p}"),
                &format!("{p} process(es): machine CPU busy"),
                full,
                "of all cores",
            );
        }
        if errors > 0 || updated < i64::try_from(admitted)? {
            report.note("worker", &format!("{p} process(es): {updated} UPDATED, {errors} ERROR of {admitted} within {:.0} s", wall.as_secs_f64()));
        }
    }
    // Overhead beyond the bank calls: the worker's own CPU per refresh, with one
    // process (the simulator answers with zero latency in the bench process, so the
    // bank calls cost the worker only their HTTP client work, counted here too).
    if let Some(cpu) = report.get("worker", "cpu_ms_1") {
        report.figure(
            "worker",
            "overhead_ms_1",
            "worker overhead per refresh (CPU, 1 process)",
            cpu,
            "ms",
        );
    }
    report.figure(
        "worker",
        "peak_rss_mib",
        "peak RSS of a worker process",
        peak_rss,
        "MiB",
    );
    crate::stop(app, api).await;
    Ok(())
}
