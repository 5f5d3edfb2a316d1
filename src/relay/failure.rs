//! Why a message was not published, and what becomes of its row: only a failure the message
//! itself causes can lead to the dead-letter table; the broker or the network never does, nor a
//! producer that failed messages only because an earlier one failed.

use std::time::Duration;

use crate::clients::broker::Refusal;
pub use crate::clients::broker::{
    kafka::{cause, is_permanent},
    Cause,
};

/// Wait before retrying a key after the broker or network failed `n` times in a row (1-based):
/// 1s doubling to 30s, so the relay notices a returning broker within half a minute.
pub fn transport_backoff(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.clamp(1, 6).saturating_sub(1)).min(Duration::from_secs(30))
}

/// A row of a batch that was not published.
#[derive(Debug, PartialEq)]
pub(super) struct Failure {
    /// Index of the row in its batch.
    pub row: usize,
    pub error: String,
    pub cause: Cause,
}

/// What becomes of a failed row.
#[derive(Debug, PartialEq)]
pub(super) enum Verdict {
    /// Count the attempt; the row and the later rows of its key wait this long.
    Retry(Duration),
    /// Do not count it: the key waits for the broker.
    Wait,
    /// Do not count it: read again (stamped with the publish time for `Timestamp`) once the
    /// producer is rebuilt and the batches in flight completed.
    Again,
    DeadLetter,
}

impl Failure {
    pub fn routing(row: usize, e: String) -> Self {
        Failure {
            row,
            error: format!("routing: {e}"),
            cause: Cause::Poison,
        }
    }

    pub fn refused(row: usize, r: Refusal) -> Self {
        Failure {
            row,
            error: r.error,
            cause: r.cause,
        }
    }

    /// An acknowledgement's error for a row sent with timestamp `stamped_now` (the publish time,
    /// not its `created_at`): a refused timestamp that already was the publish time is no longer
    /// the row's age but the clocks', which waiting may fix.
    pub fn delivery(row: usize, r: Refusal, stamped_now: bool) -> Self {
        let mut f = Failure::refused(row, r);
        if f.cause == Cause::Timestamp && stamped_now {
            f.cause = Cause::Transport;
            f.error.push_str(
                " (stamped with the publish time: the relay's clock and the broker's differ by more than the topic's \
                 message.timestamp bounds)",
            );
        }
        f
    }

    pub fn report_lost(row: usize) -> Self {
        Failure::refused(row, Refusal::lost())
    }

    /// After the row's `attempts`-th attempt the message itself caused (this one included).
    pub fn verdict(&self, attempts: i32, max_attempts: i32) -> Verdict {
        match self.cause {
            Cause::Poison => Verdict::DeadLetter,
            Cause::Rejected if attempts >= max_attempts => Verdict::DeadLetter,
            Cause::Rejected => Verdict::Retry(backoff(attempts)),
            Cause::Timestamp | Cause::Released => Verdict::Again,
            Cause::Transport => Verdict::Wait,
        }
    }
}

/// Backoff before retry `attempts` (1-based): 1s, 2s, 4s ... capped at 5 min.
pub fn backoff(attempts: i32) -> Duration {
    let exp = attempts.clamp(1, 20) as u32 - 1;
    Duration::from_secs(1u64.checked_shl(exp).unwrap_or(u64::MAX).min(300))
}

#[cfg(test)]
mod tests {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};

    use super::*;
    use crate::clients::broker::kafka::refusal;

    impl Failure {
        fn kafka(row: usize, e: &KafkaError) -> Self {
            Failure::refused(row, refusal(e))
        }
    }

    #[test]
    fn permanent_errors() {
        assert!(is_permanent(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)));
        assert!(!is_permanent(&KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)));
        assert!(!is_permanent(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)));
    }

    #[test]
    fn failures_are_classified() {
        let kafka = |c| Failure::kafka(3, &KafkaError::MessageProduction(c));
        assert_eq!(kafka(RDKafkaErrorCode::MessageSizeTooLarge).cause, Cause::Poison);
        assert_eq!(kafka(RDKafkaErrorCode::InvalidRecord).cause, Cause::Rejected);
        for transport in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::UnknownTopic,
            RDKafkaErrorCode::NotEnoughReplicas,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::NotLeaderForPartition,
        ] {
            assert_eq!(kafka(transport).cause, Cause::Transport, "{transport:?}");
        }
        for released in [
            RDKafkaErrorCode::Fatal,
            RDKafkaErrorCode::PurgeQueue,
            RDKafkaErrorCode::PurgeInflight,
            RDKafkaErrorCode::OutOfOrderSequenceNumber,
        ] {
            assert_eq!(kafka(released).cause, Cause::Released, "{released:?}");
        }
        let routing = Failure::routing(1, "column type is null; it routes the message".into());
        assert_eq!(routing.error, "routing: column type is null; it routes the message");
        assert_eq!(routing.cause, Cause::Poison);
        assert_eq!(Failure::report_lost(2).cause, Cause::Transport);
    }

    #[test]
    fn only_the_message_itself_leads_to_the_dead_letter_table() {
        let rejected = Failure::kafka(0, &KafkaError::MessageProduction(RDKafkaErrorCode::InvalidRecord));
        assert_eq!(rejected.verdict(1, 10), Verdict::Retry(Duration::from_secs(1)));
        assert_eq!(rejected.verdict(3, 10), Verdict::Retry(Duration::from_secs(4)));
        assert_eq!(rejected.verdict(10, 10), Verdict::DeadLetter);
        assert_eq!(Failure::routing(0, "x".into()).verdict(1, 10), Verdict::DeadLetter);
        // However long the outage lasts.
        let timed_out = Failure::kafka(0, &KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut));
        assert_eq!(timed_out.verdict(1_000_000, 2), Verdict::Wait);
        // Failed for another message's sake: however often, never counted or dead-lettered.
        let purged = Failure::kafka(0, &KafkaError::MessageProduction(RDKafkaErrorCode::PurgeQueue));
        assert_eq!(purged.verdict(1_000_000, 2), Verdict::Again);
    }

    /// A backlog stamped with `created_at` that a broker with tighter timestamp bounds refuses is
    /// sent again stamped now, not retried as a broker failure forever nor dead-lettered; a row
    /// already stamped now that is refused points at the clocks, and waits.
    #[test]
    fn a_refused_timestamp_is_sent_again_stamped_now() {
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::InvalidTimestamp);
        let created = Failure::delivery(0, refusal(&e), false);
        assert_eq!(created.cause, Cause::Timestamp);
        assert_eq!(created.verdict(1_000, 2), Verdict::Again);
        let now = Failure::delivery(0, refusal(&e), true);
        assert_eq!(now.cause, Cause::Transport);
        assert_eq!(now.verdict(1_000, 2), Verdict::Wait);
        assert!(now.error.contains("clock"), "{}", now.error);
    }

    #[test]
    fn transport_backoff_doubles_to_thirty_seconds() {
        let s = |n| transport_backoff(n).as_secs();
        assert_eq!([s(0), s(1), s(2), s(5), s(6), s(100)], [1, 1, 2, 16, 30, 30]);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(30), Duration::from_secs(300));
        assert_eq!(backoff(0), Duration::from_secs(1));
    }
}
