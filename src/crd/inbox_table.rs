//! InboxTable: a dedup table for an idempotent consumer, purged on its retention.
// clippy reads repeated `printcolumn(type_ = ...)` arguments of the kube derive as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::time::Duration as StdDuration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{Conditions, DatabaseSpec, DeletionPolicy, SecretKeyRef, SecretRef};
use crate::{
    core::duration::{Duration, Given},
    core::routing::validate_topic_name,
    core::sql::QualifiedName,
    core::validation::{Problems, ValidationErrors},
};

#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "lockstep.dev",
    version = "v1alpha1",
    kind = "InboxTable",
    namespaced,
    status = "InboxTableStatus",
    shortname = "ibt",
    category = "lockstep",
    cel,
    printcolumn(name = "Ready", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].status"#),
    printcolumn(name = "Reason", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].reason"#),
    printcolumn(name = "Table", type_ = "string", json_path = ".spec.database.table"),
    printcolumn(name = "Retention", type_ = "string", json_path = ".status.effectiveRetention"),
    printcolumn(name = "Rows", type_ = "integer", json_path = ".status.rows", description = "estimated row count"),
    printcolumn(name = "Oldest", type_ = "integer", json_path = ".status.oldestEntryAgeSeconds", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct InboxTableSpec {
    #[x_kube(validation = Rule::new("self.schema == oldSelf.schema && self.table == oldSelf.table").message("database.schema and database.table are immutable; create a new InboxTable for another table"))]
    pub database: DatabaseSpec,
    /// Rows older than this are purged. Unset: the matching DedupPolicy's default, else 7d.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Duration>,
    #[serde(default)]
    pub purge: PurgeSpec,
    /// What this inbox deduplicates; used to check that retention covers redelivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<SourcesSpec>,
    /// The longest time after which a message can still be redelivered, when smaller than
    /// the source topics' retention (e.g. consumers never reset to earliest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redelivery_window: Option<Duration>,
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PurgeSpec {
    #[serde(default = "default_purge_interval")]
    pub interval: Duration,
    /// Rows deleted per statement; small batches keep locks short.
    #[serde(default = "default_purge_batch")]
    #[schemars(range(min = 1, max = 100000))]
    pub batch_size: i32,
}

fn default_purge_interval() -> Duration {
    Duration::new("1m")
}
fn default_purge_batch() -> i32 {
    5000
}

impl Default for PurgeSpec {
    fn default() -> Self {
        PurgeSpec {
            interval: default_purge_interval(),
            batch_size: default_purge_batch(),
        }
    }
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SourcesSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSourceSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsSourceSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq: Option<super::RabbitmqSourceSpec>,
}

/// NATS JetStream streams an inbox deduplicates.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NatsSourceSpec {
    /// Comma-separated server URLs: nats://host:port, or tls://host:port.
    #[schemars(length(min = 1, max = 2048))]
    pub servers: String,
    /// Secret with the credentials, as an OutboxRelay's `nats.authSecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_secret_ref: Option<SecretRef>,
    #[schemars(length(min = 1, max = 100), inner(length(min = 1, max = 255)))]
    pub streams: Vec<String>,
    /// The consumers' durable consumer (on the first stream): its pending and unacknowledged
    /// messages are reported in `status.consumerLag`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub consumer: Option<String>,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSourceSpec {
    #[schemars(length(min = 1, max = 2048))]
    pub bootstrap_servers: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_secret_ref: Option<SecretRef>,
    #[schemars(length(min = 1, max = 100), inner(length(min = 1, max = 249)))]
    pub topics: Vec<String>,
    /// The consumers' group: its lag on `topics` is reported in `status.consumerLag` (read
    /// from the broker; the group is never joined and nothing is committed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub consumer_group: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InboxTableStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Conditions,
    /// The retention the purge applies, after DedupPolicy bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_retention: Option<String>,
    /// The DedupPolicies that set or bound the retention.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Estimated row count (from PostgreSQL statistics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_entry_age_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_purge: Option<PurgeStatus>,
    /// The lag of `sources.kafka.consumerGroup` on the source topics, measured each refresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_lag: Option<ConsumerLagStatus>,
    /// The table this object manages (`schema.table`), recorded once its schema is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// What holds on the consumer's hops (broker -> consumer, consumer -> database, consumer ->
    /// external APIs), from the retention and DedupCovered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub guarantees: Vec<super::Guarantee>,
}

/// A consumer group's lag: committed offset against high watermark, summed over partitions.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerLagStatus {
    pub group: String,
    /// Messages not consumed yet, over every source topic.
    pub messages: i64,
    /// Age of the oldest unconsumed message (from its Kafka timestamp), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_unconsumed_age_seconds: Option<f64>,
    pub topics: Vec<TopicLag>,
    /// Why the lag could not be measured last time (the figures are from before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub measured_at: Time,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicLag {
    pub topic: String,
    pub messages: i64,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PurgeStatus {
    pub time: Time,
    pub rows_deleted: i64,
    pub duration_seconds: f64,
}

/// Retention when neither the spec nor a policy sets one.
pub const DEFAULT_RETENTION: StdDuration = StdDuration::from_secs(7 * 86_400);

#[derive(Debug, Clone, PartialEq)]
pub struct ValidInboxTable {
    pub table: QualifiedName,
    pub url_secret: SecretKeyRef,
    /// Create or migrate the table (false: only verify it).
    pub manage_schema: bool,
    /// The requested retention; None: the policies' default or lockstep's.
    pub retention: Option<Given>,
    pub purge_interval: Given,
    pub purge_batch_size: i64,
    pub redelivery_window: Option<Given>,
    pub sources: Option<ValidKafkaSource>,
    pub nats_source: Option<ValidNatsSource>,
    pub rabbitmq_source: Option<super::ValidRabbitmqSource>,
}

/// The JetStream streams an inbox deduplicates.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidNatsSource {
    pub servers: Vec<String>,
    pub auth_secret: Option<String>,
    pub streams: Vec<String>,
    pub consumer: Option<String>,
}

/// The Kafka topics an inbox deduplicates, to check that its retention covers their redelivery.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidKafkaSource {
    pub bootstrap_servers: String,
    pub topics: Vec<String>,
    /// Secret whose keys are librdkafka settings (SASL/TLS).
    pub auth_secret: Option<String>,
    /// The group whose lag is reported in `status.consumerLag`.
    pub consumer_group: Option<String>,
}

impl InboxTableSpec {
    pub fn validate(&self) -> Result<ValidInboxTable, ValidationErrors> {
        let mut p = Problems::new();
        let table = self.database.validate_into(&mut p, "spec.database");
        let retention = self.retention.as_ref().and_then(|r| p.check("spec.retention", positive(r)));
        let retention_ok = self.retention.is_none() || retention.is_some();
        let purge_interval = p.check("spec.purge.interval", self.purge.interval.parse());
        if let Some(i) = purge_interval {
            if i < StdDuration::from_secs(1) || i > StdDuration::from_secs(86_400) {
                p.add(
                    "spec.purge.interval",
                    format!("must be between 1s and 24h (got {})", self.purge.interval),
                );
            }
        }
        p.range("spec.purge.batchSize", self.purge.batch_size, 1, 100_000);
        let redelivery_window = self
            .redelivery_window
            .as_ref()
            .and_then(|r| p.check("spec.redeliveryWindow", positive(r)));
        let window_ok = self.redelivery_window.is_none() || redelivery_window.is_some();
        if let Some(k) = self.sources.as_ref().and_then(|s| s.kafka.as_ref()) {
            validate_kafka_source(k, &mut p);
        }
        let nats = self.sources.as_ref().and_then(|s| s.nats.as_ref());
        if let Some(n) = nats {
            validate_nats_source(n, &mut p);
        }
        let rabbitmq = self
            .sources
            .as_ref()
            .and_then(|s| s.rabbitmq.as_ref())
            .map(|r| r.validate_into(&mut p));
        p.finish(|| {
            let given = |d: &Duration, value| Given { text: d.0.clone(), value };
            Some(ValidInboxTable {
                table: table?,
                url_secret: self.database.url_secret_ref.clone(),
                manage_schema: self.database.manage_schema,
                retention: if retention_ok {
                    self.retention.as_ref().zip(retention).map(|(d, v)| given(d, v))
                } else {
                    None?
                },
                purge_interval: given(&self.purge.interval, purge_interval?),
                purge_batch_size: i64::from(self.purge.batch_size),
                redelivery_window: if window_ok {
                    self.redelivery_window.as_ref().zip(redelivery_window).map(|(d, v)| given(d, v))
                } else {
                    None?
                },
                sources: self.sources.as_ref().and_then(|s| s.kafka.as_ref()).map(|k| ValidKafkaSource {
                    bootstrap_servers: k.bootstrap_servers.clone(),
                    // A topic listed twice is the same topic (not refused: objects stored with it stay valid).
                    topics: k.topics.iter().fold(Vec::new(), |mut seen, t| {
                        if !seen.contains(t) {
                            seen.push(t.clone());
                        }
                        seen
                    }),
                    auth_secret: k.auth_secret_ref.as_ref().map(|r| r.name.clone()),
                    consumer_group: k.consumer_group.clone(),
                }),
                nats_source: nats.map(|n| ValidNatsSource {
                    servers: n.servers.split(',').map(|s| s.trim().to_owned()).collect(),
                    auth_secret: n.auth_secret_ref.as_ref().map(|r| r.name.clone()),
                    streams: n.streams.clone(),
                    consumer: n.consumer.clone(),
                }),
                rabbitmq_source: rabbitmq,
            })
        })
    }
}

fn validate_kafka_source(k: &KafkaSourceSpec, p: &mut Problems) {
    if k.topics.is_empty() {
        p.add("spec.sources.kafka.topics", "list at least one topic");
    }
    for (i, t) in k.topics.iter().enumerate() {
        p.check(format!("spec.sources.kafka.topics[{i}]"), validate_topic_name(t));
    }
    if let Some(a) = &k.auth_secret_ref {
        super::common::validate_object_name(&a.name, p, "spec.sources.kafka.authSecretRef.name");
    }
    if k.consumer_group.as_deref().is_some_and(|g| g.trim().is_empty()) {
        p.add(
            "spec.sources.kafka.consumerGroup",
            "must not be blank; omit it to skip consumer lag",
        );
    }
    for (i, server) in k.bootstrap_servers.split(',').map(str::trim).enumerate() {
        if !super::outbox_relay::valid_host_port(server) {
            p.add(
                "spec.sources.kafka.bootstrapServers",
                format!("entry {i} ({server:?}) is not host:port"),
            );
        }
    }
}

fn validate_nats_source(n: &NatsSourceSpec, p: &mut Problems) {
    for (i, s) in n.servers.split(',').map(str::trim).enumerate() {
        if let Err(e) = crate::core::nats_settings::server_host_port(s) {
            p.add("spec.sources.nats.servers", format!("entry {i}: {e}"));
        }
    }
    if n.streams.is_empty() {
        p.add("spec.sources.nats.streams", "list at least one stream");
    }
    for (i, s) in n.streams.iter().enumerate() {
        if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            p.add(
                format!("spec.sources.nats.streams[{i}]"),
                format!("{s:?} is not a stream name (letters, digits, '_', '-')"),
            );
        }
    }
    if let Some(a) = &n.auth_secret_ref {
        super::common::validate_object_name(&a.name, p, "spec.sources.nats.authSecretRef.name");
    }
}

fn positive(d: &Duration) -> Result<StdDuration, String> {
    let v = d.parse()?;
    if v.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(v)
}
