//! The steps every controller shares, in order: guard (unreadable, paused) -> validate -> the
//! kind's own fetch and verdict -> merge into status -> write if changed -> Events -> metrics.

use std::{fmt::Debug, sync::Arc, time::Instant};

use futures::{future::BoxFuture, FutureExt};
use kube::{api::Api, core::DeserializeGuard, runtime::controller::Action, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::{
    lifecycle::{self, Route},
    status::{self, Conditioned},
    Context, Error,
};
use crate::{
    core::validation::ValidationErrors,
    crd::{
        DedupPolicy, DedupPolicyStatus, DeletionPolicy, InboxTable, InboxTableStatus, OutboxRelay, OutboxRelayStatus, ValidDedupPolicy,
        ValidInboxTable, ValidOutboxRelay,
    },
    operator::conditions::{self, condition, Cond, Reason},
};

/// What a kind's reconcile decided.
pub enum Outcome<S> {
    /// New conditions (Ready first) over `status`, which carries the measured fields.
    Status { conditions: Vec<Cond>, status: S, action: Action },
    /// Nothing can be said yet (caches filling): look again later, write nothing.
    Later(Action),
}

/// A lockstep resource: its status, and its spec validated into the resolved type.
pub trait Kind: Resource<DynamicType = ()> + Clone + DeserializeOwned + serde::Serialize + Debug + Send + Sync + 'static {
    type Status: Conditioned;
    type Valid: Send;
    /// The current status (empty when none was written yet).
    fn current_status(&self) -> Self::Status;
    fn validate(&self) -> Result<Self::Valid, ValidationErrors>;
}

macro_rules! kind {
    ($($k:ty => $status:ty, $valid:ty;)*) => {$(
        impl Kind for $k {
            type Status = $status;
            type Valid = $valid;
            fn current_status(&self) -> $status {
                self.status.clone().unwrap_or_default()
            }
            fn validate(&self) -> Result<$valid, ValidationErrors> {
                self.spec.validate()
            }
        }
    )*};
}
kind! {
    InboxTable => InboxTableStatus, ValidInboxTable;
    OutboxRelay => OutboxRelayStatus, ValidOutboxRelay;
    DedupPolicy => DedupPolicyStatus, ValidDedupPolicy;
}

/// One kind's controller: what differs between kinds; `reconcile` below does the rest.
pub trait Reconciler: Send + Sync + 'static {
    type K: Kind;
    /// The controller's name in metrics and logs.
    const NAME: &'static str;
    /// The server-side apply field manager of its status writes.
    const MANAGER: &'static str;
    /// The Ready message when paused; None: the kind cannot be paused.
    const PAUSED: Option<&'static str>;

    fn api(ctx: &Context, namespace: Option<&str>) -> Result<Api<Self::K>, Error>;
    /// The object is no longer reconciled (unreadable, paused, invalid): stop what runs for it.
    fn halt(_ctx: &Context, _uid: &str) {}
    /// The object's deletionPolicy; None: the kind keeps nothing outside Kubernetes.
    fn deletion_policy(_obj: &Self::K) -> Option<DeletionPolicy> {
        None
    }
    /// deletionPolicy Delete: clean up outside Kubernetes before the object goes. Err says why
    /// it cannot finish yet (shown in Ready, retried; the finalizer stays).
    fn cleanup<'a>(_obj: &'a Self::K, _valid: Valid<Self>, _ctx: &'a Context) -> BoxFuture<'a, Result<(), String>> {
        futures::future::ready(Ok(())).boxed()
    }
    /// (recorded, named now) when the spec names another table than the one the object manages.
    fn table_change(_obj: &Self::K) -> Option<(String, String)> {
        None
    }
    /// Fetch what the object depends on and decide its conditions.
    fn reconcile<'a>(
        obj: &'a Self::K,
        valid: Valid<Self>,
        previous: &'a Status<Self>,
        ctx: &'a Context,
    ) -> BoxFuture<'a, Result<Outcome<Status<Self>>, Error>>;
}

pub type Status<R> = <<R as Reconciler>::K as Kind>::Status;
pub type Valid<R> = <<R as Reconciler>::K as Kind>::Valid;

/// The reconcile function handed to kube's Controller.
pub async fn reconcile<R: Reconciler>(obj: Arc<DeserializeGuard<R::K>>, ctx: Arc<Context>) -> Result<Action, Error> {
    // Held until the reconcile ends; a refresh without a free turn comes back later.
    let _turn = match turn::<R>(&obj, &ctx) {
        Ok(turn) => turn,
        Err(later) => return Ok(later),
    };
    let started = Instant::now();
    // Boxed so the compiler checks Send with concrete lifetimes (rust-lang/rust#100013).
    let r = run::<R>(&obj, &ctx).boxed().await;
    let failure = match &r {
        Ok((_, f)) => f.clone(),
        Err(e) => Some(e.metric_label()),
    };
    let (name, namespace) = (obj.name_any(), obj.namespace());
    let elapsed_ms = started.elapsed().as_millis() as u64;
    tracing::debug!(controller = R::NAME, %name, ?namespace, elapsed_ms, ?failure, "reconciled");
    ctx.observe(R::NAME, started.elapsed(), failure);
    r.map(|(a, _)| a)
}

/// A refresh (the status already shows this spec: the timer, a finished purge, a watched child
/// that changed) runs only with one of `--refresh-concurrency` turns free; without one it is
/// deferred by 1-3 s, waiting nowhere: a spec change of its object starts at once, never behind
/// it. Spec changes, first reconciles and deletions take no turn, nor do objects whose tables are
/// not ready (SchemaReady not True): they wait to heal (a Secret created, a database back), and
/// on a busy operator their retries would otherwise lose to the refreshes of healthy objects.
fn turn<R: Reconciler>(obj: &DeserializeGuard<R::K>, ctx: &Context) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, Action> {
    let (Some(turns), Ok(k)) = (&ctx.refreshes, &obj.0) else {
        return Ok(None);
    };
    let status = k.current_status();
    let tables_ready = conditions::status_of(status.conditions(), condition::SCHEMA_READY).is_none_or(|s| s == conditions::Status::True);
    let refresh = k.meta().deletion_timestamp.is_none()
        && status.observed_generation() == k.meta().generation
        && !status.conditions().is_empty()
        && tables_ready;
    if !refresh {
        return Ok(None);
    }
    match turns.clone().try_acquire_owned() {
        Ok(permit) => Ok(Some(permit)),
        Err(_) => {
            ctx.metrics.refreshes_deferred.inc();
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            Err(Action::requeue(std::time::Duration::from_millis(1000 + u64::from(nanos % 2000))))
        }
    }
}

/// The error policy handed to kube's Controller.
pub fn error_policy<R: Reconciler>(_obj: Arc<DeserializeGuard<R::K>>, e: &Error, ctx: Arc<Context>) -> Action {
    ctx.on_error(R::NAME, e)
}

/// Returns the action and, when Ready is not True, its reason (for the failure metric).
async fn run<R: Reconciler>(obj: &DeserializeGuard<R::K>, ctx: &Context) -> Result<(Action, Option<String>), Error> {
    let api = R::api(ctx, obj.meta().namespace.as_deref())?;
    let uid = obj.uid().unwrap_or_default();
    let k = match &obj.0 {
        Ok(k) => k,
        Err(invalid) => {
            R::halt(ctx, &uid);
            status::report_unreadable(&api, &obj.name_any(), R::MANAGER, obj.meta().generation, &invalid.error).await?;
            return Ok((Action::await_change(), Some(Reason::InvalidSpec.as_str().into())));
        }
    };
    match lifecycle::route_of(k, R::deletion_policy(k)) {
        Route::Gone => {
            R::halt(ctx, &uid);
            return Ok((Action::await_change(), None));
        }
        Route::DropFinalizer => lifecycle::drop_finalizer(k, &api).await?,
        Route::Finalized => {
            let mut failure = None;
            let apply = async {
                let (action, f) = reconcile_object::<R>(k, &uid, &api, ctx).boxed().await?;
                failure = f;
                Ok::<Action, Error>(action)
            };
            let action = lifecycle::finalized(k, &api, apply, clean::<R>(k, &api, ctx)).await?;
            return Ok((action, failure));
        }
        Route::Plain => {}
    }
    reconcile_object::<R>(k, &uid, &api, ctx).boxed().await
}

/// The cleanup on deletion: nothing under Retain; otherwise the kind's own, which must finish
/// before the finalizer is removed. Paused or invalid objects wait, and say so.
async fn clean<R: Reconciler>(obj: &R::K, api: &Api<R::K>, ctx: &Context) -> Result<Action, Error> {
    R::halt(ctx, &obj.uid().unwrap_or_default());
    if R::deletion_policy(obj) != Some(DeletionPolicy::Delete) {
        return Ok(Action::await_change());
    }
    let blocked = if let Some((was, now)) = R::table_change(obj) {
        Err(format!(
            "{}; cleanup (deletionPolicy: Delete) waits",
            table_change_message(&was, &now)
        ))
    } else if is_paused(obj) {
        Err(format!(
            "the object is paused ({}=true): its cleanup (deletionPolicy: Delete) waits until it is unpaused",
            crate::crd::PAUSED_ANNOTATION
        ))
    } else {
        match obj.validate() {
            Err(e) => Err(format!(
                "cannot clean up with an invalid spec ({e}); fix it, or set deletionPolicy: Retain to delete without cleaning up"
            )),
            Ok(valid) => R::cleanup(obj, valid, ctx).await,
        }
    };
    match blocked {
        Ok(()) => Ok(Action::await_change()),
        Err(message) => {
            let c = Cond::no(condition::READY, Reason::DeletionBlocked, message.clone());
            let previous = obj.current_status();
            let (st, flipped) = status::merged(previous.clone(), obj.meta().generation, &[c], &status::now());
            status::write(ctx, api, obj, R::MANAGER, &previous, &st, &flipped).await?;
            Err(Error::DeletionBlocked(message))
        }
    }
}

/// Guard, validate, the kind's reconcile, status.
async fn reconcile_object<R: Reconciler>(k: &R::K, uid: &str, api: &Api<R::K>, ctx: &Context) -> Result<(Action, Option<String>), Error> {
    let previous = k.current_status();
    let stopped = |reason: Reason, message: String| Outcome::Status {
        conditions: vec![Cond::no(condition::READY, reason, message)],
        status: previous.clone(),
        action: Action::await_change(),
    };
    let outcome = match (R::table_change(k), R::PAUSED, k.validate()) {
        // Nothing runs for either table: a loop left running for the recorded one would go on by
        // parameters no later verdict (pause, policies, retention) can reach.
        (Some((was, now)), _, _) => {
            R::halt(ctx, uid);
            stopped(Reason::TableChangeRefused, table_change_message(&was, &now))
        }
        (None, Some(message), _) if is_paused(k) => {
            R::halt(ctx, uid);
            stopped(
                Reason::Paused,
                format!("annotation {}=true: {message}", crate::crd::PAUSED_ANNOTATION),
            )
        }
        (None, _, Err(e)) => {
            R::halt(ctx, uid);
            stopped(Reason::InvalidSpec, e.to_string())
        }
        (None, _, Ok(valid)) => R::reconcile(k, valid, &previous, ctx).await?,
    };
    let (conditions, status, action) = match outcome {
        Outcome::Later(action) => return Ok((action, None)),
        Outcome::Status {
            conditions,
            status,
            action,
        } => (conditions, status, action),
    };
    let failure = failure_reason(&conditions);
    let (status, flipped) = status::merged(status, k.meta().generation, &conditions, &status::now());
    let noted = status::noted(&conditions, &flipped);
    status::write(ctx, api, k, R::MANAGER, &previous, &status, &noted).boxed().await?;
    Ok((action, failure))
}

fn table_change_message(was: &str, now: &str) -> String {
    format!(
        "this object manages table {was}; the spec now names {now}, which is refused (tables are immutable). \
         Put spec.database back to {was}, or create a new object for {now}"
    )
}

/// Ready's reason when Ready is not True.
fn failure_reason(conditions: &[Cond]) -> Option<String> {
    conditions
        .iter()
        .find(|c| c.type_ == condition::READY)
        .filter(|c| c.status != crate::operator::conditions::Status::True)
        .map(|c| c.reason.as_str().to_owned())
}

pub fn is_paused<K: ResourceExt>(obj: &K) -> bool {
    obj.annotations().get(crate::crd::PAUSED_ANNOTATION).is_some_and(|v| v == "true")
}

/// An Api for a namespaced kind in the object's namespace.
pub fn namespaced<K>(ctx: &Context, namespace: Option<&str>) -> Result<Api<K>, Error>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
    Ok(Api::namespaced(ctx.client.clone(), namespace.ok_or(Error::MissingNamespace)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_is_readys_reason_unless_ready() {
        let schema = Cond::no(condition::SCHEMA_READY, Reason::SchemaMismatch, "x");
        let ready = Cond::no(condition::READY, Reason::SchemaMismatch, "x");
        assert_eq!(failure_reason(&[ready, schema.clone()]).as_deref(), Some("SchemaMismatch"));
        let ok = Cond::yes(condition::READY, Reason::Ready, "ok");
        assert_eq!(failure_reason(&[ok, schema]), None);
        assert_eq!(failure_reason(&[]), None);
    }
}
