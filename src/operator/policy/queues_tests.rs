use serde_json::json;

use super::*;
use crate::crd::{ExchangeType, QueueType};

/// The exchange `outbox` (topic, durable).
pub(crate) fn exchange() -> DesiredExchange {
    DesiredExchange {
        name: "outbox".into(),
        type_: ExchangeType::Topic,
        durable: true,
    }
}

/// A quorum queue `billing` bound by `order.#`, a week's TTL, 20 deliveries.
pub(crate) fn queue() -> DesiredQueue {
    DesiredQueue {
        name: "billing".into(),
        type_: QueueType::Quorum,
        bindings: vec!["order.#".into()],
        arguments: BTreeMap::from([
            ("x-message-ttl".to_owned(), json!(604_800_000u64)),
            ("x-delivery-limit".to_owned(), json!(20)),
        ]),
        policy: None,
        ignore: BTreeSet::new(),
        dead_letter_exchange: None,
        dead_letter_queue: None,
    }
}

/// The server holding exactly what `queue()` and `exchange()` ask.
pub(crate) fn as_declared() -> Observed {
    let q = queue();
    Observed {
        exchanges: BTreeMap::from([(
            "outbox".to_owned(),
            ObservedExchange {
                type_: "topic".into(),
                durable: true,
            },
        )]),
        queues: BTreeMap::from([(
            "billing".to_owned(),
            ObservedQueue {
                type_: "quorum".into(),
                durable: true,
                arguments: q
                    .arguments
                    .clone()
                    .into_iter()
                    .chain([("x-queue-type".to_owned(), json!("quorum"))])
                    .collect(),
                ..Default::default()
            },
        )]),
        bindings: BTreeMap::from([(("outbox".to_owned(), "billing".to_owned()), vec!["order.#".to_owned()])]),
        policies: BTreeMap::new(),
    }
}

/// `queue()` with its settings given by the policy `lockstep.billing`.
fn by_policy() -> DesiredQueue {
    let mut q = queue();
    let definition = std::mem::take(&mut q.arguments)
        .into_iter()
        .map(|(k, v)| (k.trim_start_matches("x-").to_owned(), v))
        .collect();
    q.policy = Some(DesiredPolicy {
        name: "lockstep.billing".into(),
        pattern: "^billing$".into(),
        priority: 10,
        definition,
    });
    q
}

/// The server holding `by_policy()` as it asks, the policy applied to the queue.
fn as_declared_by_policy() -> Observed {
    let d = by_policy().policy.unwrap();
    let mut o = as_declared();
    let q = o.queues.get_mut("billing").unwrap();
    q.arguments.retain(|k, _| k == "x-queue-type");
    q.policy_name = Some(d.name.clone());
    let found = ObservedPolicy {
        pattern: d.pattern,
        priority: d.priority,
        apply_to: "queues".into(),
        definition: d.definition,
    };
    o.policies.insert(d.name, found);
    o
}

#[test]
fn a_policy_is_set_before_its_queue_is_declared_then_kept_to_the_spec() {
    let q = by_policy();
    let p = plan(Some(&exchange()), "outbox", std::slice::from_ref(&q), &Observed::default());
    assert!(matches!(&p.actions[1], Action::SetPolicy(d) if d.definition["message-ttl"] == json!(604_800_000u64)));
    assert!(
        matches!(&p.actions[2], Action::DeclareQueue { arguments, .. } if arguments.len() == 1),
        "only x-queue-type: {:?}",
        p.actions
    );

    let held = as_declared_by_policy();
    let p = plan(Some(&exchange()), "outbox", std::slice::from_ref(&q), &held);
    assert!(p.actions.is_empty() && p.drift.is_empty() && p.refusals.is_empty(), "{p:?}");

    // A longer TTL in the spec (or a shorter one set by hand): the policy is set again.
    let mut changed = held.clone();
    changed
        .policies
        .get_mut("lockstep.billing")
        .unwrap()
        .definition
        .insert("message-ttl".into(), json!(3_600_000));
    let p = plan(Some(&exchange()), "outbox", std::slice::from_ref(&q), &changed);
    assert_eq!(p.drift["billing"], ["policy lockstep.billing message-ttl: 3600000 -> 604800000"]);
    assert!(matches!(&p.actions[..], [Action::SetPolicy(_)]), "{:?}", p.actions);
    assert!(p.refusals.is_empty());
}

#[test]
fn a_policy_that_wins_over_locksteps_is_reported_and_stale_statistics_are_not() {
    let q = by_policy();
    let mut o = as_declared_by_policy();
    o.queues.get_mut("billing").unwrap().policy_name = Some("ops-everything".into());
    let ops = |priority| ObservedPolicy {
        pattern: ".*".into(),
        priority,
        apply_to: "all".into(),
        definition: BTreeMap::from([("max-length".to_owned(), json!(10))]),
    };
    o.policies.insert("ops-everything".into(), ops(0));
    let p = plan(Some(&exchange()), "outbox", std::slice::from_ref(&q), &o);
    assert!(
        p.actions.is_empty() && p.drift.is_empty(),
        "a lower priority: statistics from before: {p:?}"
    );
    o.policies.insert("ops-everything".into(), ops(20));
    let p = plan(Some(&exchange()), "outbox", std::slice::from_ref(&q), &o);
    assert!(p.actions.is_empty(), "{p:?}");
    assert!(p.drift["billing"][0].starts_with("policy ops-everything applies instead of lockstep.billing"));
}

#[test]
fn arguments_outrank_a_policy_only_where_rabbitmq_keeps_them_in_force() {
    let q = by_policy();
    // Declared with the same TTL and limit as arguments: the lower applies, and they are equal.
    let mut o = as_declared();
    let p = plan(Some(&exchange()), "outbox", std::slice::from_ref(&q), &o);
    assert!(p.refusals.is_empty(), "{p:?}");
    assert!(matches!(&p.actions[..], [Action::SetPolicy(_)]), "{:?}", p.actions);
    // A shorter TTL argument stays in force: refused, nothing declared on the queue.
    let args = &mut o.queues.get_mut("billing").unwrap().arguments;
    args.insert("x-message-ttl".into(), json!(3_600_000));
    args.insert("x-dead-letter-exchange".into(), json!("old.dlx"));
    let p = plan(Some(&exchange()), "outbox", std::slice::from_ref(&q), &o);
    assert!(p.actions.is_empty(), "{p:?}");
    let m = &p.refusals[0].message;
    assert!(
        m.starts_with(
            "messageTtl: the argument x-message-ttl=3600000 stays in force (the policy's: 604800000), \
             deadLetterExchange: the argument x-dead-letter-exchange=\"old.dlx\" stays in force (the policy's: none);"
        ),
        "{m}"
    );
}

#[test]
fn locksteps_policy_of_a_queue_that_asks_for_none_is_deleted() {
    let mut o = as_declared_by_policy();
    o.queues.get_mut("billing").unwrap().arguments = as_declared().queues["billing"].arguments.clone();
    let p = plan(Some(&exchange()), "outbox", &[queue()], &o);
    assert_eq!(p.actions, [Action::DeletePolicy("lockstep.billing".into())]);
    assert_eq!(p.drift["billing"], ["policy lockstep.billing: not asked for -> deleted"]);
}

#[test]
fn a_missing_topology_is_declared_and_a_matching_one_left_alone() {
    let p = plan(Some(&exchange()), "outbox", &[queue()], &Observed::default());
    let mut args = queue().arguments;
    args.insert("x-queue-type".into(), json!("quorum"));
    assert_eq!(
        p.actions,
        [
            Action::DeclareExchange {
                name: "outbox".into(),
                type_: "topic",
                durable: true
            },
            Action::DeclareQueue {
                name: "billing".into(),
                arguments: args
            },
            Action::Bind {
                exchange: "outbox".into(),
                queue: "billing".into(),
                key: "order.#".into()
            },
        ]
    );
    assert_eq!(plan(Some(&exchange()), "outbox", &[queue()], &as_declared()), Plan::default());
}

#[test]
fn a_changed_argument_or_type_is_refused_with_what_to_do_and_nothing_declared() {
    let mut o = as_declared();
    o.queues
        .get_mut("billing")
        .unwrap()
        .arguments
        .insert("x-message-ttl".into(), json!(3_600_000));
    let p = plan(Some(&exchange()), "outbox", &[queue()], &o);
    assert!(p.actions.is_empty(), "{p:?}");
    assert_eq!(p.refusals[0].what, "queue billing");
    let m = &p.refusals[0].message;
    assert!(m.starts_with("messageTtl (x-message-ttl): 3600000 -> 604800000;"), "{m}");
    assert!(m.contains("cannot change a queue's arguments") && m.contains("ignore"), "{m}");

    let mut ignoring = queue();
    ignoring.ignore.insert("messageTtl".into());
    ignoring.arguments.remove("x-message-ttl");
    assert_eq!(plan(Some(&exchange()), "outbox", &[ignoring], &o), Plan::default());

    let mut o = as_declared();
    o.queues.get_mut("billing").unwrap().type_ = "classic".into();
    let p = plan(Some(&exchange()), "outbox", &[queue()], &o);
    assert!(p.refusals[0].message.contains("is a classic queue, the spec asks quorum"), "{p:?}");
    assert!(p.refusals[0].message.contains("type to Classic"), "{p:?}");

    let mut o = as_declared();
    o.queues.get_mut("billing").unwrap().durable = false;
    let p = plan(Some(&exchange()), "outbox", &[queue()], &o);
    assert!(p.actions.is_empty() && p.refusals[0].message.contains("not durable"), "{p:?}");

    let mut o = as_declared();
    o.exchanges.get_mut("outbox").unwrap().type_ = "direct".into();
    let p = plan(Some(&exchange()), "outbox", &[queue()], &o);
    assert_eq!(p.refusals[0].what, "exchange outbox");
}

#[test]
fn missing_bindings_are_added_and_extra_ones_reported() {
    let mut o = as_declared();
    o.bindings.insert(("outbox".into(), "billing".into()), vec!["invoice.*".into()]);
    let p = plan(Some(&exchange()), "outbox", &[queue()], &o);
    assert_eq!(
        p.drift["billing"],
        [
            "binding \"order.#\": missing -> added",
            "binding \"invoice.*\": not in the spec, left in place"
        ]
    );
    assert_eq!(
        p.actions,
        [Action::Bind {
            exchange: "outbox".into(),
            queue: "billing".into(),
            key: "order.#".into()
        }]
    );
}

#[test]
fn a_dead_letter_exchange_and_queue_are_declared_once_when_missing() {
    let mut q = queue();
    q.dead_letter_exchange = Some("billing.dlx".into());
    q.dead_letter_queue = Some("billing.dead".into());
    q.arguments.insert("x-dead-letter-exchange".into(), json!("billing.dlx"));
    let p = plan(Some(&exchange()), "outbox", &[q], &Observed::default());
    assert!(p.actions.contains(&Action::DeclareExchange {
        name: "billing.dlx".into(),
        type_: "fanout",
        durable: true
    }));
    assert!(p.actions.contains(&Action::Bind {
        exchange: "billing.dlx".into(),
        queue: "billing.dead".into(),
        key: String::new()
    }));
}

#[test]
fn max_age_compares_by_time() {
    let mut q = queue();
    q.type_ = QueueType::Stream;
    q.arguments = BTreeMap::from([("x-max-age".to_owned(), json!("7D"))]);
    let actual = BTreeMap::from([("x-max-age".to_owned(), json!("168h"))]);
    assert!(argument_differences(&q, &actual).is_empty());
    let actual = BTreeMap::from([("x-max-age".to_owned(), json!("1D"))]);
    assert_eq!(argument_differences(&q, &actual), ["maxAge (x-max-age): \"1D\" -> \"7D\""]);
}
