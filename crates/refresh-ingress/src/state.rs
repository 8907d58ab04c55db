//! What every HTTP handler shares.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use refresh_amqp::Broker;
use refresh_pg::Store;

use crate::auth::Verifier;
use refresh_admission::Admitter;
use refresh_ops::Registry;

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) admitter: Admitter,
    pub(crate) store: Store,
    pub(crate) broker: Broker,
    pub(crate) redis: refresh_redis::ConnectionManager,
    pub(crate) verifier: Verifier,
    pub(crate) metrics: Arc<Registry>,
    /// Configured provider ids.
    pub(crate) providers: Arc<BTreeSet<String>>,
    pub(crate) retention_days: u32,
    pub(crate) sync_wait: Duration,
    pub(crate) events: crate::events::EventHub,
    /// Portal sessions (Redis).
    pub(crate) sessions: refresh_redis::Sessions,
    /// `Secure` on the portal's cookies (off only in `dev`, over plain HTTP).
    pub(crate) secure_cookies: bool,
    pub(crate) key_releases: crate::idempotency::KeyReleases,
    pub(crate) key_reserver: crate::idempotency::KeyReserver,
}
