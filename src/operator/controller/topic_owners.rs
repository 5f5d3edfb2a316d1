//! One OutboxRelay manages a topic. The broker cannot record an owner (it refuses topic config
//! keys it does not know) and two OutboxRelays naming one topic usually have different databases,
//! so no `lockstep_owners` table sees both: the check is against every other OutboxRelay the
//! operator sees (its watch cache), on the same Kafka cluster (the cluster id the brokers report,
//! else a bootstrap address in common). The holder is the oldest of those whose status records
//! they manage the topic (`status.topics[]` without `managedBy`), else the oldest of all; the
//! others report ResourceConflict naming it and neither change nor delete the topic.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Mutex,
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::{
    deps::{self, Reporting},
    Context,
};
use crate::{
    crd::{OutboxRelay, OutboxRelayStatus, ValidOutboxRelay},
    operator::conditions::{condition, Status},
};

/// An OutboxRelay naming a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimant {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub created: Option<Timestamp>,
    /// Its status records that it manages the topic.
    pub claims: bool,
}

impl Claimant {
    fn of(o: &OutboxRelay, status: Option<&OutboxRelayStatus>, topic: &str) -> Self {
        Claimant {
            namespace: o.namespace().unwrap_or_default(),
            name: o.name_any(),
            uid: o.uid().unwrap_or_default(),
            created: o.metadata.creation_timestamp.as_ref().map(|t| t.0),
            claims: claims(status, topic),
        }
    }

    pub fn describe(&self) -> String {
        format!("OutboxRelay {}/{}", self.namespace, self.name)
    }
}

/// The status says the object manages `topic` (listed, and not as another's). Pure.
pub fn claims(status: Option<&OutboxRelayStatus>, topic: &str) -> bool {
    status.is_some_and(|s| s.topics.iter().any(|t| t.name == topic && t.managed_by.is_none()))
}

/// Who manages a topic among those naming it: the oldest that claims it, else the oldest (ties by
/// namespace, name, uid, so every reconcile of every object picks the same one). Pure.
pub fn holder(all: &[Claimant]) -> Option<&Claimant> {
    let claimed = all.iter().any(|c| c.claims);
    all.iter()
        .filter(|c| c.claims || !claimed)
        .min_by_key(|c| (c.created.unwrap_or(Timestamp::MAX), &c.namespace, &c.name, &c.uid))
}

/// The bootstrap addresses, normalised. Pure.
fn addresses(bootstrap: &str) -> BTreeSet<String> {
    bootstrap
        .split(',')
        .map(|a| a.trim().to_ascii_lowercase())
        .filter(|a| !a.is_empty())
        .collect()
}

/// One Kafka cluster: the same reported cluster id when both are known, else an address in common. Pure.
pub fn same_kafka(a: &str, b: &str, ids: (Option<&str>, Option<&str>)) -> bool {
    match ids {
        (Some(x), Some(y)) => x == y,
        _ => !addresses(a).is_disjoint(&addresses(b)),
    }
}

/// Cluster ids by bootstrap string, as the operator reaches them (an id does not change).
static CLUSTER_IDS: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);

async fn cluster_id(ctx: &Context, ns: &str, bootstrap: &str, secret: Option<&str>) -> Option<String> {
    let known = CLUSTER_IDS.lock().ok()?.as_ref().and_then(|m| m.get(bootstrap).cloned());
    if known.is_some() {
        return known;
    }
    let on = Reporting {
        type_: condition::TOPICS_READY,
        status: Status::Unknown,
    };
    let settings = deps::kafka_settings(&ctx.client, ns, secret, on).await.ok()?;
    let id = ctx.admins.get(bootstrap, &settings).ok()?.cluster_id().await?;
    CLUSTER_IDS
        .lock()
        .ok()?
        .get_or_insert_with(HashMap::new)
        .insert(bootstrap.to_owned(), id.clone());
    Some(id)
}

/// For each of `valid`'s topics that other OutboxRelays name on the same Kafka cluster, those
/// others. Objects being deleted, invalid ones and those that lost their table to another
/// (they manage no topic) do not count. Err when the cache of OutboxRelays is not filled yet.
pub async fn others(ctx: &Context, obj: &OutboxRelay, valid: &ValidOutboxRelay) -> Result<BTreeMap<String, Vec<Claimant>>, String> {
    let store = &ctx.caches.relays;
    if tokio::time::timeout(Duration::from_secs(2), store.wait_until_ready())
        .await
        .is_err()
    {
        return Err("the operator's cache of OutboxRelays is not filled yet".into());
    }
    let mine: BTreeSet<&str> = valid.topics.iter().map(|t| t.name.as_str()).collect();
    if mine.is_empty() {
        return Ok(BTreeMap::new());
    }
    let (ns, uid) = (obj.namespace().unwrap_or_default(), obj.uid());
    let mut my_id = None;
    let mut out: BTreeMap<String, Vec<Claimant>> = BTreeMap::new();
    for guard in store.state() {
        let Ok(other) = &guard.0 else { continue };
        let conflicted = other
            .status
            .as_ref()
            .is_some_and(|s| super::ownership::was_conflicted(&s.conditions));
        let names_one = other.spec.topics.iter().any(|t| mine.contains(t.name.as_str()));
        if other.uid() == uid || other.metadata.deletion_timestamp.is_some() || conflicted || !names_one {
            continue;
        }
        let Ok(v) = other.spec.validate() else { continue };
        if !same_kafka(&valid.bootstrap_servers, &v.bootstrap_servers, (None, None)) {
            // No address in common: ask both clusters their ids (rare: the same topic name).
            if my_id.is_none() {
                my_id = Some(cluster_id(ctx, &ns, &valid.bootstrap_servers, valid.auth_secret.as_deref()).await);
            }
            let theirs = cluster_id(
                ctx,
                &other.namespace().unwrap_or_default(),
                &v.bootstrap_servers,
                v.auth_secret.as_deref(),
            )
            .await;
            let ids = (my_id.clone().flatten(), theirs);
            if !same_kafka(&valid.bootstrap_servers, &v.bootstrap_servers, (ids.0.as_deref(), ids.1.as_deref())) {
                continue;
            }
        }
        for t in v.topics.iter().filter(|t| mine.contains(t.name.as_str())) {
            let c = Claimant::of(other, other.status.as_ref(), &t.name);
            out.entry(t.name.clone()).or_default().push(c);
        }
    }
    Ok(out)
}

/// The topics of `valid` another OutboxRelay manages, with its description. Pure.
pub fn held_elsewhere(
    obj: &OutboxRelay,
    previous: &OutboxRelayStatus,
    others: &BTreeMap<String, Vec<Claimant>>,
) -> BTreeMap<String, String> {
    others
        .iter()
        .filter_map(|(topic, them)| {
            let mut all = vec![Claimant::of(obj, Some(previous), topic)];
            all.extend(them.iter().cloned());
            let h = holder(&all)?;
            (h.uid != all[0].uid).then(|| (topic.clone(), h.describe()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, created: i64, claims: bool) -> Claimant {
        Claimant {
            namespace: "ns".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            created: Some(Timestamp::from_second(created).unwrap()),
            claims,
        }
    }

    #[test]
    fn the_oldest_claimant_holds_else_the_oldest() {
        let h = |all: &[Claimant]| holder(all).unwrap().name.clone();
        assert_eq!(h(&[c("new", 20, false), c("old", 10, false)]), "old");
        // A topic already managed stays with its manager, however old the newcomer.
        assert_eq!(h(&[c("managing", 20, true), c("older", 10, false)]), "managing");
        // Both managed it (before lockstep recorded owners): the oldest keeps it.
        assert_eq!(h(&[c("b", 20, true), c("a", 10, true)]), "a");
        // Same second: the name decides, the same way every time.
        assert_eq!(h(&[c("y", 10, false), c("x", 10, false)]), "x");
        assert_eq!(holder(&[]), None);
    }

    #[test]
    fn one_kafka_by_cluster_id_else_a_shared_address() {
        assert!(same_kafka("k1:9092,k2:9092", " K2:9092", (None, None)));
        assert!(!same_kafka("k1:9092", "k2:9092", (None, Some("c"))));
        assert!(same_kafka("k1:9092", "alias:9092", (Some("c"), Some("c"))));
        assert!(!same_kafka("k1:9092", "k1:9092", (Some("c"), Some("d"))));
    }

    #[test]
    fn a_status_claims_a_topic_it_lists_as_its_own() {
        use crate::crd::TopicStatus;
        let t = |name: &str, managed_by: Option<&str>| TopicStatus {
            name: name.into(),
            partitions: None,
            ready: false,
            drift: vec![],
            managed_by: managed_by.map(Into::into),
        };
        let st = OutboxRelayStatus {
            topics: vec![t("mine", None), t("theirs", Some("a/orders"))],
            ..OutboxRelayStatus::default()
        };
        assert!(claims(Some(&st), "mine"), "listed, even when not ready (a broker outage)");
        assert!(!claims(Some(&st), "theirs"));
        assert!(!claims(Some(&st), "absent"));
        assert!(!claims(None, "mine"));
    }
}
