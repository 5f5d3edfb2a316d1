//! DedupCovered: does an InboxTable's effective retention outlive every redelivery of its
//! source topics? The broker is asked for the topics; the verdict is pure.

use super::{
    deps::{self, Reporting},
    Context,
};
use crate::{
    crd::ValidInboxTable,
    operator::conditions::{condition, Cond, Reason, Status},
    operator::policy::coverage::{self, QueueRetention, Source, StreamRetention, TopicRetention},
    operator::policy::retention::Effective,
};

/// DedupCovered: does the effective retention outlive every redelivery from the source topics
/// and streams?
pub async fn dedup_covered(ctx: &Context, ns: &str, valid: &ValidInboxTable, eff: &Effective) -> Cond {
    let window = valid.redelivery_window.as_ref().map(|w| w.pair());
    if valid.sources.is_none() && valid.nats_source.is_none() && valid.rabbitmq_source.is_none() {
        return coverage_condition(eff, window, None);
    }
    let on = Reporting {
        type_: condition::DEDUP_COVERED,
        status: Status::Unknown,
    };
    let mut found = SourceTopics::default();
    if let Some(k) = &valid.sources {
        match deps::describe_topics(ctx, ns, &k.bootstrap_servers, k.auth_secret.as_deref(), &k.topics, on).await {
            Err(c) => return c,
            Ok((_, observed)) => {
                let setting = |t: &String, key: &str| observed.get(t).and_then(|o| o.config.get(key)).cloned();
                found.topics.extend(k.topics.iter().map(|t| {
                    Source::Topic(TopicRetention {
                        name: t.clone(),
                        retention_ms: setting(t, "retention.ms").and_then(|v| v.parse().ok()),
                        segment_ms: setting(t, "segment.ms").and_then(|v| v.parse().ok()),
                        cleanup_policy: setting(t, "cleanup.policy"),
                    })
                }));
                found
                    .missing
                    .extend(k.topics.iter().filter(|t| !observed.contains_key(*t)).cloned());
            }
        }
    }
    if let Some(n) = &valid.nats_source {
        match super::nats_deps::describe_streams(&ctx.client, ns, &n.servers, n.auth_secret.as_deref(), &n.streams, on).await {
            Err(c) => return c,
            Ok((_, observed)) => {
                for s in &n.streams {
                    match observed.get(s) {
                        Some(o) => found.topics.push(Source::Stream(StreamRetention {
                            name: s.clone(),
                            max_age: o.max_age,
                        })),
                        None => found.missing.push(format!("stream {s}")),
                    }
                }
            }
        }
    }
    if let Some(r) = &valid.rabbitmq_source {
        match rabbitmq_queues(ctx, ns, r, on).await {
            Err(c) => return c,
            Ok((queues, missing)) => {
                found.topics.extend(queues.into_iter().map(Source::Queue));
                found.missing.extend(missing.into_iter().map(|q| format!("queue {q}")));
            }
        }
    }
    coverage_condition(eff, window, Some(&found))
}

/// The source queues' redelivery bounds (argument or policy, the lower), and the queues the
/// server does not have.
async fn rabbitmq_queues(
    ctx: &Context,
    ns: &str,
    r: &crate::crd::ValidRabbitmqSource,
    on: Reporting,
) -> Result<(Vec<QueueRetention>, Vec<String>), Cond> {
    let m = super::rabbitmq_deps::Management {
        url: &r.management_url,
        vhost: &r.vhost,
        secret: r.auth_secret.as_deref(),
        field: "sources.rabbitmq.authSecretRef",
    };
    let admin = super::rabbitmq_deps::admin(&ctx.client, ns, m, on).await?;
    let names: Vec<&str> = r.queues.iter().map(String::as_str).collect();
    let observed = super::rabbitmq_deps::observe(&admin, &[], &names, &[], on).await?;
    let missing = r.queues.iter().filter(|q| !observed.queues.contains_key(*q)).cloned().collect();
    let found = observed.queues.iter().map(|(name, q)| queue_retention(name, q)).collect();
    Ok((found, missing))
}

/// What bounds a queue's redelivery, from its arguments and effective policy. Pure.
pub fn queue_retention(name: &str, q: &crate::clients::rabbitmq_admin::ObservedQueue) -> QueueRetention {
    let int = |arg: &str, policy: &str| {
        let a = q.arguments.get(arg).and_then(|v| v.as_i64());
        let p = q.policy.get(policy).and_then(|v| v.as_i64());
        a.into_iter().chain(p).min()
    };
    let age = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).and_then(crate::crd::max_age_secs);
    QueueRetention {
        name: name.to_owned(),
        type_: q.type_.clone(),
        message_ttl_ms: int("x-message-ttl", "message-ttl"),
        max_age_secs: age(q.arguments.get("x-max-age"))
            .into_iter()
            .chain(age(q.policy.get("max-age")))
            .min(),
        delivery_limit: int("x-delivery-limit", "delivery-limit"),
    }
}

/// The source topics as the broker describes them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourceTopics {
    /// Each topic's or stream's settings that bound redelivery, as reported.
    pub topics: Vec<Source>,
    /// Topics (or "stream <name>") the broker does not know.
    pub missing: Vec<String>,
}

/// DedupCovered from the topics' retention (None: no sources declared). Pure.
pub fn coverage_condition(eff: &Effective, window: Option<(&str, std::time::Duration)>, sources: Option<&SourceTopics>) -> Cond {
    const T: &str = condition::DEDUP_COVERED;
    let c = match (sources, window) {
        (None, None) => {
            return Cond::unknown(
                T,
                Reason::NoSourcesDeclared,
                "no spec.sources (kafka, nats or rabbitmq) and no redeliveryWindow: lockstep cannot check that the retention outlives redelivery",
            )
        }
        (None, Some(_)) => coverage::coverage(eff.retention, &eff.text, window, &[]),
        (Some(s), None) if !s.missing.is_empty() => {
            return Cond::unknown(
                T,
                Reason::TopicNotFound,
                format!("source topic(s) not found: {}", s.missing.join(", ")),
            )
        }
        (Some(s), _) => coverage::coverage(eff.retention, &eff.text, window, &s.topics),
    };
    if c.covered {
        Cond::yes(T, Reason::RetentionCoversRedelivery, c.message)
    } else {
        Cond::no(T, Reason::RetentionBelowTopicRetention, c.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{operator::controller::fixtures::*, operator::policy::retention::Compliance};

    #[test]
    fn a_queue_is_bounded_by_the_lower_of_its_argument_and_its_policy() {
        use serde_json::json;
        let q = crate::clients::rabbitmq_admin::ObservedQueue {
            type_: "quorum".into(),
            durable: true,
            arguments: [
                ("x-message-ttl".to_owned(), json!(86_400_000)),
                ("x-delivery-limit".to_owned(), json!(20)),
            ]
            .into(),
            policy: [("message-ttl".to_owned(), json!(3_600_000))].into(),
            ..Default::default()
        };
        let r = queue_retention("billing", &q);
        assert_eq!(
            (r.message_ttl_ms, r.delivery_limit, r.max_age_secs),
            (Some(3_600_000), Some(20), None)
        );
        let s = crate::clients::rabbitmq_admin::ObservedQueue {
            type_: "stream".into(),
            arguments: [("x-max-age".to_owned(), json!("7D"))].into(),
            policy: [("max-age".to_owned(), json!("1D"))].into(),
            ..Default::default()
        };
        assert_eq!(queue_retention("audit", &s).max_age_secs, Some(86_400));
    }

    #[test]
    fn coverage_from_sources() {
        let eff = effective("1d", Compliance::NoPolicy, false);
        let none = coverage_condition(&eff, None, None);
        assert_eq!((none.status, none.reason), (Status::Unknown, Reason::NoSourcesDeclared));
        let week = SourceTopics {
            topics: vec![Source::Topic(TopicRetention {
                name: "orders".into(),
                retention_ms: Some(7 * 86_400_000),
                ..Default::default()
            })],
            missing: vec![],
        };
        let c = coverage_condition(&eff, None, Some(&week));
        assert_eq!((c.status, c.reason), (Status::False, Reason::RetentionBelowTopicRetention));
        let gone = SourceTopics {
            topics: vec![Source::Topic(TopicRetention {
                name: "orders".into(),
                ..Default::default()
            })],
            missing: vec!["orders".into()],
        };
        let c = coverage_condition(&eff, None, Some(&gone));
        assert_eq!((c.status, c.reason), (Status::Unknown, Reason::TopicNotFound));
        assert_eq!(c.message, "source topic(s) not found: orders");
        // A stated redelivery window decides, whatever the topics say.
        let window = given("12h");
        let c = coverage_condition(&eff, Some(window.pair()), Some(&gone));
        assert_eq!((c.status, c.reason), (Status::True, Reason::RetentionCoversRedelivery));
        let c = coverage_condition(&eff, Some(given("2d").pair()), None);
        assert_eq!(c.status, Status::False);
    }
}
