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
    crd::{DedupPolicySpec, Enforcement, DEFAULT_RETENTION},
    duration,
};

/// A valid DedupPolicy, as the retention logic needs it.
#[derive(Debug, Clone)]
pub struct PolicyView {
    pub name: String,
    pub spec: DedupPolicySpec,
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
        .filter(|p| selector_matches(p.spec.namespace_selector.as_ref(), namespace_labels))
        .collect();
    matched.sort_by(|a, b| a.name.cmp(&b.name));
    let mut lows: Vec<Bound> = Vec::new();
    let mut highs: Vec<Bound> = Vec::new();
    let mut defaults: Vec<Bound> = Vec::new();
    let mut next_change: Option<Timestamp> = None;
    let parse = |d: &Option<crate::duration::Duration>| d.as_ref().and_then(|d| d.parse().ok().map(|v| (v, d.0.clone())));
    for p in &matched {
        let enforce = p.spec.enforcement == Enforcement::Enforce;
        let mut min = parse(&p.spec.min_retention);
        let mut max = parse(&p.spec.max_retention);
        let mut label = p.name.clone();
        for e in p.spec.exceptions.iter().filter(|e| e.namespace == namespace && e.name == name) {
            if e.expires.0 > now {
                next_change = Some(next_change.map_or(e.expires.0, |n| n.min(e.expires.0)));
                if let Some(m) = parse(&e.min_retention) {
                    min = Some(m);
                }
                if let Some(m) = parse(&e.max_retention) {
                    max = Some(m);
                }
                label = format!("{} (exception until {})", p.name, e.expires.0);
            }
        }
        if let Some((value, text)) = min {
            lows.push(Bound {
                value,
                text,
                policy: label.clone(),
                enforce,
            });
        }
        if let Some((value, text)) = max {
            highs.push(Bound {
                value,
                text,
                policy: label.clone(),
                enforce,
            });
        }
        if let Some((value, text)) = parse(&p.spec.default_retention) {
            defaults.push(Bound {
                value,
                text,
                policy: p.name.clone(),
                enforce,
            });
        }
    }
    let policy_names: Vec<String> = matched.iter().map(|p| p.name.clone()).collect();
    let require_coverage = matched.iter().any(|p| p.spec.require_coverage);
    let next_change = next_change.map(Time);

    let (mut value, mut text, origin) = match (requested, defaults.iter().max_by_key(|b| b.value)) {
        (Some((t, v)), _) => (v, t.to_owned(), "spec.retention".to_owned()),
        (None, Some(d)) => (d.value, d.text.clone(), format!("defaultRetention of DedupPolicy {}", d.policy)),
        (None, None) => (
            DEFAULT_RETENTION,
            duration::format(DEFAULT_RETENTION),
            "the built-in default".to_owned(),
        ),
    };
    if matched.is_empty() {
        return Effective {
            retention: value,
            message: format!("retention {text} from {origin}; no DedupPolicy selects this table"),
            text,
            policies: policy_names,
            compliance: Compliance::NoPolicy,
            require_coverage,
            next_change,
        };
    }
    let requested_text = text.clone();
    let mut clamped = false;
    // Upper bounds first, then lower: on a conflict the minimum wins.
    if let Some(hi) = highs.iter().filter(|b| b.enforce).min_by_key(|b| b.value) {
        if value > hi.value {
            (value, text, clamped) = (hi.value, hi.text.clone(), true);
        }
    }
    if let Some(lo) = lows.iter().filter(|b| b.enforce).max_by_key(|b| b.value) {
        if value < lo.value {
            (value, text, clamped) = (lo.value, lo.text.clone(), true);
        }
    }
    let mut messages = Vec::new();
    for lo in lows.iter().filter(|b| value < b.value) {
        messages.push(format!(
            "retention {text} is below minRetention {} of DedupPolicy {}",
            lo.text, lo.policy
        ));
    }
    for hi in highs.iter().filter(|b| value > b.value) {
        messages.push(format!(
            "retention {text} is above maxRetention {} of DedupPolicy {}",
            hi.text, hi.policy
        ));
    }
    let compliance = if !messages.is_empty() {
        Compliance::Violation {
            messages: messages.clone(),
        }
    } else if clamped {
        Compliance::Clamped {
            requested: requested_text.clone(),
        }
    } else {
        Compliance::Within
    };
    let message = match &compliance {
        Compliance::Clamped { requested } => {
            format!(
                "{origin} {requested} is outside the bounds of DedupPolicy {}; clamped to {text}",
                policy_names.join(", ")
            )
        }
        Compliance::Violation { messages } => messages.join("; "),
        _ => format!("retention {text} from {origin} is within DedupPolicy {}", policy_names.join(", ")),
    };
    Effective {
        retention: value,
        text,
        policies: policy_names,
        compliance,
        message,
        require_coverage,
        next_change,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::PolicyException;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn policy(name: &str, min: Option<&str>, max: Option<&str>, enforcement: Enforcement) -> PolicyView {
        PolicyView {
            name: name.into(),
            spec: DedupPolicySpec {
                namespace_selector: None,
                min_retention: min.map(Into::into),
                max_retention: max.map(Into::into),
                default_retention: None,
                enforcement,
                require_coverage: false,
                exceptions: vec![],
            },
        }
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
        let mut p = policy("p", Some("24h"), None, Enforcement::Enforce);
        p.spec.exceptions.push(PolicyException {
            namespace: "ns".into(),
            name: "inbox".into(),
            min_retention: Some("1h".into()),
            max_retention: None,
            expires: Time("2026-06-02T00:00:00Z".parse().unwrap()),
        });
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
        let mut p = policy("p", None, None, Enforcement::Enforce);
        p.spec.default_retention = Some("3d".into());
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
}

/// Kafka's default topic retention (log.retention.hours=168), assumed when a broker does not report
/// retention.ms for a topic.
pub const KAFKA_DEFAULT_RETENTION_MS: i64 = 7 * 86_400_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coverage {
    pub covered: bool,
    pub message: String,
}

/// Whether an inbox's retention outlives every redelivery of its source topics: at least each
/// topic's retention.ms (a consumer reset to earliest replays that far back), unless the spec
/// states a smaller redelivery window. `topics` holds each topic's retention.ms as reported
/// (None: not reported, Kafka's default assumed; -1: kept forever). Pure.
pub fn coverage(
    retention: StdDuration,
    retention_text: &str,
    window: Option<(&str, StdDuration)>,
    topics: &[(String, Option<i64>)],
) -> Coverage {
    let ret_ms = retention.as_millis() as i64;
    if let Some((wtext, w)) = window {
        let wms = w.as_millis() as i64;
        return if ret_ms >= wms {
            Coverage {
                covered: true,
                message: format!("retention {retention_text} ({ret_ms} ms) covers the stated redeliveryWindow {wtext} ({wms} ms)"),
            }
        } else {
            Coverage {
                covered: false,
                message: format!("retention {retention_text} ({ret_ms} ms) is shorter than the stated redeliveryWindow {wtext} ({wms} ms): ids are purged while their messages can still be redelivered"),
            }
        };
    }
    let mut short = Vec::new();
    let mut parts = Vec::new();
    for (name, r) in topics {
        let (ms, note) = match r {
            Some(ms) => (*ms, ""),
            None => (KAFKA_DEFAULT_RETENTION_MS, " (not reported; Kafka's default assumed)"),
        };
        if ms < 0 {
            short.push(format!(
                "topic {name} keeps messages forever (retention.ms=-1); state a redeliveryWindow"
            ));
        } else if ret_ms < ms {
            short.push(format!(
                "topic {name} retention.ms={ms}{note} ({})",
                crate::duration::format(StdDuration::from_millis(ms as u64))
            ));
        } else {
            parts.push(format!("{name} retention.ms={ms}{note}"));
        }
    }
    if short.is_empty() {
        Coverage {
            covered: true,
            message: format!("retention {retention_text} ({ret_ms} ms) covers {}", parts.join(", ")),
        }
    } else {
        Coverage {
            covered: false,
            message: format!(
                "retention {retention_text} ({ret_ms} ms) is shorter than {}: a consumer reset to earliest redelivers messages whose ids were already purged",
                short.join("; ")
            ),
        }
    }
}

#[cfg(test)]
mod coverage_tests {
    use super::*;

    const DAY: StdDuration = StdDuration::from_secs(86_400);

    #[test]
    fn one_day_does_not_cover_seven() {
        let c = coverage(DAY, "1d", None, &[("orders".into(), Some(604_800_000))]);
        assert!(!c.covered);
        assert!(
            c.message.contains("86400000 ms") && c.message.contains("604800000"),
            "{}",
            c.message
        );
        assert!(coverage(DAY * 8, "8d", None, &[("orders".into(), Some(604_800_000))]).covered);
        assert!(
            coverage(DAY * 7, "7d", None, &[("orders".into(), Some(604_800_000))]).covered,
            "equal is enough"
        );
    }

    #[test]
    fn the_longest_topic_decides_and_defaults_are_assumed() {
        let topics = [("a".to_string(), Some(3_600_000)), ("b".to_string(), None)];
        let c = coverage(DAY, "1d", None, &topics);
        assert!(
            !c.covered && c.message.contains("topic b") && c.message.contains("default assumed"),
            "{}",
            c.message
        );
        assert!(coverage(DAY * 7, "7d", None, &topics).covered);
    }

    #[test]
    fn infinite_retention_needs_a_window() {
        let topics = [("a".to_string(), Some(-1))];
        assert!(!coverage(DAY * 365, "365d", None, &topics).covered);
        assert!(coverage(DAY * 2, "2d", Some(("1d", DAY)), &topics).covered);
        let c = coverage(DAY, "1d", Some(("2d", DAY * 2)), &topics);
        assert!(!c.covered && c.message.contains("redeliveryWindow 2d"));
    }
}
