//! Deletion: `deletionPolicy: Retain` (the default) leaves tables and topics and needs no
//! finalizer; `Delete` puts a finalizer on the object (kube's finalizer helper) so its cleanup
//! runs, and finishes, before the object goes. A cleanup that cannot finish yet says why in
//! Ready (reason DeletionBlocked) and keeps the finalizer.

use std::sync::Arc;

use kube::{
    api::{Api, Patch, PatchParams},
    runtime::{
        controller::Action,
        finalizer::{self, finalizer, Event},
    },
    Resource, ResourceExt,
};

use super::{
    reconciler::{is_paused, Kind, Reconciler},
    status, Context, Error,
};
use crate::{
    conditions::{condition, reason, Cond},
    crd::DeletionPolicy,
};

/// The finalizer of objects with `deletionPolicy: Delete`.
pub const FINALIZER: &str = "lockstep.dev/cleanup";

/// How a reconcile treats the object's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// No finalizer wanted or held: reconcile as usual.
    Plain,
    /// Through kube's finalizer helper: it adds the finalizer, or runs the cleanup on deletion.
    Finalized,
    /// The policy went back to Retain: take the finalizer off, then reconcile as usual.
    DropFinalizer,
    /// Being deleted with nothing of ours to clean: leave it alone.
    Gone,
}

/// Pure: `policy` None means the kind has nothing to clean up outside Kubernetes.
pub fn route(policy: Option<DeletionPolicy>, has_finalizer: bool, deleting: bool) -> Route {
    let wants = policy == Some(DeletionPolicy::Delete);
    match (has_finalizer, deleting) {
        (true, true) => Route::Finalized,
        (false, true) => Route::Gone,
        (true, false) if !wants => Route::DropFinalizer,
        (_, false) if wants => Route::Finalized,
        _ => Route::Plain,
    }
}

pub fn route_of<R: Reconciler>(obj: &R::K) -> Route {
    route(
        R::deletion_policy(obj),
        obj.finalizers().iter().any(|f| f == FINALIZER),
        obj.meta().deletion_timestamp.is_some(),
    )
}

/// Run `apply` (the usual reconcile) or the cleanup, through kube's finalizer helper.
pub async fn finalized<R, F>(obj: &R::K, api: &Api<R::K>, ctx: &Context, apply: F) -> Result<Action, Error>
where
    R: Reconciler,
    F: std::future::Future<Output = Result<Action, Error>>,
{
    let r = finalizer(api, FINALIZER, Arc::new(obj.clone()), |event| async move {
        match event {
            Event::Apply(_) => apply.await,
            Event::Cleanup(k) => clean::<R>(&k, api, ctx).await,
        }
    })
    .await;
    r.map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

/// Take our finalizer off (the policy is Retain again); the patch fails rather than remove
/// another finalizer if the list changed meanwhile.
pub async fn drop_finalizer<K>(obj: &K, api: &Api<K>) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some(i) = obj.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let patch = serde_json::json!([
        {"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{i}")},
    ]);
    let patch: json_patch::Patch = serde_json::from_value(patch).expect("static patch");
    api.patch(&obj.name_any(), &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .map_err(|e| Error::Finalizer(e.to_string()))?;
    Ok(())
}

/// The cleanup on deletion: nothing under Retain; otherwise the kind's own, which must finish
/// before the finalizer is removed. Paused or invalid objects wait, and say so.
async fn clean<R: Reconciler>(obj: &R::K, api: &Api<R::K>, ctx: &Context) -> Result<Action, Error> {
    if R::deletion_policy(obj) != Some(DeletionPolicy::Delete) {
        return Ok(Action::await_change());
    }
    let blocked = if is_paused(obj) {
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
            let c = Cond::no(condition::READY, reason::DELETION_BLOCKED, message.clone());
            let previous = obj.current_status();
            let (st, flipped) = status::merged(previous.clone(), obj.meta().generation, &[c], &status::now());
            status::write(ctx, api, obj, R::MANAGER, &previous, &st, &flipped).await?;
            Err(Error::DeletionBlocked(message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeletionPolicy::{Delete, Retain};

    #[test]
    fn only_delete_holds_a_finalizer() {
        assert_eq!(route(Some(Retain), false, false), Route::Plain);
        assert_eq!(route(None, false, false), Route::Plain);
        assert_eq!(route(Some(Delete), false, false), Route::Finalized, "added");
        assert_eq!(route(Some(Delete), true, false), Route::Finalized);
        assert_eq!(route(Some(Retain), true, false), Route::DropFinalizer, "policy changed back");
    }

    #[test]
    fn deletion_cleans_only_what_holds_our_finalizer() {
        assert_eq!(route(Some(Delete), true, true), Route::Finalized);
        // Retain with our finalizer still on (switched just before deleting): the helper removes it.
        assert_eq!(route(Some(Retain), true, true), Route::Finalized);
        assert_eq!(route(Some(Delete), false, true), Route::Gone);
        assert_eq!(route(Some(Retain), false, true), Route::Gone);
    }
}
