//! The stream plan, NATS JetStream's counterpart of the topic plan: (desired, observed) ->
//! actions, refusals and drift. Pure.
//!
//! Create missing streams; bring subjects, replicas, maxAge, duplicateWindow, discard and maxBytes
//! to the spec, except the settings in `ignore`, which keep what the server has; refuse what the
//! server cannot change on an existing stream (storage) and streams that delete acknowledged
//! messages (interest or workqueue retention: a consumer's redelivery would find nothing), with
//! what to do instead rather than an update the server rejects.

use std::collections::BTreeMap;

use crate::{clients::nats_admin::ObservedStream, crd::DesiredStream};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Create(DesiredStream),
    /// The whole configuration, ignored settings holding what the server has.
    Update(DesiredStream),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub stream: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub refusals: Vec<Refusal>,
    /// Per stream: settings that differ from the spec, as "setting: actual -> wanted".
    pub drift: BTreeMap<String, Vec<String>>,
}

pub fn plan(desired: &[DesiredStream], observed: &BTreeMap<String, ObservedStream>) -> Plan {
    let mut p = Plan::default();
    for d in desired {
        match observed.get(&d.name) {
            None => p.actions.push(Action::Create(d.clone())),
            Some(o) => plan_existing(d, o, &mut p),
        }
    }
    p
}

fn plan_existing(d: &DesiredStream, o: &ObservedStream, p: &mut Plan) {
    let refuse = |p: &mut Plan, message: String| {
        p.refusals.push(Refusal {
            stream: d.name.clone(),
            message,
        })
    };
    if o.storage != d.storage {
        refuse(
            p,
            format!(
                "storage is {:?} and the server cannot change it: create a stream of another name with {:?} storage, \
                 move the subjects to it, then delete this one",
                o.storage, d.storage
            ),
        );
        return;
    }
    if o.retention != "limits" {
        refuse(
            p,
            format!(
                "retention is {}: such a stream deletes messages once consumed, so a consumer's redelivery after a crash \
                 finds nothing; lockstep's streams use limits retention (create a new stream)",
                o.retention
            ),
        );
        return;
    }
    let effective = effective(d, o);
    let drift = differences(&effective, o);
    if !drift.is_empty() {
        p.drift.insert(d.name.clone(), drift);
        p.actions.push(Action::Update(effective));
    }
}

/// The stream as it will be: the spec, with each ignored setting as the server has it.
fn effective(d: &DesiredStream, o: &ObservedStream) -> DesiredStream {
    let ignored = |k: &str| d.ignore.contains(k);
    DesiredStream {
        replicas: if ignored("replicas") { o.replicas } else { d.replicas },
        max_age: if ignored("maxAge") { o.max_age } else { d.max_age },
        duplicate_window: if ignored("duplicateWindow") {
            o.duplicate_window
        } else {
            d.duplicate_window
        },
        discard: if ignored("discard") { o.discard } else { d.discard },
        max_bytes: if ignored("maxBytes") { o.max_bytes } else { d.max_bytes },
        ..d.clone()
    }
}

fn differences(e: &DesiredStream, o: &ObservedStream) -> Vec<String> {
    let d = |v: std::time::Duration| crate::core::duration::format(v);
    let mut out = Vec::new();
    let mut diff = |name: &str, actual: String, wanted: String| {
        if actual != wanted {
            out.push(format!("{name}: {actual} -> {wanted}"));
        }
    };
    diff("subjects", o.subjects.join(","), e.subjects.join(","));
    diff("replicas", o.replicas.to_string(), e.replicas.to_string());
    diff("maxAge", d(o.max_age), d(e.max_age));
    diff("duplicateWindow", d(o.duplicate_window), d(e.duplicate_window));
    diff("discard", format!("{:?}", o.discard), format!("{:?}", e.discard));
    let bytes = |b: Option<i64>| b.map_or("unlimited".into(), |b| b.to_string());
    diff("maxBytes", bytes(o.max_bytes), bytes(e.max_bytes));
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::crd::{Discard, StreamStorage};

    /// A stream `orders` of `orders.>`, file storage, a week's max_age.
    pub(crate) fn desired() -> DesiredStream {
        DesiredStream {
            name: "orders".into(),
            subjects: vec!["orders.>".into()],
            storage: StreamStorage::File,
            replicas: 1,
            max_age: Duration::from_secs(7 * 86400),
            duplicate_window: Duration::from_secs(120),
            discard: Discard::Old,
            max_bytes: None,
            ignore: Default::default(),
        }
    }

    fn observed_as(d: &DesiredStream) -> ObservedStream {
        ObservedStream {
            subjects: d.subjects.clone(),
            storage: d.storage,
            replicas: d.replicas,
            max_age: d.max_age,
            duplicate_window: d.duplicate_window,
            discard: d.discard,
            max_bytes: d.max_bytes,
            retention: "limits",
            messages: 0,
        }
    }

    fn with(o: ObservedStream) -> BTreeMap<String, ObservedStream> {
        BTreeMap::from([("orders".to_string(), o)])
    }

    #[test]
    fn a_missing_stream_is_created_and_a_matching_one_left_alone() {
        assert_eq!(plan(&[desired()], &BTreeMap::new()).actions, [Action::Create(desired())]);
        assert_eq!(plan(&[desired()], &with(observed_as(&desired()))), Plan::default());
    }

    #[test]
    fn drift_is_reported_and_reverted_except_what_is_ignored() {
        let mut o = observed_as(&desired());
        o.max_age = Duration::from_secs(3600);
        o.duplicate_window = Duration::from_secs(30);
        let p = plan(&[desired()], &with(o.clone()));
        assert_eq!(p.drift["orders"], ["maxAge: 1h -> 7d", "duplicateWindow: 30s -> 2m"]);
        assert_eq!(p.actions, [Action::Update(desired())]);

        let mut d = desired();
        d.ignore.insert("maxAge".into());
        let p = plan(&[d.clone()], &with(o));
        assert_eq!(p.drift["orders"], ["duplicateWindow: 30s -> 2m"]);
        let Action::Update(u) = &p.actions[0] else { panic!("{p:?}") };
        assert_eq!(
            (u.max_age, u.duplicate_window),
            (Duration::from_secs(3600), Duration::from_secs(120)),
            "maxAge kept"
        );
    }

    #[test]
    fn what_the_server_cannot_change_is_refused_with_what_to_do() {
        let mut o = observed_as(&desired());
        o.storage = StreamStorage::Memory;
        o.max_age = Duration::ZERO;
        let p = plan(&[desired()], &with(o));
        assert!(p.actions.is_empty(), "{p:?}");
        assert!(p.refusals[0].message.contains("storage is Memory"), "{:?}", p.refusals);
        let mut o = observed_as(&desired());
        o.retention = "workqueue";
        let p = plan(&[desired()], &with(o));
        assert!(p.actions.is_empty() && p.refusals[0].message.contains("redelivery"), "{p:?}");
    }
}
