//! Parsing support shared by the closed string enums of the domain (codes, statuses, sources).

use thiserror::Error;

/// The longest part of a rejected input echoed back in an error message.
const ECHO_MAX_CHARS: usize = 64;

/// A string that is not one of the spellings of a closed set of values.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("unknown {kind} {input:?}, expected one of {}", .expected.join(", "))]
pub struct UnknownValue {
    /// What was being parsed, e.g. "requestedBy".
    pub kind: &'static str,
    /// The rejected input, cut to a bounded length.
    pub input: String,
    /// Every accepted spelling.
    pub expected: &'static [&'static str],
}

impl UnknownValue {
    pub(crate) fn new(kind: &'static str, input: &str, expected: &'static [&'static str]) -> Self {
        Self {
            kind,
            input: echo(input),
            expected,
        }
    }
}

/// Cuts untrusted input before it goes into an error message, so a 64 KiB body
/// cannot turn into a 64 KiB log line.
pub(crate) fn echo(input: &str) -> String {
    input.chars().take(ECHO_MAX_CHARS).collect()
}

/// Declares a fieldless enum with one wire spelling per variant and derives
/// from that single table: `ALL`, `as_str`, `Display`, `FromStr`, and serde as
/// that string. One table means the spellings cannot drift apart.
macro_rules! string_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident as $kind:literal {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// Every wire spelling, in declaration order.
            pub const SPELLINGS: &'static [&'static str] = &[$($text),+];

            /// The wire spelling.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::parse::UnknownValue;

            fn from_str(s: &str) -> ::std::result::Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err($crate::parse::UnknownValue::new($kind, s, Self::SPELLINGS)),
                }
            }
        }

        #[cfg(feature = "openapi")]
        impl ::utoipa::PartialSchema for $name {
            fn schema() -> ::utoipa::openapi::RefOr<::utoipa::openapi::schema::Schema> {
                ::utoipa::openapi::ObjectBuilder::new()
                    .schema_type(::utoipa::openapi::schema::Type::String)
                    .enum_values(Some(Self::SPELLINGS.iter().copied()))
                    .into()
            }
        }

        #[cfg(feature = "openapi")]
        impl ::utoipa::ToSchema for $name {}

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, serializer: S) -> ::std::result::Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(deserializer: D) -> ::std::result::Result<Self, D::Error> {
                let text = <::std::string::String as ::serde::Deserialize<'de>>::deserialize(deserializer)?;
                text.parse().map_err(<D::Error as ::serde::de::Error>::custom)
            }
        }
    };
}

pub(crate) use string_enum;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_cuts_long_input() {
        let check = |input: &str, expected: &str| assert_eq!(echo(input), expected, "{input:?}");
        check("", "");
        check("abc", "abc");
        check(&"x".repeat(64), &"x".repeat(64));
        check(&"x".repeat(65), &"x".repeat(64));
        check(&"é".repeat(70), &"é".repeat(64));
    }

    #[test]
    fn unknown_value_message_lists_the_spellings() {
        let err = UnknownValue::new("colour", "teal", &["RED", "GREEN"]);
        assert_eq!(
            err.to_string(),
            r#"unknown colour "teal", expected one of RED, GREEN"#
        );
    }
}
