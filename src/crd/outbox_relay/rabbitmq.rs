//! `spec.broker: Rabbitmq`: the RabbitMQ server an OutboxRelay publishes to, the Secret with its
//! credentials, and the exchange, queues and bindings lockstep declares and keeps as specified.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration as StdDuration,
};

use kube::KubeSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{
    core::{amqp_settings, duration::Duration, validation::Problems},
    crd::common::{validate_object_name, SecretRef},
};

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(!has(self.exchange) && (!has(self.queues) || size(self.queues) == 0)) || has(self.managementUrl)").message("managementUrl is required to declare an exchange or queues"))]
pub struct RabbitmqSpec {
    /// The server: amqp://host:port, or amqps://host:port for TLS. No credentials and no vhost
    /// in it (those are `authSecretRef` and `vhost`).
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// The virtual host.
    #[serde(default = "default_vhost")]
    #[schemars(length(min = 1, max = 255))]
    pub vhost: String,
    /// The management plugin's HTTP API (http://host:15672 or https://...): the operator reads
    /// queues' arguments, bindings and counts there (AMQP cannot read a queue's arguments) and
    /// declares the topology with it. Required with an exchange or queues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub management_url: Option<String>,
    /// Secret with the credentials, by key: `user` and `password` (AMQP PLAIN, and the management
    /// API's basic auth: the user needs the `management` tag, or `monitoring` without an exchange
    /// or queues to declare); `ca.crt` to trust (amqps:// and https://), `tls.crt` and `tls.key`
    /// for an AMQP client certificate. Never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_secret_ref: Option<SecretRef>,
    /// How long a publisher confirm may take before the message counts as failed and is sent again.
    #[serde(default = "default_confirm_timeout")]
    pub confirm_timeout: Duration,
    /// The exchange the relay publishes to (the routing key is `spec.routing.topic`'s result).
    /// Unset: the default exchange, where the routing key names a queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange: Option<ExchangeSpec>,
    /// Queues lockstep declares and keeps bound to the exchange.
    #[serde(default)]
    #[schemars(length(max = 100), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub queues: Vec<QueueSpec>,
}

fn default_vhost() -> String {
    "/".into()
}

fn default_confirm_timeout() -> Duration {
    Duration::new("30s")
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
pub enum ExchangeType {
    /// Routing keys matched against binding patterns (`*` one word, `#` any).
    #[default]
    Topic,
    /// Routing keys matched exactly.
    Direct,
}

impl ExchangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeType::Topic => "topic",
            ExchangeType::Direct => "direct",
        }
    }
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeSpec {
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[a-zA-Z0-9_.:-]+$"))]
    pub name: String,
    #[serde(default, rename = "type")]
    pub type_: ExchangeType,
    /// Survives a broker restart. Fixed once the exchange exists.
    #[serde(default = "yes")]
    pub durable: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
pub enum QueueType {
    /// Replicated (Raft), durable, with a delivery limit: RabbitMQ's queue for data safety.
    #[default]
    Quorum,
    /// An append-only log consumers read by offset (kept by maxAge, not by acknowledgement).
    Stream,
    /// The classic queue (not replicated).
    Classic,
}

impl QueueType {
    /// As `x-queue-type` has it.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Stream => "stream",
            QueueType::Classic => "classic",
        }
    }
}

/// The queue settings another tool (a policy) may own (`ignore`), with their arguments.
pub const QUEUE_SETTINGS: [(&str, &str); 5] = [
    ("messageTtl", "x-message-ttl"),
    ("deliveryLimit", "x-delivery-limit"),
    ("deadLetterExchange", "x-dead-letter-exchange"),
    ("maxLength", "x-max-length"),
    ("maxAge", "x-max-age"),
];

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.deliveryLimit) || self.type == 'Quorum'").message("deliveryLimit needs a Quorum queue"))]
#[x_kube(validation = Rule::new("!has(self.maxAge) || self.type == 'Stream'").message("maxAge is a Stream's; queues expire messages with messageTtl"))]
#[x_kube(validation = Rule::new("self.type != 'Stream' || (!has(self.messageTtl) && !has(self.deadLetterExchange) && !has(self.maxLength))").message("a Stream has no messageTtl, maxLength or dead-lettering; use maxAge"))]
pub struct QueueSpec {
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[a-zA-Z0-9_.:-]+$"))]
    pub name: String,
    /// Fixed once the queue exists.
    #[serde(default, rename = "type")]
    pub type_: QueueType,
    /// Routing-key patterns binding the queue to `exchange` (with a Topic exchange: `*` one word,
    /// `#` zero or more).
    #[serde(default)]
    #[schemars(length(max = 100), inner(length(min = 1, max = 255)))]
    pub bindings: Vec<String>,
    /// Messages older than this are dropped or dead-lettered (`x-message-ttl`). Also bounds how
    /// long a message can be redelivered (DedupCovered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_ttl: Option<Duration>,
    /// Deliveries of a message before it is dead-lettered or dropped (`x-delivery-limit`; Quorum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub delivery_limit: Option<i64>,
    /// Where expired, rejected and over-delivered messages go (`x-dead-letter-exchange`);
    /// declared (fanout, durable) when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[a-zA-Z0-9_.:-]+$"))]
    pub dead_letter_exchange: Option<String>,
    /// A Quorum queue declared and bound to `deadLetterExchange` to keep dead letters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[a-zA-Z0-9_.:-]+$"))]
    pub dead_letter_queue: Option<String>,
    /// The most messages kept (`x-max-length`; not a Stream's); the oldest are dropped (or
    /// dead-lettered) beyond it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_length: Option<i64>,
    /// A Stream's retention (`x-max-age`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<Duration>,
    /// Settings owned by someone else (a policy): never declared or compared (messageTtl,
    /// deliveryLimit, deadLetterExchange, maxLength, maxAge).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5), inner(length(min = 1, max = 32)))]
    pub ignore: Vec<String>,
}

/// The exchange as a validated spec wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredExchange {
    pub name: String,
    pub type_: ExchangeType,
    pub durable: bool,
}

/// A queue as a validated spec wants it.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredQueue {
    pub name: String,
    pub type_: QueueType,
    pub bindings: Vec<String>,
    /// The `x-` arguments to declare, `x-queue-type` and ignored settings left out.
    pub arguments: BTreeMap<String, Value>,
    /// Spec names of the settings another tool owns.
    pub ignore: BTreeSet<String>,
    pub dead_letter_exchange: Option<String>,
    pub dead_letter_queue: Option<String>,
}

/// A RabbitMQ spec that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRabbitmq {
    /// The relay's `--amqp-url`: the server with the vhost as its path.
    pub url: String,
    pub vhost: String,
    pub management_url: Option<String>,
    pub auth_secret: Option<String>,
    pub confirm_timeout: StdDuration,
    pub exchange: Option<DesiredExchange>,
    pub queues: Vec<DesiredQueue>,
}

impl ValidRabbitmq {
    /// The exchange's name ("" for the default exchange), as the relay's `--amqp-exchange`.
    pub fn exchange_name(&self) -> &str {
        self.exchange.as_ref().map_or("", |e| e.name.as_str())
    }
}

/// `s` with every byte but unreserved URL characters percent-encoded (a vhost in a URL path).
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A duration as `x-max-age` takes it: seconds in the largest whole unit (D, h, m, s).
pub fn max_age_text(d: StdDuration) -> String {
    let s = d.as_secs().max(1);
    match s {
        s if s % 86_400 == 0 => format!("{}D", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The seconds an `x-max-age` value means (Y, M, D, h, m, s units), if it is one.
pub fn max_age_secs(text: &str) -> Option<u64> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().ok()?;
    let f = match unit {
        "Y" => 365 * 86_400,
        "M" => 30 * 86_400,
        "D" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return None,
    };
    Some(n * f)
}

impl RabbitmqSpec {
    pub(super) fn validate_into(&self, p: &mut Problems) -> Option<ValidRabbitmq> {
        let url = self.url.trim();
        match amqp_settings::server_host_port(url) {
            Err(e) => p.add("spec.rabbitmq.url", e),
            Ok(_) if url.split_once("://").is_some_and(|(_, rest)| rest.contains(['/', '?'])) => p.add(
                "spec.rabbitmq.url",
                "give only amqp://host:port (or amqps://); the vhost goes in spec.rabbitmq.vhost",
            ),
            Ok(_) => {}
        }
        if let Some(m) = &self.management_url {
            if let Err(e) = management_url_problem(m) {
                p.add("spec.rabbitmq.managementUrl", e);
            }
        }
        let declares = self.exchange.is_some() || !self.queues.is_empty();
        if declares && self.management_url.is_none() {
            p.add(
                "spec.rabbitmq.managementUrl",
                "required to declare an exchange or queues (the operator reads queue arguments over the management API)",
            );
        }
        if let Some(a) = &self.auth_secret_ref {
            validate_object_name(&a.name, p, "spec.rabbitmq.authSecretRef.name");
        }
        let confirm_timeout = p.check("spec.rabbitmq.confirmTimeout", self.confirm_timeout.parse_positive());
        if let Some(e) = &self.exchange {
            if let Some(m) = amqp_settings::exchange_problem(&e.name) {
                p.add("spec.rabbitmq.exchange.name", m);
            }
        }
        let mut seen = BTreeSet::new();
        let queues: Vec<Option<DesiredQueue>> = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let at = format!("spec.rabbitmq.queues[{i}]");
                if !seen.insert(q.name.as_str()) {
                    p.add(format!("{at}.name"), format!("queue {:?} is listed twice", q.name));
                }
                if self.exchange.is_none() && !q.bindings.is_empty() {
                    p.add(
                        format!("{at}.bindings"),
                        "bindings need spec.rabbitmq.exchange (the default exchange cannot be bound)",
                    );
                }
                q.validate_into(p, &at)
            })
            .collect();
        Some(ValidRabbitmq {
            url: format!("{}/{}", url.trim_end_matches('/'), url_encode(&self.vhost)),
            vhost: self.vhost.clone(),
            management_url: self.management_url.as_ref().map(|m| m.trim_end_matches('/').to_owned()),
            auth_secret: self.auth_secret_ref.as_ref().map(|a| a.name.clone()),
            confirm_timeout: confirm_timeout?,
            exchange: self.exchange.as_ref().map(|e| DesiredExchange {
                name: e.name.clone(),
                type_: e.type_,
                durable: e.durable,
            }),
            queues: queues.into_iter().collect::<Option<_>>()?,
        })
    }
}

/// Why `url` cannot be the management API's address, if it cannot. Never echoes credentials.
pub fn management_url_problem(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or("not an http:// or https:// URL")?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.contains('@') {
        return Err("must not hold credentials: give them in authSecretRef".into());
    }
    if host.is_empty() {
        return Err("no host".into());
    }
    Ok(())
}

impl QueueSpec {
    fn validate_into(&self, p: &mut Problems, at: &str) -> Option<DesiredQueue> {
        for k in &self.ignore {
            if !QUEUE_SETTINGS.iter().any(|(s, _)| s == k) {
                let names: Vec<&str> = QUEUE_SETTINGS.iter().map(|(s, _)| *s).collect();
                p.add(format!("{at}.ignore"), format!("{k:?} is not one of {}", names.join(", ")));
            }
        }
        let (quorum, stream) = (self.type_ == QueueType::Quorum, self.type_ == QueueType::Stream);
        if self.delivery_limit.is_some() && !quorum {
            p.add(format!("{at}.deliveryLimit"), "only a Quorum queue has a delivery limit");
        }
        if self.max_age.is_some() && !stream {
            p.add(
                format!("{at}.maxAge"),
                "maxAge is a Stream's; a queue expires messages with messageTtl",
            );
        }
        if stream && (self.message_ttl.is_some() || self.dead_letter_exchange.is_some() || self.max_length.is_some()) {
            p.add(
                format!("{at}.type"),
                "a Stream has no messageTtl, maxLength or dead-lettering; use maxAge",
            );
        }
        if self.dead_letter_queue.is_some() && self.dead_letter_exchange.is_none() {
            p.add(format!("{at}.deadLetterQueue"), "needs deadLetterExchange");
        }
        for (j, b) in self.bindings.iter().enumerate() {
            if b.len() > amqp_settings::MAX_SHORT_STRING || b.is_empty() {
                p.add(format!("{at}.bindings[{j}]"), "a routing-key pattern is 1 to 255 bytes");
            }
        }
        let ttl = self
            .message_ttl
            .as_ref()
            .and_then(|d| p.check(format!("{at}.messageTtl"), d.parse_positive()));
        let age = self
            .max_age
            .as_ref()
            .and_then(|d| p.check(format!("{at}.maxAge"), d.parse_positive()));
        if ttl.is_some_and(|t| t.as_millis() > u32::MAX as u128) {
            p.add(format!("{at}.messageTtl"), "at most 49d (RabbitMQ takes 2^32-1 ms)");
        }
        let ignored = |k: &str| self.ignore.iter().any(|i| i == k);
        let mut args = BTreeMap::new();
        let mut put = |spec: &str, arg: &str, v: Option<Value>| {
            if let Some(v) = v.filter(|_| !ignored(spec)) {
                args.insert(arg.to_owned(), v);
            }
        };
        put("messageTtl", "x-message-ttl", ttl.map(|t| json!(t.as_millis() as u64)));
        put("deliveryLimit", "x-delivery-limit", self.delivery_limit.map(|n| json!(n)));
        put(
            "deadLetterExchange",
            "x-dead-letter-exchange",
            self.dead_letter_exchange.clone().map(Value::from),
        );
        put("maxLength", "x-max-length", self.max_length.map(|n| json!(n)));
        put("maxAge", "x-max-age", age.map(|a| Value::from(max_age_text(a))));
        let bad_ttl = self.message_ttl.is_some() && ttl.is_none();
        let bad_age = self.max_age.is_some() && age.is_none();
        (!bad_ttl && !bad_age).then(|| DesiredQueue {
            name: self.name.clone(),
            type_: self.type_,
            bindings: self.bindings.clone(),
            arguments: args,
            ignore: self.ignore.iter().cloned().collect(),
            dead_letter_exchange: self.dead_letter_exchange.clone(),
            dead_letter_queue: self.dead_letter_queue.clone(),
        })
    }
}

#[cfg(test)]
#[path = "rabbitmq_tests.rs"]
mod tests;
