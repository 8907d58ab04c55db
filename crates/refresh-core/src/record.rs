//! The refresh record: what `GET /v1/refreshes/{id}` returns and every event carries.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{ConsentId, RefreshId, TenantId};
use crate::merge::TxSummary;
use crate::problem::{CONSENT_REVOKED_DETAIL, Problem, ProblemCode};
use crate::requested_by::RequestedBy;
use crate::status::{RefreshStatus, TransitionError};

/// One refresh, as stored in the history and sent in events (SPEC §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RefreshRecord {
    /// The refresh.
    pub refresh_id: RefreshId,
    /// The consent refreshed.
    pub consent_id: ConsentId,
    /// The consent's tenant.
    pub tenant_id: TenantId,
    /// Who asked.
    pub requested_by: RequestedBy,
    /// Where the refresh is.
    pub status: RefreshStatus,
    /// When it was admitted.
    #[serde(serialize_with = "crate::time::millis")]
    pub date_requested: DateTime<Utc>,
    /// Its start slot: no worker starts it earlier.
    #[serde(serialize_with = "crate::time::millis")]
    pub not_before: DateTime<Utc>,
    /// When a worker began fetching from the bank.
    #[serde(serialize_with = "crate::time::millis_opt")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a terminal status.
    #[serde(serialize_with = "crate::time::millis_opt")]
    pub finished_at: Option<DateTime<Utc>>,
    /// Why it failed (`ERROR` only); `null` otherwise.
    pub error: Option<RefreshError>,
    /// What changed (`UPDATED` only); `null` otherwise.
    pub summary: Option<RefreshSummary>,
}

/// The error of a refresh that ended in `ERROR`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RefreshError {
    /// `mfa_required`, `bank_unavailable`, `bank_error`, `consent_revoked` (or `internal`).
    pub code: ProblemCode,
    /// Human-readable; never contains tokens or bank payloads.
    pub message: String,
}

/// What a successful refresh changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RefreshSummary {
    /// Accounts whose details were stored.
    pub accounts_updated: u64,
    /// Balances stored.
    pub balances_updated: u64,
    /// Transactions inserted.
    pub transactions_added: u64,
    /// Transactions changed in place.
    pub transactions_updated: u64,
    /// Transactions deleted (id-less ones replaced by date).
    pub transactions_removed: u64,
}

impl RefreshSummary {
    /// A summary from the account and balance counts and a transaction merge's counts.
    pub fn new(accounts_updated: u64, balances_updated: u64, transactions: TxSummary) -> Self {
        Self {
            accounts_updated,
            balances_updated,
            transactions_added: transactions.added,
            transactions_updated: transactions.updated,
            transactions_removed: transactions.removed,
        }
    }
}

impl RefreshError {
    /// An error with any code and message.
    pub fn new(code: ProblemCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The bank refused the token (401/403): the consent is revoked.
    pub fn consent_revoked() -> Self {
        Self::new(ProblemCode::ConsentRevoked, CONSENT_REVOKED_DETAIL)
    }

    /// The bank wants strong customer authentication; retrying cannot help.
    pub fn mfa_required() -> Self {
        Self::new(
            ProblemCode::MfaRequired,
            "The bank requires strong customer authentication; the user must authorise the consent again",
        )
    }

    /// The bank failed (5xx, timeout, 429) on every one of `attempts` tries.
    pub fn bank_unavailable(attempts: u32) -> Self {
        Self::new(
            ProblemCode::BankUnavailable,
            format!("The bank was unavailable after {attempts} attempts"),
        )
    }

    /// The bank's payload could not be read without storing wrong data.
    pub fn bank_error() -> Self {
        Self::new(
            ProblemCode::BankError,
            "The bank returned data that could not be read; nothing was stored",
        )
    }

    /// The refresh's job cannot run any more (dead-lettered, or lost with no worker
    /// holding it); `reason` says why.
    pub fn internal_error(reason: &str) -> Self {
        Self::new(
            ProblemCode::InternalError,
            format!("The refresh could not be run: {reason}"),
        )
    }

    /// The problem a client waiting on this refresh is answered with.
    pub fn to_problem(&self) -> Problem {
        Problem::from_refresh_error(self.code, self.message.clone())
    }
}

impl RefreshRecord {
    /// A freshly admitted refresh.
    pub fn initialized(
        refresh_id: RefreshId,
        consent_id: ConsentId,
        tenant_id: TenantId,
        requested_by: RequestedBy,
        date_requested: DateTime<Utc>,
        not_before: DateTime<Utc>,
    ) -> Self {
        Self {
            refresh_id,
            consent_id,
            tenant_id,
            requested_by,
            status: RefreshStatus::Initialized,
            date_requested,
            not_before,
            started_at: None,
            finished_at: None,
            error: None,
            summary: None,
        }
    }

    /// Ends the refresh as `UPDATED`.
    pub fn finish_updated(
        &mut self,
        summary: RefreshSummary,
        at: DateTime<Utc>,
    ) -> Result<(), TransitionError> {
        RefreshStatus::check_transition(Some(self.status), RefreshStatus::Updated)?;
        self.status = RefreshStatus::Updated;
        self.finished_at = Some(at);
        self.summary = Some(summary);
        Ok(())
    }

    /// Ends the refresh as `ERROR`.
    pub fn finish_error(
        &mut self,
        error: RefreshError,
        at: DateTime<Utc>,
    ) -> Result<(), TransitionError> {
        RefreshStatus::check_transition(Some(self.status), RefreshStatus::Error)?;
        self.status = RefreshStatus::Error;
        self.finished_at = Some(at);
        self.error = Some(error);
        Ok(())
    }

    /// For an `ERROR` refresh, the problem a waiting client gets, naming the refresh.
    pub fn problem(&self) -> Option<Problem> {
        match (&self.status, &self.error) {
            (RefreshStatus::Error, Some(error)) => {
                Some(error.to_problem().with_refresh_id(self.refresh_id))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;
    use uuid::Uuid;

    pub(crate) fn record() -> RefreshRecord {
        RefreshRecord::initialized(
            RefreshId::from_uuid(Uuid::from_u128(0x0190f5d2_6c1a_7b3e_8d4f_0a1b2c3d4e5f)),
            ConsentId::from_uuid(Uuid::from_u128(0x7d4c4b2a_1111_4222_8333_444455556666)),
            TenantId::parse("acme").unwrap(),
            RequestedBy::Api,
            "2024-05-01T10:00:00Z".parse().unwrap(),
            "2024-05-01T10:00:02Z".parse().unwrap(),
        )
    }

    fn check(record: &RefreshRecord, expected: serde_json::Value) {
        let json = serde_json::to_value(record).unwrap();
        assert_eq!(json, expected);
        assert_eq!(
            &serde_json::from_value::<RefreshRecord>(json).unwrap(),
            record
        );
    }

    #[test]
    fn json_shapes() {
        let mut r = record();
        check(
            &r,
            json!({
                "refreshId": "0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f",
                "consentId": "7d4c4b2a-1111-4222-8333-444455556666",
                "tenantId": "acme",
                "requestedBy": "API",
                "status": "INITIALIZED",
                "dateRequested": "2024-05-01T10:00:00.000Z",
                "notBefore": "2024-05-01T10:00:02.000Z",
                "startedAt": null,
                "finishedAt": null,
                "error": null,
                "summary": null,
            }),
        );
        r.started_at = Some("2024-05-01T10:00:03Z".parse().unwrap());
        let summary = RefreshSummary::new(
            2,
            3,
            TxSummary {
                added: 4,
                updated: 1,
                removed: 0,
            },
        );
        r.finish_updated(summary, "2024-05-01T10:00:05.250Z".parse().unwrap())
            .unwrap();
        check(
            &r,
            json!({
                "refreshId": "0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f",
                "consentId": "7d4c4b2a-1111-4222-8333-444455556666",
                "tenantId": "acme",
                "requestedBy": "API",
                "status": "UPDATED",
                "dateRequested": "2024-05-01T10:00:00.000Z",
                "notBefore": "2024-05-01T10:00:02.000Z",
                "startedAt": "2024-05-01T10:00:03.000Z",
                "finishedAt": "2024-05-01T10:00:05.250Z",
                "error": null,
                "summary": {
                    "accountsUpdated": 2,
                    "balancesUpdated": 3,
                    "transactionsAdded": 4,
                    "transactionsUpdated": 1,
                    "transactionsRemoved": 0,
                },
            }),
        );
        let mut r = record();
        r.finish_error(
            RefreshError::mfa_required(),
            "2024-05-01T10:00:04Z".parse().unwrap(),
        )
        .unwrap();
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["status"], "ERROR");
        assert_eq!(json["summary"], serde_json::Value::Null);
        assert_eq!(
            json["error"],
            json!({
                "code": "mfa_required",
                "message": "The bank requires strong customer authentication; the user must authorise the consent again",
            })
        );
    }

    #[test]
    fn lifecycle() {
        let t = |s: &str| -> DateTime<Utc> { s.parse().unwrap() };
        let mut r = record();
        assert_eq!(r.problem(), None);
        r.started_at = Some(t("2024-05-01T10:00:03Z"));
        r.finish_error(RefreshError::bank_unavailable(5), t("2024-05-01T10:01:00Z"))
            .unwrap();
        assert_eq!(
            r.finish_updated(RefreshSummary::default(), t("2024-05-01T10:02:00Z"))
                .unwrap_err(),
            TransitionError::AlreadyTerminal {
                from: RefreshStatus::Error,
                to: RefreshStatus::Updated
            }
        );
        assert_eq!(r.status, RefreshStatus::Error);
        assert_eq!(r.summary, None);
        let problem = r.problem().unwrap();
        assert_eq!(problem.code, ProblemCode::BankUnavailable);
        assert_eq!(problem.status, 503);
        assert_eq!(problem.detail, "The bank was unavailable after 5 attempts");
        assert_eq!(problem.refresh_id, Some(r.refresh_id));
    }

    #[test]
    fn refresh_errors() {
        let check = |e: RefreshError, code: &str, status: u16, message: &str| {
            assert_eq!(e.code.as_str(), code);
            assert_eq!(e.to_problem().status, status);
            assert_eq!(e.message, message);
        };
        check(
            RefreshError::consent_revoked(),
            "consent_revoked",
            403,
            "The consent or account access has been revoked",
        );
        check(
            RefreshError::bank_unavailable(3),
            "bank_unavailable",
            503,
            "The bank was unavailable after 3 attempts",
        );
        check(
            RefreshError::bank_error(),
            "bank_error",
            502,
            "The bank returned data that could not be read; nothing was stored",
        );
        check(
            RefreshError::mfa_required(),
            "mfa_required",
            403,
            "The bank requires strong customer authentication; the user must authorise the consent again",
        );
    }
}
