//! The relay Deployment of an OutboxRelay, applied, and RelayAvailable: the Deployment is there
//! and one relay holds the outbox's advisory lock, or with buckets the relays own every bucket,
//! which the operator sees in `pg_locks` without asking any pod (`relay_buckets`).

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Secret};
use kube::{
    api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams},
    ResourceExt,
};

use super::{
    ownership::{foreign_child, foreign_holder},
    relay_buckets::{self, Locks},
    relay_deployment::{self, MANAGER},
    Context,
};
use crate::{
    crd::{OutboxRelay, ValidOutboxRelay},
    operator::conditions::{condition, Cond, Reason},
};

/// What the operator saw of the relays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Pods the Deployment asks for (0: scaled to zero or paused).
    pub wanted: i32,
    pub available: i32,
    /// spec.relay.buckets.
    pub buckets: u16,
    /// The relay locks pg_locks shows (none before the tables are ready).
    pub locks: Locks,
    /// How long some buckets have been without an owner since RelayAvailable was last True.
    pub unowned_for: Option<std::time::Duration>,
}

/// RelayAvailable. Pure. Relaying happens when some relay holds the lock (buckets 1) or the
/// relays own every bucket (more); the Deployment's availability says whether lockstep's own
/// relays are up (standbys included).
pub fn verdict(seen: &Seen) -> Cond {
    let t = condition::RELAY_AVAILABLE;
    let pods = format!("{}/{} relay pods available", seen.available, seen.wanted);
    if seen.wanted == 0 {
        let outside = if seen.locks.any() {
            "; a relay outside this Deployment holds the outbox's locks"
        } else {
            ""
        };
        return Cond::no(
            t,
            Reason::ScaledToZero,
            format!("spec.relay.replicas is 0 or the relay is paused{outside}"),
        );
    }
    if let Some(c) = relay_buckets::changing(seen.buckets, &seen.locks, &pods) {
        return c;
    }
    if seen.buckets > 1 {
        return relay_buckets::verdict(seen.buckets, &seen.locks, seen.available, &pods, seen.unowned_for);
    }
    match (seen.available, seen.locks.single) {
        (_, true) => Cond::yes(t, Reason::Available, format!("a relay holds the outbox lock; {pods}")),
        (0, false) => Cond::no(
            t,
            Reason::DeploymentUnavailable,
            format!("{pods}: see the Deployment's pods (image, scheduling, crash loops)"),
        ),
        (_, false) => Cond::no(
            t,
            Reason::NoActiveRelay,
            format!("{pods} but none holds the outbox lock: they cannot reach the database or are preparing the tables; see their logs"),
        ),
    }
}

/// Since when each object's buckets (by uid) have been without an owner, as the operator saw it;
/// in memory, so an operator restart starts the grace again.
#[derive(Default)]
pub struct Unowned(std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>);

impl Unowned {
    /// How long `uid`'s buckets have been without an owner, given what is seen `now` (`unowned`);
    /// None once they all have one.
    pub fn seen(&self, uid: &str, unowned: bool, now: std::time::Instant) -> Option<std::time::Duration> {
        let mut map = self.0.lock().expect("unowned lock");
        if !unowned {
            map.remove(uid);
            return None;
        }
        Some(now.saturating_duration_since(*map.entry(uid.to_owned()).or_insert(now)))
    }
}

/// The Secrets the relay pods read, as (uid, resourceVersion) for the pod template's hash: the
/// database URL Secret (which must hold its key) and the broker's auth Secret (Kafka's, NATS's or
/// RabbitMQ's: a rotation rolls the relay). None when one cannot be read. Their data is never hashed (see `relay_deployment::secret_hash`).
async fn secret_versions(ctx: &Context, ns: &str, v: &ValidOutboxRelay) -> Option<Vec<(String, String)>> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let version = |s: &Secret| (s.uid().unwrap_or_default(), s.resource_version().unwrap_or_default());
    let db = secrets.get_opt(&v.url_secret.name).await.ok()??;
    db.data.as_ref()?.get(&v.url_secret.key)?;
    let mut versions = vec![version(&db)];
    let auth = match (&v.nats, &v.rabbitmq) {
        (_, Some(r)) => r.auth_secret.as_ref(),
        (Some(n), None) => n.auth_secret.as_ref(),
        (None, None) => v.auth_secret.as_ref(),
    };
    if let Some(auth) = auth {
        versions.push(version(&secrets.get_opt(auth).await.ok()??));
    }
    Some(versions)
}

/// Apply the relay Deployment (server-side apply, one field manager) and read back how many of
/// its pods are available; a condition when it cannot be applied.
pub async fn apply(ctx: &Context, obj: &OutboxRelay, ns: &str, v: &ValidOutboxRelay) -> Result<i32, Cond> {
    let failed = |m: String| Cond::no(condition::RELAY_AVAILABLE, Reason::DeploymentFailed, m);
    let Some(versions) = secret_versions(ctx, ns, v).await else {
        return Err(Cond::no(
            condition::RELAY_AVAILABLE,
            Reason::SecretNotFound,
            "the relay's Secrets (database URL key, the broker's authSecretRef) cannot be read yet; the Deployment waits for them",
        ));
    };
    if let Some(mut c) = super::relay_image::refused(v.image.as_deref(), &ctx.relay_image, &ctx.relay_image_prefixes) {
        c.type_ = condition::RELAY_AVAILABLE;
        return Err(c);
    }
    let hash = relay_deployment::secret_hash(versions.iter().map(|(u, r)| (u.as_str(), r.as_str())));
    let d = relay_deployment::deployment(obj, v, &ctx.relay_image, &hash).map_err(|e| failed(e.to_string()))?;
    let name = d.metadata.name.clone().unwrap_or_default();
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    // Never applied over a Deployment of that name that is not this object's: a forced apply
    // would take it over (a GET first leaves a moment in which one made by hand is taken over).
    let uid = obj.metadata.uid.as_deref().unwrap_or_default();
    let existing = api
        .get_metadata_opt(&name)
        .await
        .map_err(|e| failed(format!("cannot read Deployment {ns}/{name}: {e}")))?;
    if let Some(holder) = existing.as_ref().and_then(|m| foreign_holder(&m.metadata, uid)) {
        return Err(foreign_child("Deployment", ns, &name, &holder));
    }
    let desired = Applied::digest(&d);
    let version = existing.and_then(|m| m.metadata.resource_version);
    let available = match ctx.relay_applies.unchanged(uid, desired, version.as_deref()) {
        Some(available) => available,
        None => {
            let applied = api
                .patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&d))
                .await
                .map_err(|e| failed(format!("cannot apply Deployment {ns}/{name}: {e}")))?;
            let available = applied.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0);
            ctx.relay_applies.record(uid, desired, applied.metadata.resource_version, available);
            available
        }
    };
    match apply_budget(ctx, obj, ns, v).await {
        Ok(None) => {}
        Ok(Some(holder)) => return Err(foreign_child("PodDisruptionBudget", ns, &name, &holder)),
        Err(e) => return Err(failed(format!("cannot apply PodDisruptionBudget {ns}/{name}: {e}"))),
    }
    Ok(available)
}

/// What the operator last applied to each relay Deployment (by OutboxRelay uid): the digest of
/// what it sent, the Deployment's resourceVersion after, and its available pods then. A refresh
/// that would send the same to a Deployment nobody changed since (same resourceVersion: not its
/// spec, not its status, not its labels) skips the apply: it would change nothing, and 1,000
/// relays refreshing made these applies a good share of the API server's work.
#[derive(Default)]
pub struct Applied(std::sync::Mutex<std::collections::HashMap<String, (u64, String, i32)>>);

impl Applied {
    pub fn digest(d: &Deployment) -> u64 {
        use sha2::{Digest, Sha256};
        let bytes = serde_json::to_vec(d).unwrap_or_default();
        u64::from_be_bytes(Sha256::digest(bytes)[..8].try_into().expect("8 bytes"))
    }

    /// The available pods recorded when `desired` was applied, if the Deployment is still at the
    /// resourceVersion that apply left.
    pub fn unchanged(&self, uid: &str, desired: u64, version: Option<&str>) -> Option<i32> {
        let map = self.0.lock().expect("applied lock");
        let (digest, at, available) = map.get(uid)?;
        (*digest == desired && Some(at.as_str()) == version).then_some(*available)
    }

    pub fn record(&self, uid: &str, desired: u64, version: Option<String>, available: i32) {
        let mut map = self.0.lock().expect("applied lock");
        match version {
            Some(v) => map.insert(uid.to_owned(), (desired, v, available)),
            None => map.remove(uid),
        };
    }

    /// Forget the relays of objects that are gone.
    pub fn retain(&self, alive: impl Fn(&str) -> bool) {
        self.0.lock().expect("applied lock").retain(|uid, _| alive(uid));
    }
}

/// The policy version the API server serves PodDisruptionBudgets at: v1, or v1beta1 before
/// Kubernetes 1.21 (same spec fields for what lockstep sets).
static BUDGET_VERSION: tokio::sync::OnceCell<&'static str> = tokio::sync::OnceCell::const_new();

async fn budget_api(ctx: &Context, ns: &str) -> Result<(Api<DynamicObject>, &'static str), kube::Error> {
    let version = BUDGET_VERSION
        .get_or_try_init(|| async {
            match ctx.client.list_api_group_resources("policy/v1").await {
                Ok(r) if r.resources.iter().any(|r| r.name == "poddisruptionbudgets") => Ok("v1"),
                Ok(_) => Ok("v1beta1"),
                Err(kube::Error::Api(s)) if s.code == 404 => Ok("v1beta1"),
                Err(e) => Err(e),
            }
        })
        .await?;
    let gvk = GroupVersionKind::gvk("policy", version, "PodDisruptionBudget");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "poddisruptionbudgets");
    Ok((Api::namespaced_with(ctx.client.clone(), ns, &ar), version))
}

/// The relays' PodDisruptionBudget while there is more than one relay; deleted otherwise. One
/// of that name that is not this object's is left alone: its holder is returned.
async fn apply_budget(ctx: &Context, obj: &OutboxRelay, ns: &str, v: &ValidOutboxRelay) -> Result<Option<String>, kube::Error> {
    let (api, version) = budget_api(ctx, ns).await?;
    let name = relay_deployment::relay_name(&obj.name_any());
    let built = relay_deployment::pod_disruption_budget(obj, v).map_err(|e| kube::Error::Service(e.to_string().into()))?;
    match built {
        Some(pdb) => {
            let uid = obj.metadata.uid.as_deref().unwrap_or_default();
            if let Some(holder) = api.get_metadata_opt(&name).await?.and_then(|m| foreign_holder(&m.metadata, uid)) {
                return Ok(Some(holder));
            }
            let mut value = serde_json::to_value(&pdb).map_err(kube::Error::SerdeError)?;
            value["apiVersion"] = format!("policy/{version}").into();
            value["kind"] = "PodDisruptionBudget".into();
            api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&value))
                .await?;
        }
        // Only one lockstep made (ours or from an earlier replica count) is deleted; reading
        // first keeps the common single-relay case to one GET.
        None => {
            let ours = api.get_metadata_opt(&name).await?.is_some_and(|m| {
                m.metadata
                    .owner_references
                    .unwrap_or_default()
                    .iter()
                    .any(|o| Some(&o.uid) == obj.metadata.uid.as_ref())
            });
            if ours {
                match api.delete(&name, &DeleteParams::default()).await {
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    other => {
                        other?;
                    }
                }
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::conditions::Status;

    fn seen(wanted: i32, available: i32, active: bool) -> Seen {
        Seen {
            wanted,
            available,
            buckets: 1,
            locks: Locks {
                single: active,
                ..Locks::default()
            },
            unowned_for: None,
        }
    }

    #[test]
    fn unowned_buckets_are_timed_from_when_first_seen() {
        let (u, t0) = (Unowned::default(), std::time::Instant::now());
        let secs = std::time::Duration::from_secs;
        assert_eq!(u.seen("a", true, t0), Some(secs(0)));
        assert_eq!(u.seen("a", true, t0 + secs(3)), Some(secs(3)));
        assert_eq!(u.seen("b", true, t0 + secs(3)), Some(secs(0)), "per object");
        assert_eq!(u.seen("a", false, t0 + secs(4)), None);
        assert_eq!(u.seen("a", true, t0 + secs(5)), Some(secs(0)), "timed again");
    }

    #[test]
    fn available_means_a_relay_holds_the_lock() {
        let c = verdict(&seen(2, 2, true));
        assert_eq!((c.status, c.reason), (Status::True, Reason::Available));
        assert!(c.message.contains("2/2 relay pods available"), "{}", c.message);
        // The lock counts even while the Deployment's pods are not (yet) available.
        assert_eq!(verdict(&seen(2, 0, true)).status, Status::True);
    }

    #[test]
    fn an_apply_is_skipped_only_for_the_same_deployment_unchanged_since() {
        let a = Applied::default();
        assert_eq!(a.unchanged("u", 1, Some("10")), None);
        a.record("u", 1, Some("10".into()), 2);
        assert_eq!(a.unchanged("u", 1, Some("10")), Some(2));
        // Something else to send, the Deployment changed (or gone), another object: applied.
        assert_eq!(a.unchanged("u", 2, Some("10")), None);
        assert_eq!(a.unchanged("u", 1, Some("11")), None);
        assert_eq!(a.unchanged("u", 1, None), None);
        assert_eq!(a.unchanged("v", 1, Some("10")), None);
        a.retain(|uid| uid != "u");
        assert_eq!(a.unchanged("u", 1, Some("10")), None);
    }

    #[test]
    fn each_way_of_not_relaying_has_its_reason() {
        assert_eq!(verdict(&seen(2, 0, false)).reason, Reason::DeploymentUnavailable);
        assert_eq!(verdict(&seen(2, 1, false)).reason, Reason::NoActiveRelay);
        let zero = verdict(&seen(0, 0, false));
        assert_eq!((zero.status, zero.reason), (Status::False, Reason::ScaledToZero));
        assert!(verdict(&seen(0, 0, true)).message.contains("outside this Deployment"));
    }
}
