//! Scenario 5: end-to-end latency, HTTP request → UPDATED event on the `events`
//! exchange, at a steady 50 requests/s, one `refreshd worker` process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use refresh_core::Outcome;
use refresh_tests::app_with_bank;
use tokio::task::JoinSet;

use crate::admission::{Http, Ticker};
use crate::report::Report;
use crate::stats::{ms, percentile};
use crate::workers::{Worker, refreshd_binary, sim_consents};
use crate::{RELAXED, progress};

const RATE: f64 = 50.0;

pub(crate) async fn run(report: &mut Report, budget: Duration) -> Result<()> {
    refreshd_binary()?;
    progress("e2e: starting a namespace, an ingress, the simulator and a worker process");
    let (app, api, bank) = app_with_bank(RELAXED).await;
    let n = (RATE * budget.as_secs_f64()) as usize;
    // One more consent than measured: its refresh warms up the worker process.
    let mut consents = sim_consents(&api, &bank, n + 1).await?;
    let http = Http::new(&app, &api.base, &consents)?;
    let warm_up = consents.pop().context("no consents seeded")?;
    let broker = api.services.broker.clone();
    let queue = broker.declare_probe_queue("refresh.updated.#").await?;
    let mut events = broker.consume(&queue, 500);
    let _worker = Worker::spawn(&app)?;
    progress("e2e: waiting for the worker to finish a warm-up refresh");
    let (status, _) = http.refresh(&warm_up).await;
    anyhow::ensure!(status == 202, "warm-up refresh answered {status}");
    let first = tokio::time::timeout(Duration::from_secs(60), events.next())
        .await
        .context("no UPDATED event for the warm-up refresh within 60 s")?
        .context("the event probe closed")?;
    first.settle(Outcome::Ack).await?;

    // Requests sent, by refresh id once the 202 names it.
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let arrived: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let done = Arc::new(AtomicUsize::new(0));
    let collector = {
        let (arrived, done) = (arrived.clone(), done.clone());
        tokio::spawn(async move {
            while let Ok(Some(delivery)) =
                tokio::time::timeout(Duration::from_secs(20), events.next()).await
            {
                let now = Instant::now();
                let body: serde_json::Value =
                    serde_json::from_slice(&delivery.body).unwrap_or_default();
                if let Some(id) = body["data"]["refreshId"].as_str()
                    && let Ok(mut map) = arrived.lock()
                {
                    map.insert(id.to_owned(), now);
                    done.fetch_add(1, Ordering::Relaxed);
                }
                let _ = delivery.settle(Outcome::Ack).await;
                if done.load(Ordering::Relaxed) >= n {
                    return;
                }
            }
        })
    };
    let _ticker = Ticker::start("e2e UPDATED events".into(), done.clone(), n);
    let started = tokio::time::Instant::now();
    let mut set = JoinSet::new();
    for (i, consent) in consents.iter().enumerate() {
        let at = started + Duration::from_secs_f64(i as f64 / RATE);
        tokio::time::sleep_until(at).await;
        let (http, consent, sent) = (http.clone(), consent.clone(), sent.clone());
        set.spawn(async move {
            let t = Instant::now();
            let (status, id) = http.refresh(&consent).await;
            if let (202, Some(id), Ok(mut map)) = (status, id, sent.lock()) {
                map.insert(id, t);
            }
        });
    }
    while set.join_next().await.is_some() {}
    let _ = tokio::time::timeout(Duration::from_secs(30), collector).await;
    let mut latencies: Vec<f64> = {
        let sent = sent.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let arrived = arrived.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        sent.iter()
            .filter_map(|(id, t)| arrived.get(id).map(|a| ms(a.duration_since(*t))))
            .collect()
    };
    let admitted = sent.lock().map(|m| m.len()).unwrap_or(0);
    report.figure(
        "e2e",
        "requests",
        "requests at 50/s (admitted)",
        admitted as f64,
        "",
    );
    report.figure(
        "e2e",
        "events",
        "UPDATED events received",
        latencies.len() as f64,
        "",
    );
    if let Some(p50) = percentile(&mut latencies, 0.5) {
        report.figure("e2e", "p50_ms", "request → UPDATED event p50", p50, "ms");
    }
    if let Some(p99) = percentile(&mut latencies, 0.99) {
        report.figure("e2e", "p99_ms", "request → UPDATED event p99", p99, "ms");
    }
    crate::stop(app, api).await;
    Ok(())
}
