//! Connecting a role to the services it needs, each adapter handed its own section.

use std::time::Duration;

use refresh_amqp::Broker;
use refresh_pg::{Schema, Store};
use refresh_redis::{ConnectionManager, Gate, GateConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{RunError, Settings};

/// The connected adapters.
#[derive(Clone)]
pub struct Services {
    pub store: Store,
    pub gate: Gate,
    pub broker: Broker,
    pub redis: ConnectionManager,
}

impl Services {
    /// Connects to PostgreSQL (refusing an unmigrated schema), Redis and RabbitMQ
    /// (declaring the topology; the broker's supervisor runs on `tracker`).
    pub async fn connect(
        settings: &Settings,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Self, RunError> {
        let schema = Schema::parse(&settings.namespace)?;
        let pool = refresh_pg::connect(&settings.database, &schema)?;
        refresh_pg::check_migrated(&pool, &schema).await?;
        let cipher = settings
            .token_cipher()
            .map_err(|e| RunError::Role("settings", Box::new(e)))?;
        let store = Store::new(pool, cipher);
        let redis = refresh_redis::connect(&settings.redis)
            .await
            .map_err(|e| RunError::Role("redis", Box::new(e)))?;
        let gate = Gate::new(
            redis.clone(),
            GateConfig {
                namespace: settings.namespace.clone(),
                rules: settings.quota.rules.clone(),
                time_zone: settings
                    .quota_time_zone()
                    .map_err(|e| RunError::Role("settings", Box::new(e)))?,
                stagger: settings.stagger.clone(),
                lease: Duration::from_secs(settings.lock.lease_secs),
            },
        );
        // A new namespace (or a Redis that lost everything while nothing ran) gets
        // its gate state before the first request; a later loss is rebuilt on demand.
        refresh_admission::GateRebuild::new(store.clone(), gate.clone())
            .ensure()
            .await;
        let broker = Broker::start(
            &settings.amqp,
            &settings.namespace,
            shutdown.clone(),
            tracker,
        )
        .await
        .map_err(|e| RunError::Role("rabbitmq", Box::new(e)))?;
        Ok(Self {
            store,
            gate,
            broker,
            redis,
        })
    }
}

impl Services {
    /// Readiness over every connected adapter.
    pub fn readiness(&self) -> refresh_ops::Readiness {
        refresh_ops::Readiness {
            redis: Some(self.redis.clone()),
            store: Some(self.store.clone()),
            broker: Some(self.broker.clone()),
        }
    }
}
