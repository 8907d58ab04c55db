//! Identifiers: consent, refresh and event UUIDs, and the validated tenant and provider names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

/// The longest tenant or provider id accepted.
pub const NAME_ID_MAX_LEN: usize = 64;

/// Why a string is not a valid identifier.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum IdError {
    /// Not a UUID in its hyphenated 36-character form.
    #[error(
        "malformed {kind}: expected a hyphenated uuid such as 0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f"
    )]
    MalformedUuid {
        /// Which id, e.g. "consent id".
        kind: &'static str,
    },
    /// Empty or longer than [`NAME_ID_MAX_LEN`] characters.
    #[error("{kind} must be 1 to {max} characters long, got {len}", max = NAME_ID_MAX_LEN)]
    Length {
        /// Which id, e.g. "tenant id".
        kind: &'static str,
        /// The length in characters.
        len: usize,
    },
    /// Contains something other than `[A-Za-z0-9._-]`.
    #[error("{kind} may contain only ASCII letters, digits, '.', '_' and '-', found {found:?}")]
    InvalidChar {
        /// Which id, e.g. "tenant id".
        kind: &'static str,
        /// The first offending character.
        found: char,
    },
}

/// Parses the canonical hyphenated form only: ids travel in URLs, routing keys
/// and Redis keys, where one spelling per id keeps lookups exact.
fn parse_uuid(kind: &'static str, s: &str) -> Result<Uuid, IdError> {
    const HYPHENATED_LEN: usize = 36;
    if s.len() != HYPHENATED_LEN {
        return Err(IdError::MalformedUuid { kind });
    }
    Uuid::try_parse(s).map_err(|_| IdError::MalformedUuid { kind })
}

macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident, $kind:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// Wraps a UUID made elsewhere (the core makes none).
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The wrapped UUID.
            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }

            /// Unwraps the UUID.
            pub const fn into_uuid(self) -> Uuid {
                self.0
            }
        }

        impl fmt::Display for $name {
            /// The lowercase hyphenated form.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_uuid($kind, s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Self {
                id.0
            }
        }
    };
}

uuid_id!(
    /// A consent: a user's authorisation to read one bank connection.
    ConsentId,
    "consent id"
);
uuid_id!(
    /// One refresh attempt (UUID v7, made by the ingress).
    RefreshId,
    "refresh id"
);
uuid_id!(
    /// One CloudEvent; consumers dedupe on it.
    EventId,
    "event id"
);

fn validate_name(kind: &'static str, s: &str) -> Result<(), IdError> {
    let len = s.chars().count();
    if !(1..=NAME_ID_MAX_LEN).contains(&len) {
        return Err(IdError::Length { kind, len });
    }
    match s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(found) => Err(IdError::InvalidChar { kind, found }),
        None => Ok(()),
    }
}

macro_rules! name_id {
    ($(#[$meta:meta])* $name:ident, $kind:literal) => {
        $(#[$meta])*
        ///
        /// 1 to 64 characters of `[A-Za-z0-9._-]`, so it is safe in URLs,
        /// Redis keys and RabbitMQ routing keys. Validated on every way in,
        /// deserialisation included.
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `s`.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                validate_name($kind, s)?;
                Ok(Self(s.to_owned()))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;

            fn try_from(s: String) -> Result<Self, Self::Error> {
                validate_name($kind, &s)?;
                Ok(Self(s))
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_id!(
    /// A tenant: a customer app of the platform.
    TenantId,
    "tenant id"
);
name_id!(
    /// A bank (provider) a consent is held with, e.g. `sim`.
    ProviderId,
    "provider id"
);

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f";

    fn check_uuid(input: &str, expected: Result<&str, &str>) {
        let got = input
            .parse::<ConsentId>()
            .map(|id| id.to_string())
            .map_err(|e| e.to_string());
        let expected = expected.map(str::to_owned).map_err(str::to_owned);
        assert_eq!(got, expected, "input {input:?}");
    }

    #[test]
    fn uuid_ids_parse_the_hyphenated_form_only() {
        let malformed = Err(
            "malformed consent id: expected a hyphenated uuid such as 0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f",
        );
        check_uuid(UUID, Ok(UUID));
        check_uuid("0190F5D2-6C1A-7B3E-8D4F-0A1B2C3D4E5F", Ok(UUID));
        check_uuid(
            "00000000-0000-0000-0000-000000000000",
            Ok("00000000-0000-0000-0000-000000000000"),
        );
        check_uuid("", malformed);
        check_uuid("not-a-uuid", malformed);
        check_uuid("0190f5d26c1a7b3e8d4f0a1b2c3d4e5f", malformed);
        check_uuid("{0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f}", malformed);
        check_uuid("urn:uuid:0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f", malformed);
        check_uuid("0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5g", malformed);
        check_uuid("0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5", malformed);
        check_uuid("0190f5d2x6c1a-7b3e-8d4f-0a1b2c3d4e5f", malformed);
        check_uuid(" 0190f5d2-6c1a-7b3e-8d4f-0a1b2c3d4e5f", malformed);
    }

    #[test]
    fn each_uuid_id_names_itself_in_errors() {
        let err = |e: IdError| e.to_string();
        assert!(err("x".parse::<RefreshId>().unwrap_err()).starts_with("malformed refresh id"));
        assert!(err("x".parse::<EventId>().unwrap_err()).starts_with("malformed event id"));
    }

    #[test]
    fn uuid_ids_are_transparent_in_json() {
        let id = RefreshId::from_uuid(UUID.parse().unwrap());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{UUID}\""));
        assert_eq!(serde_json::from_str::<RefreshId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<RefreshId>("\"nope\"").is_err());
        assert_eq!(id.as_uuid().to_string(), UUID);
        assert_eq!(Uuid::from(id), id.into_uuid());
    }

    fn check_name(input: &str, expected: Result<(), &str>) {
        let got = TenantId::parse(input).map_err(|e| e.to_string());
        match (&got, expected) {
            (Ok(id), Ok(())) => assert_eq!(id.as_str(), input),
            (Err(got), Err(want)) => assert_eq!(got, want, "input {input:?}"),
            _ => panic!("input {input:?}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn tenant_ids_are_short_and_plain() {
        let too_long = "tenant id must be 1 to 64 characters long, got 65";
        check_name("acme", Ok(()));
        check_name("a", Ok(()));
        check_name("Acme-Bank_2.eu", Ok(()));
        check_name(&"a".repeat(64), Ok(()));
        check_name("", Err("tenant id must be 1 to 64 characters long, got 0"));
        check_name(&"a".repeat(65), Err(too_long));
        check_name(
            "acme corp",
            Err("tenant id may contain only ASCII letters, digits, '.', '_' and '-', found ' '"),
        );
        check_name(
            "acme:1",
            Err("tenant id may contain only ASCII letters, digits, '.', '_' and '-', found ':'"),
        );
        check_name(
            "a{b}",
            Err("tenant id may contain only ASCII letters, digits, '.', '_' and '-', found '{'"),
        );
        check_name(
            "acmé",
            Err("tenant id may contain only ASCII letters, digits, '.', '_' and '-', found 'é'"),
        );
        check_name(
            "a*",
            Err("tenant id may contain only ASCII letters, digits, '.', '_' and '-', found '*'"),
        );
        check_name(
            "a/b",
            Err("tenant id may contain only ASCII letters, digits, '.', '_' and '-', found '/'"),
        );
    }

    #[test]
    fn name_ids_validate_when_deserialised() {
        let check = |json: &str, ok: bool| {
            assert_eq!(
                serde_json::from_str::<ProviderId>(json).is_ok(),
                ok,
                "{json}"
            );
        };
        check(r#""sim""#, true);
        check(r#""ob-uk.barclays""#, true);
        check(r#""""#, false);
        check(r#""two words""#, false);
        check("42", false);
        let id = ProviderId::parse("sim").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), r#""sim""#);
        assert_eq!("sim".parse::<ProviderId>().unwrap(), id);
        assert!(
            ProviderId::parse("")
                .unwrap_err()
                .to_string()
                .starts_with("provider id ")
        );
    }
}
