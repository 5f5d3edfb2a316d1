//! `spec.broker: Rabbitmq`: the RabbitMQ server an OutboxRelay publishes to, the Secret with its
//! credentials, and the exchange, queues and bindings lockstep declares and keeps as specified.

use std::{collections::BTreeSet, time::Duration as StdDuration};

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::rabbitmq_queue::{DesiredQueue, QueueSpec};
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

/// The exchange as a validated spec wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredExchange {
    pub name: String,
    pub type_: ExchangeType,
    pub durable: bool,
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

#[cfg(test)]
#[path = "rabbitmq_tests.rs"]
mod tests;
