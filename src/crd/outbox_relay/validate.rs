//! OutboxRelay validation: every problem at once, each naming its field, or the resolved spec
//! that every later step reads instead of the raw one.

use std::{collections::BTreeMap, time::Duration as StdDuration};

use k8s_openapi::{api::core::v1::ResourceRequirements, apimachinery::pkg::api::resource::Quantity};

use super::{Cleanup, Compression, HeaderSet, KafkaSpec, OutboxRelaySpec, RelaySpec, TopicSpec, DEAD_LETTER_SUFFIX};
use crate::{
    core::routing::{validate_topic_name, OutboxColumn, TopicTemplate},
    core::sql::QualifiedName,
    core::validation::{Problems, ValidationErrors},
    crd::common::{validate_object_name, SecretKeyRef},
    crd::topics::Desired,
};

/// The most buckets an outbox may have.
pub const MAX_BUCKETS: u16 = 256;

/// librdkafka producer settings that lockstep owns; a spec may repeat them only with the forced value.
const FORCED_PRODUCER_SETTINGS: [(&str, &[&str]); 2] = [("enable.idempotence", &["true"]), ("acks", &["all", "-1"])];
/// Settings that would break idempotence or ordering guarantees. Those that load code (into the
/// operator when validation hands them to librdkafka, or into the relay) are
/// `core::kafka_settings::CODE_LOADING_SETTINGS`, refused too.
const FORBIDDEN_PRODUCER_SETTINGS: [&str; 3] = ["transactional.id", "bootstrap.servers", "enable.gapless.guarantee"];
/// librdkafka's other names for settings checked here.
const PRODUCER_ALIASES: [(&str, &str); 3] = [
    ("request.required.acks", "acks"),
    ("max.in.flight", "max.in.flight.requests.per.connection"),
    ("metadata.broker.list", "bootstrap.servers"),
];

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
    /// Kafka's producer settings (defaults with broker Nats).
    pub producer: ValidProducer,
    /// Set with broker Nats: the relay publishes there, not to Kafka.
    pub nats: Option<super::ValidNats>,
    /// Set with broker Rabbitmq: the relay publishes there.
    pub rabbitmq: Option<super::ValidRabbitmq>,
    pub topic_template: TopicTemplate,
    pub key: OutboxColumn,
    /// Topics lockstep creates and keeps configured, as the topic plan wants them.
    pub topics: Vec<Desired>,
    pub replicas: i32,
    /// Key-hash buckets (`crate::tables::buckets`); 1: one active relay.
    pub buckets: u16,
    pub batch_size: i32,
    pub max_attempts: i32,
    pub poll_interval: StdDuration,
    /// The longest wait between reads under a steady flow (`relay::gather`).
    pub max_gather: StdDuration,
    pub cleanup: Cleanup,
    pub published_retention: Option<StdDuration>,
    pub max_oldest_age: StdDuration,
    /// The relay image the spec names; None: the operator's default.
    pub image: Option<String>,
    /// The relay container's resources as the spec gives them; None: lockstep's defaults.
    pub resources: Option<ResourceRequirements>,
    /// Relaying stopped: the relay Deployment is scaled to 0 (`replicas` keeps the asked count).
    pub paused: bool,
    /// The headers each message carries (`relay::headers`).
    pub headers: HeaderSet,
    /// `ce_source` as the spec gives it; None: derived from the table.
    pub cloud_events_source: Option<String>,
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
        let super::nats::Blocks { kafka, nats, rabbitmq } = self.validate_broker(&mut p);
        let topic_template = p.check("spec.routing.topic", TopicTemplate::parse(&self.routing.topic));
        validate_topics(&self.topics, &mut p);
        let relay = validate_relay(&self.relay, &mut p);
        let max_oldest_age = p.check("spec.lag.maxOldestAge", self.lag.max_oldest_age.parse_positive());

        let (r, pr) = (&self.relay, &kafka.producer);
        p.finish(|| {
            let RelayTimes {
                poll_interval,
                max_gather,
                published_retention,
            } = relay?;
            Some(ValidOutboxRelay {
                table: table?,
                dead_letter_table: dead_letter_table?,
                url_secret: self.database.url_secret_ref.clone(),
                manage_schema: self.database.manage_schema,
                bootstrap_servers: kafka.bootstrap_servers.clone(),
                auth_secret: kafka.auth_secret_ref.as_ref().map(|r| r.name.clone()),
                producer: ValidProducer {
                    linger_ms: pr.linger_ms,
                    compression: pr.compression,
                    config: pr.config.clone(),
                },
                nats: match nats {
                    Some(n) => Some(n?),
                    None => None,
                },
                rabbitmq: match rabbitmq {
                    Some(r) => Some(r?),
                    None => None,
                },
                topic_template: topic_template?,
                key: self.routing.key,
                topics: self.topics.iter().map(TopicSpec::desired).collect(),
                replicas: r.replicas,
                batch_size: r.batch_size,
                max_attempts: r.max_attempts,
                buckets: u16::try_from(r.buckets).unwrap_or(1),
                poll_interval,
                max_gather,
                cleanup: r.cleanup,
                published_retention,
                max_oldest_age: max_oldest_age?,
                image: r.image.clone(),
                resources: r.resources.clone(),
                paused: r.paused,
                headers: r.headers,
                cloud_events_source: r.cloud_events.as_ref().and_then(|c| c.source.clone()),
            })
        })
    }
}

pub(super) fn validate_kafka(k: &KafkaSpec, p: &mut Problems) {
    if k.bootstrap_servers.trim().is_empty() {
        p.add("spec.kafka.bootstrapServers", "must name at least one host:port");
    }
    if !k.bootstrap_servers.trim().is_empty() {
        for (i, server) in k.bootstrap_servers.split(',').map(str::trim).enumerate() {
            if server.is_empty() {
                p.add("spec.kafka.bootstrapServers", format!("entry {i} is empty (a stray comma?)"));
            } else if !valid_host_port(server) {
                p.add("spec.kafka.bootstrapServers", format!("entry {i} ({server:?}) is not host:port"));
            }
        }
    }
    if let Some(a) = &k.auth_secret_ref {
        validate_object_name(&a.name, p, "spec.kafka.authSecretRef.name");
    }
    let pr = &k.producer;
    p.range("spec.kafka.producer.lingerMs", pr.linger_ms, 0, 60_000);
    if pr.config.len() > super::MAX_CONFIG_KEYS as usize {
        // The schema refuses this too; per-key messages would only repeat it 65 times.
        p.add("spec.kafka.producer.config", format!("at most {} settings", super::MAX_CONFIG_KEYS));
        return;
    }
    for (given, value) in &pr.config {
        let field = format!("spec.kafka.producer.config[{given}]");
        let key = PRODUCER_ALIASES
            .iter()
            .find(|(a, _)| a == given)
            .map_or(given.as_str(), |(_, k)| *k);
        if let Some((_, allowed)) = FORCED_PRODUCER_SETTINGS.iter().find(|(k, _)| *k == key) {
            if !allowed.contains(&value.as_str()) {
                p.add(
                    field,
                    format!("{key}={value} would weaken delivery; lockstep forces {key}={}", allowed[0]),
                );
            }
        } else if FORBIDDEN_PRODUCER_SETTINGS.contains(&key) {
            p.add(field, format!("{key} is managed by lockstep and cannot be set"));
        } else if crate::core::kafka_settings::CODE_LOADING_SETTINGS.contains(&key.to_ascii_lowercase().as_str()) {
            p.add(field, format!("{key} loads code or runs a command, which lockstep refuses"));
        } else if key == "max.in.flight.requests.per.connection" && !value.parse::<u32>().is_ok_and(|n| (1..=5).contains(&n)) {
            p.add(field, format!("must be 1 to 5 with the idempotent producer (got {value:?})"));
        } else if let Some(refused) = librdkafka_refuses(given, value) {
            p.add(field, refused);
        }
    }
}

/// Why librdkafka refuses a setting (an unknown key, a value out of range), without the value:
/// the relay would otherwise fail at start with it. librdkafka echoes values, so it is scrubbed.
fn librdkafka_refuses(key: &str, value: &str) -> Option<String> {
    use rdkafka::{error::KafkaError, types::RDKafkaConfRes};
    // Values are quoted in librdkafka's messages: replacing the quoted form leaves a short value
    // that also occurs in the key's name ("1" in "k1") alone.
    let quoted = format!("\"{value}\"");
    match rdkafka::ClientConfig::new().set(key, value).create_native_config() {
        Ok(_) => None,
        Err(KafkaError::ClientConfig(RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN, ..)) => Some(format!("librdkafka has no setting {key:?}")),
        Err(KafkaError::ClientConfig(_, description, _, _)) => Some(format!(
            "librdkafka refuses the value: {}",
            crate::core::kafka_settings::scrub(&description, [quoted.as_str(), value])
        )),
        Err(e) => Some(crate::core::kafka_settings::scrub(&e.to_string(), [quoted.as_str(), value])),
    }
}

fn validate_topics(topics: &[TopicSpec], p: &mut Problems) {
    let mut seen = std::collections::BTreeSet::new();
    for (i, t) in topics.iter().enumerate() {
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
}

/// The relay's durations, parsed.
struct RelayTimes {
    poll_interval: StdDuration,
    max_gather: StdDuration,
    published_retention: Option<StdDuration>,
}

/// The relay's settings; its durations when they parse.
fn validate_relay(r: &RelaySpec, p: &mut Problems) -> Option<RelayTimes> {
    p.range("spec.relay.replicas", r.replicas, 0, 10);
    p.range("spec.relay.batchSize", r.batch_size, 1, 10_000);
    p.range("spec.relay.maxAttempts", r.max_attempts, 1, 1000);
    p.range("spec.relay.buckets", r.buckets, 1, i32::from(MAX_BUCKETS));
    let poll_interval = p.check("spec.relay.pollInterval", r.poll_interval.parse());
    if let Some(pi) = poll_interval {
        if pi < StdDuration::from_millis(10) || pi > StdDuration::from_secs(3600) {
            p.add(
                "spec.relay.pollInterval",
                format!("must be between 10ms and 1h (got {})", r.poll_interval),
            );
        }
    }
    let max_gather = p.check("spec.relay.maxGather", r.max_gather.parse());
    if max_gather.is_some_and(|g| g > StdDuration::from_secs(1)) {
        p.add(
            "spec.relay.maxGather",
            format!(
                "must be at most 1s (got {}); a longer wait is what pollInterval is for",
                r.max_gather
            ),
        );
    }
    let published_retention = match (r.cleanup, &r.published_retention) {
        (Cleanup::MarkPublished, None) => {
            p.add("spec.relay.publishedRetention", "required when cleanup is MarkPublished");
            None
        }
        (_, Some(d)) => p.check("spec.relay.publishedRetention", d.parse_positive()),
        (Cleanup::Delete, None) => None,
    };
    validate_resources(r.resources.as_ref(), p);
    validate_cloud_events(r, p);
    if matches!(&r.image, Some(i) if i.trim().is_empty()) {
        p.add("spec.relay.image", "must not be empty; omit it to use the operator's image");
    } else if matches!(&r.image, Some(i) if i.contains(char::is_whitespace)) {
        p.add("spec.relay.image", "must not contain whitespace (an image reference has none)");
    }
    Some(RelayTimes {
        poll_interval: poll_interval?,
        max_gather: max_gather?,
        published_retention,
    })
}

/// A source is a URI reference: printable ASCII, no spaces (a URI has none unencoded).
fn validate_cloud_events(r: &RelaySpec, p: &mut Problems) {
    let Some(c) = &r.cloud_events else { return };
    if r.headers != HeaderSet::CloudEvents {
        p.add("spec.relay.cloudEvents", "applies only with headers: cloudevents");
    }
    if let Some(s) = &c.source {
        if s.is_empty() || s.len() > 1024 || !s.bytes().all(|b| b.is_ascii_graphic()) {
            p.add(
                "spec.relay.cloudEvents.source",
                "must be a URI reference of 1 to 1024 printable ASCII characters, without spaces",
            );
        }
    }
}

/// Quantities that parse, and requests no larger than limits (the pods would be refused).
fn validate_resources(r: Option<&ResourceRequirements>, p: &mut Problems) {
    let Some(r) = r else { return };
    let mut parsed = |kind: &str, m: &Option<BTreeMap<String, Quantity>>| -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (name, q) in m.iter().flatten() {
            let standard =
                ["cpu", "memory", "ephemeral-storage"].contains(&name.as_str()) || name.starts_with("hugepages-") || name.contains('/');
            if !standard {
                p.add(
                    format!("spec.relay.resources.{kind}[{name}]"),
                    "is not a resource a container can ask for (cpu, memory, ephemeral-storage, hugepages-*, or domain/name)",
                );
                continue;
            }
            match crate::core::quantity::parse(&q.0) {
                Some(v) if v < 0.0 => p.add(format!("spec.relay.resources.{kind}[{name}]"), format!("{:?} is negative", q.0)),
                Some(v) => {
                    out.insert(name.clone(), v);
                }
                None => p.add(
                    format!("spec.relay.resources.{kind}[{name}]"),
                    format!("{:?} is not a quantity (e.g. 500m, 128Mi, 1Gi)", q.0),
                ),
            }
        }
        out
    };
    let limits = parsed("limits", &r.limits);
    let requests = parsed("requests", &r.requests);
    for (name, req) in &requests {
        if limits.get(name).is_some_and(|lim| req > lim) {
            p.add(
                format!("spec.relay.resources.requests[{name}]"),
                format!("is above limits[{name}]; Kubernetes refuses such a pod"),
            );
        }
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
