//! The integration test harness: [`spawn_app`] gives a test its own namespace (Redis
//! key prefix, RabbitMQ name prefix, PostgreSQL schema) on the real local services,
//! built through the same settings loader and wiring the binary uses, and removes all
//! of it when the [`TestApp`] is dropped — also when the test panics.
//!
//! The services must be up (`make services`); a missing service fails the test loudly.

#![allow(
    clippy::expect_used,
    reason = "the harness reports a broken environment by failing the test"
)]

use std::path::PathBuf;

use refresh_amqp::Connection;
use refreshd::{LoadOptions, Settings};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod admission;
pub mod browser;
mod cluster;
pub mod fixtures;
mod ingress;
pub mod json;
mod process;
mod proxy;
mod services;
mod worker;
pub use cluster::{RedisCluster, RedisServer};
pub use ingress::{Answer, Api, dev_token, ingress_with};
pub use process::{
    WorkerProcess, refreshctl_binary, refreshctl_command, refreshd_binary, role_command,
    worker_command,
};
pub use proxy::Proxy;
pub use services::{PrivatePostgres, PrivateRabbit, free_port, restart_shared_service};
pub use worker::{Bank, app_with_bank, fast_worker_config, start_worker};

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// One test's private slice of the real services.
pub struct TestApp {
    pub namespace: String,
    pub settings: Settings,
    /// A pool working inside the namespace's schema (already migrated).
    pub pg: PgPool,
    pub redis: refresh_redis::ConnectionManager,
    /// A broker connection; the namespace's topology is declared.
    pub amqp: Connection,
    /// Stops every role the test started.
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

/// Settings for a fresh namespace, layered like the binary's, plus overrides.
pub fn test_settings(namespace: &str, overrides: &[(&str, &str)]) -> Settings {
    let mut all = vec![("namespace".to_owned(), namespace.to_owned())];
    all.extend(
        overrides
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let settings = Settings::load(&LoadOptions {
        env: Some("dev".to_owned()),
        config_dir: Some(repo_root().join("config")),
        config_file: None,
        environment_variables: false,
        overrides: all,
    })
    .expect("harness: test settings load");
    settings
        .validate(refreshd::Role::Dev)
        .expect("harness: test settings are valid");
    settings
}

/// A namespace no other run uses: `t_` and 16 random hex digits.
pub fn fresh_namespace() -> String {
    format!("t_{}", &uuid::Uuid::new_v4().simple().to_string()[..16])
}

/// A [`TestApp`] with the default test settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// A [`TestApp`] whose settings have `overrides` applied (`("stagger.limit", "3")`).
pub async fn spawn_app_with(overrides: &[(&str, &str)]) -> TestApp {
    spawn_app_from(test_settings(&fresh_namespace(), overrides)).await
}

/// A [`TestApp`] for settings made by the test (their namespace must be fresh).
///
/// With `REFRESHD_TEST_LOG` set, the roles run in the test process log as JSON to its
/// stderr, filtered by `RUST_LOG` (`--nocapture` shows them).
pub async fn spawn_app_from(settings: Settings) -> TestApp {
    if std::env::var_os("REFRESHD_TEST_LOG").is_some() {
        refreshd::telemetry::init(refreshd::settings::LogFormat::Json, false);
    }
    let namespace = settings.namespace.clone();
    let schema =
        refresh_pg::Schema::parse(&namespace).expect("harness: namespace is a valid schema");
    let pg = refresh_pg::connect(&settings.database, &schema).expect("harness: database url");
    refresh_pg::migrate(&pg, &schema).await.expect(
        "harness: PostgreSQL must be up and the refreshd database exist (run `make services`)",
    );
    let redis = refresh_redis::connect(&settings.redis)
        .await
        .expect("harness: Redis must be up (run `make services`)");
    let amqp = refresh_amqp::connect(&settings.amqp)
        .await
        .expect("harness: RabbitMQ must be up (run `make services`)");
    refresh_amqp::topology::declare(
        &amqp,
        &refresh_amqp::Names::new(&namespace),
        settings.amqp.delivery_limit,
    )
    .await
    .expect("harness: declare the namespace's topology");
    TestApp {
        namespace,
        settings,
        pg,
        redis,
        amqp,
        shutdown: CancellationToken::new(),
        tracker: TaskTracker::new(),
    }
}

impl Drop for TestApp {
    /// Removes the namespace from all three services. Runs on its own thread and
    /// runtime, because the test's runtime may be shutting down (or unwinding).
    fn drop(&mut self) {
        self.shutdown.cancel();
        let namespace = self.namespace.clone();
        // The services the app was given (a test may use private servers).
        let settings = test_settings(
            &namespace,
            &[
                ("database.url", &self.settings.database.url),
                ("redis.url", &self.settings.redis.url),
                ("amqp.url", &self.settings.amqp.url),
            ],
        );
        let outcome = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("harness: cleanup runtime");
            runtime.block_on(remove_namespace(&settings))
        })
        .join();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(error)) => report(&format!(
                "harness: cleanup of {namespace} failed: {error:#}"
            )),
            Err(_) => report(&format!("harness: cleanup of {namespace} panicked")),
        }
    }
}

#[allow(
    clippy::print_stderr,
    reason = "a failed cleanup is reported to the test's output"
)]
fn report(message: &str) {
    eprintln!("{message}");
}

/// Deletes the namespace's schema, keys, queues and exchanges.
pub async fn remove_namespace(settings: &Settings) -> anyhow::Result<()> {
    let schema = refresh_pg::Schema::parse(&settings.namespace)?;
    let pg = refresh_pg::connect(&settings.database, &schema)?;
    refresh_pg::drop_schema(&pg, &schema).await?;
    pg.close().await;
    let redis = refresh_redis::connect(&settings.redis).await?;
    refresh_redis::delete_namespace(&redis, &settings.namespace).await?;
    let amqp = refresh_amqp::connect(&settings.amqp).await?;
    refresh_amqp::delete_namespace(&amqp, &settings.namespace).await?;
    let _ = amqp.close(200, "cleanup done".into()).await;
    Ok(())
}

/// What is left of a namespace on the services: (schema exists, Redis keys, queues).
pub async fn leftovers(settings: &Settings) -> anyhow::Result<(bool, u64, Vec<String>)> {
    let schema = refresh_pg::Schema::parse(&settings.namespace)?;
    let pg = refresh_pg::connect(&settings.database, &schema)?;
    let schema_exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.schemata WHERE schema_name = $1)",
    )
    .bind(schema.as_str())
    .fetch_one(&pg)
    .await?;
    pg.close().await;
    let mut redis = refresh_redis::connect(&settings.redis).await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", settings.namespace))
        .query_async(&mut redis)
        .await?;
    let amqp = refresh_amqp::connect(&settings.amqp).await?;
    let names = refresh_amqp::Names::new(&settings.namespace);
    let mut queues = Vec::new();
    for queue in names.queues() {
        if refresh_amqp::queue_exists(&amqp, queue).await? {
            queues.push(queue.to_owned());
        }
    }
    let _ = amqp.close(200, "inspection done".into()).await;
    Ok((schema_exists, keys.len() as u64, queues))
}
