//! Connecting to Redis (one server, or a Redis Cluster through seed nodes) and
//! removing a namespace's keys.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncCommands, Cmd, IntoConnectionInfo, Pipeline, RedisFuture, Value};
use serde::{Deserialize, Deserializer};

/// The `[redis]` configuration section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://host:port/db`, when `cluster_nodes` is empty.
    pub url: String,
    /// Longest wait for one round trip (and for a connection).
    pub command_timeout_ms: u64,
    /// Seed nodes of a Redis Cluster (`redis://host:port`); when not empty the gate
    /// uses the cluster and `url` is ignored. A list, or in an environment
    /// variable one string of comma-separated urls.
    #[serde(default, deserialize_with = "node_list")]
    pub cluster_nodes: Vec<String>,
}

impl RedisSettings {
    /// Whether every url parses; names the first that does not.
    pub fn check(&self) -> Result<(), String> {
        let urls: Vec<&String> = if self.cluster_nodes.is_empty() {
            vec![&self.url]
        } else {
            self.cluster_nodes.iter().collect()
        };
        for url in urls {
            if url.as_str().into_connection_info().is_err() {
                return Err(format!("{url:?} is not a redis:// url"));
            }
        }
        Ok(())
    }
}

/// A list of strings, or one string of comma-separated items (an environment
/// variable cannot hold a list).
fn node_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Nodes {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Nodes::deserialize(deserializer)? {
        Nodes::List(list) => list,
        Nodes::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|node| !node.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("invalid redis url")]
    BadUrl(#[source] redis::RedisError),
    #[error("redis unavailable")]
    Unavailable(#[source] redis::RedisError),
}

/// A multiplexed connection that reconnects by itself: to one Redis (after it
/// restarts), or to a Redis Cluster, whose client follows the slots across a
/// failover or resharding (`MOVED`/`ASK`, topology refresh on errors). Cheap to
/// clone; every clone shares the connection.
#[derive(Clone)]
pub struct ConnectionManager {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Single(redis::aio::ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionManager {
    /// A connection to one server that connects on first use (each command fails
    /// until it can), for callers that must start while Redis is down.
    pub fn lazy(url: &str, timeout: Duration) -> Result<Self, RedisError> {
        let client = redis::Client::open(url).map_err(RedisError::BadUrl)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(0);
        let single = redis::aio::ConnectionManager::new_lazy_with_config(client, config)
            .map_err(RedisError::BadUrl)?;
        Ok(Self {
            inner: Inner::Single(single),
        })
    }

    /// Whether this is a Redis Cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner, Inner::Cluster(_))
    }
}

impl ConnectionLike for ConnectionManager {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.inner {
            Inner::Single(conn) => conn.req_packed_command(cmd),
            Inner::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.inner {
            Inner::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Inner::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.inner {
            Inner::Single(conn) => conn.get_db(),
            Inner::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Connects to `cluster_nodes` when set, else to `url`.
pub async fn connect(settings: &RedisSettings) -> Result<ConnectionManager, RedisError> {
    let timeout = Duration::from_millis(settings.command_timeout_ms);
    if !settings.cluster_nodes.is_empty() {
        let client = ClusterClientBuilder::new(settings.cluster_nodes.iter().map(String::as_str))
            .connection_timeout(timeout)
            .response_timeout(timeout)
            // A failover takes the cluster's node timeout plus an election: retry
            // across it (the topology is refreshed between tries), but within
            // about one command timeout, so a caller still gets its 503 in time.
            .retries(3)
            .min_retry_wait(50)
            .max_retry_wait(timeout.as_millis().try_into().unwrap_or(u64::MAX).max(50))
            .build()
            .map_err(RedisError::BadUrl)?;
        let cluster = client
            .get_async_connection()
            .await
            .map_err(RedisError::Unavailable)?;
        return Ok(ConnectionManager {
            inner: Inner::Cluster(cluster),
        });
    }
    let client = redis::Client::open(settings.url.as_str()).map_err(RedisError::BadUrl)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    let single = redis::aio::ConnectionManager::new_with_config(client, config)
        .await
        .map_err(RedisError::Unavailable)?;
    Ok(ConnectionManager {
        inner: Inner::Single(single),
    })
}

/// One round trip (on a cluster: to every node).
pub async fn health(conn: &ConnectionManager) -> Result<(), RedisError> {
    let mut conn = conn.clone();
    redis::cmd("PING")
        .query_async::<Value>(&mut conn)
        .await
        .map(|_| ())
        .map_err(RedisError::Unavailable)
}

/// Removes every key of the namespace; returns how many were removed.
///
/// On one Redis the keys are all removed at once (one `MULTI`/`EXEC`), as a restart
/// without persistence loses them: no script ever sees part of a namespace's state
/// gone and the rest (its epoch keys) still there. Keys made after the scan began may
/// stay. On a cluster the keys are removed slot by slot.
pub async fn delete_namespace(
    conn: &ConnectionManager,
    namespace: &str,
) -> Result<u64, RedisError> {
    let mut conn = conn.clone();
    let pattern = format!("{namespace}:*");
    if conn.is_cluster() {
        // SCAN's cursor belongs to one node; KEYS is sent to every master and the
        // answers are joined, and UNLINK is split by slot.
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut conn)
            .await
            .map_err(RedisError::Unavailable)?;
        let mut removed = 0u64;
        for chunk in keys.chunks(1000) {
            let n: u64 = conn.unlink(chunk).await.map_err(RedisError::Unavailable)?;
            removed += n;
        }
        return Ok(removed);
    }
    let mut keys: Vec<String> = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .map_err(RedisError::Unavailable)?;
        keys.extend(found);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    // SCAN may return a key twice; UNLINK counts each key it removed once.
    keys.sort_unstable();
    keys.dedup();
    if keys.is_empty() {
        return Ok(0);
    }
    let mut transaction = redis::pipe();
    transaction.atomic();
    for chunk in keys.chunks(10_000) {
        transaction.unlink(chunk);
    }
    let removed: Vec<u64> = transaction
        .query_async(&mut conn)
        .await
        .map_err(RedisError::Unavailable)?;
    Ok(removed.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml_nodes: &str) -> Result<RedisSettings, serde_json::Error> {
        serde_json::from_str(&format!(
            r#"{{"url": "redis://127.0.0.1:6379/0", "command_timeout_ms": 100{toml_nodes}}}"#
        ))
    }

    #[test]
    fn cluster_nodes_are_a_list_or_comma_separated() {
        assert!(settings("").unwrap().cluster_nodes.is_empty());
        assert_eq!(
            settings(r#", "cluster_nodes": ["redis://a:7000", "redis://b:7001"]"#)
                .unwrap()
                .cluster_nodes,
            ["redis://a:7000", "redis://b:7001"]
        );
        assert_eq!(
            settings(r#", "cluster_nodes": "redis://a:7000, redis://b:7001,""#)
                .unwrap()
                .cluster_nodes,
            ["redis://a:7000", "redis://b:7001"]
        );
        let bad = settings(r#", "cluster_nodes": ["redis://a:7000", "http://b"]"#).unwrap();
        assert_eq!(
            bad.check(),
            Err("\"http://b\" is not a redis:// url".to_owned())
        );
        assert_eq!(settings("").unwrap().check(), Ok(()));
    }
}
