//! The warnings a tenant's settings earn (SPEC §6): combinations that let a consent
//! become inactive, and lose its stored data, before auto-sync has refreshed it.

/// The warnings for `autosync_interval_hours` (`None`: auto-sync off) and
/// `inactivation_days`, in the order the settings form shows them; empty when the
/// combination is safe.
pub fn settings_warnings(
    autosync_interval_hours: Option<u32>,
    inactivation_days: u32,
) -> Vec<String> {
    match autosync_interval_hours {
        // Two chances: the first auto-sync may fail, the second must still come in time.
        Some(hours) if 2 * u64::from(hours) >= u64::from(inactivation_days) * 24 => vec![format!(
            "With auto-sync every {hours} h, a consent gets fewer than two refreshes in the {inactivation_days} {} before it becomes inactive and its stored data is removed.",
            days(inactivation_days)
        )],
        Some(_) => Vec::new(),
        None => vec![format!(
            "Auto-sync is off: a consent that nobody refreshes for {inactivation_days} {} becomes inactive and its stored data is removed.",
            days(inactivation_days)
        )],
    }
}

fn days(n: u32) -> &'static str {
    if n == 1 { "day" } else { "days" }
}

#[cfg(test)]
mod tests {
    use super::settings_warnings;

    fn check(hours: Option<u32>, days: u32, expected: &[&str]) {
        assert_eq!(
            settings_warnings(hours, days),
            expected,
            "{hours:?} h, {days} d"
        );
    }

    #[test]
    fn two_chances_rule() {
        check(Some(24), 3, &[]);
        check(Some(6), 1, &[]);
        check(Some(11), 1, &[]);
        // 2 × 24 h ≥ 2 × 24 h: exactly two intervals is not two chances.
        check(
            Some(24),
            2,
            &[
                "With auto-sync every 24 h, a consent gets fewer than two refreshes in the 2 days before it becomes inactive and its stored data is removed.",
            ],
        );
        check(
            Some(12),
            1,
            &[
                "With auto-sync every 12 h, a consent gets fewer than two refreshes in the 1 day before it becomes inactive and its stored data is removed.",
            ],
        );
        check(
            Some(720),
            60,
            &[
                "With auto-sync every 720 h, a consent gets fewer than two refreshes in the 60 days before it becomes inactive and its stored data is removed.",
            ],
        );
        check(Some(720), 61, &[]);
    }

    #[test]
    fn auto_sync_off_while_inactivation_removes_data() {
        check(
            None,
            90,
            &[
                "Auto-sync is off: a consent that nobody refreshes for 90 days becomes inactive and its stored data is removed.",
            ],
        );
        check(
            None,
            1,
            &[
                "Auto-sync is off: a consent that nobody refreshes for 1 day becomes inactive and its stored data is removed.",
            ],
        );
    }
}
