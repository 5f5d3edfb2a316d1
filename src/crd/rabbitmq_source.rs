//! An InboxTable's `spec.sources.rabbitmq`: the RabbitMQ queues its consumer reads, read over the
//! management API for DedupCovered (what bounds their redelivery) and `status.consumerLag`
//! (ready + unacknowledged messages).

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::common::{validate_object_name, SecretRef};
use crate::core::validation::Problems;

/// RabbitMQ queues an inbox deduplicates.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RabbitmqSourceSpec {
    /// The management plugin's HTTP API: http://host:15672 or https://...
    #[schemars(length(min = 1, max = 2048))]
    pub management_url: String,
    #[serde(default = "default_vhost")]
    #[schemars(length(min = 1, max = 255))]
    pub vhost: String,
    /// Secret with `user` and `password` (a user with the `monitoring` or `management` tag) and
    /// `ca.crt` for https, as an OutboxRelay's `rabbitmq.authSecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_secret_ref: Option<SecretRef>,
    /// The queues the consumer reads: their ready and unacknowledged messages are reported in
    /// `status.consumerLag` (for a Stream queue, every message it keeps: its consumers read by
    /// offset, which the management API does not show).
    #[schemars(
        length(min = 1, max = 100),
        inner(length(min = 1, max = 255), regex(pattern = r"^[a-zA-Z0-9_.:-]+$"))
    )]
    pub queues: Vec<String>,
}

fn default_vhost() -> String {
    "/".into()
}

/// The RabbitMQ queues an inbox deduplicates.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRabbitmqSource {
    pub management_url: String,
    pub vhost: String,
    pub auth_secret: Option<String>,
    pub queues: Vec<String>,
}

impl RabbitmqSourceSpec {
    pub(super) fn validate_into(&self, p: &mut Problems) -> ValidRabbitmqSource {
        const AT: &str = "spec.sources.rabbitmq";
        if let Err(e) = super::management_url_problem(&self.management_url) {
            p.add(format!("{AT}.managementUrl"), e);
        }
        if self.queues.is_empty() {
            p.add(format!("{AT}.queues"), "list at least one queue");
        }
        for (i, q) in self.queues.iter().enumerate() {
            if q.is_empty() || q.len() > 255 || !q.chars().all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c)) {
                p.add(
                    format!("{AT}.queues[{i}]"),
                    format!("{q:?} is not a queue name (letters, digits, '_', '.', ':', '-')"),
                );
            }
        }
        if let Some(a) = &self.auth_secret_ref {
            validate_object_name(&a.name, p, &format!("{AT}.authSecretRef.name"));
        }
        ValidRabbitmqSource {
            management_url: self.management_url.trim_end_matches('/').to_owned(),
            vhost: self.vhost.clone(),
            auth_secret: self.auth_secret_ref.as_ref().map(|a| a.name.clone()),
            queues: self.queues.iter().fold(Vec::new(), |mut seen, q| {
                if !seen.contains(q) {
                    seen.push(q.clone());
                }
                seen
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::crd::InboxTableSpec;

    #[test]
    fn a_rabbitmq_source_validates_and_bad_fields_are_named() {
        let spec = |source: serde_json::Value| -> InboxTableSpec {
            serde_json::from_value(serde_json::json!({
                "database": {"urlSecretRef": {"name": "db", "key": "url"}, "table": "inbox"},
                "sources": {"rabbitmq": source}
            }))
            .unwrap()
        };
        let ok = spec(serde_json::json!({"managementUrl": "http://r:15672/", "queues": ["billing", "billing"]}));
        let s = ok.validate().unwrap().rabbitmq_source.unwrap();
        assert_eq!((s.management_url.as_str(), s.vhost.as_str()), ("http://r:15672", "/"));
        assert_eq!(s.queues, ["billing"]);
        let bad = spec(serde_json::json!({"managementUrl": "http://u:pw@r:15672", "queues": ["a b"]}));
        let e = bad.validate().unwrap_err();
        let fields: Vec<&str> = e.0.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["spec.sources.rabbitmq.managementUrl", "spec.sources.rabbitmq.queues[0]"]);
        assert!(!e.to_string().contains("pw"), "{e}");
    }
}
