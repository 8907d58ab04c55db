//! Scenario 1 (admission over HTTP, with the raw limits of the gate script and of a
//! confirmed publish to the quorum `jobs` queue, in the same run) and scenario 2 (the
//! same admissions through the upstream `requests` queue).
//!
//! The ingress is a `refreshd ingress` process of its own, so that the CPU of each
//! process per admission can be told apart during the saturated run: the ingress,
//! PostgreSQL, RabbitMQ, Redis and the load generator (this process). After it, open
//! loop at 25, 50 and 90 % of the saturated rate, and the upstream path at 50 %.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use refresh_core::{
    ConsentId, ConsentStatus, Outcome, ProviderId, RefreshId, RequestedBy, TenantId,
};
use refresh_redis::{ConsentFacts, GateDecision, GateRequest};
use refresh_tests::{TestApp, dev_token, spawn_app_with};
use refreshd::services::Services;
use serde_json::json;
use sqlx::PgPool;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::cpu;
use crate::report::Report;
use crate::roles::Ingress;
use crate::stats::{ms, percentile};
use crate::{RELAXED, progress};

/// Tenants the consents are spread over: with `stagger.scope = "tenant"` each has
/// its own start budget, so admissions are not pushed into `jobs.wait`.
pub(crate) const TENANTS: usize = 64;
/// Concurrent HTTP requests (and so connections) of the closed-loop driver.
const CONNECTIONS: usize = 64;
/// Concurrent callers of the raw limits.
const RAW_CALLERS: usize = 64;
const HTTP_BUDGET: Duration = Duration::from_secs(10);
const RAW_BUDGET: Duration = Duration::from_secs(5);
/// How long each open-loop level runs.
const LEVEL_BUDGET: Duration = Duration::from_secs(5);
/// The open-loop levels after the saturated run, as shares of its admissions/s, with
/// the key prefix and label of their figures (the 50 % level's are the `half_*` the
/// verdict reads).
const LEVELS: [(f64, &str, &str); 3] = [
    (0.25, "load25", "25 % load"),
    (0.5, "half", "half load"),
    (0.9, "load90", "90 % load"),
];
const UPSTREAM_REQUESTS: usize = 10_000;
const UPSTREAM_BUDGET: Duration = Duration::from_secs(30);
/// How long the decisions of the open-loop upstream requests may take after the last
/// is published.
const UPSTREAM_DRAIN: Duration = Duration::from_secs(10);
/// Enough for every phase at up to about 4,500 admissions/s (each admission takes a
/// consent no other has used); a phase that runs out says so.
const CONSENTS: usize = 120_000;

/// A consent as the drivers need it: id and tenant.
#[derive(Clone)]
pub(crate) struct Seeded {
    pub(crate) id: Uuid,
    pub(crate) tenant: String,
}

/// `count` ACTIVE consents of provider `sim` spread over `TENANTS` tenants named
/// `{prefix}00`…, in one statement. Their bank token is a placeholder: admission
/// never reads it (no worker runs in this scenario).
pub(crate) async fn bulk_consents(pg: &PgPool, prefix: &str, count: usize) -> Result<Vec<Seeded>> {
    let rows: Vec<(Uuid, String)> = sqlx::query_as(
        "INSERT INTO consents (consent_id, tenant_id, provider_id, bank_consent_id, \
         access_token_enc, expires_at) \
         SELECT gen_random_uuid(), $2 || lpad((g % $3)::text, 2, '0'), 'sim', 'bank-' || g, \
         '\\x00'::bytea, now() + interval '90 days' FROM generate_series(1, $1) g \
         RETURNING consent_id, tenant_id",
    )
    .bind(i64::try_from(count)?)
    .bind(prefix)
    .bind(i32::try_from(TENANTS)?)
    .fetch_all(pg)
    .await
    .context("bulk-insert consents")?;
    // As autovacuum would (the local PostgreSQL runs without it): otherwise the
    // first read of each fresh row sets its hint bits, a cost that consents
    // registered long before an admission do not carry.
    sqlx::query("VACUUM ANALYZE consents")
        .execute(pg)
        .await
        .context("vacuum the consents")?;
    Ok(rows
        .into_iter()
        .map(|(id, tenant)| Seeded { id, tenant })
        .collect())
}

/// What a batch of requests gave.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) latencies_ms: Vec<f64>,
    pub(crate) accepted: usize,
    pub(crate) other: HashMap<u16, usize>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.latencies_ms.extend(other.latencies_ms);
        self.accepted += other.accepted;
        for (status, n) in other.other {
            *self.other.entry(status).or_default() += n;
        }
    }

    fn refused(&self) -> String {
        let mut parts: Vec<String> = self
            .other
            .iter()
            .map(|(status, n)| format!("{n}× {status}"))
            .collect();
        parts.sort();
        parts.join(", ")
    }
}

/// The HTTP side: a client, the ingress's address, a token per tenant.
#[derive(Clone)]
pub(crate) struct Http {
    pub(crate) client: reqwest::Client,
    pub(crate) base: String,
    pub(crate) tokens: Arc<HashMap<String, String>>,
}

impl Http {
    pub(crate) fn new(app: &TestApp, base: &str, consents: &[Seeded]) -> Result<Self> {
        let mut tokens = HashMap::new();
        for c in consents {
            if !tokens.contains_key(&c.tenant) {
                tokens.insert(
                    c.tenant.clone(),
                    dev_token(app, Some(&c.tenant), "api:stored_data"),
                );
            }
        }
        Ok(Self {
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(CONNECTIONS * 2)
                .build()?,
            base: base.to_owned(),
            tokens: Arc::new(tokens),
        })
    }

    /// `POST /v1/consents/{id}/refresh`: status, and the refresh id when accepted.
    pub(crate) async fn refresh(&self, consent: &Seeded) -> (u16, Option<String>) {
        let token = self
            .tokens
            .get(&consent.tenant)
            .cloned()
            .unwrap_or_default();
        let sent = self
            .client
            .post(format!("{}/v1/consents/{}/refresh", self.base, consent.id))
            .bearer_auth(token)
            .send()
            .await;
        match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                let id = body["refreshId"].as_str().map(str::to_owned);
                (status, id)
            }
            Err(_) => (0, None),
        }
    }
}

/// Prints `label done/total` every second until dropped.
pub(crate) struct Ticker(tokio::task::JoinHandle<()>);

impl Ticker {
    pub(crate) fn start(label: String, done: Arc<AtomicUsize>, total: usize) -> Self {
        Self(tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n = done.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64();
                progress(&format!(
                    "{label} {n}/{total} ({:.0}/s, {secs:.0} s)",
                    n as f64 / secs
                ));
            }
        }))
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// As many admissions as `CONNECTIONS` concurrent callers get through in `budget`.
async fn closed_loop(
    http: &Http,
    consents: Arc<Vec<Seeded>>,
    budget: Duration,
) -> (Tally, Duration, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let _ticker = Ticker::start("admission".into(), done.clone(), consents.len());
    let started = Instant::now();
    let deadline = started + budget;
    let mut set = JoinSet::new();
    for _ in 0..CONNECTIONS {
        let (http, consents, next, done) =
            (http.clone(), consents.clone(), next.clone(), done.clone());
        set.spawn(async move {
            let mut tally = Tally::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= consents.len() || Instant::now() >= deadline {
                    return tally;
                }
                let t = Instant::now();
                let (status, _) = http.refresh(&consents[i]).await;
                tally.latencies_ms.push(ms(t.elapsed()));
                if status == 202 {
                    tally.accepted += 1;
                } else {
                    *tally.other.entry(status).or_default() += 1;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let mut tally = Tally::default();
    while let Some(part) = set.join_next().await {
        tally.add(part.unwrap_or_default());
    }
    let used = next.load(Ordering::Relaxed).min(consents.len());
    (tally, started.elapsed(), used)
}

/// Admissions sent at a steady `rate` for `budget` (open loop: latency counted from
/// each request's scheduled time).
async fn paced(http: &Http, consents: &[Seeded], rate: f64, budget: Duration) -> Tally {
    let n = ((rate * budget.as_secs_f64()) as usize).min(consents.len());
    let done = Arc::new(AtomicUsize::new(0));
    let _ticker = Ticker::start(format!("admission at {rate:.0}/s"), done.clone(), n);
    let started = tokio::time::Instant::now();
    let mut set = JoinSet::new();
    for (i, consent) in consents.iter().take(n).enumerate() {
        let at = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(at).await;
        let (http, consent, done) = (http.clone(), consent.clone(), done.clone());
        set.spawn(async move {
            let (status, _) = http.refresh(&consent).await;
            done.fetch_add(1, Ordering::Relaxed);
            (status, ms(at.elapsed()))
        });
    }
    let mut tally = Tally::default();
    while let Some(Ok((status, latency))) = set.join_next().await {
        tally.latencies_ms.push(latency);
        if status == 202 {
            tally.accepted += 1;
        } else {
            *tally.other.entry(status).or_default() += 1;
        }
    }
    tally
}

/// Bare confirmed publishes to the quorum `jobs` queue at a steady `rate` for
/// `budget` (open loop); the latency of each, from its scheduled time, in ms.
async fn paced_publish(broker: &refresh_amqp::Broker, rate: f64, budget: Duration) -> Vec<f64> {
    let n = (rate * budget.as_secs_f64()) as usize;
    let done = Arc::new(AtomicUsize::new(0));
    let _ticker = Ticker::start(format!("bare publish at {rate:.0}/s"), done.clone(), n);
    let started = tokio::time::Instant::now();
    let mut set = JoinSet::new();
    for i in 0..n {
        let at = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(at).await;
        let (broker, done) = (broker.clone(), done.clone());
        set.spawn(async move {
            let id = Uuid::now_v7().to_string();
            let ok = broker
                .publish_job(&job_sized_body(&id), &id, None)
                .await
                .is_ok();
            done.fetch_add(1, Ordering::Relaxed);
            ok.then(|| ms(at.elapsed()))
        });
    }
    let mut latencies = Vec::with_capacity(n);
    while let Some(Ok(latency)) = set.join_next().await {
        latencies.extend(latency);
    }
    latencies
}

/// A body about the size of a real job message.
fn job_sized_body(id: &str) -> Vec<u8> {
    let body = json!({
        "refreshId": id, "consentId": Uuid::new_v4(), "tenantId": "raw00",
        "providerId": "sim", "notBefore": chrono::Utc::now(), "initial": false,
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// `Gate::admit` (on one Redis a single script: lock, quotas and the stagger slot)
/// called directly, for distinct consents.
async fn raw_gate(gate: &refresh_redis::Gate, budget: Duration) -> Result<f64> {
    let done = Arc::new(AtomicUsize::new(0));
    let _ticker = Ticker::start("raw gate".into(), done.clone(), 0);
    let started = Instant::now();
    let deadline = started + budget;
    let provider = ProviderId::parse("sim")?;
    let mut set = JoinSet::new();
    for caller in 0..RAW_CALLERS {
        let (gate, done, provider) = (gate.clone(), done.clone(), provider.clone());
        let tenant = TenantId::parse(&format!("raw{:02}", caller % TENANTS))?;
        set.spawn(async move {
            let mut admitted = 0_usize;
            while Instant::now() < deadline {
                let request = GateRequest {
                    consent_id: ConsentId::from_uuid(Uuid::new_v4()),
                    tenant_id: tenant.clone(),
                    facts: Some(ConsentFacts {
                        tenant_id: tenant.clone(),
                        provider_id: provider.clone(),
                        status: ConsentStatus::Active,
                        expires_at: chrono::Utc::now() + chrono::TimeDelta::days(90),
                    }),
                    requested_by: RequestedBy::Api,
                    refresh_id: RefreshId::from_uuid(Uuid::now_v7()),
                    count_quota: true,
                };
                if let Ok(GateDecision::Admitted(_)) = gate.admit(&request).await {
                    admitted += 1;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            admitted
        });
    }
    let mut admitted = 0;
    while let Some(part) = set.join_next().await {
        admitted += part.unwrap_or_default();
    }
    Ok(admitted as f64 / started.elapsed().as_secs_f64())
}

/// A bare confirmed, persistent publish to the quorum `jobs` queue (nothing consumes it).
async fn raw_publish(broker: &refresh_amqp::Broker, budget: Duration) -> Result<f64> {
    let done = Arc::new(AtomicUsize::new(0));
    let _ticker = Ticker::start("raw publish".into(), done.clone(), 0);
    let started = Instant::now();
    let deadline = started + budget;
    let mut set = JoinSet::new();
    for _ in 0..RAW_CALLERS {
        let (broker, done) = (broker.clone(), done.clone());
        set.spawn(async move {
            let mut confirmed = 0_usize;
            while Instant::now() < deadline {
                let id = Uuid::now_v7().to_string();
                if broker
                    .publish_job(&job_sized_body(&id), &id, None)
                    .await
                    .is_ok()
                {
                    confirmed += 1;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            confirmed
        });
    }
    let mut confirmed = 0;
    while let Some(part) = set.join_next().await {
        confirmed += part.unwrap_or_default();
    }
    Ok(confirmed as f64 / started.elapsed().as_secs_f64())
}

/// The stages of an admission the ingress times, as (histogram, name in the report):
/// where a level's latency goes.
const STAGES: [(&str, &str); 3] = [
    ("refreshd_admission_seconds", "admission"),
    ("refreshd_gate_seconds", "gate"),
    ("refreshd_admission_write_seconds", "write"),
];

/// The ingress's `/metrics` text.
async fn ingress_metrics(ingress: &Ingress) -> Result<String> {
    Ok(reqwest::get(format!("{}/metrics", ingress.base))
        .await?
        .error_for_status()?
        .text()
        .await?)
}

/// The mean of histogram `metric` over the observations between two scrapes, in
/// seconds (`None` when there were none).
fn mean_between(before: &str, after: &str, metric: &str) -> Option<f64> {
    let value = |text: &str, series: &str| -> f64 {
        text.lines()
            .filter(|line| line.split([' ', '{']).next() == Some(series))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let (sum, count) = (format!("{metric}_sum"), format!("{metric}_count"));
    let observed = value(after, &count) - value(before, &count);
    (observed > 0.0).then(|| (value(after, &sum) - value(before, &sum)) / observed)
}

/// Where a level's time went, from the ingress's histograms scraped `before` and
/// `after` it: each stage's mean and the bucket holding its p99.
fn stage_figures(
    report: &mut Report,
    section: &str,
    key: &str,
    label: &str,
    before: &str,
    after: &str,
) {
    for (metric, part) in STAGES {
        if let Some(mean) = mean_between(before, after, metric) {
            report.figure(
                section,
                &format!("{key}_{part}_mean_ms"),
                &format!("{label}: mean time in the {part} (ingress metrics)"),
                mean * 1000.0,
                "ms",
            );
        }
        if let Some(p99) = quantile_bound_between(before, after, metric, 0.99) {
            report.figure(
                section,
                &format!("{key}_{part}_p99_le_ms"),
                &format!("{label}: p99 of the {part}, at most (ingress histogram bucket)"),
                p99 * 1000.0,
                "ms",
            );
        }
    }
}

/// The upper bound of the histogram bucket holding quantile `q` of what `metric`
/// observed between two scrapes (its buckets double, so this is within 2× of it).
fn quantile_bound_between(before: &str, after: &str, metric: &str, q: f64) -> Option<f64> {
    let buckets = |text: &str| -> Vec<(f64, f64)> {
        let series = format!("{metric}_bucket{{le=\"");
        text.lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(series.as_str())?;
                let (le, count) = rest.split_once("\"}")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, count.trim().parse().ok()?))
            })
            .collect()
    };
    let (before, after) = (buckets(before), buckets(after));
    let observed: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, count)| {
            let earlier = before
                .iter()
                .find(|(b, _)| b == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, count - earlier)
        })
        .collect();
    let total = observed.iter().map(|(_, c)| *c).fold(0.0, f64::max);
    if total <= 0.0 {
        return None;
    }
    observed
        .iter()
        .find(|(_, cumulative)| *cumulative >= q * total)
        .map(|(le, _)| *le)
}

/// Scenario 2: upstream requests published (confirmed) to `requests` with a reply
/// queue; throughput is replies per second, latency publish → reply.
async fn upstream(
    report: &mut Report,
    broker: &refresh_amqp::Broker,
    consents: &[Seeded],
    cpu_groups: Vec<cpu::Group>,
) -> Result<()> {
    let n = UPSTREAM_REQUESTS.min(consents.len());
    let queue = broker.declare_reply_queue().await?;
    let mut replies = broker.consume(&queue, 1000);
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let done = Arc::new(AtomicUsize::new(0));
    let _ticker = Ticker::start("upstream".into(), done.clone(), n);
    let measuring = cpu::start(cpu_groups);
    let started = Instant::now();
    let deadline = started + UPSTREAM_BUDGET;
    let collector = {
        let (sent, done) = (sent.clone(), done.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut accepted = 0_usize;
            let mut last = Instant::now();
            while latencies.len() < n {
                let Ok(Some(delivery)) =
                    tokio::time::timeout_at(deadline.into(), replies.next()).await
                else {
                    break;
                };
                let now = Instant::now();
                last = now;
                let at = delivery
                    .correlation_id
                    .as_deref()
                    .and_then(|c| sent.lock().ok()?.remove(c));
                if let Some(at) = at {
                    latencies.push(ms(now - at));
                }
                let body: serde_json::Value =
                    serde_json::from_slice(&delivery.body).unwrap_or_default();
                if body["accepted"] == json!(true) {
                    accepted += 1;
                }
                let _ = delivery.settle(Outcome::Ack).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
            (latencies, accepted, last)
        })
    };
    let next = Arc::new(AtomicUsize::new(0));
    let consents: Arc<Vec<Seeded>> = Arc::new(consents[..n].to_vec());
    let mut set = JoinSet::new();
    for _ in 0..32 {
        let (broker, queue, sent, next, consents) = (
            broker.clone(),
            queue.clone(),
            sent.clone(),
            next.clone(),
            consents.clone(),
        );
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(consent) = consents.get(i) else { return };
                let id = Uuid::new_v4().to_string();
                let body = json!({"consentId": consent.id, "tenantId": consent.tenant, "requestedBy": "APP"});
                let body = serde_json::to_vec(&body).unwrap_or_default();
                if let Ok(mut map) = sent.lock() {
                    map.insert(id.clone(), Instant::now());
                }
                let _ = broker
                    .publish_request(&body, Some(&id), Some(&queue), Some(&id))
                    .await;
            }
        });
    }
    while set.join_next().await.is_some() {}
    let published = started.elapsed();
    let (mut latencies, accepted, last) = collector.await?;
    let cpu_used = measuring.finish();
    let elapsed = last.duration_since(started);
    cpu_figures(report, "upstream", &cpu_used, latencies.len());
    report.figure(
        "upstream",
        "requests",
        "requests published (confirmed)",
        n as f64,
        "",
    );
    report.figure(
        "upstream",
        "publish_secs",
        "time to publish them",
        published.as_secs_f64(),
        "s",
    );
    report.figure(
        "upstream",
        "replies",
        "decisions received",
        latencies.len() as f64,
        "",
    );
    report.figure(
        "upstream",
        "accepted",
        "of which accepted",
        accepted as f64,
        "",
    );
    report.figure(
        "upstream",
        "rps",
        "upstream admissions/s",
        latencies.len() as f64 / elapsed.as_secs_f64(),
        "req/s",
    );
    if let Some(p50) = percentile(&mut latencies, 0.5) {
        report.figure(
            "upstream",
            "p50_ms",
            "publish → reply p50 (queued)",
            p50,
            "ms",
        );
    }
    if let Some(p99) = percentile(&mut latencies, 0.99) {
        report.figure(
            "upstream",
            "p99_ms",
            "publish → reply p99 (queued)",
            p99,
            "ms",
        );
    }
    if let Some(http) = report.get("admission", "http_rps") {
        let rps = latencies.len() as f64 / elapsed.as_secs_f64();
        report.figure(
            "upstream",
            "vs_http",
            "upstream ÷ HTTP admissions/s",
            rps / http,
            "×",
        );
    }
    Ok(())
}

/// Scenario 2 in open loop: upstream requests published (confirmed, with a reply
/// queue) at a steady `rate` for [`LEVEL_BUDGET`]; latency from each request's
/// scheduled time to its decision.
async fn upstream_paced(
    report: &mut Report,
    broker: &refresh_amqp::Broker,
    consents: &[Seeded],
    rate: f64,
) -> Result<()> {
    let wanted = (rate * LEVEL_BUDGET.as_secs_f64()) as usize;
    let n = wanted.min(consents.len());
    if n < wanted {
        report.note(
            "upstream",
            &format!("half load ran out of consents: {n} requests of {wanted}"),
        );
    }
    let queue = broker.declare_reply_queue().await?;
    let mut replies = broker.consume(&queue, 1000);
    let pending: Arc<Mutex<HashMap<String, tokio::time::Instant>>> = Arc::default();
    let failed = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let _ticker = Ticker::start(format!("upstream at {rate:.0}/s"), done.clone(), n);
    let started = tokio::time::Instant::now();
    let deadline = started + LEVEL_BUDGET + UPSTREAM_DRAIN;
    let publish = async {
        let mut set = JoinSet::new();
        for (i, consent) in consents.iter().take(n).enumerate() {
            let at = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(at).await;
            let id = Uuid::new_v4().to_string();
            lock(&pending).insert(id.clone(), at);
            let body =
                json!({"consentId": consent.id, "tenantId": consent.tenant, "requestedBy": "APP"});
            let body = serde_json::to_vec(&body).unwrap_or_default();
            let (broker, queue, pending, failed) = (
                broker.clone(),
                queue.clone(),
                pending.clone(),
                failed.clone(),
            );
            set.spawn(async move {
                if broker
                    .publish_request(&body, Some(&id), Some(&queue), Some(&id))
                    .await
                    .is_err()
                {
                    lock(&pending).remove(&id);
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        while set.join_next().await.is_some() {}
    };
    let collect = async {
        let mut tally = Tally::default();
        let mut decided = 0;
        while decided + failed.load(Ordering::Relaxed) < n {
            let Ok(Some(delivery)) = tokio::time::timeout_at(deadline, replies.next()).await else {
                break;
            };
            let at = delivery
                .correlation_id
                .as_deref()
                .and_then(|c| lock(&pending).remove(c));
            if let Some(at) = at {
                decided += 1;
                tally.latencies_ms.push(ms(at.elapsed()));
                let body: serde_json::Value =
                    serde_json::from_slice(&delivery.body).unwrap_or_default();
                if body["accepted"] == json!(true) {
                    tally.accepted += 1;
                } else {
                    let status = body["problem"]["status"].as_u64().unwrap_or_default();
                    *tally
                        .other
                        .entry(u16::try_from(status).unwrap_or_default())
                        .or_default() += 1;
                }
            }
            let _ = delivery.settle(Outcome::Ack).await;
            done.fetch_add(1, Ordering::Relaxed);
        }
        tally
    };
    let ((), mut tally) = tokio::join!(publish, collect);
    report.figure(
        "upstream",
        "half_rps",
        "half load: rate offered (open loop)",
        rate,
        "req/s",
    );
    report.figure(
        "upstream",
        "half_replies",
        "half load: decisions received",
        tally.latencies_ms.len() as f64,
        "",
    );
    quantile_figures(
        report,
        "upstream",
        "half",
        "half load: publish → reply",
        &mut tally.latencies_ms,
        &[("p50", 0.5), ("p99", 0.99)],
    );
    if !tally.other.is_empty() {
        report.note(
            "upstream",
            &format!("half load, refused: {} (0: no status)", tally.refused()),
        );
    }
    let failed = failed.load(Ordering::Relaxed);
    let lost = n - tally.latencies_ms.len() - failed;
    if failed + lost > 0 {
        report.note(
            "upstream",
            &format!(
                "half load: of {n} requests {failed} not published, {lost} without a decision \
                 {} s after the last",
                UPSTREAM_DRAIN.as_secs()
            ),
        );
    }
    Ok(())
}

/// The pending requests; a panic while holding them cannot leave them half-changed.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Figures `{key}_{name}_ms` (labelled `{label} {name}`) for each `(name, quantile)`.
fn quantile_figures(
    report: &mut Report,
    scenario: &str,
    key: &str,
    label: &str,
    samples: &mut [f64],
    quantiles: &[(&str, f64)],
) {
    for (name, q) in quantiles {
        if let Some(value) = percentile(samples, *q) {
            report.figure(
                scenario,
                &format!("{key}_{name}_ms"),
                &format!("{label} {name}"),
                value,
                "ms",
            );
        }
    }
}

/// What the saturated run's CPU is split into: the ingress, the servers of the
/// namespace's services (found by the ports of their URLs), and the load generator.
fn cpu_groups(app: &TestApp, ingress: &Ingress, report: &mut Report) -> Vec<cpu::Group> {
    let mut groups = vec![cpu::Group::process(
        "ingress",
        "ingress (refreshd ingress)",
        ingress.process.pid(),
    )];
    for (key, label, url) in [
        (
            "postgres",
            "PostgreSQL (all server processes)",
            &app.settings.database.url,
        ),
        ("rabbitmq", "RabbitMQ (beam.smp)", &app.settings.amqp.url),
        ("redis", "Redis (redis-server)", &app.settings.redis.url),
    ] {
        match cpu::port_of(url).and_then(|port| cpu::Group::server(key, label, port)) {
            Some(group) => groups.push(group),
            None => report.not_measured(
                "admission",
                &format!("CPU of {label}: no process here listens on the port of its URL"),
            ),
        }
    }
    groups.push(cpu::Group::process(
        "bench",
        "load generator (refresh-bench)",
        std::process::id(),
    ));
    groups
}

/// CPU per admission and share of the machine (cores × wall time) of each group, the
/// machine's busy share, and the rest (busy, but in none of the groups), as figures
/// of `section` (its saturated run decided `admissions`).
fn cpu_figures(report: &mut Report, section: &str, used: &cpu::Used, admissions: usize) {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let capacity = used.wall.as_secs_f64() * cores as f64;
    let per_admission = |cpu: Duration| ms(cpu) / admissions.max(1) as f64;
    let mut counted = Duration::ZERO;
    for (group, cpu) in &used.groups {
        counted += *cpu;
        report.figure(
            section,
            &format!("cpu_ms_{}", group.key),
            &format!("saturated: CPU per admission, {}", group.label),
            per_admission(*cpu),
            "ms",
        );
        report.figure(
            section,
            &format!("cpu_share_{}", group.key),
            &format!("saturated: share of machine CPU, {}", group.label),
            cpu.as_secs_f64() / capacity,
            "of all cores",
        );
    }
    if let Some(busy) = used.busy {
        report.figure(
            section,
            "cpu_ms_machine",
            "saturated: CPU per admission, whole machine (busy)",
            per_admission(busy),
            "ms",
        );
        report.figure(
            section,
            "cpu_share_machine",
            "saturated: share of machine CPU, busy",
            busy.as_secs_f64() / capacity,
            "of all cores",
        );
        report.figure(
            section,
            "cpu_share_other",
            "saturated: share of machine CPU, busy in none of the above",
            busy.saturating_sub(counted).as_secs_f64() / capacity,
            "of all cores",
        );
    }
    report.note(
        section,
        &format!(
            "CPU shares are of {cores} cores × {:.1} s of the saturated run; the servers \
             are every process under the one listening on the service's port",
            used.wall.as_secs_f64()
        ),
    );
}

pub(crate) async fn run(
    report: &mut Report,
    http_wanted: bool,
    upstream_wanted: bool,
) -> Result<()> {
    progress("admission: starting a namespace and a refreshd ingress process");
    let app = spawn_app_with(RELAXED).await;
    // reqwest is built without a TLS provider (an in-process ingress would install it).
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The bench's own connections: the raw limits and the upstream requests.
    let services = Services::connect(&app.settings, &app.shutdown, &app.tracker).await?;
    let ingress = Ingress::start(&app, RELAXED).await?;
    progress(&format!(
        "admission: seeding {CONSENTS} consents over {TENANTS} tenants"
    ));
    let consents = bulk_consents(&app.pg, "bench", CONSENTS).await?;
    // Registered through the API, each would be mirrored at the gate by its initial
    // load: mirrored here, so that an admission reads its facts there.
    let provider = ProviderId::parse("sim")?;
    let expires_at = chrono::Utc::now() + chrono::TimeDelta::days(90);
    let facts = consents
        .iter()
        .map(|c| {
            let facts = ConsentFacts {
                tenant_id: TenantId::parse(&c.tenant)?,
                provider_id: provider.clone(),
                status: ConsentStatus::Active,
                expires_at,
            };
            Ok((ConsentId::from_uuid(c.id), Some(facts)))
        })
        .collect::<Result<Vec<_>>>()?;
    services.gate.mirror(&facts).await?;
    let http = Http::new(&app, &ingress.base, &consents)?;
    let mut rest: &[Seeded] = &consents;
    if http_wanted {
        let pool = Arc::new(rest.to_vec());
        let measuring = cpu::start(cpu_groups(&app, &ingress, report));
        let (mut tally, elapsed, used) = closed_loop(&http, pool, HTTP_BUDGET).await;
        let cpu_used = measuring.finish();
        rest = &rest[used..];
        let rps = tally.accepted as f64 / elapsed.as_secs_f64();
        report.figure(
            "admission",
            "http_requests",
            "HTTP requests sent",
            (tally.latencies_ms.len()) as f64,
            "",
        );
        report.figure(
            "admission",
            "http_rps",
            "HTTP admissions/s (202)",
            rps,
            "req/s",
        );
        if !tally.other.is_empty() {
            report.note("admission", &format!("not admitted: {}", tally.refused()));
        }
        if let Some(p50) = percentile(&mut tally.latencies_ms, 0.5) {
            report.figure(
                "admission",
                "p50_ms",
                "latency p50 (64 connections, saturated)",
                p50,
                "ms",
            );
        }
        if let Some(p99) = percentile(&mut tally.latencies_ms, 0.99) {
            report.figure(
                "admission",
                "p99_ms",
                "latency p99 (64 connections, saturated)",
                p99,
                "ms",
            );
        }
        cpu_figures(report, "admission", &cpu_used, tally.accepted);
        progress("admission: raw limit of the gate (Gate::admit directly)");
        let gate_rps = raw_gate(&services.gate, RAW_BUDGET).await?;
        report.figure(
            "admission",
            "gate_rps",
            "raw: gate scripts (Gate::admit)",
            gate_rps,
            "req/s",
        );
        progress("admission: raw limit of a confirmed publish to the quorum jobs queue");
        let publish_rps = raw_publish(&services.broker, RAW_BUDGET).await?;
        report.figure(
            "admission",
            "publish_rps",
            "raw: confirmed publish, quorum queue",
            publish_rps,
            "msg/s",
        );
        let ratio = rps / gate_rps.min(publish_rps);
        report.figure(
            "admission",
            "ratio",
            "admissions/s ÷ min(raw limits)",
            ratio,
            "×",
        );
        for (share, key, label) in LEVELS {
            let rate = (rps * share).max(1.0);
            let wanted = (rate * LEVEL_BUDGET.as_secs_f64()) as usize;
            if rest.len() < wanted {
                report.note(
                    "admission",
                    &format!(
                        "{label} ran out of consents: {} requests of {wanted}",
                        rest.len()
                    ),
                );
            }
            let before = ingress_metrics(&ingress).await?;
            let mut tally = paced(&http, rest, rate, LEVEL_BUDGET).await;
            let after = ingress_metrics(&ingress).await?;
            stage_figures(report, "admission", key, label, &before, &after);
            rest = &rest[tally.latencies_ms.len().min(rest.len())..];
            report.figure(
                "admission",
                &format!("{key}_rps"),
                &format!("{label}: rate offered"),
                rate,
                "req/s",
            );
            quantile_figures(
                report,
                "admission",
                key,
                &format!("{label}: latency"),
                &mut tally.latencies_ms,
                &[("p50", 0.5), ("p99", 0.99), ("p999", 0.999)],
            );
            if !tally.other.is_empty() {
                report.note(
                    "admission",
                    &format!("{label}, not admitted: {}", tally.refused()),
                );
            }
        }
        let half = (rps / 2.0).max(1.0);
        // The latency floor of the same load: a bare confirmed publish at that rate.
        let mut bare = paced_publish(&services.broker, half, LEVEL_BUDGET).await;
        if let Some(p50) = percentile(&mut bare, 0.5) {
            report.figure(
                "admission",
                "half_publish_p50_ms",
                "half load: bare confirmed publish p50, same rate",
                p50,
                "ms",
            );
        }
        if let Some(p99) = percentile(&mut bare, 0.99) {
            report.figure(
                "admission",
                "half_publish_p99_ms",
                "half load: bare confirmed publish p99, same rate",
                p99,
                "ms",
            );
        }
    }
    if upstream_wanted {
        progress("upstream: publishing refresh requests to the requests queue");
        let (queued, later) = rest.split_at(UPSTREAM_REQUESTS.min(rest.len()));
        let groups = cpu_groups(&app, &ingress, report);
        upstream(report, &services.broker, queued, groups).await?;
        match report.get("admission", "http_rps") {
            Some(http_rps) => {
                progress("upstream: open loop at half the HTTP admission rate");
                let before = ingress_metrics(&ingress).await?;
                upstream_paced(report, &services.broker, later, (http_rps / 2.0).max(1.0)).await?;
                let after = ingress_metrics(&ingress).await?;
                stage_figures(report, "upstream", "half", "half load", &before, &after);
            }
            None => report.not_measured(
                "upstream",
                "half load (open loop): needs the HTTP admission rate of the same run (admission)",
            ),
        }
    }
    drop(ingress);
    crate::stop_app(app).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histograms_mean_is_taken_between_two_scrapes() {
        let before = "# TYPE refreshd_gate_seconds histogram\nrefreshd_gate_seconds_sum 1.0\nrefreshd_gate_seconds_count 10\nrefreshd_gate_seconds_bucket{le=\"0.001\"} 4\n";
        let after = "refreshd_gate_seconds_sum 1.5\nrefreshd_gate_seconds_count 110\nrefreshd_gate_seconds_bucket{le=\"0.001\"} 50\n";
        let mean = mean_between(before, after, "refreshd_gate_seconds").unwrap();
        assert!((mean - 0.005).abs() < 1e-12, "{mean}");
        assert_eq!(mean_between(after, after, "refreshd_gate_seconds"), None);
        assert_eq!(
            mean_between(before, after, "refreshd_admission_write_seconds"),
            None
        );
    }

    #[test]
    fn a_quantiles_bucket_is_found_between_two_scrapes() {
        let scrape = |counts: [u32; 3]| {
            format!(
                "refreshd_gate_seconds_bucket{{le=\"0.001\"}} {}\nrefreshd_gate_seconds_bucket{{le=\"0.002\"}} {}\nrefreshd_gate_seconds_bucket{{le=\"+Inf\"}} {}\n",
                counts[0], counts[1], counts[2]
            )
        };
        // Between the scrapes: 90 at most 1 ms, 9 more at most 2 ms, 1 beyond.
        let (before, after) = (scrape([10, 10, 10]), scrape([100, 109, 110]));
        let bound = |q| quantile_bound_between(&before, &after, "refreshd_gate_seconds", q);
        assert_eq!(bound(0.5), Some(0.001));
        assert_eq!(bound(0.99), Some(0.002));
        assert_eq!(bound(0.999), Some(f64::INFINITY));
        assert_eq!(
            quantile_bound_between(&after, &after, "refreshd_gate_seconds", 0.99),
            None
        );
    }
}
