//! The one timestamp format of the API and the events (SPEC §3): RFC 3339 in UTC with
//! exactly three fractional digits, e.g. `2026-12-01T10:00:00.123Z`.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serializer;

/// `at` as the API writes it.
pub fn format_millis(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `#[serde(serialize_with = "refresh_core::time::millis")]` for a `DateTime<Utc>`.
pub fn millis<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format_millis(at))
}

/// `#[serde(serialize_with = "refresh_core::time::millis_opt")]` for an
/// `Option<DateTime<Utc>>`.
pub fn millis_opt<S: Serializer>(
    at: &Option<DateTime<Utc>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match at {
        Some(at) => serializer.serialize_str(&format_millis(at)),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};

    fn check(input: &str, expected: &str) {
        let at: DateTime<Utc> = input.parse().expect("a valid test timestamp");
        assert_eq!(super::format_millis(&at), expected);
        assert_eq!(
            serde_json::to_value(Wrapper(at)).expect("serializes"),
            serde_json::json!(expected)
        );
    }

    #[derive(serde::Serialize)]
    struct Wrapper(#[serde(serialize_with = "super::millis")] DateTime<Utc>);

    #[test]
    fn always_three_digits() {
        check("2026-12-01T10:00:00Z", "2026-12-01T10:00:00.000Z");
        check("2026-12-01T10:00:00.1Z", "2026-12-01T10:00:00.100Z");
        check("2026-12-01T10:00:00.123456Z", "2026-12-01T10:00:00.123Z");
        check("2026-12-01T10:00:00.123456789Z", "2026-12-01T10:00:00.123Z");
        check("2026-12-01T12:00:00.5+02:00", "2026-12-01T10:00:00.500Z");
    }
}
