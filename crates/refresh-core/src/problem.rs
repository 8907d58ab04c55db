//! Problem codes and RFC 9457 problem details: every refusal and refresh error, with its exact text.

use std::fmt;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{ConsentId, RefreshId};
use crate::parse::string_enum;
use crate::quota::{QuotaWindow, daily_limit_detail, format_retry_after, retry_after_seconds};

string_enum! {
    /// The machine-readable `code` of a problem (admission refusals, API
    /// errors, and the terminal errors of a refresh).
    pub enum ProblemCode as "problem code" {
        /// 404: unknown consent, or another tenant's.
        ConsentNotFound => "consent_not_found",
        /// 403: the consent or the account access was revoked.
        ConsentRevoked => "consent_revoked",
        /// 403: the consent is past its expiry.
        ConsentExpired => "consent_expired",
        /// 403: the consent went inactive.
        ConsentInactive => "consent_inactive",
        /// 409: a refresh of this consent is queued or running.
        RefreshInProgress => "refresh_in_progress",
        /// 409: the consent (same id, or same provider and bank consent) is registered.
        ConsentExists => "consent_exists",
        /// 429: the per-consent quota is used up.
        DailyLimitReached => "daily_limit_reached",
        /// 429: no start slot within `stagger.max_delay_secs`.
        BacklogFull => "backlog_full",
        /// 503: Redis, RabbitMQ or PostgreSQL unreachable.
        Unavailable => "unavailable",
        /// 401: missing, invalid or expired token.
        Unauthorized => "unauthorized",
        /// 403: the token's scope does not allow the operation.
        InsufficientScope => "insufficient_scope",
        /// 400: malformed id or body.
        BadRequest => "bad_request",
        /// 405: the route exists, the method does not (`Allow` lists the ones it takes).
        MethodNotAllowed => "method_not_allowed",
        /// 413: body over 64 KiB.
        PayloadTooLarge => "payload_too_large",
        /// 404: unknown refresh id or route.
        NotFound => "not_found",
        /// 403 (refresh error): the bank requires strong customer authentication.
        MfaRequired => "mfa_required",
        /// 503 (refresh error): the bank stayed unavailable through every retry.
        BankUnavailable => "bank_unavailable",
        /// 502 (refresh error): the bank answered with something unusable.
        BankError => "bank_error",
        /// 500: a bug or an unexpected state; details go to the log only.
        Internal => "internal",
        /// 500 (refresh error): the refresh's job was lost or dead-lettered.
        InternalError => "internal_error",
    }
}

impl ProblemCode {
    /// The HTTP status this code is answered with.
    pub const fn http_status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::ConsentRevoked
            | Self::ConsentExpired
            | Self::ConsentInactive
            | Self::InsufficientScope
            | Self::MfaRequired => 403,
            Self::ConsentNotFound | Self::NotFound => 404,
            Self::RefreshInProgress | Self::ConsentExists => 409,
            Self::MethodNotAllowed => 405,
            Self::PayloadTooLarge => 413,
            Self::DailyLimitReached | Self::BacklogFull => 429,
            Self::Internal | Self::InternalError => 500,
            Self::BankError => 502,
            Self::Unavailable | Self::BankUnavailable => 503,
        }
    }

    /// The problem `title`: the reason phrase of [`Self::http_status`].
    pub const fn title(self) -> &'static str {
        match self.http_status() {
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            409 => "Conflict",
            413 => "Content Too Large",
            429 => "Too Many Requests",
            502 => "Bad Gateway",
            503 => "Service Unavailable",
            _ => "Internal Server Error",
        }
    }

    /// The problem `type`: the section of the RFC defining [`Self::http_status`].
    pub const fn type_uri(self) -> &'static str {
        match self.http_status() {
            400 => "https://tools.ietf.org/html/rfc9110#section-15.5.1",
            401 => "https://tools.ietf.org/html/rfc9110#section-15.5.2",
            403 => "https://tools.ietf.org/html/rfc9110#section-15.5.4",
            404 => "https://tools.ietf.org/html/rfc9110#section-15.5.5",
            405 => "https://tools.ietf.org/html/rfc9110#section-15.5.6",
            409 => "https://tools.ietf.org/html/rfc9110#section-15.5.10",
            413 => "https://tools.ietf.org/html/rfc9110#section-15.5.14",
            429 => "https://tools.ietf.org/html/rfc6585#section-4",
            502 => "https://tools.ietf.org/html/rfc9110#section-15.6.3",
            503 => "https://tools.ietf.org/html/rfc9110#section-15.6.4",
            _ => "https://tools.ietf.org/html/rfc9110#section-15.6.1",
        }
    }
}

/// An RFC 9457 problem details object (`application/problem+json`), with the
/// `code` and the refusal facts clients act on without parsing `detail`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// `type`: see [`ProblemCode::type_uri`].
    #[serde(rename = "type")]
    pub type_uri: String,
    /// See [`ProblemCode::title`].
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// Human-readable, and part of the contract for the codes of SPEC §2.
    pub detail: String,
    /// The machine-readable code.
    pub code: ProblemCode,
    /// Seconds to wait before asking again; also sent as `Retry-After`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
    /// The consent registered before (`consent_exists`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_id: Option<ConsentId>,
    /// The refresh in flight (`refresh_in_progress`) or the one that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_id: Option<RefreshId>,
    /// The quota limit that was reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Admissions counted in the quota window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<u32>,
    /// The quota window kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<QuotaWindow>,
    /// When the quota next admits a refresh.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::time::millis_opt"
    )]
    pub next_refresh_possible_at: Option<DateTime<Utc>>,
}

impl Problem {
    /// A problem with `code`'s type, title and status and the given detail.
    pub fn new(code: ProblemCode, detail: impl Into<String>) -> Self {
        Self {
            type_uri: code.type_uri().to_owned(),
            title: code.title().to_owned(),
            status: code.http_status(),
            detail: detail.into(),
            code,
            retry_after_seconds: None,
            consent_id: None,
            refresh_id: None,
            limit: None,
            used: None,
            window: None,
            next_refresh_possible_at: None,
        }
    }

    /// 404 `consent_not_found` (also for another tenant's consent, so its existence does not leak).
    pub fn consent_not_found() -> Self {
        Self::new(ProblemCode::ConsentNotFound, "Consent not found")
    }

    /// 409 `consent_exists`, naming the consent registered before.
    pub fn consent_exists(existing: ConsentId) -> Self {
        Self {
            consent_id: Some(existing),
            ..Self::new(
                ProblemCode::ConsentExists,
                format!("This consent is registered already as {existing}"),
            )
        }
    }

    /// 403 `consent_revoked`.
    pub fn consent_revoked() -> Self {
        Self::new(ProblemCode::ConsentRevoked, CONSENT_REVOKED_DETAIL)
    }

    /// 403 `consent_expired`.
    pub fn consent_expired() -> Self {
        Self::new(ProblemCode::ConsentExpired, "The consent has expired")
    }

    /// 403 `consent_inactive`.
    pub fn consent_inactive() -> Self {
        Self::new(ProblemCode::ConsentInactive, "The consent is inactive")
    }

    /// 409 `refresh_in_progress`, pointing at the refresh in flight.
    pub fn refresh_in_progress(refresh_id: RefreshId) -> Self {
        Self {
            refresh_id: Some(refresh_id),
            ..Self::new(
                ProblemCode::RefreshInProgress,
                "A refresh is already in progress for this consent",
            )
        }
    }

    /// 429 `daily_limit_reached`: `Daily limit of {limit} requests/consent reached. Try again in {H}h{MM}.`
    pub fn daily_limit_reached(
        limit: u32,
        used: u32,
        window: QuotaWindow,
        retry_after: TimeDelta,
        next_possible_at: DateTime<Utc>,
    ) -> Self {
        Self {
            retry_after_seconds: Some(retry_after_seconds(retry_after)),
            limit: Some(limit),
            used: Some(used),
            window: Some(window),
            next_refresh_possible_at: Some(next_possible_at),
            ..Self::new(
                ProblemCode::DailyLimitReached,
                daily_limit_detail(limit, retry_after),
            )
        }
    }

    /// 429 `backlog_full`: no start slot within the allowed delay.
    pub fn backlog_full(retry_after: TimeDelta) -> Self {
        Self {
            retry_after_seconds: Some(retry_after_seconds(retry_after)),
            ..Self::new(
                ProblemCode::BacklogFull,
                format!(
                    "The refresh backlog is full. Try again in {}.",
                    format_retry_after(retry_after)
                ),
            )
        }
    }

    /// 503 `unavailable`: a dependency is down and nothing was admitted.
    pub fn unavailable() -> Self {
        Self::new(
            ProblemCode::Unavailable,
            "A required service is unavailable; nothing was admitted",
        )
    }

    /// 401 `unauthorized`.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(ProblemCode::Unauthorized, detail)
    }

    /// 403 `insufficient_scope`.
    pub fn insufficient_scope() -> Self {
        Self::new(
            ProblemCode::InsufficientScope,
            "The token's scope does not allow this operation",
        )
    }

    /// 400 `bad_request`.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(ProblemCode::BadRequest, detail)
    }

    /// 413 `payload_too_large`.
    pub fn payload_too_large() -> Self {
        Self::new(
            ProblemCode::PayloadTooLarge,
            "The request body exceeds 64 KiB",
        )
    }

    /// 404 `not_found` (unknown refresh id or route).
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(ProblemCode::NotFound, detail)
    }

    /// 500 `internal`; the cause is logged, never shown.
    pub fn internal() -> Self {
        Self::new(ProblemCode::Internal, "An internal error occurred")
    }

    /// The problem for a refresh that ended in `ERROR` with this code and message
    /// (`mfa_required`, `bank_unavailable`, `bank_error`, `consent_revoked`).
    pub fn from_refresh_error(code: ProblemCode, message: impl Into<String>) -> Self {
        Self::new(code, message)
    }

    /// The same problem, naming the refresh it is about.
    pub fn with_refresh_id(self, refresh_id: RefreshId) -> Self {
        Self {
            refresh_id: Some(refresh_id),
            ..self
        }
    }
}

/// SPEC §2: also the message of a refresh that ends because the bank revoked access.
pub(crate) const CONSENT_REVOKED_DETAIL: &str = "The consent or account access has been revoked";

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.status, self.detail)
    }
}

impl std::error::Error for Problem {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check_code(code: ProblemCode, text: &str, status: u16, title: &str, section: &str) {
        assert_eq!(code.as_str(), text);
        assert_eq!(text.parse::<ProblemCode>().unwrap(), code);
        assert_eq!(serde_json::to_value(code).unwrap(), json!(text));
        assert_eq!(code.http_status(), status, "{text}");
        assert_eq!(code.title(), title, "{text}");
        assert_eq!(
            code.type_uri(),
            format!("https://tools.ietf.org/html/{section}"),
            "{text}"
        );
    }

    #[test]
    fn codes() {
        use ProblemCode::*;
        check_code(
            MethodNotAllowed,
            "method_not_allowed",
            405,
            "Method Not Allowed",
            "rfc9110#section-15.5.6",
        );
        check_code(
            ConsentExists,
            "consent_exists",
            409,
            "Conflict",
            "rfc9110#section-15.5.10",
        );
        check_code(
            ConsentNotFound,
            "consent_not_found",
            404,
            "Not Found",
            "rfc9110#section-15.5.5",
        );
        check_code(
            ConsentRevoked,
            "consent_revoked",
            403,
            "Forbidden",
            "rfc9110#section-15.5.4",
        );
        check_code(
            ConsentExpired,
            "consent_expired",
            403,
            "Forbidden",
            "rfc9110#section-15.5.4",
        );
        check_code(
            ConsentInactive,
            "consent_inactive",
            403,
            "Forbidden",
            "rfc9110#section-15.5.4",
        );
        check_code(
            RefreshInProgress,
            "refresh_in_progress",
            409,
            "Conflict",
            "rfc9110#section-15.5.10",
        );
        check_code(
            DailyLimitReached,
            "daily_limit_reached",
            429,
            "Too Many Requests",
            "rfc6585#section-4",
        );
        check_code(
            BacklogFull,
            "backlog_full",
            429,
            "Too Many Requests",
            "rfc6585#section-4",
        );
        check_code(
            Unavailable,
            "unavailable",
            503,
            "Service Unavailable",
            "rfc9110#section-15.6.4",
        );
        check_code(
            Unauthorized,
            "unauthorized",
            401,
            "Unauthorized",
            "rfc9110#section-15.5.2",
        );
        check_code(
            InsufficientScope,
            "insufficient_scope",
            403,
            "Forbidden",
            "rfc9110#section-15.5.4",
        );
        check_code(
            BadRequest,
            "bad_request",
            400,
            "Bad Request",
            "rfc9110#section-15.5.1",
        );
        check_code(
            PayloadTooLarge,
            "payload_too_large",
            413,
            "Content Too Large",
            "rfc9110#section-15.5.14",
        );
        check_code(
            NotFound,
            "not_found",
            404,
            "Not Found",
            "rfc9110#section-15.5.5",
        );
        check_code(
            MfaRequired,
            "mfa_required",
            403,
            "Forbidden",
            "rfc9110#section-15.5.4",
        );
        check_code(
            BankUnavailable,
            "bank_unavailable",
            503,
            "Service Unavailable",
            "rfc9110#section-15.6.4",
        );
        check_code(
            BankError,
            "bank_error",
            502,
            "Bad Gateway",
            "rfc9110#section-15.6.3",
        );
        check_code(
            Internal,
            "internal",
            500,
            "Internal Server Error",
            "rfc9110#section-15.6.1",
        );
        check_code(
            InternalError,
            "internal_error",
            500,
            "Internal Server Error",
            "rfc9110#section-15.6.1",
        );
        assert_eq!(ProblemCode::ALL.len(), 20);
        assert!("Consent_Not_Found".parse::<ProblemCode>().is_err());
    }

    fn refresh_id() -> RefreshId {
        RefreshId::from_uuid(uuid::Uuid::from_u128(
            0x0190f5d2_6c1a_7b3e_8d4f_0a1b2c3d4e5f,
        ))
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    /// Each constructor's whole JSON body: the wire contract.
    fn check(problem: Problem, expected: serde_json::Value) {
        let json = serde_json::to_value(&problem).unwrap();
        assert_eq!(json, expected);
        assert_eq!(serde_json::from_value::<Problem>(json).unwrap(), problem);
    }

    fn body(
        code: &str,
        status: u16,
        title: &str,
        type_uri: &str,
        detail: &str,
    ) -> serde_json::Value {
        json!({"type": type_uri, "title": title, "status": status, "detail": detail, "code": code})
    }

    const R403: &str = "https://tools.ietf.org/html/rfc9110#section-15.5.4";
    const R404: &str = "https://tools.ietf.org/html/rfc9110#section-15.5.5";
    const R429: &str = "https://tools.ietf.org/html/rfc6585#section-4";

    #[test]
    fn constructors() {
        check(
            Problem::consent_not_found(),
            body(
                "consent_not_found",
                404,
                "Not Found",
                R404,
                "Consent not found",
            ),
        );
        check(
            Problem::consent_revoked(),
            body(
                "consent_revoked",
                403,
                "Forbidden",
                R403,
                "The consent or account access has been revoked",
            ),
        );
        check(
            Problem::consent_expired(),
            body(
                "consent_expired",
                403,
                "Forbidden",
                R403,
                "The consent has expired",
            ),
        );
        check(
            Problem::consent_inactive(),
            body(
                "consent_inactive",
                403,
                "Forbidden",
                R403,
                "The consent is inactive",
            ),
        );
        check(
            Problem::refresh_in_progress(refresh_id()),
            json!({
                "type": "https://tools.ietf.org/html/rfc9110#section-15.5.10",
                "title": "Conflict",
                "status": 409,
                "detail": "A refresh is already in progress for this consent",
                "code": "refresh_in_progress",
                "refreshId": "0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f",
            }),
        );
        check(
            Problem::daily_limit_reached(
                6,
                6,
                QuotaWindow::Rolling24h,
                TimeDelta::seconds(14 * 3600 + 6 * 60 + 1),
                at("2024-05-02T08:06:01Z"),
            ),
            json!({
                "type": R429,
                "title": "Too Many Requests",
                "status": 429,
                "detail": "Daily limit of 6 requests/consent reached. Try again in 14h07.",
                "code": "daily_limit_reached",
                "retryAfterSeconds": 50761,
                "limit": 6,
                "used": 6,
                "window": "rolling_24h",
                "nextRefreshPossibleAt": "2024-05-02T08:06:01.000Z",
            }),
        );
        check(
            Problem::backlog_full(TimeDelta::milliseconds(90_500)),
            json!({
                "type": R429,
                "title": "Too Many Requests",
                "status": 429,
                "detail": "The refresh backlog is full. Try again in 0h02.",
                "code": "backlog_full",
                "retryAfterSeconds": 91,
            }),
        );
        check(
            Problem::unavailable(),
            body(
                "unavailable",
                503,
                "Service Unavailable",
                "https://tools.ietf.org/html/rfc9110#section-15.6.4",
                "A required service is unavailable; nothing was admitted",
            ),
        );
        check(
            Problem::unauthorized("The token has expired"),
            body(
                "unauthorized",
                401,
                "Unauthorized",
                "https://tools.ietf.org/html/rfc9110#section-15.5.2",
                "The token has expired",
            ),
        );
        check(
            Problem::insufficient_scope(),
            body(
                "insufficient_scope",
                403,
                "Forbidden",
                R403,
                "The token's scope does not allow this operation",
            ),
        );
        check(
            Problem::bad_request("consentId is not a UUID"),
            body(
                "bad_request",
                400,
                "Bad Request",
                "https://tools.ietf.org/html/rfc9110#section-15.5.1",
                "consentId is not a UUID",
            ),
        );
        check(
            Problem::payload_too_large(),
            body(
                "payload_too_large",
                413,
                "Content Too Large",
                "https://tools.ietf.org/html/rfc9110#section-15.5.14",
                "The request body exceeds 64 KiB",
            ),
        );
        check(
            Problem::not_found("Refresh not found"),
            body("not_found", 404, "Not Found", R404, "Refresh not found"),
        );
        check(
            Problem::internal(),
            body(
                "internal",
                500,
                "Internal Server Error",
                "https://tools.ietf.org/html/rfc9110#section-15.6.1",
                "An internal error occurred",
            ),
        );
        check(
            Problem::from_refresh_error(
                ProblemCode::MfaRequired,
                "The bank requires the user to authenticate again",
            ),
            body(
                "mfa_required",
                403,
                "Forbidden",
                R403,
                "The bank requires the user to authenticate again",
            ),
        );
        check(
            Problem::from_refresh_error(ProblemCode::BankError, "bad payload")
                .with_refresh_id(refresh_id()),
            json!({
                "type": "https://tools.ietf.org/html/rfc9110#section-15.6.3",
                "title": "Bad Gateway",
                "status": 502,
                "detail": "bad payload",
                "code": "bank_error",
                "refreshId": "0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f",
            }),
        );
    }

    #[test]
    fn daily_limit_retry_after_rounds_up_to_at_least_one_second() {
        let check = |retry_after: TimeDelta, seconds: u64, detail_tail: &str| {
            let p = Problem::daily_limit_reached(
                4,
                4,
                QuotaWindow::CalendarDay,
                retry_after,
                at("2024-01-02T00:00:00Z"),
            );
            assert_eq!(p.retry_after_seconds, Some(seconds), "{retry_after}");
            assert_eq!(
                p.detail,
                format!("Daily limit of 4 requests/consent reached. Try again in {detail_tail}.")
            );
        };
        check(TimeDelta::zero(), 1, "0h00");
        check(TimeDelta::seconds(-5), 1, "0h00");
        check(TimeDelta::milliseconds(1), 1, "0h01");
        check(TimeDelta::seconds(1), 1, "0h01");
        check(TimeDelta::milliseconds(1001), 2, "0h01");
        check(TimeDelta::hours(24), 86_400, "24h00");
    }

    #[test]
    fn display_names_code_and_detail() {
        assert_eq!(
            Problem::consent_not_found().to_string(),
            "consent_not_found (404): Consent not found"
        );
    }
}
