//! An OutboxRelay's topics: describe them, plan against the spec, apply the plan in order, judge
//! TopicsReady and each topic's status (the verdict is pure).

use std::collections::BTreeMap;

use kube::ResourceExt;

use super::{
    deps::{self, Reporting},
    topic_owners, Context,
};
use crate::{
    clients::kafka::{Admin, AdminError, ObservedTopic},
    crd::topics::Desired,
    crd::{OutboxRelay, OutboxRelayStatus, TopicStatus, ValidOutboxRelay},
    operator::conditions::{condition, Cond, Reason, Status},
    operator::policy::topics::{plan, Action as TopicAction, Plan},
};

/// A topic action the broker refused or could not take.
#[derive(Debug)]
pub struct Failed {
    pub topic: String,
    pub error: AdminError,
}

/// TopicsReady, each topic's status, and the topics whose acknowledgements are the leader's alone:
/// leave out the topics another OutboxRelay manages (`topic_owners`), describe, plan, apply the
/// plan, judge.
pub async fn topics(
    ctx: &Context,
    obj: &OutboxRelay,
    previous: &OutboxRelayStatus,
    valid: &ValidOutboxRelay,
) -> (Cond, Vec<TopicStatus>, Vec<String>) {
    if let Some(r) = &valid.rabbitmq {
        let (c, s) = super::relay_queues::queues(ctx, obj, previous, valid, r).await;
        return (c, s, vec![]);
    }
    if let Some(nats) = &valid.nats {
        let (c, s) = super::relay_streams::streams(ctx, obj, previous, valid, nats).await;
        return (c, s, vec![]);
    }
    let ns = obj.namespace().unwrap_or_default();
    let names: Vec<String> = valid.topics.iter().map(|t| t.name.clone()).collect();
    let held = match held(ctx, obj, previous, valid, "topics", &names).await {
        Ok(h) => h,
        Err((c, s)) => return (c, s, vec![]),
    };
    let managed: Vec<Desired> = valid.topics.iter().filter(|t| !held.contains_key(&t.name)).cloned().collect();
    let managed_names: Vec<String> = managed.iter().map(|t| t.name.clone()).collect();
    let on = Reporting {
        type_: condition::TOPICS_READY,
        status: Status::False,
    };
    let described = deps::describe_topics(ctx, &ns, &valid.bootstrap_servers, valid.auth_secret.as_deref(), &managed_names, on).await;
    let (admin, observed) = match described {
        Ok(d) => d,
        Err(c) => return (c, unknown_topics(&names, &held), vec![]),
    };
    let p = plan(&managed, &observed);
    let failed = apply(&admin, &p).await;
    let (cond, status) = topics_verdict(&valid.topics, &observed, &p, &failed, &held);
    (cond, status, p.leader_only_acks)
}

/// The destinations (`names`, called `what`) of `valid` another OutboxRelay manages, with its
/// description; or, while that cannot be told, TopicsReady Unknown and the previous status's.
pub async fn held(
    ctx: &Context,
    obj: &OutboxRelay,
    previous: &OutboxRelayStatus,
    valid: &ValidOutboxRelay,
    what: &str,
    names: &[String],
) -> Result<BTreeMap<String, String>, (Cond, Vec<TopicStatus>)> {
    match topic_owners::others(ctx, obj, valid, topic_owners::Unsure::Other).await {
        Ok(others) => Ok(topic_owners::held_elsewhere(obj, previous, &others)),
        Err(m) => {
            let c = Cond::unknown(
                condition::TOPICS_READY,
                Reason::TopicOperationFailed,
                format!("{m}: cannot tell which {what} are this object's"),
            );
            Err((c, kept_topics(previous, names)))
        }
    }
}

/// Each topic, not known to be ready, with the holder of those another object manages.
pub fn unknown_topics(names: &[String], held: &BTreeMap<String, String>) -> Vec<TopicStatus> {
    let unknown = |n: &String| TopicStatus {
        name: n.clone(),
        partitions: None,
        ready: false,
        drift: vec![],
        managed_by: held.get(n).cloned(),
    };
    names.iter().map(unknown).collect()
}

/// The topics as the previous status had them (who manages which stays recorded), not ready.
pub fn kept_topics(previous: &OutboxRelayStatus, names: &[String]) -> Vec<TopicStatus> {
    let held = previous
        .topics
        .iter()
        .filter_map(|t| Some((t.name.clone(), t.managed_by.clone()?)))
        .collect();
    unknown_topics(names, &held)
}

/// Take the plan's actions, in order; collect what failed.
async fn apply(admin: &Admin, p: &Plan) -> Vec<Failed> {
    let mut failed = Vec::new();
    for a in &p.actions {
        let (topic, r) = match a {
            TopicAction::Create {
                name,
                partitions,
                replication_factor,
                config,
            } => (name, admin.create_topic(name, *partitions, *replication_factor, config).await),
            TopicAction::SetConfig { name, set } => (name, admin.alter_configs(name, set).await),
            TopicAction::AddPartitions { name, total } => (name, admin.create_partitions(name, *total).await),
        };
        if let Err(error) = r {
            failed.push(Failed {
                topic: topic.clone(),
                error,
            });
        }
    }
    failed
}

/// TopicsReady and each topic's status, from the plan, what failed and which topics another
/// object manages (`held`: topic -> holder, left out of the plan). Pure.
pub fn topics_verdict(
    desired: &[Desired],
    observed: &BTreeMap<String, ObservedTopic>,
    p: &Plan,
    failed: &[Failed],
    held: &BTreeMap<String, String>,
) -> (Cond, Vec<TopicStatus>) {
    let status = desired
        .iter()
        .map(|d| {
            if held.contains_key(&d.name) {
                return unknown_topics(std::slice::from_ref(&d.name), held).remove(0);
            }
            let created = p
                .actions
                .iter()
                .any(|a| matches!(a, TopicAction::Create { name, .. } if name == &d.name));
            let bad = failed.iter().any(|f| f.topic == d.name) || p.refusals.iter().any(|r| r.topic == d.name);
            TopicStatus {
                name: d.name.clone(),
                partitions: observed.get(&d.name).map(|o| o.partitions).or(created.then_some(d.partitions)),
                ready: !bad,
                drift: p.drift.get(&d.name).cloned().unwrap_or_default(),
                managed_by: None,
            }
        })
        .collect();
    (topics_condition(desired.len() - held.len(), p, failed, held), status)
}

fn topics_condition(count: usize, p: &Plan, failed: &[Failed], held: &BTreeMap<String, String>) -> Cond {
    const T: &str = condition::TOPICS_READY;
    let warn = if p.warnings.is_empty() {
        String::new()
    } else {
        format!(" Warnings: {}", p.warnings.join("; "))
    };
    if let Some(f) = failed.iter().find(|f| f.error.is_unreachable()) {
        return Cond::no(T, Reason::BrokerUnreachable, f.error.to_string());
    }
    if !failed.is_empty() {
        let msgs: Vec<String> = failed.iter().map(|f| f.error.to_string()).collect();
        return Cond::no(T, Reason::TopicOperationFailed, format!("{}{warn}", msgs.join("; ")));
    }
    if !held.is_empty() {
        let msgs: Vec<String> = held.iter().map(|(t, h)| format!("topic {t} is managed by {h}")).collect();
        let m = format!(
            "{}; this object neither changes nor deletes it (its relay may still publish to it). \
             Remove it from spec.topics here, or from the other object's{warn}",
            msgs.join("; ")
        );
        return Cond::no(T, Reason::ResourceConflict, m);
    }
    if !p.refusals.is_empty() {
        let msgs: Vec<&str> = p.refusals.iter().map(|r| r.message.as_str()).collect();
        let m = format!("{}; nothing was changed on those topics{warn}", msgs.join("; "));
        return Cond::no(T, Reason::PartitionChangeRefused, m);
    }
    if !p.drift.is_empty() {
        let msgs: Vec<String> = p.drift.iter().map(|(t, d)| format!("{t}: {}", d.join(", "))).collect();
        let m = format!("restored config changed outside lockstep: {}{warn}", msgs.join("; "));
        return Cond::yes(T, Reason::TopicConfigDrift, m);
    }
    Cond::yes(T, Reason::TopicsConfigured, format!("{count} topic(s) as specified{warn}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::policy::topics::{
        self,
        tests::{desired, one},
    };

    fn observed(name: &str, partitions: i32, config: &[(&str, &str)]) -> BTreeMap<String, ObservedTopic> {
        one(name, topics::tests::observed(partitions, 3, config))
    }

    /// Plan against what the broker has, then judge as if every action succeeded but `failed`.
    fn judge(d: &[Desired], o: &BTreeMap<String, ObservedTopic>, failed: &[Failed]) -> (Cond, Vec<TopicStatus>) {
        topics_verdict(d, o, &plan(d, o), failed, &BTreeMap::new())
    }

    #[test]
    fn created_and_matching_topics_are_configured() {
        let m = ("min.insync.replicas", "2");
        let d = [desired("new", 6, &[m]), desired("old", 3, &[("retention.ms", "1000"), m])];
        let (c, st) = judge(&d, &observed("old", 3, &[("retention.ms", "1000"), m]), &[]);
        assert_eq!(
            (c.status, c.reason, c.message.as_str()),
            (Status::True, Reason::TopicsConfigured, "2 topic(s) as specified")
        );
        assert_eq!(
            st[0].partitions,
            Some(6),
            "a created topic reports the partitions it was created with"
        );
        assert!(st.iter().all(|t| t.ready && t.drift.is_empty()));
    }

    #[test]
    fn drift_is_restored_and_reported() {
        let d = [desired("t", 3, &[("retention.ms", "1000")])];
        let broker = [("retention.ms", "5"), ("min.insync.replicas", "2")];
        let (c, st) = judge(&d, &observed("t", 3, &broker), &[]);
        assert_eq!((c.status, c.reason), (Status::True, Reason::TopicConfigDrift));
        assert_eq!(c.message, "restored config changed outside lockstep: t: retention.ms: 5 -> 1000");
        assert_eq!(st[0].drift, vec!["retention.ms: 5 -> 1000"]);
    }

    #[test]
    fn partition_changes_are_refused_and_the_topic_not_ready() {
        let d = [desired("t", 12, &[])];
        let (c, st) = judge(&d, &observed("t", 6, &[("min.insync.replicas", "2")]), &[]);
        assert_eq!((c.status, c.reason), (Status::False, Reason::PartitionChangeRefused));
        assert!(c.message.ends_with("nothing was changed on those topics"), "{}", c.message);
        assert_eq!((st[0].ready, st[0].partitions), (false, Some(6)));
    }

    #[test]
    fn failures_unreachable_first_then_refused() {
        let d = [desired("a", 3, &[]), desired("b", 3, &[])];
        let refused = || Failed {
            topic: "a".into(),
            error: AdminError::Refused {
                operation: "create",
                topic: "a".into(),
                message: "policy".into(),
            },
        };
        let down = Failed {
            topic: "b".into(),
            error: AdminError::Unreachable {
                bootstrap: "k:9092".into(),
                message: "timeout".into(),
            },
        };
        let (c, st) = judge(&d, &BTreeMap::new(), &[refused(), down]);
        assert_eq!((c.status, c.reason), (Status::False, Reason::BrokerUnreachable));
        assert!(st.iter().all(|t| !t.ready));
        let (c, st) = judge(&d, &BTreeMap::new(), &[refused()]);
        assert_eq!((c.status, c.reason), (Status::False, Reason::TopicOperationFailed));
        assert_eq!((st[0].ready, st[1].ready), (false, true));
    }

    #[test]
    fn durability_warnings_ride_along() {
        let d = [desired("t", 3, &[("min.insync.replicas", "3")])];
        let (c, _) = judge(&d, &observed("t", 3, &[("min.insync.replicas", "3")]), &[]);
        assert_eq!(c.reason, Reason::TopicsConfigured);
        assert!(
            c.message.contains(" Warnings: t: min.insync.replicas=3 with replication factor 3"),
            "{}",
            c.message
        );
    }

    #[test]
    fn a_topic_another_object_manages_is_left_out_and_named() {
        let d = [desired("theirs", 3, &[("retention.ms", "60000")]), desired("mine", 1, &[])];
        let held = BTreeMap::from([("theirs".to_string(), "OutboxRelay a/orders".to_string())]);
        // Planned without it: the broker's config of it is never compared, nor changed.
        let o = observed("theirs", 3, &[("retention.ms", "604800000")]);
        let (c, st) = topics_verdict(&d, &o, &plan(&d[1..], &o), &[], &held);
        assert_eq!((c.status, c.reason), (Status::False, Reason::ResourceConflict));
        assert!(
            c.message
                .starts_with("topic theirs is managed by OutboxRelay a/orders; this object neither changes nor deletes it"),
            "{}",
            c.message
        );
        assert_eq!(
            (st[0].ready, st[0].managed_by.as_deref(), st[0].drift.len()),
            (false, Some("OutboxRelay a/orders"), 0)
        );
        assert_eq!((st[1].ready, st[1].managed_by.as_deref()), (true, None));
    }

    #[test]
    fn unknown_topics_when_the_broker_cannot_be_asked() {
        let st = unknown_topics(&["a".into()], &BTreeMap::new());
        assert_eq!((st[0].ready, st[0].partitions, st[0].managed_by.as_deref()), (false, None, None));
    }
}
