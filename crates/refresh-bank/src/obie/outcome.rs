//! What an OBIE HTTP answer other than 2xx means for the refresh: revoked, SCA
//! needed, worth retrying, or a permanent error.

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};

use super::wire::OBErrorResponse1;
use crate::error::BankError;

/// The OBIE error code that asks for the customer to authenticate again.
pub const SCA_ERROR_CODE: &str = "UK.OBIE.Reauthenticate";

/// The longest `Retry-After` honoured; a bank asking for more gets this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Whether an `Errors[].ErrorCode` asks for strong customer authentication:
/// `UK.OBIE.Reauthenticate`, or a bank-specific code with a dot-separated part
/// starting with `SCA` (e.g. `UK.Bank.SCARequired`, `UK.Bank.SCA.Required`).
pub(crate) fn is_sca_code(code: &str) -> bool {
    code == SCA_ERROR_CODE || code.split('.').any(|part| part.starts_with("SCA"))
}

/// The `Errors[].ErrorCode`s of an OBIE error body; none if it is not one.
pub(crate) fn error_codes(body: &[u8]) -> Vec<String> {
    serde_json::from_slice::<OBErrorResponse1>(body)
        .unwrap_or_default()
        .Errors
        .into_iter()
        .filter_map(|e| e.ErrorCode)
        .collect()
}

/// How a status other than 2xx for a data call is taken. `optional` listings
/// (initial-load kinds a consent may not cover) are skipped on 403 without an
/// SCA code, 404, 405 and 501: `Ok(())` means "skip".
pub(crate) fn classify(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    optional: bool,
    now: DateTime<Utc>,
) -> Result<(), BankError> {
    match status {
        401 | 403 => {
            if error_codes(body).iter().any(|c| is_sca_code(c)) {
                Err(BankError::MfaRequired)
            } else if status == 403 && optional {
                Ok(())
            } else {
                Err(BankError::Revoked)
            }
        }
        404 | 405 | 501 if optional => Ok(()),
        408 | 425 | 429 | 500..=599 => Err(BankError::Transient {
            retry_after: retry_after.and_then(|v| parse_retry_after(v, now)),
            reason: format!("http status {status}"),
        }),
        _ => Err(BankError::Malformed(format!(
            "unexpected http status {status}"
        ))),
    }
}

/// A `Retry-After` value: delay-seconds or an HTTP-date (IMF-fixdate, RFC 850
/// or asctime), capped at a day; a date in the past means "now".
pub(crate) fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let at = DateTime::parse_from_rfc2822(value)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            ["%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"]
                .iter()
                .find_map(|f| NaiveDateTime::parse_from_str(value, f).ok())
                .map(|t| t.and_utc())
        })?;
    Some(
        (at - now)
            .to_std()
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn check_retry_after(value: &str, expected: Option<u64>) {
        assert_eq!(
            parse_retry_after(value, now()),
            expected.map(Duration::from_secs),
            "{value:?}"
        );
    }

    #[test]
    fn retry_after() {
        check_retry_after("1", Some(1));
        check_retry_after(" 120 ", Some(120));
        check_retry_after("0", Some(0));
        check_retry_after("999999999", Some(86_400));
        check_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", Some(30));
        check_retry_after("Wednesday, 21-Oct-15 07:29:00 GMT", Some(60));
        check_retry_after("Wed Oct 21 07:28:05 2015", Some(5));
        check_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", Some(0));
        check_retry_after("-1", None);
        check_retry_after("1.5", None);
        check_retry_after("soon", None);
        check_retry_after("", None);
    }

    fn body(code: &str) -> Vec<u8> {
        serde_json::json!({
            "Code": "403 Forbidden",
            "Message": "forbidden",
            "Errors": [{"ErrorCode": code, "Message": "no"}]
        })
        .to_string()
        .into_bytes()
    }

    fn check(status: u16, retry_after: Option<&str>, body: &[u8], optional: bool, expected: &str) {
        let got = match classify(status, retry_after, body, optional, now()) {
            Ok(()) => "skip".to_owned(),
            Err(BankError::Revoked) => "revoked".to_owned(),
            Err(BankError::Expired) => "expired".to_owned(),
            Err(BankError::MfaRequired) => "mfa".to_owned(),
            Err(BankError::Transient {
                retry_after: Some(d),
                ..
            }) => format!("transient {}s", d.as_secs()),
            Err(BankError::Transient { .. }) => "transient".to_owned(),
            Err(BankError::Malformed(_)) => "malformed".to_owned(),
        };
        assert_eq!(
            got, expected,
            "{status} {retry_after:?} optional={optional}"
        );
    }

    #[test]
    fn statuses() {
        let sca = body("UK.OBIE.Reauthenticate");
        let mismatch = body("UK.OBIE.Resource.ConsentMismatch");
        check(401, None, b"", false, "revoked");
        check(401, None, b"", true, "revoked");
        check(401, None, &sca, false, "mfa");
        check(403, None, b"", false, "revoked");
        check(403, None, b"not json", false, "revoked");
        check(403, None, &mismatch, false, "revoked");
        check(403, None, &body("UK.OBIE.Unauthorized"), false, "revoked");
        check(403, None, &sca, false, "mfa");
        check(403, None, &sca, true, "mfa");
        check(403, None, &body("UK.Bank.SCARequired"), false, "mfa");
        check(403, None, &body("UK.Bank.SCA.Required"), false, "mfa");
        check(
            403,
            None,
            &body("UK.OBIE.Resource.DescaledAccount"),
            false,
            "revoked",
        );
        check(403, None, &mismatch, true, "skip");
        check(404, None, b"", true, "skip");
        check(404, None, b"", false, "malformed");
        check(405, None, b"", true, "skip");
        check(501, None, b"", true, "skip");
        check(501, None, b"", false, "transient");
        check(400, None, b"", false, "malformed");
        check(400, None, b"", true, "malformed");
        check(406, None, b"", false, "malformed");
        check(408, None, b"", false, "transient");
        check(429, Some("1"), b"", false, "transient 1s");
        check(429, None, b"", false, "transient");
        check(
            503,
            Some("Wed, 21 Oct 2015 07:28:10 GMT"),
            b"",
            false,
            "transient 10s",
        );
        check(
            500,
            None,
            &body("UK.OBIE.UnexpectedError"),
            false,
            "transient",
        );
        check(502, Some("garbage"), b"", false, "transient");
        check(302, None, b"", false, "malformed");
    }
}
