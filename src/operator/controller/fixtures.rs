//! Small builders for the controllers' unit tests: objects and findings, no cluster.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

use super::{
    dedup_policy::TableView,
    relay_available,
    relay_buckets::{self, Locks},
};
use crate::{
    core::duration::Given,
    core::sql::{Ident, QualifiedName},
    crd::{DedupPolicySpec, Enforcement, OutboxRelay, PolicyException, SecretKeyRef, ValidInboxTable},
    operator::conditions::{condition, Cond, Reason},
    operator::policy::retention::{Compliance, Effective, PolicyView},
    operator::purges::LastPurge,
    tables::buckets::{bucket_code, member_code, Holdings},
    tables::purge::PurgeResult,
};

pub fn now() -> Timestamp {
    "2026-06-01T00:00:00Z".parse().unwrap()
}

pub fn given(text: &str) -> Given {
    Given {
        text: text.into(),
        value: crate::core::duration::parse(text).unwrap(),
    }
}

pub fn inbox(retention: Option<&str>) -> ValidInboxTable {
    ValidInboxTable {
        table: QualifiedName {
            schema: Ident::parse("billing").unwrap(),
            table: Ident::parse("inbox").unwrap(),
        },
        url_secret: SecretKeyRef {
            name: "db".into(),
            key: "url".into(),
        },
        manage_schema: true,
        retention: retention.map(given),
        purge_interval: given("1m"),
        purge_batch_size: 5000,
        redelivery_window: None,
        sources: None,
        nats_source: None,
        rabbitmq_source: None,
    }
}

/// The retention a table got: `text`, with `compliance`.
pub fn effective(text: &str, compliance: Compliance, require_coverage: bool) -> Effective {
    Effective {
        retention: crate::core::duration::parse(text).unwrap(),
        text: text.into(),
        policies: vec![],
        message: format!("retention {text}"),
        compliance,
        require_coverage,
        next_change: None,
    }
}

pub fn schema_ok() -> Cond {
    Cond::yes(condition::SCHEMA_READY, Reason::SchemaUpToDate, "schema version 1")
}

pub fn topics_ok() -> Cond {
    Cond::yes(condition::TOPICS_READY, Reason::TopicsConfigured, "1 topic(s) as specified")
}

pub fn lag_ok() -> Cond {
    Cond::yes(condition::LAG_HEALTHY, Reason::LagWithinThreshold, "0 events pending")
}

/// RelayAvailable with buckets 1: `wanted` pods, `available` of them, one holding the lock (`active`).
pub fn one_relay(wanted: i32, available: i32, active: bool) -> Cond {
    let locks = Locks {
        single: active,
        ..Locks::default()
    };
    relay_available::verdict(&relay_available::Seen {
        wanted,
        available,
        buckets: 1,
        locks,
        unowned_for: None,
    })
}

/// RelayAvailable with 64 buckets, two relays owning `owned`, the rest unowned for `unowned_for`.
pub fn two_relays_owning(owned: std::ops::Range<u16>, unowned_for: Option<Duration>) -> Cond {
    let mid = owned.start + owned.len() as u16 / 2;
    let rows = [(10, owned.start..mid), (20, mid..owned.end)].into_iter().flat_map(|(pid, mine)| {
        let member = (i64::from(member_code(64)), pid);
        std::iter::once(member).chain(mine.map(move |b| (i64::from(bucket_code(64, b)), pid)))
    });
    let locks = Locks {
        holdings: Holdings::from_locks(64, rows.collect::<Vec<_>>()),
        ..Locks::default()
    };
    relay_buckets::verdict(64, &locks, 2, "2/2 relay pods available", unowned_for)
}

pub fn purged(rows: i64) -> LastPurge {
    LastPurge::Done {
        at: Time(now()),
        result: PurgeResult {
            rows_deleted: rows,
            duration: Duration::from_millis(20),
            batches: 1,
        },
    }
}

pub fn policy(name: &str, min: Option<&str>, team: Option<&str>, enforcement: Enforcement) -> PolicyView {
    policy_with(name, min, team, enforcement, vec![])
}

pub fn policy_with(
    name: &str,
    min: Option<&str>,
    team: Option<&str>,
    enforcement: Enforcement,
    exceptions: Vec<PolicyException>,
) -> PolicyView {
    let selector = team.map(|t| k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
        match_labels: Some([("team".to_string(), t.to_string())].into()),
        ..Default::default()
    });
    let spec = DedupPolicySpec {
        namespace_selector: selector,
        min_retention: min.map(Into::into),
        max_retention: None,
        default_retention: None,
        enforcement,
        require_coverage: false,
        exceptions,
    };
    PolicyView {
        name: name.into(),
        policy: spec.validate().unwrap(),
    }
}

pub fn exception(namespace: &str, name: &str, min: &str, expires: &str) -> PolicyException {
    PolicyException {
        namespace: namespace.into(),
        name: name.into(),
        min_retention: Some(min.into()),
        max_retention: None,
        expires: Time(expires.parse().unwrap()),
    }
}

/// A table in namespace `ns` labelled team=`team`, asking for `retention` (Err: invalid spec).
pub fn table(ns: &str, name: &str, team: &str, retention: Result<Option<&str>, ()>) -> TableView {
    TableView {
        namespace: ns.into(),
        name: name.into(),
        namespace_labels: BTreeMap::from([("team".to_string(), team.to_string())]),
        requested: retention.map(|r| r.map(|r| (r.to_string(), crate::core::duration::parse(r).unwrap()))),
    }
}

/// An OutboxRelay as read from the API (namespace, uid) with the given spec (JSON, defaults apply).
pub fn outbox_relay_with(name: &str, spec: serde_json::Value) -> OutboxRelay {
    let mut o = OutboxRelay::new(name, serde_json::from_value(spec).unwrap());
    o.metadata.namespace = Some("shop".into());
    o.metadata.uid = Some("3f1c2a4e-8d0b-4c6e-9a7f-1b2c3d4e5f60".into());
    o
}

/// Only the required fields: every relay setting at its default, no Kafka auth Secret.
pub fn outbox_relay_minimal(name: &str) -> OutboxRelay {
    outbox_relay_with(
        name,
        serde_json::json!({
            "database": {"urlSecretRef": {"name": "db"}, "table": "outbox"},
            "kafka": {"bootstrapServers": "kafka:9092"},
        }),
    )
}

/// Every relay setting away from its default, a Kafka auth Secret, a producer value starting with '-'.
pub fn outbox_relay(name: &str) -> OutboxRelay {
    outbox_relay_with(
        name,
        serde_json::json!({
            "database": {
                "urlSecretRef": {"name": "orders-db", "key": "dsn"},
                "schema": "billing",
                "table": "orders_outbox",
                "manageSchema": false,
            },
            "kafka": {
                "bootstrapServers": "k1:9092,k2:9093",
                "authSecretRef": {"name": "kafka-auth"},
                "producer": {
                    "lingerMs": 20,
                    "compression": "zstd",
                    "config": {"client.id": "-orders", "acks": "all", "message.max.bytes": "2000000"},
                },
            },
            "routing": {"topic": "orders.{type}.v1", "key": "id"},
            "topics": [{"name": "orders.created.v1", "partitions": 6}],
            "relay": {
                "replicas": 3,
                "buckets": 64,
                "batchSize": 200,
                "pollInterval": "1m30s",
                "maxGather": "50ms",
                "maxAttempts": 3,
                "cleanup": "MarkPublished",
                "publishedRetention": "1d",
                "image": "registry.example/lockstep:1.2.3",
                "headers": "cloudevents",
                "cloudEvents": {"source": "https://orders.example/-"},
            },
            "lag": {"maxOldestAge": "1m"},
        }),
    )
}
