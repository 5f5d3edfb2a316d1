//! Effective inbox retention under DedupPolicies. Pure: no client, no clock (`now` is an argument).
//!
//! The strictest bound wins when several policies match: the largest minRetention and the smallest
//! maxRetention. Enforce policies clamp the retention into their bounds; Audit policies only report.
//! When bounds conflict (a minimum above a maximum) the minimum wins: a retention that is too short
//! silently re-opens duplicates, one that is too long only costs storage.

use std::{collections::BTreeMap, time::Duration as StdDuration};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{LabelSelector, Time},
    jiff::Timestamp,
};

use crate::{
    core::duration::{self, Given},
    crd::{DedupPolicySpec, Enforcement, ValidDedupPolicy, DEFAULT_RETENTION},
};

/// A valid DedupPolicy and its name, as the retention logic needs it.
#[derive(Debug, Clone)]
pub struct PolicyView {
    pub name: String,
    pub policy: ValidDedupPolicy,
}

/// The DedupPolicies retention is computed from. A policy whose spec is invalid counts by its
/// last valid spec (`status.appliedSpec`); one that never had a valid spec holds the purges of
/// every table it may select: a broken policy must not let tables purge early (fail closed).
#[derive(Debug, Clone, Default)]
pub struct Policies {
    pub valid: Vec<PolicyView>,
    /// Invalid policies without a valid earlier spec, with the selector they may select by
    /// (None: every namespace, when the selector itself is unusable).
    pub holding: Vec<(String, Option<LabelSelector>)>,
}

impl Policies {
    /// Sort one DedupPolicy in. `spec` is None when the object does not even deserialize.
    pub fn add(&mut self, name: String, spec: Option<&DedupPolicySpec>, applied: Option<&DedupPolicySpec>) {
        let valid = spec
            .and_then(|s| s.validate().ok())
            .or_else(|| applied.and_then(|s| s.validate().ok()));
        match valid {
            Some(policy) => self.valid.push(PolicyView { name, policy }),
            None => {
                // An unusable selector selects everything: its tables cannot be told apart.
                let selector = match spec {
                    Some(s) if s.selector_is_valid() => s.namespace_selector.clone(),
                    _ => None,
                };
                self.holding.push((name, selector));
            }
        }
    }

    /// The invalid policies (without a valid earlier spec) that may select a namespace.
    pub fn holding(&self, namespace_labels: &BTreeMap<String, String>) -> Vec<String> {
        self.holding
            .iter()
            .filter(|(_, sel)| selector_matches(sel.as_ref(), namespace_labels))
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// Whether a label selector selects a set of labels. None or an empty selector selects everything.
pub fn selector_matches(sel: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = sel else { return true };
    if let Some(ml) = &sel.match_labels {
        if ml.iter().any(|(k, v)| labels.get(k) != Some(v)) {
            return false;
        }
    }
    for e in sel.match_expressions.iter().flatten() {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        let ok = match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    pub value: StdDuration,
    pub text: String,
    pub policy: String,
    pub enforce: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compliance {
    /// No DedupPolicy selects this table.
    NoPolicy,
    /// Within every bound.
    Within,
    /// Out of an Enforce bound; clamped, and within every bound after that.
    Clamped { requested: String },
    /// Out of at least one bound that was not (or could not be) enforced.
    Violation { messages: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    pub retention: StdDuration,
    /// As users write it: the spec's text, a policy's bound or default, or the built-in default.
    pub text: String,
    /// The policies that select this table.
    pub policies: Vec<String>,
    pub compliance: Compliance,
    /// Human description of where the retention came from and what was done to it.
    pub message: String,
    pub require_coverage: bool,
    /// The next time the outcome can change by itself (an exception expiring).
    pub next_change: Option<Time>,
}

/// The bounds the selecting policies set for one table.
#[derive(Default)]
struct Bounds {
    lows: Vec<Bound>,
    highs: Vec<Bound>,
    defaults: Vec<Bound>,
    /// The earliest expiry of an exception in force.
    next_change: Option<Timestamp>,
}

/// Each policy's bounds, with the table's exceptions in force applied.
fn bounds(matched: &[&PolicyView], namespace: &str, name: &str, now: Timestamp) -> Bounds {
    let mut b = Bounds::default();
    for p in matched {
        let enforce = p.policy.enforcement == Enforcement::Enforce;
        let (mut min, mut max) = (p.policy.min_retention.as_ref(), p.policy.max_retention.as_ref());
        let mut label = p.name.clone();
        for e in p.policy.exceptions.iter().filter(|e| e.namespace == namespace && e.name == name) {
            if e.expires.0 > now {
                b.next_change = Some(b.next_change.map_or(e.expires.0, |n| n.min(e.expires.0)));
                min = e.min_retention.as_ref().or(min);
                max = e.max_retention.as_ref().or(max);
                label = format!("{} (exception until {})", p.name, e.expires.0);
            }
        }
        let bound = |g: &Given, policy: &str| Bound {
            value: g.value,
            text: g.text.clone(),
            policy: policy.to_owned(),
            enforce,
        };
        b.lows.extend(min.map(|m| bound(m, &label)));
        b.highs.extend(max.map(|m| bound(m, &label)));
        b.defaults.extend(p.policy.default_retention.as_ref().map(|d| bound(d, &p.name)));
    }
    b
}

/// The retention a table gets. `requested` is the spec's retention (text and parsed value).
pub fn effective(
    namespace: &str,
    name: &str,
    namespace_labels: &BTreeMap<String, String>,
    requested: Option<(&str, StdDuration)>,
    policies: &[PolicyView],
    now: Timestamp,
) -> Effective {
    let mut matched: Vec<&PolicyView> = policies
        .iter()
        .filter(|p| selector_matches(p.policy.namespace_selector.as_ref(), namespace_labels))
        .collect();
    matched.sort_by(|a, b| a.name.cmp(&b.name));
    let b = bounds(&matched, namespace, name, now);
    let policies: Vec<String> = matched.iter().map(|p| p.name.clone()).collect();
    let (value, text, origin) = match (requested, b.defaults.iter().max_by_key(|b| b.value)) {
        (Some((t, v)), _) => (v, t.to_owned(), "spec.retention".to_owned()),
        (None, Some(d)) => (d.value, d.text.clone(), format!("defaultRetention of DedupPolicy {}", d.policy)),
        (None, None) => (
            DEFAULT_RETENTION,
            duration::format(DEFAULT_RETENTION),
            "the built-in default".to_owned(),
        ),
    };
    let (retention, text, compliance, message) = if matched.is_empty() {
        let message = format!("retention {text} from {origin}; no DedupPolicy selects this table");
        (value, text, Compliance::NoPolicy, message)
    } else {
        judge(value, text, &origin, &b, &policies)
    };
    Effective {
        retention,
        text,
        require_coverage: matched.iter().any(|p| p.policy.require_coverage),
        policies,
        compliance,
        message,
        next_change: b.next_change.map(Time),
    }
}

/// Clamp into the enforced bounds (upper first, then lower: on a conflict the minimum wins), then
/// report every bound still broken.
fn judge(value: StdDuration, text: String, origin: &str, b: &Bounds, policies: &[String]) -> (StdDuration, String, Compliance, String) {
    let (mut value, mut text, requested) = (value, text.clone(), text);
    let mut clamped = false;
    if let Some(hi) = b.highs.iter().filter(|b| b.enforce).min_by_key(|b| b.value) {
        if value > hi.value {
            (value, text, clamped) = (hi.value, hi.text.clone(), true);
        }
    }
    if let Some(lo) = b.lows.iter().filter(|b| b.enforce).max_by_key(|b| b.value) {
        if value < lo.value {
            (value, text, clamped) = (lo.value, lo.text.clone(), true);
        }
    }
    let below = b.lows.iter().filter(|b| value < b.value);
    let above = b.highs.iter().filter(|b| value > b.value);
    let messages: Vec<String> = below
        .map(|lo| format!("retention {text} is below minRetention {} of DedupPolicy {}", lo.text, lo.policy))
        .chain(above.map(|hi| format!("retention {text} is above maxRetention {} of DedupPolicy {}", hi.text, hi.policy)))
        .collect();
    let names = policies.join(", ");
    let (compliance, message) = if !messages.is_empty() {
        let m = messages.join("; ");
        (Compliance::Violation { messages }, m)
    } else if clamped {
        let m = format!("{origin} {requested} is outside the bounds of DedupPolicy {names}; clamped to {text}");
        (Compliance::Clamped { requested }, m)
    } else {
        (
            Compliance::Within,
            format!("retention {text} from {origin} is within DedupPolicy {names}"),
        )
    };
    (value, text, compliance, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DedupPolicySpec, PolicyException};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn spec(min: Option<&str>, max: Option<&str>, enforcement: Enforcement) -> DedupPolicySpec {
        DedupPolicySpec {
            namespace_selector: None,
            min_retention: min.map(Into::into),
            max_retention: max.map(Into::into),
            default_retention: None,
            enforcement,
            require_coverage: false,
            exceptions: vec![],
        }
    }

    fn view(name: &str, spec: DedupPolicySpec) -> PolicyView {
        PolicyView {
            name: name.into(),
            policy: spec.validate().unwrap(),
        }
    }

    fn policy(name: &str, min: Option<&str>, max: Option<&str>, enforcement: Enforcement) -> PolicyView {
        view(name, spec(min, max, enforcement))
    }

    fn now() -> Timestamp {
        "2026-06-01T00:00:00Z".parse().unwrap()
    }

    fn eff(req: &str, policies: &[PolicyView]) -> Effective {
        effective(
            "ns",
            "inbox",
            &BTreeMap::new(),
            Some((req, duration::parse(req).unwrap())),
            policies,
            now(),
        )
    }

    #[test]
    fn enforce_clamps_up_to_the_minimum() {
        let e = eff("1h", &[policy("p", Some("24h"), None, Enforcement::Enforce)]);
        assert_eq!((e.text.as_str(), e.retention), ("24h", StdDuration::from_secs(86_400)));
        assert_eq!(e.compliance, Compliance::Clamped { requested: "1h".into() });
        assert!(e.message.contains("clamped to 24h"), "{}", e.message);
    }

    #[test]
    fn audit_only_reports() {
        let e = eff("1h", &[policy("p", Some("24h"), None, Enforcement::Audit)]);
        assert_eq!(e.text, "1h");
        assert!(
            matches!(&e.compliance, Compliance::Violation { messages } if messages[0].contains("below minRetention 24h of DedupPolicy p"))
        );
    }

    #[test]
    fn strictest_bound_wins_across_policies() {
        let ps = [
            policy("a", Some("24h"), Some("30d"), Enforcement::Enforce),
            policy("b", Some("3d"), Some("10d"), Enforcement::Enforce),
        ];
        assert_eq!(eff("1h", &ps).text, "3d");
        assert_eq!(eff("20d", &ps).text, "10d");
        assert_eq!(eff("5d", &ps).compliance, Compliance::Within);
        assert_eq!(eff("5d", &ps).policies, ["a", "b"]);
    }

    #[test]
    fn conflicting_bounds_keep_the_minimum_and_say_so() {
        let ps = [
            policy("a", Some("10d"), None, Enforcement::Enforce),
            policy("b", None, Some("5d"), Enforcement::Enforce),
        ];
        let e = eff("7d", &ps);
        assert_eq!(e.text, "10d");
        assert!(matches!(&e.compliance, Compliance::Violation { messages } if messages[0].contains("above maxRetention 5d")));
    }

    #[test]
    fn exceptions_apply_until_they_expire() {
        let mut s = spec(Some("24h"), None, Enforcement::Enforce);
        s.exceptions.push(PolicyException {
            namespace: "ns".into(),
            name: "inbox".into(),
            min_retention: Some("1h".into()),
            max_retention: None,
            expires: Time("2026-06-02T00:00:00Z".parse().unwrap()),
        });
        let p = view("p", s);
        let e = eff("1h", std::slice::from_ref(&p));
        assert_eq!(e.text, "1h");
        assert_eq!(e.compliance, Compliance::Within);
        assert_eq!(e.next_change, Some(Time("2026-06-02T00:00:00Z".parse().unwrap())));
        // After expiry the policy's own minimum applies again.
        let later = effective(
            "ns",
            "inbox",
            &BTreeMap::new(),
            Some(("1h", StdDuration::from_secs(3600))),
            &[p],
            "2026-06-02T00:00:01Z".parse().unwrap(),
        );
        assert_eq!(later.text, "24h");
        assert_eq!(later.next_change, None);
    }

    #[test]
    fn defaults_come_from_policy_then_builtin() {
        let mut s = spec(None, None, Enforcement::Enforce);
        s.default_retention = Some("3d".into());
        let p = view("p", s);
        let e = effective("ns", "inbox", &BTreeMap::new(), None, &[p], now());
        assert_eq!(e.text, "3d");
        let e = effective("ns", "inbox", &BTreeMap::new(), None, &[], now());
        assert_eq!((e.text.as_str(), e.compliance), ("7d", Compliance::NoPolicy));
    }

    #[test]
    fn selectors() {
        let labels: BTreeMap<String, String> = [("team".to_string(), "payments".to_string())].into();
        let sel = |ml: Option<(&str, &str)>, expr: Option<(&str, &str, Vec<&str>)>| LabelSelector {
            match_labels: ml.map(|(k, v)| [(k.to_string(), v.to_string())].into()),
            match_expressions: expr.map(|(k, op, vs)| {
                vec![LabelSelectorRequirement {
                    key: k.into(),
                    operator: op.into(),
                    values: Some(vs.into_iter().map(String::from).collect()),
                }]
            }),
        };
        assert!(selector_matches(None, &labels));
        assert!(selector_matches(Some(&sel(None, None)), &labels));
        assert!(selector_matches(Some(&sel(Some(("team", "payments")), None)), &labels));
        assert!(!selector_matches(Some(&sel(Some(("team", "billing")), None)), &labels));
        assert!(selector_matches(
            Some(&sel(None, Some(("team", "In", vec!["payments", "x"])))),
            &labels
        ));
        assert!(!selector_matches(
            Some(&sel(None, Some(("team", "NotIn", vec!["payments"])))),
            &labels
        ));
        assert!(selector_matches(Some(&sel(None, Some(("team", "Exists", vec![])))), &labels));
        assert!(!selector_matches(Some(&sel(None, Some(("env", "Exists", vec![])))), &labels));
        assert!(selector_matches(Some(&sel(None, Some(("env", "DoesNotExist", vec![])))), &labels));
    }

    #[test]
    fn an_invalid_policy_counts_by_its_last_valid_spec_or_holds_purges() {
        let labels = |team: &str| BTreeMap::from([("team".to_string(), team.to_string())]);
        let selecting = |team: &str, min: &str| DedupPolicySpec {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(labels(team)),
                ..Default::default()
            }),
            ..spec(Some(min), None, Enforcement::Enforce)
        };
        let broken = |team: &str| selecting(team, "not-a-duration");
        let mut p = Policies::default();
        p.add("fixed".into(), Some(&selecting("a", "1d")), Some(&selecting("a", "2d")));
        p.add("edited".into(), Some(&broken("b")), Some(&selecting("b", "3d")));
        p.add("never-valid".into(), Some(&broken("c")), None);
        let mut bad_selector = broken("d");
        bad_selector.namespace_selector = Some(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "team".into(),
                operator: "Sometimes".into(),
                values: None,
            }]),
            ..Default::default()
        });
        p.add("unusable-selector".into(), Some(&bad_selector), None);
        p.add("undeserializable".into(), None, None);
        // The current spec when valid; the last valid one when not.
        let mins: Vec<(String, String)> = p
            .valid
            .iter()
            .map(|v| (v.name.clone(), v.policy.min_retention.as_ref().unwrap().text.clone()))
            .collect();
        assert_eq!(mins, [("fixed".into(), "1d".into()), ("edited".into(), "3d".into())]);
        // Never valid: holds the tables its selector picks; with no usable selector, all tables.
        assert_eq!(p.holding(&labels("c")), ["never-valid", "unusable-selector", "undeserializable"]);
        assert_eq!(p.holding(&labels("a")), ["unusable-selector", "undeserializable"]);
    }
}
