//! Auto-sync timing (SPEC §6): when a consent is due, the deterministic jitter that
//! spreads a tenant's consents over the interval, and the backoff of a consent whose
//! auto-syncs keep failing.

use chrono::{DateTime, TimeDelta, Utc};

use crate::ids::ConsentId;

/// The jitter is at most this share of the interval (SPEC §6: up to 10 %), in
/// ten-thousandths.
pub const JITTER_MAX_BP: u32 = 1_000;

/// The consent's jitter in ten-thousandths of the interval, in `0..JITTER_MAX_BP`:
/// FNV-1a over the id's bytes, so consents registered together (even with sequential
/// ids) get spread due times, and every replica computes the same one.
pub fn autosync_jitter_bp(consent: ConsentId) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in consent.as_uuid().as_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % JITTER_MAX_BP
}

/// When a consent last refreshed successfully at `anchor` (or registered then) is due:
/// `anchor + interval − jitter`.
pub fn autosync_due_at(
    anchor: DateTime<Utc>,
    interval_hours: u32,
    jitter_bp: u32,
) -> DateTime<Utc> {
    let interval_ms = i64::from(interval_hours) * 3_600_000;
    let jitter_ms = interval_ms * i64::from(jitter_bp.min(JITTER_MAX_BP)) / 10_000;
    anchor + TimeDelta::milliseconds(interval_ms - jitter_ms)
}

/// The first retry of a failed auto-sync comes this long after it was requested.
pub const AUTOSYNC_BACKOFF_BASE: TimeDelta = TimeDelta::seconds(60);
/// Retries of a consent that keeps failing are never further apart than this.
pub const AUTOSYNC_BACKOFF_MAX: TimeDelta = TimeDelta::hours(1);

/// How long after its `attempts`-th consecutive auto-sync request (from 1) without a
/// successful refresh a consent may be requested again: doubling from a minute, at
/// most an hour. A success in between starts the count again.
pub fn autosync_backoff(attempts: u32) -> TimeDelta {
    let exponent = attempts.saturating_sub(1).min(16);
    let delay = AUTOSYNC_BACKOFF_BASE * (1_i32 << exponent);
    delay.min(AUTOSYNC_BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn jitter_is_deterministic_bounded_and_spread() {
        let ids: Vec<ConsentId> = (1..=200u128)
            .map(|n| ConsentId::from_uuid(Uuid::from_u128(n)))
            .collect();
        let jitters: Vec<u32> = ids.iter().map(|id| autosync_jitter_bp(*id)).collect();
        assert!(jitters.iter().all(|j| *j < JITTER_MAX_BP));
        assert_eq!(
            jitters,
            ids.iter()
                .map(|id| autosync_jitter_bp(*id))
                .collect::<Vec<_>>()
        );
        // Sequential ids land in many different tenths of the jitter range.
        let mut deciles = [0u32; 10];
        for j in &jitters {
            deciles[(*j / 100) as usize] += 1;
        }
        assert!(deciles.iter().all(|n| *n >= 8), "{deciles:?}");
    }

    #[test]
    fn due_time_is_the_interval_less_the_jitter() {
        let check = |anchor: &str, hours: u32, bp: u32, due: &str| {
            assert_eq!(
                autosync_due_at(at(anchor), hours, bp),
                at(due),
                "{hours} h, {bp}"
            );
        };
        check("2026-01-01T00:00:00Z", 6, 0, "2026-01-01T06:00:00Z");
        check("2026-01-01T00:00:00Z", 6, 999, "2026-01-01T05:24:02.160Z");
        check("2026-01-01T00:00:00Z", 6, 500, "2026-01-01T05:42:00Z");
        check("2026-01-01T00:00:00Z", 720, 0, "2026-01-31T00:00:00Z");
        // Out-of-range jitter is capped at 10 %.
        check("2026-01-01T00:00:00Z", 10, 5_000, "2026-01-01T09:00:00Z");
    }

    #[test]
    fn backoff_doubles_from_a_minute_up_to_an_hour() {
        let check = |attempts: u32, secs: i64| {
            assert_eq!(
                autosync_backoff(attempts),
                TimeDelta::seconds(secs),
                "{attempts}"
            );
        };
        check(0, 60);
        check(1, 60);
        check(2, 120);
        check(3, 240);
        check(6, 1_920);
        check(7, 3_600);
        check(40, 3_600);
    }
}
