//! `make soak` (`refresh-bench soak`): `SOAK_MINUTES` (default 10) of steady mixed load
//! on real processes — `refreshd ingress`, `refreshd worker`, `refreshd scheduler` and
//! `refreshd bank-sim`, each a child process of its own — in a namespace of its own
//! (removed at the end). The load is open loop, at fixed rates: HTTP refresh requests,
//! upstream AMQP requests with a reply queue, reads (consent, history, stored data), and
//! consents falling due for auto-sync so the scheduler has work too.
//!
//! Every minute one table row goes to stdout (RSS and open fds of each process, the
//! namespace's queue depths, p50/p99 latency of each kind of request answered in that
//! minute, what was sent and how it was answered); every row, series and verdict goes
//! to `target/bench/soak.json`. The run fails (non-zero exit, naming the metric) when a
//! series grows steadily ([`trend`]), when a dead-letter queue gained messages, when
//! anything answered 5xx or not at all, when a refresh ended `ERROR`, or when a process
//! died.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{SecondsFormat, TimeDelta, Utc};
use futures_util::StreamExt as _;
use futures_util::stream;
use refresh_core::Outcome;
use refresh_tests::TestApp;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::admission::{Http, Seeded, TENANTS, Ticker};
use crate::roles::{free_port, wait_ready};
use crate::stats::{cpu_time, ms, open_fds, percentile, rss_mib};
use crate::workers::{Worker, refreshd_binary};
use crate::{RELAXED, progress};

/// The scenario's name on the command line.
pub(crate) const NAME: &str = "soak";

const DEFAULT_MINUTES: u32 = 10;
const MAX_MINUTES: u32 = 24 * 60;

/// `POST /v1/consents/{id}/refresh` per second.
const HTTP_RATE: f64 = 10.0;
/// Upstream refresh requests (`requestedBy` `APP`) published per second.
const UPSTREAM_RATE: f64 = 5.0;
/// Reads per second, in turn: the consent, its history, transactions, accounts, balances.
const READ_RATE: f64 = 20.0;
const READS: [&str; 5] = ["", "/refreshes", "/transactions", "/accounts", "/balances"];
/// Distinct simulator datasets the consents share: the simulator keeps each dataset it
/// generated in memory (about 2.5 MiB apiece), so one per consent would hold gigabytes.
const SIM_KEYS: usize = 64;
/// Quota-counted requests per consent over the whole run at most (the default quota
/// is 4 per rolling 24 h): the consents are taken in turn, so there are enough of them
/// that none is asked a fourth time, and each is asked again only minutes later, long
/// after its last refresh ended.
const REQUESTS_PER_CONSENT: usize = 3;
/// Consents of the auto-sync tenants: every `AUTOSYNC_EVERY` the next
/// `AUTOSYNC_BATCH` of them are made due (their timestamps moved 7 h back, past the
/// tenants' 6 h interval and its jitter), and the scheduler, ticking every
/// `SCHEDULER_TICK_SECS`, requests them as `AUTOSYNC`.
const AUTOSYNC_CONSENTS: usize = 200;
const AUTOSYNC_TENANTS: usize = 4;
const AUTOSYNC_BATCH: usize = 10;
const AUTOSYNC_EVERY: Duration = Duration::from_secs(5);
const AUTOSYNC_INTERVAL_HOURS: u32 = 6;
const SCHEDULER_TICK_SECS: &str = "5";

const MINUTE: Duration = Duration::from_secs(60);
/// How long requests still in flight when the load stops may take to be answered.
const DRAIN: Duration = Duration::from_secs(30);
/// How long the initial loads may take to finish.
const INITIAL_LOADS_LIMIT: Duration = Duration::from_secs(15 * 60);

// The growth rule (see `trend`).
/// Minutes left out of every series: start-up (allocator arenas, pools, caches) settles.
pub(crate) const WARM_UP_MINUTES: usize = 1;
/// Values a series needs after the warm-up before it is judged (two steps).
const MIN_POINTS: usize = 3;
/// Share of the minute-to-minute steps that rose: 4 in 5.
const RISE_NUMERATOR: usize = 4;
const RISE_DENOMINATOR: usize = 5;
/// The last value must exceed the first by more than this share of the first …
const RELATIVE_MARGIN: f64 = 0.2;
/// … and by more than the unit's absolute floor.
const FLOOR_MIB: f64 = 8.0;
const FLOOR_FDS: f64 = 16.0;
const FLOOR_MESSAGES: f64 = 50.0;
const FLOOR_MS: f64 = 20.0;

/// `SOAK_MINUTES`, or the default when unset or empty.
pub(crate) fn minutes_from_env() -> Result<u32> {
    match std::env::var("SOAK_MINUTES") {
        Err(std::env::VarError::NotPresent) => Ok(DEFAULT_MINUTES),
        Ok(raw) if raw.trim().is_empty() => Ok(DEFAULT_MINUTES),
        Ok(raw) => raw
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|m| (1..=MAX_MINUTES).contains(m))
            .with_context(|| {
                format!("SOAK_MINUTES must be a whole number of minutes from 1 to {MAX_MINUTES}, not {raw:?}")
            }),
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("SOAK_MINUTES must be a whole number of minutes, not non-UTF-8 text")
        }
    }
}

/// How a series moved after the warm-up: `growing` is the verdict of the rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Trend {
    /// Minute-to-minute steps in which the value rose (strictly).
    pub(crate) rises: usize,
    pub(crate) steps: usize,
    pub(crate) first: f64,
    pub(crate) last: f64,
    pub(crate) growing: bool,
}

/// The growth rule, applied to one series' per-minute values after the warm-up.
/// `None` when there are fewer than [`MIN_POINTS`] values (too short to judge).
/// Otherwise the series grows steadily when both hold:
/// - it rose in at least 4 of 5 of its minute-to-minute steps, and
/// - its last value exceeds its first by more than 20 % of the first and by more than
///   `floor` (the unit's absolute floor: 8 MiB, 16 fds, 50 messages, 20 ms).
///
/// A series that levels off, wanders, or jumps once is not growing steadily; neither is
/// one that rises every minute by amounts too small to matter.
pub(crate) fn trend(values: &[f64], floor: f64) -> Option<Trend> {
    let (&first, &last) = (values.first()?, values.last()?);
    if values.len() < MIN_POINTS {
        return None;
    }
    let steps = values.len() - 1;
    let rises = values.windows(2).filter(|w| w[1] > w[0]).count();
    let growth = last - first;
    let growing = rises * RISE_DENOMINATOR >= steps * RISE_NUMERATOR
        && growth > floor
        && growth > RELATIVE_MARGIN * first.abs();
    Some(Trend {
        rises,
        steps,
        first,
        last,
        growing,
    })
}

/// The kinds of request the load sends.
#[derive(Clone, Copy)]
enum Kind {
    Http,
    Upstream,
    Reads,
}

/// What one kind of request did in a minute: sent (when scheduled), and the answers
/// that arrived (by status or decision) with their latency from the scheduled time.
#[derive(Default)]
struct Lane {
    sent: u64,
    latencies_ms: Vec<f64>,
    answers: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Window {
    http: Lane,
    upstream: Lane,
    reads: Lane,
}

impl Window {
    fn lane(&mut self, kind: Kind) -> &mut Lane {
        match kind {
            Kind::Http => &mut self.http,
            Kind::Upstream => &mut self.upstream,
            Kind::Reads => &mut self.reads,
        }
    }
}

/// The current minute's window, shared by the drivers and the monitor.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Window>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Window> {
        // Held for a push; a panic cannot leave a window half-changed.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sent(&self, kind: Kind) {
        self.lock().lane(kind).sent += 1;
    }

    fn answered(&self, kind: Kind, answer: String, latency_ms: f64) {
        let mut window = self.lock();
        let lane = window.lane(kind);
        lane.latencies_ms.push(latency_ms);
        *lane.answers.entry(answer).or_default() += 1;
    }

    fn take(&self) -> Window {
        std::mem::take(&mut *self.lock())
    }
}

/// One lane of a minute, as the row shows it.
struct LaneSummary {
    sent: u64,
    answered: u64,
    answers: BTreeMap<String, u64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
}

impl LaneSummary {
    fn of(mut lane: Lane) -> Self {
        Self {
            sent: lane.sent,
            answered: lane.latencies_ms.len() as u64,
            p50_ms: percentile(&mut lane.latencies_ms, 0.5),
            p99_ms: percentile(&mut lane.latencies_ms, 0.99),
            answers: lane.answers,
        }
    }

    fn json(&self) -> Value {
        json!({
            "sent": self.sent, "answered": self.answered, "answers": self.answers,
            "p50_ms": self.p50_ms, "p99_ms": self.p99_ms,
        })
    }
}

/// A child process under watch.
struct Watched {
    name: &'static str,
    process: Worker,
    /// Whether its series are judged (the simulator's call log and datasets fill up by
    /// design, so its memory is shown, not judged).
    judged: bool,
}

struct ProcessSample {
    name: &'static str,
    rss_mib: Option<f64>,
    fds: Option<usize>,
    cpu_secs: Option<f64>,
}

/// What a minute showed.
struct Row {
    minute: usize,
    processes: Vec<ProcessSample>,
    queues: Vec<(String, u32)>,
    http: LaneSummary,
    upstream: LaneSummary,
    reads: LaneSummary,
    /// Refreshes that ended in the minute, and AUTOSYNC refreshes requested in it.
    updated: i64,
    errors: i64,
    autosync: i64,
    /// Refreshes `INITIALIZED` (queued or running) at the minute's end.
    in_flight: i64,
}

impl Row {
    fn process(&self, name: &str) -> Option<&ProcessSample> {
        self.processes.iter().find(|p| p.name == name)
    }

    fn queue(&self, name: &str) -> Option<u32> {
        self.queues.iter().find(|(q, _)| q == name).map(|(_, d)| *d)
    }

    fn json(&self) -> Value {
        let processes: serde_json::Map<String, Value> = self
            .processes
            .iter()
            .map(|p| {
                (
                    p.name.to_owned(),
                    json!({"rss_mib": p.rss_mib, "open_fds": p.fds, "cpu_secs": p.cpu_secs}),
                )
            })
            .collect();
        let queues: serde_json::Map<String, Value> = self
            .queues
            .iter()
            .map(|(q, d)| (q.clone(), json!(d)))
            .collect();
        json!({
            "minute": self.minute,
            "processes": processes,
            "queues": queues,
            "http_refresh": self.http.json(),
            "upstream": self.upstream.json(),
            "reads": self.reads.json(),
            "refreshes": {
                "updated": self.updated, "errors": self.errors,
                "autosync_requested": self.autosync, "in_flight": self.in_flight,
            },
        })
    }
}

/// The cumulative refresh counts of the namespace.
#[derive(Clone, Copy, Default)]
struct Counts {
    updated: i64,
    errors: i64,
    in_flight: i64,
    autosync: i64,
}

async fn counts(app: &TestApp) -> Result<Counts> {
    let (updated, errors, in_flight, autosync): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'UPDATED'), \
         count(*) FILTER (WHERE status = 'ERROR'), \
         count(*) FILTER (WHERE status = 'INITIALIZED'), \
         count(*) FILTER (WHERE requested_by = 'AUTOSYNC') FROM refreshes",
    )
    .fetch_one(&app.pg)
    .await
    .context("count the refreshes")?;
    Ok(Counts {
        updated,
        errors,
        in_flight,
        autosync,
    })
}

/// Message counts of `queues` (a passive declare each).
async fn queue_depths(app: &TestApp, queues: &[String]) -> Result<Vec<(String, u32)>> {
    let mut depths = Vec::with_capacity(queues.len());
    for name in queues {
        let depth = refresh_amqp::queue_depth(&app.amqp, name)
            .await
            .with_context(|| format!("passive declare of {name}"))?
            .with_context(|| format!("queue {name} is missing"))?;
        depths.push((name.clone(), depth));
    }
    Ok(depths)
}

/// The name without the namespace prefix: `jobs.wait.5s`.
fn short(queue: &str) -> &str {
    queue.split_once('.').map_or(queue, |(_, rest)| rest)
}

fn is_dead_letter(queue: &str) -> bool {
    short(queue).ends_with(".dead")
}

fn is_wait(queue: &str) -> bool {
    short(queue).starts_with("jobs.wait")
}

/// `url` with its host and port replaced by `127.0.0.1:{port}` (its path kept).
fn on_port(url: &str, port: u16) -> String {
    let path = url
        .split_once("://")
        .and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..]))
        .unwrap_or("");
    format!("http://127.0.0.1:{port}{path}")
}

fn token<'a>(http: &'a Http, consent: &Seeded) -> &'a str {
    http.tokens.get(&consent.tenant).map_or("", String::as_str)
}

/// `POST /v1/consents` for a consent of the simulator whose dataset is the `key`-th
/// of [`SIM_KEYS`] (the simulator knows a consent by its access token); the status.
async fn register(http: &Http, consent: &Seeded, key: usize) -> u16 {
    let expires = (Utc::now() + TimeDelta::days(90)).to_rfc3339_opts(SecondsFormat::Millis, true);
    let body = json!({
        "consentId": consent.id, "providerId": "sim",
        "bankConsentId": format!("soak-{}", consent.id),
        "accessToken": format!("soak-key-{}", key % SIM_KEYS), "expiresAt": expires,
    });
    let sent = http
        .client
        .post(format!("{}/v1/consents", http.base))
        .bearer_auth(token(http, consent))
        .json(&body)
        .send()
        .await;
    sent.map_or(0, |r| r.status().as_u16())
}

/// `GET {path}` as the consent's tenant, body read to the end; the status (0: no answer).
async fn read(http: &Http, consent: &Seeded, path: &str) -> u16 {
    let sent = http
        .client
        .get(format!("{}{path}", http.base))
        .bearer_auth(token(http, consent))
        .send()
        .await;
    match sent {
        Ok(response) => {
            let status = response.status().as_u16();
            match response.bytes().await {
                Ok(_) => status,
                Err(_) => 0,
            }
        }
        Err(_) => 0,
    }
}

/// Calls `each(i, at)` at `rate` per second (open loop: the `i`-th call at its slot
/// `at`, whatever the earlier ones are doing) until `stop`, then gives the calls in
/// flight [`DRAIN`] to finish.
async fn paced<F, Fut>(rate: f64, stop: CancellationToken, mut each: F)
where
    F: FnMut(usize, Instant) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let started = Instant::now();
    let mut set = JoinSet::new();
    let mut i = 0_usize;
    loop {
        let at = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(at) => {}
        }
        set.spawn(each(i, at));
        while set.try_join_next().is_some() {}
        i += 1;
    }
    let _ = tokio::time::timeout(DRAIN, async { while set.join_next().await.is_some() {} }).await;
}

/// Decisions on the reply queue, until `stop`: latency from each request's slot.
async fn collect_decisions(
    mut replies: refresh_amqp::Consumer,
    pending: Arc<Mutex<HashMap<String, Instant>>>,
    window: Shared,
    stop: CancellationToken,
) {
    loop {
        let delivery = tokio::select! {
            () = stop.cancelled() => return,
            delivery = replies.next() => delivery,
        };
        let Some(delivery) = delivery else { return };
        let at = delivery.correlation_id.as_deref().and_then(|c| {
            pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(c)
        });
        let body: Value = serde_json::from_slice(&delivery.body).unwrap_or_default();
        let answer = if body["accepted"] == json!(true) {
            "accepted".to_owned()
        } else {
            body["problem"]["status"]
                .as_u64()
                .map_or_else(|| "unreadable".to_owned(), |s| s.to_string())
        };
        if let Some(at) = at {
            window.answered(Kind::Upstream, answer, ms(at.elapsed()));
        }
        let _ = delivery.settle(Outcome::Ack).await;
    }
}

/// Makes the next batch of auto-sync consents due every [`AUTOSYNC_EVERY`], until `stop`.
async fn make_due(app: &TestApp, consents: &[Seeded], stop: CancellationToken) {
    let mut next = 0_usize;
    let mut ticks = tokio::time::interval(AUTOSYNC_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let batch: Vec<Uuid> = (0..AUTOSYNC_BATCH)
            .map(|k| consents[(next + k) % consents.len()].id)
            .collect();
        next += AUTOSYNC_BATCH;
        // Seven hours pass for them: every time the scheduler compares moves back
        // alike, so their last auto-sync still reads as having succeeded (moving only
        // the last success would put them into the backoff of a failed one).
        let aged = sqlx::query(
            "UPDATE consents SET created_at = created_at - interval '7 hours', \
             last_refreshed_at = last_refreshed_at - interval '7 hours', \
             last_autosync_at = last_autosync_at - interval '7 hours', \
             next_autosync_at = next_autosync_at - interval '7 hours' \
             WHERE consent_id = ANY($1)",
        )
        .bind(&batch)
        .execute(&app.pg)
        .await;
        if let Err(error) = aged {
            progress(&format!("soak: could not make consents due: {error}"));
        }
    }
}

fn show(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.1}"))
}

fn show_answers(row: &Row) -> String {
    let lanes = [
        ("http", &row.http),
        ("upstream", &row.upstream),
        ("reads", &row.reads),
    ];
    lanes
        .iter()
        .map(|(name, lane)| {
            let answers: Vec<String> = lane
                .answers
                .iter()
                .map(|(a, n)| format!("{a}×{n}"))
                .collect();
            format!("{name} {}", answers.join(" "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

const HEADER: &str = "| min | ingress MiB / fds | worker MiB / fds | scheduler MiB / fds \
    | jobs / wait / requests / dead | HTTP sent / answered | HTTP p50 / p99 ms \
    | upstream sent / decided | upstream p50 / p99 ms | reads sent / answered \
    | reads p50 / p99 ms | refreshes updated / autosync / in flight | answers |\n\
    | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |";

fn table_row(row: &Row) -> String {
    let process = |name: &str| {
        row.process(name).map_or_else(
            || "–".to_owned(),
            |p| {
                format!(
                    "{} / {}",
                    show(p.rss_mib),
                    p.fds.map_or_else(|| "–".to_owned(), |f| f.to_string())
                )
            },
        )
    };
    let sum = |pick: fn(&str) -> bool| -> u32 {
        row.queues
            .iter()
            .filter(|(q, _)| pick(q))
            .map(|(_, d)| *d)
            .sum()
    };
    let jobs = sum(|q| short(q) == "jobs");
    let wait = sum(is_wait);
    let requests = sum(|q| short(q) == "requests");
    let dead = sum(is_dead_letter);
    let lane = |l: &LaneSummary| {
        (
            format!("{} / {}", l.sent, l.answered),
            format!("{} / {}", show(l.p50_ms), show(l.p99_ms)),
        )
    };
    let (http_n, http_ms) = lane(&row.http);
    let (up_n, up_ms) = lane(&row.upstream);
    let (reads_n, reads_ms) = lane(&row.reads);
    format!(
        "| {} | {} | {} | {} | {jobs} / {wait} / {requests} / {dead} | {http_n} | {http_ms} \
         | {up_n} | {up_ms} | {reads_n} | {reads_ms} | {} / {} / {} | {} |",
        row.minute,
        process("ingress"),
        process("worker"),
        process("scheduler"),
        row.updated,
        row.autosync,
        row.in_flight,
        show_answers(row),
    )
}

/// One judged series: its values per minute after the warm-up.
struct Series {
    name: String,
    unit: &'static str,
    floor: f64,
    values: Vec<f64>,
}

fn series(rows: &[Row], watched: &[Watched], queues: &[String]) -> Vec<Series> {
    let measured = rows.get(WARM_UP_MINUTES..).unwrap_or_default();
    let collect = |f: &dyn Fn(&Row) -> Option<f64>| measured.iter().filter_map(f).collect();
    let mut all = Vec::new();
    for w in watched.iter().filter(|w| w.judged) {
        all.push(Series {
            name: format!("{} RSS", w.name),
            unit: "MiB",
            floor: FLOOR_MIB,
            values: collect(&|r| r.process(w.name).and_then(|p| p.rss_mib)),
        });
        all.push(Series {
            name: format!("{} open fds", w.name),
            unit: "fds",
            floor: FLOOR_FDS,
            values: collect(&|r| r.process(w.name).and_then(|p| p.fds).map(|f| f as f64)),
        });
    }
    for q in queues {
        all.push(Series {
            name: format!("queue {} depth", short(q)),
            unit: "messages",
            floor: FLOOR_MESSAGES,
            values: collect(&|r| r.queue(q).map(f64::from)),
        });
    }
    all.push(Series {
        name: "refreshes in flight".to_owned(),
        unit: "refreshes",
        floor: FLOOR_MESSAGES,
        values: collect(&|r| Some(r.in_flight as f64)),
    });
    for (name, pick) in [
        (
            "HTTP admission p99",
            (|r| r.http.p99_ms) as fn(&Row) -> Option<f64>,
        ),
        ("upstream publish → decision p99", |r| r.upstream.p99_ms),
        ("reads p99", |r| r.reads.p99_ms),
    ] {
        all.push(Series {
            name: name.to_owned(),
            unit: "ms",
            floor: FLOOR_MS,
            values: collect(&pick),
        });
    }
    all
}

/// Answers of every minute and of the drain, by lane.
fn totals(rows: &[Row], drained: &Window) -> [(&'static str, BTreeMap<String, u64>); 3] {
    let mut out = [
        ("HTTP refresh", drained.http.answers.clone()),
        ("upstream", drained.upstream.answers.clone()),
        ("reads", drained.reads.answers.clone()),
    ];
    for row in rows {
        for (i, lane) in [&row.http, &row.upstream, &row.reads].iter().enumerate() {
            for (answer, n) in &lane.answers {
                *out[i].1.entry(answer.clone()).or_default() += n;
            }
        }
    }
    out
}

/// Samples the processes, queues and counts at the end of minute `minute`.
async fn sample(
    app: &TestApp,
    minute: usize,
    watched: &mut [Watched],
    queues: &[String],
    window: Window,
    before: Counts,
    failures: &mut Vec<String>,
) -> Result<(Row, Counts)> {
    let mut processes = Vec::with_capacity(watched.len());
    for w in watched.iter_mut() {
        if let Some(status) = w.process.exited() {
            failures.push(format!(
                "refreshd {} died during minute {minute} ({status})",
                w.name
            ));
        }
        let pid = w.process.pid();
        processes.push(ProcessSample {
            name: w.name,
            rss_mib: rss_mib(pid),
            fds: open_fds(pid),
            cpu_secs: cpu_time(pid).map(|d| d.as_secs_f64()),
        });
    }
    let depths = queue_depths(app, queues).await?;
    let now = counts(app).await?;
    let row = Row {
        minute,
        processes,
        queues: depths,
        http: LaneSummary::of(window.http),
        upstream: LaneSummary::of(window.upstream),
        reads: LaneSummary::of(window.reads),
        updated: now.updated - before.updated,
        errors: now.errors - before.errors,
        autosync: now.autosync - before.autosync,
        in_flight: now.in_flight,
    };
    Ok((row, now))
}

/// The settings every process of the soak shares: the relaxed stagger, the ports of
/// the simulator and the ingress, a quick scheduler tick.
struct Ports {
    sim_bind: String,
    http_bind: String,
    sim_url: String,
}

impl Ports {
    fn pick() -> Result<Self> {
        let (sim_port, http_port) = (free_port()?, free_port()?);
        let defaults = refresh_tests::test_settings("soak_probe", &[]);
        let sim = defaults
            .providers
            .get("sim")
            .context("the dev settings have the simulator as provider sim")?;
        Ok(Self {
            sim_bind: format!("127.0.0.1:{sim_port}"),
            http_bind: format!("127.0.0.1:{http_port}"),
            sim_url: on_port(&sim.base_url, sim_port),
        })
    }

    fn overrides(&self) -> Vec<(&str, &str)> {
        let mut overrides: Vec<(&str, &str)> = RELAXED.to_vec();
        overrides.extend([
            ("providers.sim.base_url", self.sim_url.as_str()),
            ("bank_sim.bind", self.sim_bind.as_str()),
            ("http.bind", self.http_bind.as_str()),
            ("scheduler.tick_secs", SCHEDULER_TICK_SECS),
        ]);
        overrides
    }
}

/// Starts the simulator, the ingress, a worker and the scheduler, each once the one
/// before answers.
async fn start_roles(
    app: &TestApp,
    ports: &Ports,
    overrides: &[(&str, &str)],
) -> Result<Vec<Watched>> {
    let client = reqwest::Client::new();
    let mut watched = Vec::new();
    for (role, judged, ready) in [
        (
            "bank-sim",
            false,
            Some(format!("http://{}/healthz", ports.sim_bind)),
        ),
        (
            "ingress",
            true,
            Some(format!("http://{}/readyz", ports.http_bind)),
        ),
        ("worker", true, None),
        ("scheduler", true, None),
    ] {
        let mut w = Watched {
            name: role,
            process: Worker::spawn_role(app, role, overrides)?,
            judged,
        };
        if let Some(url) = ready {
            wait_ready(&client, &url, w.name, &mut w.process).await?;
        }
        watched.push(w);
    }
    Ok(watched)
}

/// Registers every consent (each starts its initial load) and turns auto-sync on for
/// the tenants of `autosync`.
async fn register_all(http: &Http, everyone: &[Seeded], autosync: &[Seeded]) -> Result<()> {
    let done = Arc::new(AtomicUsize::new(0));
    let ticker = Ticker::start("registering".into(), done.clone(), everyone.len());
    let refused: Vec<u16> = stream::iter(everyone.iter().enumerate())
        .map(|(i, c)| {
            let done = done.clone();
            async move {
                let status = register(http, c, i).await;
                done.fetch_add(1, Ordering::Relaxed);
                status
            }
        })
        .buffer_unordered(16)
        .filter(|status| std::future::ready(*status != 201))
        .collect()
        .await;
    drop(ticker);
    if let Some(first) = refused.first() {
        anyhow::bail!(
            "{} registrations were not answered 201 (the first: {first})",
            refused.len()
        );
    }
    let mut tenants: Vec<&Seeded> = Vec::new();
    for c in autosync {
        if !tenants.iter().any(|t| t.tenant == c.tenant) {
            tenants.push(c);
        }
    }
    for consent in tenants {
        let status = http
            .client
            .put(format!("{}/v1/apps/{}/settings", http.base, consent.tenant))
            .bearer_auth(token(http, consent))
            .json(
                &json!({"autosyncIntervalHours": AUTOSYNC_INTERVAL_HOURS, "inactivationDays": 90}),
            )
            .send()
            .await
            .map_or(0, |r| r.status().as_u16());
        anyhow::ensure!(
            status == 200,
            "the settings of {} answered {status}",
            consent.tenant
        );
    }
    Ok(())
}

/// Waits until no refresh is in flight (the initial loads are done); the counts then.
async fn wait_initial_loads(
    app: &TestApp,
    watched: &mut [Watched],
    total: usize,
) -> Result<Counts> {
    let done = Arc::new(AtomicUsize::new(0));
    let _ticker = Ticker::start("initial loads".into(), done.clone(), total);
    let deadline = Instant::now() + INITIAL_LOADS_LIMIT;
    let counted = loop {
        let now = counts(app).await?;
        done.store(
            usize::try_from(now.updated + now.errors)?,
            Ordering::Relaxed,
        );
        if now.in_flight == 0 {
            break now;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "initial loads still running after {} s",
            INITIAL_LOADS_LIMIT.as_secs()
        );
        for w in watched.iter_mut() {
            if let Some(status) = w.process.exited() {
                anyhow::bail!(
                    "refreshd {} died during the initial loads ({status})",
                    w.name
                );
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    anyhow::ensure!(
        counted.errors == 0,
        "{} initial loads ended ERROR",
        counted.errors
    );
    Ok(counted)
}

/// What the load left to judge besides the rows.
struct Ending {
    baseline: Vec<(String, u32)>,
    end: Vec<(String, u32)>,
    drained: Window,
    lost: usize,
    new_errors: i64,
}

/// Applies the growth rule to every series and the other checks; the failures (one
/// line each, naming the metric), the series table, and the series for the JSON.
fn judge(
    rows: &[Row],
    watched: &mut [Watched],
    queues: &[String],
    ending: &Ending,
    failures: &mut Vec<String>,
) -> (String, Vec<Value>) {
    let mut table = String::new();
    let mut checks = Vec::new();
    for s in &series(rows, watched, queues) {
        let t = trend(&s.values, s.floor);
        let verdict = match t {
            None => "too short to judge",
            Some(t) if t.growing => "GROWS STEADILY",
            Some(_) => "steady",
        };
        if let Some(t) = t {
            if table.is_empty() {
                let _ = writeln!(
                    table,
                    "\n| series (minutes {}–{}) | first → last | rose in | verdict |\n| --- | ---: | ---: | --- |",
                    WARM_UP_MINUTES + 1,
                    rows.len()
                );
            }
            let _ = writeln!(
                table,
                "| {} | {:.1} → {:.1} {} | {}/{} steps | {verdict} |",
                s.name, t.first, t.last, s.unit, t.rises, t.steps
            );
            if t.growing {
                failures.push(format!(
                    "{} grows steadily: {:.1} → {:.1} {} (rose in {} of {} minute steps; the rule: \
                     at least 80 % of the steps rose, and the last exceeds the first by more than \
                     20 % and {} {})",
                    s.name, t.first, t.last, s.unit, t.rises, t.steps, s.floor, s.unit
                ));
            }
        }
        checks.push(json!({
            "series": s.name, "unit": s.unit, "floor": s.floor, "values": s.values,
            "rises": t.map(|t| t.rises), "steps": t.map(|t| t.steps), "verdict": verdict,
        }));
    }
    if table.is_empty() {
        let _ = writeln!(
            table,
            "\nToo short to judge growth: the rule needs {MIN_POINTS} minutes after \
             {WARM_UP_MINUTES} of warm-up ({} measured).",
            rows.len()
        );
    }
    for ((queue, first), (_, last)) in ending.baseline.iter().zip(&ending.end) {
        if is_dead_letter(queue) && last > first {
            failures.push(format!(
                "dead-letter queue {} gained {} messages",
                short(queue),
                last - first
            ));
        }
    }
    for (lane, answers) in totals(rows, &ending.drained) {
        let bad: Vec<String> = answers
            .iter()
            .filter(|(a, _)| {
                a.parse::<u16>()
                    .map_or(*a != "accepted", |s| s == 0 || s >= 500)
            })
            .map(|(a, n)| format!("{n}× {}", if a == "0" { "no answer" } else { a }))
            .collect();
        if !bad.is_empty() {
            failures.push(format!("{lane} requests failed: {}", bad.join(", ")));
        }
    }
    if ending.lost > 0 {
        failures.push(format!(
            "{} upstream requests got no decision within {} s of the end",
            ending.lost,
            DRAIN.as_secs()
        ));
    }
    if ending.new_errors > 0 {
        failures.push(format!("{} refreshes ended ERROR", ending.new_errors));
    }
    for w in watched.iter_mut() {
        let named = format!("refreshd {} ", w.name);
        if let Some(status) = w.process.exited()
            && !failures.iter().any(|f| f.starts_with(&named))
        {
            failures.push(format!("refreshd {} died ({status})", w.name));
        }
    }
    (table, checks)
}

pub(crate) async fn run(minutes: u32, out_dir: &Path) -> Result<()> {
    let binary = refreshd_binary()?;
    let ports = Ports::pick()?;
    let overrides = ports.overrides();
    progress(&format!(
        "soak: {minutes} min; starting a namespace and refreshd bank-sim, ingress, worker and scheduler ({})",
        binary.display()
    ));
    let app = refresh_tests::spawn_app_with(&overrides).await;
    // reqwest is built without a TLS provider (the harness's in-process ingress would
    // install it; here every role is a process of its own).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut watched = start_roles(&app, &ports, &overrides).await?;

    let on_demand =
        (HTTP_RATE + UPSTREAM_RATE) * f64::from(minutes) * 60.0 / REQUESTS_PER_CONSENT as f64;
    let consents: Vec<Seeded> = (0..on_demand.ceil() as usize)
        .map(|i| Seeded {
            id: Uuid::new_v4(),
            tenant: format!("soak{:02}", i % TENANTS),
        })
        .collect();
    let autosync: Vec<Seeded> = (0..AUTOSYNC_CONSENTS)
        .map(|i| Seeded {
            id: Uuid::new_v4(),
            tenant: format!("soakauto{}", i % AUTOSYNC_TENANTS),
        })
        .collect();
    let everyone: Vec<Seeded> = consents.iter().chain(&autosync).cloned().collect();
    let http = Http::new(&app, &format!("http://{}", ports.http_bind), &everyone)?;
    progress(&format!(
        "soak: registering {} consents ({} on demand over {TENANTS} tenants, {AUTOSYNC_CONSENTS} auto-synced)",
        everyone.len(),
        consents.len()
    ));
    register_all(&http, &everyone, &autosync).await?;
    progress("soak: waiting for the initial loads");
    let before = wait_initial_loads(&app, &mut watched, everyone.len()).await?;

    let names = refresh_amqp::Names::new(&app.namespace);
    let queues: Vec<String> = names.queues().into_iter().map(str::to_owned).collect();
    let baseline = queue_depths(&app, &queues).await?;
    let broker = refresh_amqp::Broker::start(
        &app.settings.amqp,
        &app.namespace,
        app.shutdown.child_token(),
        &app.tracker,
    )
    .await?;
    let reply_queue = broker.declare_reply_queue().await?;
    let replies = broker.consume(&reply_queue, 1000);

    progress(&format!(
        "soak: load for {minutes} min: HTTP refresh {HTTP_RATE}/s, upstream {UPSTREAM_RATE}/s, \
         reads {READ_RATE}/s, auto-sync {}/s; a row per minute on stdout",
        AUTOSYNC_BATCH as f64 / AUTOSYNC_EVERY.as_secs_f64()
    ));
    println!("\n## refresh-bench soak ({minutes} min)\n\n{HEADER}");
    let window = Shared::default();
    let pending: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let next = Arc::new(AtomicUsize::new(0));
    let pool = Arc::new(consents);
    let stop = CancellationToken::new();
    let collector_stop = CancellationToken::new();
    let mut failures = Vec::new();

    // HTTP and upstream requests take the on-demand consents in turn.
    let http_lane = paced(HTTP_RATE, stop.clone(), |_, at| {
        let consent = pool[next.fetch_add(1, Ordering::Relaxed) % pool.len()].clone();
        window.sent(Kind::Http);
        let (http, window) = (http.clone(), window.clone());
        async move {
            let (status, _) = http.refresh(&consent).await;
            window.answered(Kind::Http, status.to_string(), ms(at.elapsed()));
        }
    });
    let upstream_lane = paced(UPSTREAM_RATE, stop.clone(), |_, at| {
        let consent = pool[next.fetch_add(1, Ordering::Relaxed) % pool.len()].clone();
        let id = Uuid::new_v4().to_string();
        window.sent(Kind::Upstream);
        pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), at);
        let (broker, queue, window, pending) = (
            broker.clone(),
            reply_queue.clone(),
            window.clone(),
            pending.clone(),
        );
        async move {
            let body =
                json!({"consentId": consent.id, "tenantId": consent.tenant, "requestedBy": "APP"});
            let body = serde_json::to_vec(&body).unwrap_or_default();
            if broker
                .publish_request(&body, Some(&id), Some(&queue), Some(&id))
                .await
                .is_err()
            {
                pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                window.answered(Kind::Upstream, "publish_failed".into(), ms(at.elapsed()));
            }
        }
    });
    let reads_lane = paced(READ_RATE, stop.clone(), |i, at| {
        let consent = pool[(i / READS.len()) % pool.len()].clone();
        let path = format!("/v1/consents/{}{}", consent.id, READS[i % READS.len()]);
        window.sent(Kind::Reads);
        let (http, window) = (http.clone(), window.clone());
        async move {
            let status = read(&http, &consent, &path).await;
            window.answered(Kind::Reads, status.to_string(), ms(at.elapsed()));
        }
    });
    let monitor = async {
        let started = Instant::now();
        let mut rows = Vec::new();
        let mut before = before;
        let outcome: Result<()> = async {
            for minute in 1..=minutes as usize {
                tokio::time::sleep_until(started + MINUTE * u32::try_from(minute)?).await;
                let (row, now) = sample(
                    &app,
                    minute,
                    &mut watched,
                    &queues,
                    window.take(),
                    before,
                    &mut failures,
                )
                .await?;
                before = now;
                println!("{}", table_row(&row));
                progress(&format!(
                    "soak: minute={minute}/{minutes} http_p99_ms={} upstream_p99_ms={} reads_p99_ms={} updated={} in_flight={}",
                    show(row.http.p99_ms),
                    show(row.upstream.p99_ms),
                    show(row.reads.p99_ms),
                    row.updated,
                    row.in_flight
                ));
                rows.push(row);
                // A process died: the rest would measure nothing.
                if !failures.is_empty() {
                    break;
                }
            }
            Ok(())
        }
        .await;
        stop.cancel();
        (rows, outcome)
    };
    let load = async {
        let ((rows, outcome), (), (), (), ()) = tokio::join!(
            monitor,
            http_lane,
            upstream_lane,
            reads_lane,
            make_due(&app, &autosync, stop.clone()),
        );
        // The decisions still owed.
        let deadline = Instant::now() + DRAIN;
        while !pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        collector_stop.cancel();
        (rows, outcome)
    };
    let ((rows, outcome), ()) = tokio::join!(
        load,
        collect_decisions(
            replies,
            pending.clone(),
            window.clone(),
            collector_stop.clone()
        ),
    );
    outcome?;
    let lost = pending.lock().unwrap_or_else(PoisonError::into_inner).len();
    let ending = Ending {
        baseline,
        end: queue_depths(&app, &queues).await?,
        drained: window.take(),
        lost,
        new_errors: counts(&app).await?.errors - before.errors,
    };
    let (table, checks) = judge(&rows, &mut watched, &queues, &ending, &mut failures);
    print!("{table}");
    if failures.is_empty() {
        println!(
            "\nsoak passed: no series grows steadily, no dead letters, no 5xx, no refresh ERROR, every process alive."
        );
    } else {
        println!("\nsoak FAILED:");
        for f in &failures {
            println!("- {f}");
        }
    }

    let document = json!({
        "machine": crate::machine::describe(),
        "generated_at": Utc::now().to_rfc3339(),
        "minutes": minutes,
        "load": {
            "http_refresh_per_s": HTTP_RATE, "upstream_per_s": UPSTREAM_RATE,
            "reads_per_s": READ_RATE,
            "autosync_due_per_s": AUTOSYNC_BATCH as f64 / AUTOSYNC_EVERY.as_secs_f64(),
            "on_demand_consents": pool.len(), "autosync_consents": AUTOSYNC_CONSENTS,
            "scheduler_tick_secs": SCHEDULER_TICK_SECS,
        },
        "rule": {
            "warm_up_minutes": WARM_UP_MINUTES, "min_points": MIN_POINTS,
            "rise_share": RISE_NUMERATOR as f64 / RISE_DENOMINATOR as f64,
            "relative_margin": RELATIVE_MARGIN,
            "floors": {"MiB": FLOOR_MIB, "fds": FLOOR_FDS, "messages": FLOOR_MESSAGES, "ms": FLOOR_MS},
        },
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        "series": checks,
        "failures": failures,
        "passed": failures.is_empty(),
    });
    let file = out_dir.join("soak.json");
    std::fs::write(&file, serde_json::to_string_pretty(&document)?)?;
    progress(&format!("soak: results written to {}", file.display()));

    drop(watched);
    crate::stop_app(app).await;
    anyhow::ensure!(failures.is_empty(), "soak failed: {}", failures.join("; "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Some(growing)`, or `None` when too short to judge.
    fn check(values: &[f64], floor: f64, expected: Option<bool>) {
        assert_eq!(
            trend(values, floor).map(|t| t.growing),
            expected,
            "{values:?}"
        );
    }

    #[test]
    fn the_growth_rule() {
        // Rising every minute, well past the floor and 20 %: a leak.
        check(&[40.0, 44.0, 48.0, 52.0, 56.0, 60.0], FLOOR_MIB, Some(true));
        // 7 of 8 steps rose (one flat minute): still steady growth.
        check(
            &[40.0, 42.0, 44.0, 44.0, 46.0, 48.0, 50.0, 52.0, 54.0],
            FLOOR_MIB,
            Some(true),
        );
        // Only 6 of 8 steps rose: wandering, not steady.
        check(
            &[40.0, 44.0, 43.0, 47.0, 51.0, 50.0, 54.0, 58.0, 62.0],
            FLOOR_MIB,
            Some(false),
        );
        // Levels off after a rise: the later minutes do not rise.
        check(
            &[40.0, 48.0, 52.0, 52.0, 52.0, 52.0],
            FLOOR_MIB,
            Some(false),
        );
        // A single jump at the end.
        check(&[40.0, 40.0, 40.0, 40.0, 80.0], FLOOR_MIB, Some(false));
        // Rising every minute, but by less than the absolute floor in all.
        check(
            &[40.0, 41.0, 42.0, 43.0, 44.0, 45.0],
            FLOOR_MIB,
            Some(false),
        );
        // Past the floor but under 20 % of a large first value.
        check(
            &[100.0, 103.0, 106.0, 109.0, 112.0, 115.0],
            FLOOR_MIB,
            Some(false),
        );
        // Past both margins.
        check(
            &[100.0, 105.0, 110.0, 115.0, 120.0, 125.0],
            FLOOR_MIB,
            Some(true),
        );
        // Falling, flat.
        check(&[60.0, 56.0, 52.0, 48.0], FLOOR_MIB, Some(false));
        check(&[23.0, 23.0, 23.0, 23.0], FLOOR_FDS, Some(false));
        // A queue from empty: the floor decides (no relative margin of 0).
        check(&[0.0, 20.0, 40.0, 60.0], FLOOR_MESSAGES, Some(true));
        check(&[0.0, 10.0, 20.0, 30.0], FLOOR_MESSAGES, Some(false));
        // Latency creeping up every minute.
        check(&[5.0, 12.0, 19.0, 26.0, 33.0], FLOOR_MS, Some(true));
        // Too short: fewer than three values after the warm-up.
        check(&[], FLOOR_MIB, None);
        check(&[40.0], FLOOR_MIB, None);
        check(&[40.0, 80.0], FLOOR_MIB, None);
    }

    #[test]
    fn the_trend_counts_rises_and_ends() {
        let t = trend(&[1.0, 2.0, 2.0, 3.0], 0.5).expect("long enough");
        assert_eq!((t.rises, t.steps, t.first, t.last), (2, 3, 1.0, 3.0));
    }

    #[test]
    fn queue_names_are_told_apart() {
        assert_eq!(short("t_abc.jobs.wait.5s"), "jobs.wait.5s");
        assert!(is_dead_letter("t_abc.requests.dead"));
        assert!(is_dead_letter("t_abc.jobs.dead"));
        assert!(!is_dead_letter("t_abc.jobs"));
        assert!(is_wait("t_abc.jobs.wait"));
        assert!(is_wait("t_abc.jobs.wait.300s"));
        assert!(!is_wait("t_abc.jobs"));
    }

    #[test]
    fn a_url_moves_to_another_port() {
        assert_eq!(
            on_port("http://127.0.0.1:8090/open-banking/v3.1/aisp", 4000),
            "http://127.0.0.1:4000/open-banking/v3.1/aisp"
        );
        assert_eq!(on_port("http://localhost", 4000), "http://127.0.0.1:4000");
    }
}
