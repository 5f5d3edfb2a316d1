//! Invalid specs: each is rejected by the CRD schema on the real API server, by the CEL rules
//! (evaluated client-side: the 1.20 test server predates CEL), and/or by `validate()`; every
//! rejection names the field.

mod common;

use kube::api::{Api, ApiResource, DynamicObject, PostParams};
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

fn cases() -> Vec<Case> {
    use Kind::*;
    let c = |name, kind, changes, field, schema, cel, validate| Case {
        name,
        kind,
        changes,
        field,
        schema,
        cel,
        validate,
    };
    vec![
        c(
            "sql injection in table",
            Relay,
            vec![("/spec/database/table", json!("x; drop table y"))],
            "spec.database.table",
            true,
            false,
            true,
        ),
        c(
            "quoted schema",
            Relay,
            vec![("/spec/database/schema", json!("\"quoted\""))],
            "spec.database.schema",
            true,
            false,
            true,
        ),
        c(
            "zero partitions",
            Relay,
            vec![("/spec/topics/0/partitions", json!(0))],
            "spec.topics[0].partitions",
            true,
            false,
            true,
        ),
        c(
            "batch too large",
            Relay,
            vec![("/spec/relay/batchSize", json!(100000))],
            "spec.relay.batchSize",
            true,
            false,
            true,
        ),
        c(
            "unknown compression",
            Relay,
            vec![("/spec/kafka/producer/compression", json!("brotli"))],
            "spec.kafka.producer.compression",
            true,
            false,
            false,
        ),
        c(
            "poll interval not a duration",
            Relay,
            vec![("/spec/relay/pollInterval", json!("soon"))],
            "spec.relay.pollInterval",
            true,
            false,
            true,
        ),
        c(
            "routing over a non-routing column",
            Relay,
            vec![("/spec/routing/topic", json!("orders.{payload}"))],
            "spec.routing.topic",
            true,
            false,
            true,
        ),
        c(
            "acks=1 weakens delivery",
            Relay,
            vec![("/spec/kafka/producer/config", json!({"acks": "1"}))],
            "spec.kafka.producer.config[acks]",
            false,
            true,
            true,
        ),
        c(
            "idempotence off",
            Relay,
            vec![("/spec/kafka/producer/config", json!({"enable.idempotence": "false"}))],
            "spec.kafka.producer.config[enable.idempotence]",
            false,
            true,
            true,
        ),
        c(
            "markPublished without retention",
            Relay,
            vec![("/spec/relay/cleanup", json!("MarkPublished"))],
            "spec.relay.publishedRetention",
            false,
            true,
            true,
        ),
        c(
            "key both set and ignored",
            Relay,
            vec![("/spec/topics/0/ignoreConfig", json!(["retention.ms"]))],
            "spec.topics[0].config[retention.ms]",
            false,
            true,
            true,
        ),
        c(
            "dead-letter name too long",
            Relay,
            vec![("/spec/database/table", json!("t".repeat(55)))],
            "spec.database.table",
            false,
            false,
            true,
        ),
        c(
            "bootstrap without port",
            Relay,
            vec![("/spec/kafka/bootstrapServers", json!("kafka"))],
            "spec.kafka.bootstrapServers",
            false,
            false,
            true,
        ),
        c(
            "secret name not a k8s name",
            Relay,
            vec![("/spec/database/urlSecretRef/name", json!("Orders_DB"))],
            "spec.database.urlSecretRef.name",
            true,
            false,
            true,
        ),
        c(
            "replication factor zero",
            Relay,
            vec![("/spec/topics/0/replicationFactor", json!(0))],
            "spec.topics[0].replicationFactor",
            true,
            false,
            true,
        ),
        c(
            "retention in words",
            Inbox,
            vec![("/spec/retention", json!("1 week"))],
            "spec.retention",
            true,
            false,
            true,
        ),
        c(
            "purge batch zero",
            Inbox,
            vec![("/spec/purge/batchSize", json!(0))],
            "spec.purge.batchSize",
            true,
            false,
            true,
        ),
        c(
            "source topic with a space",
            Inbox,
            vec![("/spec/sources/kafka/topics", json!(["bad topic"]))],
            "spec.sources.kafka.topics[0]",
            false,
            false,
            true,
        ),
        c(
            "inbox table name uppercase",
            Inbox,
            vec![("/spec/database/table", json!("Inbox"))],
            "spec.database.table",
            true,
            false,
            true,
        ),
        c(
            "min above max",
            Policy,
            vec![("/spec/minRetention", json!("60d"))],
            "spec.minRetention",
            false,
            false,
            true,
        ),
        c(
            "default below min",
            Policy,
            vec![("/spec/defaultRetention", json!("1h"))],
            "spec.defaultRetention",
            false,
            false,
            true,
        ),
        c(
            "exception without bounds",
            Policy,
            vec![(
                "/spec/exceptions",
                json!([{"namespace": "a", "name": "b", "expires": "2027-01-01T00:00:00Z"}]),
            )],
            "spec.exceptions[0]",
            false,
            false,
            true,
        ),
        c(
            "unknown enforcement",
            Policy,
            vec![("/spec/enforcement", json!("Sometimes"))],
            "spec.enforcement",
            true,
            false,
            false,
        ),
    ]
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
    assert!(cases.len() >= 10);
    for case in &cases {
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
                    assert!(validate.is_ok() || case.schema, "{}: unexpected validate() error", case.name);
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

#[tokio::test]
async fn api_server_schema_rejects_with_the_field_named() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::TestNamespace::new(&client, "invalid").await;
    let ar = |k: Kind| match k {
        Kind::Relay => ApiResource::erase::<OutboxRelay>(&()),
        Kind::Inbox => ApiResource::erase::<InboxTable>(&()),
        Kind::Policy => ApiResource::erase::<DedupPolicy>(&()),
    };
    let api = |k: Kind| -> Api<DynamicObject> {
        if k == Kind::Policy {
            Api::all_with(client.clone(), &ar(k))
        } else {
            Api::namespaced_with(client.clone(), &ns.name, &ar(k))
        }
    };
    // The valid bases are accepted, so a rejection below is about the change.
    for kind in [Kind::Relay, Kind::Inbox, Kind::Policy] {
        let mut v = base(kind);
        set(&mut v, "/metadata/name", json!(common::unique("base")));
        let obj: DynamicObject = serde_json::from_value(v).unwrap();
        api(kind)
            .create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("valid base {kind:?} rejected: {e}", kind = ar(kind).kind));
    }
    let mut rejected = 0;
    for case in cases().iter().filter(|c| c.schema) {
        let mut v = manifest(case);
        set(&mut v, "/metadata/name", json!(common::unique("bad")));
        let obj: DynamicObject = serde_json::from_value(v).unwrap();
        match api(case.kind).create(&PostParams::default(), &obj).await {
            Ok(_) => panic!("{}: the API server accepted an invalid {}", case.name, ar(case.kind).kind),
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 422, "{}: {}", case.name, s.message);
                // Kubernetes 1.20 names list items without their index (spec.topics.partitions).
                let unindexed = strip_indexes(case.field);
                assert!(
                    s.message.contains(case.field) || s.message.contains(&unindexed),
                    "{}: message does not name {}: {}",
                    case.name,
                    case.field,
                    s.message
                );
                rejected += 1;
            }
            Err(e) => panic!("{}: unexpected error {e}", case.name),
        }
    }
    assert!(rejected >= 10, "only {rejected} schema rejections");
    ns.delete().await;
}
