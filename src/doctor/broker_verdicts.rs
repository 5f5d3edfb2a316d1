//! Verdicts on the Kafka cluster from what the broker answered to the operations lockstep uses.
//! Pure.
//!
//! ACLs are judged by the answers to the operations themselves (an authorization error names
//! the missing ACL), not by reading the broker's ACL list: that needs DescribeAcls rights of its
//! own, and brokers without ACLs (tansu, the test broker) do not implement it.

use rdkafka::types::RDKafkaErrorCode;

use super::Check;

/// An operation lockstep runs against the broker, and the ACL a refusal of it means is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// DescribeConfigs on a topic (the operator reads topic configs).
    DescribeConfigs,
    /// CreateTopics, validate-only (the operator creates declared topics).
    CreateTopics,
    /// IncrementalAlterConfigs, validate-only (the operator keeps topic configs as declared).
    AlterConfigs,
    /// InitProducerId of an idempotent producer (the relay produces with enable.idempotence).
    IdempotentProduce,
    /// OffsetFetch of a consumer group (an InboxTable's lag).
    DescribeGroup,
}

impl Op {
    pub fn check_name(self) -> &'static str {
        match self {
            Op::DescribeConfigs => "describe topic configs",
            Op::CreateTopics => "create topics",
            Op::AlterConfigs => "alter topic configs (IncrementalAlterConfigs)",
            Op::IdempotentProduce => "idempotent produce (InitProducerId)",
            Op::DescribeGroup => "describe consumer group",
        }
    }

    /// The ACL the operation needs, as `kafka-acls` names it.
    fn acl(self, on: &str) -> String {
        match self {
            Op::DescribeConfigs => format!("DescribeConfigs on topic {on}"),
            Op::CreateTopics => format!("Create on topic {on} (or on the cluster)"),
            Op::AlterConfigs => format!("AlterConfigs on topic {on}"),
            Op::IdempotentProduce => "IdempotentWrite on the cluster (and Write on the topics)".into(),
            Op::DescribeGroup => format!("Describe on group {on} (and Describe on its topics)"),
        }
    }
}

/// Why the broker refused an operation: its error code when there is one, and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: Option<RDKafkaErrorCode>,
    pub message: String,
}

fn is_authorization(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        TopicAuthorizationFailed | GroupAuthorizationFailed | ClusterAuthorizationFailed | TransactionalIdAuthorizationFailed
    )
}

fn is_unsupported(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(code, UnsupportedVersion | UnsupportedFeature | InvalidRequest)
}

/// The verdict on one operation on `on` (a topic, a group, or the cluster).
pub fn operation(op: Op, on: &str, result: &Result<(), Refusal>) -> Check {
    let name = format!("{} {on}", op.check_name());
    match result {
        // Tried, not looked up in the ACL list: an ACL the principal lacked would have refused it.
        Ok(()) => Check::pass(name, "allowed (tried: the broker refused nothing)"),
        Err(Refusal { code: Some(c), message }) if is_authorization(*c) => Check::fail(
            name,
            format!("not authorized: {message}"),
            format!("grant the client's principal the ACL {}", op.acl(on)),
        ),
        Err(Refusal { code: Some(c), message }) if is_unsupported(*c) => Check::fail(
            name,
            format!("the broker does not support it: {message}"),
            "lockstep needs a Kafka protocol broker with IncrementalAlterConfigs and idempotent produce (Apache Kafka 2.3 or newer)",
        ),
        Err(Refusal {
            code: Some(RDKafkaErrorCode::OperationTimedOut),
            message,
        }) => Check::fail(
            name,
            format!("no answer in time ({message}); librdkafka waits so for a broker that supports the request"),
            "check that the broker supports it (Apache Kafka 2.3 or newer has every API lockstep uses) and is not overloaded",
        ),
        Err(Refusal { message, .. }) => Check::fail(
            name,
            format!("failed: {message}"),
            "look at the broker's error; lockstep runs the same operation and would fail the same way",
        ),
    }
}

/// `min.insync.replicas` against a topic's replication factor, for acks=all producers.
pub fn min_insync(topic: &str, replication: Option<i32>, min_isr: Option<i32>) -> Check {
    let name = format!("min.insync.replicas {topic}");
    let (Some(rf), Some(isr)) = (replication, min_isr) else {
        return Check::warn(
            name,
            format!(
                "the broker does not report {} of the topic",
                if replication.is_none() {
                    "the replication factor"
                } else {
                    "min.insync.replicas"
                }
            ),
            "check with your Kafka tooling that min.insync.replicas is at least 2 and below the replication factor",
        );
    };
    let detail = format!("min.insync.replicas {isr}, replication factor {rf}");
    if isr > rf {
        Check::fail(
            name,
            format!("{detail}: every acks=all produce fails (NotEnoughReplicas)"),
            "lower min.insync.replicas to at most the replication factor (2 of 3 is usual)",
        )
    } else if isr < 2 {
        Check::warn(
            name,
            format!("{detail}: a message acknowledged by one broker is lost if that broker's disk is"),
            "set min.insync.replicas to 2 with replication factor 3",
        )
    } else if isr == rf {
        Check::warn(
            name,
            format!("{detail}: one broker down stops the relay"),
            "use a replication factor above min.insync.replicas (3 with 2 is usual)",
        )
    } else {
        Check::pass(name, detail)
    }
}

/// The broker could not be reached (or refused the client's TLS/SASL): nothing else is checked.
pub fn unreachable(bootstrap: &str, message: &str) -> Check {
    Check::fail(
        "broker connection",
        format!("cannot reach {bootstrap}: {message}"),
        "check the bootstrap servers and the security.protocol, ssl.* and sasl.* settings (--kafka-config, --kafka-config-dir)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Verdict;

    fn refused(code: RDKafkaErrorCode) -> Result<(), Refusal> {
        Err(Refusal {
            code: Some(code),
            message: code.to_string(),
        })
    }

    #[test]
    fn an_authorization_error_names_the_missing_acl() {
        let c = operation(Op::DescribeGroup, "billing", &refused(RDKafkaErrorCode::GroupAuthorizationFailed));
        assert_eq!((c.verdict, c.name.as_str()), (Verdict::Fail, "describe consumer group billing"));
        assert!(c.detail.starts_with("not authorized"));
        assert_eq!(
            c.what_to_do.unwrap(),
            "grant the client's principal the ACL Describe on group billing (and Describe on its topics)"
        );
        let c = operation(
            Op::IdempotentProduce,
            "cluster",
            &refused(RDKafkaErrorCode::ClusterAuthorizationFailed),
        );
        assert!(c.what_to_do.unwrap().contains("IdempotentWrite"));
    }

    #[test]
    fn an_unsupported_api_says_what_broker_lockstep_needs() {
        let c = operation(Op::AlterConfigs, "orders", &refused(RDKafkaErrorCode::UnsupportedVersion));
        assert!(c.detail.starts_with("the broker does not support it"), "{}", c.detail);
        assert_eq!(operation(Op::AlterConfigs, "orders", &Ok(())).verdict, Verdict::Pass);
        let c = operation(Op::CreateTopics, "orders", &refused(RDKafkaErrorCode::OperationTimedOut));
        assert!(c.detail.starts_with("no answer in time"), "{}", c.detail);
    }

    #[test]
    fn min_insync_against_replication() {
        let v = |rf, isr| min_insync("t", Some(rf), Some(isr)).verdict;
        assert_eq!(v(3, 2), Verdict::Pass);
        assert_eq!(v(3, 1), Verdict::Warn);
        assert_eq!(v(2, 2), Verdict::Warn);
        assert_eq!(v(1, 1), Verdict::Warn);
        assert_eq!(v(1, 2), Verdict::Fail);
        assert_eq!(min_insync("t", Some(3), None).verdict, Verdict::Warn);
    }
}
