//! Types shared by the lockstep custom resources.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    core::sql::{Ident, QualifiedName},
    core::validation::Problems,
};

pub const GROUP: &str = "lockstep.dev";
pub const VERSION: &str = "v1alpha1";

/// Kubernetes object names (RFC 1123 subdomain).
pub const DNS_SUBDOMAIN_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// Secret data keys.
pub const SECRET_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";

/// A key in a Secret in the resource's own namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Key within the Secret.
    #[serde(default = "default_url_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY_PATTERN))]
    pub key: String,
}

fn default_url_key() -> String {
    "url".into()
}

/// A whole Secret in the resource's own namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
}

/// Where a table lives. The connection URL (postgres://...) is read from a Secret and never logged.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Secret key holding the connection URL, e.g. postgres://user:pass@host:5432/db.
    pub url_secret_ref: SecretKeyRef,
    /// Schema of the table. Immutable.
    #[serde(default = "default_schema")]
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::core::sql::IDENT_PATTERN))]
    pub schema: String,
    /// Table name. Immutable.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::core::sql::IDENT_PATTERN))]
    pub table: String,
    /// true: lockstep creates and migrates the table. false: the application owns it and lockstep
    /// only verifies it matches the contract.
    #[serde(default = "default_true")]
    pub manage_schema: bool,
}

fn default_schema() -> String {
    "public".into()
}

pub(crate) fn default_true() -> bool {
    true
}

impl DatabaseSpec {
    /// `schema.table`, as recorded in status.
    pub fn table_name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// (recorded, named now) when the spec names another table than the one the object manages.
    /// The CEL rule refuses the edit on 1.25+; older API servers store it, and this catches it.
    pub fn table_change(&self, recorded: Option<&str>) -> Option<(String, String)> {
        let now = self.table_name();
        recorded.filter(|r| *r != now).map(|r| (r.to_owned(), now))
    }

    pub(crate) fn validate_into(&self, p: &mut Problems, field: &str) -> Option<QualifiedName> {
        let schema = p.check(format!("{field}.schema"), Ident::parse(&self.schema));
        let table = p.check(format!("{field}.table"), Ident::parse(&self.table));
        validate_secret_key_ref(&self.url_secret_ref, p, &format!("{field}.urlSecretRef"));
        Some(QualifiedName {
            schema: schema?,
            table: table?,
        })
    }
}

/// A label key: an optional DNS-subdomain prefix and '/', then a name of at most 63 characters.
pub(crate) fn valid_label_key(k: &str) -> bool {
    let (prefix, name) = k.rsplit_once('/').map_or((None, k), |(p, n)| (Some(p), n));
    let prefix_ok = prefix
        .is_none_or(|p| !p.is_empty() && p.len() <= 253 && regex::Regex::new(DNS_SUBDOMAIN_PATTERN).expect("static pattern").is_match(p));
    prefix_ok && !name.is_empty() && valid_label_value(name)
}

/// A label value: empty, or up to 63 alphanumerics with '-', '_' and '.' inside.
pub(crate) fn valid_label_value(v: &str) -> bool {
    let inner = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    v.is_empty()
        || (v.len() <= 63
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric())
            && v.chars().all(inner))
}

/// A namespace name (an RFC 1123 label: no dots, at most 63 characters).
pub(crate) fn validate_namespace_name(name: &str, p: &mut Problems, field: &str) {
    let ok = name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        p.add(
            field,
            format!("{name:?} is not a namespace name (lowercase letters, digits and '-', at most 63)"),
        );
    }
}

pub(crate) fn validate_object_name(name: &str, p: &mut Problems, field: &str) {
    let re = regex::Regex::new(DNS_SUBDOMAIN_PATTERN).expect("static pattern");
    if name.is_empty() || name.len() > 253 || !re.is_match(name) {
        p.add(
            field,
            format!("{name:?} is not a valid Kubernetes object name (lowercase letters, digits, '-' and '.')"),
        );
    }
}

pub(crate) fn validate_secret_key_ref(r: &SecretKeyRef, p: &mut Problems, field: &str) {
    validate_object_name(&r.name, p, &format!("{field}.name"));
    let re = regex::Regex::new(SECRET_KEY_PATTERN).expect("static pattern");
    if r.key.is_empty() || !re.is_match(&r.key) {
        p.add(format!("{field}.key"), format!("{:?} is not a valid Secret key", r.key));
    }
}

/// What happens to tables and topics when the resource is deleted.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DeletionPolicy {
    /// Keep tables and topics (default): data outlives the resource.
    #[default]
    Retain,
    /// Drop the tables lockstep created and delete the topics it created.
    Delete,
}

/// Conditions as Kubernetes API conventions define them.
pub type Conditions = Vec<Condition>;

/// The annotation that pauses reconciling a resource.
pub const PAUSED_ANNOTATION: &str = "lockstep.dev/paused";
/// On an OutboxRelay: set to a new value (any text, e.g. a timestamp) to move every dead-lettered
/// row back into the outbox once; the value replayed last is in `status.lastReplay`.
pub const REPLAY_ANNOTATION: &str = "lockstep.dev/replay";
/// On an OutboxRelay with `deletionPolicy: Delete`: "true" lets the deletion drop the outbox
/// although some of its events were never published (or were dead-lettered).
pub const DELETE_UNPUBLISHED_ANNOTATION: &str = "lockstep.dev/delete-unpublished";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys_values_and_namespace_names() {
        for k in ["team", "lockstep.dev/test", "a.b-c_d", "x/y"] {
            assert!(valid_label_key(k), "{k}");
        }
        for k in ["", "bad key!", "/x", "x/", "-a", "UPPER.example/x", &"a".repeat(64)] {
            assert!(!valid_label_key(k), "{k}");
        }
        assert!(valid_label_value("") && valid_label_value("prod-1") && !valid_label_value("not a value!"));
        let mut p = Problems::new();
        validate_namespace_name("team-a", &mut p, "ns");
        assert!(p.finish(|| Some(())).is_ok());
        let mut p = Problems::new();
        validate_namespace_name("a.b", &mut p, "ns");
        assert!(p.finish(|| Some(())).is_err(), "a namespace has no dots");
    }

    #[test]
    fn the_validated_table_is_recorded_as_the_spec_names_it() {
        let spec: DatabaseSpec = serde_json::from_value(serde_json::json!({
            "urlSecretRef": {"name": "db"}, "schema": "billing", "table": "orders_outbox",
        }))
        .unwrap();
        let valid = spec.validate_into(&mut Problems::new(), "spec.database").unwrap();
        // status.table is written from the validated name and compared with the spec's.
        assert_eq!(valid.unquoted(), spec.table_name());
        assert_eq!(spec.table_change(Some(&valid.unquoted())), None);
    }
}
