//! An OutboxRelay's JetStream streams (broker Nats): describe them, plan against the spec, apply
//! the plan in order, judge TopicsReady and each stream's status (in `status.topics`; the verdict
//! is pure).

use std::collections::BTreeMap;

use kube::ResourceExt;

use super::{deps::Reporting, nats_deps, Context};
use crate::{
    clients::nats_admin::ObservedStream,
    crd::{DesiredStream, OutboxRelay, TopicStatus, ValidNats},
    operator::conditions::{condition, Cond, Reason, Status},
    operator::policy::streams::{plan, Action, Plan},
};

/// TopicsReady and each stream's status.
pub async fn streams(ctx: &Context, obj: &OutboxRelay, nats: &ValidNats) -> (Cond, Vec<TopicStatus>) {
    let ns = obj.namespace().unwrap_or_default();
    let names: Vec<String> = nats.streams.iter().map(|s| s.name.clone()).collect();
    let on = Reporting {
        type_: condition::TOPICS_READY,
        status: Status::False,
    };
    let described = nats_deps::describe_streams(&ctx.client, &ns, &nats.servers, nats.auth_secret.as_deref(), &names, on).await;
    let (admin, observed) = match described {
        Ok(d) => d,
        Err(c) => return (c, status_of(&nats.streams, &BTreeMap::new(), &Plan::default(), &[])),
    };
    let p = plan(&nats.streams, &observed);
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
    verdict(&nats.streams, &observed, &p, &failed)
}

/// TopicsReady from the plan and what failed applying it, and each stream's status. Pure.
pub fn verdict(
    desired: &[DesiredStream],
    observed: &BTreeMap<String, ObservedStream>,
    p: &Plan,
    failed: &[String],
) -> (Cond, Vec<TopicStatus>) {
    const T: &str = condition::TOPICS_READY;
    let status = status_of(desired, observed, p, failed);
    let cond = if !failed.is_empty() {
        Cond::no(T, Reason::TopicOperationFailed, failed.join("; "))
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

/// Each stream: ready unless refused, failed or not reached; with its drift.
fn status_of(desired: &[DesiredStream], observed: &BTreeMap<String, ObservedStream>, p: &Plan, failed: &[String]) -> Vec<TopicStatus> {
    let created = |n: &str| p.actions.iter().any(|a| matches!(a, Action::Create(d) if d.name == n));
    desired
        .iter()
        .map(|d| TopicStatus {
            name: d.name.clone(),
            partitions: None,
            ready: (observed.contains_key(&d.name) || created(&d.name))
                && failed.is_empty()
                && !p.refusals.iter().any(|r| r.stream == d.name),
            drift: p.drift.get(&d.name).cloned().unwrap_or_default(),
            managed_by: None,
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
        let none = BTreeMap::new();
        let (c, s) = verdict(&d, &none, &plan(&d, &none), &[]);
        assert_eq!((c.status, c.reason, s[0].ready), (Status::True, Reason::TopicsConfigured, true));
        let (c, s) = verdict(&d, &none, &plan(&d, &none), &["cannot create stream orders: no".into()]);
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
        let (c, s) = verdict(&d, &none, &refused, &[]);
        assert_eq!(
            (c.status, c.reason, s[0].ready),
            (Status::False, Reason::StreamChangeRefused, false)
        );
        assert!(c.message.contains("stream orders: storage is Memory"), "{}", c.message);
    }
}
