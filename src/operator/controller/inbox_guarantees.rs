//! What holds on the consumer's hops of an InboxTable, stated plainly from what DedupCovered
//! found: the inbox makes a redelivery a no-op only while the id is retained, and nothing outside
//! the consumer's database transaction is covered.

use crate::{
    crd::Guarantee,
    operator::conditions::{Cond, Reason, Status},
};

/// Where the consumer reads from, for the wording of its first hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Kafka,
    Nats,
    Rabbitmq,
}

/// The consumer's hops, from the effective retention and DedupCovered. Pure.
pub fn guarantees(retention: &str, covered: &Cond, source: SourceKind) -> Vec<Guarantee> {
    let g = |hop: &str, guarantee: String| Guarantee {
        hop: hop.into(),
        guarantee,
    };
    let database = match (covered.status, covered.reason) {
        (Status::True, _) => format!("effect applied once per message id while the id is retained: {}", covered.message),
        (Status::False, _) => format!(
            "effect applied once per message id only for redeliveries within {retention}: {}; an older redelivery applies it again",
            covered.message
        ),
        (_, Reason::NoSourcesDeclared) => format!(
            "effect applied once per message id for redeliveries within {retention}; later ones are not deduplicated and \
             nothing checks that the topics' retention is shorter (declare spec.sources or redeliveryWindow)"
        ),
        _ => format!(
            "effect applied once per message id for redeliveries within {retention}; whether that covers the topics' retention \
             is unknown: {}",
            covered.message
        ),
    };
    vec![
        g(
            "broker -> consumer",
            match source {
                SourceKind::Kafka => "at-least-once: a crash or rebalance before the offset commit, or a replay, redelivers".into(),
                SourceKind::Nats => "at-least-once: JetStream redelivers a message not acknowledged within the consumer's ack_wait, \
                                     up to its max_deliver, while the stream keeps it (max_age); a new consumer from the start replays"
                    .into(),
                SourceKind::Rabbitmq => "at-least-once: RabbitMQ redelivers a message not acknowledged when its channel closes \
                                         (a crash, a consumer timeout), up to a quorum queue's x-delivery-limit, until its \
                                         message TTL; a relay's resend after a lost confirm arrives as a second copy"
                    .into(),
            },
        ),
        g(
            "consumer -> database",
            format!("{database} (the claim and the effect commit in one transaction)"),
        ),
        g(
            "consumer -> external APIs",
            "not deduplicated by the inbox: a call outside the transaction can repeat when the transaction fails after it; \
             send the message id as an idempotency key, or write the call to an outbox"
                .into(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::conditions::condition;

    #[test]
    fn the_database_hop_says_how_long_an_id_protects_against_redelivery() {
        let t = condition::DEDUP_COVERED;
        let yes = Cond::yes(
            t,
            Reason::RetentionCoversRedelivery,
            "retention 8d (691200000 ms) covers orders retention.ms=604800000",
        );
        let g = guarantees("8d", &yes, SourceKind::Kafka);
        let nats = guarantees("8d", &yes, SourceKind::Nats);
        assert!(nats[0].guarantee.contains("max_deliver") && nats[1] == g[1], "{nats:?}");
        let rabbit = guarantees("8d", &yes, SourceKind::Rabbitmq);
        assert!(rabbit[0].guarantee.contains("x-delivery-limit") && rabbit[1] == g[1], "{rabbit:?}");
        assert_eq!(
            g.iter().map(|g| g.hop.as_str()).collect::<Vec<_>>(),
            ["broker -> consumer", "consumer -> database", "consumer -> external APIs"]
        );
        assert_eq!(
            g[1].guarantee,
            "effect applied once per message id while the id is retained: retention 8d (691200000 ms) covers orders \
             retention.ms=604800000 (the claim and the effect commit in one transaction)"
        );
        let no = Cond::no(t, Reason::RetentionBelowTopicRetention, "retention 1d is shorter than orders");
        assert!(guarantees("1d", &no, SourceKind::Kafka)[1]
            .guarantee
            .contains("only for redeliveries within 1d"));
        let none = Cond::unknown(t, Reason::NoSourcesDeclared, "x");
        assert!(guarantees("1d", &none, SourceKind::Kafka)[1]
            .guarantee
            .contains("declare spec.sources"));
        let down = Cond::unknown(t, Reason::BrokerUnreachable, "broker k:9092 unreachable");
        assert!(guarantees("1d", &down, SourceKind::Kafka)[1]
            .guarantee
            .contains("is unknown: broker k:9092 unreachable"));
    }
}
