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

use super::Error;
use crate::crd::DeletionPolicy;

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

pub fn route_of<K: Resource>(obj: &K, policy: Option<DeletionPolicy>) -> Route {
    route(
        policy,
        obj.finalizers().iter().any(|f| f == FINALIZER),
        obj.meta().deletion_timestamp.is_some(),
    )
}

/// Run `apply` (the usual reconcile) or `cleanup` (on deletion), through kube's finalizer helper.
pub async fn finalized<K, A, C>(obj: &K, api: &Api<K>, apply: A, cleanup: C) -> Result<Action, Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    A: std::future::Future<Output = Result<Action, Error>>,
    C: std::future::Future<Output = Result<Action, Error>>,
{
    let r = finalizer(api, FINALIZER, Arc::new(obj.clone()), |event| async move {
        match event {
            Event::Apply(_) => apply.await,
            Event::Cleanup(_) => cleanup.await,
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
