//! DedupPolicy: which InboxTables a policy selects and which of them are out of its bounds.

use std::sync::Arc;

use futures::FutureExt;

use kube::{
    api::Api,
    core::DeserializeGuard,
    runtime::{
        controller::{Action, Controller},
        predicates,
        reflector::ObjectRef,
        watcher, WatchStreamExt,
    },
    Client, Resource, ResourceExt,
};

use super::{apply_status, now, requeue, Context, Error};
use crate::{
    conditions::{self, reason, Cond},
    crd::{condition, DedupPolicy, DedupPolicyStatus, InboxTable, NonCompliant},
    retention::{self, Compliance, PolicyView},
};

/// The server-side apply field manager of this controller's status writes.
pub const MANAGER: &str = "lockstep-deduppolicy";
const NAME: &str = "deduppolicy";

type Guarded = DeserializeGuard<DedupPolicy>;

pub async fn controller(
    client: &Client,
    namespace: Option<&str>,
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<Guarded> = Api::all(client.clone());
    let inbox_api: Api<DeserializeGuard<InboxTable>> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let c = Controller::new(api, watcher::Config::default());
    let store = c.store();
    let all = store.clone();
    let all2 = store.clone();
    let inbox_changes = watcher(inbox_api, watcher::Config::default())
        .default_backoff()
        .touched_objects()
        .predicate_filter(predicates::generation, Default::default());
    let ns_changes = watcher(
        Api::<kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Namespace>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects()
    .predicate_filter(predicates::labels, Default::default());
    let c = c
        // An InboxTable appearing, changing or going away changes what a policy matches.
        .watches_stream(inbox_changes, move |_| {
            all.state().iter().map(|p| ObjectRef::from_obj(&**p)).collect::<Vec<_>>()
        })
        .watches_stream(ns_changes, move |_| {
            all2.state().iter().map(|p| ObjectRef::from_obj(&**p)).collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx);
    super::drain(NAME, c).await;
}

fn error_policy(_obj: Arc<Guarded>, e: &Error, ctx: Arc<Context>) -> Action {
    super::on_error(NAME, e, &ctx)
}

pub async fn reconcile(obj: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action, Error> {
    // Boxed so the compiler checks Send with concrete lifetimes (rust-lang/rust#100013).
    super::timed(&ctx, NAME, (obj.name_any(), obj.namespace()), reconcile_inner(&obj, &ctx).boxed()).await
}

async fn reconcile_inner(obj: &Guarded, ctx: &Context) -> Result<(Action, Option<String>), Error> {
    let name = obj.name_any();
    let api: Api<DedupPolicy> = Api::all(ctx.client.clone());
    let policy = match &obj.0 {
        Ok(p) => p,
        Err(invalid) => {
            return super::report_unreadable(&api, &name, MANAGER, obj.meta().generation, &invalid.error).await;
        }
    };
    let previous = policy.status.clone().unwrap_or_default();
    let generation = policy.metadata.generation;

    let (ready, matched, non_compliant, next_change) = match policy.spec.validate() {
        Err(e) => (Cond::no(condition::READY, reason::INVALID_SPEC, e.to_string()), 0, vec![], None),
        Ok(_) => {
            let inboxes_ready = tokio::time::timeout(std::time::Duration::from_secs(2), ctx.inboxes.wait_until_ready())
                .await
                .is_ok();
            if !ctx.caches_ready().await || !inboxes_ready {
                return Ok((Action::requeue(std::time::Duration::from_secs(1)), None));
            }
            let view = PolicyView {
                name: name.clone(),
                spec: policy.spec.clone(),
            };
            let now_ts = k8s_openapi::jiff::Timestamp::now();
            let mut matched = 0;
            let mut non_compliant = Vec::new();
            let mut next_change = None;
            let mut tables: Vec<_> = ctx.inboxes.state();
            tables.sort_by_key(|t| (t.namespace(), t.name_any()));
            for t in tables {
                let (Some(ns), Ok(inbox)) = (t.namespace(), t.0.as_ref()) else {
                    continue;
                };
                let labels = ctx.namespace_labels(&ns);
                if !retention::selector_matches(policy.spec.namespace_selector.as_ref(), &labels) {
                    continue;
                }
                matched += 1;
                let Ok(valid) = inbox.spec.validate() else { continue };
                let requested = inbox.spec.retention.as_ref().zip(valid.retention).map(|(d, v)| (d.0.as_str(), v));
                // This policy alone: which tables ask for something outside its bounds.
                let eff = retention::effective(&ns, &inbox.name_any(), &labels, requested, std::slice::from_ref(&view), now_ts);
                if let Some(t) = eff.next_change {
                    next_change = Some(next_change.map_or(
                        t.clone(),
                        |n: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time| if t.0 < n.0 { t } else { n },
                    ));
                }
                let reason = match eff.compliance {
                    Compliance::Clamped { .. } => Some(format!("{} (Enforce)", eff.message)),
                    Compliance::Violation { messages } => Some(messages.join("; ")),
                    _ => None,
                };
                if let Some(reason) = reason {
                    non_compliant.push(NonCompliant {
                        namespace: ns,
                        name: inbox.name_any(),
                        reason,
                    });
                }
            }
            let msg = format!("selects {matched} InboxTable(s), {} outside its bounds", non_compliant.len());
            (Cond::yes(condition::READY, reason::READY, msg), matched, non_compliant, next_change)
        }
    };
    let failure = (ready.status != conditions::Status::True).then(|| ready.reason.to_string());
    let (conds, flipped) = conditions::merge(&previous.conditions, &[ready], generation, &now());
    let status = DedupPolicyStatus {
        observed_generation: generation,
        conditions: conds,
        matched,
        non_compliant,
    };
    if status != previous {
        apply_status(&api, &name, MANAGER, &status).await?;
    }
    ctx.publish_flips(policy, &flipped).await;
    Ok((requeue(std::time::Duration::from_secs(60), next_change.as_ref()), failure))
}
