//! OutboxRelay: an outbox table, the topics it publishes to, and the relay that moves rows.
// clippy reads repeated `printcolumn(type_ = ...)` arguments of the kube derive as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

mod nats;
mod rabbitmq;
mod rabbitmq_queue;
mod relays;
mod validate;

use std::collections::BTreeMap;

use k8s_openapi::{api::core::v1::ResourceRequirements, apimachinery::pkg::apis::meta::v1::Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

pub use nats::{Broker, DesiredStream, Discard, NatsSpec, StreamSpec, StreamStorage, ValidNats, STREAM_SETTINGS};
pub use rabbitmq::*;
pub use rabbitmq_queue::*;
pub use relays::RelayShare;
pub(crate) use validate::valid_host_port;
pub use validate::{ValidOutboxRelay, ValidProducer, MAX_BUCKETS};

use super::common::{Conditions, DatabaseSpec, DeletionPolicy, SecretRef};
use crate::{core::duration::Duration, core::routing::OutboxColumn};

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
#[x_kube(validation = Rule::new("(!has(self.broker) || self.broker == 'Kafka') ? has(self.kafka) : (self.broker == 'Nats' ? has(self.nats) : has(self.rabbitmq))").message("broker Kafka needs spec.kafka, broker Nats spec.nats, broker Rabbitmq spec.rabbitmq"))]
#[x_kube(validation = Rule::new("!has(self.broker) || self.broker == 'Kafka' || !has(self.topics) || size(self.topics) == 0").message("topics are Kafka's: with broker Nats, declare streams in spec.nats.streams; with Rabbitmq, queues in spec.rabbitmq.queues"))]
pub struct OutboxRelaySpec {
    /// The outbox table. Its dead-letter table is `<table>_dead_letter` in the same schema.
    #[x_kube(validation = Rule::new("self.schema == oldSelf.schema && self.table == oldSelf.table").message("database.schema and database.table are immutable; create a new OutboxRelay for another table"))]
    pub database: DatabaseSpec,
    /// The broker the relay publishes to: Kafka (`kafka`), NATS JetStream (`nats`) or RabbitMQ
    /// (`rabbitmq`). Fixed: consumers read where the relay published.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("broker is immutable; create a new OutboxRelay for another broker"))]
    pub broker: Broker,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq: Option<RabbitmqSpec>,
    #[serde(default)]
    pub routing: RoutingSpec,
    /// Topics lockstep creates and keeps configured.
    #[serde(default)]
    #[schemars(length(max = 100), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
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
    #[schemars(extend("maxProperties" = MAX_CONFIG_KEYS, "additionalProperties" = {"type": "string", "maxLength": MAX_CONFIG_VALUE}))]
    pub config: BTreeMap<String, String>,
}

/// Bounds on librdkafka/topic setting maps: the API server prices CEL rules over a map or list by
/// its largest possible size, and rejects the CRD when that is unbounded (1.25+).
const MAX_CONFIG_KEYS: u32 = 64;
const MAX_CONFIG_VALUE: u32 = 4096;

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
    #[schemars(extend("maxProperties" = MAX_CONFIG_KEYS, "additionalProperties" = {"type": "string", "maxLength": MAX_CONFIG_VALUE}))]
    pub config: BTreeMap<String, String>,
    /// Keys owned by someone else: never changed or reverted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_CONFIG_KEYS), inner(length(min = 1, max = 249)))]
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
#[x_kube(validation = Rule::new("!has(self.cloudEvents) || (has(self.headers) && self.headers == 'cloudevents')").message("cloudEvents applies only with headers: cloudevents"))]
pub struct RelaySpec {
    /// Relay pods. With buckets 1, one is active (PostgreSQL advisory lock) and the rest stand by;
    /// with more buckets, every relay is active and owns a share of them.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 10))]
    pub replicas: i32,
    /// Key-hash buckets: each row belongs to bucket `sha256(key)[0..4] mod buckets`, each bucket
    /// is sent by one relay at a time, in seq order. 1: a single active relay. Changing it on a
    /// live outbox is safe: relays of the new count wait until those of the old one stopped.
    #[serde(default = "default_buckets")]
    #[schemars(range(min = 1, max = 256))]
    pub buckets: i32,
    /// Rows read and published per batch.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 10000))]
    pub batch_size: i32,
    /// Upper bound between polls; LISTEN/NOTIFY wakes the relay sooner.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: Duration,
    /// Under a steady flow, the longest a read waits after the previous one to take the rows
    /// committed meanwhile in one batch: fewer statements on the writers' database for up to this
    /// much more latency. The wait adapts to the flow (about 50 rows a read); a row after a quiet
    /// spell is read at once. 0s: no waiting. At most 1s.
    #[serde(default = "default_max_gather")]
    pub max_gather: Duration,
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
    /// The headers each message carries besides the row's own: `lockstep` (id, type, and
    /// traceparent from the outbox's optional traceparent column) or `cloudevents` (those, and
    /// the CloudEvents Kafka binding's binary-mode headers ce_id, ce_type, ce_source,
    /// ce_specversion, ce_time, and content-type for a JSON payload).
    #[serde(default)]
    pub headers: HeaderSet,
    /// CloudEvents settings, with headers: cloudevents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_events: Option<CloudEventsSpec>,
}

/// Which headers the relay puts on each message.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HeaderSet {
    #[default]
    Lockstep,
    CloudEvents,
}

impl HeaderSet {
    /// The spec's (and `--headers`') name.
    pub fn as_str(self) -> &'static str {
        match self {
            HeaderSet::Lockstep => "lockstep",
            HeaderSet::CloudEvents => "cloudevents",
        }
    }
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CloudEventsSpec {
    /// ce_source, a URI reference naming where the events come from (for example
    /// `https://orders.example.com` or `/orders`). Default: `/lockstep/<schema>/<table>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^[!-~]+$"))]
    pub source: Option<String>,
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
fn default_max_gather() -> Duration {
    Duration::new("20ms")
}
fn default_buckets() -> i32 {
    1
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
            max_gather: default_max_gather(),
            buckets: default_buckets(),
            max_attempts: default_max_attempts(),
            cleanup: Cleanup::default(),
            published_retention: None,
            image: None,
            resources: None,
            paused: false,
            headers: HeaderSet::default(),
            cloud_events: None,
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
    /// The last dead-letter replay asked for with the `lockstep.dev/replay` annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_replay: Option<ReplayStatus>,
    /// The outbox this object manages (`schema.table`), recorded once its schema is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// spec.relay.buckets, when above 1 (with 1, these three fields are absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buckets: Option<i32>,
    /// Buckets some relay owns; the events of the others wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buckets_owned: Option<i32>,
    /// Each relay's share of the buckets (PostgreSQL advisory locks, read from pg_locks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<RelayShare>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplayStatus {
    /// The annotation's value that was replayed.
    pub token: String,
    /// Rows moved back into the outbox.
    pub rows: i64,
    pub at: Time,
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
    /// The OutboxRelay (`namespace/name`) that manages this topic when it is another one: this
    /// object then neither changes nor deletes it (TopicsReady ResourceConflict).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
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
