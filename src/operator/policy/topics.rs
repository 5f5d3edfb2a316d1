//! The topic plan: (desired, observed) -> actions, refusals and warnings. Pure.
//!
//! Create missing topics; set only the config keys the spec names, never keys in ignoreConfig;
//! refuse partition decreases; refuse partition increases on keyed topics unless allowed (more
//! partitions remap keys and break per-key order); warn when min.insync.replicas >= the
//! replication factor (acks=all would block) or unclean leader election is on (acknowledged
//! writes can be lost).

use std::collections::BTreeMap;

use crate::{clients::kafka::ObservedTopic, crd::topics::Desired};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Create {
        name: String,
        partitions: i32,
        replication_factor: i32,
        config: BTreeMap<String, String>,
    },
    /// Set these keys (IncrementalAlterConfigs SET); nothing else is touched.
    SetConfig {
        name: String,
        set: Vec<(String, String)>,
    },
    AddPartitions {
        name: String,
        total: i32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub topic: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub refusals: Vec<Refusal>,
    pub warnings: Vec<String>,
    /// Per topic: config keys that differ from the spec, as "key: actual -> wanted".
    pub drift: BTreeMap<String, Vec<String>>,
    /// Topics where acks=all is acknowledged by the leader alone (min.insync.replicas=1 with
    /// replicas): an acknowledged write can be lost with the leader.
    pub leader_only_acks: Vec<String>,
}

pub fn plan(desired: &[Desired], observed: &BTreeMap<String, ObservedTopic>) -> Plan {
    let mut p = Plan::default();
    for d in desired {
        p.warnings.extend(durability_warnings(d, observed.get(&d.name)));
        if leader_only_acks(d, observed.get(&d.name)) {
            p.leader_only_acks.push(d.name.clone());
        }
        match observed.get(&d.name) {
            None => p.actions.push(Action::Create {
                name: d.name.clone(),
                partitions: d.partitions,
                replication_factor: d.replication_factor,
                config: d.config.clone(),
            }),
            Some(o) => plan_existing(d, o, &mut p),
        }
    }
    p
}

/// The setting as it will be: wanted, or else as the broker has it.
fn effective_config(d: &Desired, observed: Option<&ObservedTopic>, k: &str) -> Option<String> {
    d.config.get(k).cloned().or_else(|| observed.and_then(|o| o.config.get(k).cloned()))
}

/// acks=all waits for the leader alone: min.insync.replicas is 1, or neither wanted nor reported
/// (before the topic exists, or a broker that leaves defaults out), where Kafka's default, 1,
/// holds unless the broker's own setting says otherwise.
fn leader_only_acks(d: &Desired, observed: Option<&ObservedTopic>) -> bool {
    let rf = observed.and_then(|o| o.replication_factor).unwrap_or(d.replication_factor);
    effective_config(d, observed, "min.insync.replicas").is_none_or(|v| v == "1") && rf > 1
}

/// Settings (wanted, or else present) that make acknowledged writes block or get lost.
fn durability_warnings(d: &Desired, observed: Option<&ObservedTopic>) -> Vec<String> {
    let rf = observed.and_then(|o| o.replication_factor).unwrap_or(d.replication_factor);
    let effective = |k: &str| effective_config(d, observed, k);
    let mut w = Vec::new();
    if let Some(misr) = effective("min.insync.replicas").and_then(|v| v.parse::<i32>().ok()) {
        if misr >= rf && rf > 1 || misr > rf {
            w.push(format!(
                "{}: min.insync.replicas={misr} with replication factor {rf}: a single unavailable replica blocks acks=all writes",
                d.name
            ));
        }
    }
    if leader_only_acks(d, observed) {
        let misr = match effective("min.insync.replicas") {
            Some(_) => "min.insync.replicas=1".to_owned(),
            None => "min.insync.replicas unset (Kafka's default is 1; the broker may set another)".to_owned(),
        };
        w.push(format!(
            "{}: {misr} with replication factor {rf}: acks=all waits for the leader alone, so an acknowledged write is lost if the leader fails before a follower copies it; set min.insync.replicas=2",
            d.name
        ));
    }
    if effective("unclean.leader.election.enable").as_deref() == Some("true") {
        w.push(format!(
            "{}: unclean.leader.election.enable=true: acknowledged writes can be lost on leader failover",
            d.name
        ));
    }
    w
}

/// Config to restore, partitions to add or refuse, for a topic that exists.
fn plan_existing(d: &Desired, o: &ObservedTopic, p: &mut Plan) {
    let mut set = Vec::new();
    let mut drift = Vec::new();
    for (k, want) in d.config.iter().filter(|(k, _)| !d.ignore.contains(*k)) {
        let actual = o.config.get(k);
        if actual != Some(want) {
            drift.push(format!("{k}: {} -> {want}", actual.map(String::as_str).unwrap_or("(unset)")));
            set.push((k.clone(), want.clone()));
        }
    }
    if !set.is_empty() {
        p.actions.push(Action::SetConfig { name: d.name.clone(), set });
        p.drift.insert(d.name.clone(), drift);
    }
    let refuse = |message: String| Refusal {
        topic: d.name.clone(),
        message,
    };
    if o.partitions > d.partitions {
        p.refusals.push(refuse(format!(
            "{}: has {} partitions, spec asks for {}; Kafka cannot remove partitions",
            d.name, o.partitions, d.partitions
        )));
    } else if o.partitions < d.partitions && d.keyed && !d.allow_partition_increase {
        p.refusals.push(refuse(format!(
            "{}: raising partitions {} -> {} remaps keys and breaks per-key order; set allowPartitionIncrease: true to do it anyway",
            d.name, o.partitions, d.partitions
        )));
    } else if o.partitions < d.partitions {
        p.actions.push(Action::AddPartitions {
            name: d.name.clone(),
            total: d.partitions,
        });
    }
    if let Some(actual) = o.replication_factor.filter(|a| *a != d.replication_factor) {
        p.warnings.push(format!(
            "{}: replication factor is {actual}, spec asks for {}; lockstep does not reassign replicas",
            d.name, d.replication_factor
        ));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeSet;

    use super::*;

    pub(crate) fn desired(name: &str, partitions: i32, config: &[(&str, &str)]) -> Desired {
        Desired {
            name: name.into(),
            partitions,
            replication_factor: 3,
            config: config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ignore: BTreeSet::new(),
            allow_partition_increase: false,
            keyed: true,
        }
    }

    pub(crate) fn observed(partitions: i32, rf: i32, config: &[(&str, &str)]) -> ObservedTopic {
        ObservedTopic {
            partitions,
            replication_factor: Some(rf),
            config: config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    pub(crate) fn one(name: &str, o: ObservedTopic) -> BTreeMap<String, ObservedTopic> {
        [(name.to_string(), o)].into()
    }

    #[test]
    fn creates_missing_topics_with_their_config() {
        let d = desired("a", 6, &[("retention.ms", "1000")]);
        let p = plan(std::slice::from_ref(&d), &BTreeMap::new());
        assert_eq!(
            p.actions,
            vec![Action::Create {
                name: "a".into(),
                partitions: 6,
                replication_factor: 3,
                config: d.config.clone()
            }]
        );
        assert!(p.refusals.is_empty() && p.drift.is_empty());
    }

    #[test]
    fn in_sync_topic_needs_nothing() {
        let d = desired("a", 6, &[("retention.ms", "1000")]);
        let broker = [("retention.ms", "1000"), ("segment.bytes", "1"), ("min.insync.replicas", "2")];
        let p = plan(&[d], &one("a", observed(6, 3, &broker)));
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn sets_only_drifted_spec_keys() {
        let d = desired(
            "a",
            6,
            &[
                ("retention.ms", "1000"),
                ("cleanup.policy", "delete"),
                ("max.message.bytes", "2000"),
            ],
        );
        let o = observed(6, 3, &[("retention.ms", "5"), ("cleanup.policy", "delete"), ("segment.bytes", "9")]);
        let p = plan(&[d], &one("a", o));
        assert_eq!(
            p.actions,
            vec![Action::SetConfig {
                name: "a".into(),
                set: vec![("max.message.bytes".into(), "2000".into()), ("retention.ms".into(), "1000".into())]
            }]
        );
        assert_eq!(p.drift["a"], vec!["max.message.bytes: (unset) -> 2000", "retention.ms: 5 -> 1000"]);
    }

    #[test]
    fn never_touches_ignored_keys() {
        let mut d = desired("a", 6, &[("retention.ms", "1000")]);
        d.ignore.insert("retention.ms".into());
        d.ignore.insert("segment.bytes".into());
        let p = plan(&[d], &one("a", observed(6, 3, &[("retention.ms", "5"), ("segment.bytes", "9")])));
        assert!(p.actions.is_empty() && p.drift.is_empty(), "{p:?}");
    }

    #[test]
    fn refuses_partition_decrease() {
        let p = plan(&[desired("a", 3, &[])], &one("a", observed(6, 3, &[])));
        assert!(p.actions.is_empty());
        assert_eq!(p.refusals.len(), 1);
        assert!(p.refusals[0].message.contains("has 6 partitions, spec asks for 3"));
    }

    #[test]
    fn refuses_increase_on_keyed_topics_unless_allowed() {
        let p = plan(&[desired("a", 12, &[])], &one("a", observed(6, 3, &[])));
        assert!(p.actions.is_empty());
        assert!(p.refusals[0].message.contains("allowPartitionIncrease"));
        let mut allowed = desired("a", 12, &[]);
        allowed.allow_partition_increase = true;
        let p = plan(&[allowed], &one("a", observed(6, 3, &[])));
        assert_eq!(
            p.actions,
            vec![Action::AddPartitions {
                name: "a".into(),
                total: 12
            }]
        );
        assert!(p.refusals.is_empty());
        let mut unkeyed = desired("a", 12, &[]);
        unkeyed.keyed = false;
        assert_eq!(
            plan(&[unkeyed], &one("a", observed(6, 3, &[]))).actions,
            vec![Action::AddPartitions {
                name: "a".into(),
                total: 12
            }]
        );
    }

    #[test]
    fn config_fix_and_refusal_together() {
        let p = plan(
            &[desired("a", 3, &[("retention.ms", "1")])],
            &one("a", observed(6, 3, &[("retention.ms", "2")])),
        );
        assert_eq!(p.actions.len(), 1);
        assert_eq!(p.refusals.len(), 1);
    }

    #[test]
    fn warns_on_unsafe_durability_settings() {
        let p = plan(&[desired("a", 1, &[("min.insync.replicas", "3")])], &BTreeMap::new());
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains("min.insync.replicas=3 with replication factor 3")),
            "{:?}",
            p.warnings
        );
        let p = plan(&[desired("a", 1, &[("min.insync.replicas", "2")])], &BTreeMap::new());
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let p = plan(
            &[desired("a", 1, &[])],
            &one("a", observed(1, 3, &[("unclean.leader.election.enable", "true")])),
        );
        assert!(p.warnings.iter().any(|w| w.contains("unclean.leader.election.enable=true")));
        let p = plan(&[desired("a", 1, &[("min.insync.replicas", "1")])], &BTreeMap::new());
        assert!(
            p.warnings.iter().any(|w| w.contains("acks=all waits for the leader alone")),
            "{:?}",
            p.warnings
        );
        assert_eq!(p.leader_only_acks, ["a"]);
        // Neither wanted nor reported: Kafka's default, 1, is what holds.
        let p = plan(&[desired("a", 1, &[])], &BTreeMap::new());
        assert_eq!(p.leader_only_acks, ["a"]);
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains("min.insync.replicas unset (Kafka's default is 1")),
            "{:?}",
            p.warnings
        );
        // The broker reports its own setting (a broker-wide 2): nothing to warn about.
        let p = plan(&[desired("a", 1, &[])], &one("a", observed(1, 3, &[("min.insync.replicas", "2")])));
        assert!(p.leader_only_acks.is_empty() && p.warnings.is_empty(), "{:?}", p.warnings);
        let p = plan(&[desired("a", 1, &[])], &one("a", observed(1, 1, &[])));
        assert!(p.warnings.iter().any(|w| w.contains("replication factor is 1, spec asks for 3")));
    }

    #[test]
    fn several_topics_are_planned_independently() {
        let ds = [desired("a", 1, &[]), desired("b", 2, &[("retention.ms", "1")])];
        let p = plan(&ds, &one("b", observed(2, 3, &[])));
        assert_eq!(p.actions.len(), 2);
        assert!(matches!(&p.actions[0], Action::Create { name, .. } if name == "a"));
        assert!(matches!(&p.actions[1], Action::SetConfig { name, .. } if name == "b"));
    }
}
