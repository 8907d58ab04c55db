//! The portal's pages: the askama templates' data and the texts a person reads
//! (status, quota, history), computed here so that the page and a live update say the
//! same thing.

use askama::Template;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, TimeDelta, Utc};
use refresh_core::{ConsentStatus, Problem, RefreshRecord, TenantId};
use refresh_pg::ConsentFilter;

use super::session::Session;
use crate::error::ApiError;
use crate::routes::consents::{consent_page, decode_cursor};
use crate::routes::settings::{AppSettings, load, settings_warnings};
use crate::routes::views::ConsentView;
use crate::state::AppState;

/// Consents per page of the dashboard.
const PAGE_SIZE: u32 = 20;

#[derive(Template)]
#[template(path = "login.html")]
pub(crate) struct Login {
    pub(crate) csrf: String,
    pub(crate) error: Option<String>,
}

pub(crate) struct HistoryRow {
    pub(crate) refresh_id: String,
    pub(crate) date: String,
    pub(crate) requested_by: String,
    pub(crate) status: String,
    pub(crate) error: String,
}

pub(crate) struct ConsentRowView {
    pub(crate) id: String,
    pub(crate) short_id: String,
    pub(crate) provider: String,
    pub(crate) status: String,
    pub(crate) status_class: &'static str,
    pub(crate) status_text: String,
    pub(crate) quota_text: String,
    pub(crate) can_refresh: bool,
    pub(crate) expires_at: String,
    pub(crate) history: Vec<HistoryRow>,
}

#[derive(Template)]
#[template(path = "dashboard.html")]
pub(crate) struct Dashboard {
    pub(crate) csrf: String,
    pub(crate) admin: bool,
    pub(crate) tenant: String,
    pub(crate) tenants: Vec<String>,
    pub(crate) consents: Vec<ConsentRowView>,
    pub(crate) next_page: Option<String>,
    pub(crate) retention_days: u32,
    pub(crate) autosync: String,
    pub(crate) inactivation: String,
    pub(crate) warnings: Vec<String>,
    pub(crate) settings_message: Option<String>,
    pub(crate) settings_error: Option<String>,
}

/// What the settings form says after a save, or what it keeps after a refusal.
pub(crate) struct SettingsNote {
    pub(crate) message: Option<String>,
    pub(crate) error: Option<String>,
    /// The values typed (shown again after a refusal).
    pub(crate) form: Option<(String, String)>,
}

pub(crate) fn render(status: StatusCode, page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => {
            let mut response = (status, html).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            response
        }
        Err(error) => {
            tracing::error!(error = %error, "a portal template failed to render");
            ApiError::from(Problem::internal()).into_response()
        }
    }
}

/// The status text of SPEC §6.
pub(crate) fn status_text(view: &ConsentView, now: DateTime<Utc>) -> String {
    if view.refreshing {
        return "Refreshing consent…".to_owned();
    }
    match view.status {
        ConsentStatus::Active => expires_in(view.expires_at, now),
        ConsentStatus::Expired => "Expired".to_owned(),
        ConsentStatus::Revoked => "Revoked".to_owned(),
        ConsentStatus::Inactive => "Inactive".to_owned(),
    }
}

/// "Expires in N days", N the whole days left rounded up (portal.js does the same).
pub(crate) fn expires_in(expires_at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let left = expires_at - now;
    if left <= TimeDelta::zero() {
        return "Expired".to_owned();
    }
    let days = (left.num_seconds() + 86_399) / 86_400;
    if days == 1 {
        "Expires in 1 day".to_owned()
    } else {
        format!("Expires in {days} days")
    }
}

/// The quota left, as the page shows it: `(limit, used, window)`.
pub(crate) fn quota_text(quota: Option<(u32, u32, &str)>) -> String {
    match quota {
        None => "No refresh limit".to_owned(),
        Some((limit, used, window)) => {
            let left = limit.saturating_sub(used);
            let window = if window == "calendar_day" {
                "today"
            } else {
                "in 24 h"
            };
            format!("{left} of {limit} refreshes left {window}")
        }
    }
}

fn history_row(record: &RefreshRecord) -> HistoryRow {
    HistoryRow {
        refresh_id: record.refresh_id.to_string(),
        date: record
            .date_requested
            .format("%Y-%m-%d %H:%M UTC")
            .to_string(),
        requested_by: record.requested_by.to_string(),
        status: record.status.to_string(),
        error: record
            .error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default(),
    }
}

/// The settings form's fields: an empty interval turns auto-sync off.
pub(crate) fn parse_settings(autosync: &str, inactivation: &str) -> Result<AppSettings, ApiError> {
    let autosync = match autosync.trim() {
        "" => None,
        raw => Some(raw.parse::<i32>().map_err(|_| {
            ApiError::from(Problem::bad_request(
                "autosyncIntervalHours must be null or 6 to 720",
            ))
        })?),
    };
    let inactivation = inactivation
        .trim()
        .parse::<i32>()
        .map_err(|_| ApiError::from(Problem::bad_request("inactivationDays must be 1 to 3650")))?;
    Ok(AppSettings {
        autosync_interval_hours: autosync,
        inactivation_days: inactivation,
    })
}

pub(crate) async fn dashboard(
    state: &AppState,
    session: &Session,
    tenant: Option<TenantId>,
    tenants: Vec<TenantId>,
    cursor: Option<&str>,
    note: SettingsNote,
) -> Result<Dashboard, ApiError> {
    let principal = session.principal();
    let now = Utc::now();
    let (consents, next_page) = match &tenant {
        Some(tenant) => {
            let filter = ConsentFilter {
                tenant: Some(tenant.clone()),
                status: None,
                now,
            };
            let cursor = cursor.map(decode_cursor).transpose()?;
            let page = consent_page(state, &principal, filter, cursor, PAGE_SIZE).await?;
            let since = now - TimeDelta::days(state.retention_days.into());
            let mut rows = Vec::with_capacity(page.items.len());
            for view in page.items {
                let history = state.store.history(view.consent_id, since).await?;
                let id = view.consent_id.to_string();
                rows.push(ConsentRowView {
                    short_id: id.chars().take(8).collect(),
                    provider: view.provider_id.to_string(),
                    status: view.status.to_string(),
                    status_class: if view.refreshing {
                        "busy"
                    } else if view.status == ConsentStatus::Active {
                        "ok"
                    } else {
                        "off"
                    },
                    status_text: status_text(&view, now),
                    quota_text: quota_text(
                        view.quota
                            .as_ref()
                            .map(|q| (q.limit, q.used, q.window.as_str())),
                    ),
                    can_refresh: view.status == ConsentStatus::Active,
                    expires_at: refresh_core::time::format_millis(&view.expires_at),
                    history: history.iter().map(history_row).collect(),
                    id,
                });
            }
            let next = page.next_cursor.map(|c| {
                if session.admin {
                    format!("/dashboard?tenant={tenant}&cursor={c}")
                } else {
                    format!("/dashboard?cursor={c}")
                }
            });
            (rows, next)
        }
        None => (Vec::new(), None),
    };
    let (autosync, inactivation, warnings) = match &tenant {
        Some(tenant) => {
            let saved = load(state, tenant).await?;
            let warnings = settings_warnings(&saved);
            let (autosync, inactivation) = note.form.clone().unwrap_or((
                saved
                    .autosync_interval_hours
                    .map(|h| h.to_string())
                    .unwrap_or_default(),
                saved.inactivation_days.to_string(),
            ));
            (autosync, inactivation, warnings)
        }
        None => (String::new(), String::new(), Vec::new()),
    };
    Ok(Dashboard {
        csrf: session.csrf.clone(),
        admin: session.admin,
        tenant: tenant.map(|t| t.to_string()).unwrap_or_default(),
        tenants: tenants.iter().map(ToString::to_string).collect(),
        consents,
        next_page,
        retention_days: state.retention_days,
        autosync,
        inactivation,
        warnings,
        settings_message: note.message,
        settings_error: note.error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_texts() {
        let now: DateTime<Utc> = "2026-12-01T10:00:00Z".parse().unwrap();
        let check = |hours: i64, expected: &str| {
            assert_eq!(expires_in(now + TimeDelta::hours(hours), now), expected);
        };
        check(1, "Expires in 1 day");
        check(24, "Expires in 1 day");
        check(25, "Expires in 2 days");
        check(90 * 24, "Expires in 90 days");
        check(0, "Expired");
        check(-1, "Expired");
    }

    #[test]
    fn status_texts() {
        let now: DateTime<Utc> = "2026-12-01T10:00:00Z".parse().unwrap();
        let view = |status: ConsentStatus, refreshing: bool| ConsentView {
            consent_id: refresh_core::ConsentId::from_uuid(uuid::Uuid::nil()),
            tenant_id: TenantId::parse("acme").unwrap(),
            provider_id: refresh_core::ProviderId::parse("sim").unwrap(),
            bank_consent_id: "b".to_owned(),
            status,
            expires_at: now + TimeDelta::days(12),
            created_at: now,
            last_refreshed_at: None,
            refreshing,
            refresh_id: None,
            quota: None,
        };
        let check = |status, refreshing, expected: &str| {
            assert_eq!(status_text(&view(status, refreshing), now), expected);
        };
        check(ConsentStatus::Active, false, "Expires in 12 days");
        check(ConsentStatus::Active, true, "Refreshing consent…");
        check(ConsentStatus::Expired, false, "Expired");
        check(ConsentStatus::Revoked, false, "Revoked");
        check(ConsentStatus::Inactive, false, "Inactive");
        assert_eq!(quota_text(None), "No refresh limit");
        assert_eq!(
            quota_text(Some((4, 1, "rolling_24h"))),
            "3 of 4 refreshes left in 24 h"
        );
        assert_eq!(
            quota_text(Some((6, 6, "calendar_day"))),
            "0 of 6 refreshes left today"
        );
    }

    #[test]
    fn settings_form_fields() {
        let check = |a: &str, i: &str, expected: Result<(Option<i32>, i32), &str>| {
            let got = parse_settings(a, i)
                .map(|s| (s.autosync_interval_hours, s.inactivation_days))
                .map_err(|e| e.0.detail);
            assert_eq!(got, expected.map_err(str::to_owned), "{a:?} {i:?}");
        };
        check("", "90", Ok((None, 90)));
        check(" 24 ", "3", Ok((Some(24), 3)));
        check(
            "x",
            "3",
            Err("autosyncIntervalHours must be null or 6 to 720"),
        );
        check("24", "", Err("inactivationDays must be 1 to 3650"));
    }
}
