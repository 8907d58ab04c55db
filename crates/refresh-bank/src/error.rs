//! The outcome classes of a bank fetch that did not produce data.

use std::time::Duration;

/// Why a fetch produced no data, classified once for the worker:
///
/// | variant | refresh outcome |
/// | --- | --- |
/// | `Revoked` | `ERROR consent_revoked`, consent becomes `REVOKED` |
/// | `Expired` | `ERROR consent_expired`, consent becomes `EXPIRED` |
/// | `MfaRequired` | `ERROR mfa_required`, no retry |
/// | `Transient` | retried with backoff (at least `retry_after`), then `bank_unavailable` |
/// | `Malformed` | `ERROR bank_error`, nothing stored |
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BankError {
    /// The bank refused the token (401, or 403 without an SCA error code).
    #[error("consent revoked or access removed at the bank")]
    Revoked,
    /// The bank says the consent has expired (NextGenPSD2 `CONSENT_EXPIRED`).
    #[error("consent expired at the bank")]
    Expired,
    /// The bank requires the customer to authenticate again (strong customer
    /// authentication). See [`crate::ObieConnector`] for the convention.
    #[error("the bank requires strong customer authentication")]
    MfaRequired,
    /// Worth retrying: 5xx, 408, 429, a timeout or a connection failure.
    #[error("bank unavailable: {reason}")]
    Transient {
        /// What the bank asked for in `Retry-After`, if anything.
        retry_after: Option<Duration>,
        reason: String,
    },
    /// The bank answered something that cannot be stored safely: invalid JSON, a
    /// schema violation (a float or malformed amount, a missing required field),
    /// an unexpected 4xx, or pagination that does not end.
    #[error("malformed bank response: {0}")]
    Malformed(String),
}

impl BankError {
    pub(crate) fn transient(reason: impl Into<String>) -> Self {
        Self::Transient {
            retry_after: None,
            reason: reason.into(),
        }
    }

    /// Whether the worker should try again later.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }
}
