//! Kafka admin operations behind a small typed API: describe topics and their config, create
//! topics, change config incrementally, add partitions, delete topics.
//!
//! Config changes use IncrementalAlterConfigs, which changes only the keys named; the legacy
//! AlterConfigs replaces a topic's whole config and would drop keys other tools set. rdkafka 0.39
//! does not wrap IncrementalAlterConfigs, so [`incremental_alter_configs`] calls librdkafka's
//! through rdkafka-sys, in this one place.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, ResourceSpecifier, TopicReplication},
    client::DefaultClientContext,
    config::ClientConfig,
    consumer::{BaseConsumer, Consumer},
    error::{KafkaError, RDKafkaErrorCode},
};

use crate::core::kafka_settings::scrub;

mod cluster;
mod incremental;
mod secret_keys;
pub use incremental::{incremental_alter_configs, IncrementalError};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach the Kafka brokers at {bootstrap}: {message}")]
    Unreachable { bootstrap: String, message: String },
    #[error("the broker refused {operation} on topic {topic}: {message}")]
    Refused {
        operation: &'static str,
        topic: String,
        message: String,
    },
    #[error("invalid Kafka client settings: {0}")]
    Config(String),
}

impl AdminError {
    pub fn is_unreachable(&self) -> bool {
        matches!(self, AdminError::Unreachable { .. })
    }
}

/// The message of an error from building a Kafka client out of settings whose values are
/// `values`, with every one of those values taken out. librdkafka's config errors echo the
/// offending value (`Invalid value "..." for configuration property "..."`), and settings hold
/// secrets (ssl.key.password, sasl.password, ssl.key.pem): the message goes to logs, statuses and
/// Events, so no value may stay in it.
pub fn config_error_text<'a>(e: &KafkaError, values: impl IntoIterator<Item = &'a str>) -> String {
    match e {
        // (result, librdkafka's description, key, value): the value is dropped, the key kept whole.
        KafkaError::ClientConfig(_, desc, key, _) => format!("{key}: {}", scrub(desc, values)),
        other => scrub(&other.to_string(), values),
    }
}

/// A topic as the broker describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedTopic {
    pub partitions: i32,
    /// Replicas of partition 0 (None when the broker does not say).
    pub replication_factor: Option<i32>,
    /// Config entries the broker reports (brokers differ on whether defaults are included).
    pub config: BTreeMap<String, String>,
}

pub struct Admin {
    admin: Arc<AdminClient<DefaultClientContext>>,
    metadata: Arc<BaseConsumer>,
    bootstrap: String,
    timeout: Duration,
}

impl Admin {
    /// `settings` are extra librdkafka settings (SASL/TLS); they may hold secrets and are never logged.
    pub fn new(bootstrap: &str, settings: &BTreeMap<String, String>, timeout: Duration) -> Result<Self, AdminError> {
        secret_keys::refuse_code_loading(settings)?;
        let mut cfg = ClientConfig::new();
        for (k, v) in settings {
            cfg.set(k, v);
        }
        cfg.set("bootstrap.servers", bootstrap)
            .set("socket.timeout.ms", (timeout.as_millis() as u64).max(1000).to_string());
        let config_error = |e: KafkaError| AdminError::Config(config_error_text(&e, settings.values().map(String::as_str)));
        let admin = cfg.create().map_err(config_error)?;
        let metadata = cfg.create().map_err(config_error)?;
        Ok(Admin {
            admin: Arc::new(admin),
            metadata: Arc::new(metadata),
            bootstrap: bootstrap.to_owned(),
            timeout,
        })
    }

    fn opts(&self) -> AdminOptions {
        AdminOptions::new()
            .request_timeout(Some(self.timeout))
            .operation_timeout(Some(self.timeout))
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> AdminError {
        AdminError::Unreachable {
            bootstrap: self.bootstrap.clone(),
            message: e.to_string(),
        }
    }

    /// Describe topics; a topic that does not exist is absent from the result. A topic the
    /// broker reports with another error (no leader yet, say) is an error, not an absence: read as
    /// absent, it would be created again, or reported as not found. Metadata is asked for the
    /// named topics only (one request each: librdkafka takes one topic or all), never for every
    /// topic of the cluster.
    pub async fn describe(&self, names: &[String]) -> Result<BTreeMap<String, ObservedTopic>, AdminError> {
        let consumer = self.metadata.clone();
        let timeout = self.timeout;
        let wanted = names.to_vec();
        let (md, failing) = tokio::task::spawn_blocking(move || {
            let fetched = wanted
                .iter()
                .map(|name| consumer.fetch_metadata(Some(name), timeout).map(|m| (name, m)))
                .collect::<Result<Vec<_>, KafkaError>>();
            crate::clients::consumer_lag::serve_queued_events(&consumer);
            let mut present = BTreeMap::new();
            let mut failing = BTreeMap::new();
            for (name, m) in fetched? {
                for t in m.topics().iter().filter(|t| t.name() == name) {
                    match t.error() {
                        None => {
                            let replicas = t.partitions().first().map(|p| p.replicas().len() as i32);
                            present.insert(t.name().to_owned(), (t.partitions().len() as i32, replicas));
                        }
                        Some(e) if RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition => {}
                        Some(e) => {
                            failing.insert(t.name().to_owned(), RDKafkaErrorCode::from(e));
                        }
                    }
                }
            }
            Ok::<_, KafkaError>((present, failing))
        })
        .await
        .map_err(|e| self.unreachable(e))?
        .map_err(|e| self.unreachable(e))?;
        if let Some((name, e)) = names.iter().find_map(|n| failing.get(n).map(|e| (n, e))) {
            return Err(self.unreachable(format!("topic {name}: {e}")));
        }
        let present: Vec<&String> = names.iter().filter(|n| md.contains_key(*n)).collect();
        let mut out = BTreeMap::new();
        if present.is_empty() {
            return Ok(out);
        }
        let specs: Vec<ResourceSpecifier> = present.iter().map(|n| ResourceSpecifier::Topic(n.as_str())).collect();
        let described = self
            .admin
            .describe_configs(specs.iter(), &self.opts())
            .await
            .map_err(|e| self.unreachable(e))?;
        for (name, res) in present.into_iter().zip(described) {
            let res = res.map_err(|e| AdminError::Refused {
                operation: "DescribeConfigs",
                topic: name.clone(),
                message: e.to_string(),
            })?;
            let config = res.entries.into_iter().filter_map(|e| e.value.map(|v| (e.name, v))).collect();
            let (partitions, replication_factor) = md[name];
            out.insert(
                name.clone(),
                ObservedTopic {
                    partitions,
                    replication_factor,
                    config,
                },
            );
        }
        Ok(out)
    }

    pub async fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        replication_factor: i32,
        config: &BTreeMap<String, String>,
    ) -> Result<(), AdminError> {
        let mut t = NewTopic::new(name, partitions, TopicReplication::Fixed(replication_factor));
        for (k, v) in config {
            t = t.set(k, v);
        }
        let r = self
            .admin
            .create_topics([&t], &self.opts())
            .await
            .map_err(|e| self.unreachable(e))?;
        match r.into_iter().next() {
            Some(Ok(_)) | None => Ok(()),
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(()),
            Some(Err((_, code))) => Err(AdminError::Refused {
                operation: "CreateTopics",
                topic: name.into(),
                message: code.to_string(),
            }),
        }
    }

    /// Delete a topic; one that is already gone counts as deleted.
    pub async fn delete_topic(&self, name: &str) -> Result<(), AdminError> {
        let r = self
            .admin
            .delete_topics(&[name], &self.opts())
            .await
            .map_err(|e| self.unreachable(e))?;
        match r.into_iter().next() {
            Some(Ok(_)) | None | Some(Err((_, RDKafkaErrorCode::UnknownTopicOrPartition))) => Ok(()),
            Some(Err((_, code))) => Err(AdminError::Refused {
                operation: "DeleteTopics",
                topic: name.into(),
                message: code.to_string(),
            }),
        }
    }

    /// Set `set` keys on a topic and leave every other key as it is.
    pub async fn alter_configs(&self, topic: &str, set: &[(String, String)]) -> Result<(), AdminError> {
        let admin = self.admin.clone();
        let (topic_owned, set_owned, timeout) = (topic.to_owned(), set.to_vec(), self.timeout);
        tokio::task::spawn_blocking(move || incremental_alter_configs(&admin, &topic_owned, &set_owned, timeout, false))
            .await
            .map_err(|e| self.unreachable(e))?
            .map_err(|e| match e {
                IncrementalError::Timeout | IncrementalError::Transport(_) => self.unreachable(e),
                other => AdminError::Refused {
                    operation: "IncrementalAlterConfigs",
                    topic: topic.into(),
                    message: other.to_string(),
                },
            })
    }

    pub async fn create_partitions(&self, topic: &str, total: i32) -> Result<(), AdminError> {
        let p = NewPartitions::new(topic, total as usize);
        let r = self
            .admin
            .create_partitions([&p], &self.opts())
            .await
            .map_err(|e| self.unreachable(e))?;
        match r.into_iter().next() {
            Some(Err((_, code))) => Err(AdminError::Refused {
                operation: "CreatePartitions",
                topic: topic.into(),
                message: code.to_string(),
            }),
            _ => Ok(()),
        }
    }
}

/// Admin clients shared per (bootstrap servers, settings); settings may hold credentials, so the
/// key is a hash.
#[derive(Default)]
pub struct AdminCache {
    admins: crate::clients::cache::IdleCache<Arc<Admin>>,
}

impl AdminCache {
    pub fn get(&self, bootstrap: &str, settings: &BTreeMap<String, String>) -> Result<Arc<Admin>, AdminError> {
        let key = crate::clients::cache::digest([bootstrap], settings);
        self.admins
            .get_or_try_insert(key, || Ok(Arc::new(Admin::new(bootstrap, settings, Duration::from_secs(5))?)))
    }

    /// Forget clients no resource asked for in `idle` (rotated credentials, a mistyped address).
    pub fn evict_idle(&self, idle: Duration) -> usize {
        self.admins.evict_idle(idle)
    }

    pub fn len(&self) -> usize {
        self.admins.len()
    }

    pub fn is_empty(&self) -> bool {
        self.admins.is_empty()
    }
}
