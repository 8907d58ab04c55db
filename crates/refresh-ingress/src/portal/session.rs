//! Portal sessions and CSRF: a random id in an `HttpOnly; SameSite=Strict` cookie, the
//! session itself in Redis (lifetime = the token's), a CSRF token tied to it, and an
//! `Origin` / `Sec-Fetch-Site` check on every state-changing request.

use axum::http::{HeaderMap, HeaderValue, header};
use chrono::{DateTime, Utc};
use refresh_core::{Problem, ProblemCode, TenantId};
use serde::{Deserialize, Serialize};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;

/// The session cookie.
pub(crate) const SESSION_COOKIE: &str = "refreshd_session";
/// The sign-in form's CSRF cookie (there is no session yet to tie it to).
pub(crate) const LOGIN_COOKIE: &str = "refreshd_login";
/// How long a sign-in form stays usable.
pub(crate) const LOGIN_FORM_SECS: i64 = 600;

/// What Redis keeps for a session (never the token itself).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Session {
    pub(crate) tenant: Option<TenantId>,
    pub(crate) admin: bool,
    pub(crate) csrf: String,
    pub(crate) expires_at: DateTime<Utc>,
}

impl Session {
    pub(crate) fn principal(&self) -> Principal {
        Principal {
            tenant: self.tenant.clone(),
            admin: self.admin,
        }
    }
}

/// 256 bits from the OS's generator, as hex (two v4 UUIDs: `getrandom` underneath).
pub(crate) fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// A cookie's value from the `Cookie` headers.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

/// `Set-Cookie` for the portal's path; `max_age` 0 removes it.
pub(crate) fn set_cookie(name: &str, value: &str, max_age: i64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let text = format!(
        "{name}={value}; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        max_age.max(0)
    );
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("refreshd_session=; Max-Age=0"))
}

/// Equal without an early exit, so timing does not tell how much of a guess matched.
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn forbidden(detail: &str) -> ApiError {
    ApiError::from(Problem::new(ProblemCode::InsufficientScope, detail))
}

/// A state-changing request must come from the portal's own pages: a browser says so
/// in `Sec-Fetch-Site` and `Origin`; a client that sends neither still needs the token.
pub(crate) fn check_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return Err(forbidden("Cross-site requests are not accepted"));
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if origin_host != Some(host) {
            return Err(forbidden("Cross-site requests are not accepted"));
        }
    }
    Ok(())
}

/// The session of the cookie, if it is still there.
pub(crate) async fn current(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<(String, Session)>, ApiError> {
    let Some(id) = cookie(headers, SESSION_COOKIE).filter(|id| is_token(id)) else {
        return Ok(None);
    };
    let Some(raw) = state.sessions.get(id).await.map_err(unavailable)? else {
        return Ok(None);
    };
    match serde_json::from_str::<Session>(&raw) {
        Ok(session) if session.expires_at > Utc::now() => Ok(Some((id.to_owned(), session))),
        _ => Ok(None),
    }
}

/// Stores a new session; its id for the cookie.
pub(crate) async fn create(state: &AppState, session: &Session) -> Result<String, ApiError> {
    let id = random_token();
    let ttl = (session.expires_at - Utc::now()).num_seconds().max(1);
    let value = serde_json::to_string(session).map_err(|_| ApiError::from(Problem::internal()))?;
    state
        .sessions
        .put(&id, &value, ttl.unsigned_abs())
        .await
        .map_err(unavailable)?;
    Ok(id)
}

pub(crate) async fn end(state: &AppState, id: &str) -> Result<(), ApiError> {
    state.sessions.delete(id).await.map_err(unavailable)
}

/// The CSRF token of a state-changing request matches its session's.
pub(crate) fn check_csrf(session: &Session, given: Option<&str>) -> Result<(), ApiError> {
    match given {
        Some(given) if same_secret(given, &session.csrf) => Ok(()),
        _ => Err(forbidden(
            "The CSRF token is missing or does not match this session",
        )),
    }
}

fn is_token(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn unavailable(error: refresh_redis::RedisError) -> ApiError {
    tracing::warn!(error = %refresh_core::error_chain(&error), "redis unavailable for a portal session");
    ApiError::from(Problem::unavailable())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_secrets_and_origins() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; refreshd_session=abc; b=2"),
        );
        assert_eq!(cookie(&headers, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&headers, "c"), None);
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
        assert_eq!(random_token().len(), 64);
        assert_ne!(random_token(), random_token());
        assert_eq!(
            set_cookie(SESSION_COOKIE, "x", 60, true),
            "refreshd_session=x; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age=60; Secure"
        );
        assert_eq!(
            set_cookie(SESSION_COOKIE, "", -5, false),
            "refreshd_session=; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age=0"
        );
        let check = |pairs: &[(&'static str, &'static str)], ok: bool| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.insert(*name, HeaderValue::from_static(value));
            }
            assert_eq!(check_origin(&headers).is_ok(), ok, "{pairs:?}");
        };
        check(&[], true);
        check(&[("sec-fetch-site", "same-origin")], true);
        check(&[("sec-fetch-site", "cross-site")], false);
        check(&[("sec-fetch-site", "same-site")], false);
        check(
            &[
                ("origin", "http://127.0.0.1:8080"),
                ("host", "127.0.0.1:8080"),
            ],
            true,
        );
        check(
            &[
                ("origin", "http://evil.example"),
                ("host", "127.0.0.1:8080"),
            ],
            false,
        );
    }
}
