//! What the controllers share: clients, caches, pools, metrics, timing, and the error type with
//! its policy (permanent errors wait for a change, transient ones are retried).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    core::{DeserializeGuard, PartialObjectMeta},
    runtime::{
        controller::Action,
        reflector::{ObjectRef, Store},
    },
    Client, ResourceExt,
};

use crate::{
    clients::db::Pools,
    clients::kafka::AdminCache,
    crd::{DedupPolicy, InboxTable},
    operator::metrics::{ControllerLabel, FailureLabel, Metrics},
    operator::policy::retention::Policies,
    operator::purges::Purges,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("the object has no namespace")]
    MissingNamespace,
    /// The Delete policy's cleanup cannot finish yet; the finalizer stays and it is retried.
    #[error("deletion waits: {0}")]
    DeletionBlocked(String),
    /// Adding or removing the finalizer failed (a conflict, most often): retried.
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    pub fn metric_label(&self) -> String {
        match self {
            Error::Kube(_) => "KubeError".into(),
            Error::MissingNamespace => "MissingNamespace".into(),
            Error::DeletionBlocked(_) => "DeletionBlocked".into(),
            Error::Finalizer(_) => "FinalizerError".into(),
        }
    }

    /// Permanent errors wait for the object to change; transient ones are retried.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Error::MissingNamespace)
    }
}

/// How often things are looked at again.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Measured status (rows, ages, purge results, topics) is refreshed this often.
    pub refresh: Duration,
    /// Retry delay for conditions that heal by themselves (database down, Secret missing).
    pub retry: Duration,
    /// DedupPolicy status is recomputed this often (and when an exception expires).
    pub policy_refresh: Duration,
    /// Requeue delay while the shared caches are still filling.
    pub caches_filling: Duration,
}

impl Timing {
    /// When `uid`'s next refresh is due: on the object's own phase of the refresh period, so
    /// objects created (or found at start) together do not refresh in one burst that a spec
    /// change then waits behind (`duration::phased`).
    pub fn refresh_for(&self, uid: &str) -> Duration {
        crate::core::duration::phased(self.refresh, uid, std::time::SystemTime::now())
    }
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            refresh: Duration::from_secs(15),
            retry: Duration::from_secs(5),
            policy_refresh: Duration::from_secs(60),
            caches_filling: Duration::from_secs(1),
        }
    }
}

/// The shared caches the controllers read.
#[derive(Clone)]
pub struct Caches {
    pub inboxes: Store<DeserializeGuard<InboxTable>>,
    pub policies: Store<DeserializeGuard<DedupPolicy>>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub relays: Store<DeserializeGuard<crate::crd::OutboxRelay>>,
}

pub struct Context {
    pub client: Client,
    pub pools: Pools,
    pub metrics: Arc<Metrics>,
    pub recorder: super::events::Events,
    pub purges: Purges<ObjectRef<DeserializeGuard<InboxTable>>>,
    pub admins: AdminCache,
    /// PrerequisitesMet's pooler check by database, for a minute (it opens a second connection).
    pub poolers: super::prerequisites::Poolers,
    /// The relay Deployments as last applied (a refresh skips an apply that changes nothing).
    pub relay_applies: super::relay_available::Applied,
    /// Since when each OutboxRelay's buckets have been without an owner (RelayAvailable's grace).
    pub unowned: super::relay_available::Unowned,
    /// Consumers for InboxTable consumer lag, shared between reconciles.
    pub lag_clients: Arc<crate::clients::consumer_lag::LagClients>,
    pub caches: Caches,
    pub timing: Timing,
    /// Turns for refreshes (`--refresh-concurrency`, `reconciler::turn`); None: no limit.
    pub refreshes: Option<Arc<tokio::sync::Semaphore>>,
    /// The image relay Deployments run unless an OutboxRelay names one.
    pub relay_image: String,
    /// What `spec.relay.image` may name (`relay_image::prefixes`).
    pub relay_image_prefixes: Vec<String>,
}

impl Context {
    /// Policy, namespace and InboxTable caches must be filled before any retention is computed:
    /// an empty cache would look like "no policy" and purge with a shorter retention than a
    /// policy demands. Bounded: a reconcile that finds them not ready yet requeues instead of
    /// waiting (an unbounded wait here was seen to never wake, holding the object's slot forever).
    pub async fn caches_ready(&self) -> bool {
        let c = &self.caches;
        let wait = async {
            let _ = c.policies.wait_until_ready().await;
            let _ = c.namespaces.wait_until_ready().await;
            let _ = c.inboxes.wait_until_ready().await;
        };
        tokio::time::timeout(Duration::from_secs(2), wait).await.is_ok()
    }

    pub fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        self.caches
            .namespaces
            .get(&ObjectRef::new(ns))
            .map(|n| n.labels().clone())
            .unwrap_or_default()
    }

    /// The policies for retention computation: an invalid one by its last valid spec, or
    /// holding purges when it never had one (see [`Policies`]).
    pub fn policies(&self) -> Policies {
        let mut out = Policies::default();
        for p in self.caches.policies.state().iter() {
            match &p.0 {
                Ok(p) => out.add(p.name_any(), Some(&p.spec), p.status.as_ref().and_then(|s| s.applied_spec.as_ref())),
                Err(invalid) => out.add(invalid.metadata.name.clone().unwrap_or_default(), None, None),
            }
        }
        out
    }

    /// Count a reconcile, its duration and its failure reason.
    pub fn observe(&self, controller: &'static str, elapsed: Duration, failure: Option<String>) {
        let l = ControllerLabel { controller };
        self.metrics.reconciles.get_or_create(&l).inc();
        self.metrics.reconcile_duration.get_or_create(&l).observe(elapsed.as_secs_f64());
        if let Some(reason) = failure {
            self.metrics.failures.get_or_create(&FailureLabel { controller, reason }).inc();
        }
    }

    /// The error policy every controller shares.
    pub fn on_error(&self, controller: &'static str, e: &Error) -> Action {
        self.metrics
            .failures
            .get_or_create(&FailureLabel {
                controller,
                reason: e.metric_label(),
            })
            .inc();
        if e.is_permanent() {
            Action::await_change()
        } else {
            Action::requeue(self.timing.retry)
        }
    }
}
