//! W3C trace context through a whole refresh (SPEC §5), with a real `refreshd worker`
//! process logging JSON at info: the trace a request arrives with (HTTP header or
//! AMQP header), or a new one, is the one the bank receives (`traceparent`, and the
//! trace id as `x-fapi-interaction-id` or, for Berlin Group, `X-Request-ID`), the one on the worker's log lines about the
//! refresh (`trace_id`) and the one on its INITIALIZED and UPDATED events
//! (`traceparent` extension attribute).

use std::time::Duration;

use refresh_core::TraceContext;
use refresh_tests::{Api, Bank, TestApp, WorkerProcess, app_with_bank, dev_token};
use serde_json::{Value, json};

const STORED: &str = "api:stored_data";

/// An app with the simulator, its ingress, and one worker process logging JSON at
/// info (and the bank connector's per-call lines at debug).
async fn traced() -> (TestApp, Api, Bank, WorkerProcess) {
    let (app, api, bank) = app_with_bank(&[]).await;
    let worker = WorkerProcess::spawn_logged(
        &app,
        "worker",
        &[("log.format", "json")],
        "info,refresh_bank=debug",
    );
    (app, api, bank, worker)
}

/// The `traceparent` of the INITIALIZED and UPDATED events of `refresh_id`, in that
/// order, from a probe queue bound before the request.
async fn event_traces(
    events: &mut refresh_amqp::Consumer,
    refresh_id: &str,
    worker: &mut WorkerProcess,
) -> Vec<(String, Value)> {
    let mut seen = Vec::new();
    while seen.len() < 2 {
        worker.assert_running();
        let delivery = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await
            .unwrap_or_else(|_| panic!("no events for {refresh_id}; worker log:\n{}", worker.log()))
            .unwrap();
        let event: Value = serde_json::from_slice(&delivery.body).unwrap();
        delivery.settle(refresh_core::Outcome::Ack).await.unwrap();
        if event["data"]["refreshId"] == refresh_id {
            seen.push((
                event["type"].as_str().unwrap().to_owned(),
                event["traceparent"].clone(),
            ));
        }
    }
    seen
}

/// Checks that everything about `refresh_id` carries `trace`: both events, every
/// bank call of `key`, and the worker's log lines about the refresh.
async fn assert_lines_up(
    bank: &Bank,
    key: &str,
    worker: &mut WorkerProcess,
    refresh_id: &str,
    events: Vec<(String, Value)>,
    trace: &TraceContext,
) {
    // The events carry the refresh's context itself.
    assert_eq!(
        events,
        vec![
            (
                "io.refreshd.refresh.initialized".to_owned(),
                json!(trace.to_string())
            ),
            (
                "io.refreshd.refresh.updated".to_owned(),
                json!(trace.to_string())
            ),
        ]
    );
    // Each bank call: a child of the refresh's context (same trace, its own span id),
    // and the trace id as the interaction id.
    let calls = bank.calls(key).await;
    assert!(calls.len() >= 3, "{calls:?}");
    let mut spans = std::collections::BTreeSet::new();
    for call in &calls {
        let sent: TraceContext = call["traceparent"]
            .as_str()
            .unwrap_or_else(|| panic!("a call without traceparent: {call}"))
            .parse()
            .unwrap();
        assert_eq!(sent.trace_id(), trace.trace_id(), "{call}");
        assert_ne!(sent.parent_id(), trace.parent_id(), "{call}");
        assert_eq!(sent.flags(), trace.flags(), "{call}");
        spans.insert(sent.parent_id());
        assert_eq!(
            call["requestId"],
            trace.trace_uuid().to_string(),
            "the interaction id is the trace id: {call}"
        );
    }
    assert_eq!(spans.len(), calls.len(), "one span id per call: {calls:?}");
    // The worker's lines about the refresh: every one names the trace, among them the
    // line that ends it and the bank calls (whose interaction id is the trace's).
    let lines: Vec<Value> = worker
        .log_lines()
        .into_iter()
        .filter(|line| {
            line["spans"]
                .as_array()
                .is_some_and(|spans| spans.iter().any(|s| s["refresh_id"] == refresh_id))
        })
        .collect();
    assert!(
        lines.iter().any(|l| l["message"] == "refresh UPDATED"),
        "{}",
        worker.log()
    );
    let bank_lines: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"] == "bank call")
        .collect();
    assert_eq!(bank_lines.len(), calls.len(), "{}", worker.log());
    for line in &bank_lines {
        // OBIE names it `interaction_id`, Berlin Group `request_id`.
        let id = if line["interaction_id"].is_null() {
            &line["request_id"]
        } else {
            &line["interaction_id"]
        };
        assert_eq!(id, &json!(trace.trace_uuid().to_string()), "{line}");
    }
    for line in &lines {
        let span = line["spans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "refresh")
            .unwrap_or_else(|| panic!("{line}"));
        assert_eq!(span["refresh_id"], refresh_id, "{line}");
        assert_eq!(span["trace_id"], trace.trace_id(), "{line}");
    }
    // No line names this refresh outside its span.
    for line in worker.log_lines() {
        if line["refresh_id"] == refresh_id {
            assert!(line["spans"].is_array(), "{line}");
        }
    }
}

#[tokio::test]
async fn an_http_traceparent_reaches_the_bank_the_logs_and_the_events() {
    let (app, api, bank, mut worker) = traced().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let consent = api.seed_consent("acme", None, None).await;
    let key = format!("token-{consent}");
    let broker = &api.services.broker;
    let probe = broker.declare_probe_queue("refresh.*.acme").await.unwrap();
    let mut events = broker.consume(&probe, 10);

    let sent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let answer = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/consents/{consent}/refresh"),
            Some(&token),
            None,
            &[("traceparent", sent)],
        )
        .await;
    assert_eq!(answer.status, 202, "{answer:?}");
    let refresh_id = answer.body["refreshId"].as_str().unwrap().to_owned();
    let seen = event_traces(&mut events, &refresh_id, &mut worker).await;
    assert_eq!(
        api.wait_terminal(&token, &refresh_id).await["status"],
        "UPDATED"
    );
    let trace: TraceContext = sent.parse().unwrap();
    assert_lines_up(&bank, &key, &mut worker, &refresh_id, seen, &trace).await;
}

#[tokio::test]
async fn an_amqp_traceparent_header_reaches_the_bank_the_logs_and_the_events() {
    let (_app, api, bank, mut worker) = traced().await;
    let consent = api.seed_consent("acme", None, None).await;
    let key = format!("token-{consent}");
    let broker = &api.services.broker;
    let probe = broker.declare_probe_queue("refresh.*.acme").await.unwrap();
    let mut events = broker.consume(&probe, 10);
    let reply_queue = broker.declare_reply_queue().await.unwrap();
    let mut replies = broker.consume(&reply_queue, 1);

    let sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let body =
        json!({ "consentId": consent, "tenantId": "acme", "requestedBy": "APP" }).to_string();
    broker
        .publish_request_with(
            body.as_bytes(),
            Some("traced-1"),
            Some(&reply_queue),
            Some("c-1"),
            &[("traceparent", sent)],
        )
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .unwrap()
        .unwrap();
    let reply: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(reply["accepted"], true, "{reply}");
    let refresh_id = reply["refreshId"].as_str().unwrap().to_owned();
    let seen = event_traces(&mut events, &refresh_id, &mut worker).await;
    let trace: TraceContext = sent.parse().unwrap();
    assert_lines_up(&bank, &key, &mut worker, &refresh_id, seen, &trace).await;
}

#[tokio::test]
async fn without_a_valid_traceparent_a_new_trace_still_lines_up() {
    let (app, api, bank, mut worker) = traced().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let broker = &api.services.broker;
    let probe = broker.declare_probe_queue("refresh.*.acme").await.unwrap();
    let mut events = broker.consume(&probe, 10);

    // None at all, then a malformed one (never a 400): each gets a trace of its own.
    let mut traces = Vec::new();
    for header in [
        None,
        Some("00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01"),
    ] {
        let consent = api.seed_consent("acme", None, None).await;
        let key = format!("token-{consent}");
        let headers: Vec<(&str, &str)> = header.iter().map(|h| ("traceparent", *h)).collect();
        let answer = api
            .call(
                reqwest::Method::POST,
                &format!("/v1/consents/{consent}/refresh"),
                Some(&token),
                None,
                &headers,
            )
            .await;
        assert_eq!(answer.status, 202, "{answer:?}");
        let refresh_id = answer.body["refreshId"].as_str().unwrap().to_owned();
        let seen = event_traces(&mut events, &refresh_id, &mut worker).await;
        let trace: TraceContext = seen[0]
            .1
            .as_str()
            .unwrap_or_else(|| panic!("the INITIALIZED event has no traceparent: {seen:?}"))
            .parse()
            .unwrap();
        assert_ne!(trace.trace_id(), "0af7651916cd43dd8448eb211c80319c");
        assert_lines_up(&bank, &key, &mut worker, &refresh_id, seen, &trace).await;
        traces.push(trace.trace_id());
    }
    assert_ne!(traces[0], traces[1]);
}

#[tokio::test]
async fn a_registration_traces_its_initial_load_at_a_berlin_group_bank() {
    let (app, api, bank, mut worker) = traced().await;
    let token = dev_token(&app, Some("acme"), STORED);
    let broker = &api.services.broker;
    let probe = broker.declare_probe_queue("refresh.*.acme").await.unwrap();
    let mut events = broker.consume(&probe, 10);

    let key = format!("bg-{}", uuid::Uuid::new_v4());
    let sent = "00-a3ce929d0e0e47364bf92f3577b34da6-0102030405060708-01";
    let body = json!({"providerId": "sim_bg", "bankConsentId": key, "accessToken": key,
                      "expiresAt": "2099-01-01T00:00:00Z"});
    let answer = api
        .call(
            reqwest::Method::POST,
            "/v1/consents",
            Some(&token),
            Some(&body),
            &[("traceparent", sent)],
        )
        .await;
    assert_eq!(answer.status, 201, "{answer:?}");
    let refresh_id = answer.body["initialRefresh"]["refreshId"]
        .as_str()
        .unwrap()
        .to_owned();
    let seen = event_traces(&mut events, &refresh_id, &mut worker).await;
    let trace: TraceContext = sent.parse().unwrap();
    assert_lines_up(&bank, &key, &mut worker, &refresh_id, seen, &trace).await;
}
