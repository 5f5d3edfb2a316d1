//! `spec.broker: Nats`: the NATS servers an OutboxRelay publishes to, the Secret with their
//! credentials, and the JetStream streams lockstep declares and keeps configured.

use std::{collections::BTreeSet, time::Duration as StdDuration};

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::{KafkaSpec, OutboxRelaySpec};
use crate::{
    core::{duration::Duration, validation::Problems},
    crd::common::{validate_object_name, SecretRef},
};

/// The broker an OutboxRelay publishes to. Objects without the field mean Kafka.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
pub enum Broker {
    #[default]
    Kafka,
    Nats,
    Rabbitmq,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NatsSpec {
    /// Comma-separated server URLs: nats://host:port, or tls://host:port for TLS.
    #[schemars(length(min = 1, max = 2048))]
    pub servers: String,
    /// Secret with the credentials, by key: `user` and `password`, or `token`, or `nkey` (a
    /// seed), or `creds` (a .creds file); `ca.crt` to trust, `tls.crt` and `tls.key` for a client
    /// certificate. Never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_secret_ref: Option<SecretRef>,
    /// How long a PubAck may take before the message counts as failed and is sent again (a lost
    /// connection fails it at once; this bounds a server that stays connected and silent).
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout: Duration,
    /// Streams lockstep creates and keeps configured.
    #[serde(default)]
    #[schemars(length(max = 100), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub streams: Vec<StreamSpec>,
}

fn default_ack_timeout() -> Duration {
    Duration::new("30s")
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
pub enum StreamStorage {
    #[default]
    File,
    Memory,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
pub enum Discard {
    /// Remove the oldest messages when a limit is hit.
    #[default]
    Old,
    /// Refuse new messages when a limit is hit (the relay retries them until there is room).
    New,
}

/// The settings of a stream another tool may own (`ignore`).
pub const STREAM_SETTINGS: [&str; 5] = ["replicas", "maxAge", "duplicateWindow", "discard", "maxBytes"];

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StreamSpec {
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[a-zA-Z0-9_-]+$"))]
    pub name: String,
    /// Subjects the stream stores (wildcards allowed); the routing's subjects must fall in them.
    #[schemars(length(min = 1, max = 100), inner(length(min = 1, max = 255)))]
    pub subjects: Vec<String>,
    /// Where messages are kept. Fixed once the stream exists.
    #[serde(default)]
    pub storage: StreamStorage,
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 5))]
    pub replicas: i32,
    /// How long messages are kept; unset keeps them until another limit removes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<Duration>,
    /// How long the stream drops a resend of a message id (the relay sends the event id): a
    /// relay that resends after a crash within it adds no duplicate.
    #[serde(default = "default_duplicate_window")]
    pub duplicate_window: Duration,
    #[serde(default)]
    pub discard: Discard,
    /// The stream's size limit in bytes; unset, none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_bytes: Option<i64>,
    /// Settings owned by someone else: never changed or reverted (replicas, maxAge,
    /// duplicateWindow, discard, maxBytes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5), inner(length(min = 1, max = 32)))]
    pub ignore: Vec<String>,
}

fn default_replicas() -> i32 {
    1
}

fn default_duplicate_window() -> Duration {
    Duration::new("2m")
}

/// A stream as a validated spec wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredStream {
    pub name: String,
    pub subjects: Vec<String>,
    pub storage: StreamStorage,
    pub replicas: i32,
    /// Zero: unlimited.
    pub max_age: StdDuration,
    pub duplicate_window: StdDuration,
    pub discard: Discard,
    pub max_bytes: Option<i64>,
    pub ignore: BTreeSet<String>,
}

/// A NATS spec that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidNats {
    pub servers: Vec<String>,
    pub auth_secret: Option<String>,
    pub ack_timeout: StdDuration,
    pub streams: Vec<DesiredStream>,
}

impl NatsSpec {
    pub(super) fn validate_into(&self, p: &mut Problems) -> Option<ValidNats> {
        let servers: Vec<String> = self.servers.split(',').map(|s| s.trim().to_owned()).collect();
        for (i, s) in servers.iter().enumerate() {
            if let Err(e) = crate::core::nats_settings::server_host_port(s) {
                p.add("spec.nats.servers", format!("entry {i}: {e}"));
            }
        }
        if let Some(a) = &self.auth_secret_ref {
            validate_object_name(&a.name, p, "spec.nats.authSecretRef.name");
        }
        let ack_timeout = p.check("spec.nats.ackTimeout", self.ack_timeout.parse_positive());
        let streams: Vec<Option<DesiredStream>> = self
            .streams
            .iter()
            .enumerate()
            .map(|(i, s)| s.validate_into(p, &format!("spec.nats.streams[{i}]")))
            .collect();
        Some(ValidNats {
            servers,
            auth_secret: self.auth_secret_ref.as_ref().map(|a| a.name.clone()),
            ack_timeout: ack_timeout?,
            streams: streams.into_iter().collect::<Option<_>>()?,
        })
    }
}

impl StreamSpec {
    fn validate_into(&self, p: &mut Problems, at: &str) -> Option<DesiredStream> {
        for (j, s) in self.subjects.iter().enumerate() {
            if !crate::core::nats_settings::valid_filter_subject(s) {
                p.add(
                    format!("{at}.subjects[{j}]"),
                    format!("{s:?} is not a NATS subject (dot-separated tokens, '*' or a final '>')"),
                );
            }
        }
        for k in &self.ignore {
            if !STREAM_SETTINGS.contains(&k.as_str()) {
                p.add(
                    format!("{at}.ignore"),
                    format!("{k:?} is not one of {}", STREAM_SETTINGS.join(", ")),
                );
            }
        }
        let max_age = match &self.max_age {
            Some(d) => p.check(format!("{at}.maxAge"), d.parse_positive()),
            None => Some(StdDuration::ZERO),
        };
        let window = p.check(format!("{at}.duplicateWindow"), self.duplicate_window.parse_positive());
        if let (Some(a), Some(w)) = (max_age, window) {
            if !a.is_zero() && w > a {
                p.add(format!("{at}.duplicateWindow"), "must not exceed maxAge (the server refuses it)");
            }
        }
        Some(DesiredStream {
            name: self.name.clone(),
            subjects: self.subjects.clone(),
            storage: self.storage,
            replicas: self.replicas,
            max_age: max_age?,
            duplicate_window: window?,
            discard: self.discard,
            max_bytes: self.max_bytes,
            ignore: self.ignore.iter().cloned().collect(),
        })
    }
}

/// The broker blocks of a spec after validation: Kafka's (empty with another broker, which the
/// relay then ignores), and NATS's or RabbitMQ's with that broker (None inside when invalid).
pub(super) struct Blocks {
    pub kafka: KafkaSpec,
    pub nats: Option<Option<ValidNats>>,
    pub rabbitmq: Option<Option<super::ValidRabbitmq>>,
}

impl OutboxRelaySpec {
    pub(super) fn validate_broker(&self, p: &mut Problems) -> Blocks {
        let kafka = self.kafka.clone().unwrap_or_else(|| KafkaSpec {
            bootstrap_servers: String::new(),
            auth_secret_ref: None,
            producer: Default::default(),
        });
        let mut b = Blocks {
            kafka,
            nats: None,
            rabbitmq: None,
        };
        if self.broker != Broker::Kafka && !self.topics.is_empty() {
            let instead = match self.broker {
                Broker::Nats => "declare streams in spec.nats.streams",
                _ => "declare queues in spec.rabbitmq.queues",
            };
            p.add(
                "spec.topics",
                format!("topics are Kafka's: with broker {:?}, {instead}", self.broker),
            );
        }
        match (self.broker, &self.nats, &self.rabbitmq) {
            (Broker::Kafka, _, _) if self.kafka.is_none() => p.add("spec.kafka", "required with broker Kafka"),
            (Broker::Kafka, _, _) => super::validate::validate_kafka(&b.kafka, p),
            (Broker::Nats, None, _) => p.add("spec.nats", "required with broker Nats"),
            (Broker::Nats, Some(n), _) => b.nats = Some(n.validate_into(p)),
            (Broker::Rabbitmq, _, None) => p.add("spec.rabbitmq", "required with broker Rabbitmq"),
            (Broker::Rabbitmq, _, Some(r)) => b.rabbitmq = Some(r.validate_into(p)),
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: serde_json::Value) -> OutboxRelaySpec {
        let mut v = serde_json::json!({
            "database": {"urlSecretRef": {"name": "db", "key": "url"}, "table": "outbox"},
            "broker": "Nats",
            "nats": {"servers": "nats://nats:4222", "streams": [{"name": "orders", "subjects": ["orders.>"]}]},
            "routing": {"topic": "orders.{type}"}
        });
        json_patch::merge(&mut v, &extra);
        serde_json::from_value(v).unwrap()
    }

    fn problems(s: &OutboxRelaySpec) -> Vec<(String, String)> {
        match s.validate() {
            Ok(_) => vec![],
            Err(e) => e.0.into_iter().map(|f| (f.field, f.message)).collect(),
        }
    }

    #[test]
    fn a_nats_relay_validates_with_stream_defaults() {
        let v = spec(serde_json::json!({})).validate().unwrap();
        let n = v.nats.expect("nats");
        assert_eq!(n.servers, ["nats://nats:4222"]);
        assert_eq!(n.ack_timeout, StdDuration::from_secs(30));
        let s = &n.streams[0];
        assert_eq!(
            (s.storage, s.replicas, s.discard, s.max_age),
            (StreamStorage::File, 1, Discard::Old, StdDuration::ZERO)
        );
        assert_eq!(s.duplicate_window, StdDuration::from_secs(120));
    }

    #[test]
    fn kafka_is_the_default_broker_and_each_broker_needs_its_block() {
        let mut kafka = spec(serde_json::json!({"broker": null, "nats": null}));
        assert_eq!(kafka.broker, Broker::Kafka);
        assert_eq!(problems(&kafka)[0].0, "spec.kafka");
        kafka.kafka = Some(serde_json::from_value(serde_json::json!({"bootstrapServers": "k:9092"})).unwrap());
        assert!(kafka.validate().unwrap().nats.is_none());
        assert_eq!(problems(&spec(serde_json::json!({"nats": null})))[0].0, "spec.nats");
        let topics = spec(serde_json::json!({"topics": [{"name": "t", "partitions": 1}]}));
        assert_eq!(problems(&topics)[0].0, "spec.topics");
    }

    #[test]
    fn bad_nats_settings_are_named() {
        let bad = spec(serde_json::json!({"nats": {
            "servers": "nats://u:pw@h:4222",
            "ackTimeout": "0s",
            "streams": [{"name": "s", "subjects": ["a..b", "ok.>"], "ignore": ["storage"], "maxAge": "1m", "duplicateWindow": "2m"}]
        }}));
        let p = problems(&bad);
        let fields: Vec<&str> = p.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.nats.servers",
                "spec.nats.ackTimeout",
                "spec.nats.streams[0].subjects[0]",
                "spec.nats.streams[0].ignore",
                "spec.nats.streams[0].duplicateWindow"
            ]
        );
        assert!(!p[0].1.contains("pw"), "{}", p[0].1);
    }
}
