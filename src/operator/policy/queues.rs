//! The queue plan, RabbitMQ's counterpart of the topic and stream plans: (desired, observed) ->
//! actions, refusals and drift. Pure.
//!
//! Declare a missing exchange, queues (durable, quorum by default, with their arguments) and
//! bindings; declare a missing dead-letter exchange (fanout) and dead-letter queue. RabbitMQ
//! cannot change an exchange's type or durability nor a queue's type or arguments once they
//! exist: a difference there is refused with what to do, and nothing is declared on that queue
//! (a re-declare would only close the channel with PRECONDITION_FAILED). Missing bindings are
//! added (drift); bindings the spec does not name are reported and left in place. Arguments of a
//! setting in `ignore` are neither declared nor compared (a policy may own them). With
//! `settingsBy: Policy` the settings are a policy's, set before the queue is declared and set
//! again whenever it differs from the spec (a spec change or drift alike); lockstep's policy of a
//! queue that no longer asks for one is deleted; a policy of higher priority that applies instead
//! is reported. A queue's own arguments and a policy combine as RabbitMQ combines them: the lower
//! TTL, length and delivery limit apply, the argument's dead-letter exchange wins, and a policy's
//! max-age overrides a stream's.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::{
    clients::rabbitmq_admin::{ObservedExchange, ObservedPolicy, ObservedQueue},
    crd::{max_age_secs, DesiredExchange, DesiredPolicy, DesiredQueue, QUEUE_SETTINGS},
};

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    DeclareExchange {
        name: String,
        type_: &'static str,
        durable: bool,
    },
    /// A durable queue with these arguments (`x-queue-type` among them).
    DeclareQueue {
        name: String,
        arguments: BTreeMap<String, Value>,
    },
    Bind {
        exchange: String,
        queue: String,
        key: String,
    },
    /// Create or replace a queue's policy.
    SetPolicy(DesiredPolicy),
    /// Delete lockstep's policy of a queue that no longer asks for one.
    DeletePolicy(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `exchange <name>` or `queue <name>`.
    pub what: String,
    pub message: String,
}

/// What the server has: each named exchange and queue (absent: not found), and the routing keys
/// binding each (exchange, queue).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observed {
    pub exchanges: BTreeMap<String, ObservedExchange>,
    pub queues: BTreeMap<String, ObservedQueue>,
    pub bindings: BTreeMap<(String, String), Vec<String>>,
    /// lockstep's policy of each queue (`lockstep.<queue>`), and any other policy a queue
    /// reports as applied, by name.
    pub policies: BTreeMap<String, ObservedPolicy>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub refusals: Vec<Refusal>,
    /// Per queue: what differs from the spec, as "binding <key>: missing -> added" and the like.
    pub drift: BTreeMap<String, Vec<String>>,
}

/// The plan for `exchange` (None: the default exchange, or one another object manages) and `queues`.
pub fn plan(exchange: Option<&DesiredExchange>, exchange_name: &str, queues: &[DesiredQueue], o: &Observed) -> Plan {
    let mut p = Plan::default();
    if let Some(e) = exchange {
        match o.exchanges.get(&e.name) {
            None => p.actions.push(Action::DeclareExchange {
                name: e.name.clone(),
                type_: e.type_.as_str(),
                durable: e.durable,
            }),
            Some(x) if x.type_ != e.type_.as_str() || x.durable != e.durable => p.refusals.push(Refusal {
                what: format!("exchange {}", e.name),
                message: format!(
                    "is {} and {}durable, the spec asks {} and {}durable, and RabbitMQ cannot change either: set \
                     spec.rabbitmq.exchange to what it is, or publish to an exchange of another name",
                    x.type_,
                    if x.durable { "" } else { "not " },
                    e.type_.as_str(),
                    if e.durable { "" } else { "not " }
                ),
            }),
            Some(_) => {}
        }
    }
    let mut dead_letter_exchanges = BTreeSet::new();
    for q in queues {
        plan_queue(q, exchange_name, o, &mut p);
        let Some(dlx) = &q.dead_letter_exchange else { continue };
        if !o.exchanges.contains_key(dlx) && dead_letter_exchanges.insert(dlx.clone()) {
            p.actions.push(Action::DeclareExchange {
                name: dlx.clone(),
                type_: "fanout",
                durable: true,
            });
        }
        if let Some(dlq) = &q.dead_letter_queue {
            if !o.queues.contains_key(dlq) {
                let arguments = BTreeMap::from([("x-queue-type".to_owned(), Value::from("quorum"))]);
                p.actions.push(Action::DeclareQueue {
                    name: dlq.clone(),
                    arguments,
                });
            }
            if o.bindings.get(&(dlx.clone(), dlq.clone())).is_none_or(|b| b.is_empty()) {
                p.actions.push(Action::Bind {
                    exchange: dlx.clone(),
                    queue: dlq.clone(),
                    key: String::new(),
                });
            }
        }
    }
    p
}

fn plan_queue(q: &DesiredQueue, exchange: &str, o: &Observed, p: &mut Plan) {
    let bind = |key: &String| Action::Bind {
        exchange: exchange.to_owned(),
        queue: q.name.clone(),
        key: key.clone(),
    };
    let own = crate::crd::policy_name(&q.name);
    if q.policy.is_none() && o.policies.contains_key(&own) {
        p.actions.push(Action::DeletePolicy(own.clone()));
        p.drift
            .entry(q.name.clone())
            .or_default()
            .push(format!("policy {own}: not asked for -> deleted"));
    }
    let Some(found) = o.queues.get(&q.name) else {
        let mut arguments = q.arguments.clone();
        arguments.insert("x-queue-type".into(), Value::from(q.type_.as_str()));
        p.actions.extend(q.policy.clone().map(Action::SetPolicy));
        p.actions.push(Action::DeclareQueue {
            name: q.name.clone(),
            arguments,
        });
        p.actions.extend(q.bindings.iter().map(bind));
        return;
    };
    if let Some(message) = refusal(q, found) {
        p.refusals.push(Refusal {
            what: format!("queue {}", q.name),
            message,
        });
        return;
    }
    let mut drift = q.policy.as_ref().map(|d| policy_drift(d, found, o, p)).unwrap_or_default();
    let bound = o.bindings.get(&(exchange.to_owned(), q.name.clone())).cloned().unwrap_or_default();
    for key in q.bindings.iter().filter(|k| !bound.contains(k)) {
        drift.push(format!("binding {key:?}: missing -> added"));
        p.actions.push(bind(key));
    }
    for key in bound.iter().filter(|k| !q.bindings.contains(k)) {
        drift.push(format!("binding {key:?}: not in the spec, left in place"));
    }
    if !drift.is_empty() {
        p.drift.entry(q.name.clone()).or_default().extend(drift);
    }
}

/// The queue's policy against the spec: set when it differs (each difference is drift); a
/// policy of another name that applies to the queue instead is reported.
fn policy_drift(d: &DesiredPolicy, queue: &ObservedQueue, o: &Observed, p: &mut Plan) -> Vec<String> {
    let Some(found) = o.policies.get(&d.name) else {
        p.actions.push(Action::SetPolicy(d.clone()));
        return vec![format!("policy {}: missing -> set", d.name)];
    };
    let show = |v: Option<&Value>| v.map_or("unset".to_owned(), |v| v.to_string());
    let mut drift = Vec::new();
    if found.pattern != d.pattern || found.priority != d.priority || found.apply_to != "queues" {
        drift.push(format!(
            "policy {}: pattern {:?} priority {} apply-to {} -> {:?} {} queues",
            d.name, found.pattern, found.priority, found.apply_to, d.pattern, d.priority
        ));
    }
    let keys: BTreeSet<&String> = d.definition.keys().chain(found.definition.keys()).collect();
    for k in keys {
        let (want, have) = (d.definition.get(k), found.definition.get(k));
        if !same(&format!("x-{k}"), want, have) {
            drift.push(format!("policy {} {k}: {} -> {}", d.name, show(have), show(want)));
        }
    }
    if !drift.is_empty() {
        p.actions.push(Action::SetPolicy(d.clone()));
    } else if let Some(other) = queue.policy_name.as_deref().filter(|n| wins(o, n, d)) {
        drift.push(format!(
            "policy {other} applies instead of {} (its priority is higher, or equal): its settings are in force; \
             raise policyPriority above {other}'s",
            d.name
        ));
    }
    drift
}

/// Whether the policy `name`, which the queue reports as applied, wins over lockstep's `d`: its
/// priority is as high or higher. A lower one is the queue's statistics from before lockstep's
/// policy was set (they lag by seconds), not a winner.
fn wins(o: &Observed, name: &str, d: &DesiredPolicy) -> bool {
    name != d.name && o.policies.get(name).is_some_and(|other| other.priority >= d.priority)
}

/// Why the queue as it is cannot become what the spec asks, with what to do; None: it can.
pub fn refusal(q: &DesiredQueue, found: &ObservedQueue) -> Option<String> {
    if found.type_ != q.type_.as_str() {
        return Some(format!(
            "is a {} queue, the spec asks {}, and RabbitMQ cannot change a queue's type: declare a queue of another \
             name, bind it, move the consumers, then delete this one; or set the spec's type to {}",
            found.type_,
            q.type_.as_str(),
            capitalised(&found.type_)
        ));
    }
    if !found.durable {
        return Some("is not durable (its messages do not survive a broker restart): declare a durable queue of another name".into());
    }
    if let Some(d) = &q.policy {
        let outranking = outranking_arguments(q, d, &found.arguments);
        return (!outranking.is_empty()).then(|| {
            format!(
                "{}; RabbitMQ cannot remove a queue's arguments: set the spec at or below them (the lower applies), \
                 list the setting in ignore, or delete the queue (its messages with it) for lockstep to declare it anew",
                outranking.join(", ")
            )
        });
    }
    let differences = argument_differences(q, &found.arguments);
    (!differences.is_empty()).then(|| {
        format!(
            "{}; RabbitMQ cannot change a queue's arguments: set the spec to what the queue has, or list the setting in \
             ignore and give it by a policy (rabbitmqctl set_policy), or delete the queue (its messages with it) for \
             lockstep to declare it anew",
            differences.join(", ")
        )
    })
}

/// The managed arguments that differ, as "messageTtl (x-message-ttl): 3600000 -> 604800000".
pub fn argument_differences(q: &DesiredQueue, actual: &BTreeMap<String, Value>) -> Vec<String> {
    let show = |v: Option<&Value>| v.map_or("unset".to_owned(), |v| v.to_string());
    QUEUE_SETTINGS
        .iter()
        .filter(|(spec, _)| !q.ignore.contains(*spec))
        .filter(|(_, arg)| !same(arg, q.arguments.get(*arg), actual.get(*arg)))
        .map(|(spec, arg)| format!("{spec} ({arg}): {} -> {}", show(actual.get(*arg)), show(q.arguments.get(*arg))))
        .collect()
}

/// The queue's own arguments that keep the policy's settings from applying: a TTL, length or
/// delivery limit below the policy's (the lower applies) or one the policy lacks, a dead-letter
/// exchange other than the policy's (the argument wins). A stream's max-age is the policy's.
fn outranking_arguments(q: &DesiredQueue, d: &DesiredPolicy, actual: &BTreeMap<String, Value>) -> Vec<String> {
    let mut out = Vec::new();
    for (spec, arg) in QUEUE_SETTINGS.iter().filter(|(spec, _)| !q.ignore.contains(*spec)) {
        let (Some(have), want) = (actual.get(*arg), d.definition.get(arg.trim_start_matches("x-"))) else {
            continue;
        };
        let in_force = match (*arg, want) {
            ("x-max-age", _) => false,
            ("x-dead-letter-exchange", w) => w != Some(have),
            (_, Some(Value::Number(w))) => have.as_f64().is_some_and(|h| w.as_f64().is_some_and(|w| h < w)),
            (_, _) => true,
        };
        if in_force {
            let want = want.map_or("none".to_owned(), |v| v.to_string());
            out.push(format!("{spec}: the argument {arg}={have} stays in force (the policy's: {want})"));
        }
    }
    out
}

/// Equal as RabbitMQ means them: numbers by value, `x-max-age` by the time it stands for.
fn same(arg: &str, wanted: Option<&Value>, actual: Option<&Value>) -> bool {
    match (wanted, actual) {
        (Some(Value::Number(a)), Some(Value::Number(b))) => a.as_f64() == b.as_f64(),
        (Some(Value::String(a)), Some(Value::String(b))) if arg == "x-max-age" => max_age_secs(a) == max_age_secs(b),
        (a, b) => a == b,
    }
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default()
}

#[cfg(test)]
#[path = "queues_tests.rs"]
pub(crate) mod tests;
