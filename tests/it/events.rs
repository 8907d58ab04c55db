//! `GET /v1/events` through the real stack: the relay publishes, the ingress's fan-out
//! consumes, each SSE stream sees its tenant's events in order, and `Last-Event-ID`
//! resumes from the outbox without loss or duplicates.

use std::time::Duration;

use chrono::Utc;
use refresh_core::{CloudEvent, EventId, RefreshRecord, RefreshSummary};
use refresh_tests::{Api, dev_token, spawn_app};
use serde_json::Value;

const STORED: &str = "api:stored_data";

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
struct Sse {
    id: String,
    event: String,
    data: Value,
}

/// An open `GET /v1/events` stream.
struct Stream {
    response: reqwest::Response,
    buffer: String,
}

impl Stream {
    async fn open(api: &Api, token: &str, query: &str, last: Option<&str>) -> Self {
        let mut request = api
            .client
            .get(format!("{}/v1/events{query}", api.base))
            .bearer_auth(token);
        if let Some(last) = last {
            request = request.header("last-event-id", last);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("text/event-stream")
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event (keep-alive comments skipped), or `None` after `wait`.
    async fn next(&mut self, wait: Duration) -> Option<Sse> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if let (Some(id), Some(event)) = (id, event) {
                    return Some(Sse {
                        id,
                        event,
                        data: serde_json::from_str(&data).unwrap(),
                    });
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .ok()?
                .unwrap()?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

/// What the worker's finishing transaction writes: the record UPDATED and its event
/// in the outbox (the relay publishes it).
async fn finish_updated(api: &Api, refresh_id: &str) -> RefreshRecord {
    let id = refresh_id.parse().unwrap();
    let mut record = api.services.store.refresh(id).await.unwrap().unwrap();
    let now = Utc::now();
    record.started_at = Some(now);
    record
        .finish_updated(RefreshSummary::default(), now)
        .unwrap();
    api.complete(record.consent_id, refresh_id).await;
    let event = CloudEvent::refresh(&record, EventId::from_uuid(uuid::Uuid::now_v7()), now);
    api.services
        .store
        .insert_event(
            &refresh_pg::OutboxEvent {
                event_id: event.id,
                routing_key: event.routing_key(),
                payload: serde_json::to_value(&event).unwrap(),
            },
            now,
        )
        .await
        .unwrap();
    record
}

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_tenant_sees_its_own_events_in_order_and_resumes_without_loss_or_duplicates() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let acme = dev_token(&app, Some("acme"), STORED);
    let other = dev_token(&app, Some("other"), STORED);
    let mine = api.seed_consent("acme", None, None).await;
    let theirs = api.seed_consent("other", None, None).await;
    let mut stream = Stream::open(&api, &acme, "", None).await;
    let mut filtered = Stream::open(&api, &acme, &format!("?consentId={mine}"), None).await;

    api.refresh(&other, &theirs.to_string()).await;
    let first = api.refresh(&acme, &mine.to_string()).await;
    let initialized = stream.next(WAIT).await.expect("refresh.initialized");
    assert_eq!(initialized.event, "io.refreshd.refresh.initialized");
    assert_eq!(initialized.data["id"], initialized.id.as_str());
    assert_eq!(initialized.data["subject"], mine.to_string());
    assert_eq!(initialized.data["data"]["refreshId"], first.as_str());
    assert_eq!(initialized.data["data"]["tenantId"], "acme");
    finish_updated(&api, &first).await;
    let updated = stream.next(WAIT).await.expect("refresh.updated");
    assert_eq!(updated.event, "io.refreshd.refresh.updated");
    assert_eq!(updated.data["data"]["refreshId"], first.as_str());
    assert_eq!(updated.data["data"]["status"], "UPDATED");
    assert_eq!(
        filtered.next(WAIT).await.map(|e| e.id),
        Some(initialized.id.clone())
    );
    assert_eq!(
        filtered.next(WAIT).await.map(|e| e.id),
        Some(updated.id.clone())
    );
    // Nothing of the other tenant came, nor anything else.
    assert_eq!(stream.next(Duration::from_secs(1)).await, None);

    // Disconnected after `initialized`: the events since then, once, then live ones.
    drop(stream);
    let second = api.refresh(&acme, &mine.to_string()).await;
    let mut resumed = Stream::open(&api, &acme, "", Some(&initialized.id)).await;
    let again = resumed.next(WAIT).await.expect("the missed updated event");
    assert_eq!(again, updated);
    let next = resumed.next(WAIT).await.expect("the second refresh");
    assert_eq!(next.event, "io.refreshd.refresh.initialized");
    assert_eq!(next.data["data"]["refreshId"], second.as_str());
    finish_updated(&api, &second).await;
    let live = resumed
        .next(WAIT)
        .await
        .expect("a live event after the replay");
    assert_eq!(live.event, "io.refreshd.refresh.updated");
    assert_eq!(live.data["data"]["refreshId"], second.as_str());
    assert_eq!(
        resumed.next(Duration::from_secs(1)).await,
        None,
        "no duplicates"
    );

    // The other tenant's stream saw only its own.
    let mut theirs_stream = Stream::open(&api, &other, "", Some(&initialized.id)).await;
    let only = theirs_stream.next(WAIT).await;
    assert_eq!(only, None, "events after acme's first are all acme's");
}

/// Consent lifecycle events (`consent.{status}.{tenantId}`) reach the tenant's streams
/// like refresh events, whoever writes them to the outbox.
#[tokio::test]
async fn consent_events_are_streamed_to_their_tenant_only() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let acme = dev_token(&app, Some("acme"), STORED);
    let other = dev_token(&app, Some("other"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let mut mine = Stream::open(&api, &acme, "", None).await;
    let mut theirs = Stream::open(&api, &other, "", None).await;
    let view = api
        .get(&format!("/v1/consents/{consent}"), &acme)
        .await
        .body;
    let id = uuid::Uuid::now_v7();
    let payload = serde_json::json!({
        "specversion": "1.0", "id": id, "source": "refreshd",
        "type": "io.refreshd.consent.revoked", "subject": consent.to_string(),
        "time": "2026-12-01T10:00:00.000Z", "datacontenttype": "application/json",
        "data": view,
    });
    api.services
        .store
        .insert_event(
            &refresh_pg::OutboxEvent {
                event_id: EventId::from_uuid(id),
                routing_key: "consent.revoked.acme".to_owned(),
                payload: payload.clone(),
            },
            Utc::now(),
        )
        .await
        .unwrap();
    let got = mine.next(WAIT).await.expect("the consent event");
    assert_eq!(
        (got.id.as_str(), got.event.as_str(), &got.data),
        (
            id.to_string().as_str(),
            "io.refreshd.consent.revoked",
            &payload
        )
    );
    assert_eq!(theirs.next(Duration::from_secs(1)).await, None);
}

#[tokio::test]
async fn events_refuse_a_malformed_resume_point_and_another_tenants_consent() {
    let app = spawn_app().await;
    let api = app.start_ingress().await;
    let acme = dev_token(&app, Some("acme"), STORED);
    let theirs = api.seed_consent("other", None, None).await;
    let bad = api
        .call(
            reqwest::Method::GET,
            "/v1/events",
            Some(&acme),
            None,
            &[("last-event-id", "nope")],
        )
        .await;
    assert_eq!(bad.status, 400);
    assert_eq!(
        bad.body["detail"],
        "Last-Event-ID must be the id of an event of this stream (a UUID)"
    );
    let hidden = api
        .get(&format!("/v1/events?consentId={theirs}"), &acme)
        .await;
    assert_eq!(hidden.status, 404);
    assert_eq!(hidden.body["code"], "consent_not_found");
    let anonymous = api
        .call(reqwest::Method::GET, "/v1/events", None, None, &[])
        .await;
    assert_eq!(anonymous.status, 401);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A real `refreshd ingress` process: 200 idle SSE clients cost it little memory, and
/// SIGTERM ends their streams instead of waiting for them.
#[tokio::test]
async fn two_hundred_idle_streams_are_cheap_and_end_on_shutdown() {
    let app = spawn_app().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = std::process::Command::new(refresh_tests::refreshd_binary());
    command.arg("ingress");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("REFRESHD") {
            command.env_remove(key);
        }
    }
    let mut child = command
        .env("REFRESHD_ENV", "dev")
        .env(
            "REFRESHD_CONFIG_DIR",
            refresh_tests::repo_root().join("config"),
        )
        .env("RUST_LOG", "warn")
        // One malloc arena: what is measured is what the streams hold, not how many
        // per-thread arenas glibc happened to open while they were set up.
        .env("MALLOC_ARENA_MAX", "1")
        .env("REFRESHD__NAMESPACE", &app.namespace)
        .env("REFRESHD__HTTP__BIND", format!("127.0.0.1:{port}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "the ingress process became ready");
    // The first stream allocates what every stream shares.
    let warm = client
        .get(format!("{base}/v1/events"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // What 200 HTTP connections cost by themselves (hyper's buffers; the allocator
    // keeps the pages after they close) is paid first, so what is measured below is
    // what the streams add: their subscriptions and stream state.
    let mut plain = Vec::new();
    for _ in 0..200 {
        use tokio::io::AsyncWriteExt as _;
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nhost: refreshd\r\n\r\n")
            .await
            .unwrap();
        plain.push(c);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(plain);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(child.id());
    let mut streams = Vec::new();
    for _ in 0..200 {
        let stream = client
            .get(format!("{base}/v1/events"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(stream.status(), 200);
        streams.push(stream);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(child.id());
    let grown = after.saturating_sub(before);
    eprintln!("ingress RSS {before} KiB → {after} KiB with 200 idle streams");
    // About 2.6 MiB (13 KiB a stream, in the debug build the tests run).
    assert!(
        grown < 4 * 1024,
        "200 idle streams grew the RSS by {grown} KiB"
    );

    // SIGTERM with 201 streams open: they end, and the process exits promptly.
    let started = std::time::Instant::now();
    let killed = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    let mut status = None;
    for _ in 0..100 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = status.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("the ingress did not exit within 10 s of SIGTERM with streams open")
    });
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(streams);
    drop(warm);
}
