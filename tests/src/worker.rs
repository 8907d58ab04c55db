//! Starting the real bank simulator and the real worker (the same
//! `refreshd::worker::start` the binary runs) inside a test, and talking to the
//! simulator's control API.

use std::time::Duration;

use serde_json::Value;

use crate::{Api, TestApp, spawn_app_with};

/// The bank simulator of a test, served on 127.0.0.1:0.
pub struct Bank {
    pub base: String,
    client: reqwest::Client,
}

/// A [`TestApp`] whose providers `sim` (OBIE) and `sim_bg` (Berlin Group) are a
/// simulator started for it, its ingress, and the simulator. Start the worker with [`start_worker`].
pub async fn app_with_bank(overrides: &[(&str, &str)]) -> (TestApp, Api, Bank) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("harness: bind the simulator");
    let addr = listener.local_addr().expect("harness: simulator address");
    let base = format!("http://{addr}");
    let api_root = format!("{base}{}", refresh_banksim::API_PREFIX);
    let bg_root = format!("{base}{}", refresh_banksim::BERLIN_GROUP_PREFIX);
    let mut all = vec![
        ("providers.sim.base_url", api_root.as_str()),
        ("providers.sim_bg.base_url", bg_root.as_str()),
    ];
    all.extend_from_slice(overrides);
    let app = spawn_app_with(&all).await;
    let sim_settings = app.settings.bank_sim.clone();
    let sim_shutdown = app.shutdown.child_token();
    app.tracker.spawn(async move {
        let _ = refresh_banksim::serve(listener, sim_settings, sim_shutdown).await;
    });
    let api = app.start_ingress().await;
    let bank = Bank {
        base,
        client: reqwest::Client::new(),
    };
    (app, api, bank)
}

/// The worker's configuration for tests: the settings', with backoffs of milliseconds.
pub fn fast_worker_config(app: &TestApp) -> refresh_worker::WorkerConfig {
    let mut config = refreshd::worker::config(&app.settings);
    config.backoff_base = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(200);
    config.dependency_retry = Duration::from_millis(200);
    config
}

/// Starts a worker of `app`'s namespace; it stops when the app is dropped.
pub fn start_worker(app: &TestApp, api: &Api, config: refresh_worker::WorkerConfig) {
    refreshd::worker::start(
        &app.settings,
        &api.services,
        config,
        &api.metrics,
        &app.shutdown,
        &app.tracker,
    )
    .expect("harness: start the worker");
}

impl Bank {
    async fn send(&self, request: reqwest::RequestBuilder) -> Value {
        let response = request
            .send()
            .await
            .expect("harness: the simulator answers");
        let status = response.status();
        let bytes = response.bytes().await.expect("harness: simulator body");
        assert!(status.is_success(), "simulator: {status} {bytes:?}");
        if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("harness: simulator JSON")
        }
    }

    /// `GET /sim/consents/{key}`.
    pub async fn dataset(&self, key: &str) -> Value {
        self.send(self.client.get(format!("{}/sim/consents/{key}", self.base)))
            .await
    }

    /// `PUT /sim/consents/{key}`.
    pub async fn put_dataset(&self, key: &str, dataset: &Value) {
        self.send(
            self.client
                .put(format!("{}/sim/consents/{key}", self.base))
                .json(dataset),
        )
        .await;
    }

    /// `PATCH /sim/consents/{key}/scenario`.
    pub async fn scenario(&self, key: &str, patch: &Value) -> Value {
        self.send(
            self.client
                .patch(format!("{}/sim/consents/{key}/scenario", self.base))
                .json(patch),
        )
        .await
    }

    /// `GET /sim/calls?bankConsentId={key}`.
    pub async fn calls(&self, key: &str) -> Vec<Value> {
        let calls = self
            .send(
                self.client
                    .get(format!("{}/sim/calls", self.base))
                    .query(&[("bankConsentId", key)]),
            )
            .await;
        calls.as_array().cloned().unwrap_or_default()
    }
}

impl Api {
    /// Polls `GET /v1/refreshes/{id}` until the refresh is terminal (at most 30 s).
    pub async fn wait_terminal(&self, token: &str, refresh_id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let answer = self
                .get(&format!("/v1/refreshes/{refresh_id}"), token)
                .await;
            assert_eq!(answer.status, 200, "{answer:?}");
            if answer.body["status"] != "INITIALIZED" {
                return answer.body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "refresh {refresh_id} still INITIALIZED: {answer:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
