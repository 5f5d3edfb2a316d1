//! Invalid specs: each is rejected by the CRD schema on the real API server, by the CEL rules
//! (evaluated client-side: the 1.20 test server predates CEL), and/or by `validate()`; every
//! rejection names the field. The operator under test reports every object the API server stores
//! as Ready=False InvalidSpec naming the field, and still reconciles valid objects afterwards.

mod common;

use std::{collections::HashMap, time::Duration};

use kube::{
    api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams},
    Client, ResourceExt,
};
use lockstep::crd::{DedupPolicy, InboxTable, OutboxRelay};
use serde_json::{json, Value};

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Relay,
    Inbox,
    Policy,
}

struct Case {
    name: &'static str,
    kind: Kind,
    /// (JSON pointer, value) changes applied to the valid base manifest; Null removes.
    changes: Vec<(&'static str, Value)>,
    /// The field every rejection must name.
    field: &'static str,
    schema: bool,
    cel: bool,
    validate: bool,
}

fn base(kind: Kind) -> Value {
    match kind {
        Kind::Relay => json!({
            "apiVersion": "lockstep.dev/v1alpha1", "kind": "OutboxRelay", "metadata": {"name": "r"},
            "spec": {
                "database": {"urlSecretRef": {"name": "orders-db"}, "table": "outbox"},
                "kafka": {"bootstrapServers": "kafka:9092"},
                "topics": [{"name": "outbox.event.order", "partitions": 3, "replicationFactor": 1,
                            "config": {"retention.ms": "604800000"}}]
            }
        }),
        Kind::Inbox => json!({
            "apiVersion": "lockstep.dev/v1alpha1", "kind": "InboxTable", "metadata": {"name": "i"},
            "spec": {"database": {"urlSecretRef": {"name": "billing-db"}, "table": "inbox"}, "retention": "7d",
                     "sources": {"kafka": {"bootstrapServers": "kafka:9092", "topics": ["outbox.event.order"]}}}
        }),
        Kind::Policy => json!({
            "apiVersion": "lockstep.dev/v1alpha1", "kind": "DedupPolicy", "metadata": {"name": "p"},
            // A selector nothing carries: a policy selecting everything would clamp other tests' tables.
            "spec": {"namespaceSelector": {"matchLabels": {"lockstep.dev/test": "invalid-specs-none"}},
                     "minRetention": "24h", "maxRetention": "30d", "defaultRetention": "7d"}
        }),
    }
}

fn set(v: &mut Value, pointer: &str, value: Value) {
    let mut parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    let last = parts.pop().unwrap();
    let mut cur = v;
    for p in parts {
        cur = if let Ok(i) = p.parse::<usize>() {
            &mut cur[i]
        } else {
            cur.as_object_mut().unwrap().entry(p).or_insert(json!({}))
        };
    }
    if value.is_null() {
        cur.as_object_mut().unwrap().remove(last);
    } else if let Ok(i) = last.parse::<usize>() {
        cur[i] = value;
    } else {
        cur[last] = value;
    }
}

/// A case rejected by the layers named in `by`: S the CRD schema (API server), C the CEL rules,
/// V `validate()` (the operator's InvalidSpec).
fn case(name: &'static str, kind: Kind, field: &'static str, by: &str, changes: Vec<(&'static str, Value)>) -> Case {
    assert!(by.chars().all(|c| "SCV".contains(c)), "{name}: flags are S, C and V");
    Case {
        name,
        kind,
        changes,
        field,
        schema: by.contains('S'),
        cel: by.contains('C'),
        validate: by.contains('V'),
    }
}

/// One change: `value` at `pointer` (Null removes).
fn at(pointer: &'static str, value: impl Into<Value>) -> Vec<(&'static str, Value)> {
    vec![(pointer, value.into())]
}

/// `n` distinct valid topics.
fn topics(n: usize) -> Value {
    (0..n)
        .map(|i| json!({"name": format!("t{i}"), "partitions": 1, "replicationFactor": 1}))
        .collect()
}

/// A settings map of `n` keys none of which validate() objects to.
fn settings(n: usize) -> Value {
    (0..n)
        .map(|i| (format!("lockstep.test.k{i}"), json!("1")))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// `n` distinct names.
fn names(n: usize) -> Value {
    (0..n).map(|i| json!(format!("k{i}"))).collect()
}

// The case tables: one case a line, as rustfmt would spread each over six.
#[rustfmt::skip]
fn relay_cases() -> Vec<Case> {
    let c = |name, field, by, changes| case(name, Kind::Relay, field, by, changes);
    let null = Value::Null;
    let cfg = |key: &str, value: &str| at("/spec/kafka/producer/config", json!({ key: value }));
    let res = |r: Value| at("/spec/relay/resources", r);
    let rabbit = |r: Value| vec![("/spec/broker", json!("Rabbitmq")), ("/spec/topics", json!([])), ("/spec/rabbitmq", r)];
    let queue = |q: Value| rabbit(json!({"url": "amqp://r:5672", "managementUrl": "http://r:15672", "exchange": {"name": "x"}, "queues": [q]}));
    vec![
        c("sql injection in table", "spec.database.table", "SV", at("/spec/database/table", "x; drop table y")),
        c("quoted schema", "spec.database.schema", "SV", at("/spec/database/schema", "\"quoted\"")),
        c("reserved schema pg_temp", "spec.database.schema", "V", at("/spec/database/schema", "pg_temp")),
        c("table name over 63 characters", "spec.database.table", "SV", at("/spec/database/table", "t".repeat(64))),
        c("dead-letter name too long", "spec.database.table", "V", at("/spec/database/table", "t".repeat(55))),
        c("secret name not a k8s name", "spec.database.urlSecretRef.name", "SV", at("/spec/database/urlSecretRef/name", "Orders_DB")),
        c("secret key with a slash", "spec.database.urlSecretRef.key", "SV", at("/spec/database/urlSecretRef/key", "a/b")),
        c("bootstrap without port", "spec.kafka.bootstrapServers", "V", at("/spec/kafka/bootstrapServers", "kafka")),
        c("empty entry in bootstrap list", "spec.kafka.bootstrapServers", "V", at("/spec/kafka/bootstrapServers", "a:9092,,b:9092")),
        c("bootstrap port zero", "spec.kafka.bootstrapServers", "V", at("/spec/kafka/bootstrapServers", "kafka:0")),
        c("bootstrap port above 65535", "spec.kafka.bootstrapServers", "V", at("/spec/kafka/bootstrapServers", "kafka:70000")),
        c("empty bootstrap", "spec.kafka.bootstrapServers", "SV", at("/spec/kafka/bootstrapServers", "")),
        c("no kafka", "spec.kafka", "CV", at("/spec/kafka", null.clone())),
        c("unknown broker", "spec.broker", "S", at("/spec/broker", "Pulsar")),
        c("broker Nats without nats", "spec.nats", "CV", at("/spec/broker", "Nats")),
        c("topics with broker Nats", "spec.topics", "CV", vec![
            ("/spec/broker", json!("Nats")),
            ("/spec/nats", json!({"servers": "nats://n:4222"})),
        ]),
        c("nats URL with a password", "spec.nats.servers", "V", vec![
            ("/spec/broker", json!("Nats")),
            ("/spec/topics", json!([])),
            ("/spec/nats", json!({"servers": "nats://u:pw@n:4222"})),
        ]),
        c("stream subject with an empty token", "spec.nats.streams[0].subjects[0]", "V", vec![
            ("/spec/broker", json!("Nats")),
            ("/spec/topics", json!([])),
            ("/spec/nats", json!({"servers": "nats://n:4222", "streams": [{"name": "s", "subjects": ["a..b"]}]})),
        ]),
        c("stream name with a dot", "spec.nats.streams[0].name", "S", vec![
            ("/spec/broker", json!("Nats")),
            ("/spec/topics", json!([])),
            ("/spec/nats", json!({"servers": "nats://n:4222", "streams": [{"name": "a.b", "subjects": ["a"]}]})),
        ]),
        c("stream replicas above 5", "spec.nats.streams[0].replicas", "S", vec![
            ("/spec/broker", json!("Nats")),
            ("/spec/topics", json!([])),
            ("/spec/nats", json!({"servers": "nats://n:4222", "streams": [{"name": "s", "subjects": ["a"], "replicas": 7}]})),
        ]),
        c("broker Rabbitmq without rabbitmq", "spec.rabbitmq", "CV", at("/spec/broker", "Rabbitmq")),
        c("topics with broker Rabbitmq", "spec.topics", "CV", vec![
            ("/spec/broker", json!("Rabbitmq")),
            ("/spec/rabbitmq", json!({"url": "amqp://r:5672"})),
        ]),
        c("amqp URL with a password", "spec.rabbitmq.url", "V", rabbit(json!({"url": "amqp://u:pw@r:5672"}))),
        c("amqp URL with the vhost", "spec.rabbitmq.url", "V", rabbit(json!({"url": "amqp://r:5672/orders"}))),
        c("queues without managementUrl", "spec.rabbitmq.managementUrl", "CV",
          rabbit(json!({"url": "amqp://r:5672", "exchange": {"name": "x"}, "queues": [{"name": "q"}]}))),
        c("management URL not http", "spec.rabbitmq.managementUrl", "V", rabbit(json!({"url": "amqp://r:5672", "managementUrl": "r:15672"}))),
        c("delivery limit on a classic queue", "spec.rabbitmq.queues[0].deliveryLimit", "CV", queue(json!({"name": "q", "type": "Classic", "deliveryLimit": 3}))),
        c("maxAge on a quorum queue", "spec.rabbitmq.queues[0].maxAge", "CV", queue(json!({"name": "q", "maxAge": "1d"}))),
        c("message TTL on a stream", "spec.rabbitmq.queues[0].type", "CV", queue(json!({"name": "q", "type": "Stream", "messageTtl": "1d"}))),
        c("max length on a stream", "spec.rabbitmq.queues[0].type", "CV", queue(json!({"name": "q", "type": "Stream", "maxLength": 100}))),
        c("message TTL over 49 days", "spec.rabbitmq.queues[0].messageTtl", "V", queue(json!({"name": "q", "messageTtl": "50d"}))),
        c("queue name with a space", "spec.rabbitmq.queues[0].name", "S", queue(json!({"name": "a b"}))),
        c("unknown queue type", "spec.rabbitmq.queues[0].type", "S", queue(json!({"name": "q", "type": "Lazy"}))),
        c("fanout exchange", "spec.rabbitmq.exchange.type", "S",
          rabbit(json!({"url": "amqp://r:5672", "managementUrl": "http://r:15672", "exchange": {"name": "x", "type": "Fanout"}}))),
        c("ignoring an unknown queue setting", "spec.rabbitmq.queues[0].ignore", "V", queue(json!({"name": "q", "ignore": ["x-message-ttl"]}))),
        c("dead-letter queue without its exchange", "spec.rabbitmq.queues[0].deadLetterQueue", "V", queue(json!({"name": "q", "deadLetterQueue": "dead"}))),
        c("policy priority with settings by arguments", "spec.rabbitmq.queues[0].policyPriority", "CV", queue(json!({"name": "q", "policyPriority": 5}))),
        c("unknown settingsBy", "spec.rabbitmq.queues[0].settingsBy", "S", queue(json!({"name": "q", "settingsBy": "Annotations"}))),
        c("negative policy priority", "spec.rabbitmq.queues[0].policyPriority", "S",
          queue(json!({"name": "q", "settingsBy": "Policy", "policyPriority": -1}))),
        c("auth secret not a k8s name", "spec.kafka.authSecretRef.name", "SV", at("/spec/kafka/authSecretRef/name", "Kafka_Auth")),
        c("unknown compression", "spec.kafka.producer.compression", "S", at("/spec/kafka/producer/compression", "brotli")),
        c("linger above a minute", "spec.kafka.producer.lingerMs", "SV", at("/spec/kafka/producer/lingerMs", 60_001)),
        c("acks=1 weakens delivery", "spec.kafka.producer.config[acks]", "CV", cfg("acks", "1")),
        c("acks=0 loses events", "spec.kafka.producer.config[acks]", "CV", cfg("acks", "0")),
        c("idempotence off", "spec.kafka.producer.config[enable.idempotence]", "CV", cfg("enable.idempotence", "false")),
        c("transactional producer", "spec.kafka.producer.config[transactional.id]", "V", cfg("transactional.id", "tx")),
        c("bootstrap in producer config", "spec.kafka.producer.config[bootstrap.servers]", "V", cfg("bootstrap.servers", "b:9092")),
        c("gapless guarantee", "spec.kafka.producer.config[enable.gapless.guarantee]", "V", cfg("enable.gapless.guarantee", "true")),
        c("ten requests in flight", "spec.kafka.producer.config[max.in.flight.requests.per.connection]", "V",
          cfg("max.in.flight.requests.per.connection", "10")),
        c("producer key librdkafka does not know", "spec.kafka.producer.config[lingr.ms]", "V", cfg("lingr.ms", "5")),
        c("producer value librdkafka refuses", "spec.kafka.producer.config[batch.size]", "V", cfg("batch.size", "lots")),
        c("a plugin loaded into the operator", "spec.kafka.producer.config[plugin.library.paths]", "V", cfg("plugin.library.paths", "/tmp/x.so")),
        c("an OpenSSL engine loaded", "spec.kafka.producer.config[ssl.engine.location]", "V", cfg("ssl.engine.location", "/tmp/x.so")),
        c("a kinit command run", "spec.kafka.producer.config[sasl.kerberos.kinit.cmd]", "V", cfg("sasl.kerberos.kinit.cmd", "sh -c id")),
        c("OpenSSL providers loaded", "spec.kafka.producer.config[ssl.providers]", "V", cfg("ssl.providers", "legacy")),
        c("acks=1 under its alias", "spec.kafka.producer.config[request.required.acks]", "V", cfg("request.required.acks", "1")),
        c("65 producer settings", "spec.kafka.producer.config", "SV", at("/spec/kafka/producer/config", settings(65))),
        c("producer value over 4096 characters", "spec.kafka.producer.config[client.id]", "S", cfg("client.id", &"c".repeat(4097))),
        c("routing over a non-routing column", "spec.routing.topic", "SV", at("/spec/routing/topic", "orders.{payload}")),
        c("routing template unclosed", "spec.routing.topic", "SV", at("/spec/routing/topic", "orders.{type")),
        c("routing to ..", "spec.routing.topic", "V", at("/spec/routing/topic", "..")),
        c("routing key not a column", "spec.routing.key", "S", at("/spec/routing/key", "payload")),
        c("101 topics", "spec.topics", "S", at("/spec/topics", topics(101))),
        c("topic name with a space", "spec.topics[0].name", "SV", at("/spec/topics/0/name", "bad topic")),
        c("topic named ..", "spec.topics[0].name", "V", at("/spec/topics/0/name", "..")),
        c("topic name over 249 characters", "spec.topics[0].name", "SV", at("/spec/topics/0/name", "t".repeat(250))),
        c("zero partitions", "spec.topics[0].partitions", "SV", at("/spec/topics/0/partitions", 0)),
        c("partitions above 10000", "spec.topics[0].partitions", "SV", at("/spec/topics/0/partitions", 10_001)),
        c("topic without partitions", "spec.topics[0].partitions", "S", at("/spec/topics/0/partitions", null.clone())),
        c("replication factor zero", "spec.topics[0].replicationFactor", "SV", at("/spec/topics/0/replicationFactor", 0)),
        c("replication factor above 32", "spec.topics[0].replicationFactor", "SV", at("/spec/topics/0/replicationFactor", 33)),
        c("uppercase topic config key", "spec.topics[0].config[Retention.MS]", "V", at("/spec/topics/0/config/Retention.MS", "1")),
        c("min.insync.replicas zero", "spec.topics[0].config[min.insync.replicas]", "V",
          at("/spec/topics/0/config/min.insync.replicas", "0")),
        c("retention.ms in words", "spec.topics[0].config[retention.ms]", "V", at("/spec/topics/0/config/retention.ms", "forever")),
        c("retention.ms below -1", "spec.topics[0].config[retention.ms]", "V", at("/spec/topics/0/config/retention.ms", "-2")),
        c("topic config value over 4096 characters", "spec.topics[0].config[compression.type]", "S",
          at("/spec/topics/0/config/compression.type", "z".repeat(4097))),
        c("65 ignored topic keys", "spec.topics[0].ignoreConfig", "S", at("/spec/topics/0/ignoreConfig", names(65))),
        c("key both set and ignored", "spec.topics[0].config[retention.ms]", "CV", at("/spec/topics/0/ignoreConfig", vec!["retention.ms"])),
        c("replicas above 10", "spec.relay.replicas", "SV", at("/spec/relay/replicas", 11)),
        c("negative replicas", "spec.relay.replicas", "SV", at("/spec/relay/replicas", -1)),
        c("batch too large", "spec.relay.batchSize", "SV", at("/spec/relay/batchSize", 100_000)),
        c("max attempts zero", "spec.relay.maxAttempts", "SV", at("/spec/relay/maxAttempts", 0)),
        c("poll interval not a duration", "spec.relay.pollInterval", "SV", at("/spec/relay/pollInterval", "soon")),
        c("poll interval below 10ms", "spec.relay.pollInterval", "V", at("/spec/relay/pollInterval", "5ms")),
        c("poll interval above 1h", "spec.relay.pollInterval", "V", at("/spec/relay/pollInterval", "2h")),
        c("poll interval over 32 characters", "spec.relay.pollInterval", "S", at("/spec/relay/pollInterval", "1s".repeat(17))),
        c("max gather not a duration", "spec.relay.maxGather", "SV", at("/spec/relay/maxGather", "briefly")),
        c("max gather above 1s", "spec.relay.maxGather", "V", at("/spec/relay/maxGather", "2s")),
        c("unknown cleanup", "spec.relay.cleanup", "S", at("/spec/relay/cleanup", "Archive")),
        c("markPublished without retention", "spec.relay.publishedRetention", "CV", at("/spec/relay/cleanup", "MarkPublished")),
        c("published retention over 100 years", "spec.relay.publishedRetention", "V",
          at("/spec/relay", json!({"cleanup": "MarkPublished", "publishedRetention": "1000000d"}))),
        c("memory: lots", "spec.relay.resources.limits[memory]", "V", res(json!({"limits": {"memory": "lots"}}))),
        c("requests above limits", "spec.relay.resources.requests[cpu]", "V", res(json!({"requests": {"cpu": "2"}, "limits": {"cpu": 1}}))),
        c("request quantity with a space", "spec.relay.resources.requests[memory]", "V", res(json!({"requests": {"memory": "1 Gi"}}))),
        c("negative memory limit", "spec.relay.resources.limits[memory]", "V", res(json!({"limits": {"memory": "-1Gi"}}))),
        c("resource no container can ask for", "spec.relay.resources.limits[Memory!]", "V", res(json!({"limits": {"Memory!": "1"}}))),
        c("empty image", "spec.relay.image", "SV", at("/spec/relay/image", "")),
        c("blank image", "spec.relay.image", "V", at("/spec/relay/image", "   ")),
        c("image with a leading space", "spec.relay.image", "V", at("/spec/relay/image", " lockstep:1")),
        c("max oldest age zero", "spec.lag.maxOldestAge", "V", at("/spec/lag/maxOldestAge", "0s")),
        c("published retention zero", "spec.relay.publishedRetention", "V",
          at("/spec/relay", json!({"cleanup": "MarkPublished", "publishedRetention": "0s"}))),
        c("max oldest age in words", "spec.lag.maxOldestAge", "SV", at("/spec/lag/maxOldestAge", "1 minute")),
        c("max oldest age over 100 years", "spec.lag.maxOldestAge", "V", at("/spec/lag/maxOldestAge", "1000000d")),
        c("unknown deletion policy", "spec.deletionPolicy", "S", at("/spec/deletionPolicy", "Purge")),
        c("unknown headers", "spec.relay.headers", "S", at("/spec/relay/headers", "json")),
        c("cloudEvents without cloudevents headers", "spec.relay.cloudEvents", "CV", at("/spec/relay/cloudEvents", json!({"source": "/orders"}))),
        c("cloudEvents source with a space", "spec.relay.cloudEvents.source", "SV",
          at("/spec/relay", json!({"headers": "cloudevents", "cloudEvents": {"source": "/my orders"}}))),
        c("empty cloudEvents source", "spec.relay.cloudEvents.source", "SV",
          at("/spec/relay", json!({"headers": "cloudevents", "cloudEvents": {"source": ""}}))),
    ]
}

#[rustfmt::skip]
fn inbox_cases() -> Vec<Case> {
    let c = |name, field, by, changes| case(name, Kind::Inbox, field, by, changes);
    let null = Value::Null;
    let topics = |v: Value| at("/spec/sources/kafka/topics", v);
    vec![
        c("inbox table name uppercase", "spec.database.table", "SV", at("/spec/database/table", "Inbox")),
        c("inbox table name over 63 characters", "spec.database.table", "SV", at("/spec/database/table", "i".repeat(64))),
        c("inbox without a table", "spec.database.table", "S", at("/spec/database/table", null.clone())),
        c("reserved schema pg_catalog", "spec.database.schema", "V", at("/spec/database/schema", "pg_catalog")),
        c("schema starting with a digit", "spec.database.schema", "SV", at("/spec/database/schema", "1st")),
        c("secret key with a space", "spec.database.urlSecretRef.key", "SV", at("/spec/database/urlSecretRef/key", "a b")),
        c("manageSchema not a boolean", "spec.database.manageSchema", "S", at("/spec/database/manageSchema", "yes")),
        c("retention in words", "spec.retention", "SV", at("/spec/retention", "1 week")),
        c("retention zero", "spec.retention", "V", at("/spec/retention", "0s")),
        c("retention over 100 years", "spec.retention", "V", at("/spec/retention", "1000000d")),
        c("retention over 32 characters", "spec.retention", "S", at("/spec/retention", "1s".repeat(17))),
        c("redelivery window zero", "spec.redeliveryWindow", "V", at("/spec/redeliveryWindow", "0s")),
        c("redelivery window over 100 years", "spec.redeliveryWindow", "V", at("/spec/redeliveryWindow", "1000000d")),
        c("redelivery window in words", "spec.redeliveryWindow", "SV", at("/spec/redeliveryWindow", "a day")),
        c("purge interval below 1s", "spec.purge.interval", "V", at("/spec/purge/interval", "500ms")),
        c("purge interval above 24h", "spec.purge.interval", "V", at("/spec/purge/interval", "2d")),
        c("purge interval in words", "spec.purge.interval", "SV", at("/spec/purge/interval", "hourly")),
        c("purge batch zero", "spec.purge.batchSize", "SV", at("/spec/purge/batchSize", 0)),
        c("purge batch above 100000", "spec.purge.batchSize", "SV", at("/spec/purge/batchSize", 100_001)),
        c("empty entry in source bootstrap list", "spec.sources.kafka.bootstrapServers", "V",
          at("/spec/sources/kafka/bootstrapServers", "a:9092,,b:9092")),
        c("source bootstrap without port", "spec.sources.kafka.bootstrapServers", "V", at("/spec/sources/kafka/bootstrapServers", "kafka")),
        c("no source topics", "spec.sources.kafka.topics", "SV", topics(json!([]))),
        c("source without topics", "spec.sources.kafka.topics", "S", topics(null.clone())),
        c("101 source topics", "spec.sources.kafka.topics", "S", topics(names(101))),
        c("source topic with a space", "spec.sources.kafka.topics[0]", "V", topics(json!(["bad topic"]))),
        c("source topic named ..", "spec.sources.kafka.topics[0]", "V", topics(json!([".."]))),
        c("empty source topic", "spec.sources.kafka.topics[0]", "SV", topics(json!([""]))),
        c("source topic over 249 characters", "spec.sources.kafka.topics[0]", "SV", topics(json!(["t".repeat(250)]))),
        c("empty consumer group", "spec.sources.kafka.consumerGroup", "SV", at("/spec/sources/kafka/consumerGroup", "")),
        c("blank consumer group", "spec.sources.kafka.consumerGroup", "V", at("/spec/sources/kafka/consumerGroup", "  ")),
        c("source auth secret not a k8s name", "spec.sources.kafka.authSecretRef.name", "SV",
          at("/spec/sources/kafka/authSecretRef/name", "Kafka_Auth")),
        c("unknown deletion policy", "spec.deletionPolicy", "S", at("/spec/deletionPolicy", "Destroy")),
        c("rabbitmq source without queues", "spec.sources.rabbitmq.queues", "SV",
          at("/spec/sources/rabbitmq", json!({"managementUrl": "http://r:15672", "queues": []}))),
        c("rabbitmq source management URL with a password", "spec.sources.rabbitmq.managementUrl", "V",
          at("/spec/sources/rabbitmq", json!({"managementUrl": "http://u:pw@r:15672", "queues": ["q"]}))),
    ]
}

/// An exception, valid unless `changes` break it (a null removes a field).
fn exception_item(changes: Value) -> Value {
    let mut e = json!({"namespace": "team-a", "name": "inbox", "minRetention": "1d", "expires": "2099-01-01T00:00:00Z"});
    for (k, v) in changes.as_object().unwrap() {
        set(&mut e, &format!("/{k}"), v.clone());
    }
    e
}

fn exception(changes: Value) -> Vec<(&'static str, Value)> {
    at("/spec/exceptions", json!([exception_item(changes)]))
}

/// A namespace selector expression (values omitted when null).
fn expr(key: &str, operator: &str, values: Value) -> Vec<(&'static str, Value)> {
    let mut e = json!({"key": key, "operator": operator, "values": values});
    set(&mut e, "/values", values);
    at("/spec/namespaceSelector/matchExpressions", json!([e]))
}

#[rustfmt::skip]
fn policy_cases() -> Vec<Case> {
    let c = |name, field, by, changes| case(name, Kind::Policy, field, by, changes);
    let values = "spec.namespaceSelector.matchExpressions[0].values";
    let many: Value = (0..101).map(|i| exception_item(json!({"namespace": format!("ns{i}")}))).collect();
    vec![
        c("min above max", "spec.minRetention", "V", at("/spec/minRetention", "60d")),
        c("default below min", "spec.defaultRetention", "V", at("/spec/defaultRetention", "1h")),
        c("default above max", "spec.defaultRetention", "V", at("/spec/defaultRetention", "60d")),
        c("default zero", "spec.defaultRetention", "V", vec![("/spec/minRetention", Value::Null), ("/spec/defaultRetention", json!("0s"))]),
        c("min over 100 years", "spec.minRetention", "V", at("/spec/minRetention", "1000000d")),
        c("max over 100 years", "spec.maxRetention", "V", at("/spec/maxRetention", "1000000d")),
        c("default over 100 years", "spec.defaultRetention", "V", at("/spec/defaultRetention", "1000000d")),
        c("max in words", "spec.maxRetention", "SV", at("/spec/maxRetention", "a month")),
        c("min over 32 characters", "spec.minRetention", "S", at("/spec/minRetention", "1h".repeat(17))),
        c("unknown enforcement", "spec.enforcement", "S", at("/spec/enforcement", "Sometimes")),
        c("requireCoverage not a boolean", "spec.requireCoverage", "S", at("/spec/requireCoverage", "yes")),
        c("operator Sometimes", "spec.namespaceSelector.matchExpressions[0].operator", "V", expr("team", "Sometimes", json!(["a"]))),
        c("selector In without values", values, "V", expr("team", "In", Value::Null)),
        c("selector NotIn with empty values", values, "V", expr("team", "NotIn", json!([]))),
        c("selector Exists with values", values, "V", expr("team", "Exists", json!(["a"]))),
        c("selector DoesNotExist with values", values, "V", expr("team", "DoesNotExist", json!(["a"]))),
        // Blank, not empty: the 1.20 test server refuses every "" as null ("must be of type string").
        c("selector with a blank key", "spec.namespaceSelector.matchExpressions[0].key", "V", expr(" ", "Exists", Value::Null)),
        c("exception without bounds", "spec.exceptions[0]", "V", exception(json!({"minRetention": null}))),
        c("exception min over max", "spec.exceptions[0].minRetention", "V", exception(json!({"minRetention": "2d", "maxRetention": "1d"}))),
        c("exception max over 100 years", "spec.exceptions[0].maxRetention", "V", exception(json!({"maxRetention": "1000000d"}))),
        c("exception min in words", "spec.exceptions[0].minRetention", "SV", exception(json!({"minRetention": "two days"}))),
        c("exception namespace not a name", "spec.exceptions[0].namespace", "V", exception(json!({"namespace": "Team_A"}))),
        c("exception namespace over 63 characters", "spec.exceptions[0].namespace", "SV", exception(json!({"namespace": "n".repeat(64)}))),
        c("exception namespace with a dot", "spec.exceptions[0].namespace", "V", exception(json!({"namespace": "a.b"}))),
        c("matchLabels key not a label key", "spec.namespaceSelector.matchLabels[bad key!]", "V",
          at("/spec/namespaceSelector/matchLabels", json!({"bad key!": "x"}))),
        c("matchLabels value not a label value", "spec.namespaceSelector.matchLabels[team]", "V",
          at("/spec/namespaceSelector/matchLabels", json!({"team": "not a value!"}))),
        c("selector value not a label value", values, "V", expr("team", "In", json!(["not a value!"]))),
        c("exception with an empty name", "spec.exceptions[0].name", "SV", exception(json!({"name": ""}))),
        c("exception expiry not a timestamp", "spec.exceptions[0].expires", "S", exception(json!({"expires": "tomorrow"}))),
        c("exception without expiry", "spec.exceptions[0].expires", "S", exception(json!({"expires": null}))),
        c("101 exceptions", "spec.exceptions", "S", at("/spec/exceptions", many)),
    ]
}

fn cases() -> Vec<Case> {
    let mut all = relay_cases();
    all.extend(inbox_cases());
    all.extend(policy_cases());
    all
}

fn strip_indexes(field: &str) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in field.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

fn manifest(case: &Case) -> Value {
    let mut v = base(case.kind);
    for (p, val) in &case.changes {
        set(&mut v, p, val.clone());
    }
    v
}

/// The problems `validate()` and the CEL rules report for a manifest, or None when the
/// manifest does not even deserialize (then only the schema can reject it).
fn client_side(kind: Kind, v: &Value) -> Option<(Result<(), String>, Result<(), String>)> {
    fn run<K>(
        v: &Value,
        validate: impl Fn(&K) -> Result<(), String>,
        cel: impl Fn(&K) -> Result<(), String>,
    ) -> Option<(Result<(), String>, Result<(), String>)>
    where
        K: serde::de::DeserializeOwned,
    {
        let obj: K = serde_json::from_value(v.clone()).ok()?;
        Some((validate(&obj), cel(&obj)))
    }
    match kind {
        Kind::Relay => run::<OutboxRelay>(
            v,
            |o| o.spec.validate().map(|_| ()).map_err(|e| e.to_string()),
            |o| o.validate_cel().map_err(|e| format!("{e:?}")),
        ),
        Kind::Inbox => run::<InboxTable>(
            v,
            |o| o.spec.validate().map(|_| ()).map_err(|e| e.to_string()),
            |o| o.validate_cel().map_err(|e| format!("{e:?}")),
        ),
        Kind::Policy => run::<DedupPolicy>(
            v,
            |o| o.spec.validate().map(|_| ()).map_err(|e| e.to_string()),
            |o| o.validate_cel().map_err(|e| format!("{e:?}")),
        ),
    }
}

#[test]
fn base_manifests_are_valid_everywhere() {
    for kind in [Kind::Relay, Kind::Inbox, Kind::Policy] {
        let (v, c) = client_side(kind, &base(kind)).expect("base deserializes");
        v.expect("base passes validate()");
        c.expect("base passes CEL rules");
    }
}

#[test]
fn validate_and_cel_reject_with_the_field_named() {
    let cases = cases();
    assert!(cases.len() >= 65, "only {} cases", cases.len());
    for kind in [Kind::Relay, Kind::Inbox, Kind::Policy] {
        let n = cases.iter().filter(|c| c.kind == kind).count();
        assert!(n >= 12, "only {n} cases of {}", resource(kind).kind);
    }
    for case in &cases {
        assert!(case.schema || case.cel || case.validate, "{}: rejected by nothing", case.name);
        let v = manifest(case);
        match client_side(case.kind, &v) {
            None => assert!(case.schema && !case.validate, "{}: manifest does not deserialize", case.name),
            Some((validate, cel)) => {
                if case.validate {
                    let err = validate.expect_err(case.name);
                    assert!(
                        err.contains(&format!("{}:", case.field)),
                        "{}: validate() error does not name {}: {err}",
                        case.name,
                        case.field
                    );
                } else {
                    assert!(validate.is_ok(), "{}: unexpected validate() error: {validate:?}", case.name);
                }
                if case.cel {
                    let err = cel.expect_err(case.name);
                    assert!(!err.is_empty(), "{}", case.name);
                } else {
                    assert!(cel.is_ok(), "{}: unexpected CEL rejection: {cel:?}", case.name);
                }
            }
        }
    }
}

#[test]
fn cel_makes_the_table_immutable() {
    let old: OutboxRelay = serde_json::from_value(base(Kind::Relay)).unwrap();
    let mut new = old.clone();
    new.spec.database.table = "outbox2".into();
    assert!(new.validate_cel_update(&old).is_err(), "changing the table must be refused");
    let mut same = old.clone();
    same.spec.relay.batch_size = 100;
    assert!(same.validate_cel_update(&old).is_ok());
}

#[test]
fn cel_makes_the_broker_immutable() {
    let old: OutboxRelay = serde_json::from_value(base(Kind::Relay)).unwrap();
    let mut new = old.clone();
    new.spec.broker = lockstep::crd::Broker::Nats;
    new.spec.topics.clear();
    new.spec.nats = Some(serde_json::from_value(json!({"servers": "nats://n:4222"})).unwrap());
    let err = new
        .validate_cel_update(&old)
        .expect_err("moving a relay to another broker must be refused");
    assert!(format!("{err:?}").contains("broker is immutable"), "{err:?}");
}

fn resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::Relay => ApiResource::erase::<OutboxRelay>(&()),
        Kind::Inbox => ApiResource::erase::<InboxTable>(&()),
        Kind::Policy => ApiResource::erase::<DedupPolicy>(&()),
    }
}

/// Namespaced kinds in `ns`; DedupPolicy is cluster-scoped.
fn api(client: &Client, ns: &str, kind: Kind) -> Api<DynamicObject> {
    if kind == Kind::Policy {
        Api::all_with(client.clone(), &resource(kind))
    } else {
        Api::namespaced_with(client.clone(), ns, &resource(kind))
    }
}

/// `v` named `name`, with a label naming the test run (DedupPolicies are cluster-scoped: the run
/// lists and deletes its own by it).
fn object(mut v: Value, name: &str, run: &str) -> DynamicObject {
    set(&mut v, "/metadata/name", json!(name));
    set(&mut v, "/metadata/labels", json!({ RUN_LABEL: run }));
    serde_json::from_value(v).unwrap()
}

const RUN_LABEL: &str = "lockstep.dev/invalid-specs-run";

/// Create a schema case: the API server must refuse it with 422 and name the field.
async fn schema_rejection(client: &Client, ns: &str, case: &Case) -> Result<(), String> {
    let obj = object(manifest(case), &common::unique("bad"), ns);
    match api(client, ns, case.kind).create(&PostParams::default(), &obj).await {
        Ok(_) => Err(format!(
            "{}: the API server accepted an invalid {}",
            case.name,
            resource(case.kind).kind
        )),
        Err(kube::Error::Api(s)) if s.code != 422 => Err(format!("{}: {} {}", case.name, s.code, s.message)),
        // Kubernetes 1.20 names list items without their index (spec.topics.partitions).
        Err(kube::Error::Api(s)) if s.message.contains(case.field) || s.message.contains(&strip_indexes(case.field)) => Ok(()),
        Err(kube::Error::Api(s)) => Err(format!("{}: message does not name {}: {}", case.name, case.field, s.message)),
        Err(e) => Err(format!("{}: unexpected error {e}", case.name)),
    }
}

/// Delete the DedupPolicies this run created (cluster-scoped: the namespace does not take them).
async fn delete_policies(client: &Client, run: &str) {
    let policies = api(client, run, Kind::Policy);
    let lp = ListParams::default().labels(&format!("{RUN_LABEL}={run}"));
    for p in policies.list(&lp).await.unwrap() {
        let _ = policies.delete(&p.name_any(), &DeleteParams::default()).await;
    }
}

#[tokio::test]
async fn api_server_schema_rejects_with_the_field_named() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::TestNamespace::new(&client, "invalid").await;
    // The valid bases are accepted, so a rejection below is about the change.
    for kind in [Kind::Relay, Kind::Inbox, Kind::Policy] {
        let obj = object(base(kind), &common::unique("base"), &ns.name);
        api(&client, &ns.name, kind)
            .create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("valid base {} rejected: {e}", resource(kind).kind));
    }
    let mut failures = Vec::new();
    let schema_cases: Vec<Case> = cases().into_iter().filter(|c| c.schema).collect();
    for case in &schema_cases {
        failures.extend(schema_rejection(&client, &ns.name, case).await.err());
    }
    delete_policies(&client, &ns.name).await;
    ns.delete().await;
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    assert!(schema_cases.len() >= 10, "only {} schema rejections", schema_cases.len());
}

/// How long every object has, once all were created, to show the status it is awaited for.
const WAIT: Duration = Duration::from_secs(30);

/// An object awaited on: InvalidSpec naming `field`, or (None) reconciled past validation.
struct Awaited {
    what: String,
    kind: Kind,
    name: String,
    field: Option<&'static str>,
}

/// Why `obj` does not show what `a` awaits for its current generation; None when it does.
fn problem(obj: &DynamicObject, a: &Awaited) -> Option<String> {
    let status = &obj.data["status"];
    let Some(ready) = status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
    else {
        return Some(format!("no Ready condition yet (status: {status})"));
    };
    let (state, reason, message) = (&ready["status"], &ready["reason"], ready["message"].as_str().unwrap_or_default());
    let wrong = match a.field {
        Some(_) if state != "False" || reason != "InvalidSpec" => Some(format!("Ready={state} {reason}, not False InvalidSpec")),
        Some(field) if !message.contains(field) => Some(format!("the message does not name {field}")),
        None if reason == "InvalidSpec" => Some("a valid object reported InvalidSpec".into()),
        None if a.kind == Kind::Policy && state != "True" => Some(format!("a valid DedupPolicy is Ready={state} {reason}")),
        _ => None,
    };
    let observed = status["observedGeneration"].as_i64();
    match wrong {
        Some(w) => Some(format!("{w}: {message}")),
        None if observed != obj.metadata.generation => Some(format!(
            "status.observedGeneration {observed:?} is not metadata.generation {:?}",
            obj.metadata.generation
        )),
        None => None,
    }
}

/// Every object of the run by name: the namespace's OutboxRelays and InboxTables, the run's DedupPolicies.
async fn objects(client: &Client, ns: &str) -> HashMap<String, DynamicObject> {
    let mut out = HashMap::new();
    let lp = ListParams::default().labels(&format!("{RUN_LABEL}={ns}"));
    for kind in [Kind::Relay, Kind::Inbox, Kind::Policy] {
        for o in api(client, ns, kind).list(&lp).await.unwrap() {
            out.insert(o.name_any(), o);
        }
    }
    out
}

/// Poll until every awaited object shows its status or [`WAIT`] passes; the failures, each with
/// the last thing seen. A DedupPolicy is deleted as soon as it is confirmed: one with an unusable
/// selector holds the purges of every InboxTable in the cluster while it exists (fail closed).
async fn await_all(client: &Client, ns: &str, mut pending: Vec<Awaited>) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last: HashMap<String, String> = HashMap::new();
    loop {
        let objs = objects(client, ns).await;
        let mut still = Vec::new();
        for a in pending {
            match objs.get(&a.name).map(|o| problem(o, &a)) {
                Some(None) if a.kind == Kind::Policy => {
                    let _ = api(client, ns, a.kind).delete(&a.name, &DeleteParams::default()).await;
                }
                Some(None) => {}
                Some(Some(p)) => {
                    last.insert(a.name.clone(), p);
                    still.push(a);
                }
                None => {
                    last.insert(a.name.clone(), "not found".into());
                    still.push(a);
                }
            }
        }
        pending = still;
        if pending.is_empty() || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    pending
        .iter()
        .map(|a| format!("{} ({}): {}", a.what, a.name, last[&a.name]))
        .collect()
}

/// Create `v` under a fresh name; what to await of it.
async fn create(client: &Client, ns: &str, kind: Kind, v: Value, what: &str, field: Option<&'static str>) -> Result<Awaited, String> {
    let name = common::unique(if field.is_some() { "bad" } else { "valid" });
    match api(client, ns, kind).create(&PostParams::default(), &object(v, &name, ns)).await {
        Ok(_) => Ok(Awaited {
            what: what.to_string(),
            kind,
            name,
            field,
        }),
        Err(e) => Err(format!("{what}: the API server refused it: {e}")),
    }
}

#[tokio::test]
async fn operator_reports_invalid_spec_naming_the_field_within_one_reconcile() {
    common::operator();
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::TestNamespace::new(&client, "invalid-op").await;
    let cases = cases();
    let (mut rejected, mut skipped, mut awaited, mut failures) = (0, 0, Vec::new(), Vec::new());
    for case in &cases {
        let outcome = if case.schema {
            schema_rejection(&client, &ns.name, case).await.map(|()| rejected += 1)
        } else if case.validate {
            create(&client, &ns.name, case.kind, manifest(case), case.name, Some(case.field))
                .await
                .map(|a| awaited.push(a))
        } else {
            // CEL-only: the 1.20 test server has no CEL and validate() leaves these to the CEL
            // rules, so the server stores them; validate_and_cel_reject_with_the_field_named covers them.
            skipped += 1;
            Ok(())
        };
        failures.extend(outcome.err());
    }
    let total = awaited.len();
    let not_reported = await_all(&client, &ns.name, awaited).await;
    let reported = total - not_reported.len();
    failures.extend(not_reported);

    // The operator still reconciles valid objects afterwards: the relay and the inbox stop at
    // their missing Secret (a condition other than InvalidSpec), the policy is Ready.
    let mut valid = Vec::new();
    for kind in [Kind::Relay, Kind::Inbox, Kind::Policy] {
        let mut v = base(kind);
        if kind == Kind::Relay {
            set(&mut v, "/spec/relay/replicas", json!(0));
        }
        match create(&client, &ns.name, kind, v, &format!("valid {}", resource(kind).kind), None).await {
            Ok(a) => valid.push(a),
            Err(e) => failures.push(e),
        }
    }
    failures.extend(await_all(&client, &ns.name, valid).await);

    delete_policies(&client, &ns.name).await;
    ns.delete().await;
    println!(
        "{} malformed objects: {rejected} rejected by the API server, {reported} reported InvalidSpec ({skipped} CEL-only, not sent)",
        cases.len()
    );
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(rejected + reported + skipped, cases.len());
    assert!(rejected + reported + skipped >= 60);
}
