//! OutboxRelay: an outbox table, the topics it publishes to, and the relay that moves rows.
// clippy reads repeated `printcolumn(type_ = ...)` arguments of the kube derive as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::{collections::BTreeMap, time::Duration as StdDuration};

use k8s_openapi::{api::core::v1::ResourceRequirements, apimachinery::pkg::apis::meta::v1::Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{Conditions, DatabaseSpec, DeletionPolicy, SecretKeyRef, SecretRef};
use crate::{
    duration::Duration,
    routing::{validate_topic_name, OutboxColumn, TopicTemplate},
    sql::QualifiedName,
    topics::Desired,
    validation::{Problems, ValidationErrors},
};

/// Suffix of the dead-letter table beside an outbox table.
pub const DEAD_LETTER_SUFFIX: &str = "_dead_letter";

#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "lockstep.dev",
    version = "v1alpha1",
    kind = "OutboxRelay",
    namespaced,
    status = "OutboxRelayStatus",
    shortname = "obr",
    category = "lockstep",
    cel,
    printcolumn(name = "Ready", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].status"#),
    printcolumn(name = "Reason", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].reason"#),
    printcolumn(name = "Table", type_ = "string", json_path = ".spec.database.table"),
    printcolumn(name = "Pending", type_ = "integer", json_path = ".status.lag.pendingEvents"),
    printcolumn(
        name = "Oldest",
        type_ = "number",
        json_path = ".status.lag.oldestPendingAgeSeconds",
        description = "age in seconds of the oldest unpublished event"
    ),
    printcolumn(name = "Quarantined", type_ = "integer", json_path = ".status.lag.quarantined", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRelaySpec {
    /// The outbox table. Its dead-letter table is `<table>_dead_letter` in the same schema.
    #[x_kube(validation = Rule::new("self.schema == oldSelf.schema && self.table == oldSelf.table").message("database.schema and database.table are immutable; create a new OutboxRelay for another table"))]
    pub database: DatabaseSpec,
    pub kafka: KafkaSpec,
    #[serde(default)]
    pub routing: RoutingSpec,
    /// Topics lockstep creates and keeps configured.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub topics: Vec<TopicSpec>,
    #[serde(default)]
    pub relay: RelaySpec,
    #[serde(default)]
    pub lag: LagSpec,
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSpec {
    /// Comma-separated host:port list.
    #[schemars(length(min = 1, max = 2048))]
    pub bootstrap_servers: String,
    /// Secret whose keys are librdkafka settings (security.protocol, sasl.*, ssl.*).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_secret_ref: Option<SecretRef>,
    #[serde(default)]
    pub producer: ProducerSpec,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.config) || !('enable.idempotence' in self.config) || self.config['enable.idempotence'] == 'true'").message("enable.idempotence is forced to true; false would let retries duplicate messages"))]
#[x_kube(validation = Rule::new("!has(self.config) || !('acks' in self.config) || self.config['acks'] in ['all', '-1']").message("acks is forced to all; a weaker setting can lose acknowledged events"))]
pub struct ProducerSpec {
    /// How long the producer waits to fill a batch.
    #[serde(default = "default_linger_ms")]
    #[schemars(range(min = 0, max = 60000))]
    pub linger_ms: u32,
    #[serde(default)]
    pub compression: Compression,
    /// Further librdkafka producer settings. enable.idempotence=true and acks=all are forced;
    /// settings that would weaken delivery are rejected.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

fn default_linger_ms() -> u32 {
    5
}

impl Default for ProducerSpec {
    fn default() -> Self {
        ProducerSpec {
            linger_ms: default_linger_ms(),
            compression: Compression::default(),
            config: BTreeMap::new(),
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    #[default]
    Lz4,
    Zstd,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RoutingSpec {
    /// A fixed topic name, or a template over columns: {aggregatetype}, {aggregateid}, {type}.
    #[serde(default = "default_topic_template")]
    #[schemars(
        length(min = 1, max = 249),
        regex(pattern = r"^([a-zA-Z0-9._-]|\{(aggregatetype|aggregateid|type)\})+$")
    )]
    pub topic: String,
    /// The column used as the Kafka message key; per-key order is kept.
    #[serde(default = "default_key")]
    pub key: OutboxColumn,
}

fn default_topic_template() -> String {
    "outbox.event.{aggregatetype}".into()
}

fn default_key() -> OutboxColumn {
    OutboxColumn::Aggregateid
}

impl Default for RoutingSpec {
    fn default() -> Self {
        RoutingSpec {
            topic: default_topic_template(),
            key: default_key(),
        }
    }
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.config) || !has(self.ignoreConfig) || !self.ignoreConfig.exists(k, k in self.config)").message("a key cannot be both set in config and listed in ignoreConfig"))]
pub struct TopicSpec {
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub name: String,
    #[schemars(range(min = 1, max = 10000))]
    pub partitions: i32,
    #[serde(default = "default_replication_factor")]
    #[schemars(range(min = 1, max = 32))]
    pub replication_factor: i32,
    /// Topic config lockstep sets and keeps (only these keys).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// Keys owned by someone else: never changed or reverted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore_config: Vec<String>,
    /// Allow raising partitions on this topic. Off by default: it remaps keys to partitions
    /// and so breaks per-key order for events in flight.
    #[serde(default)]
    pub allow_partition_increase: bool,
}

fn default_replication_factor() -> i32 {
    3
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.cleanup != 'MarkPublished' || has(self.publishedRetention)").message("cleanup: MarkPublished needs publishedRetention"))]
pub struct RelaySpec {
    /// Relay pods: one active (PostgreSQL advisory lock), the rest hot standby.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 10))]
    pub replicas: i32,
    /// Rows read and published per batch.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 10000))]
    pub batch_size: i32,
    /// Upper bound between polls; LISTEN/NOTIFY wakes the relay sooner.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: Duration,
    /// Failed publishes of one row before it moves to the dead-letter table.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_attempts: i32,
    #[serde(default)]
    pub cleanup: Cleanup,
    /// With cleanup MarkPublished: how long published rows are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_retention: Option<Duration>,
    /// Relay image; defaults to the operator's own image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Stop relaying without deleting anything (replicas scaled to 0).
    #[serde(default)]
    pub paused: bool,
}

fn default_replicas() -> i32 {
    2
}
fn default_batch_size() -> i32 {
    500
}
fn default_poll_interval() -> Duration {
    Duration::new("1s")
}
fn default_max_attempts() -> i32 {
    10
}

impl Default for RelaySpec {
    fn default() -> Self {
        RelaySpec {
            replicas: default_replicas(),
            batch_size: default_batch_size(),
            poll_interval: default_poll_interval(),
            max_attempts: default_max_attempts(),
            cleanup: Cleanup::default(),
            published_retention: None,
            image: None,
            resources: None,
            paused: false,
        }
    }
}

/// What the relay does with a row once the broker acknowledged it.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
pub enum Cleanup {
    #[default]
    Delete,
    MarkPublished,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LagSpec {
    /// LagHealthy turns False when the oldest unpublished event is older than this.
    #[serde(default = "default_max_oldest_age")]
    pub max_oldest_age: Duration,
}

fn default_max_oldest_age() -> Duration {
    Duration::new("30s")
}

impl Default for LagSpec {
    fn default() -> Self {
        LagSpec {
            max_oldest_age: default_max_oldest_age(),
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRelayStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Conditions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<TopicStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<LagStatus>,
    /// What holds on each hop, stated plainly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guarantees: Vec<Guarantee>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicStatus {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<i32>,
    pub ready: bool,
    /// Config keys that differ from the spec, as `key: actual -> wanted`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LagStatus {
    pub pending_events: i64,
    pub oldest_pending_age_seconds: f64,
    pub quarantined: i64,
    /// Age of the oldest open transaction holding the relay back, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocking_transaction_age_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_at: Option<Time>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub struct Guarantee {
    pub hop: String,
    pub guarantee: String,
}

/// librdkafka producer settings that lockstep owns; a spec may repeat them only with the forced value.
const FORCED_PRODUCER_SETTINGS: [(&str, &[&str]); 2] = [("enable.idempotence", &["true"]), ("acks", &["all", "-1"])];
/// Settings that would break idempotence or ordering guarantees.
const FORBIDDEN_PRODUCER_SETTINGS: [&str; 3] = ["transactional.id", "bootstrap.servers", "enable.gapless.guarantee"];

/// An OutboxRelay spec that passed validation: every value later steps need, parsed, so nothing
/// reads the raw spec after `validate()`.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidOutboxRelay {
    pub table: QualifiedName,
    pub dead_letter_table: QualifiedName,
    pub url_secret: SecretKeyRef,
    /// Create or migrate the tables (false: only verify them).
    pub manage_schema: bool,
    pub bootstrap_servers: String,
    /// Secret whose keys are librdkafka settings (SASL/TLS).
    pub auth_secret: Option<String>,
    pub producer: ValidProducer,
    pub topic_template: TopicTemplate,
    pub key: OutboxColumn,
    /// Topics lockstep creates and keeps configured, as the topic plan wants them.
    pub topics: Vec<Desired>,
    pub replicas: i32,
    pub batch_size: i32,
    pub max_attempts: i32,
    pub poll_interval: StdDuration,
    pub cleanup: Cleanup,
    pub published_retention: Option<StdDuration>,
    pub max_oldest_age: StdDuration,
}

/// Producer settings that passed validation (idempotence and acks=all are added when building).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidProducer {
    pub linger_ms: u32,
    pub compression: Compression,
    pub config: BTreeMap<String, String>,
}

impl TopicSpec {
    /// The topic as the plan wants it. Every outbox message is keyed, so partition changes are
    /// refused unless the spec allows them.
    fn desired(&self) -> Desired {
        Desired {
            name: self.name.clone(),
            partitions: self.partitions,
            replication_factor: self.replication_factor,
            // A key both set and ignored is rejected by validation; ignore wins here regardless.
            config: self
                .config
                .iter()
                .filter(|(k, _)| !self.ignore_config.contains(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ignore: self.ignore_config.iter().cloned().collect(),
            allow_partition_increase: self.allow_partition_increase,
            keyed: true,
        }
    }
}

impl OutboxRelaySpec {
    /// Every problem in the spec at once, each naming its field; or the resolved spec.
    pub fn validate(&self) -> Result<ValidOutboxRelay, ValidationErrors> {
        let mut p = Problems::new();
        let table = self.database.validate_into(&mut p, "spec.database");
        let dead_letter_table = table.as_ref().and_then(|t| {
            p.check(
                "spec.database.table",
                t.table
                    .with_suffix(DEAD_LETTER_SUFFIX)
                    .map_err(|e| format!("the dead-letter table name {}{DEAD_LETTER_SUFFIX} {e}", t.table.as_str())),
            )
            .map(|dl| QualifiedName {
                schema: t.schema.clone(),
                table: dl,
            })
        });

        if self.kafka.bootstrap_servers.trim().is_empty() {
            p.add("spec.kafka.bootstrapServers", "must name at least one host:port");
        }
        for (i, server) in self.kafka.bootstrap_servers.split(',').map(str::trim).enumerate() {
            if !server.is_empty() && !valid_host_port(server) {
                p.add("spec.kafka.bootstrapServers", format!("entry {i} ({server:?}) is not host:port"));
            }
        }
        if let Some(a) = &self.kafka.auth_secret_ref {
            super::common::validate_object_name(&a.name, &mut p, "spec.kafka.authSecretRef.name");
        }
        let pr = &self.kafka.producer;
        p.range("spec.kafka.producer.lingerMs", pr.linger_ms, 0, 60_000);
        for (key, value) in &pr.config {
            let field = format!("spec.kafka.producer.config[{key}]");
            if let Some((_, allowed)) = FORCED_PRODUCER_SETTINGS.iter().find(|(k, _)| k == key) {
                if !allowed.contains(&value.as_str()) {
                    p.add(
                        field,
                        format!("{key}={value} would weaken delivery; lockstep forces {key}={}", allowed[0]),
                    );
                }
            } else if FORBIDDEN_PRODUCER_SETTINGS.contains(&key.as_str()) {
                p.add(field, format!("{key} is managed by lockstep and cannot be set"));
            } else if key == "max.in.flight.requests.per.connection" && !value.parse::<u32>().is_ok_and(|n| (1..=5).contains(&n)) {
                p.add(field, format!("must be 1 to 5 with the idempotent producer (got {value:?})"));
            }
        }

        let topic_template = p.check("spec.routing.topic", TopicTemplate::parse(&self.routing.topic));

        let mut seen = std::collections::BTreeSet::new();
        for (i, t) in self.topics.iter().enumerate() {
            let f = format!("spec.topics[{i}]");
            p.check(format!("{f}.name"), validate_topic_name(&t.name));
            if !seen.insert(t.name.as_str()) {
                p.add(format!("{f}.name"), format!("topic {:?} is listed twice", t.name));
            }
            p.range(format!("{f}.partitions"), t.partitions, 1, 10_000);
            p.range(format!("{f}.replicationFactor"), t.replication_factor, 1, 32);
            for key in t.config.keys() {
                if !valid_config_key(key) {
                    p.add(
                        format!("{f}.config[{key}]"),
                        "not a Kafka config key (lowercase letters, digits and '.')",
                    );
                }
                if t.ignore_config.contains(key) {
                    p.add(format!("{f}.config[{key}]"), "set in config and listed in ignoreConfig; choose one");
                }
            }
            if let Some(v) = t.config.get("min.insync.replicas") {
                if v.parse::<u32>().map(|n| n == 0).unwrap_or(true) {
                    p.add(
                        format!("{f}.config[min.insync.replicas]"),
                        format!("must be a positive integer (got {v:?})"),
                    );
                }
            }
            if let Some(v) = t.config.get("retention.ms") {
                if v.parse::<i64>().map(|n| n < -1).unwrap_or(true) {
                    p.add(format!("{f}.config[retention.ms]"), format!("must be an integer >= -1 (got {v:?})"));
                }
            }
        }

        let r = &self.relay;
        p.range("spec.relay.replicas", r.replicas, 0, 10);
        p.range("spec.relay.batchSize", r.batch_size, 1, 10_000);
        p.range("spec.relay.maxAttempts", r.max_attempts, 1, 1000);
        let poll_interval = p.check("spec.relay.pollInterval", r.poll_interval.parse());
        if let Some(pi) = poll_interval {
            if pi < StdDuration::from_millis(10) || pi > StdDuration::from_secs(3600) {
                p.add(
                    "spec.relay.pollInterval",
                    format!("must be between 10ms and 1h (got {})", r.poll_interval),
                );
            }
        }
        let published_retention = match (r.cleanup, &r.published_retention) {
            (Cleanup::MarkPublished, None) => {
                p.add("spec.relay.publishedRetention", "required when cleanup is MarkPublished");
                None
            }
            (_, Some(d)) => p.check("spec.relay.publishedRetention", d.parse()),
            (Cleanup::Delete, None) => None,
        };
        if matches!(&r.image, Some(i) if i.trim().is_empty()) {
            p.add("spec.relay.image", "must not be empty; omit it to use the operator's image");
        }
        let max_oldest_age = p.check("spec.lag.maxOldestAge", self.lag.max_oldest_age.parse());

        p.finish(|| {
            Some(ValidOutboxRelay {
                table: table?,
                dead_letter_table: dead_letter_table?,
                url_secret: self.database.url_secret_ref.clone(),
                manage_schema: self.database.manage_schema,
                bootstrap_servers: self.kafka.bootstrap_servers.clone(),
                auth_secret: self.kafka.auth_secret_ref.as_ref().map(|r| r.name.clone()),
                producer: ValidProducer {
                    linger_ms: pr.linger_ms,
                    compression: pr.compression,
                    config: pr.config.clone(),
                },
                topic_template: topic_template?,
                key: self.routing.key,
                topics: self.topics.iter().map(TopicSpec::desired).collect(),
                replicas: r.replicas,
                batch_size: r.batch_size,
                max_attempts: r.max_attempts,
                poll_interval: poll_interval?,
                cleanup: r.cleanup,
                published_retention,
                max_oldest_age: max_oldest_age?,
            })
        })
    }
}

fn valid_config_key(k: &str) -> bool {
    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.') && !k.starts_with('.') && !k.ends_with('.')
}

pub(crate) fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && host.chars().all(|c| c.is_ascii_alphanumeric() || ".-_[]:".contains(c))
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_topic_drops_ignored_keys_and_is_keyed() {
        let spec = TopicSpec {
            name: "a".into(),
            partitions: 1,
            replication_factor: 1,
            config: [("retention.ms".to_string(), "1".to_string())].into(),
            ignore_config: vec!["retention.ms".into()],
            allow_partition_increase: false,
        };
        let d = spec.desired();
        assert!(d.config.is_empty());
        assert!(d.ignore.contains("retention.ms"));
        assert!(d.keyed);
    }
}
