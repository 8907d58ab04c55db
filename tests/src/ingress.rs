//! Starting the real ingress (the same `refreshd::ingress::start` the binary runs) on
//! 127.0.0.1:0 inside a test, and talking to it.

use std::sync::Arc;

use chrono::{TimeDelta, Utc};
use refresh_core::TenantId;
use refreshd::services::Services;
use secrecy::SecretString;
use serde_json::Value;

use crate::TestApp;

/// A running ingress and an HTTP client for it.
pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
    pub services: Services,
    /// The registry served at `/metrics` (a worker started with this API adds to it).
    pub metrics: Arc<refresh_ops::Registry>,
}

/// A dev-secret token for `tenant` with `scope`, valid for an hour.
pub fn dev_token(app: &TestApp, tenant: Option<&str>, scope: &str) -> String {
    let secret: &SecretString = app
        .settings
        .auth
        .jwt_hs256_secret
        .as_ref()
        .expect("dev settings have a secret");
    let tenant = tenant.map(|t| TenantId::parse(t).expect("valid tenant"));
    refresh_ingress::mint_hs256(
        secret,
        tenant.as_ref(),
        scope,
        Utc::now() + TimeDelta::hours(1),
    )
    .expect("mint a token")
}

impl TestApp {
    /// Starts the ingress of this namespace; it stops when the app is dropped.
    pub async fn start_ingress(&self) -> Api {
        ingress_with(self, &self.settings)
            .await
            .expect("harness: start the ingress")
    }
}

/// Starts an ingress of `app`'s namespace with other `settings` (e.g. a service
/// behind a [`crate::Proxy`]); it stops when the app is dropped.
pub async fn ingress_with(
    app: &TestApp,
    settings: &refreshd::Settings,
) -> Result<Api, refreshd::RunError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let services = Services::connect(settings, &app.shutdown, &app.tracker).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("harness: bind");
    let metrics = Arc::new(refresh_ops::Registry::new());
    let admission = refresh_admission::AdmissionMetrics::default();
    metrics.register(|r| admission.register(r));
    let addr = refreshd::ingress::start(
        settings,
        &services,
        metrics.clone(),
        admission,
        listener,
        &app.shutdown,
        &app.tracker,
    )
    .await?;
    Ok(Api {
        base: format!("http://{addr}"),
        client: reqwest::Client::builder()
            .build()
            .expect("harness: http client"),
        services,
        metrics,
    })
}

/// An answer: status, headers, body (JSON, or `Value::Null` when empty).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Api {
    /// Sends `method path` with an optional bearer token, JSON body and extra headers.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("harness: the ingress answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("harness: read the body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Answer {
        self.call(reqwest::Method::GET, path, Some(token), None, &[])
            .await
    }

    /// `POST /v1/consents/{consent}/refresh`, which must answer 202; the refresh id.
    pub async fn refresh(&self, token: &str, consent: &str) -> String {
        let answer = self
            .post(&format!("/v1/consents/{consent}/refresh"), token, None)
            .await;
        assert_eq!(answer.status, 202, "{answer:?}");
        answer.body["refreshId"]
            .as_str()
            .expect("a 202 names its refreshId")
            .to_owned()
    }

    pub async fn post(&self, path: &str, token: &str, body: Option<&Value>) -> Answer {
        self.call(reqwest::Method::POST, path, Some(token), body, &[])
            .await
    }
}

impl Api {
    /// A consent stored directly (no initial load), ACTIVE unless `status` says
    /// otherwise, for provider `sim`, expiring at `expires_at` (default: in 90 days).
    pub async fn seed_consent(
        &self,
        tenant: &str,
        status: Option<&str>,
        expires_at: Option<chrono::DateTime<Utc>>,
    ) -> refresh_core::ConsentId {
        let consent_id = refresh_core::ConsentId::from_uuid(uuid::Uuid::new_v4());
        self.services
            .store
            .insert_consent(&refresh_pg::NewConsent {
                consent_id,
                tenant_id: TenantId::parse(tenant).expect("valid tenant"),
                provider_id: refresh_core::ProviderId::parse("sim").expect("valid provider"),
                bank_consent_id: format!("bank-{consent_id}"),
                access_token: SecretString::from(format!("token-{consent_id}")),
                expires_at: expires_at.unwrap_or_else(|| Utc::now() + TimeDelta::days(90)),
                created_at: Utc::now(),
            })
            .await
            .expect("harness: seed a consent");
        if let Some(status) = status {
            sqlx::query("UPDATE consents SET status = $2 WHERE consent_id = $1")
                .bind(consent_id.as_uuid())
                .bind(status)
                .execute(self.services.store.pool())
                .await
                .expect("harness: set the consent's status");
        }
        consent_id
    }

    /// What a worker does at the end of a refresh: UPDATED, lock released.
    pub async fn complete(&self, consent_id: refresh_core::ConsentId, refresh_id: &str) {
        let refresh_id: refresh_core::RefreshId = refresh_id.parse().expect("a refresh id");
        complete(&self.services, consent_id, refresh_id).await;
    }

    /// Completes the consent's refresh as [`Api::complete`] does as soon as one is
    /// admitted (looked for every 20 ms, for 4 s at most): for a request that waits
    /// for its refresh to end (`Prefer: wait`). Await the handle after the request.
    pub fn complete_once_admitted(
        &self,
        consent_id: refresh_core::ConsentId,
    ) -> tokio::task::JoinHandle<()> {
        let services = self.services.clone();
        tokio::spawn(async move {
            for _ in 0..200 {
                let admitted: Option<uuid::Uuid> = sqlx::query_scalar(
                    "SELECT refresh_id FROM refreshes WHERE consent_id = $1 AND status = 'INITIALIZED'",
                )
                .bind(consent_id.as_uuid())
                .fetch_optional(services.store.pool())
                .await
                .expect("harness: look for the admitted refresh");
                if let Some(refresh_id) = admitted {
                    let refresh_id = refresh_core::RefreshId::from_uuid(refresh_id);
                    complete(&services, consent_id, refresh_id).await;
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            panic!("harness: no refresh of {consent_id} was admitted within 4 s");
        })
    }
}

async fn complete(
    services: &Services,
    consent_id: refresh_core::ConsentId,
    refresh_id: refresh_core::RefreshId,
) {
    sqlx::query("UPDATE refreshes SET status = 'UPDATED', started_at = now(), finished_at = now(), summary = '{\"accountsUpdated\":0,\"balancesUpdated\":0,\"transactionsAdded\":0,\"transactionsUpdated\":0,\"transactionsRemoved\":0}' WHERE refresh_id = $1")
        .bind(refresh_id.as_uuid())
        .execute(services.store.pool())
        .await
        .expect("harness: finish the refresh");
    services
        .gate
        .release_lock(consent_id, refresh_id)
        .await
        .expect("harness: release the lock");
}
