//! One OutboxRelay manages a topic (or a NATS stream, a RabbitMQ exchange or queue). The broker cannot record an owner (it refuses topic config
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

/// One broker: the same reported identity when both are known, else an address in common. Pure.
pub fn same_broker(a: &BTreeSet<String>, b: &BTreeSet<String>, ids: (Option<&str>, Option<&str>)) -> bool {
    match ids {
        (Some(x), Some(y)) => x == y,
        _ => !a.is_disjoint(b),
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

/// NATS identities by server list, as the operator reaches them.
static NATS_IDS: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);

async fn nats_id(ctx: &Context, ns: &str, servers: &[String], secret: Option<&str>) -> Option<String> {
    let key = servers.join(",");
    let known = NATS_IDS.lock().ok()?.as_ref().and_then(|m| m.get(&key).cloned());
    if known.is_some() {
        return known;
    }
    let on = Reporting {
        type_: condition::TOPICS_READY,
        status: Status::Unknown,
    };
    let settings = super::nats_deps::nats_settings(&ctx.client, ns, servers, secret, on).await.ok()?;
    let id = crate::clients::nats_admin::NatsAdmin::connect(&settings).await.ok()?.identity();
    NATS_IDS.lock().ok()?.get_or_insert_with(HashMap::new).insert(key, id.clone());
    Some(id)
}

/// Where an OutboxRelay's destinations live: its broker's addresses and credentials.
#[derive(Clone, Copy)]
enum Place<'a> {
    Kafka { bootstrap: &'a str, secret: Option<&'a str> },
    Nats { servers: &'a [String], secret: Option<&'a str> },
    Rabbitmq(&'a crate::crd::ValidRabbitmq),
}

impl<'a> Place<'a> {
    fn of(v: &'a ValidOutboxRelay) -> Self {
        if let Some(r) = &v.rabbitmq {
            return Place::Rabbitmq(r);
        }
        match &v.nats {
            Some(n) => Place::Nats {
                servers: &n.servers,
                secret: n.auth_secret.as_deref(),
            },
            None => Place::Kafka {
                bootstrap: &v.bootstrap_servers,
                secret: v.auth_secret.as_deref(),
            },
        }
    }

    /// The addresses, normalised, for a first comparison.
    fn addresses(&self) -> BTreeSet<String> {
        match self {
            Place::Kafka { bootstrap, .. } => addresses(bootstrap),
            Place::Nats { servers, .. } => servers
                .iter()
                .filter_map(|s| crate::core::nats_settings::server_host_port(s).ok())
                .map(|a| a.to_ascii_lowercase())
                .collect(),
            // Names are per vhost: the same server with another vhost is another place.
            Place::Rabbitmq(r) => crate::core::amqp_settings::server_host_port(&r.url)
                .map(|a| format!("{}/{}", a.to_ascii_lowercase(), r.vhost))
                .into_iter()
                .collect(),
        }
    }

    /// The broker's own identity (Kafka's cluster id; NATS's cluster name or server id).
    async fn identity(&self, ctx: &Context, ns: &str) -> Option<String> {
        match *self {
            Place::Kafka { bootstrap, secret } => cluster_id(ctx, ns, bootstrap, secret).await,
            Place::Nats { servers, secret } => nats_id(ctx, ns, servers, secret).await,
            Place::Rabbitmq(r) => rabbitmq_id(ctx, ns, r).await,
        }
    }
}

/// The names an OutboxRelay manages on its broker: its topics, its NATS streams, or its
/// RabbitMQ exchange and queues (`exchange/<name>`, `queue/<name>`: the two kinds have a name
/// space each).
pub fn destinations(v: &ValidOutboxRelay) -> Vec<String> {
    if let Some(r) = &v.rabbitmq {
        let exchange = r.exchange.iter().map(|e| format!("exchange/{}", e.name));
        return exchange.chain(r.queues.iter().map(|q| format!("queue/{}", q.name))).collect();
    }
    match &v.nats {
        Some(n) => n.streams.iter().map(|s| s.name.clone()).collect(),
        None => v.topics.iter().map(|t| t.name.clone()).collect(),
    }
}

/// A RabbitMQ's cluster name and the vhost, as the management API reports it.
async fn rabbitmq_id(ctx: &Context, ns: &str, r: &crate::crd::ValidRabbitmq) -> Option<String> {
    let on = Reporting {
        type_: condition::TOPICS_READY,
        status: Status::Unknown,
    };
    let m = super::rabbitmq_deps::Management {
        url: r.management_url.as_deref()?,
        vhost: &r.vhost,
        secret: r.auth_secret.as_deref(),
        field: "rabbitmq.authSecretRef",
    };
    let admin = super::rabbitmq_deps::admin(&ctx.client, ns, m, on).await.ok()?;
    Some(format!("{}/{}", admin.cluster_name().await.ok()?, r.vhost))
}

/// How an OutboxRelay counts whose broker shares no address with this one's and whose identity
/// (or this one's) cannot be read just now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsure {
    /// As on another broker: reconciling goes on (a wrong guess is set right once it reads).
    Other,
    /// As on this broker: a Delete cleanup keeps what might be that object's.
    Same,
}

/// For each of `valid`'s topics (or streams) that other OutboxRelays name on the same broker,
/// those others. Objects being deleted, invalid ones, those of another broker kind and those that
/// lost their table to another (they manage nothing) do not count. Err when the cache of
/// OutboxRelays is not filled yet.
pub async fn others(
    ctx: &Context,
    obj: &OutboxRelay,
    valid: &ValidOutboxRelay,
    unsure: Unsure,
) -> Result<BTreeMap<String, Vec<Claimant>>, String> {
    let store = &ctx.caches.relays;
    if tokio::time::timeout(Duration::from_secs(2), store.wait_until_ready())
        .await
        .is_err()
    {
        return Err("the operator's cache of OutboxRelays is not filled yet".into());
    }
    let mine: BTreeSet<String> = destinations(valid).into_iter().collect();
    if mine.is_empty() {
        return Ok(BTreeMap::new());
    }
    let (ns, uid, here) = (obj.namespace().unwrap_or_default(), obj.uid(), Place::of(valid));
    let mut my_id = None;
    let mut out: BTreeMap<String, Vec<Claimant>> = BTreeMap::new();
    for guard in store.state() {
        let Ok(other) = &guard.0 else { continue };
        let conflicted = other
            .status
            .as_ref()
            .is_some_and(|s| super::ownership::was_conflicted(&s.conditions));
        if other.uid() == uid || other.metadata.deletion_timestamp.is_some() || conflicted {
            continue;
        }
        let Ok(v) = other.spec.validate() else { continue };
        let named: Vec<String> = destinations(&v).into_iter().filter(|n| mine.contains(n)).collect();
        let there = Place::of(&v);
        if named.is_empty() || std::mem::discriminant(&here) != std::mem::discriminant(&there) {
            continue;
        }
        let (a, b) = (here.addresses(), there.addresses());
        if !same_broker(&a, &b, (None, None)) {
            // No address in common: ask both brokers who they are (rare: the same name).
            if my_id.is_none() {
                my_id = Some(here.identity(ctx, &ns).await);
            }
            let theirs = there.identity(ctx, &other.namespace().unwrap_or_default()).await;
            let mine = my_id.clone().flatten();
            let known = mine.is_some() && theirs.is_some();
            if (known || unsure == Unsure::Other) && !same_broker(&a, &b, (mine.as_deref(), theirs.as_deref())) {
                continue;
            }
        }
        for n in named {
            let c = Claimant::of(other, other.status.as_ref(), &n);
            out.entry(n).or_default().push(c);
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
    fn one_broker_by_its_identity_else_a_shared_address() {
        let same = |a: &str, b: &str, ids| same_broker(&addresses(a), &addresses(b), ids);
        assert!(same("k1:9092,k2:9092", " K2:9092", (None, None)));
        assert!(!same("k1:9092", "k2:9092", (None, Some("c"))));
        assert!(same("k1:9092", "alias:9092", (Some("c"), Some("c"))));
        assert!(!same("k1:9092", "k1:9092", (Some("c"), Some("d"))));
    }

    #[test]
    fn nats_servers_compare_by_host_and_port() {
        let place = |s: &[&str]| {
            let servers: Vec<String> = s.iter().map(|x| x.to_string()).collect();
            Place::Nats {
                servers: &servers,
                secret: None,
            }
            .addresses()
        };
        assert_eq!(place(&["nats://N1:4222", "tls://n2"]), addresses("n1:4222,n2:4222"));
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
