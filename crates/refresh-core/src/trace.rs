//! W3C Trace Context (`traceparent`, version 00): the one trace a refresh carries from
//! its request to the bank calls, the log lines and the events.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A `traceparent` of version `00`: `00-{trace id}-{parent id}-{flags}`, lowercase hex.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
}

/// A `traceparent` value that is not a valid version-00 one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed traceparent: {0}")]
pub struct TraceParseError(&'static str);

/// The `sampled` flag: set on new traces so that a downstream tracer keeps them.
const SAMPLED: u8 = 0x01;

impl TraceContext {
    /// A new trace from 24 random bytes the caller made (16 for the trace id, 8 for
    /// the parent id). All-zero ids are invalid, so a zero half is replaced by a
    /// fixed non-zero value rather than refused: randomness never yields it in practice.
    pub fn new(random: [u8; 24]) -> Self {
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        trace_id.copy_from_slice(&random[..16]);
        parent_id.copy_from_slice(&random[16..]);
        if trace_id == [0; 16] {
            trace_id[15] = 1;
        }
        if parent_id == [0; 8] {
            parent_id[7] = 1;
        }
        Self {
            trace_id,
            parent_id,
            flags: SAMPLED,
        }
    }

    /// The same trace with a new parent (span) id from 8 random bytes the caller made:
    /// what a bank call sends, so the bank's span hangs under the refresh.
    pub fn child(&self, random: [u8; 8]) -> Self {
        let mut parent_id = random;
        if parent_id == [0; 8] {
            parent_id[7] = 1;
        }
        Self { parent_id, ..*self }
    }

    /// Parses a `traceparent` header value. Only version `00` in its exact 55-character
    /// form is accepted (lowercase hex, non-zero ids); anything else is an error, which
    /// the intake answers with a new trace.
    pub fn parse(value: &str) -> Result<Self, TraceParseError> {
        let value = value.trim_matches([' ', '\t']);
        let parts: Vec<&str> = value.split('-').collect();
        let [version, trace, parent, flags] = parts.as_slice() else {
            return Err(TraceParseError("expected four dash-separated fields"));
        };
        if *version != "00" {
            return Err(TraceParseError("only version 00 is supported"));
        }
        let mut trace_id = [0u8; 16];
        hex_into(trace, &mut trace_id).ok_or(TraceParseError("trace id is not 32 hex digits"))?;
        let mut parent_id = [0u8; 8];
        hex_into(parent, &mut parent_id)
            .ok_or(TraceParseError("parent id is not 16 hex digits"))?;
        let mut flag = [0u8; 1];
        hex_into(flags, &mut flag).ok_or(TraceParseError("flags are not 2 hex digits"))?;
        if trace_id == [0; 16] {
            return Err(TraceParseError("trace id is all zeros"));
        }
        if parent_id == [0; 8] {
            return Err(TraceParseError("parent id is all zeros"));
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags: flag[0],
        })
    }

    /// The trace id, 32 lowercase hex digits (the `trace_id` of log lines).
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id)
    }

    /// The parent (span) id, 16 lowercase hex digits.
    pub fn parent_id(&self) -> String {
        hex(&self.parent_id)
    }

    /// The trace flags.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// The trace id as a UUID (`8-4-4-4-12`), the form banks take as a request id
    /// (`x-fapi-interaction-id`, `X-Request-ID`), so those line up with the trace.
    pub fn trace_uuid(&self) -> uuid::Uuid {
        uuid::Uuid::from_bytes(self.trace_id)
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id(),
            self.parent_id(),
            self.flags
        )
    }
}

impl FromStr for TraceContext {
    type Err = TraceParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for TraceContext {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TraceContext {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Fills `out` from exactly `2 * out.len()` lowercase hex digits (W3C forbids uppercase).
fn hex_into(text: &str, out: &mut [u8]) -> Option<()> {
    let digits = text.as_bytes();
    if digits.len() != out.len() * 2 {
        return None;
    }
    let value = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    for (i, pair) in digits.chunks(2).enumerate() {
        out[i] = value(pair[0])? << 4 | value(pair[1])?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_valid_values() {
        for (input, trace, parent, flags) in [
            (
                GOOD,
                "4bf92f3577b34da6a3ce929d0e0e4736",
                "00f067aa0ba902b7",
                1,
            ),
            (
                "00-00000000000000000000000000000001-0000000000000001-00",
                "00000000000000000000000000000001",
                "0000000000000001",
                0,
            ),
            (
                "00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-ff",
                "ffffffffffffffffffffffffffffffff",
                "ffffffffffffffff",
                0xff,
            ),
        ] {
            let parsed = TraceContext::parse(input).unwrap();
            assert_eq!(parsed.trace_id(), trace, "{input}");
            assert_eq!(parsed.parent_id(), parent, "{input}");
            assert_eq!(parsed.flags(), flags, "{input}");
            assert_eq!(parsed.to_string(), input);
        }
        // Optional whitespace around a header value is not part of it.
        assert_eq!(
            TraceContext::parse(&format!(" {GOOD}\t"))
                .unwrap()
                .to_string(),
            GOOD
        );
    }

    #[test]
    fn refuses_everything_else() {
        for input in [
            "",
            "00",
            "garbage",
            // Other versions, including the forbidden ff.
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // All-zero ids.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Uppercase hex.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // Wrong lengths.
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47366-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-001",
            // Non-hex digits, extra fields, other separators.
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(
                TraceContext::parse(input).is_err(),
                "{input:?} was accepted"
            );
        }
    }

    #[test]
    fn new_and_child() {
        let mut random = [0u8; 24];
        for (i, b) in random.iter_mut().enumerate() {
            *b = i as u8 + 1;
        }
        let trace = TraceContext::new(random);
        assert_eq!(
            trace.to_string(),
            "00-0102030405060708090a0b0c0d0e0f10-1112131415161718-01"
        );
        let child = trace.child([0xaa; 8]);
        assert_eq!(child.trace_id(), trace.trace_id());
        assert_eq!(child.parent_id(), "aaaaaaaaaaaaaaaa");
        assert_eq!(child.flags(), trace.flags());
        // All-zero bytes still make a valid context.
        let zero = TraceContext::new([0; 24]);
        assert_eq!(TraceContext::parse(&zero.to_string()).unwrap(), zero);
        assert_eq!(
            TraceContext::parse(&zero.child([0; 8]).to_string()).unwrap(),
            zero.child([0; 8])
        );
    }

    #[test]
    fn uuid_form_and_serde() {
        let trace = TraceContext::parse(GOOD).unwrap();
        assert_eq!(
            trace.trace_uuid().to_string(),
            "4bf92f35-77b3-4da6-a3ce-929d0e0e4736"
        );
        let json = serde_json::to_string(&trace).unwrap();
        assert_eq!(json, format!("\"{GOOD}\""));
        assert_eq!(serde_json::from_str::<TraceContext>(&json).unwrap(), trace);
        assert!(serde_json::from_str::<TraceContext>("\"00-nope\"").is_err());
    }
}
