//! Connecting to Redis and removing a namespace's keys.

use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Deserialize;

/// The `[redis]` configuration section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://host:port/db`.
    pub url: String,
    /// Longest wait for one round trip (and for a connection).
    pub command_timeout_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("invalid redis url")]
    BadUrl(#[source] redis::RedisError),
    #[error("redis unavailable")]
    Unavailable(#[source] redis::RedisError),
}

/// A multiplexed connection that reconnects by itself after Redis restarts.
pub async fn connect(settings: &RedisSettings) -> Result<ConnectionManager, RedisError> {
    let client = redis::Client::open(settings.url.as_str()).map_err(RedisError::BadUrl)?;
    let timeout = Duration::from_millis(settings.command_timeout_ms);
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    ConnectionManager::new_with_config(client, config)
        .await
        .map_err(RedisError::Unavailable)
}

/// One round trip.
pub async fn health(conn: &ConnectionManager) -> Result<(), RedisError> {
    let mut conn = conn.clone();
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .map(|_| ())
        .map_err(RedisError::Unavailable)
}

/// Removes every key of the namespace; returns how many were removed.
pub async fn delete_namespace(
    conn: &ConnectionManager,
    namespace: &str,
) -> Result<u64, RedisError> {
    let mut conn = conn.clone();
    let pattern = format!("{namespace}:*");
    let mut removed = 0u64;
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .map_err(RedisError::Unavailable)?;
        if !keys.is_empty() {
            let n: u64 = conn.unlink(&keys).await.map_err(RedisError::Unavailable)?;
            removed += n;
        }
        if next == 0 {
            return Ok(removed);
        }
        cursor = next;
    }
}
