//! Refresh and consent statuses, and the one legal path of a refresh through its statuses.

use chrono::{DateTime, Utc};
use thiserror::Error;

use crate::parse::string_enum;
use crate::problem::Problem;

string_enum! {
    /// Where a refresh is: admitted, then exactly one terminal outcome.
    pub enum RefreshStatus as "refresh status" {
        /// Admitted; queued or running.
        Initialized => "INITIALIZED",
        /// Data stored (terminal).
        Updated => "UPDATED",
        /// Failed, with an error code (terminal).
        Error => "ERROR",
    }
}

/// A status change the refresh lifecycle does not allow.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum TransitionError {
    /// A new refresh must begin as `INITIALIZED`.
    #[error("a refresh must start as INITIALIZED, not {to}")]
    NotStartedInitialized {
        /// The status asked for.
        to: RefreshStatus,
    },
    /// An `INITIALIZED` refresh cannot be initialised again.
    #[error("the refresh is already INITIALIZED")]
    AlreadyInitialized,
    /// Nothing follows a terminal status.
    #[error("the refresh is already {from} and cannot become {to}")]
    AlreadyTerminal {
        /// The terminal status the refresh has.
        from: RefreshStatus,
        /// The status asked for.
        to: RefreshStatus,
    },
}

impl RefreshStatus {
    /// `UPDATED` and `ERROR` are final.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Updated | Self::Error)
    }

    /// The status word in event types and routing keys.
    pub const fn event_segment(self) -> &'static str {
        match self {
            Self::Initialized => "initialized",
            Self::Updated => "updated",
            Self::Error => "error",
        }
    }

    /// Allows only `(none) → INITIALIZED → UPDATED | ERROR`.
    pub fn check_transition(
        from: Option<RefreshStatus>,
        to: RefreshStatus,
    ) -> Result<(), TransitionError> {
        match (from, to) {
            (None, Self::Initialized) | (Some(Self::Initialized), Self::Updated | Self::Error) => {
                Ok(())
            }
            (None, to) => Err(TransitionError::NotStartedInitialized { to }),
            (Some(Self::Initialized), Self::Initialized) => {
                Err(TransitionError::AlreadyInitialized)
            }
            (Some(from), to) => Err(TransitionError::AlreadyTerminal { from, to }),
        }
    }
}

string_enum! {
    /// Whether a consent may still be used.
    pub enum ConsentStatus as "consent status" {
        /// Usable.
        Active => "ACTIVE",
        /// Revoked by the user, the tenant or the bank.
        Revoked => "REVOKED",
        /// Past its `expiresAt`.
        Expired => "EXPIRED",
        /// Not refreshed successfully for `inactivationDays`; its data is removed.
        Inactive => "INACTIVE",
    }
}

impl ConsentStatus {
    /// The status as it holds at `now` (SPEC §6 expiry): a consent stored `ACTIVE` whose
    /// `expiresAt` has passed is `EXPIRED` from that instant, whether or not the
    /// scheduler has marked it yet.
    pub fn at(self, expires_at: DateTime<Utc>, now: DateTime<Utc>) -> Self {
        if self == Self::Active && expires_at <= now {
            Self::Expired
        } else {
            self
        }
    }

    /// The refusal of admission rule 2 for this status; `None` when the consent is usable.
    pub fn refusal(self) -> Option<Problem> {
        match self {
            Self::Active => None,
            Self::Revoked => Some(Problem::consent_revoked()),
            Self::Expired => Some(Problem::consent_expired()),
            Self::Inactive => Some(Problem::consent_inactive()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::ProblemCode;
    use RefreshStatus::{Error, Initialized, Updated};

    fn check(from: Option<RefreshStatus>, to: RefreshStatus, expected: Result<(), &str>) {
        let got = RefreshStatus::check_transition(from, to).map_err(|e| e.to_string());
        assert_eq!(got, expected.map_err(str::to_owned), "{from:?} -> {to:?}");
    }

    #[test]
    fn a_consent_past_its_expiry_is_expired() {
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let expires = at("2026-12-01T10:00:00Z");
        let check = |status: ConsentStatus, now: &str, expected: ConsentStatus| {
            assert_eq!(status.at(expires, at(now)), expected, "{status:?} at {now}");
        };
        use ConsentStatus::*;
        check(Active, "2026-12-01T09:59:59.999Z", Active);
        check(Active, "2026-12-01T10:00:00Z", Expired);
        check(Active, "2027-01-01T00:00:00Z", Expired);
        check(Revoked, "2027-01-01T00:00:00Z", Revoked);
        check(Inactive, "2027-01-01T00:00:00Z", Inactive);
        check(Expired, "2026-01-01T00:00:00Z", Expired);
    }

    #[test]
    fn transitions() {
        check(None, Initialized, Ok(()));
        check(Some(Initialized), Updated, Ok(()));
        check(Some(Initialized), Error, Ok(()));
        check(
            None,
            Updated,
            Err("a refresh must start as INITIALIZED, not UPDATED"),
        );
        check(
            None,
            Error,
            Err("a refresh must start as INITIALIZED, not ERROR"),
        );
        check(
            Some(Initialized),
            Initialized,
            Err("the refresh is already INITIALIZED"),
        );
        check(
            Some(Updated),
            Initialized,
            Err("the refresh is already UPDATED and cannot become INITIALIZED"),
        );
        check(
            Some(Updated),
            Updated,
            Err("the refresh is already UPDATED and cannot become UPDATED"),
        );
        check(
            Some(Updated),
            Error,
            Err("the refresh is already UPDATED and cannot become ERROR"),
        );
        check(
            Some(Error),
            Initialized,
            Err("the refresh is already ERROR and cannot become INITIALIZED"),
        );
        check(
            Some(Error),
            Updated,
            Err("the refresh is already ERROR and cannot become UPDATED"),
        );
        check(
            Some(Error),
            Error,
            Err("the refresh is already ERROR and cannot become ERROR"),
        );
    }

    #[test]
    fn refresh_status_words() {
        let check = |status: RefreshStatus, wire: &str, segment: &str, terminal: bool| {
            assert_eq!(status.as_str(), wire);
            assert_eq!(
                serde_json::to_string(&status).unwrap(),
                format!("\"{wire}\"")
            );
            assert_eq!(wire.parse::<RefreshStatus>().unwrap(), status);
            assert_eq!(status.event_segment(), segment);
            assert_eq!(status.is_terminal(), terminal);
        };
        check(Initialized, "INITIALIZED", "initialized", false);
        check(Updated, "UPDATED", "updated", true);
        check(Error, "ERROR", "error", true);
        assert!("initialized".parse::<RefreshStatus>().is_err());
    }

    #[test]
    fn consent_statuses() {
        let check = |status: ConsentStatus, wire: &str, refusal: Option<ProblemCode>| {
            assert_eq!(status.as_str(), wire);
            assert_eq!(
                serde_json::to_string(&status).unwrap(),
                format!("\"{wire}\"")
            );
            assert_eq!(
                serde_json::from_str::<ConsentStatus>(&format!("\"{wire}\"")).unwrap(),
                status
            );
            assert_eq!(wire.parse::<ConsentStatus>().unwrap(), status);
            assert_eq!(status.refusal().map(|p| p.code), refusal);
        };
        check(ConsentStatus::Active, "ACTIVE", None);
        check(
            ConsentStatus::Revoked,
            "REVOKED",
            Some(ProblemCode::ConsentRevoked),
        );
        check(
            ConsentStatus::Expired,
            "EXPIRED",
            Some(ProblemCode::ConsentExpired),
        );
        check(
            ConsentStatus::Inactive,
            "INACTIVE",
            Some(ProblemCode::ConsentInactive),
        );
        assert!("active".parse::<ConsentStatus>().is_err());
    }
}
