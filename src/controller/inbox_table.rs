//! InboxTable: Secret -> database -> migrate -> effective retention -> purge loop -> status.

use std::sync::Arc;

use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    api::Api,
    core::{DeserializeGuard, PartialObjectMeta},
    runtime::{
        controller::{Action, Controller},
        predicates,
        reflector::{self, ObjectRef, Store},
        utils::Predicate,
        watcher, WatchStreamExt,
    },
    Client, Resource, ResourceExt,
};

use super::{is_paused, now, requeue, secret_url, Context, Error};
use crate::{
    conditions::{self, reason, Cond},
    crd::{condition, DedupPolicy, InboxTable, InboxTableStatus, PurgeStatus},
    purge::{LastPurge, PurgeParams},
    retention::{self, Compliance},
    schema::{migrate, SchemaError, TableKind},
};

/// The server-side apply field manager of this controller's status writes.
pub const MANAGER: &str = "lockstep-inboxtable";
const NAME: &str = "inboxtable";

type Guarded = DeserializeGuard<InboxTable>;
type BoxStream<T> = std::pin::Pin<Box<dyn Stream<Item = T> + Send>>;

/// Watches and caches the InboxTable controller uses, built before the shared context.
pub struct Parts {
    pub inboxes: Store<Guarded>,
    pub policies: Store<DeserializeGuard<DedupPolicy>>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    inbox_stream: BoxStream<Result<Guarded, watcher::Error>>,
    policy_stream: BoxStream<Result<DeserializeGuard<DedupPolicy>, watcher::Error>>,
    ns_stream: BoxStream<Result<PartialObjectMeta<Namespace>, watcher::Error>>,
}

impl Parts {
    pub fn new(client: &Client, namespace: Option<&str>) -> Self {
        let inbox_api: Api<Guarded> = match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let (inboxes, w1) = reflector::store();
        let (policies, w2) = reflector::store();
        let (namespaces, w3) = reflector::store();
        // Spec and annotation changes only: our own status writes must not start reconciles.
        let inbox_stream = watcher(inbox_api, watcher::Config::default())
            .default_backoff()
            .reflect(w1)
            .applied_objects()
            .predicate_filter(predicates::generation.combine(predicates::annotations), Default::default())
            .boxed();
        let policy_stream = watcher(
            Api::<DeserializeGuard<DedupPolicy>>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(w2)
        .touched_objects()
        .predicate_filter(predicates::generation, Default::default())
        .boxed();
        let ns_stream = watcher(Api::<PartialObjectMeta<Namespace>>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .reflect(w3)
            .touched_objects()
            .predicate_filter(predicates::labels, Default::default())
            .boxed();
        Parts {
            inboxes,
            policies,
            namespaces,
            inbox_stream,
            policy_stream,
            ns_stream,
        }
    }
}

pub async fn controller(
    parts: Parts,
    purged: tokio::sync::mpsc::UnboundedReceiver<ObjectRef<Guarded>>,
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let all = parts.inboxes.clone();
    let in_ns = parts.inboxes.clone();
    let purged = futures::stream::unfold(purged, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let c = Controller::for_stream(parts.inbox_stream, parts.inboxes)
        // A policy change re-reconciles every InboxTable (its selector may now match or not).
        .watches_stream(parts.policy_stream, move |_| {
            all.state().iter().map(|o| ObjectRef::from_obj(&**o)).collect::<Vec<_>>()
        })
        // A namespace's labels decide which policies select its tables.
        .watches_stream(parts.ns_stream, move |ns| {
            let name = ns.name_any();
            in_ns
                .state()
                .iter()
                .filter(|o| o.namespace().as_deref() == Some(&name))
                .map(|o| ObjectRef::from_obj(&**o))
                .collect::<Vec<_>>()
        })
        .reconcile_on(purged)
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

/// Returns the action and, when Ready is not True, its reason (for the failure metric).
async fn reconcile_inner(obj: &Guarded, ctx: &Context) -> Result<(Action, Option<String>), Error> {
    let ns = obj.namespace().ok_or(Error::MissingNamespace)?;
    let name = obj.name_any();
    let uid = obj.uid().unwrap_or_default();
    let api: Api<InboxTable> = Api::namespaced(ctx.client.clone(), &ns);

    let inbox = match &obj.0 {
        Ok(i) => i,
        Err(invalid) => {
            ctx.purges.stop(&uid);
            return super::report_unreadable(&api, &name, MANAGER, obj.meta().generation, &invalid.error).await;
        }
    };
    let previous = inbox.status.clone().unwrap_or_default();
    let generation = inbox.metadata.generation;
    tracing::debug!(%ns, %name, "reconcile start");

    if is_paused(inbox) {
        ctx.purges.stop(&uid);
        let c = Cond::no(
            condition::READY,
            reason::PAUSED,
            format!("annotation {}=true: not reconciling, not purging", crate::crd::PAUSED_ANNOTATION),
        );
        let (status, flipped) = finish(&previous, generation, vec![c]);
        super::write_status(ctx, &api, inbox, MANAGER, status != previous, &status, &flipped)
            .boxed()
            .await?;
        return Ok((Action::await_change(), Some(reason::PAUSED.into())));
    }

    let valid = match inbox.spec.validate() {
        Ok(v) => v,
        Err(e) => {
            ctx.purges.stop(&uid);
            let c = Cond::no(condition::READY, reason::INVALID_SPEC, e.to_string());
            let (status, flipped) = finish(&previous, generation, vec![c]);
            super::write_status(ctx, &api, inbox, MANAGER, status != previous, &status, &flipped)
                .boxed()
                .await?;
            return Ok((Action::await_change(), Some(reason::INVALID_SPEC.into())));
        }
    };

    // Retention under the policies that select this table.
    if !ctx.caches_ready().await {
        tracing::debug!(%ns, %name, "caches not ready; requeue");
        return Ok((Action::requeue(std::time::Duration::from_secs(1)), None));
    }
    let requested = inbox.spec.retention.as_ref().zip(valid.retention).map(|(d, v)| (d.0.as_str(), v));
    let eff = retention::effective(
        &ns,
        &name,
        &ctx.namespace_labels(&ns),
        requested,
        &ctx.valid_policies(),
        k8s_openapi::jiff::Timestamp::now(),
    );
    let policy_cond = match &eff.compliance {
        Compliance::NoPolicy => Cond::yes(condition::POLICY_COMPLIANT, reason::NO_POLICY, eff.message.clone()),
        Compliance::Within => Cond::yes(condition::POLICY_COMPLIANT, reason::WITHIN_POLICY, eff.message.clone()),
        Compliance::Clamped { .. } => Cond::yes(condition::POLICY_COMPLIANT, reason::RETENTION_CLAMPED, eff.message.clone()),
        Compliance::Violation { .. } => Cond::no(condition::POLICY_COMPLIANT, reason::POLICY_VIOLATION, eff.message.clone()),
    };

    tracing::debug!(%ns, %name, retention = %eff.text, "retention computed");
    // Database and schema.
    let table = &valid.table;
    let mut pool = None;
    let schema_cond = match secret_url(&ctx.client, &ns, &inbox.spec.database.url_secret_ref).boxed().await {
        Err(c) => c,
        Ok(url) => match ctx.pools.get(&url) {
            Err(e) => Cond::no(condition::SCHEMA_READY, reason::DATABASE_ERROR, e.to_string()),
            Ok(p) => {
                let where_ = crate::config::describe_database_url(url.expose());
                match p.acquire().await {
                    Err(e) => Cond::no(
                        condition::SCHEMA_READY,
                        super::db_reason(&e),
                        format!("cannot connect to {where_}: {e}"),
                    ),
                    Ok(mut conn) => match migrate(&mut conn, TableKind::Inbox, table, inbox.spec.database.manage_schema)
                        .boxed()
                        .await
                    {
                        Ok(o) => {
                            pool = Some((p.clone(), crate::db::url_key(&url)));
                            let how = if o.adopted { "adopted an existing matching table, " } else { "" };
                            Cond::yes(
                                condition::SCHEMA_READY,
                                reason::SCHEMA_UP_TO_DATE,
                                format!("{table}: {how}schema version {}", o.version),
                            )
                        }
                        Err(SchemaError::Mismatch { differences, .. }) => Cond::no(
                            condition::SCHEMA_READY,
                            reason::SCHEMA_MISMATCH,
                            format!(
                                "{table} exists but does not match the inbox contract, left untouched: {}",
                                differences.join("; ")
                            ),
                        ),
                        Err(e @ SchemaError::Missing { .. }) => Cond::no(condition::SCHEMA_READY, reason::SCHEMA_MISSING, e.to_string()),
                        Err(SchemaError::Database(e)) => Cond::no(condition::SCHEMA_READY, super::db_reason(&e), format!("{where_}: {e}")),
                        Err(e) => Cond::no(condition::SCHEMA_READY, reason::SCHEMA_MISMATCH, e.to_string()),
                    },
                }
            }
        },
    };

    tracing::debug!(%ns, %name, schema = ?schema_cond.reason, "schema checked");
    // Purge and measurements.
    let mut rows = None;
    let mut oldest = None;
    let retention_cond = match &pool {
        None => {
            ctx.purges.stop(&uid);
            Cond::unknown(condition::RETENTION_ENFORCED, reason::PURGE_PENDING, "waiting for SchemaReady")
        }
        Some((p, url_key)) => {
            ctx.purges.ensure(
                &uid,
                ObjectRef::from_obj(obj),
                p.clone(),
                PurgeParams {
                    pool_key: url_key.clone(),
                    table: table.clone(),
                    retention: eff.retention,
                    interval: valid.purge_interval,
                    batch: valid.purge_batch_size,
                },
            );
            if let Ok((r, o)) = crate::purge::measure(p, table).boxed().await {
                rows = Some(r);
                oldest = o;
            }
            match ctx.purges.last(&uid) {
                None => Cond::unknown(
                    condition::RETENTION_ENFORCED,
                    reason::PURGE_PENDING,
                    "the first purge has not finished yet",
                ),
                Some(LastPurge::Done { result, .. }) => Cond::yes(
                    condition::RETENTION_ENFORCED,
                    reason::PURGE_HEALTHY,
                    format!(
                        "purging rows older than {} every {}; last run deleted {} rows",
                        eff.text, inbox.spec.purge.interval, result.rows_deleted
                    ),
                ),
                Some(LastPurge::Failed { error, unreachable, .. }) => Cond::no(
                    condition::RETENTION_ENFORCED,
                    if unreachable {
                        reason::DATABASE_UNREACHABLE
                    } else {
                        reason::PURGE_FAILED
                    },
                    format!("the last purge failed: {error}"),
                ),
            }
        }
    };
    let last_purge = match ctx.purges.last(&uid) {
        Some(LastPurge::Done { at, result }) => Some(PurgeStatus {
            time: at,
            rows_deleted: result.rows_deleted,
            duration_seconds: (result.duration.as_secs_f64() * 1000.0).round() / 1000.0,
        }),
        _ => previous.last_purge.clone(),
    };

    let covered_cond = dedup_covered(ctx, &ns, inbox, &valid, &eff).boxed().await;
    let mut parts = vec![&schema_cond, &retention_cond];
    if eff.require_coverage {
        parts.push(&covered_cond);
    }
    let ready = conditions::ready(&parts, format!("{table} deduplicates with retention {}", eff.text));
    let failure = (ready.status != conditions::Status::True).then(|| ready.reason.to_string());
    let healing = schema_cond.status != conditions::Status::True;
    let (mut status, flipped) = finish(
        &previous,
        generation,
        vec![ready, schema_cond, retention_cond, policy_cond, covered_cond],
    );
    status.effective_retention = Some(eff.text.clone());
    status.policies = eff.policies.clone();
    status.rows = rows.or(status.rows);
    status.oldest_entry_age_seconds = oldest;
    status.last_purge = last_purge;
    super::write_status(ctx, &api, inbox, MANAGER, status != previous, &status, &flipped)
        .boxed()
        .await?;
    let action = if healing {
        Action::requeue(ctx.retry)
    } else {
        requeue(ctx.refresh, eff.next_change.as_ref())
    };
    Ok((action, failure))
}

/// DedupCovered: does the effective retention outlive every redelivery from the source topics?
async fn dedup_covered(
    ctx: &Context,
    ns: &str,
    inbox: &InboxTable,
    valid: &crate::crd::ValidInboxTable,
    eff: &retention::Effective,
) -> Cond {
    let window = inbox
        .spec
        .redelivery_window
        .as_ref()
        .zip(valid.redelivery_window)
        .map(|(d, v)| (d.0.as_str(), v));
    let Some(k) = inbox.spec.sources.as_ref().and_then(|s| s.kafka.as_ref()) else {
        return match window {
            Some(_) => verdict(retention::coverage(eff.retention, &eff.text, window, &[])),
            None => Cond::unknown(
                condition::DEDUP_COVERED,
                reason::NO_SOURCES,
                "no spec.sources.kafka and no redeliveryWindow: lockstep cannot check that the retention outlives redelivery",
            ),
        };
    };
    let settings = match &k.auth_secret_ref {
        None => Default::default(),
        Some(r) => match super::secret_settings(&ctx.client, ns, &r.name).await {
            Ok(s) => s,
            Err(m) => return Cond::unknown(condition::DEDUP_COVERED, reason::SECRET_NOT_FOUND, m),
        },
    };
    let described = match ctx.admins.get(&k.bootstrap_servers, &settings) {
        Ok(a) => a.describe(&k.topics).await,
        Err(e) => Err(e),
    };
    let observed = match described {
        Ok(o) => o,
        Err(e) => {
            let r = if e.is_unreachable() {
                reason::BROKER_UNREACHABLE
            } else {
                reason::TOPIC_OPERATION_FAILED
            };
            return Cond::unknown(condition::DEDUP_COVERED, r, e.to_string());
        }
    };
    if window.is_none() {
        let missing: Vec<&String> = k.topics.iter().filter(|t| !observed.contains_key(*t)).collect();
        if !missing.is_empty() {
            let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
            return Cond::unknown(
                condition::DEDUP_COVERED,
                reason::TOPIC_NOT_FOUND,
                format!("source topic(s) not found: {}", names.join(", ")),
            );
        }
    }
    let topics: Vec<(String, Option<i64>)> = k
        .topics
        .iter()
        .map(|t| {
            (
                t.clone(),
                observed
                    .get(t)
                    .and_then(|o| o.config.get("retention.ms"))
                    .and_then(|v| v.parse().ok()),
            )
        })
        .collect();
    verdict(retention::coverage(eff.retention, &eff.text, window, &topics))
}

fn verdict(c: retention::Coverage) -> Cond {
    if c.covered {
        Cond::yes(condition::DEDUP_COVERED, reason::RETENTION_COVERS_REDELIVERY, c.message)
    } else {
        Cond::no(condition::DEDUP_COVERED, reason::RETENTION_BELOW_TOPIC_RETENTION, c.message)
    }
}

/// The previous status with newly computed conditions merged in.
fn finish(previous: &InboxTableStatus, generation: Option<i64>, computed: Vec<Cond>) -> (InboxTableStatus, Vec<Cond>) {
    let (conds, flipped) = conditions::merge(&previous.conditions, &computed, generation, &now());
    let mut status = previous.clone();
    status.observed_generation = generation;
    status.conditions = conds;
    (status, flipped)
}
