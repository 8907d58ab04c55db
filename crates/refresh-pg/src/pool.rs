//! Connecting, migrating and checking the namespace's schema.

use std::time::Duration;

use serde::Deserialize;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The `[database]` configuration section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://user@host:port/database`.
    pub url: String,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
}

/// A validated PostgreSQL schema name (the namespace).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schema(String);

impl Schema {
    /// Accepts `[a-z][a-z0-9_]{0,39}`, so the name never needs quoting rules beyond
    /// double quotes and can never inject SQL.
    pub fn parse(name: &str) -> Result<Self, PgError> {
        let mut chars = name.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if first_ok && rest_ok && name.len() <= 40 {
            Ok(Self(name.to_owned()))
        } else {
            Err(PgError::BadSchema(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("invalid schema name {0:?}: lowercase letters, digits and '_', starting with a letter")]
    BadSchema(String),
    #[error("invalid database url")]
    BadUrl(#[source] sqlx::Error),
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    #[error("migration failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error(
        "the database schema {schema:?} is not migrated ({detail}); run `refreshd migrate` first"
    )]
    NotMigrated { schema: String, detail: String },
    #[error("database query failed")]
    Query(#[source] sqlx::Error),
}

impl PgError {
    /// Whether retrying later may succeed (the database was unreachable), as opposed to
    /// a fault in the request or the schema.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unavailable(_) => true,
            Self::Query(e) => matches!(
                e,
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
            ),
            _ => false,
        }
    }
}

/// A pooled connection idle for longer than this is pinged before it is handed out.
///
/// The pool pings every connection as it comes back (a broken one is closed then),
/// so a connection idle for less than this was answered by the server moments ago.
/// A restart or crash of PostgreSQL takes far longer than this, so a connection made
/// before one has always been idle longer and is pinged (and replaced) before use;
/// under load, where connections come back every few milliseconds, a query is one
/// round trip instead of two.
const PING_WHEN_IDLE_FOR: Duration = Duration::from_millis(100);

/// A pool whose connections work inside `schema`. Connects lazily: an unreachable
/// database shows on first use (and in `health`), not here.
pub fn connect(settings: &DatabaseSettings, schema: &Schema) -> Result<PgPool, PgError> {
    let options: PgConnectOptions = settings.url.parse().map_err(PgError::BadUrl)?;
    let options = options
        .options([("search_path", schema.as_str())])
        .application_name(&application_name(schema));
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_WHEN_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options))
}

/// Sessions of a namespace are named after it, so an operator (or a test's teardown)
/// can tell them apart in `pg_stat_activity`.
fn application_name(schema: &Schema) -> String {
    format!("refreshd {}", schema.as_str())
}

/// Creates the schema if needed and applies every pending migration.
pub async fn migrate(pool: &PgPool, schema: &Schema) -> Result<(), PgError> {
    // The name is validated by `Schema::parse`: it cannot carry SQL.
    sqlx::query(AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {}",
        schema.quoted()
    )))
    .execute(pool)
    .await
    .map_err(PgError::Unavailable)?;
    MIGRATOR.run(pool).await.map_err(PgError::Migrate)
}

/// Fails unless every migration this build knows is applied to the schema, so a role
/// never runs against a schema it does not understand.
pub async fn check_migrated(pool: &PgPool, schema: &Schema) -> Result<(), PgError> {
    let table_exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.tables \
         WHERE table_schema = $1 AND table_name = '_sqlx_migrations')",
    )
    .bind(schema.as_str())
    .fetch_one(pool)
    .await
    .map_err(PgError::Unavailable)?;
    let not_migrated = |detail: String| PgError::NotMigrated {
        schema: schema.as_str().to_owned(),
        detail,
    };
    if !table_exists {
        return Err(not_migrated("no migrations applied".to_owned()));
    }
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await
            .map_err(PgError::Query)?;
    let missing: Vec<String> = MIGRATOR
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .map(|m| m.version.to_string())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(not_migrated(format!(
            "missing migrations {}",
            missing.join(", ")
        )))
    }
}

/// Removes the schema and everything in it (used to tear down test namespaces). Other
/// sessions of the namespace are ended first: one left mid-transaction by a stopped
/// process would otherwise hold the locks the drop needs.
pub async fn drop_schema(pool: &PgPool, schema: &Schema) -> Result<(), PgError> {
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = $1 AND pid <> pg_backend_pid()",
    )
    .bind(application_name(schema))
    .execute(pool)
    .await
    .map_err(PgError::Query)?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {} CASCADE",
        schema.quoted()
    )))
    .execute(pool)
    .await
    .map_err(PgError::Query)?;
    Ok(())
}

/// One round trip to the database.
pub async fn health(pool: &PgPool) -> Result<(), PgError> {
    sqlx::query("SELECT 1")
        .execute(pool)
        .await
        .map(|_| ())
        .map_err(PgError::Unavailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        let check = |name: &str, ok: bool| assert_eq!(Schema::parse(name).is_ok(), ok, "{name}");
        check("refreshd", true);
        check("t_0a1b2c", true);
        check("", false);
        check("1abc", false);
        check("Refreshd", false);
        check("a\"; DROP", false);
        check(&"a".repeat(41), false);
    }
}
