//! The relay Deployment and its PodDisruptionBudget, built from the validated spec with no API
//! call: one active relay (the PostgreSQL advisory lock), the other replicas hot standbys; or,
//! with buckets above 1, every relay active on its share of the buckets.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment},
        core::v1::{Affinity, PodAffinityTerm, PodAntiAffinity, PodTemplateSpec, WeightedPodAffinityTerm},
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::Resource;
use sha2::{Digest, Sha256};

use super::relay_pod;
use crate::{
    core::sql::{hex, sha256_hex},
    crd::{OutboxRelay, ValidOutboxRelay},
};

/// The server-side apply field manager of the relay Deployment and its PodDisruptionBudget.
pub const MANAGER: &str = "lockstep-relay-deployment";
/// Pod template annotation: a digest of the referenced Secrets, so a rotated password rolls the pods.
pub const SECRET_HASH_ANNOTATION: &str = "lockstep.dev/secret-hash";

/// An object from the API always has these; one built by hand may not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the OutboxRelay has no metadata.{0}")]
pub struct MissingMetadata(pub &'static str);

/// `<name>-relay`, the name of the Deployment and of the PodDisruptionBudget, within the 253
/// characters of an object name.
pub fn relay_name(obr_name: &str) -> String {
    fit(format!("{obr_name}-relay"), 253)
}

/// Pods the Deployment asks for: none while paused.
pub fn replicas(v: &ValidOutboxRelay) -> i32 {
    if v.paused {
        0
    } else {
        v.replicas
    }
}

/// The labels that select the relay's pods (immutable in a Deployment: never change them).
pub fn selector_labels(obr_name: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "lockstep".to_owned()),
        ("app.kubernetes.io/component", "relay".to_owned()),
        // Label values stop at 63 characters; object names may be longer.
        ("app.kubernetes.io/instance", fit(obr_name.to_owned(), 63)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn labels(obr_name: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(obr_name);
    l.insert("app.kubernetes.io/managed-by".into(), "lockstep".into());
    l
}

/// `text`, or when longer than `max` its head and 8 hex digits of its digest: still unique,
/// still starting and ending with a letter or digit.
fn fit(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut cut = max - 9;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let head = text[..cut].trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    format!("{head}-{}", &sha256_hex(&text)[..8])
}

fn name_of(obr: &OutboxRelay) -> Result<&str, MissingMetadata> {
    obr.metadata.name.as_deref().ok_or(MissingMetadata("name"))
}

/// Name, namespace, labels and the controller owner reference of a child of `obr`.
fn child_meta(obr: &OutboxRelay) -> Result<ObjectMeta, MissingMetadata> {
    let name = name_of(obr)?;
    let namespace = obr.metadata.namespace.clone().ok_or(MissingMetadata("namespace"))?;
    let uid = obr.metadata.uid.clone().ok_or(MissingMetadata("uid"))?;
    let owner = OwnerReference {
        api_version: OutboxRelay::api_version(&()).into_owned(),
        kind: OutboxRelay::kind(&()).into_owned(),
        name: name.to_owned(),
        uid,
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    Ok(ObjectMeta {
        name: Some(relay_name(name)),
        namespace: Some(namespace),
        labels: Some(labels(name)),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    })
}

/// The relay Deployment of `obr`. `default_image` is the operator's `--relay-image`, used when the
/// spec names none; `secret_hash` is `secret_hash()` of the referenced Secrets.
pub fn deployment(obr: &OutboxRelay, v: &ValidOutboxRelay, default_image: &str, secret_hash: &str) -> Result<Deployment, MissingMetadata> {
    let (meta, name) = (child_meta(obr)?, name_of(obr)?);
    let image = v.image.as_deref().unwrap_or(default_image);
    let mut pod = relay_pod::pod_spec(v, image);
    pod.affinity = Some(spread(name));
    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(name)),
            annotations: Some([(SECRET_HASH_ANNOTATION.to_owned(), secret_hash.to_owned())].into()),
            ..ObjectMeta::default()
        }),
        spec: Some(pod),
    };
    Ok(Deployment {
        metadata: meta,
        spec: Some(DeploymentSpec {
            replicas: Some(replicas(v)),
            selector: LabelSelector {
                match_labels: Some(selector_labels(name)),
                match_expressions: None,
            },
            template,
            strategy: Some(strategy()),
            // A relay that exits soon after starting (a table that fails verification) stops the
            // rollout before it replaces a working one.
            min_ready_seconds: Some(10),
            ..DeploymentSpec::default()
        }),
        status: None,
    })
}

/// Surge one new pod, never take one down first. Two relays running at once is harmless: the
/// advisory lock lets one publish and the other stands by. Taking a pod down first could stop
/// the active relay with no standby waiting (always so with one replica); with the new pod up,
/// the active one's SIGTERM releases the lock to a relay already waiting for it (about a second).
fn strategy() -> DeploymentStrategy {
    DeploymentStrategy {
        type_: Some("RollingUpdate".into()),
        rolling_update: Some(RollingUpdateDeployment {
            max_surge: Some(IntOrString::Int(1)),
            max_unavailable: Some(IntOrString::Int(0)),
        }),
    }
}

/// Prefer standbys on other nodes: one on the active relay's node is lost with it.
fn spread(obr_name: &str) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: PodAffinityTerm {
                    label_selector: Some(LabelSelector {
                        match_labels: Some(selector_labels(obr_name)),
                        match_expressions: None,
                    }),
                    topology_key: "kubernetes.io/hostname".into(),
                    ..PodAffinityTerm::default()
                },
            }]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    }
}

/// A budget that lets a drain evict one relay at a time, when there is more than one: at least
/// N-1 of N stay. With buckets 1 that keeps a standby to take the lock; with more, an eviction
/// frees one relay's share, which the N-1 others take (two at once would leave more waiting).
/// maxUnavailable rather than minAvailable N-1: it follows a change of replicas by itself. With
/// one relay (or none, paused) a budget of one would allow everything, and one that allows
/// nothing would block every drain: None, and one left from a larger replica count is deleted.
pub fn pod_disruption_budget(obr: &OutboxRelay, v: &ValidOutboxRelay) -> Result<Option<PodDisruptionBudget>, MissingMetadata> {
    let meta = child_meta(obr)?;
    if replicas(v) <= 1 {
        return Ok(None);
    }
    let name = name_of(obr)?;
    Ok(Some(PodDisruptionBudget {
        metadata: meta,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(name)),
                match_expressions: None,
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }))
}

/// Which Secrets the relay pods read, as they are now: lowercase hex SHA-256 over each Secret's
/// uid and resourceVersion, in the order given (the database Secret, then the auth Secret),
/// length-prefixed. Any change to a Secret (a rotated password) or a Secret made anew gives a new
/// digest, which rolls the pods; and it is computed from nothing secret, so no one who reads the
/// Deployment can test guesses at a password against it (a digest of the data would let them).
pub fn secret_hash<'a>(secrets: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut h = Sha256::new();
    for (uid, resource_version) in secrets {
        for part in [uid, resource_version] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
    }
    hex(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::controller::fixtures::{outbox_relay, outbox_relay_minimal};

    const IMAGE: &str = "ghcr.io/lockstep-dev/lockstep:latest";

    fn build(o: &OutboxRelay) -> Deployment {
        deployment(o, &o.spec.validate().unwrap(), IMAGE, "abc123").unwrap()
    }

    fn budget(o: &OutboxRelay) -> Option<PodDisruptionBudget> {
        pod_disruption_budget(o, &o.spec.validate().unwrap()).unwrap()
    }

    fn pod(d: &Deployment) -> (&ObjectMeta, &k8s_openapi::api::core::v1::PodSpec) {
        let t = &d.spec.as_ref().unwrap().template;
        (t.metadata.as_ref().unwrap(), t.spec.as_ref().unwrap())
    }

    #[test]
    fn the_deployment_is_named_owned_and_labelled() {
        let d = build(&outbox_relay("orders"));
        assert_eq!(d.metadata.name.as_deref(), Some("orders-relay"));
        assert_eq!(d.metadata.namespace.as_deref(), Some("shop"));
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.api_version.as_str(), owner.kind.as_str(), owner.name.as_str()),
            ("lockstep.dev/v1alpha1", "OutboxRelay", "orders")
        );
        assert_eq!(owner.uid, "3f1c2a4e-8d0b-4c6e-9a7f-1b2c3d4e5f60");
        assert_eq!((owner.controller, owner.block_owner_deletion), (Some(true), Some(true)));

        let all: BTreeMap<String, String> = [
            ("app.kubernetes.io/name", "lockstep"),
            ("app.kubernetes.io/component", "relay"),
            ("app.kubernetes.io/instance", "orders"),
            ("app.kubernetes.io/managed-by", "lockstep"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(d.metadata.labels.as_ref(), Some(&all));
        assert_eq!(pod(&d).0.labels.as_ref(), Some(&all));
        let mut selector = all.clone();
        selector.remove("app.kubernetes.io/managed-by");
        assert_eq!(d.spec.as_ref().unwrap().selector.match_labels.as_ref(), Some(&selector));
    }

    #[test]
    fn the_image_is_the_spec_one_or_the_operator_default() {
        let image = |d: &Deployment| pod(d).1.containers[0].image.clone().unwrap();
        assert_eq!(image(&build(&outbox_relay("orders"))), "registry.example/lockstep:1.2.3");
        assert_eq!(image(&build(&outbox_relay_minimal("plain"))), IMAGE);
    }

    #[test]
    fn the_secret_hash_rolls_the_pods() {
        let o = outbox_relay("orders");
        let v = o.spec.validate().unwrap();
        let a = deployment(&o, &v, IMAGE, "aaaa").unwrap();
        let b = deployment(&o, &v, IMAGE, "bbbb").unwrap();
        let annotations = pod(&a).0.annotations.as_ref().unwrap();
        assert_eq!(annotations.get(SECRET_HASH_ANNOTATION).map(String::as_str), Some("aaaa"));
        let (ta, tb) = (&a.spec.as_ref().unwrap().template, &b.spec.as_ref().unwrap().template);
        assert_ne!(ta, tb);
        assert_eq!(ta.spec, tb.spec, "only the annotation differs");
    }

    #[test]
    fn replicas_follow_the_spec_and_pause_scales_to_zero() {
        let replicas_of = |o: &OutboxRelay| build(o).spec.unwrap().replicas;
        assert_eq!(replicas_of(&outbox_relay("orders")), Some(3));
        assert_eq!(replicas_of(&outbox_relay_minimal("plain")), Some(2));
        let mut paused = outbox_relay("orders");
        paused.spec.relay.paused = true;
        assert_eq!(replicas_of(&paused), Some(0));
    }

    #[test]
    fn a_rollout_surges_and_never_takes_a_relay_down_first() {
        let d = build(&outbox_relay("orders"));
        let spec = d.spec.as_ref().unwrap();
        let s = spec.strategy.as_ref().unwrap();
        assert_eq!(s.type_.as_deref(), Some("RollingUpdate"));
        let ru = s.rolling_update.as_ref().unwrap();
        assert_eq!(
            (ru.max_surge.clone(), ru.max_unavailable.clone()),
            (Some(IntOrString::Int(1)), Some(IntOrString::Int(0)))
        );
        assert_eq!(spec.min_ready_seconds, Some(10));
        let anti = pod(&d).1.affinity.clone().unwrap().pod_anti_affinity.unwrap();
        let term = &anti.preferred_during_scheduling_ignored_during_execution.unwrap()[0].pod_affinity_term;
        assert_eq!(term.topology_key, "kubernetes.io/hostname");
        assert_eq!(term.label_selector.as_ref().unwrap().match_labels, spec.selector.match_labels);
    }

    #[test]
    fn a_budget_only_with_more_than_one_replica() {
        let pdb = budget(&outbox_relay("orders")).unwrap();
        assert_eq!(pdb.metadata.name.as_deref(), Some("orders-relay"));
        assert_eq!(pdb.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(pdb.metadata.owner_references.as_ref().unwrap()[0].controller, Some(true));
        let spec = pdb.spec.unwrap();
        assert_eq!((spec.max_unavailable, spec.min_available), (Some(IntOrString::Int(1)), None));
        let d = build(&outbox_relay("orders"));
        assert_eq!(spec.selector.unwrap().match_labels, d.spec.unwrap().selector.match_labels);

        let mut one = outbox_relay("orders");
        one.spec.relay.replicas = 1;
        assert_eq!(budget(&one), None);
        // Every relay active (buckets) or one active and standbys: N-1 of N stay either way.
        for buckets in [1, 64] {
            let mut o = outbox_relay("orders");
            o.spec.relay.buckets = buckets;
            let spec = budget(&o).unwrap().spec.unwrap();
            assert_eq!((spec.max_unavailable, spec.min_available), (Some(IntOrString::Int(1)), None));
            o.spec.relay.replicas = 1;
            assert_eq!(budget(&o), None, "one relay with {buckets} buckets: a budget would block drains");
        }
        let mut paused = outbox_relay("orders");
        paused.spec.relay.paused = true;
        assert_eq!(budget(&paused), None);
    }

    #[test]
    fn missing_metadata_is_an_error_not_a_panic() {
        let v = outbox_relay("orders").spec.validate().unwrap();
        for (field, clear) in [
            ("uid", (|o: &mut OutboxRelay| o.metadata.uid = None) as fn(&mut OutboxRelay)),
            ("namespace", |o| o.metadata.namespace = None),
            ("name", |o| o.metadata.name = None),
        ] {
            let mut o = outbox_relay("orders");
            clear(&mut o);
            assert_eq!(deployment(&o, &v, IMAGE, "h").unwrap_err(), MissingMetadata(field));
            assert_eq!(pod_disruption_budget(&o, &v).unwrap_err(), MissingMetadata(field));
        }
    }

    #[test]
    fn long_names_fit_object_and_label_limits() {
        let long = format!("{}-x", "a".repeat(70));
        let other = format!("{}-y", "a".repeat(70));
        let instance = |n: &str| selector_labels(n)["app.kubernetes.io/instance"].clone();
        assert!(instance(&long).len() <= 63, "{}", instance(&long));
        assert_ne!(instance(&long), instance(&other));
        assert_eq!(instance(&long), instance(&long));
        assert!(instance(&long).ends_with(|c: char| c.is_ascii_alphanumeric()));
        assert_eq!(instance("orders"), "orders");
        // The cut falls on a '-': it is trimmed so the value still ends with a letter or digit.
        let dashed = format!("{}-{}", "b".repeat(53), "c".repeat(20));
        assert!(!instance(&dashed).contains("--"), "{}", instance(&dashed));
        let name = relay_name(&"n".repeat(250));
        assert!(name.len() <= 253 && name.starts_with("nnn"));
        assert_eq!(relay_name("orders"), "orders-relay");
    }

    #[test]
    fn the_secret_hash_follows_each_secrets_identity_and_version() {
        let h = secret_hash([("uid-db", "41"), ("uid-kafka", "7")]);
        assert!(h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(h, secret_hash([("uid-db", "41"), ("uid-kafka", "7")]));
        // A new version (rotated), a Secret made anew (new uid), one more or one less: new digest.
        assert_ne!(h, secret_hash([("uid-db", "42"), ("uid-kafka", "7")]));
        assert_ne!(h, secret_hash([("uid-db2", "41"), ("uid-kafka", "7")]));
        assert_ne!(h, secret_hash([("uid-db", "41")]));
        assert_ne!(h, secret_hash([("uid-kafka", "7"), ("uid-db", "41")]));
        assert_ne!(secret_hash([("ab", "c")]), secret_hash([("a", "bc")]));
    }

    #[test]
    fn the_field_manager_is_pinned() {
        assert_eq!(MANAGER, "lockstep-relay-deployment");
    }
}
