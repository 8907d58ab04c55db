//! The admission gate (SPEC §2 rules 3–5) and the workers' start slots, through the
//! real Redis: every scenario runs twice, on the standalone Redis and on a local
//! three-master Redis Cluster started for it (`gate::<scenario>::{standalone,cluster}`).

#![allow(
    clippy::unwrap_used,
    reason = "helpers of a test report a broken expectation by panicking"
)]

use std::time::Duration;

use redis::AsyncCommands as _;
use refresh_core::{
    ConsentId, ConsentStatus, Problem, ProblemCode, ProviderId, QuotaRule, QuotaWindow,
    ROLLING_WINDOW, RefreshId, RequestedBy, TenantId, next_midnight, start_of_current_day,
};
use refresh_redis::{
    ConsentFacts, Gate, GateConfig, GateDecision, GateError, GateRequest, QuotaStatus,
    StartDecision, Ticket,
};
use refresh_tests::admission::AdmissionRows;
use refresh_tests::{
    RedisCluster, RedisServer, TestApp, spawn_app_from, spawn_app_with, test_settings,
};
use tokio::task::JoinSet;

/// Where a scenario's gate keeps its state.
#[derive(Clone, Copy, Debug)]
enum Redis {
    Standalone,
    Cluster,
}

/// A [`TestApp`] and, on a cluster, the cluster (dropped after the app).
struct GateApp {
    app: TestApp,
    cluster: Option<RedisCluster>,
}

impl std::ops::Deref for GateApp {
    type Target = TestApp;
    fn deref(&self) -> &TestApp {
        &self.app
    }
}

impl Redis {
    async fn app(self, overrides: &[(&str, &str)]) -> GateApp {
        match self {
            Self::Standalone => GateApp {
                app: spawn_app_with(overrides).await,
                cluster: None,
            },
            Self::Cluster => {
                let cluster = RedisCluster::start().await;
                let mut settings = test_settings(&refresh_tests::fresh_namespace(), overrides);
                settings.redis.cluster_nodes = cluster.urls();
                let app = spawn_app_from(settings).await;
                assert!(app.redis.is_cluster());
                GateApp {
                    app,
                    cluster: Some(cluster),
                }
            }
        }
    }
}

/// `scenario(Redis)` as two tests, `scenario::standalone` and `scenario::cluster`.
macro_rules! on_both {
    ($scenario:ident) => {
        mod $scenario {
            #[tokio::test]
            async fn standalone() {
                super::$scenario(super::Redis::Standalone).await;
            }

            #[tokio::test]
            async fn cluster() {
                super::$scenario(super::Redis::Cluster).await;
            }
        }
    };
}

fn config(app: &TestApp) -> GateConfig {
    GateConfig {
        namespace: app.namespace.clone(),
        rules: app.settings.quota.rules.clone(),
        time_zone: app.settings.quota_time_zone().unwrap(),
        stagger: app.settings.stagger.clone(),
        lease: Duration::from_secs(app.settings.lock.lease_secs),
    }
}

/// A gate on the app's namespace whose state is whole: the epochs written by a
/// rebuild from no records, as a new namespace's first admission does.
async fn gate(app: &TestApp) -> Gate {
    ready(Gate::new(app.redis.clone(), config(app))).await
}

async fn ready(gate: Gate) -> Gate {
    gate.rebuild(&[], gate.redis_now().await.unwrap())
        .await
        .unwrap();
    gate
}

fn new_consent() -> ConsentId {
    ConsentId::from_uuid(uuid::Uuid::new_v4())
}

fn new_refresh() -> RefreshId {
    RefreshId::from_uuid(uuid::Uuid::now_v7())
}

/// An ACTIVE consent of `tenant` at provider `sim`, as a caller looked it up.
fn active_facts(tenant: &str) -> ConsentFacts {
    ConsentFacts {
        tenant_id: TenantId::parse(tenant).unwrap(),
        provider_id: ProviderId::parse("sim").unwrap(),
        status: ConsentStatus::Active,
        expires_at: chrono::Utc::now() + chrono::TimeDelta::days(90),
    }
}

fn request(consent: ConsentId, source: RequestedBy) -> GateRequest {
    GateRequest {
        consent_id: consent,
        tenant_id: TenantId::parse("acme").unwrap(),
        facts: Some(active_facts("acme")),
        requested_by: source,
        refresh_id: new_refresh(),
        count_quota: true,
    }
}

fn admitted(decision: GateDecision) -> Ticket {
    match decision {
        GateDecision::Admitted(ticket) => ticket,
        GateDecision::Refused(problem) => panic!("expected an admission, got {problem}"),
        GateDecision::LookUp => panic!("expected an admission, got a lookup"),
    }
}

fn refused(decision: GateDecision) -> Problem {
    match decision {
        GateDecision::Refused(problem) => problem,
        GateDecision::Admitted(ticket) => panic!("expected a refusal, got {ticket:?}"),
        GateDecision::LookUp => panic!("expected a refusal, got a lookup"),
    }
}

/// Admits and frees the lock at once, as a finished refresh would.
async fn admit_and_finish(gate: &Gate, req: &GateRequest) -> Ticket {
    let ticket = admitted(gate.admit(req).await.unwrap());
    assert!(
        gate.release_lock(req.consent_id, req.refresh_id)
            .await
            .unwrap()
    );
    ticket
}

/// Redis `TIME` in milliseconds: the clock the gate decides by.
async fn redis_ms(app: &TestApp) -> i64 {
    let mut conn = app.redis.clone();
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    secs * 1000 + micros / 1000
}

/// SPEC §2's text for a wait of `ms`, computed independently of the core.
fn daily_limit_text(limit: u32, ms: i64) -> String {
    let secs = ((ms + 999) / 1000).max(1);
    let minutes = (secs + 59) / 60;
    format!(
        "Daily limit of {limit} requests/consent reached. Try again in {}h{:02}.",
        minutes / 60,
        minutes % 60
    )
}

/// Checks a `daily_limit_reached` refusal decided between Redis times
/// `before` and `after`, for a quota that admits again at `next_ms`.
fn check_daily_limit(
    problem: &Problem,
    limit: u32,
    window: QuotaWindow,
    next_ms: i64,
    before: i64,
    after: i64,
) {
    assert_eq!(problem.code, ProblemCode::DailyLimitReached);
    assert_eq!(problem.status, 429);
    assert_eq!(
        (problem.limit, problem.used, problem.window),
        (Some(limit), Some(limit), Some(window))
    );
    assert_eq!(
        problem
            .next_refresh_possible_at
            .map(|t| t.timestamp_millis()),
        Some(next_ms)
    );
    // The wait is next − now for a now between the two readings of the clock.
    let (shortest, longest) = (next_ms - after, next_ms - before);
    let texts = [
        daily_limit_text(limit, shortest),
        daily_limit_text(limit, longest),
    ];
    assert!(
        texts.contains(&problem.detail),
        "{:?} not in {texts:?}",
        problem.detail
    );
    let secs = problem.retry_after_seconds.unwrap() as i64;
    assert!(
        ((shortest + 999) / 1000..=(longest + 999) / 1000).contains(&secs),
        "{secs} s"
    );
    // Header and text agree: the text is the seconds rounded up to minutes.
    assert_eq!(problem.detail, daily_limit_text(limit, secs * 1000));
}

on_both!(the_lock_admits_one_refresh_per_consent_and_only_its_owner_frees_it);
async fn the_lock_admits_one_refresh_per_consent_and_only_its_owner_frees_it(redis: Redis) {
    let app = redis.app(&[]).await;
    let gate = gate(&app).await;
    let consent = new_consent();
    let first = request(consent, RequestedBy::Api);
    let ticket = admitted(gate.admit(&first).await.unwrap());
    assert_eq!(
        (ticket.refresh_id, ticket.consent_id),
        (first.refresh_id, consent)
    );
    assert!(ticket.not_before >= ticket.now);

    // The lock is the documented key, holding the refresh id, with the lease.
    let mut redis = app.redis.clone();
    let lock = format!("{}:{{c:{consent}}}:lock", app.namespace);
    let holder: Option<String> = redis.get(&lock).await.unwrap();
    assert_eq!(holder, Some(first.refresh_id.to_string()));
    let pttl: i64 = redis.pttl(&lock).await.unwrap();
    assert!((110_000..=120_000).contains(&pttl), "{pttl}");

    let second = request(consent, RequestedBy::Api);
    let problem = refused(gate.admit(&second).await.unwrap());
    assert_eq!(
        (problem.code, problem.status),
        (ProblemCode::RefreshInProgress, 409)
    );
    assert_eq!(
        problem.detail,
        "A refresh is already in progress for this consent"
    );
    assert_eq!(problem.refresh_id, Some(first.refresh_id));
    assert_eq!(
        gate.in_flight(consent).await.unwrap(),
        Some(first.refresh_id)
    );
    // A refused request consumed no quota.
    assert_eq!(
        gate.quota(consent, RequestedBy::Api)
            .await
            .unwrap()
            .unwrap()
            .used,
        1
    );

    // Renewing: only the owner extends the lease.
    let _: () = redis.pexpire(&lock, 1_000).await.unwrap();
    assert!(!gate.renew_lock(consent, second.refresh_id).await.unwrap());
    let pttl: i64 = redis.pttl(&lock).await.unwrap();
    assert!(pttl <= 1_000, "{pttl}");
    assert!(gate.renew_lock(consent, first.refresh_id).await.unwrap());
    let pttl: i64 = redis.pttl(&lock).await.unwrap();
    assert!(pttl > 110_000, "{pttl}");

    // Releasing: a non-owner cannot, the owner can, once.
    assert!(!gate.release_lock(consent, second.refresh_id).await.unwrap());
    assert_eq!(
        gate.in_flight(consent).await.unwrap(),
        Some(first.refresh_id)
    );
    assert!(gate.release_lock(consent, first.refresh_id).await.unwrap());
    assert!(!gate.release_lock(consent, first.refresh_id).await.unwrap());
    assert!(!gate.renew_lock(consent, first.refresh_id).await.unwrap());
    assert_eq!(gate.in_flight(consent).await.unwrap(), None);
    admitted(gate.admit(&second).await.unwrap());
    assert_eq!(
        gate.in_flight(consent).await.unwrap(),
        Some(second.refresh_id)
    );
}

on_both!(the_fifth_admission_in_24_hours_is_refused_with_the_exact_text);
async fn the_fifth_admission_in_24_hours_is_refused_with_the_exact_text(redis: Redis) {
    let app = redis.app(&[]).await;
    let gate = gate(&app).await;
    let consent = new_consent();
    assert_eq!(
        gate.quota(consent, RequestedBy::Api).await.unwrap(),
        Some(QuotaStatus {
            limit: 4,
            used: 0,
            window: QuotaWindow::Rolling24h,
            next_refresh_possible_at: None
        })
    );
    let mut tickets = Vec::new();
    for source in [
        RequestedBy::Api,
        RequestedBy::Portal,
        RequestedBy::App,
        RequestedBy::Api,
    ] {
        tickets.push(admit_and_finish(&gate, &request(consent, source)).await);
    }
    let oldest = tickets[0].now.timestamp_millis();
    let next_ms = oldest + ROLLING_WINDOW.num_milliseconds();

    let before = redis_ms(&app).await;
    let problem = refused(
        gate.admit(&request(consent, RequestedBy::Portal))
            .await
            .unwrap(),
    );
    let after = redis_ms(&app).await;
    check_daily_limit(&problem, 4, QuotaWindow::Rolling24h, next_ms, before, after);
    assert_eq!(
        gate.in_flight(consent).await.unwrap(),
        None,
        "a refusal takes no lock"
    );

    let status = gate
        .quota(consent, RequestedBy::App)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (status.limit, status.used, status.window),
        (4, 4, QuotaWindow::Rolling24h)
    );
    assert_eq!(
        status
            .next_refresh_possible_at
            .map(|t| t.timestamp_millis()),
        Some(next_ms)
    );

    // Sources named by no rule are exempt, and still take the lock.
    assert_eq!(
        gate.quota(consent, RequestedBy::Autosync).await.unwrap(),
        None
    );
    admit_and_finish(&gate, &request(consent, RequestedBy::Autosync)).await;
    admit_and_finish(&gate, &request(consent, RequestedBy::Admin)).await;
    // The initial connection load is counted by no quota.
    let initial = GateRequest {
        count_quota: false,
        ..request(consent, RequestedBy::App)
    };
    admit_and_finish(&gate, &initial).await;
    let again = refused(
        gate.admit(&request(consent, RequestedBy::Api))
            .await
            .unwrap(),
    );
    assert_eq!((again.used, again.limit), (Some(4), Some(4)));
    let mut redis = app.redis.clone();
    let counted: i64 = redis
        .zcard(format!("{}:{{c:{consent}}}:q:0", app.namespace))
        .await
        .unwrap();
    assert_eq!(counted, 4);

    // Another consent has its own quota.
    admitted(
        gate.admit(&request(new_consent(), RequestedBy::Api))
            .await
            .unwrap(),
    );
}

on_both!(a_calendar_day_quota_counts_per_local_day_and_resets_at_local_midnight);
async fn a_calendar_day_quota_counts_per_local_day_and_resets_at_local_midnight(redis: Redis) {
    // Kathmandu is UTC+05:45, so its midnights are nowhere near UTC's.
    let app = redis.app(&[("quota.time_zone", "Asia/Kathmandu")]).await;
    let mut config = config(&app);
    config.rules = vec![QuotaRule {
        sources: vec![RequestedBy::Api],
        limit: 2,
        window: QuotaWindow::CalendarDay,
    }];
    let tz = config.time_zone;
    let gate = ready(Gate::new(app.redis.clone(), config)).await;
    let consent = new_consent();
    let key = format!("{}:{{c:{consent}}}:q:0", app.namespace);
    let mut redis = app.redis.clone();

    let first = admit_and_finish(&gate, &request(consent, RequestedBy::Api)).await;
    let day_start = start_of_current_day(first.now, tz).timestamp_millis();
    let midnight = next_midnight(first.now, tz).timestamp_millis();
    // An admission late yesterday (local) does not count today.
    let _: () = redis.zadd(&key, "yesterday", day_start - 1).await.unwrap();
    let status = gate
        .quota(consent, RequestedBy::Api)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (status.limit, status.used, status.window),
        (2, 1, QuotaWindow::CalendarDay)
    );
    admit_and_finish(&gate, &request(consent, RequestedBy::Api)).await;
    let yesterday: Option<f64> = redis.zscore(&key, "yesterday").await.unwrap();
    assert_eq!(yesterday, None, "an admission prunes earlier days");

    let before = redis_ms(&app).await;
    let problem = refused(
        gate.admit(&request(consent, RequestedBy::Api))
            .await
            .unwrap(),
    );
    let after = redis_ms(&app).await;
    check_daily_limit(
        &problem,
        2,
        QuotaWindow::CalendarDay,
        midnight,
        before,
        after,
    );
    let status = gate
        .quota(consent, RequestedBy::Api)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        status
            .next_refresh_possible_at
            .map(|t| t.timestamp_millis()),
        Some(midnight)
    );

    // The count vanishes at the next local midnight.
    let pttl: i64 = redis.pttl(&key).await.unwrap();
    let expires_at = redis_ms(&app).await + pttl;
    assert!(
        (expires_at - midnight).abs() < 2_000,
        "expires {expires_at}, midnight {midnight}"
    );
    // AUTOSYNC is named by no rule here.
    admitted(
        gate.admit(&request(consent, RequestedBy::Autosync))
            .await
            .unwrap(),
    );
}

on_both!(undo_gives_back_the_lock_the_quota_and_the_slot);
async fn undo_gives_back_the_lock_the_quota_and_the_slot(redis: Redis) {
    let app = redis
        .app(&[("stagger.limit", "1"), ("stagger.period_secs", "60")])
        .await;
    let gate = gate(&app).await;
    let earlier = admitted(
        gate.admit(&request(new_consent(), RequestedBy::Api))
            .await
            .unwrap(),
    );
    let consent = new_consent();
    let ticket = admitted(
        gate.admit(&request(consent, RequestedBy::Api))
            .await
            .unwrap(),
    );
    assert_eq!(
        (ticket.not_before - earlier.not_before).num_milliseconds(),
        60_000
    );
    assert_eq!(
        gate.quota(consent, RequestedBy::Api)
            .await
            .unwrap()
            .unwrap()
            .used,
        1
    );

    gate.undo(&ticket).await.unwrap();
    assert_eq!(gate.in_flight(consent).await.unwrap(), None);
    assert_eq!(
        gate.quota(consent, RequestedBy::Api)
            .await
            .unwrap()
            .unwrap()
            .used,
        0
    );
    // The slot was the last one handed out, so the next admission reuses it.
    let next = admitted(
        gate.admit(&request(new_consent(), RequestedBy::Api))
            .await
            .unwrap(),
    );
    assert_eq!(next.not_before, ticket.not_before);

    // Undo is idempotent and touches only what the ticket's refresh owns: not
    // the consent's next lock, nor the slot now handed to someone else.
    gate.undo(&ticket).await.unwrap();
    let retry = admitted(
        gate.admit(&request(consent, RequestedBy::Api))
            .await
            .unwrap(),
    );
    gate.undo(&ticket).await.unwrap();
    assert_eq!(
        gate.in_flight(consent).await.unwrap(),
        Some(retry.refresh_id)
    );
    assert_eq!(
        gate.quota(consent, RequestedBy::Api)
            .await
            .unwrap()
            .unwrap()
            .used,
        1
    );
    assert_eq!(
        (retry.not_before - next.not_before).num_milliseconds(),
        60_000
    );

    // A slot followed by a later one stays taken (a gap, never a double booking).
    gate.undo(&next).await.unwrap();
    let after = admitted(
        gate.admit(&request(new_consent(), RequestedBy::Api))
            .await
            .unwrap(),
    );
    assert_eq!(
        (after.not_before - retry.not_before).num_milliseconds(),
        60_000
    );
}

on_both!(backlog_full_is_refused_and_consumes_nothing);
async fn backlog_full_is_refused_and_consumes_nothing(redis: Redis) {
    let app = redis
        .app(&[
            ("stagger.limit", "1"),
            ("stagger.period_secs", "60"),
            ("stagger.max_delay_secs", "60"),
        ])
        .await;
    let gate = gate(&app).await;
    // The third consent already used some quota earlier.
    let third = new_consent();
    let earlier = admit_and_finish(&gate, &request(third, RequestedBy::Api)).await;
    let second = admitted(
        gate.admit(&request(new_consent(), RequestedBy::Api))
            .await
            .unwrap(),
    );
    assert_eq!(
        (second.not_before - earlier.not_before).num_milliseconds(),
        60_000
    );

    let mut redis = app.redis.clone();
    let slot_key = format!("{}:{{stagger:global}}", app.namespace);
    let slot_before: String = redis.get(&slot_key).await.unwrap();
    let problem = refused(gate.admit(&request(third, RequestedBy::Api)).await.unwrap());
    assert_eq!(
        (problem.code, problem.status),
        (ProblemCode::BacklogFull, 429)
    );
    // The free slot is 120 s away, 60 s more than allowed (less the few ms elapsed).
    assert_eq!(problem.retry_after_seconds, Some(60));
    assert_eq!(
        problem.detail,
        "The refresh backlog is full. Try again in 0h01."
    );

    assert_eq!(gate.in_flight(third).await.unwrap(), None);
    let lock_exists: bool = redis
        .exists(format!("{}:{{c:{third}}}:lock", app.namespace))
        .await
        .unwrap();
    assert!(!lock_exists);
    let status = gate.quota(third, RequestedBy::Api).await.unwrap().unwrap();
    assert_eq!(status.used, 1, "only the earlier admission counts");
    let slot_after: String = redis.get(&slot_key).await.unwrap();
    assert_eq!(slot_after, slot_before);
    // Exempt sources wait for the stagger too.
    let autosync = refused(
        gate.admit(&request(third, RequestedBy::Autosync))
            .await
            .unwrap(),
    );
    assert_eq!(autosync.code, ProblemCode::BacklogFull);
}

on_both!(two_hundred_simultaneous_requests_for_one_consent_admit_exactly_one);
async fn two_hundred_simultaneous_requests_for_one_consent_admit_exactly_one(redis: Redis) {
    let app = redis.app(&[]).await;
    let gate = gate(&app).await;
    let consent = new_consent();
    let mut tasks = JoinSet::new();
    for _ in 0..200 {
        let gate = gate.clone();
        tasks.spawn(async move { gate.admit(&request(consent, RequestedBy::Api)).await });
    }
    let mut winners = Vec::new();
    let mut holders = Vec::new();
    while let Some(decision) = tasks.join_next().await {
        match decision.unwrap().unwrap() {
            GateDecision::Admitted(ticket) => winners.push(ticket.refresh_id),
            GateDecision::Refused(problem) => {
                assert_eq!(problem.code, ProblemCode::RefreshInProgress);
                holders.push(problem.refresh_id.unwrap());
            }
            GateDecision::LookUp => panic!("a lookup with the facts given"),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert_eq!(holders.len(), 199);
    assert!(holders.iter().all(|h| *h == winners[0]));
    assert_eq!(
        gate.quota(consent, RequestedBy::Api)
            .await
            .unwrap()
            .unwrap()
            .used,
        1
    );
}

on_both!(five_hundred_consents_get_slots_at_least_period_over_limit_apart);
async fn five_hundred_consents_get_slots_at_least_period_over_limit_apart(redis: Redis) {
    let app = redis
        .app(&[
            ("stagger.limit", "30"),
            ("stagger.period_secs", "60"),
            ("stagger.max_delay_secs", "100000"),
        ])
        .await;
    let gate = gate(&app).await;
    let spacing = app.settings.stagger.spacing().num_milliseconds();
    assert_eq!(spacing, 2_000);
    let start = redis_ms(&app).await;
    let mut tasks = JoinSet::new();
    for _ in 0..500 {
        let gate = gate.clone();
        tasks.spawn(async move { gate.admit(&request(new_consent(), RequestedBy::Api)).await });
    }
    let mut slots = Vec::new();
    while let Some(decision) = tasks.join_next().await {
        slots.push(
            admitted(decision.unwrap().unwrap())
                .not_before
                .timestamp_millis(),
        );
    }
    slots.sort_unstable();
    assert_eq!(slots.len(), 500);
    assert!(slots[0] >= start);
    let gaps: Vec<i64> = slots.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|&g| g >= spacing),
        "smallest gap {:?}",
        gaps.iter().min()
    );
    // No period holds more than 30 starts, and none is wasted: the queue is packed.
    assert!(slots.windows(31).all(|w| w[30] - w[0] >= 60_000));
    assert_eq!(slots[499] - slots[0], 499 * spacing);
}

on_both!(start_slots_allow_limit_starts_per_period_and_count_an_attempt_once);
async fn start_slots_allow_limit_starts_per_period_and_count_an_attempt_once(redis: Redis) {
    let app = redis
        .app(&[("stagger.limit", "3"), ("stagger.period_secs", "6")])
        .await;
    let gate = gate(&app).await;
    let before = redis_ms(&app).await;
    for attempt in ["a1", "a2", "a3"] {
        assert_eq!(
            gate.take_start_slot("global", attempt).await.unwrap(),
            StartDecision::Go,
            "{attempt}"
        );
    }
    let after = redis_ms(&app).await;
    // The same attempt again is the same start.
    assert_eq!(
        gate.take_start_slot("global", "a1").await.unwrap(),
        StartDecision::Go
    );
    let StartDecision::WaitUntil(until) = gate.take_start_slot("global", "a4").await.unwrap()
    else {
        panic!("a fourth start within the period");
    };
    let until = until.timestamp_millis();
    // A start counts for the period plus the transport margin.
    let window = 6_000 + refresh_redis::START_MARGIN_MS;
    assert!(
        (before + window..=after + window + 1).contains(&until),
        "{before} {until} {after}"
    );
    let mut redis = app.redis.clone();
    let starts: i64 = redis
        .zcard(format!("{}:{{stagger:global}}:starts", app.namespace))
        .await
        .unwrap();
    assert_eq!(starts, 3, "a refusal records nothing");
    // Another bucket has its own budget.
    assert_eq!(
        gate.take_start_slot("provider.sim", "b1").await.unwrap(),
        StartDecision::Go
    );

    // At the announced time, and not before, the start goes ahead.
    let early = until - 300 - redis_ms(&app).await;
    tokio::time::sleep(Duration::from_millis(early.max(0) as u64)).await;
    assert!(matches!(
        gate.take_start_slot("global", "a4").await.unwrap(),
        StartDecision::WaitUntil(_)
    ));
    let wait = until - redis_ms(&app).await;
    tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)).await;
    assert_eq!(
        gate.take_start_slot("global", "a4").await.unwrap(),
        StartDecision::Go
    );
}

/// A gate whose Redis is `url`, failing after `timeout`.
fn gate_at(url: &str, timeout: Duration) -> Gate {
    let conn = refresh_redis::ConnectionManager::lazy(url, timeout).unwrap();
    let stagger = refresh_core::StaggerSettings::default();
    Gate::new(
        conn,
        GateConfig {
            namespace: "unreachable".to_owned(),
            rules: refresh_core::default_quota_rules(),
            time_zone: "UTC".parse().unwrap(),
            stagger,
            lease: Duration::from_secs(120),
        },
    )
}

async fn check_unavailable(gate: &Gate) {
    let consent = new_consent();
    let started = std::time::Instant::now();
    let outcomes = [
        gate.admit(&request(consent, RequestedBy::Api))
            .await
            .map(|_| ()),
        gate.renew_lock(consent, new_refresh()).await.map(|_| ()),
        gate.release_lock(consent, new_refresh()).await.map(|_| ()),
        gate.in_flight(consent).await.map(|_| ()),
        gate.quota(consent, RequestedBy::Api).await.map(|_| ()),
        gate.take_start_slot("global", "a1").await.map(|_| ()),
    ];
    for outcome in outcomes {
        assert!(
            matches!(outcome, Err(GateError::Unavailable(_))),
            "{outcome:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_unreachable_redis_is_unavailable() {
    check_unavailable(&gate_at("redis://127.0.0.1:1/", Duration::from_millis(300))).await;
    let error = gate_at("redis://127.0.0.1:1/", Duration::from_millis(300))
        .in_flight(new_consent())
        .await
        .unwrap_err();
    assert_eq!(error.to_string(), "redis unavailable");
}

#[tokio::test]
async fn a_redis_that_never_answers_is_unavailable() {
    // Accepts connections and says nothing: every round trip times out.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    check_unavailable(&gate_at(
        &format!("redis://{addr}/"),
        Duration::from_millis(300),
    ))
    .await;
    silent.abort();
}

#[tokio::test]
async fn a_redis_cluster_that_is_gone_is_unavailable() {
    let mut cluster = RedisCluster::start().await;
    let settings = refresh_redis::RedisSettings {
        url: "redis://127.0.0.1:1/".to_owned(),
        command_timeout_ms: 300,
        cluster_nodes: cluster.urls(),
    };
    let conn = refresh_redis::connect(&settings).await.unwrap();
    let gate = ready(Gate::new(
        conn,
        GateConfig {
            namespace: "gone".to_owned(),
            rules: refresh_core::default_quota_rules(),
            time_zone: "UTC".parse().unwrap(),
            stagger: refresh_core::StaggerSettings::default(),
            lease: Duration::from_secs(120),
        },
    ))
    .await;
    assert!(gate.in_flight(new_consent()).await.unwrap().is_none());
    cluster.kill();
    check_unavailable(&gate).await;
}

/// An app whose Redis is its own (a standalone server or a cluster started for it), so
/// that the test may change the server's settings.
async fn app_on_own_redis(redis: Redis) -> (TestApp, OwnRedis) {
    let mut settings = test_settings(&refresh_tests::fresh_namespace(), &[]);
    let own = match redis {
        Redis::Standalone => {
            let server = RedisServer::start().await;
            settings.redis.url = server.url();
            OwnRedis::Server(server)
        }
        Redis::Cluster => {
            let cluster = RedisCluster::start().await;
            settings.redis.cluster_nodes = cluster.urls();
            OwnRedis::Cluster(cluster)
        }
    };
    (spawn_app_from(settings).await, own)
}

enum OwnRedis {
    Server(RedisServer),
    Cluster(RedisCluster),
}

impl OwnRedis {
    /// `CONFIG SET name value` on every server.
    fn config_set(&self, name: &str, value: &str) {
        match self {
            Self::Server(server) => server.config_set(name, value),
            Self::Cluster(cluster) => cluster.config_set(name, value),
        }
    }
}

on_both!(a_full_redis_admits_nothing_and_lets_admitted_refreshes_go_on);
/// SPEC §2 rule 6 with Redis full (past `maxmemory` under `noeviction`, the policy
/// OPERATIONS.md asks for): an admission is answered 503 `unavailable` with nothing
/// consumed, while a refresh admitted before keeps its lease, takes its bank start
/// and frees its lock; once Redis has room again, the consent is admitted.
async fn a_full_redis_admits_nothing_and_lets_admitted_refreshes_go_on(redis: Redis) {
    let (app, own) = app_on_own_redis(redis).await;
    let api = app.start_ingress().await;
    let token = refresh_tests::dev_token(&app, Some("acme"), "api:stored_data");
    let running = api.seed_consent("acme", None, None).await;
    let refused = api.seed_consent("acme", None, None).await;
    let path = |consent: ConsentId| format!("/v1/consents/{consent}/refresh");
    let admitted = api.post(&path(running), &token, None).await;
    assert_eq!(admitted.status, 202, "{admitted:?}");
    let holder: RefreshId = admitted.body["refreshId"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    own.config_set("maxmemory-policy", "noeviction");
    own.config_set("maxmemory", "1");
    let full = api.post(&path(refused), &token, None).await;
    assert_eq!(full.status, 503, "{full:?}");
    assert_eq!(full.body["code"], "unavailable", "{full:?}");
    assert_eq!(
        full.body["detail"], "A required service is unavailable; nothing was admitted",
        "{full:?}"
    );
    let gate = Gate::new(app.redis.clone(), config(&app));
    assert!(matches!(
        gate.admit(&request(new_consent(), RequestedBy::Api)).await,
        Err(GateError::Unavailable(_))
    ));
    // What runs already goes on: its lease renewed, its bank start taken, its lock freed.
    assert!(gate.renew_lock(running, holder).await.unwrap());
    assert_eq!(
        gate.take_start_slot("global", &format!("{holder}:1"))
            .await
            .unwrap(),
        StartDecision::Go
    );
    assert!(gate.release_lock(running, holder).await.unwrap());

    own.config_set("maxmemory", "0");
    let view = api.get(&format!("/v1/consents/{refused}"), &token).await;
    assert_eq!(
        (
            view.body["refreshing"].clone(),
            view.body["quota"]["used"].clone()
        ),
        (serde_json::json!(false), serde_json::json!(0)),
        "{view:?}"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM refreshes WHERE consent_id = $1")
        .bind(refused.as_uuid())
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    assert_eq!(api.post(&path(refused), &token, None).await.status, 202);
}

#[tokio::test]
async fn the_gate_on_a_cluster_answers_again_after_a_node_restarts() {
    let redis = Redis::Cluster;
    let mut app = redis.app(&[("stagger.limit", "600")]).await;
    let gate = gate(&app).await;
    // Consents on every master: their hash tags spread over the slots.
    let consents: Vec<ConsentId> = (0..30).map(|_| new_consent()).collect();
    for consent in &consents {
        admit_and_finish(&gate, &request(*consent, RequestedBy::Api)).await;
    }
    let cluster = app.cluster.as_mut().unwrap();
    cluster.restart_node(1).await;
    // The client follows the node back (its slots, a new connection); until it
    // has, a decision is 503, never a wrong answer. The node comes back empty (no
    // persistence): its slots lost their epochs and refuse until a rebuild.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut rebuilt = false;
    for consent in &consents {
        loop {
            match gate.admit(&request(*consent, RequestedBy::Api)).await {
                Ok(decision) => {
                    let ticket = admitted(decision);
                    gate.release_lock(*consent, ticket.refresh_id)
                        .await
                        .unwrap();
                    break;
                }
                Err(GateError::Rebuilding) if !rebuilt => {
                    gate.rebuild(&[], gate.redis_now().await.unwrap())
                        .await
                        .unwrap();
                    rebuilt = true;
                }
                Err(GateError::Unavailable(_)) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!("{error:?}"),
            }
        }
    }
    assert!(
        rebuilt,
        "a node that came back empty must ask for a rebuild"
    );
}

#[tokio::test]
async fn the_gate_on_a_cluster_follows_a_failover_to_a_replica() {
    let mut app = Redis::Cluster.app(&[("stagger.limit", "600")]).await;
    let cluster = app.cluster.as_mut().unwrap();
    let replica = cluster.add_replica(0).await;
    let gate = gate(&app).await;
    // Locks held on every master, the failing one included.
    let mut held = Vec::new();
    for _ in 0..30 {
        let req = request(new_consent(), RequestedBy::Api);
        admitted(gate.admit(&req).await.unwrap());
        held.push(req);
    }
    // Replication is asynchronous: give it a moment before the master dies.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cluster = app.cluster.as_mut().unwrap();
    cluster.kill_node(0);
    cluster.wait_until_master(replica).await;
    // Each lock is still there after the failover: a second request is refused
    // 409 naming the holder; until the client has followed, it is 503, never an
    // admission.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for req in &held {
        let again = GateRequest {
            refresh_id: new_refresh(),
            ..req.clone()
        };
        loop {
            match gate.admit(&again).await {
                Ok(decision) => {
                    let problem = refused(decision);
                    assert_eq!(problem.code, ProblemCode::RefreshInProgress);
                    assert_eq!(problem.refresh_id, Some(req.refresh_id));
                    break;
                }
                Err(GateError::Unavailable(_)) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!("{error:?}"),
            }
        }
    }
}

async fn autosync_takes_at_most_its_share_and_an_on_demand_request_is_not_queued_behind_it(
    redis: Redis,
) {
    let app = redis
        .app(&[
            ("stagger.limit", "10"),
            ("stagger.period_secs", "10"),
            ("stagger.autosync_share", "0.5"),
        ])
        .await;
    let gate = gate(&app).await;
    let mut autosync = Vec::new();
    for _ in 0..40 {
        let ticket = admitted(
            gate.admit(&request(new_consent(), RequestedBy::Autosync))
                .await
                .unwrap(),
        );
        autosync.push(ticket.not_before.timestamp_millis());
    }
    let api = admitted(
        gate.admit(&request(new_consent(), RequestedBy::Api))
            .await
            .unwrap(),
    );
    let wait = (api.not_before - api.now).num_milliseconds();
    assert!(
        (0..=10_000).contains(&wait),
        "the API request starts within one period, not behind 40 auto-syncs: {wait} ms"
    );
    autosync.sort_unstable();
    // No period of 10 s holds more than 5 auto-sync slots...
    assert!(
        autosync.windows(6).all(|w| w[5] - w[0] >= 10_000),
        "{autosync:?}"
    );
    // ...and the auto-syncs use their share, not less: 40 slots in 80 s.
    assert!(autosync[39] - autosync[0] <= 80_000, "{autosync:?}");
    // No period holds more than the limit, counting both classes.
    let mut all = autosync.clone();
    all.push(api.not_before.timestamp_millis());
    all.sort_unstable();
    assert!(all.windows(2).all(|w| w[1] - w[0] >= 1_000), "{all:?}");

    // While on-demand requests use less than the rest, each starts about as early as
    // if no auto-sync were queued: a second and a third fit in the same period.
    for _ in 0..2 {
        let next = admitted(
            gate.admit(&request(new_consent(), RequestedBy::Portal))
                .await
                .unwrap(),
        );
        let wait = (next.not_before - next.now).num_milliseconds();
        assert!((0..=10_000).contains(&wait), "{wait} ms");
    }
}

on_both!(autosync_takes_at_most_its_share_and_an_on_demand_request_is_not_queued_behind_it);

async fn an_undone_autosync_slot_no_longer_keeps_others_away(redis: Redis) {
    let app = redis
        .app(&[
            ("stagger.limit", "10"),
            ("stagger.period_secs", "10"),
            ("stagger.autosync_share", "0.5"),
        ])
        .await;
    let gate = gate(&app).await;
    let first = admitted(
        gate.admit(&request(new_consent(), RequestedBy::Autosync))
            .await
            .unwrap(),
    );
    gate.undo(&first).await.unwrap();
    let again = admitted(
        gate.admit(&request(new_consent(), RequestedBy::Autosync))
            .await
            .unwrap(),
    );
    assert!(
        (again.not_before - first.not_before).num_milliseconds() < 1_000,
        "the undone slot is handed out again"
    );
    let mut redis = app.redis.clone();
    let slots: Vec<String> = redis
        .zrange(format!("{}:{{stagger:global}}:slots", app.namespace), 0, -1)
        .await
        .unwrap();
    assert_eq!(slots, vec![again.refresh_id.to_string()]);
}
on_both!(an_undone_autosync_slot_no_longer_keeps_others_away);

/// SPEC §2: Redis lost the gate's state (here: every key of the namespace deleted).
/// While another replica holds the rebuild lock every admission is 503
/// `unavailable`; then the state comes back from PostgreSQL: the consent that used
/// its 4 refreshes is still refused 429 with the same next time, the refresh in
/// flight still gives 409, and a new admission is staggered after the queued one.
async fn a_gate_that_lost_its_state_is_rebuilt_from_the_database(redis: Redis) {
    let app = redis.app(&[]).await;
    let api = app.start_ingress().await;
    let token = refresh_tests::dev_token(&app, Some("acme"), "api:stored_data");
    let path = |consent: ConsentId| format!("/v1/consents/{consent}/refresh");

    let used_up = api.seed_consent("acme", None, None).await;
    for _ in 0..4 {
        let id = api.refresh(&token, &used_up.to_string()).await;
        api.complete(used_up, &id).await;
    }
    let before = api.post(&path(used_up), &token, None).await;
    assert_eq!(before.status, 429, "{before:?}");
    let busy = api.seed_consent("acme", None, None).await;
    let queued = api.post(&path(busy), &token, None).await;
    assert_eq!(queued.status, 202, "{queued:?}");
    let fresh = api.seed_consent("acme", None, None).await;

    let removed = refresh_redis::delete_namespace(&app.redis, &app.namespace)
        .await
        .unwrap();
    assert!(removed > 0);
    let gate = &api.services.gate;
    assert!(
        gate.try_begin_rebuild("another replica", Duration::from_secs(60))
            .await
            .unwrap()
    );
    for consent in [used_up, busy, fresh] {
        let answer = api.post(&path(consent), &token, None).await;
        assert_eq!(answer.status, 503, "{answer:?}");
        assert_eq!(answer.body["code"], "unavailable");
        assert_eq!(
            answer.header("content-type"),
            Some("application/problem+json")
        );
    }
    assert!(matches!(
        gate.in_flight(busy).await,
        Err(GateError::Rebuilding)
    ));
    assert!(gate.end_rebuild("another replica").await.unwrap());

    // A read of the quota rebuilds too (as an admission would) and reads the rebuilt
    // state; a request waits 2 s for the rebuild, then is answered 503 while the
    // rebuild goes on (the cluster's 16 384 epoch keys take longer on a busy machine).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let view = loop {
        let view = api.get(&format!("/v1/consents/{used_up}"), &token).await;
        if view.status == 200 || std::time::Instant::now() > deadline {
            break view;
        }
        assert_eq!(view.status, 503, "{view:?}");
        assert_eq!(view.body["code"], "unavailable");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(view.status, 200, "{view:?}");
    assert_eq!(
        (&view.body["quota"]["limit"], &view.body["quota"]["used"]),
        (&4.into(), &4.into()),
        "{view:?}"
    );
    // The next request is decided on the rebuilt state.
    let after = api.post(&path(used_up), &token, None).await;
    assert_eq!(after.status, 429, "{after:?}");
    assert_eq!(after.body["code"], "daily_limit_reached");
    assert_eq!(
        after.body["nextRefreshPossibleAt"],
        before.body["nextRefreshPossibleAt"]
    );
    assert_eq!(
        (&after.body["limit"], &after.body["used"]),
        (&4.into(), &4.into())
    );
    let retry: u64 = after.header("retry-after").unwrap().parse().unwrap();
    let minutes = retry.div_ceil(60);
    assert_eq!(
        after.body["detail"],
        format!(
            "Daily limit of 4 requests/consent reached. Try again in {}h{:02}.",
            minutes / 60,
            minutes % 60
        )
    );
    let again = api.post(&path(busy), &token, None).await;
    assert_eq!(again.status, 409, "{again:?}");
    assert_eq!(again.body["code"], "refresh_in_progress");
    assert_eq!(again.body["refreshId"], queued.body["refreshId"]);
    assert_eq!(
        gate.in_flight(busy).await.unwrap().map(|id| id.to_string()),
        queued.body["refreshId"].as_str().map(str::to_owned)
    );
    // The stagger's chain came back: the new slot keeps period / limit after the queued one.
    let next = api.post(&path(fresh), &token, None).await;
    assert_eq!(next.status, 202, "{next:?}");
    let slot = |answer: &refresh_tests::Answer| {
        answer.body["notBefore"]
            .as_str()
            .unwrap()
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap()
    };
    let spacing = app.settings.stagger.spacing();
    assert!(
        slot(&next) >= slot(&queued) + spacing,
        "{} is not {spacing} after {}",
        slot(&next),
        slot(&queued)
    );
}

on_both!(a_gate_that_lost_its_state_is_rebuilt_from_the_database);

/// The workers' start log comes back with the rest of the state: a bank attempt begun
/// before Redis lost its keys still fills its period, so the bank never sees more than
/// `stagger.limit` starts in a period across the loss.
async fn a_rebuild_restores_the_workers_start_log(redis: Redis) {
    let app = redis
        .app(&[("stagger.limit", "1"), ("stagger.period_secs", "60")])
        .await;
    let api = app.start_ingress().await;
    let token = refresh_tests::dev_token(&app, Some("acme"), "api:stored_data");
    let consent = api.seed_consent("acme", None, None).await;
    let refresh: RefreshId = api
        .refresh(&token, &consent.to_string())
        .await
        .parse()
        .unwrap();
    let gate = &api.services.gate;
    // What a worker does before it calls the bank: take a start, then record it.
    let attempt = format!("{refresh}:0");
    let before = redis_ms(&app).await;
    assert_eq!(
        gate.take_start_slot("global", &attempt).await.unwrap(),
        StartDecision::Go
    );
    let started = api
        .services
        .store
        .start_attempt(refresh, 0, chrono::Utc::now(), Duration::from_secs(120))
        .await
        .unwrap();
    assert!(matches!(started, refresh_pg::AttemptStart::Started(_)));

    refresh_redis::delete_namespace(&app.redis, &app.namespace)
        .await
        .unwrap();
    let rebuild = refresh_admission::GateRebuild::new(api.services.store.clone(), gate.clone());
    let report = rebuild
        .rebuild_now()
        .await
        .unwrap()
        .expect("the rebuild lock");
    assert_eq!((report.locks, report.starts), (1, 1), "{report:?}");

    // The attempt is still the one start of its period...
    assert_eq!(
        gate.take_start_slot("global", &attempt).await.unwrap(),
        StartDecision::Go
    );
    // ...so another waits until it leaves the window.
    let StartDecision::WaitUntil(until) =
        gate.take_start_slot("global", "another:0").await.unwrap()
    else {
        panic!("a second start within the period after the rebuild");
    };
    let after = redis_ms(&app).await;
    let window = 60_000 + refresh_redis::START_MARGIN_MS;
    let until = until.timestamp_millis();
    assert!(
        (before + window - 1_000..=after + window + 1).contains(&until),
        "{before} {until} {after}"
    );
}

on_both!(a_rebuild_restores_the_workers_start_log);

/// A small deterministic generator (xorshift64*), so a failing case can be replayed
/// from its seed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Model-based: on random histories (admissions of up to 30 h ago written straight
/// into the quota sets, standing in for clock steps), random rules (both windows,
/// several time zones, one or two rules) and a held lock now and then, the `admit`
/// script decides exactly as `refresh_core::gate_model` says for the same instant;
/// and after an admission the next request is decided on the history plus it.
async fn the_admit_script_decides_as_the_pure_model(redis: Redis) {
    use refresh_core::gate_model::{ModelDecision, consent_decision};

    let app = redis.app(&[]).await;
    let zones: [chrono_tz::Tz; 4] = [
        chrono_tz::UTC,
        "Europe/London".parse().unwrap(),
        "America/New_York".parse().unwrap(),
        "Asia/Kolkata".parse().unwrap(),
    ];
    let seed = 0x5EED_0000_0000_0001_u64;
    let mut random = Random(seed);
    let mut conn = app.redis.clone();
    let mut seen = std::collections::BTreeMap::<&str, u32>::new();
    gate(&app).await;
    for case in 0..120 {
        let tz = zones[random.below(4) as usize];
        let window = |r: &mut Random| {
            if r.below(2) == 0 {
                QuotaWindow::Rolling24h
            } else {
                QuotaWindow::CalendarDay
            }
        };
        let mut rules = vec![QuotaRule {
            sources: vec![RequestedBy::Api],
            limit: 1 + random.below(4) as u32,
            window: window(&mut random),
        }];
        if random.below(3) == 0 {
            rules.push(QuotaRule {
                sources: vec![RequestedBy::Api],
                limit: 1 + random.below(4) as u32,
                window: window(&mut random),
            });
        }
        let mut config = config(&app);
        config.rules = rules.clone();
        config.time_zone = tz;
        // The namespace's epochs are written once, before the loop.
        let gate = Gate::new(app.redis.clone(), config);
        let consent = new_consent();

        // The history: each rule's set gets its own admissions (as after a rule change).
        let now = redis_ms(&app).await;
        let mut history: Vec<Vec<i64>> = Vec::new();
        for index in 0..rules.len() {
            let key = format!("{}:{{c:{consent}}}:q:{index}", app.namespace);
            let mut times = Vec::new();
            for _ in 0..random.below(7) {
                // Up to 30 h ago, at least 200 ms ago, never near the 24 h edge.
                let mut age = 200 + random.below(30 * 3_600_000) as i64;
                if (age - ROLLING_WINDOW.num_milliseconds()).abs() < 5_000 {
                    age += 10_000;
                }
                let at = now - age;
                let _: () = conn
                    .zadd(&key, new_refresh().to_string(), at)
                    .await
                    .unwrap();
                times.push(at);
            }
            history.push(times);
        }
        let lock = (random.below(5) == 0).then(new_refresh);
        if let Some(holder) = lock {
            let _: () = conn
                .set(
                    format!("{}:{{c:{consent}}}:lock", app.namespace),
                    holder.to_string(),
                )
                .await
                .unwrap();
        }

        for step in 0..2 {
            let model_at = |ms: i64, history: &[Vec<i64>], lock: Option<RefreshId>| {
                let at = reply_instant(ms);
                let times: Vec<Vec<chrono::DateTime<chrono::Utc>>> = history
                    .iter()
                    .map(|t| t.iter().map(|ms| reply_instant(*ms)).collect())
                    .collect();
                let pairs: Vec<(&QuotaRule, &[chrono::DateTime<chrono::Utc>])> = rules
                    .iter()
                    .zip(&times)
                    .map(|(r, t)| (r, t.as_slice()))
                    .collect();
                consent_decision(lock, &pairs, at, tz)
            };
            let before = redis_ms(&app).await;
            let req = request(consent, RequestedBy::Api);
            let decision = gate.admit(&req).await.unwrap();
            let after = redis_ms(&app).await;
            let expected = [
                model_at(before, &history, lock),
                model_at(after, &history, lock),
            ];
            let context = format!(
                "seed {seed:#x} case {case} step {step}: {rules:?} in {tz}, history {history:?}, lock {lock:?}"
            );
            match decision {
                GateDecision::Admitted(ticket) => {
                    let now = ticket.now.timestamp_millis();
                    assert_eq!(
                        model_at(now, &history, lock),
                        ModelDecision::Admitted,
                        "{context}"
                    );
                    *seen.entry("admitted").or_default() += 1;
                    assert!(gate.release_lock(consent, req.refresh_id).await.unwrap());
                    for times in &mut history {
                        times.push(now);
                    }
                }
                GateDecision::Refused(problem)
                    if problem.code == ProblemCode::RefreshInProgress =>
                {
                    assert!(
                        expected.contains(&ModelDecision::Locked(lock.unwrap())),
                        "{context}: {problem:?}"
                    );
                    assert_eq!(problem.refresh_id, lock, "{context}");
                    *seen.entry("locked").or_default() += 1;
                    break;
                }
                GateDecision::LookUp => panic!("{context}: a lookup with the facts given"),
                GateDecision::Refused(problem) => {
                    assert_eq!(problem.code, ProblemCode::DailyLimitReached, "{context}");
                    let matches = expected.iter().any(|m| match m {
                        ModelDecision::OverQuota { rule, used, next } => {
                            problem.limit == Some(rules[*rule].limit)
                                && problem.used == Some(*used)
                                && problem.window == Some(rules[*rule].window)
                                && problem.next_refresh_possible_at == Some(*next)
                        }
                        _ => false,
                    });
                    assert!(matches, "{context}: got {problem:?}, model {expected:?}");
                    *seen.entry("over_quota").or_default() += 1;
                    break;
                }
            }
        }
    }
    // The cases reached every kind of decision.
    for kind in ["admitted", "locked", "over_quota"] {
        assert!(seen.get(kind).copied().unwrap_or(0) >= 5, "{seen:?}");
    }
}

fn reply_instant(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap()
}

on_both!(the_admit_script_decides_as_the_pure_model);

/// Moves a stagger bucket's state `by` ms into the past, which to its scripts is the
/// clock stepping `by` forward (they only compare stored slots with Redis time).
/// Expiry is kept: a key then lives longer than it needs, which never changes a
/// decision (see `refresh_core::stagger_model`).
async fn step_bucket(app: &TestApp, bucket: &str, by: i64) {
    let mut conn = app.redis.clone();
    let base = format!("{}:{{stagger:{bucket}}}", app.namespace);
    let slots_key = format!("{base}:slots");
    let slots: Vec<(String, i64)> = conn.zrange_withscores(&slots_key, 0, -1).await.unwrap();
    for (member, score) in slots {
        let _: () = conn.zadd(&slots_key, member, score - by).await.unwrap();
    }
    for chain in [base.clone(), format!("{base}:autosync")] {
        let value: Option<String> = conn.get(&chain).await.unwrap();
        if let Some(value) = value {
            let (ms, owner) = value.split_once(':').unwrap();
            let ms: i64 = ms.parse().unwrap();
            let _: () = redis::cmd("SET")
                .arg(&chain)
                .arg(format!("{}:{owner}", ms - by))
                .arg("KEEPTTL")
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
}

/// Model-based: on random stagger settings (limit, period, horizon, auto-sync share)
/// and random sequences of requests (`APP`, `API`, `AUTOSYNC`) with clock steps
/// between them (the bucket's state moved into the past), the `take_slot` script hands
/// out exactly the slots (or the `backlog_full` waits) of
/// `refresh_core::stagger_model::StaggerModel` for the same instant.
async fn the_take_slot_script_decides_as_the_pure_model(redis: Redis) {
    use refresh_core::StaggerSettings;
    use refresh_core::stagger_model::{SlotClass, SlotDecision, StaggerModel};

    let app = redis.app(&[]).await;
    gate(&app).await;
    let seed = 0x5EED_0000_0000_0002_u64;
    let mut random = Random(seed);
    let mut seen = std::collections::BTreeMap::<&str, u32>::new();
    let shares = [0.5, 0.3, 0.75, 1.0];
    for case in 0..30 {
        let stagger = StaggerSettings {
            limit: 2 + random.below(7) as u32,
            period_secs: 1 + random.below(4),
            max_delay_secs: random.below(12),
            scope: refresh_core::StaggerScope::Tenant,
            autosync_share: shares[random.below(4) as usize],
        };
        let mut config = config(&app);
        config.stagger = stagger.clone();
        let gate = Gate::new(app.redis.clone(), config);
        // A bucket of its own per case.
        let tenant = TenantId::parse(&format!("model{case}")).unwrap();
        let bucket = stagger
            .scope
            .bucket(&tenant, &ProviderId::parse("sim").unwrap());
        let mut model = StaggerModel::new(&stagger);
        let period_ms = stagger.period_secs as i64 * 1000;
        // Model time = Redis time + offset (the clock steps made so far).
        let mut offset = 0_i64;
        for step in 0..30 {
            if random.below(3) == 0 {
                let by = match random.below(3) {
                    0 => random.below(50) as i64,
                    1 => random.below(2_000) as i64,
                    _ => random.below(2 * period_ms as u64) as i64,
                };
                step_bucket(&app, &bucket, by).await;
                offset += by;
                *seen.entry("step").or_default() += 1;
            }
            let source = [RequestedBy::App, RequestedBy::Api, RequestedBy::Autosync]
                [random.below(3) as usize];
            let class = if source == RequestedBy::Autosync {
                SlotClass::Autosync
            } else {
                SlotClass::OnDemand
            };
            let req = GateRequest {
                tenant_id: tenant.clone(),
                facts: Some(active_facts(tenant.as_str())),
                ..request(new_consent(), source)
            };
            let before = redis_ms(&app).await;
            let decision = gate.admit(&req).await.unwrap();
            let after = redis_ms(&app).await;
            let context = format!(
                "seed {seed:#x} case {case} step {step}: {stagger:?}, {source:?} between {before} and {after} (offset {offset}), model {model:?}"
            );
            // The script ran at some instant in [before, after]: the model must agree
            // at one of them, and goes on from there.
            let agrees = |expected: &dyn Fn(SlotDecision) -> bool| {
                (before..=after).find_map(|t| {
                    let mut m = model.clone();
                    let d = m.take(class, t + offset);
                    expected(d).then_some(m)
                })
            };
            match decision {
                GateDecision::Admitted(ticket) => {
                    let slot = ticket.not_before.timestamp_millis() + offset;
                    model = agrees(&|d| d == SlotDecision::Slot(slot))
                        .unwrap_or_else(|| panic!("{context}: script slot {slot}"));
                    *seen
                        .entry(if class == SlotClass::Autosync {
                            "autosync"
                        } else {
                            "on_demand"
                        })
                        .or_default() += 1;
                }
                GateDecision::LookUp => panic!("{context}: a lookup with the facts given"),
                GateDecision::Refused(problem) => {
                    assert_eq!(problem.code, ProblemCode::BacklogFull, "{context}");
                    let seconds = problem.retry_after_seconds.unwrap();
                    model = agrees(&|d| match d {
                        SlotDecision::Full { over_ms } => {
                            (over_ms as u64).div_ceil(1000).max(1) == seconds
                        }
                        SlotDecision::Slot(_) => false,
                    })
                    .unwrap_or_else(|| panic!("{context}: script full, retry after {seconds} s"));
                    *seen.entry("full").or_default() += 1;
                }
            }
        }
    }
    for kind in ["autosync", "on_demand", "full", "step"] {
        assert!(seen.get(kind).copied().unwrap_or(0) >= 10, "{seen:?}");
    }
}

on_both!(the_take_slot_script_decides_as_the_pure_model);

on_both!(a_refresh_admitted_to_a_later_start_keeps_its_lock_until_then);
/// A refresh whose start slot lies beyond its lease (the stagger queued it) holds the
/// consent's lock until that start and a full lease after it, so no second refresh of
/// the consent is admitted while the first waits.
async fn a_refresh_admitted_to_a_later_start_keeps_its_lock_until_then(redis: Redis) {
    let app = redis
        .app(&[
            ("stagger.limit", "1"),
            ("stagger.period_secs", "60"),
            ("stagger.max_delay_secs", "600"),
            ("lock.lease_secs", "5"),
        ])
        .await;
    let gate = gate(&app).await;
    let mut redis = app.redis.clone();
    // The first takes the bucket's next slot (now), the second one 60 s later.
    admitted(
        gate.admit(&request(new_consent(), RequestedBy::Api))
            .await
            .unwrap(),
    );
    let consent = new_consent();
    let queued = request(consent, RequestedBy::Api);
    let ticket = admitted(gate.admit(&queued).await.unwrap());
    let wait = (ticket.not_before - ticket.now).num_milliseconds();
    assert!((59_000..=60_000).contains(&wait), "{wait} ms");

    let lock = format!("{}:{{c:{consent}}}:lock", app.namespace);
    let pttl: i64 = redis.pttl(&lock).await.unwrap();
    assert!(
        (wait + 4_000..=wait + 5_000).contains(&pttl),
        "the lock lasts the wait plus a lease: {pttl} ms for a {wait} ms wait"
    );
    let again = refused(
        gate.admit(&request(consent, RequestedBy::Api))
            .await
            .unwrap(),
    );
    assert_eq!(again.refresh_id, Some(queued.refresh_id));
}

/// The record and event of an admission `ticket` decided, as the admission writes them.
fn admission_rows(ticket: &Ticket, consent: ConsentId) -> AdmissionRows {
    AdmissionRows::new(
        ticket.refresh_id,
        consent,
        ticket.now,
        ticket.not_before,
        None,
    )
}

/// SPEC §2 across a Redis loss: an admission past the gate when Redis lost its keys
/// is either counted by the rebuild or refused. One still writing its record holds
/// the rebuild back until it commits, and is then counted (the consent's fifth request
/// is refused 429, not admitted); one that writes its record after a rebuild began is
/// refused (`StaleGate`, the caller answers 503 and undoes the gate).
#[tokio::test]
async fn an_admission_past_the_gate_when_redis_loses_its_state_is_counted_or_refused() {
    let app = Redis::Standalone.app(&[]).await;
    let api = app.start_ingress().await;
    let token = refresh_tests::dev_token(&app, Some("acme"), "api:stored_data");
    let consent = api.seed_consent("acme", None, None).await;
    for _ in 0..3 {
        let id = api.refresh(&token, &consent.to_string()).await;
        api.complete(consent, &id).await;
    }
    let (gate, store) = (&api.services.gate, &api.services.store);
    let rebuild = refresh_admission::GateRebuild::new(store.clone(), gate.clone());

    // The fourth, past the gate and writing its record when the keys go.
    let fourth = admitted(
        gate.admit(&request(consent, RequestedBy::Api))
            .await
            .unwrap(),
    );
    let rows = admission_rows(&fourth, consent);
    let mut pending = app.pg.begin().await.unwrap();
    refresh_pg::write_admission(&mut *pending, &rows.admission(fourth.epoch))
        .await
        .unwrap();
    refresh_redis::delete_namespace(&app.redis, &app.namespace)
        .await
        .unwrap();
    let running = {
        let rebuild = rebuild.clone();
        tokio::spawn(async move { rebuild.rebuild_now().await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !running.is_finished(),
        "the rebuild waits for the admission writing its record"
    );
    pending.commit().await.unwrap();
    let report = running.await.unwrap().unwrap().expect("the rebuild lock");
    assert_eq!(report.locks, 1, "the fourth is in flight: {report:?}");
    api.complete(consent, &fourth.refresh_id.to_string()).await;
    let fifth = api
        .post(&format!("/v1/consents/{consent}/refresh"), &token, None)
        .await;
    assert_eq!(fifth.status, 429, "{fifth:?}");
    assert_eq!(fifth.body["code"], "daily_limit_reached");

    // Another consent's admission decided on the state that is lost next.
    let other = api.seed_consent("acme", None, None).await;
    let late = admitted(gate.admit(&request(other, RequestedBy::Api)).await.unwrap());
    refresh_redis::delete_namespace(&app.redis, &app.namespace)
        .await
        .unwrap();
    rebuild
        .rebuild_now()
        .await
        .unwrap()
        .expect("the rebuild lock");
    let rows = admission_rows(&late, other);
    let stale = store.admit(&rows.admission(late.epoch)).await;
    assert!(
        matches!(stale, Err(refresh_pg::StoreError::StaleGate)),
        "{:?}",
        stale.err()
    );
    assert!(store.refresh(late.refresh_id).await.unwrap().is_none());
}

/// Two rebuilds that overlap (the rebuild lock lapsed, or went with the rest of the
/// keys) leave the later stamp on every epoch key, whichever finishes last; and a
/// state older than the latest rebuild begun (one that stamped `gate_epoch`, then
/// died) is rebuilt by the first admission it refuses. Either way admissions are
/// refused once at most, never for good (the fault suite's Redis-loss stream saw
/// every upstream request refused as stale for minutes before this).
#[tokio::test]
async fn overlapping_or_unfinished_rebuilds_never_leave_admissions_stale() {
    let app = Redis::Standalone.app(&[]).await;
    let api = app.start_ingress().await;
    let token = refresh_tests::dev_token(&app, Some("acme"), "api:stored_data");
    let (gate, store) = (&api.services.gate, &api.services.store);
    let path = |consent: ConsentId| format!("/v1/consents/{consent}/refresh");

    // The later rebuild finishes first, the earlier one last.
    let earlier = store
        .begin_gate_rebuild(gate.redis_now().await.unwrap())
        .await
        .unwrap();
    let later = store.begin_gate_rebuild(earlier).await.unwrap();
    assert_eq!(later, earlier + 1, "a stamp is never reused");
    gate.rebuild(&[], later).await.unwrap();
    gate.rebuild(&[], earlier).await.unwrap();
    let consent = api.seed_consent("acme", None, None).await;
    let admitted = api.post(&path(consent), &token, None).await;
    assert_eq!(admitted.status, 202, "{admitted:?}");

    // A rebuild stamped the database and died before it wrote the state (its Redis
    // clock ahead of this one's, even).
    store
        .begin_gate_rebuild(gate.redis_now().await.unwrap() + 60_000)
        .await
        .unwrap();
    let other = api.seed_consent("acme", None, None).await;
    let refused = api.post(&path(other), &token, None).await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(
        refused.body["detail"],
        "A required service is unavailable; nothing was admitted"
    );
    let again = api.post(&path(other), &token, None).await;
    assert_eq!(again.status, 202, "{again:?}");
}
