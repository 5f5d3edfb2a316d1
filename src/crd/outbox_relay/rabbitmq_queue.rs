//! A queue of `spec.rabbitmq.queues`: its type, bindings and the settings that bound its
//! messages, given as `x-` arguments (fixed once the queue exists) or by a policy lockstep keeps
//! (`settingsBy: Policy`, changeable at any time).

use std::collections::{BTreeMap, BTreeSet};

use kube::KubeSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::rabbitmq::max_age_text;
use crate::core::{amqp_settings, duration::Duration, validation::Problems};

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

/// How a queue's messageTtl, deliveryLimit, deadLetterExchange, maxLength and maxAge reach it.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
pub enum SettingsBy {
    /// `x-` arguments of the queue's declaration: RabbitMQ never changes them once the queue
    /// exists (a change is refused with what to do).
    #[default]
    Arguments,
    /// A policy lockstep declares and keeps, `lockstep.<queue>`, matching this queue alone: a
    /// change of the spec changes the policy, and the queue follows at once.
    Policy,
}

/// The priority of lockstep's queue policies unless `policyPriority` says otherwise: above the
/// catch-all policies (priority 0) clusters often have. One policy applies to a queue, the
/// highest-priority one that matches.
pub const DEFAULT_POLICY_PRIORITY: i64 = 10;

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
#[x_kube(validation = Rule::new("!has(self.policyPriority) || self.settingsBy == 'Policy'").message("policyPriority is for settingsBy Policy"))]
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
    /// How the settings above reach the queue: `Arguments` (fixed once it exists) or `Policy` (a
    /// policy `lockstep.<queue>` lockstep keeps; changeable at any time).
    #[serde(default)]
    pub settings_by: SettingsBy,
    /// The priority of the queue's policy (settingsBy Policy; default 10): only the matching
    /// policy of the highest priority applies to a queue, so keep it above other policies that
    /// match this queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub policy_priority: Option<i64>,
    /// Settings owned by someone else (a policy): never declared or compared (messageTtl,
    /// deliveryLimit, deadLetterExchange, maxLength, maxAge).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5), inner(length(min = 1, max = 32)))]
    pub ignore: Vec<String>,
}

/// A queue as a validated spec wants it.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredQueue {
    pub name: String,
    pub type_: QueueType,
    pub bindings: Vec<String>,
    /// The `x-` arguments to declare, `x-queue-type`, ignored settings and the policy's left out.
    pub arguments: BTreeMap<String, Value>,
    /// The policy that gives the settings (settingsBy Policy).
    pub policy: Option<DesiredPolicy>,
    /// Spec names of the settings another tool owns.
    pub ignore: BTreeSet<String>,
    pub dead_letter_exchange: Option<String>,
    pub dead_letter_queue: Option<String>,
}

/// A queue's policy as lockstep declares it: applied to queues, matching one name.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredPolicy {
    pub name: String,
    pub pattern: String,
    pub priority: i64,
    /// `message-ttl`, `delivery-limit`, ...: each argument's name without its `x-`.
    pub definition: BTreeMap<String, Value>,
}

impl DesiredQueue {
    /// A setting by its argument's name (`x-message-ttl`), from the arguments or the policy.
    pub fn setting(&self, arg: &str) -> Option<&Value> {
        let by_policy = || self.policy.as_ref()?.definition.get(arg.strip_prefix("x-")?);
        self.arguments.get(arg).or_else(by_policy)
    }
}

/// The name of a queue's policy.
pub fn policy_name(queue: &str) -> String {
    format!("lockstep.{queue}")
}

/// The pattern matching `queue` alone (queue names hold `[a-zA-Z0-9_.:-]`: only `.` is special).
pub fn policy_pattern(queue: &str) -> String {
    format!("^{}$", queue.replace('.', "\\."))
}

impl QueueSpec {
    pub(super) fn validate_into(&self, p: &mut Problems, at: &str) -> Option<DesiredQueue> {
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
        if self.policy_priority.is_some() && self.settings_by != SettingsBy::Policy {
            p.add(format!("{at}.policyPriority"), "policyPriority is for settingsBy Policy");
        }
        // A policy with nothing in it is refused by RabbitMQ ("no policy provided"): none then.
        let by_policy = self.settings_by == SettingsBy::Policy && !args.is_empty();
        let policy = by_policy.then(|| DesiredPolicy {
            name: policy_name(&self.name),
            pattern: policy_pattern(&self.name),
            priority: self.policy_priority.unwrap_or(DEFAULT_POLICY_PRIORITY),
            definition: std::mem::take(&mut args)
                .into_iter()
                .map(|(k, v)| (k.trim_start_matches("x-").to_owned(), v))
                .collect(),
        });
        (!bad_ttl && !bad_age).then(|| DesiredQueue {
            name: self.name.clone(),
            type_: self.type_,
            bindings: self.bindings.clone(),
            arguments: args,
            policy,
            ignore: self.ignore.iter().cloned().collect(),
            dead_letter_exchange: self.dead_letter_exchange.clone(),
            dead_letter_queue: self.dead_letter_queue.clone(),
        })
    }
}
