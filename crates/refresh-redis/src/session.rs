//! Portal sessions: an opaque value under a random id, expiring with the token that
//! opened it, so that signing out (deleting the key) really ends the session.

use redis::AsyncCommands as _;

use crate::conn::ConnectionManager;
use crate::conn::RedisError;

/// The portal's session keys, `{namespace}:portal:session:{id}`.
#[derive(Clone)]
pub struct Sessions {
    conn: ConnectionManager,
    namespace: String,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl Sessions {
    pub fn new(conn: ConnectionManager, namespace: impl Into<String>) -> Self {
        Self {
            conn,
            namespace: namespace.into(),
        }
    }

    fn key(&self, id: &str) -> String {
        format!("{}:portal:session:{id}", self.namespace)
    }

    /// Stores `value` under `id` for `ttl_secs` (at least one second).
    pub async fn put(&self, id: &str, value: &str, ttl_secs: u64) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        conn.set_ex::<_, _, ()>(self.key(id), value, ttl_secs.max(1))
            .await
            .map_err(RedisError::Unavailable)
    }

    /// The value under `id`, unless it expired or was deleted.
    pub async fn get(&self, id: &str) -> Result<Option<String>, RedisError> {
        let mut conn = self.conn.clone();
        conn.get(self.key(id))
            .await
            .map_err(RedisError::Unavailable)
    }

    pub async fn delete(&self, id: &str) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        conn.del::<_, ()>(self.key(id))
            .await
            .map_err(RedisError::Unavailable)
    }
}
