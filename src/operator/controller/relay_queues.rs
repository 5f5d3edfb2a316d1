//! An OutboxRelay's RabbitMQ topology (broker Rabbitmq): leave out what another object manages,
//! read the exchange, queues and bindings over the management API, plan against the spec, apply
//! the plan in order, judge TopicsReady and each entry of `status.topics` (`exchange/<name>`,
//! `queue/<name>`; the verdict is pure).

use std::collections::BTreeMap;

use kube::ResourceExt;

use super::{
    deps::Reporting,
    rabbitmq_deps::{self, Management},
    relay_topics, topic_owners, Context,
};
use crate::{
    clients::rabbitmq_admin::RabbitAdmin,
    crd::{DesiredQueue, Guarantee, OutboxRelay, OutboxRelayStatus, TopicStatus, ValidOutboxRelay, ValidRabbitmq},
    operator::conditions::{condition, Cond, Reason, Status},
    operator::policy::queues::{plan, Action, Observed, Plan},
};

/// TopicsReady and each exchange's and queue's status.
pub async fn queues(
    ctx: &Context,
    obj: &OutboxRelay,
    previous: &OutboxRelayStatus,
    valid: &ValidOutboxRelay,
    r: &ValidRabbitmq,
) -> (Cond, Vec<TopicStatus>) {
    let names = topic_owners::destinations(valid);
    let Some(url) = r.management_url.as_deref().filter(|_| !names.is_empty()) else {
        let c = Cond::yes(
            condition::TOPICS_READY,
            Reason::TopicsConfigured,
            "nothing to declare: the relay publishes to the default exchange",
        );
        return (c, vec![]);
    };
    let held = match relay_topics::held(ctx, obj, previous, valid, "exchanges and queues", &names).await {
        Ok(h) => h,
        Err(e) => return e,
    };
    let on = Reporting {
        type_: condition::TOPICS_READY,
        status: Status::False,
    };
    let m = Management {
        url,
        vhost: &r.vhost,
        secret: r.auth_secret.as_deref(),
        field: "rabbitmq.authSecretRef",
    };
    let exchange = r.exchange.as_ref().filter(|e| !held.contains_key(&format!("exchange/{}", e.name)));
    let managed: Vec<DesiredQueue> = r
        .queues
        .iter()
        .filter(|q| !held.contains_key(&format!("queue/{}", q.name)))
        .cloned()
        .collect();
    let observed = match observe(ctx, &obj.namespace().unwrap_or_default(), m, r, &managed, on).await {
        Ok(o) => o,
        Err(c) => return (c, relay_topics::unknown_topics(&names, &held)),
    };
    let (admin, observed) = observed;
    let p = plan(exchange, r.exchange_name(), &managed, &observed);
    let failed = apply(&admin, &p).await;
    verdict(r, &observed, &p, &failed, &held)
}

/// The client, and what the server has of the exchange, the queues (with their dead-letter
/// exchanges and queues) and their bindings.
async fn observe(
    ctx: &Context,
    ns: &str,
    m: Management<'_>,
    r: &ValidRabbitmq,
    queues: &[DesiredQueue],
    on: Reporting,
) -> Result<(RabbitAdmin, Observed), Cond> {
    let admin = rabbitmq_deps::admin(&ctx.client, ns, m, on).await?;
    let mut exchanges: Vec<&str> = r.exchange.iter().map(|e| e.name.as_str()).collect();
    exchanges.extend(queues.iter().filter_map(|q| q.dead_letter_exchange.as_deref()));
    let mut names: Vec<&str> = queues.iter().map(|q| q.name.as_str()).collect();
    names.extend(queues.iter().filter_map(|q| q.dead_letter_queue.as_deref()));
    let mut bindings: Vec<(&str, &str)> = queues.iter().map(|q| (r.exchange_name(), q.name.as_str())).collect();
    bindings.extend(
        queues
            .iter()
            .filter_map(|q| Some((q.dead_letter_exchange.as_deref()?, q.dead_letter_queue.as_deref()?))),
    );
    let mut observed = rabbitmq_deps::observe(&admin, &exchanges, &names, &bindings, on).await?;
    // lockstep's policy of each queue (to keep, or to delete when no longer asked for), and the
    // policy a queue reports as applied when it is another (its priority tells if it wins).
    let mut policies: Vec<String> = queues.iter().map(|q| crate::crd::policy_name(&q.name)).collect();
    policies.extend(queues.iter().filter_map(|q| observed.queues.get(&q.name)?.policy_name.clone()));
    for name in policies {
        match admin.policy(&name).await {
            Ok(Some(found)) => drop(observed.policies.insert(name, found)),
            Ok(None) => {}
            Err(e) => return Err(rabbitmq_deps::failed(on, e)),
        }
    }
    Ok((admin, observed))
}

/// Take the plan's actions, in order; what failed, as messages.
async fn apply(admin: &RabbitAdmin, p: &Plan) -> Vec<String> {
    let mut failed = Vec::new();
    // A queue whose policy could not be set is not declared without its settings.
    let mut unset = Vec::new();
    for a in &p.actions {
        let r = match a {
            Action::DeclareExchange { name, type_, durable } => admin.declare_exchange(name, type_, *durable).await,
            Action::DeclareQueue { name, .. } if unset.contains(&crate::crd::policy_name(name)) => continue,
            Action::DeclareQueue { name, arguments } => admin.declare_queue(name, arguments).await,
            Action::Bind { exchange, queue, key } => admin.bind(exchange, queue, key).await,
            Action::SetPolicy(d) => {
                let r = admin.set_policy(&d.name, &d.pattern, d.priority, &d.definition).await;
                if r.is_err() {
                    unset.push(d.name.clone());
                }
                r
            }
            Action::DeletePolicy(name) => admin.delete("policies", name).await,
        };
        if let Err(e) = r {
            failed.push(e);
        }
    }
    failed
}

/// TopicsReady from the plan, what failed applying it and what another object manages, and the
/// status of the exchange and each queue. Pure.
pub fn verdict(
    r: &ValidRabbitmq,
    observed: &Observed,
    p: &Plan,
    failed: &[String],
    held: &BTreeMap<String, String>,
) -> (Cond, Vec<TopicStatus>) {
    const T: &str = condition::TOPICS_READY;
    let cond = if !failed.is_empty() {
        Cond::no(T, Reason::TopicOperationFailed, failed.join("; "))
    } else if !held.is_empty() {
        let msgs: Vec<String> = held.iter().map(|(n, h)| format!("{n} is managed by {h}")).collect();
        let m = format!(
            "{}; this object neither changes nor deletes it (its relay may still publish to it). \
             Remove it from spec.rabbitmq here, or from the other object's",
            msgs.join("; ")
        );
        Cond::no(T, Reason::ResourceConflict, m)
    } else if !p.refusals.is_empty() {
        let msgs: Vec<String> = p.refusals.iter().map(|x| format!("{} {}", x.what, x.message)).collect();
        Cond::no(
            T,
            Reason::QueueChangeRefused,
            format!("{}; nothing was declared on those", msgs.join("; ")),
        )
    } else if !p.drift.is_empty() {
        let msgs: Vec<String> = p.drift.iter().map(|(q, d)| format!("queue {q}: {}", d.join(", "))).collect();
        Cond::yes(
            T,
            Reason::TopicConfigDrift,
            format!("changed outside lockstep: {}", msgs.join("; ")),
        )
    } else {
        let m = format!(
            "{} exchange(s) and {} queue(s) as specified",
            r.exchange.iter().count(),
            r.queues.len()
        );
        Cond::yes(T, Reason::TopicsConfigured, m)
    };
    (cond, status_of(r, observed, p, failed, held))
}

/// The exchange and each queue: ready unless refused, failed or not reached; with their drift,
/// or their manager.
fn status_of(r: &ValidRabbitmq, observed: &Observed, p: &Plan, failed: &[String], held: &BTreeMap<String, String>) -> Vec<TopicStatus> {
    let declared = |n: &str, queue: bool| {
        p.actions.iter().any(|a| match a {
            Action::DeclareQueue { name, .. } => queue && name == n,
            Action::DeclareExchange { name, .. } => !queue && name == n,
            Action::Bind { .. } | Action::SetPolicy(_) | Action::DeletePolicy(_) => false,
        })
    };
    let entry = |kind: &str, n: &str, exists: bool, drift: Vec<String>| {
        let key = format!("{kind}/{n}");
        TopicStatus {
            ready: !held.contains_key(&key)
                && (exists || declared(n, kind == "queue"))
                && failed.is_empty()
                && !p.refusals.iter().any(|x| x.what == format!("{kind} {n}")),
            partitions: None,
            drift,
            managed_by: held.get(&key).cloned(),
            name: key,
        }
    };
    let exchange = r
        .exchange
        .iter()
        .map(|e| entry("exchange", &e.name, observed.exchanges.contains_key(&e.name), vec![]));
    let queues = r.queues.iter().map(|q| {
        let drift = p.drift.get(&q.name).cloned().unwrap_or_default();
        entry("queue", &q.name, observed.queues.contains_key(&q.name), drift)
    });
    exchange.chain(queues).collect()
}

/// What holds on each hop of an OutboxRelay publishing to RabbitMQ: confirms and `mandatory` on
/// the way in, no broker-side dedup, and redelivery bounded in time only by a message TTL. Pure.
pub fn guarantees(r: &ValidRabbitmq) -> Vec<Guarantee> {
    let g = |hop: &str, guarantee: String| Guarantee {
        hop: hop.into(),
        guarantee,
    };
    let queues: Vec<String> = r.queues.iter().map(queue_terms).collect();
    let consumer = if queues.is_empty() {
        "at-least-once: an unacknowledged message is redelivered, without a time bound unless its queue has a message TTL;          deduplicate with an InboxTable"
            .to_owned()
    } else {
        format!(
            "at-least-once: an unacknowledged message is redelivered ({}); deduplicate with an InboxTable",
            queues.join("; ")
        )
    };
    vec![
        g("service -> database", "atomic with the business write (transactional outbox)".into()),
        g(
            "database -> broker",
            "at-least-once, per-key order (a key's next message waits for the previous one's publisher confirm);              persistent messages, mandatory (an unroutable message is not a success); RabbitMQ drops no resend:              a resend after a lost confirm is a second copy with the same message_id"
                .into(),
        ),
        g("broker -> consumer", consumer),
    ]
}

/// A queue's redelivery terms, as the guarantee map words them.
fn queue_terms(q: &DesiredQueue) -> String {
    let arg = |k: &str| q.setting(k).map(|v| v.to_string().trim_matches('"').to_owned());
    let mut terms = vec![format!("{} {}", q.name, q.type_.as_str())];
    if let Some(n) = arg("x-delivery-limit") {
        let then = q
            .dead_letter_exchange
            .as_ref()
            .map_or("dropped".to_owned(), |x| format!("dead-lettered to {x}"));
        terms.push(format!("at most {n} deliveries, then {then}"));
    }
    match (arg("x-message-ttl"), arg("x-max-age")) {
        (Some(ms), _) => terms.push(format!(
            "expires after {}",
            crate::core::duration::format(std::time::Duration::from_millis(ms.parse().unwrap_or(0)))
        )),
        (None, Some(age)) => terms.push(format!("kept {age} (x-max-age) for any consumer to re-read")),
        (None, None) if q.ignore.contains("messageTtl") || q.ignore.contains("maxAge") => terms.push("expiry set by a policy".into()),
        (None, None) => terms.push("no expiry: redelivery without a time bound".into()),
    }
    terms.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::policy::queues::tests::{as_declared, exchange, queue};

    fn valid() -> ValidRabbitmq {
        ValidRabbitmq {
            url: "amqp://r:5672/%2F".into(),
            vhost: "/".into(),
            management_url: Some("http://r:15672".into()),
            auth_secret: None,
            confirm_timeout: std::time::Duration::from_secs(30),
            exchange: Some(exchange()),
            queues: vec![queue()],
        }
    }

    #[test]
    fn declared_refused_and_failed_topology_is_judged() {
        let (r, none, held) = (valid(), Observed::default(), BTreeMap::new());
        let p = plan(r.exchange.as_ref(), "outbox", &r.queues, &none);
        let (c, s) = verdict(&r, &none, &p, &[], &held);
        assert_eq!((c.status, c.reason), (Status::True, Reason::TopicsConfigured));
        let names: Vec<(&str, bool)> = s.iter().map(|t| (t.name.as_str(), t.ready)).collect();
        assert_eq!(names, [("exchange/outbox", true), ("queue/billing", true)]);
        let (c, s) = verdict(&r, &none, &p, &["PUT ...: 403".into()], &held);
        assert_eq!(
            (c.status, c.reason, s[1].ready),
            (Status::False, Reason::TopicOperationFailed, false)
        );

        let mut o = as_declared();
        o.queues
            .get_mut("billing")
            .unwrap()
            .arguments
            .insert("x-delivery-limit".into(), serde_json::json!(5));
        let p = plan(r.exchange.as_ref(), "outbox", &r.queues, &o);
        let (c, s) = verdict(&r, &o, &p, &[], &held);
        assert_eq!((c.status, c.reason), (Status::False, Reason::QueueChangeRefused));
        assert!(
            c.message.starts_with("queue billing deliveryLimit (x-delivery-limit): 5 -> 20;"),
            "{}",
            c.message
        );
        assert_eq!((s[0].ready, s[1].ready), (true, false));
    }

    #[test]
    fn guarantees_say_what_bounds_redelivery() {
        let g = guarantees(&valid());
        assert!(
            g[1].guarantee.contains("publisher confirm") && g[1].guarantee.contains("mandatory"),
            "{g:?}"
        );
        assert!(
            g[2].guarantee
                .contains("billing quorum, at most 20 deliveries, then dropped, expires after 7d"),
            "{g:?}"
        );
        let mut r = valid();
        r.queues[0].arguments.clear();
        assert!(guarantees(&r)[2].guarantee.contains("no expiry: redelivery without a time bound"));
    }

    #[test]
    fn a_queue_another_object_manages_is_named() {
        let r = valid();
        let held = BTreeMap::from([("queue/billing".to_owned(), "OutboxRelay a/first".to_owned())]);
        let (c, s) = verdict(&r, &as_declared(), &Plan::default(), &[], &held);
        assert_eq!((c.status, c.reason), (Status::False, Reason::ResourceConflict));
        assert!(
            c.message.contains("queue/billing is managed by OutboxRelay a/first"),
            "{}",
            c.message
        );
        assert_eq!((s[1].ready, s[1].managed_by.as_deref()), (false, Some("OutboxRelay a/first")));
    }
}
