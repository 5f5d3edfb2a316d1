//! The operator: controllers for InboxTable and DedupPolicy (OutboxRelay follows), run by the
//! replica that holds the leader Lease, with /metrics, /healthz and /readyz.

pub mod dedup_policy;
pub mod inbox_table;
pub mod outbox_relay;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{Namespace, Secret},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    api::{Api, Patch, PatchParams},
    core::{DeserializeGuard, PartialObjectMeta},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
    },
    Client, Resource, ResourceExt,
};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    conditions::{self, reason, Cond, Status},
    config::{OperatorArgs, Redacted},
    crd::{DedupPolicy, InboxTable, SecretKeyRef},
    db::Pools,
    leader::LeaderElector,
    metrics::{ControllerLabel, FailureLabel, Health, Metrics},
    purge::Purges,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("the object has no namespace")]
    MissingNamespace,
    #[error("cannot serialize status: {0}")]
    Serialize(#[from] serde_json::Error),
}

impl Error {
    pub fn metric_label(&self) -> String {
        match self {
            Error::Kube(_) => "KubeError".into(),
            Error::MissingNamespace => "MissingNamespace".into(),
            Error::Serialize(_) => "SerializeError".into(),
        }
    }

    /// Permanent errors wait for the object to change; transient ones are retried.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Error::MissingNamespace | Error::Serialize(_))
    }
}

/// What the controllers share.
pub struct Context {
    pub client: Client,
    pub pools: Pools,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub purges: Purges<ObjectRef<DeserializeGuard<InboxTable>>>,
    pub admins: crate::kafka::AdminCache,
    pub policies: Store<DeserializeGuard<DedupPolicy>>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub inboxes: Store<DeserializeGuard<InboxTable>>,
    /// How often measured status (rows, ages, purge results) is refreshed.
    pub refresh: Duration,
    /// Retry delay for conditions that heal by themselves (database down, Secret missing).
    pub retry: Duration,
}

impl Context {
    /// Policy and namespace caches must be filled before any retention is computed: an empty cache
    /// would look like "no policy" and purge with a shorter retention than a policy demands.
    /// Bounded: a reconcile that finds them not ready yet requeues instead of waiting (an
    /// unbounded wait here was seen to never wake, holding the object's reconcile slot forever).
    pub async fn caches_ready(&self) -> bool {
        let wait = async {
            let _ = self.policies.wait_until_ready().await;
            let _ = self.namespaces.wait_until_ready().await;
        };
        tokio::time::timeout(Duration::from_secs(2), wait).await.is_ok()
    }

    pub fn namespace_labels(&self, ns: &str) -> std::collections::BTreeMap<String, String> {
        self.namespaces
            .get(&ObjectRef::new(ns))
            .map(|n| n.labels().clone())
            .unwrap_or_default()
    }

    /// Valid policies, for retention computation.
    pub fn valid_policies(&self) -> Vec<crate::retention::PolicyView> {
        self.policies
            .state()
            .iter()
            .filter_map(|p| {
                let p = p.0.as_ref().ok()?;
                p.spec.validate().ok()?;
                Some(crate::retention::PolicyView {
                    name: p.name_any(),
                    spec: p.spec.clone(),
                })
            })
            .collect()
    }

    pub fn observe(&self, controller: &'static str, elapsed: Duration, failure: Option<String>) {
        let l = ControllerLabel { controller };
        self.metrics.reconciles.get_or_create(&l).inc();
        self.metrics.reconcile_duration.get_or_create(&l).observe(elapsed.as_secs_f64());
        if let Some(reason) = failure {
            self.metrics.failures.get_or_create(&FailureLabel { controller, reason }).inc();
        }
    }

    /// One Event per condition whose status flipped.
    pub async fn publish_flips<K: Resource<DynamicType = ()>>(&self, obj: &K, flipped: &[Cond]) {
        // Events about cluster-scoped objects (DedupPolicy) are rejected by some API servers
        // (1.20 demands a namespace); their status carries the same information.
        if obj.meta().namespace.is_none() {
            return;
        }
        for c in flipped {
            let ev = Event {
                type_: if c.status == Status::False {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: c.reason.to_owned(),
                note: Some(format!("{} is {}: {}", c.type_, c.status.as_str(), truncate(&c.message, 1000))),
                action: "Reconcile".into(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
                tracing::warn!(error = %e, "cannot publish Event");
            }
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

pub fn now() -> Time {
    Time(Timestamp::now())
}

/// Server-side apply of a status, with apiVersion and kind, under one field manager per controller.
pub async fn apply_status<K>(api: &Api<K>, name: &str, manager: &str, status: &impl Serialize) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(name, &PatchParams::apply(manager).force(), &Patch::Apply(&patch))
        .await?;
    Ok(())
}

/// Read a database URL from a Secret key; failures are conditions for SchemaReady.
pub async fn secret_url(client: &Client, ns: &str, r: &SecretKeyRef) -> Result<Redacted, Cond> {
    use crate::crd::condition::SCHEMA_READY;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    match secrets.get_opt(&r.name).await {
        Ok(None) => Err(Cond::no(
            SCHEMA_READY,
            reason::SECRET_NOT_FOUND,
            format!(
                "Secret {ns}/{} not found; create it with the database URL under key {:?}",
                r.name, r.key
            ),
        )),
        Err(e) => Err(Cond::unknown(
            SCHEMA_READY,
            reason::SECRET_NOT_FOUND,
            format!("cannot read Secret {ns}/{}: {e}", r.name),
        )),
        Ok(Some(s)) => {
            let value = s.data.as_ref().and_then(|d| d.get(&r.key)).map(|b| b.0.clone());
            match value.map(String::from_utf8) {
                Some(Ok(v)) if !v.trim().is_empty() => Ok(Redacted::new(v.trim().to_owned())),
                _ => Err(Cond::no(
                    SCHEMA_READY,
                    reason::SECRET_KEY_MISSING,
                    format!("Secret {ns}/{} has no non-empty key {:?} holding the database URL", r.name, r.key),
                )),
            }
        }
    }
}

/// All keys of a Secret as librdkafka settings (SASL/TLS), for `kafka.authSecretRef`.
pub async fn secret_settings(client: &Client, ns: &str, name: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    match secrets.get_opt(name).await {
        Ok(Some(s)) => Ok(s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).trim_end().to_owned()))
            .collect()),
        Ok(None) => Err(format!("Secret {ns}/{name} (kafka.authSecretRef) not found")),
        Err(e) => Err(format!("cannot read Secret {ns}/{name}: {e}")),
    }
}

pub fn is_paused<K: ResourceExt>(obj: &K) -> bool {
    obj.annotations().get(crate::crd::PAUSED_ANNOTATION).is_some_and(|v| v == "true")
}

/// Requeue after `refresh`, or earlier when the outcome changes by itself at `next_change`.
pub fn requeue(refresh: Duration, next_change: Option<&Time>) -> Action {
    let until = next_change.and_then(|t| {
        let d = t.0.duration_since(Timestamp::now());
        (d.as_secs_f64() > 0.0).then(|| Duration::from_secs_f64(d.as_secs_f64()) + Duration::from_millis(100))
    });
    Action::requeue(until.map_or(refresh, |u| u.min(refresh)))
}

/// Run the operator until `stop` is cancelled. With leader election, controllers run only while
/// this replica holds the Lease; losing it ends the run with an error (the Pod restarts).
pub async fn run(client: Client, args: OperatorArgs, stop: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let addr = crate::metrics::serve(
        args.metrics_addr,
        {
            let m = metrics.clone();
            Arc::new(move || m.render())
        },
        health.clone(),
        stop.clone().cancelled_owned(),
    )
    .await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");

    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("lockstep-{}", uuid::Uuid::new_v4().simple()));
    let (lead_tx, mut leading) = watch::channel(!args.leader_election);
    let elector_stop = CancellationToken::new();
    let elector = if args.leader_election {
        let e = LeaderElector::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
            Duration::from_secs(15),
        );
        Some(tokio::spawn(e.run(lead_tx, elector_stop.clone())))
    } else {
        None
    };
    health.ready.store(true, std::sync::atomic::Ordering::Relaxed);

    tracing::info!(%identity, "waiting for leadership");
    tokio::select! {
        _ = stop.cancelled() => { elector_stop.cancel(); return Ok(()); }
        r = leading.wait_for(|l| *l) => { r?; }
    }
    metrics.leader.set(1);
    tracing::info!(%identity, "leading: starting controllers");

    let ctl_stop = CancellationToken::new();
    let controllers = tokio::spawn(run_controllers(
        client.clone(),
        args.clone(),
        metrics.clone(),
        identity.clone(),
        ctl_stop.clone(),
    ));
    let lost = tokio::select! {
        _ = stop.cancelled() => false,
        _ = leading.wait_for(|l| !*l) => true,
    };
    ctl_stop.cancel();
    let _ = controllers.await;
    metrics.leader.set(0);
    elector_stop.cancel();
    if let Some(e) = elector {
        let _ = e.await;
    }
    if lost {
        anyhow::bail!("lost the leader Lease; exiting so a fresh replica can take over");
    }
    Ok(())
}

async fn run_controllers(client: Client, args: OperatorArgs, metrics: Arc<Metrics>, identity: String, stop: CancellationToken) {
    let reporter = Reporter {
        controller: "lockstep-operator".into(),
        instance: Some(identity),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
    let parts = inbox_table::Parts::new(&client, args.watch_namespace.as_deref());
    let ctx = Arc::new(Context {
        client: client.clone(),
        pools: Pools::new(4),
        metrics: metrics.clone(),
        recorder,
        purges: Purges::new(done_tx, metrics.clone()),
        admins: Default::default(),
        policies: parts.policies.clone(),
        namespaces: parts.namespaces.clone(),
        inboxes: parts.inboxes.clone(),
        refresh: Duration::from_secs(15),
        retry: Duration::from_secs(5),
    });
    let inbox = inbox_table::controller(parts, done_rx, ctx.clone(), stop.clone().cancelled_owned());
    let policy = dedup_policy::controller(
        &client,
        args.watch_namespace.as_deref(),
        ctx.clone(),
        stop.clone().cancelled_owned(),
    );
    let relay = outbox_relay::controller(
        &client,
        args.watch_namespace.as_deref(),
        ctx.clone(),
        stop.clone().cancelled_owned(),
    );
    // Purge loops of deleted InboxTables end here.
    let sweep = {
        let ctx = ctx.clone();
        let stop = stop.clone();
        async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                let live: std::collections::HashSet<String> = ctx.inboxes.state().iter().filter_map(|o| o.uid()).collect();
                ctx.purges.retain(|uid| live.contains(uid));
            }
        }
    };
    futures::future::join4(inbox, policy, relay, sweep).await;
    ctx.purges.retain(|_| false);
}

/// Run one reconcile, timing it and counting it (and its failure reason) in the metrics.
pub async fn timed(
    ctx: &Context,
    controller: &'static str,
    object: (String, Option<String>),
    fut: futures::future::BoxFuture<'_, Result<(Action, Option<String>), Error>>,
) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let r = fut.await;
    let failure = match &r {
        Ok((_, f)) => f.clone(),
        Err(e) => Some(e.metric_label()),
    };
    let (name, namespace) = object;
    tracing::debug!(controller, %name, ?namespace, elapsed_ms = started.elapsed().as_millis() as u64, ?failure, "reconciled");
    ctx.observe(controller, started.elapsed(), failure);
    r.map(|(a, _)| a)
}

/// The error policy every controller shares: permanent errors wait for a change, others retry.
pub fn on_error(controller: &'static str, e: &Error, ctx: &Context) -> Action {
    ctx.metrics
        .failures
        .get_or_create(&FailureLabel {
            controller,
            reason: e.metric_label(),
        })
        .inc();
    if e.is_permanent() {
        Action::await_change()
    } else {
        Action::requeue(ctx.retry)
    }
}

/// Why a database operation failed, as a condition reason.
pub fn db_reason(e: &sqlx::Error) -> &'static str {
    if crate::db::is_unreachable(e) {
        reason::DATABASE_UNREACHABLE
    } else {
        reason::DATABASE_ERROR
    }
}

/// Write a status when it changed, and an Event per flipped condition.
pub async fn write_status<K, S>(
    ctx: &Context,
    api: &Api<K>,
    obj: &K,
    manager: &str,
    changed: bool,
    status: &S,
    flipped: &[Cond],
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    if changed {
        apply_status(api, &obj.name_any(), manager, status).await?;
    }
    ctx.publish_flips(obj, flipped).await;
    Ok(())
}

/// An object the Rust type cannot read (DeserializeGuard): say so on it and wait for a fix.
pub async fn report_unreadable<K>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    generation: Option<i64>,
    error: &str,
) -> Result<(Action, Option<String>), Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let c = Cond::no(
        crate::crd::condition::READY,
        reason::INVALID_SPEC,
        format!("the object does not match the {} schema: {error}", K::kind(&())),
    );
    let (conds, _) = conditions::merge(&[], &[c], generation, &now());
    apply_status(api, name, manager, &serde_json::json!({ "conditions": conds })).await?;
    Ok((Action::await_change(), Some(reason::INVALID_SPEC.into())))
}

/// Drain a controller's output, logging what failed.
pub async fn drain<S, T, E>(name: &'static str, s: S)
where
    S: futures::Stream<Item = Result<T, E>>,
    E: std::fmt::Display,
{
    s.for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(controller = name, error = %e, "reconcile");
        }
    })
    .await;
}
