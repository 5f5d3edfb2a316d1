//! An OutboxRelay's JetStream streams (broker Nats): leave out those another object manages, describe them, plan against the spec, apply
//! the plan in order, judge TopicsReady and each stream's status (in `status.topics`; the verdict
//! is pure).

use std::collections::BTreeMap;

use kube::ResourceExt;

use super::{deps::Reporting, nats_deps, relay_topics, Context};
use crate::{
    clients::nats_admin::ObservedStream,
    crd::{DesiredStream, OutboxRelay, OutboxRelayStatus, TopicStatus, ValidNats, ValidOutboxRelay},
    operator::conditions::{condition, Cond, Reason, Status},
    operator::policy::streams::{plan, Action, Plan},
};

/// TopicsReady and each stream's status: leave out the streams another OutboxRelay manages
/// (`topic_owners`), describe, plan, apply the plan, judge.
pub async fn streams(
    ctx: &Context,
    obj: &OutboxRelay,
    previous: &OutboxRelayStatus,
    valid: &ValidOutboxRelay,
    nats: &ValidNats,
) -> (Cond, Vec<TopicStatus>) {
    let ns = obj.namespace().unwrap_or_default();
    let names: Vec<String> = nats.streams.iter().map(|s| s.name.clone()).collect();
    let held = match relay_topics::held(ctx, obj, previous, valid, "streams", &names).await {
        Ok(h) => h,
        Err(e) => return e,
    };
    let managed: Vec<DesiredStream> = nats.streams.iter().filter(|s| !held.contains_key(&s.name)).cloned().collect();
    let managed_names: Vec<String> = managed.iter().map(|s| s.name.clone()).collect();
    let on = Reporting {
        type_: condition::TOPICS_READY,
        status: Status::False,
    };
    let described = nats_deps::describe_streams(&ctx.client, &ns, &nats.servers, nats.auth_secret.as_deref(), &managed_names, on).await;
    let (admin, observed) = match described {
        Ok(d) => d,
        Err(c) => return (c, relay_topics::unknown_topics(&names, &held)),
    };
    let p = plan(&managed, &observed);
    let mut failed = Vec::new();
    for a in &p.actions {
        let r = match a {
            Action::Create(d) => admin.create(d).await,
            Action::Update(d) => admin.update(d).await,
        };
        if let Err(e) = r {
            failed.push(e);
        }
    }
    verdict(&nats.streams, &observed, &p, &failed, &held)
}

/// TopicsReady from the plan, what failed applying it and the streams another object manages,
/// and each stream's status. Pure.
pub fn verdict(
    desired: &[DesiredStream],
    observed: &BTreeMap<String, ObservedStream>,
    p: &Plan,
    failed: &[String],
    held: &BTreeMap<String, String>,
) -> (Cond, Vec<TopicStatus>) {
    const T: &str = condition::TOPICS_READY;
    let status = status_of(desired, observed, p, failed, held);
    let cond = if !failed.is_empty() {
        Cond::no(T, Reason::TopicOperationFailed, failed.join("; "))
    } else if !held.is_empty() {
        let msgs: Vec<String> = held.iter().map(|(s, h)| format!("stream {s} is managed by {h}")).collect();
        let m = format!(
            "{}; this object neither changes nor deletes it (its relay may still publish to it). \
             Remove it from spec.nats.streams here, or from the other object's",
            msgs.join("; ")
        );
        Cond::no(T, Reason::ResourceConflict, m)
    } else if !p.refusals.is_empty() {
        let msgs: Vec<String> = p.refusals.iter().map(|r| format!("stream {}: {}", r.stream, r.message)).collect();
        Cond::no(
            T,
            Reason::StreamChangeRefused,
            format!("{}; nothing was changed on those streams", msgs.join("; ")),
        )
    } else if !p.drift.is_empty() {
        let msgs: Vec<String> = p.drift.iter().map(|(s, d)| format!("{s}: {}", d.join(", "))).collect();
        Cond::yes(
            T,
            Reason::TopicConfigDrift,
            format!("restored stream settings changed outside lockstep: {}", msgs.join("; ")),
        )
    } else {
        Cond::yes(T, Reason::TopicsConfigured, format!("{} stream(s) as specified", desired.len()))
    };
    (cond, status)
}

/// Each stream: ready unless refused, failed or not reached; with its drift, or its manager.
fn status_of(
    desired: &[DesiredStream],
    observed: &BTreeMap<String, ObservedStream>,
    p: &Plan,
    failed: &[String],
    held: &BTreeMap<String, String>,
) -> Vec<TopicStatus> {
    let created = |n: &str| p.actions.iter().any(|a| matches!(a, Action::Create(d) if d.name == n));
    desired
        .iter()
        .map(|d| TopicStatus {
            name: d.name.clone(),
            partitions: None,
            ready: !held.contains_key(&d.name)
                && (observed.contains_key(&d.name) || created(&d.name))
                && failed.is_empty()
                && !p.refusals.iter().any(|r| r.stream == d.name),
            drift: p.drift.get(&d.name).cloned().unwrap_or_default(),
            managed_by: held.get(&d.name).cloned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::policy::streams::tests::desired;

    #[test]
    fn created_refused_and_failed_streams_are_judged() {
        let d = [desired()];
        let (none, held) = (BTreeMap::new(), BTreeMap::new());
        let (c, s) = verdict(&d, &none, &plan(&d, &none), &[], &held);
        assert_eq!((c.status, c.reason, s[0].ready), (Status::True, Reason::TopicsConfigured, true));
        let (c, s) = verdict(&d, &none, &plan(&d, &none), &["cannot create stream orders: no".into()], &held);
        assert_eq!(
            (c.status, c.reason, s[0].ready),
            (Status::False, Reason::TopicOperationFailed, false)
        );
        let refused = Plan {
            refusals: vec![crate::operator::policy::streams::Refusal {
                stream: "orders".into(),
                message: "storage is Memory".into(),
            }],
            ..Plan::default()
        };
        let (c, s) = verdict(&d, &none, &refused, &[], &held);
        assert_eq!(
            (c.status, c.reason, s[0].ready),
            (Status::False, Reason::StreamChangeRefused, false)
        );
        assert!(c.message.contains("stream orders: storage is Memory"), "{}", c.message);
    }

    #[test]
    fn a_stream_another_object_manages_is_left_out_and_named() {
        let d = [desired()];
        let none = BTreeMap::new();
        let held = BTreeMap::from([("orders".to_owned(), "OutboxRelay a/first".to_owned())]);
        let (c, s) = verdict(&d, &none, &Plan::default(), &[], &held);
        assert_eq!((c.status, c.reason), (Status::False, Reason::ResourceConflict));
        assert!(
            c.message.contains("stream orders is managed by OutboxRelay a/first"),
            "{}",
            c.message
        );
        assert_eq!((s[0].ready, s[0].managed_by.as_deref()), (false, Some("OutboxRelay a/first")));
    }
}
