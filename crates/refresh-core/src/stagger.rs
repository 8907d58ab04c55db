//! The global stagger: how far apart refresh starts are spaced, and the pure slot decision.

use chrono::TimeDelta;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::{ProviderId, TenantId};
use crate::parse::string_enum;

string_enum! {
    /// Which refreshes share one stagger budget.
    pub enum StaggerScope as "stagger scope" {
        /// All refreshes, whatever the tenant or bank.
        Global => "global",
        /// Each tenant separately.
        Tenant => "tenant",
        /// Each bank (provider) separately.
        Provider => "provider",
    }
}

impl StaggerScope {
    /// The name of the budget a refresh of `tenant` at `provider` draws from,
    /// for use in a key: `global`, `tenant.{tenantId}` or `provider.{providerId}`.
    pub fn bucket(self, tenant: &TenantId, provider: &ProviderId) -> String {
        self.bucket_without_provider(tenant)
            .unwrap_or_else(|| format!("provider.{provider}"))
    }

    /// [`Self::bucket`] when the provider is not known: `None` for
    /// [`Self::Provider`], which needs it.
    pub fn bucket_without_provider(self, tenant: &TenantId) -> Option<String> {
        match self {
            Self::Global => Some("global".to_owned()),
            Self::Tenant => Some(format!("tenant.{tenant}")),
            Self::Provider => None,
        }
    }
}

/// The `stagger` settings: at most `limit` refresh starts in any
/// `period_secs` window; admission is refused when the earliest free slot is
/// more than `max_delay_secs` away.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StaggerSettings {
    /// Starts allowed per period (default 30).
    pub limit: u32,
    /// The period in seconds (default 60).
    pub period_secs: u64,
    /// The longest wait for a slot before `backlog_full` (default 3600).
    pub max_delay_secs: u64,
    /// Which refreshes share a budget (default `global`).
    pub scope: StaggerScope,
    /// The share of a period's slots that `AUTOSYNC` requests may take, in (0, 1]
    /// (default 0.5; SPEC §6 fair share).
    pub autosync_share: f64,
}

impl Default for StaggerSettings {
    fn default() -> Self {
        Self {
            limit: 30,
            period_secs: 60,
            max_delay_secs: 3600,
            scope: StaggerScope::Global,
            autosync_share: 0.5,
        }
    }
}

/// Stagger settings that cannot work.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum StaggerError {
    /// `stagger.limit` is 0.
    #[error("stagger.limit must be at least 1")]
    ZeroLimit,
    /// `stagger.period_secs` is 0.
    #[error("stagger.period_secs must be at least 1")]
    ZeroPeriod,
    /// `stagger.autosync_share` is not in (0, 1].
    #[error("stagger.autosync_share must be more than 0 and at most 1")]
    AutosyncShare,
}

impl StaggerSettings {
    /// Checks the settings are usable; run once when settings are loaded.
    pub fn validate(&self) -> Result<(), StaggerError> {
        if self.limit == 0 {
            return Err(StaggerError::ZeroLimit);
        }
        if self.period_secs == 0 {
            return Err(StaggerError::ZeroPeriod);
        }
        if !(self.autosync_share > 0.0 && self.autosync_share <= 1.0) {
            return Err(StaggerError::AutosyncShare);
        }
        Ok(())
    }

    /// The period as a duration.
    pub fn period(&self) -> TimeDelta {
        secs(self.period_secs)
    }

    /// The longest allowed wait for a slot.
    pub fn max_delay(&self) -> TimeDelta {
        secs(self.max_delay_secs)
    }

    /// The gap between consecutive start slots: period / limit, rounded up to
    /// the nanosecond so that `limit + 1` starts never fit in one period.
    /// A limit of 0 (refused by [`Self::validate`]) is read as 1.
    pub fn spacing(&self) -> TimeDelta {
        const NANOS_PER_SEC: u128 = 1_000_000_000;
        let nanos =
            (u128::from(self.period_secs) * NANOS_PER_SEC).div_ceil(u128::from(self.limit.max(1)));
        i64::try_from(nanos).map_or(TimeDelta::MAX, TimeDelta::nanoseconds)
    }

    /// How many of a period's `limit` slots auto-syncs may take: the share of the
    /// limit, rounded down, but at least one.
    pub fn autosync_limit(&self) -> u32 {
        let share = self.autosync_share.clamp(0.0, 1.0);
        // Exact for the small integers a limit is; the cast saturates.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a non-negative value no larger than the limit"
        )]
        let allowed = (f64::from(self.limit) * share).floor() as u32;
        allowed.clamp(1, self.limit.max(1))
    }

    /// The gap between consecutive auto-sync slots: period / [`Self::autosync_limit`],
    /// rounded up like [`Self::spacing`].
    pub fn autosync_spacing(&self) -> TimeDelta {
        const NANOS_PER_SEC: u128 = 1_000_000_000;
        let nanos = (u128::from(self.period_secs) * NANOS_PER_SEC)
            .div_ceil(u128::from(self.autosync_limit()));
        i64::try_from(nanos).map_or(TimeDelta::MAX, TimeDelta::nanoseconds)
    }
}

/// Seconds from configuration as a duration, saturating far beyond any sensible value.
/// The largest span the gate hands its scripts (about 35 years of milliseconds).
pub const STAGGER_MAX_MS: i64 = 1 << 50;

/// Whole milliseconds, rounded up.
fn millis_ceil(d: TimeDelta) -> i64 {
    let ms = d.num_milliseconds();
    if d > TimeDelta::milliseconds(ms) {
        ms.saturating_add(1)
    } else {
        ms
    }
}

impl StaggerSettings {
    /// The spacings the `take_slot` script works with, in whole milliseconds:
    /// `(any two slots of a bucket, the auto-sync chain)`. Both are rounded up, so
    /// `limit + 1` slots (or more auto-syncs than their share) never fit in one
    /// period. When auto-syncs take at most half of the limit, their chain is also
    /// at least two spacings apart: an on-demand slot then always fits between two
    /// auto-sync slots. (Rounding alone can leave that gap a millisecond short — 6
    /// per 2 s gives 334 and 667 — and an on-demand request would be pushed past
    /// every queued auto-sync.)
    pub fn slot_spacings_ms(&self) -> (i64, i64) {
        let spacing = millis_ceil(self.spacing()).clamp(1, STAGGER_MAX_MS);
        let mut autosync = millis_ceil(self.autosync_spacing()).clamp(spacing, STAGGER_MAX_MS);
        if 2 * u64::from(self.autosync_limit()) <= u64::from(self.limit) {
            autosync = autosync.max(spacing.saturating_mul(2).min(STAGGER_MAX_MS));
        }
        (spacing, autosync)
    }
}

fn secs(s: u64) -> TimeDelta {
    i64::try_from(s)
        .ok()
        .and_then(TimeDelta::try_seconds)
        .unwrap_or(TimeDelta::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(limit: u32, period_secs: u64, max_delay_secs: u64) -> StaggerSettings {
        StaggerSettings {
            limit,
            period_secs,
            max_delay_secs,
            scope: StaggerScope::Global,
            autosync_share: 0.5,
        }
    }

    #[test]
    fn slot_spacings_leave_room_for_on_demand_between_autosyncs() {
        let check = |limit: u32, period_secs: u64, share: f64, expected: (i64, i64)| {
            let s = StaggerSettings {
                autosync_share: share,
                ..settings(limit, period_secs, 0)
            };
            assert_eq!(
                s.slot_spacings_ms(),
                expected,
                "{limit}/{period_secs}s × {share}"
            );
        };
        check(30, 60, 0.5, (2_000, 4_000));
        // 333.3… and 666.6… ms: rounding alone would give 334 and 667.
        check(6, 2, 0.5, (334, 668));
        check(18, 60, 0.5, (3_334, 6_668));
        check(7, 60, 0.5, (8_572, 20_000));
        // Above half the limit, the auto-sync chain is only rounded.
        check(6, 2, 0.75, (334, 500));
        check(4, 4, 1.0, (1_000, 1_000));
    }

    #[test]
    fn autosync_takes_its_share_of_the_limit() {
        let check = |limit: u32, share: f64, allowed: u32, spacing_ms: i64| {
            let s = StaggerSettings {
                autosync_share: share,
                ..settings(limit, 60, 0)
            };
            assert_eq!(s.autosync_limit(), allowed, "{limit} × {share}");
            assert_eq!(
                s.autosync_spacing(),
                TimeDelta::milliseconds(spacing_ms),
                "{limit} × {share}"
            );
        };
        check(30, 0.5, 15, 4_000);
        check(10, 0.5, 5, 12_000);
        check(30, 1.0, 30, 2_000);
        check(30, 0.01, 1, 60_000);
        check(7, 0.5, 3, 20_000);
        let invalid = |share: f64| {
            let s = StaggerSettings {
                autosync_share: share,
                ..StaggerSettings::default()
            };
            assert_eq!(s.validate(), Err(StaggerError::AutosyncShare), "{share}");
        };
        invalid(0.0);
        invalid(-0.5);
        invalid(1.5);
        invalid(f64::NAN);
        assert_eq!(StaggerSettings::default().validate(), Ok(()));
    }

    #[test]
    fn spacing_is_period_over_limit_rounded_up() {
        let check = |limit: u32, period: u64, nanos: i64| {
            assert_eq!(
                settings(limit, period, 0).spacing(),
                TimeDelta::nanoseconds(nanos),
                "{period}/{limit}"
            );
        };
        check(30, 60, 2_000_000_000);
        check(1, 1, 1_000_000_000);
        check(1, 60, 60_000_000_000);
        check(7, 60, 8_571_428_572);
        check(3, 1, 333_333_334);
        check(1000, 1, 1_000_000);
        check(0, 60, 60_000_000_000);
    }

    #[test]
    fn limit_plus_one_starts_never_fit_in_a_period() {
        let check = |limit: u32, period: u64| {
            let s = settings(limit, period, 0);
            assert!(
                s.spacing() * i32::try_from(limit).unwrap() >= s.period(),
                "{period}/{limit}"
            );
        };
        check(30, 60);
        check(7, 60);
        check(3, 1);
        check(9, 10);
    }

    #[test]
    fn validation() {
        let check = |limit: u32, period: u64, expected: Result<(), StaggerError>| {
            assert_eq!(settings(limit, period, 0).validate(), expected);
        };
        check(30, 60, Ok(()));
        check(1, 1, Ok(()));
        check(0, 60, Err(StaggerError::ZeroLimit));
        check(30, 0, Err(StaggerError::ZeroPeriod));
        assert_eq!(StaggerSettings::default().validate(), Ok(()));
    }

    #[test]
    fn config() {
        let check = |json: &str, expected: Result<StaggerSettings, &str>| {
            let got = serde_json::from_str::<StaggerSettings>(json).map_err(|e| e.to_string());
            match (got, expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, want),
                (Err(got), Err(want)) => assert!(got.contains(want), "{got}"),
                (got, want) => panic!("{json}: got {got:?}, expected {want:?}"),
            }
        };
        check("{}", Ok(StaggerSettings::default()));
        check(
            r#"{"limit": 5, "period_secs": 10, "max_delay_secs": 60, "scope": "provider", "autosync_share": 0.25}"#,
            Ok(StaggerSettings {
                limit: 5,
                period_secs: 10,
                max_delay_secs: 60,
                scope: StaggerScope::Provider,
                autosync_share: 0.25,
            }),
        );
        check(
            r#"{"scope": "tenant"}"#,
            Ok(StaggerSettings {
                scope: StaggerScope::Tenant,
                ..Default::default()
            }),
        );
        check(r#"{"scope": "Global"}"#, Err("unknown stagger scope"));
        check(r#"{"limt": 5}"#, Err("unknown field"));
    }

    #[test]
    fn buckets() {
        let tenant = TenantId::parse("acme").unwrap();
        let provider = ProviderId::parse("sim").unwrap();
        let check = |scope: StaggerScope, expected: &str| {
            assert_eq!(scope.bucket(&tenant, &provider), expected)
        };
        check(StaggerScope::Global, "global");
        check(StaggerScope::Tenant, "tenant.acme");
        check(StaggerScope::Provider, "provider.sim");
    }
}
