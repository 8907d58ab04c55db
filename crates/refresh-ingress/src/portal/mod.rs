//! The portal (SPEC §6) under `/dashboard`: sign-in with a token into a server-side
//! session, the tenant's consents with their status, quota, "Refresh Data" and history,
//! the auto-sync settings with their warnings, and live updates over SSE. Pages are
//! askama templates (checked at compile time); the one script and stylesheet are ours,
//! served from the binary under a strict Content-Security-Policy.

mod pages;
mod session;

use axum::Json;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::Utc;
use refresh_core::{Problem, RequestedBy, TenantId};
use serde::Deserialize;
use serde_json::json;

use self::session::{LOGIN_COOKIE, LOGIN_FORM_SECS, SESSION_COOKIE, Session};
use crate::error::{ApiError, problem_response};
use crate::routes::events::{StreamFilter, last_event_id, open_stream};
use crate::routes::extract::{ApiPath, consent_id, param, query_pairs, visible_consent};
use crate::state::AppState;
use refresh_admission::{Decision, RefreshRequest};

/// Nothing from elsewhere, no inline script or style: what the page needs is ours.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const PORTAL_JS: &str = include_str!("../../assets/portal.js");
const PORTAL_CSS: &str = include_str!("../../assets/portal.css");

pub(crate) fn router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/dashboard", get(dashboard))
        .route("/dashboard/", get(|| async { Redirect::to("/dashboard") }))
        .route("/dashboard/login", get(login_form).post(login))
        .route("/dashboard/logout", post(logout))
        .route("/dashboard/settings", post(save_settings))
        .route("/dashboard/consents/{consent_id}/refresh", post(refresh))
        .route("/dashboard/events", get(events))
        .route("/dashboard/assets/portal.js", get(script))
        .route("/dashboard/assets/portal.css", get(style))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// The headers every portal answer carries.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Not `no-referrer`: with it a browser sends `Origin: null` on the portal's own
    // form posts, and the origin check could not tell them from a forged one.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300"),
            ),
        ],
        body,
    )
        .into_response()
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", PORTAL_JS)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", PORTAL_CSS)
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

// --- sign-in ------------------------------------------------------------------------

async fn login_form(State(state): State<AppState>) -> Response {
    login_page(&state, StatusCode::OK, None)
}

fn login_page(state: &AppState, status: StatusCode, error: Option<String>) -> Response {
    let csrf = session::random_token();
    let mut response = pages::render(
        status,
        &pages::Login {
            csrf: csrf.clone(),
            error,
        },
    );
    response.headers_mut().append(
        header::SET_COOKIE,
        session::set_cookie(LOGIN_COOKIE, &csrf, LOGIN_FORM_SECS, state.secure_cookies),
    );
    response
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
}

async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, ApiError> {
    session::check_origin(&headers)?;
    let expected = session::cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    if expected.is_empty() || !session::same_secret(expected, &form.csrf) {
        return Ok(login_page(
            &state,
            StatusCode::FORBIDDEN,
            Some("The sign-in form expired. Please try again.".to_owned()),
        ));
    }
    let (principal, expires_at) = match state.verifier.verify_token(form.token.trim()) {
        Ok(verified) => verified,
        Err(problem) => {
            let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::UNAUTHORIZED);
            return Ok(login_page(&state, status, Some(problem.detail)));
        }
    };
    let session = Session {
        tenant: principal.tenant,
        admin: principal.admin,
        csrf: session::random_token(),
        expires_at,
    };
    let id = session::create(&state, &session).await?;
    let mut response = see_other("/dashboard");
    let headers = response.headers_mut();
    let max_age = (expires_at - Utc::now()).num_seconds();
    headers.append(
        header::SET_COOKIE,
        session::set_cookie(SESSION_COOKIE, &id, max_age, state.secure_cookies),
    );
    headers.append(
        header::SET_COOKIE,
        session::set_cookie(LOGIN_COOKIE, "", 0, state.secure_cookies),
    );
    Ok(response)
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, ApiError> {
    session::check_origin(&headers)?;
    let Some((id, current)) = session::current(&state, &headers).await? else {
        return Ok(see_other("/dashboard/login"));
    };
    session::check_csrf(&current, Some(&form.csrf))?;
    session::end(&state, &id).await?;
    let mut response = see_other("/dashboard/login");
    response.headers_mut().append(
        header::SET_COOKIE,
        session::set_cookie(SESSION_COOKIE, "", 0, state.secure_cookies),
    );
    Ok(response)
}

// --- the page -----------------------------------------------------------------------

/// The tenant a session looks at: its own, or for an operator the picked one (else
/// the first tenant with consents).
async fn viewed_tenant(
    state: &AppState,
    session: &Session,
    picked: Option<&str>,
) -> Result<(Option<TenantId>, Vec<TenantId>), ApiError> {
    if !session.admin {
        return Ok((session.tenant.clone(), Vec::new()));
    }
    let tenants = state.store.tenants(500).await?;
    let picked = picked
        .and_then(|raw| TenantId::parse(raw).ok())
        .or_else(|| session.tenant.clone())
        .or_else(|| tenants.first().cloned());
    Ok((picked, tenants))
}

async fn dashboard(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let Some((_, session)) = session::current(&state, &headers).await? else {
        return Ok(see_other("/dashboard/login"));
    };
    let pairs = query_pairs(&uri, &["tenant", "cursor", "saved"])?;
    let (tenant, tenants) = viewed_tenant(&state, &session, param(&pairs, "tenant")).await?;
    let message = param(&pairs, "saved").map(|_| "Settings saved.".to_owned());
    let cursor = param(&pairs, "cursor").map(str::to_owned);
    let page = pages::dashboard(
        &state,
        &session,
        tenant,
        tenants,
        cursor.as_deref(),
        pages::SettingsNote {
            message,
            error: None,
            form: None,
        },
    )
    .await?;
    Ok(pages::render(StatusCode::OK, &page))
}

#[derive(Deserialize)]
struct SettingsForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    tenant: String,
    #[serde(default, rename = "autosyncIntervalHours")]
    autosync_interval_hours: String,
    #[serde(default, rename = "inactivationDays")]
    inactivation_days: String,
}

async fn save_settings(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<SettingsForm>,
) -> Result<Response, ApiError> {
    session::check_origin(&headers)?;
    let Some((_, session)) = session::current(&state, &headers).await? else {
        return Ok(see_other("/dashboard/login"));
    };
    session::check_csrf(&session, Some(&form.csrf))?;
    let (tenant, tenants) = viewed_tenant(&state, &session, Some(&form.tenant)).await?;
    let Some(tenant) = tenant else {
        return Err(ApiError::from(Problem::bad_request(
            "No tenant to save settings for",
        )));
    };
    let parsed = pages::parse_settings(&form.autosync_interval_hours, &form.inactivation_days);
    let saved = match parsed {
        Ok(settings) => crate::routes::settings::save(&state, &tenant, &settings)
            .await
            .map(|()| settings),
        Err(error) => Err(error),
    };
    match saved {
        Ok(_) => {
            let query = if session.admin {
                format!("/dashboard?tenant={tenant}&saved=1")
            } else {
                "/dashboard?saved=1".to_owned()
            };
            Ok(see_other(&query))
        }
        Err(ApiError(problem)) if problem.status == 400 => {
            let page = pages::dashboard(
                &state,
                &session,
                Some(tenant),
                tenants,
                None,
                pages::SettingsNote {
                    message: None,
                    error: Some(problem.detail),
                    form: Some((form.autosync_interval_hours, form.inactivation_days)),
                },
            )
            .await?;
            Ok(pages::render(StatusCode::BAD_REQUEST, &page))
        }
        Err(error) => Err(error),
    }
}

// --- calls from portal.js -----------------------------------------------------------

/// "Refresh Data": a `PORTAL` refresh; the answer is JSON for the page to show in place
/// (`{accepted, refreshId, message, quotaText}` or the problem).
async fn refresh(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(raw): ApiPath,
) -> Result<Response, ApiError> {
    session::check_origin(&headers)?;
    let Some((_, session)) = session::current(&state, &headers).await? else {
        return Err(ApiError::from(Problem::unauthorized(
            "The session has ended; sign in again",
        )));
    };
    session::check_csrf(
        &session,
        headers.get("x-csrf-token").and_then(|v| v.to_str().ok()),
    )?;
    let principal = session.principal();
    let consent = visible_consent(&state, &principal, consent_id(&raw)?).await?;
    let request = RefreshRequest {
        consent_id: consent.consent_id,
        tenant: principal.scope_tenant().cloned(),
        requested_by: RequestedBy::Portal,
        initial: false,
        traceparent: crate::routes::extract::traceparent(&headers),
    };
    match state.admitter.request(&request).await? {
        Decision::Refused(problem) => Ok(problem_response(&problem)),
        Decision::Admitted(record) => {
            let quota = state
                .admitter
                .quota(consent.consent_id, RequestedBy::Portal)
                .await?;
            let body = json!({
                "accepted": true,
                "refreshId": record.refresh_id,
                "message": "Refresh requested",
                "quotaText": pages::quota_text(
                    quota
                        .as_ref()
                        .map(|q| (q.limit, q.used, q.window.to_string()))
                        .as_ref()
                        .map(|(l, u, w)| (*l, *u, w.as_str())),
                ),
                "record": record,
            });
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
    }
}

/// The same stream as `GET /v1/events`, authorised by the session cookie.
async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let Some((_, session)) = session::current(&state, &headers).await? else {
        return Err(ApiError::from(Problem::unauthorized(
            "The session has ended; sign in again",
        )));
    };
    let pairs = query_pairs(&uri, &["tenant"])?;
    let (tenant, _) = viewed_tenant(&state, &session, param(&pairs, "tenant")).await?;
    let filter = StreamFilter {
        // An operator's page shows one tenant; so does its stream.
        tenant: tenant.or_else(|| session.tenant.clone()),
        consent: None,
    };
    let stream = open_stream(&state, filter, last_event_id(&headers)?).await?;
    Ok(stream.into_response())
}
