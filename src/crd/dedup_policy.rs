//! DedupPolicy: retention bounds a platform team sets for InboxTables.
// clippy reads repeated `printcolumn(type_ = ...)` arguments of the kube derive as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{valid_label_key, valid_label_value, validate_namespace_name, validate_object_name, Conditions};
use crate::{
    core::duration::{Duration, Given},
    core::validation::{Problems, ValidationErrors},
};

#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "lockstep.dev",
    version = "v1alpha1",
    kind = "DedupPolicy",
    status = "DedupPolicyStatus",
    shortname = "ddp",
    category = "lockstep",
    cel,
    printcolumn(name = "Enforcement", type_ = "string", json_path = ".spec.enforcement"),
    printcolumn(name = "Min", type_ = "string", json_path = ".spec.minRetention"),
    printcolumn(name = "Max", type_ = "string", json_path = ".spec.maxRetention"),
    printcolumn(name = "Matched", type_ = "integer", json_path = ".status.matched"),
    printcolumn(name = "Ready", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].status"#),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct DedupPolicySpec {
    /// Namespaces whose InboxTables this policy covers; empty selects all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retention: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retention: Option<Duration>,
    /// Applied to InboxTables that set no retention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_retention: Option<Duration>,
    #[serde(default)]
    pub enforcement: Enforcement,
    /// DedupCovered must hold for an InboxTable to be Ready.
    #[serde(default)]
    pub require_coverage: bool,
    /// Per-table exceptions, each until its expiry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub exceptions: Vec<PolicyException>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
pub enum Enforcement {
    /// Out-of-bounds retention is clamped into the bounds, and the condition says so.
    #[default]
    Enforce,
    /// Out-of-bounds retention is only reported (PolicyCompliant=False).
    Audit,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyException {
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The lower bound for this table instead of the policy's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retention: Option<Duration>,
    /// The upper bound for this table instead of the policy's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retention: Option<Duration>,
    /// When the exception stops applying (RFC 3339).
    pub expires: Time,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DedupPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Conditions,
    #[serde(default)]
    pub matched: i32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub non_compliant: Vec<NonCompliant>,
    /// The last spec that passed validation. While the current spec is invalid this one stays in
    /// force, so a broken edit never lifts a retention floor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_spec: Option<DedupPolicySpec>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub struct NonCompliant {
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValidDedupPolicy {
    pub namespace_selector: Option<LabelSelector>,
    pub min_retention: Option<Given>,
    pub max_retention: Option<Given>,
    pub default_retention: Option<Given>,
    pub enforcement: Enforcement,
    pub require_coverage: bool,
    pub exceptions: Vec<ValidException>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValidException {
    pub namespace: String,
    pub name: String,
    pub min_retention: Option<Given>,
    pub max_retention: Option<Given>,
    pub expires: Time,
}

impl DedupPolicySpec {
    /// Whether the namespace selector alone is usable (the rest of the spec may not be).
    pub fn selector_is_valid(&self) -> bool {
        let mut p = Problems::new();
        validate_selector(self.namespace_selector.as_ref(), &mut p);
        p.finish(|| Some(())).is_ok()
    }
}

/// A selector the API server stores as given: an unknown operator would select nothing, and the
/// policy would fail open (its floor applied to no table).
fn validate_selector(sel: Option<&LabelSelector>, p: &mut Problems) {
    for (k, v) in sel.and_then(|s| s.match_labels.as_ref()).into_iter().flatten() {
        let f = format!("spec.namespaceSelector.matchLabels[{k}]");
        if !valid_label_key(k) {
            p.add(&f, format!("{k:?} is not a label key: the selector could match no namespace"));
        } else if !valid_label_value(v) {
            p.add(&f, format!("{v:?} is not a label value: the selector could match no namespace"));
        }
    }
    let exprs = sel.and_then(|s| s.match_expressions.as_deref()).unwrap_or_default();
    for (i, e) in exprs.iter().enumerate() {
        let f = format!("spec.namespaceSelector.matchExpressions[{i}]");
        let values = e.values.as_deref().unwrap_or_default();
        if !valid_label_key(&e.key) {
            p.add(format!("{f}.key"), format!("{:?} is not a label key", e.key));
        }
        if let Some(bad) = values.iter().find(|v| !valid_label_value(v)) {
            p.add(
                format!("{f}.values"),
                format!("{bad:?} is not a label value: it can match no namespace"),
            );
        }
        match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                p.add(format!("{f}.values"), format!("operator {} needs at least one value", e.operator))
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                p.add(format!("{f}.values"), format!("must be empty with operator {}", e.operator))
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => p.add(
                format!("{f}.operator"),
                format!("{other:?} is not an operator; use In, NotIn, Exists or DoesNotExist"),
            ),
        }
    }
}

impl DedupPolicySpec {
    pub fn validate(&self) -> Result<ValidDedupPolicy, ValidationErrors> {
        let mut p = Problems::new();
        let (min_ok, min) = optional_duration(&mut p, "spec.minRetention", &self.min_retention);
        let (max_ok, max) = optional_duration(&mut p, "spec.maxRetention", &self.max_retention);
        let (def_ok, def) = optional_duration(&mut p, "spec.defaultRetention", &self.default_retention);
        let value = |g: &Option<Given>| g.as_ref().map(|g| g.value);
        if let (Some(lo), Some(hi)) = (value(&min), value(&max)) {
            if lo > hi {
                p.add(
                    "spec.minRetention",
                    format!("{} is above maxRetention {}", fmt(&self.min_retention), fmt(&self.max_retention)),
                );
            }
        }
        if let (Some(lo), Some(d)) = (value(&min), value(&def)) {
            if d < lo {
                p.add(
                    "spec.defaultRetention",
                    format!(
                        "{} is below minRetention {}",
                        fmt(&self.default_retention),
                        fmt(&self.min_retention)
                    ),
                );
            }
        }
        if let (Some(d), Some(hi)) = (value(&def), value(&max)) {
            if d > hi {
                p.add(
                    "spec.defaultRetention",
                    format!(
                        "{} is above maxRetention {}",
                        fmt(&self.default_retention),
                        fmt(&self.max_retention)
                    ),
                );
            }
        }
        validate_selector(self.namespace_selector.as_ref(), &mut p);
        if matches!(&def, Some(d) if d.value.is_zero()) {
            p.add("spec.defaultRetention", "must be greater than zero");
        }
        let exceptions = self
            .exceptions
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.validate(&mut p, &format!("spec.exceptions[{i}]")))
            .collect();
        p.finish(|| {
            (min_ok && max_ok && def_ok).then_some(ValidDedupPolicy {
                namespace_selector: self.namespace_selector.clone(),
                min_retention: min,
                max_retention: max,
                default_retention: def,
                enforcement: self.enforcement,
                require_coverage: self.require_coverage,
                exceptions,
            })
        })
    }
}

impl PolicyException {
    /// Problems go to `p` under `f`; the exception when its durations parse.
    fn validate(&self, p: &mut Problems, f: &str) -> Option<ValidException> {
        validate_namespace_name(&self.namespace, p, &format!("{f}.namespace"));
        validate_object_name(&self.name, p, &format!("{f}.name"));
        let (a, emin) = optional_duration(p, &format!("{f}.minRetention"), &self.min_retention);
        let (b, emax) = optional_duration(p, &format!("{f}.maxRetention"), &self.max_retention);
        if self.min_retention.is_none() && self.max_retention.is_none() {
            p.add(f, "an exception sets minRetention, maxRetention or both");
        }
        if let (Some(lo), Some(hi)) = (&emin, &emax) {
            if lo.value > hi.value {
                p.add(format!("{f}.minRetention"), "is above the exception's maxRetention");
            }
        }
        (a && b).then(|| ValidException {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            min_retention: emin,
            max_retention: emax,
            expires: self.expires.clone(),
        })
    }
}

/// An optional duration: (whether it is absent or valid, its value).
fn optional_duration(p: &mut Problems, field: &str, d: &Option<Duration>) -> (bool, Option<Given>) {
    match d {
        None => (true, None),
        Some(d) => match p.check(field, d.parse()) {
            Some(value) => (true, Some(Given { text: d.0.clone(), value })),
            None => (false, None),
        },
    }
}

fn fmt(d: &Option<Duration>) -> String {
    d.as_ref().map(|d| d.0.clone()).unwrap_or_default()
}
