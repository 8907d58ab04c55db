//! A pure model of the gate's decision for one consent (SPEC §2 rules 3 and 4): the
//! reference the Redis scripts are checked against on random histories.
//!
//! The scripts decide by Redis time inside Lua; this says, for the same state and
//! instant, what they must answer.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::{QuotaRule, QuotaWindow, ROLLING_WINDOW, RefreshId, next_midnight, window_start};

/// One rule's standing at an instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleStanding {
    /// Admits; `used` admissions counted.
    Admits { used: u32 },
    /// Exhausted: `used` counted, admits again at `next`.
    Refuses { used: u32, next: DateTime<Utc> },
}

/// The model's decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelDecision {
    /// Rule 3: the lock is held by this refresh.
    Locked(RefreshId),
    /// Rule 4: the exhausted rule whose wait is longest (the first of equals):
    /// its index among `rules`, `used` and when it admits again.
    OverQuota {
        rule: usize,
        used: u32,
        next: DateTime<Utc>,
    },
    Admitted,
}

/// `rule` at `now`, given the admission times it counted (any order).
pub fn rule_standing(
    rule: &QuotaRule,
    counted: &[DateTime<Utc>],
    now: DateTime<Utc>,
    tz: Tz,
) -> RuleStanding {
    let since = window_start(rule.window, now, tz);
    let mut inside: Vec<DateTime<Utc>> = counted
        .iter()
        .copied()
        .filter(|t| match rule.window {
            QuotaWindow::Rolling24h => *t > since,
            QuotaWindow::CalendarDay => *t >= since,
        })
        .collect();
    inside.sort_unstable();
    let used = u32::try_from(inside.len()).unwrap_or(u32::MAX);
    if used < rule.limit {
        return RuleStanding::Admits { used };
    }
    let next = match rule.window {
        // A place frees up when the (used - limit + 1)-th oldest ages out.
        QuotaWindow::Rolling24h => {
            let kth = usize::try_from(used - rule.limit).unwrap_or(0);
            inside.get(kth).map_or(now, |t| *t + ROLLING_WINDOW)
        }
        QuotaWindow::CalendarDay => next_midnight(now, tz),
    };
    RuleStanding::Refuses { used, next }
}

/// The decision for one consent: its lock holder, and for each rule counting the
/// request the admission times that rule counted.
pub fn consent_decision(
    lock: Option<RefreshId>,
    rules: &[(&QuotaRule, &[DateTime<Utc>])],
    now: DateTime<Utc>,
    tz: Tz,
) -> ModelDecision {
    if let Some(holder) = lock {
        return ModelDecision::Locked(holder);
    }
    let mut worst: Option<(usize, u32, DateTime<Utc>)> = None;
    for (index, (rule, counted)) in rules.iter().enumerate() {
        if let RuleStanding::Refuses { used, next } = rule_standing(rule, counted, now, tz)
            && worst.is_none_or(|(_, _, at)| next > at)
        {
            worst = Some((index, used, next));
        }
    }
    match worst {
        Some((rule, used, next)) => ModelDecision::OverQuota { rule, used, next },
        None => ModelDecision::Admitted,
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;
    use crate::RequestedBy;

    fn rule(limit: u32, window: QuotaWindow) -> QuotaRule {
        QuotaRule {
            sources: vec![RequestedBy::Api],
            limit,
            window,
        }
    }

    #[test]
    fn rolling_frees_a_place_when_the_kth_oldest_ages_out() {
        let now = DateTime::parse_from_rfc3339("2026-03-29T12:00:00Z")
            .unwrap()
            .to_utc();
        let ago = |h: i64| now - TimeDelta::hours(h);
        let r = rule(2, QuotaWindow::Rolling24h);
        let history = [ago(30), ago(20), ago(10), ago(1)];
        assert_eq!(
            rule_standing(&r, &history, now, Tz::UTC),
            RuleStanding::Refuses {
                used: 3,
                next: ago(10) + ROLLING_WINDOW
            }
        );
        assert_eq!(
            rule_standing(&r, &history[..2], now, Tz::UTC),
            RuleStanding::Admits { used: 1 }
        );
        // Exactly 24 h old no longer counts.
        assert_eq!(
            rule_standing(&r, &[ago(24), ago(1)], now, Tz::UTC),
            RuleStanding::Admits { used: 1 }
        );
    }

    #[test]
    fn calendar_day_counts_from_local_midnight_and_the_longest_wait_decides() {
        let tz: Tz = "Europe/London".parse().unwrap();
        // The day the clocks go forward: 23 h long.
        let now = DateTime::parse_from_rfc3339("2026-03-29T12:00:00Z")
            .unwrap()
            .to_utc();
        let day = rule(1, QuotaWindow::CalendarDay);
        let rolling = rule(1, QuotaWindow::Rolling24h);
        let yesterday = DateTime::parse_from_rfc3339("2026-03-28T23:30:00Z")
            .unwrap()
            .to_utc();
        let morning = DateTime::parse_from_rfc3339("2026-03-29T01:00:00Z")
            .unwrap()
            .to_utc();
        assert_eq!(
            rule_standing(&day, &[yesterday], now, tz),
            RuleStanding::Admits { used: 0 }
        );
        let midnight = DateTime::parse_from_rfc3339("2026-03-29T23:00:00Z")
            .unwrap()
            .to_utc();
        let both = [(&day, &[morning][..]), (&rolling, &[morning][..])];
        assert_eq!(
            consent_decision(None, &both, now, tz),
            ModelDecision::OverQuota {
                rule: 1,
                used: 1,
                next: morning + ROLLING_WINDOW
            }
        );
        assert!(morning + ROLLING_WINDOW > midnight);
        let holder = RefreshId::from_uuid(uuid::Uuid::nil());
        assert_eq!(
            consent_decision(Some(holder), &both, now, tz),
            ModelDecision::Locked(holder)
        );
    }
}
