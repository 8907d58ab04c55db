//! What a consumer decided to do with a message, as data: the adapter that received
//! the message (only `refresh-amqp`) turns it into ack, retry or dead-letter.

use std::time::Duration;

/// The fate of one consumed message, decided by a handler and carried out by the
/// messaging adapter.
///
/// Handlers never ack or nack themselves: they return an `Outcome` after their
/// effect is committed, so the decision can be tested without a broker and the
/// at-least-once rules live in one place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done (or nothing to do): remove the message from its queue.
    Ack,
    /// Not now: deliver the message again once `after` has passed. A transient
    /// failure (a dependency down, the bank answering 5xx or 429). The message may
    /// come back more than once, so handling it must be idempotent.
    Retry {
        /// The backoff before the next delivery.
        after: Duration,
    },
    /// Never: move the message to its queue's dead-letter queue, where an operator
    /// can inspect it. A message that cannot be parsed, or has failed too often.
    DeadLetter {
        /// Why, for the operator (kept with the dead message where the adapter can).
        reason: String,
    },
}

impl Outcome {
    /// A [`Outcome::DeadLetter`] with this reason.
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        Self::DeadLetter {
            reason: reason.into(),
        }
    }

    /// A [`Outcome::Retry`] after this backoff.
    pub fn retry(after: Duration) -> Self {
        Self::Retry { after }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_build_the_variants() {
        assert_eq!(
            Outcome::dead_letter("unparseable"),
            Outcome::DeadLetter {
                reason: "unparseable".to_owned()
            }
        );
        assert_eq!(
            Outcome::retry(Duration::from_secs(2)),
            Outcome::Retry {
                after: Duration::from_secs(2)
            }
        );
    }
}
