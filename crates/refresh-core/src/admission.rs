//! The consent checks of admission rules 1 and 2.

use chrono::{DateTime, Utc};

use crate::ids::{ProviderId, TenantId};
use crate::problem::Problem;
use crate::status::ConsentStatus;

/// The facts of a consent that rules 1 and 2 read (and the stagger bucket and the
/// job name), which the gate mirrors in Redis so that its admit script checks them
/// itself; PostgreSQL's consent row stays the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsentFacts {
    pub tenant_id: TenantId,
    pub provider_id: ProviderId,
    pub status: ConsentStatus,
    pub expires_at: DateTime<Utc>,
}

/// On whose behalf a request is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller<'a> {
    /// A tenant: sees only its own consents.
    Tenant(&'a TenantId),
    /// A platform operator (`api:admin`): may act on any tenant's consent.
    Admin,
}

/// Admission rules 1 and 2, in that order: the refusal, or `None` when the
/// request may go on to the in-flight, quota and stagger checks. `consent` is
/// the stored consent's tenant and status, `None` when unknown. Another
/// tenant's consent is reported as not found, so ids cannot be probed across tenants.
pub fn consent_refusal(
    consent: Option<(&TenantId, ConsentStatus)>,
    caller: Caller<'_>,
) -> Option<Problem> {
    let Some((owner, status)) = consent else {
        return Some(Problem::consent_not_found());
    };
    if let Caller::Tenant(tenant) = caller
        && tenant != owner
    {
        return Some(Problem::consent_not_found());
    }
    status.refusal()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::ProblemCode;

    #[test]
    fn consent_checks() {
        let acme = TenantId::parse("acme").unwrap();
        let other = TenantId::parse("other").unwrap();
        let check = |consent: Option<(&TenantId, ConsentStatus)>,
                     caller: Caller<'_>,
                     expected: Option<ProblemCode>| {
            assert_eq!(
                consent_refusal(consent, caller).map(|p| p.code),
                expected,
                "{consent:?} {caller:?}"
            );
        };
        use ConsentStatus::*;
        use ProblemCode::*;
        check(Some((&acme, Active)), Caller::Tenant(&acme), None);
        check(Some((&acme, Active)), Caller::Admin, None);
        check(None, Caller::Tenant(&acme), Some(ConsentNotFound));
        check(None, Caller::Admin, Some(ConsentNotFound));
        check(
            Some((&other, Active)),
            Caller::Tenant(&acme),
            Some(ConsentNotFound),
        );
        // Rule 1 before rule 2: another tenant's revoked consent is still "not found".
        check(
            Some((&other, Revoked)),
            Caller::Tenant(&acme),
            Some(ConsentNotFound),
        );
        check(
            Some((&acme, Revoked)),
            Caller::Tenant(&acme),
            Some(ConsentRevoked),
        );
        check(
            Some((&acme, Expired)),
            Caller::Tenant(&acme),
            Some(ConsentExpired),
        );
        check(
            Some((&acme, Inactive)),
            Caller::Tenant(&acme),
            Some(ConsentInactive),
        );
        check(Some((&other, Expired)), Caller::Admin, Some(ConsentExpired));
    }
}
