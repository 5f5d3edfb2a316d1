use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::*;
use crate::crd::{Broker, OutboxRelaySpec, QueueType};

pub(crate) fn spec(extra: Value) -> OutboxRelaySpec {
    let mut v = json!({
        "database": {"urlSecretRef": {"name": "db", "key": "url"}, "table": "outbox"},
        "broker": "Rabbitmq",
        "rabbitmq": {
            "url": "amqp://rabbit:5672",
            "managementUrl": "http://rabbit:15672",
            "exchange": {"name": "outbox"},
            "queues": [{"name": "billing", "bindings": ["order.#"], "messageTtl": "7d", "deliveryLimit": 20}]
        },
        "routing": {"topic": "{aggregatetype}.{type}"}
    });
    json_patch::merge(&mut v, &extra);
    serde_json::from_value(v).unwrap()
}

fn fields(s: &OutboxRelaySpec) -> Vec<String> {
    match s.validate() {
        Ok(_) => vec![],
        Err(e) => e.0.into_iter().map(|f| f.field).collect(),
    }
}

#[test]
fn a_rabbitmq_relay_validates_with_quorum_queues_and_the_vhost_in_the_url() {
    let v = spec(json!({})).validate().unwrap();
    let r = v.rabbitmq.expect("rabbitmq");
    assert_eq!(r.url, "amqp://rabbit:5672/%2F");
    assert_eq!(r.exchange_name(), "outbox");
    assert_eq!(r.exchange.as_ref().unwrap().type_, ExchangeType::Topic);
    let q = &r.queues[0];
    assert_eq!(q.type_, QueueType::Quorum);
    assert_eq!(
        q.arguments,
        BTreeMap::from([
            ("x-delivery-limit".into(), json!(20)),
            ("x-message-ttl".into(), json!(604_800_000u64))
        ])
    );
    let vh = spec(json!({"rabbitmq": {"vhost": "orders"}})).validate().unwrap();
    assert_eq!(vh.rabbitmq.unwrap().url, "amqp://rabbit:5672/orders");
}

#[test]
fn ignored_settings_are_not_declared() {
    let v = spec(json!({"rabbitmq": {"queues": [{"name": "b", "messageTtl": "1h", "ignore": ["messageTtl"]}]}}))
        .validate()
        .unwrap();
    assert!(v.rabbitmq.unwrap().queues[0].arguments.is_empty());
}

#[test]
fn settings_by_policy_go_to_a_policy_matching_the_queue_alone() {
    let v = spec(json!({"rabbitmq": {"queues": [
        {"name": "billing.v2", "messageTtl": "1h", "deliveryLimit": 3, "ignore": ["deliveryLimit"], "settingsBy": "Policy"}
    ]}}))
    .validate()
    .unwrap();
    let q = &v.rabbitmq.unwrap().queues[0];
    assert!(q.arguments.is_empty(), "{:?}", q.arguments);
    let p = q.policy.as_ref().unwrap();
    assert_eq!(
        (p.name.as_str(), p.pattern.as_str(), p.priority),
        ("lockstep.billing.v2", r"^billing\.v2$", 10)
    );
    assert_eq!(p.definition, BTreeMap::from([("message-ttl".into(), json!(3_600_000u64))]));
    assert_eq!(q.setting("x-message-ttl"), Some(&json!(3_600_000u64)));
    let bad = spec(json!({"rabbitmq": {"queues": [{"name": "b", "policyPriority": 5}]}}));
    assert_eq!(fields(&bad), ["spec.rabbitmq.queues[0].policyPriority"]);
}

#[test]
fn bad_rabbitmq_settings_are_named() {
    let bad = spec(json!({"rabbitmq": {
        "url": "amqp://u:secret@rabbit:5672/vh",
        "managementUrl": "rabbit:15672",
        "queues": [
            {"name": "a", "type": "Stream", "messageTtl": "1h", "deliveryLimit": 3},
            {"name": "a", "type": "Classic", "maxAge": "1d", "ignore": ["x-message-ttl"], "deadLetterQueue": "dl"}
        ]
    }}));
    let e = bad.validate().unwrap_err().to_string();
    assert!(!e.contains("secret"), "{e}");
    assert_eq!(
        fields(&bad),
        [
            "spec.rabbitmq.url",
            "spec.rabbitmq.managementUrl",
            "spec.rabbitmq.queues[0].deliveryLimit",
            "spec.rabbitmq.queues[0].type",
            "spec.rabbitmq.queues[1].name",
            "spec.rabbitmq.queues[1].ignore",
            "spec.rabbitmq.queues[1].maxAge",
            "spec.rabbitmq.queues[1].deadLetterQueue",
        ]
    );
    let unmanaged = spec(json!({"rabbitmq": {"managementUrl": null}}));
    assert_eq!(fields(&unmanaged), ["spec.rabbitmq.managementUrl"]);
    let no_block = spec(json!({"rabbitmq": null}));
    assert_eq!(no_block.broker, Broker::Rabbitmq);
    assert_eq!(fields(&no_block), ["spec.rabbitmq"]);
    let topics = spec(json!({"topics": [{"name": "t", "partitions": 1}]}));
    assert_eq!(fields(&topics), ["spec.topics"]);
    let unbound = spec(json!({"rabbitmq": {"exchange": null}}));
    assert_eq!(fields(&unbound), ["spec.rabbitmq.queues[0].bindings"]);
}

#[test]
fn max_age_round_trips_through_rabbitmq_units() {
    assert_eq!(max_age_text(StdDuration::from_secs(7 * 86_400)), "7D");
    assert_eq!(max_age_text(StdDuration::from_secs(5400)), "90m");
    assert_eq!(max_age_secs("7D"), Some(7 * 86_400));
    assert_eq!(max_age_secs("168h"), Some(7 * 86_400));
    assert_eq!(max_age_secs("1Y"), Some(365 * 86_400));
    assert_eq!(max_age_secs("7d"), None);
    assert_eq!(url_encode("/"), "%2F");
}
