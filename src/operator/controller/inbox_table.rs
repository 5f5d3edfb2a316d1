//! InboxTable: guard -> validate -> effective retention -> database and schema -> purge loop and
//! measurements -> coverage of the source topics -> pure verdict -> status.

use futures::{future::BoxFuture, FutureExt};
use kube::{
    api::Api,
    core::DeserializeGuard,
    runtime::{
        controller::{Action, Controller},
        reflector::ObjectRef,
    },
    ResourceExt,
};
use tokio::sync::mpsc::UnboundedReceiver;

use super::{
    dedup_covered, deps,
    reconciler::{self, Outcome, Reconciler},
    status::requeue,
    watches::{every, label_changes, own_changes, spec_changes, Watches},
    Context, Error,
};
use crate::{
    crd::{InboxTable, InboxTableStatus, PurgeStatus, ValidInboxTable},
    operator::conditions::{self, condition, Cond, Reason, Status},
    operator::policy::retention::{self, Compliance, Effective},
    operator::purges::{LastPurge, PurgeParams},
    tables::schema::TableKind,
};

/// The server-side apply field manager of InboxTable status writes.
pub const MANAGER: &str = "lockstep-inboxtable";

pub struct InboxTables;

type Guarded = DeserializeGuard<InboxTable>;

/// Wire the controller to the shared watches: its own objects (spec and annotation changes only,
/// so status writes start nothing), every policy change (a selector may now match or not), the
/// labels of namespaces (they decide which policies select a table), and finished purges.
pub fn controller(
    watches: &mut Watches,
    purged: UnboundedReceiver<ObjectRef<Guarded>>,
    ctx: std::sync::Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> impl std::future::Future<Output = ()> {
    let store = watches.inboxes.store();
    let own = own_changes(watches.inboxes.subscribe());
    let policies = spec_changes(watches.policies.subscribe());
    let namespaces = label_changes(watches.namespaces.subscribe());
    let (all, in_ns) = (store.clone(), store.clone());
    let purged = futures::stream::unfold(purged, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let c = Controller::for_stream(own, store)
        .with_config(super::config())
        .watches_stream(policies, move |_| every(&all))
        .watches_stream(namespaces, move |ns| {
            let name = ns.name_any();
            let tables = in_ns.state();
            let here = tables.iter().filter(|o| o.namespace().as_deref() == Some(&name));
            here.map(|o| ObjectRef::from_obj(&**o)).collect::<Vec<_>>()
        })
        .reconcile_on(purged)
        .graceful_shutdown_on(shutdown)
        .run(reconciler::reconcile::<InboxTables>, reconciler::error_policy::<InboxTables>, ctx);
    super::drain(InboxTables::NAME, c)
}

impl Reconciler for InboxTables {
    type K = InboxTable;
    const NAME: &'static str = "inboxtable";
    const MANAGER: &'static str = MANAGER;
    const PAUSED: Option<&'static str> = Some("not reconciling, not purging");

    fn api(ctx: &Context, namespace: Option<&str>) -> Result<Api<InboxTable>, Error> {
        reconciler::namespaced(ctx, namespace)
    }
    fn halt(ctx: &Context, uid: &str) {
        ctx.purges.stop(uid);
    }
    fn table_change(obj: &InboxTable) -> Option<(String, String)> {
        obj.spec.database.table_change(obj.status.as_ref().and_then(|s| s.table.as_deref()))
    }
    fn deletion_policy(obj: &InboxTable) -> Option<crate::crd::DeletionPolicy> {
        Some(obj.spec.deletion_policy)
    }
    fn cleanup<'a>(obj: &'a InboxTable, valid: ValidInboxTable, ctx: &'a Context) -> BoxFuture<'a, Result<(), String>> {
        async move { super::cleanup::inbox_table(ctx, obj, &valid).await }.boxed()
    }
    fn reconcile<'a>(
        obj: &'a InboxTable,
        valid: ValidInboxTable,
        previous: &'a InboxTableStatus,
        ctx: &'a Context,
    ) -> BoxFuture<'a, Result<Outcome<InboxTableStatus>, Error>> {
        reconcile_valid(obj, valid, previous, ctx).boxed()
    }
}

/// What the purge loop of a table has to say.
#[derive(Debug, Clone, PartialEq)]
pub enum Purging {
    /// No loop runs: the schema is not ready.
    WaitingForSchema,
    /// A loop runs; its last result, if it finished one.
    Running(Option<LastPurge>),
    /// No loop runs: these DedupPolicies may select the table and are invalid, with no earlier
    /// valid spec to go by.
    HeldByInvalidPolicy(Vec<String>),
}

async fn reconcile_valid(
    obj: &InboxTable,
    valid: ValidInboxTable,
    previous: &InboxTableStatus,
    ctx: &Context,
) -> Result<Outcome<InboxTableStatus>, Error> {
    if !ctx.caches_ready().await {
        return Ok(Outcome::Later(Action::requeue(ctx.timing.caches_filling)));
    }
    let (ns, name, uid) = (obj.namespace().unwrap_or_default(), obj.name_any(), obj.uid().unwrap_or_default());
    let requested = valid.retention.as_ref().map(|r| r.pair());
    let policies = ctx.policies();
    let labels = ctx.namespace_labels(&ns);
    let eff = retention::effective(&ns, &name, &labels, requested, &policies.valid, k8s_openapi::jiff::Timestamp::now());
    let held_by = policies.holding(&labels);

    let mut status = previous.clone();
    let recorded = previous.table.as_deref();
    let prerequisites = super::prerequisites::until_ready(ctx, &ns, &valid.url_secret, recorded, &target(&valid))
        .boxed()
        .await;
    let (schema_cond, purging) = match schema(ctx, obj, &ns, &valid).await {
        Err(c) => {
            ctx.purges.stop(&uid);
            (super::ownership::sticky(&previous.conditions, c), Purging::WaitingForSchema)
        }
        Ok((_, cond)) if !held_by.is_empty() => {
            ctx.purges.stop(&uid);
            (cond, Purging::HeldByInvalidPolicy(held_by))
        }
        Ok((db, cond)) => {
            let params = purge_params(&ns, &name, &valid, db.url_key.clone(), eff.retention);
            ctx.purges.ensure(&uid, ObjectRef::new(&name).within(&ns), db.pool.clone(), params);
            if let Ok((rows, oldest)) = crate::tables::purge::measure(&db.pool, &valid.table).boxed().await {
                status.rows = Some(rows);
                status.oldest_entry_age_seconds = oldest;
            }
            (cond, Purging::Running(ctx.purges.last(&uid)))
        }
    };
    let covered = dedup_covered::dedup_covered(ctx, &ns, &valid, &eff).boxed().await;
    status.consumer_lag = super::group_lag::measure(ctx, &ns, &valid, previous.consumer_lag.as_ref())
        .boxed()
        .await;
    // A refused role does not heal by retrying: it waits for the refresh like a healthy table.
    let healing = schema_cond.status != Status::True && schema_cond.reason != Reason::PermissionDenied;
    if schema_cond.status == Status::True {
        status.table = Some(valid.table.unquoted());
    }
    let source = match (&valid.nats_source, &valid.rabbitmq_source) {
        _ if valid.sources.is_some() => super::inbox_guarantees::SourceKind::Kafka,
        (Some(_), _) => super::inbox_guarantees::SourceKind::Nats,
        (None, Some(_)) => super::inbox_guarantees::SourceKind::Rabbitmq,
        (None, None) => super::inbox_guarantees::SourceKind::Kafka,
    };
    status.guarantees = super::inbox_guarantees::guarantees(&eff.text, &covered, source);
    let mut conditions = verdict(&valid, &eff, schema_cond, &purging, covered);
    conditions.extend(prerequisites);
    status.effective_retention = Some(eff.text.clone());
    status.policies = eff.policies.clone();
    if let Purging::Running(Some(LastPurge::Done { at, result })) = &purging {
        status.last_purge = Some(PurgeStatus {
            time: at.clone(),
            rows_deleted: result.rows_deleted,
            duration_seconds: (result.duration.as_secs_f64() * 1000.0).round() / 1000.0,
        });
    }
    let action = if healing {
        Action::requeue(ctx.timing.retry)
    } else {
        requeue(ctx.timing.refresh_for(&uid), eff.next_change.as_ref())
    };
    Ok(Outcome::Status {
        conditions,
        status,
        action,
    })
}

/// The purge loop's parameters; its series are labelled with the object and its table.
fn purge_params(ns: &str, name: &str, valid: &ValidInboxTable, pool_key: String, retention: std::time::Duration) -> PurgeParams {
    PurgeParams {
        pool_key,
        table: valid.table.clone(),
        retention,
        interval: valid.purge_interval.value,
        batch: valid.purge_batch_size,
        labels: crate::operator::metrics::PurgeLabel {
            namespace: ns.to_owned(),
            inboxtable: name.to_owned(),
            table: valid.table.to_string(),
        },
    }
}

/// The table `lockstep doctor`'s checks look at.
fn target(valid: &ValidInboxTable) -> crate::doctor::database::Target {
    crate::doctor::database::Target {
        kind: crate::doctor::database::TargetKind::InboxTable,
        table: valid.table.clone(),
        dead_letter: None,
        manage: valid.manage_schema,
    }
}

/// Secret -> database -> migrate -> claim: the database and SchemaReady, or why not.
async fn schema(ctx: &Context, obj: &InboxTable, ns: &str, valid: &ValidInboxTable) -> Result<(deps::Database, Cond), Cond> {
    let (db, mut conn) = deps::connect(ctx, ns, &valid.url_secret).await?;
    let tables = [(TableKind::Inbox, &valid.table)];
    let outcome = deps::migrate_tables(&mut conn, &tables, valid.manage_schema, &db.location)
        .await?
        .remove(0);
    super::ownership::claim(ctx, &mut conn, &valid.table, valid.manage_schema, obj, &db.location).await?;
    let how = if outcome.adopted {
        "adopted an existing matching table, "
    } else {
        ""
    };
    let message = format!("{}: {how}schema version {}", valid.table, outcome.version);
    Ok((db, Cond::yes(condition::SCHEMA_READY, Reason::SchemaUpToDate, message)))
}

/// The table's conditions, Ready first, from what was found. Pure.
pub fn verdict(valid: &ValidInboxTable, eff: &Effective, schema: Cond, purging: &Purging, covered: Cond) -> Vec<Cond> {
    let retention = retention_condition(eff, &valid.purge_interval.text, purging);
    let mut parts = vec![&schema, &retention];
    if eff.require_coverage {
        parts.push(&covered);
    }
    let ready = conditions::ready(&parts, format!("{} deduplicates with retention {}", valid.table, eff.text));
    vec![ready, schema, retention, policy_condition(eff), covered]
}

/// PolicyCompliant: what the selecting policies made of the requested retention. Pure.
pub fn policy_condition(eff: &Effective) -> Cond {
    let m = eff.message.clone();
    match &eff.compliance {
        Compliance::NoPolicy => Cond::yes(condition::POLICY_COMPLIANT, Reason::NoPolicy, m),
        Compliance::Within => Cond::yes(condition::POLICY_COMPLIANT, Reason::WithinPolicy, m),
        Compliance::Clamped { .. } => Cond::yes(condition::POLICY_COMPLIANT, Reason::RetentionClamped, m),
        Compliance::Violation { .. } => Cond::no(condition::POLICY_COMPLIANT, Reason::PolicyViolation, m),
    }
}

/// RetentionEnforced: is the purge loop running and healthy. Pure.
pub fn retention_condition(eff: &Effective, interval: &str, purging: &Purging) -> Cond {
    const T: &str = condition::RETENTION_ENFORCED;
    match purging {
        Purging::WaitingForSchema => Cond::unknown(T, Reason::PurgePending, "waiting for SchemaReady"),
        Purging::Running(None) => Cond::unknown(T, Reason::PurgePending, "the first purge has not finished yet"),
        Purging::HeldByInvalidPolicy(names) => Cond::no(
            T,
            Reason::PolicyInvalid,
            format!(
                "purges held: DedupPolicy {} may select this table, is invalid and has no earlier valid spec; \
                 fix it (kubectl describe deduppolicy {})",
                names.join(", "),
                names[0]
            ),
        ),
        Purging::Running(Some(LastPurge::Done { result, .. })) => Cond::yes(
            T,
            Reason::PurgeHealthy,
            format!(
                "purging rows older than {} every {interval}; last run deleted {} rows",
                eff.text, result.rows_deleted
            ),
        ),
        Purging::Running(Some(LastPurge::Failed { error, unreachable, .. })) => {
            let r = if *unreachable {
                Reason::DatabaseUnreachable
            } else {
                Reason::PurgeFailed
            };
            Cond::no(T, r, format!("the last purge failed: {error}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::controller::fixtures::*;

    fn types(c: &[Cond]) -> Vec<&str> {
        c.iter().map(|c| c.type_).collect()
    }

    fn covered() -> Cond {
        Cond::yes(condition::DEDUP_COVERED, Reason::RetentionCoversRedelivery, "covers")
    }

    #[test]
    fn healthy_table_is_ready_with_every_condition_in_order() {
        let eff = effective("7d", Compliance::NoPolicy, false);
        let c = verdict(
            &inbox(Some("7d")),
            &eff,
            schema_ok(),
            &Purging::Running(Some(purged(12))),
            covered(),
        );
        assert_eq!(
            types(&c),
            ["Ready", "SchemaReady", "RetentionEnforced", "PolicyCompliant", "DedupCovered"]
        );
        assert_eq!((c[0].status, c[0].reason), (Status::True, Reason::Ready));
        assert_eq!(c[0].message, r#""billing"."inbox" deduplicates with retention 7d"#);
        assert_eq!(c[2].reason, Reason::PurgeHealthy);
        assert_eq!(c[2].message, "purging rows older than 7d every 1m; last run deleted 12 rows");
        assert_eq!(c[3].reason, Reason::NoPolicy);
    }

    #[test]
    fn schema_failure_decides_ready_and_holds_the_purge() {
        let eff = effective("7d", Compliance::NoPolicy, false);
        let down = Cond::no(
            condition::SCHEMA_READY,
            Reason::DatabaseUnreachable,
            "db:5432/x: connection refused",
        );
        let c = verdict(&inbox(None), &eff, down, &Purging::WaitingForSchema, covered());
        assert_eq!((c[0].status, c[0].reason), (Status::False, Reason::DatabaseUnreachable));
        assert_eq!(c[0].message, "SchemaReady: db:5432/x: connection refused");
        assert_eq!((c[2].status, c[2].reason), (Status::Unknown, Reason::PurgePending));
        assert_eq!(c[2].message, "waiting for SchemaReady");
    }

    #[test]
    fn first_purge_pending_makes_ready_unknown() {
        let eff = effective("7d", Compliance::NoPolicy, false);
        let c = verdict(&inbox(None), &eff, schema_ok(), &Purging::Running(None), covered());
        assert_eq!((c[0].status, c[0].reason), (Status::Unknown, Reason::PurgePending));
    }

    #[test]
    fn failed_purges_say_why() {
        let eff = effective("7d", Compliance::NoPolicy, false);
        let failed = |unreachable| {
            let last = LastPurge::Failed {
                at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now()),
                error: "boom".into(),
                unreachable,
            };
            retention_condition(&eff, "1m", &Purging::Running(Some(last)))
        };
        assert_eq!(
            (failed(true).status, failed(true).reason),
            (Status::False, Reason::DatabaseUnreachable)
        );
        assert_eq!(failed(false).reason, Reason::PurgeFailed);
        assert_eq!(failed(false).message, "the last purge failed: boom");
    }

    #[test]
    fn coverage_counts_for_ready_only_when_a_policy_requires_it() {
        let short = Cond::no(condition::DEDUP_COVERED, Reason::RetentionBelowTopicRetention, "1d < 7d");
        let purge = Purging::Running(Some(purged(0)));
        let free = effective("1d", Compliance::NoPolicy, false);
        let c = verdict(&inbox(Some("1d")), &free, schema_ok(), &purge, short.clone());
        assert_eq!(c[0].status, Status::True);
        assert_eq!(c[4], short);
        let required = effective("1d", Compliance::Within, true);
        let c = verdict(&inbox(Some("1d")), &required, schema_ok(), &purge, short);
        assert_eq!((c[0].status, c[0].reason), (Status::False, Reason::RetentionBelowTopicRetention));
    }

    #[test]
    fn policy_condition_per_compliance() {
        let r = |c: Compliance| {
            let p = policy_condition(&effective("7d", c, false));
            (p.status, p.reason)
        };
        assert_eq!(r(Compliance::NoPolicy), (Status::True, Reason::NoPolicy));
        assert_eq!(r(Compliance::Within), (Status::True, Reason::WithinPolicy));
        let clamped = Compliance::Clamped { requested: "1h".into() };
        assert_eq!(r(clamped), (Status::True, Reason::RetentionClamped));
        let violation = Compliance::Violation {
            messages: vec!["below 24h".into()],
        };
        assert_eq!(r(violation), (Status::False, Reason::PolicyViolation));
    }
}
