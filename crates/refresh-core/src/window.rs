//! Which data a refresh fetches (SPEC §5): an initial load or a plain refresh, and
//! from which booking date on.
//!
//! A plain refresh starts at the earliest of the last successful refresh minus the
//! overlap and the booking date of the oldest transaction still stored as
//! `PENDING`, never further back than the history window. So a pending transaction
//! is fetched again on every refresh until the bank books it (or it falls out of
//! the history window). Until an initial load has succeeded, every refresh is an
//! initial load.

use chrono::{DateTime, NaiveDate, NaiveTime, TimeDelta, Utc};

/// `worker.overlap_days` and `worker.history_days`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowRules {
    /// How far before the last successful refresh a plain refresh fetches again.
    pub overlap: TimeDelta,
    /// How far back any fetch reaches (the initial load's whole window).
    pub history: TimeDelta,
}

impl WindowRules {
    /// The rules for `overlap_days` and `history_days`.
    pub fn from_days(overlap_days: u32, history_days: u32) -> Self {
        Self {
            overlap: TimeDelta::days(overlap_days.into()),
            history: TimeDelta::days(history_days.into()),
        }
    }
}

/// What is known about a consent's stored data when its refresh starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchBasis {
    /// The refresh was admitted as an initial load (a consent's registration).
    pub requested_initial: bool,
    /// An initial load of the consent has succeeded before.
    pub initial_loaded: bool,
    /// When the last successful refresh finished.
    pub last_refreshed_at: Option<DateTime<Utc>>,
    /// The earliest booking date among the transactions stored as `PENDING`
    /// (the adapter takes the earlier of the bank's date and the UTC date of the
    /// booking instant, so that a bank filtering on either sees it).
    pub oldest_pending: Option<NaiveDate>,
}

/// What to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchScope {
    /// Load every data kind (parties, beneficiaries, ...), not only accounts,
    /// balances and transactions.
    pub initial: bool,
    /// The first booking date fetched; banks are asked from its start (00:00 UTC).
    pub from: NaiveDate,
}

impl FetchScope {
    /// The first instant of the window: 00:00 UTC of [`FetchScope::from`].
    pub fn from_instant(&self) -> DateTime<Utc> {
        self.from.and_time(NaiveTime::MIN).and_utc()
    }
}

/// Decides what a refresh starting at `now` fetches.
pub fn fetch_scope(basis: &FetchBasis, rules: WindowRules, now: DateTime<Utc>) -> FetchScope {
    let oldest = (now - rules.history).date_naive();
    let initial = basis.requested_initial || !basis.initial_loaded;
    if initial {
        return FetchScope {
            initial,
            from: oldest,
        };
    }
    let since_last = basis
        .last_refreshed_at
        .map_or(oldest, |t| (t - rules.overlap).date_naive());
    let from = basis
        .oldest_pending
        .map_or(since_last, |pending| pending.min(since_last));
    FetchScope {
        initial,
        from: from.max(oldest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn date(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    const NOW: &str = "2026-12-02T03:30:00Z";

    /// `last` and `pending` as text ("" for none); expects (initial, from).
    fn check(requested: bool, loaded: bool, last: &str, pending: &str, want: (bool, &str)) {
        let basis = FetchBasis {
            requested_initial: requested,
            initial_loaded: loaded,
            last_refreshed_at: (!last.is_empty()).then(|| at(last)),
            oldest_pending: (!pending.is_empty()).then(|| date(pending)),
        };
        let scope = fetch_scope(&basis, WindowRules::from_days(7, 90), at(NOW));
        assert_eq!(
            (scope.initial, scope.from),
            (want.0, date(want.1)),
            "{basis:?}"
        );
    }

    #[test]
    fn initial_loads_fetch_the_whole_history() {
        check(true, false, "", "", (true, "2026-09-03"));
        // Asked for again (a re-registration), whatever was stored.
        check(true, true, "2026-12-01T10:00:00Z", "", (true, "2026-09-03"));
        // The initial load failed: the next refresh is one, though it was a plain request.
        check(false, false, "", "", (true, "2026-09-03"));
        check(
            false,
            false,
            "2026-12-01T10:00:00Z",
            "2026-11-30",
            (true, "2026-09-03"),
        );
    }

    #[test]
    fn plain_refreshes_start_at_the_overlap_or_the_oldest_pending() {
        // The overlap before the last success.
        check(
            false,
            true,
            "2026-12-01T10:00:00Z",
            "",
            (false, "2026-11-24"),
        );
        // A pending transaction older than that widens the window to its date.
        check(
            false,
            true,
            "2026-12-01T10:00:00Z",
            "2026-11-23",
            (false, "2026-11-23"),
        );
        // A newer one does not narrow it.
        check(
            false,
            true,
            "2026-12-01T10:00:00Z",
            "2026-11-30",
            (false, "2026-11-24"),
        );
        // Never past the history window.
        check(
            false,
            true,
            "2026-12-01T10:00:00Z",
            "2026-08-24",
            (false, "2026-09-03"),
        );
        check(
            false,
            true,
            "2026-01-01T10:00:00Z",
            "",
            (false, "2026-09-03"),
        );
        // Loaded but never a recorded success: the whole history.
        check(false, true, "", "", (false, "2026-09-03"));
        check(false, true, "", "2026-11-30", (false, "2026-09-03"));
    }

    #[test]
    fn the_window_starts_at_midnight_utc() {
        let scope = FetchScope {
            initial: false,
            from: date("2026-11-24"),
        };
        assert_eq!(scope.from_instant(), at("2026-11-24T00:00:00Z"));
    }
}
