//! Why a message was not published, and what becomes of its row: only a failure the message
//! itself causes can lead to the dead-letter table; the broker or the network never does, nor a
//! producer that failed messages only because an earlier one failed.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Why a message was not published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The message itself, and no retry can fix it (over the size limit, a topic name that cannot
    /// exist, a routing template the row cannot fill): dead-lettered at once.
    Poison,
    /// The message itself, rejected by the broker: retried, and dead-lettered after maxAttempts.
    Rejected,
    /// The broker refused the record's timestamp (outside its `log.message.timestamp.*` bounds,
    /// tighter than the relay's [`crate::core::stamp::MAX_STAMP_AGE_MS`]): sent again stamped with the
    /// publish time, not counted. A row already stamped so is `Transport` (the clocks differ).
    Timestamp,
    /// The producer failed the message for another's sake: it went fatal (with
    /// `enable.gapless.guarantee`, after the broker rejected an earlier message) or was purged to
    /// be rebuilt, or lost its sequence state. Read again once the producer is rebuilt, behind the
    /// key's earlier rows; not counted, no wait.
    Released,
    /// The broker or the network (timeouts, unknown topic or partition, leader moves, not enough
    /// replicas, brokers down, a closed producer): retried until it works; never counted toward
    /// maxAttempts, never dead-lettered. A missing topic or a slow broker is not a poison message.
    Transport,
}

/// What a Kafka error says about the message.
pub fn cause(e: &KafkaError) -> Cause {
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize | C::InvalidTopic | C::MessageBatchTooLarge) => Cause::Poison,
        Some(C::InvalidRecord | C::InvalidMessage | C::PolicyViolation | C::UnsupportedForMessageFormat) => Cause::Rejected,
        Some(C::InvalidTimestamp) => Cause::Timestamp,
        Some(C::Fatal | C::PurgeQueue | C::PurgeInflight | C::GaplessGuarantee | C::Inconsistent | C::OutOfOrderSequenceNumber) => {
            Cause::Released
        }
        _ => Cause::Transport,
    }
}

/// Errors no retry can fix: the row goes to the dead-letter table at once.
pub fn is_permanent(e: &KafkaError) -> bool {
    cause(e) == Cause::Poison
}

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

    pub fn kafka(row: usize, e: &KafkaError) -> Self {
        Failure {
            row,
            error: e.to_string(),
            cause: cause(e),
        }
    }

    /// A delivery report's error for a row sent with timestamp `stamped_now` (the publish time,
    /// not its `created_at`): a refused timestamp that already was the publish time is no longer
    /// the row's age but the clocks', which waiting may fix.
    pub fn delivery(row: usize, e: &KafkaError, stamped_now: bool) -> Self {
        let mut f = Failure::kafka(row, e);
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
        Failure {
            row,
            error: "delivery report lost (producer closed)".into(),
            cause: Cause::Transport,
        }
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
    use super::*;

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
        let created = Failure::delivery(0, &e, false);
        assert_eq!(created.cause, Cause::Timestamp);
        assert_eq!(created.verdict(1_000, 2), Verdict::Again);
        let now = Failure::delivery(0, &e, true);
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
