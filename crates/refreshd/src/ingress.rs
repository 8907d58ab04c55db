//! The ingress role: HTTP API, upstream request consumer, outbox relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use refresh_admission::{AdmissionMetrics, Admitter};
use refresh_ingress::{HttpConfig, Verifier};
use refresh_ops::Registry;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::services::Services;
use crate::{RunError, Settings};

/// Starts the ingress's tasks on `tracker`, serving HTTP on `listener` and `registry`
/// at `/metrics`, counting admissions in `admission_metrics` (registered by the
/// caller, once per process); returns the bound address. Everything stops when
/// `shutdown` is cancelled.
pub async fn start(
    settings: &Settings,
    services: &Services,
    registry: Arc<Registry>,
    admission_metrics: AdmissionMetrics,
    listener: tokio::net::TcpListener,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<SocketAddr, RunError> {
    let verifier = Verifier::new(
        settings.auth.jwt_hs256_secret.as_ref(),
        settings.auth.jwt_rs256_public_key_pem.as_deref(),
    )
    .map_err(|e| RunError::Role("ingress", Box::new(e)))?
    .with_issuer_audience(
        settings.auth.issuer.as_deref(),
        settings.auth.audience.as_deref(),
    );
    let nudge = Arc::new(Notify::new());
    let admitter = Admitter::new(
        services.store.clone(),
        services.gate.clone(),
        services.broker.clone(),
        admission_metrics.clone(),
        nudge.clone(),
        tracker,
    );
    // Streams end with the HTTP server's shutdown, so they never hold up the drain.
    let events = refresh_ingress::events::EventHub::new(shutdown.child_token());
    tracker.spawn(refresh_ingress::events::run(
        services.broker.clone(),
        events.clone(),
        shutdown.child_token(),
    ));
    let router = refresh_ingress::router(
        admitter.clone(),
        services.store.clone(),
        services.broker.clone(),
        services.redis.clone(),
        verifier,
        registry,
        HttpConfig {
            providers: settings.providers.keys().cloned().collect(),
            retention_days: settings.history.retention_days,
            sync_wait: Duration::from_secs(settings.http.sync_wait_secs),
            events,
            namespace: settings.namespace.clone(),
            secure_cookies: settings.http.secure_cookies,
            key_releases: refresh_ingress::KeyReleases::new(
                services.store.clone(),
                tracker,
                shutdown.child_token(),
            ),
            key_reserver: refresh_ingress::KeyReserver::start(services.store.clone(), tracker),
        },
    );
    let addr = listener.local_addr().map_err(|source| RunError::Bind {
        addr: settings.http.bind.clone(),
        source,
    })?;
    tracker.spawn(refresh_admission::relay::run(
        services.store.clone(),
        services.broker.clone(),
        admission_metrics,
        nudge,
        shutdown.child_token(),
    ));
    tracker.spawn(refresh_ingress::upstream::run(
        admitter,
        services.store.clone(),
        services.broker.clone(),
        settings.amqp.requests_prefetch,
        settings.amqp.requested_by.clone(),
        shutdown.child_token(),
    ));
    let http_shutdown = shutdown.child_token();
    tracker.spawn(async move {
        if let Err(error) = refresh_ops::serve(listener, router, http_shutdown).await {
            tracing::error!(error = %error, "the HTTP server stopped");
        }
    });
    tracing::info!(%addr, "ingress listening");
    Ok(addr)
}

/// `refreshd ingress`.
pub async fn run(settings: &Settings, shutdown: CancellationToken) -> Result<(), RunError> {
    let tracker = TaskTracker::new();
    let services = Services::connect(settings, &shutdown, &tracker).await?;
    let listener = crate::bind(&settings.http.bind).await?;
    let registry = Arc::new(Registry::new());
    let admission_metrics = AdmissionMetrics::default();
    registry.register(|r| admission_metrics.register(r));
    start(
        settings,
        &services,
        registry,
        admission_metrics,
        listener,
        &shutdown,
        &tracker,
    )
    .await?;
    crate::until_drained(&tracker, &shutdown).await;
    Ok(())
}
