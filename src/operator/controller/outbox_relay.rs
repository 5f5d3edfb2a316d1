//! OutboxRelay: guard -> validate -> migrate the outbox and dead-letter tables -> plan and apply
//! topics -> apply the relay Deployment -> measure the lag -> the pure verdict (`outbox_verdict`)
//! -> status. Deletion (deletionPolicy) is in `lifecycle` and `cleanup`.

use std::sync::Arc;

use futures::{future::BoxFuture, FutureExt};
use kube::{
    api::Api,
    runtime::controller::{Action, Controller},
};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use sqlx::PgPool;

use super::{
    dead_letters, deps, lag,
    outbox_verdict::{verdict, Found, Next, Verdict},
    reconciler::{self, Outcome, Reconciler},
    relay_available, relay_buckets, relay_deployment, relay_topics,
    watches::{own_changes, relay_deployment_changes, Watches},
    Context, Error,
};
use crate::{
    crd::{Guarantee, LagStatus, OutboxRelay, OutboxRelayStatus, RelayShare, ReplayStatus, ValidOutboxRelay},
    operator::conditions::{self, condition, Cond, Reason, Status},
    tables::schema::TableKind,
};

/// The server-side apply field manager of OutboxRelay status writes.
pub const MANAGER: &str = "lockstep-outboxrelay";

pub struct OutboxRelays;

/// Wire the controller: its own objects (spec, annotation, finalizer and deletion changes) and
/// their relay Deployments.
pub fn controller(
    watches: &mut Watches,
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> impl std::future::Future<Output = ()> {
    let own = own_changes(watches.relays.subscribe());
    let deployments = relay_deployment_changes(watches.relay_deployments.clone());
    let c = Controller::for_stream(own, watches.relays.store())
        .with_config(super::config())
        .owns_stream(deployments)
        .graceful_shutdown_on(shutdown)
        .run(reconciler::reconcile::<OutboxRelays>, reconciler::error_policy::<OutboxRelays>, ctx);
    super::drain(OutboxRelays::NAME, c)
}

impl Reconciler for OutboxRelays {
    type K = OutboxRelay;
    const NAME: &'static str = "outboxrelay";
    const MANAGER: &'static str = MANAGER;
    const PAUSED: Option<&'static str> = Some("not reconciling");

    fn api(ctx: &Context, namespace: Option<&str>) -> Result<Api<OutboxRelay>, Error> {
        reconciler::namespaced(ctx, namespace)
    }
    fn deletion_policy(obj: &OutboxRelay) -> Option<crate::crd::DeletionPolicy> {
        Some(obj.spec.deletion_policy)
    }
    fn table_change(obj: &OutboxRelay) -> Option<(String, String)> {
        obj.spec.database.table_change(obj.status.as_ref().and_then(|s| s.table.as_deref()))
    }
    fn cleanup<'a>(obj: &'a OutboxRelay, valid: ValidOutboxRelay, ctx: &'a Context) -> BoxFuture<'a, Result<(), String>> {
        async move { super::cleanup::outbox_relay(ctx, obj, &valid).await }.boxed()
    }
    fn reconcile<'a>(
        obj: &'a OutboxRelay,
        valid: ValidOutboxRelay,
        previous: &'a OutboxRelayStatus,
        ctx: &'a Context,
    ) -> BoxFuture<'a, Result<Outcome<OutboxRelayStatus>, Error>> {
        reconcile_valid(obj, valid, previous, ctx).boxed()
    }
}

/// Fetch (applying the tables, topics and relay Deployment on the way), the pure verdict, status.
async fn reconcile_valid(
    obj: &OutboxRelay,
    valid: ValidOutboxRelay,
    previous: &OutboxRelayStatus,
    ctx: &Context,
) -> Result<Outcome<OutboxRelayStatus>, Error> {
    // An image outside the operator's allow-list is refused before anything is done for it.
    if let Some(c) = super::relay_image::refused(valid.image.as_deref(), &ctx.relay_image, &ctx.relay_image_prefixes) {
        return Ok(Outcome::Status {
            conditions: vec![c],
            status: previous.clone(),
            action: Action::await_change(),
        });
    }
    let ns = obj.metadata.namespace.clone().unwrap_or_default();
    let recorded = previous.table.as_deref();
    let prerequisites = super::prerequisites::until_ready(ctx, &ns, &valid.url_secret, recorded, &target(&valid))
        .boxed()
        .await;
    let (schema_cond, schema_version, pool) = schema(ctx, obj, &ns, &valid).boxed().await;
    // Lost to another object now, or before and not claimed since (the database is away): no
    // relay, no topics either way.
    let schema_cond = super::ownership::sticky(&previous.conditions, schema_cond);
    if schema_cond.reason == Reason::ResourceConflict {
        let stopped = super::cleanup::stop_relay(ctx, &ns, obj).await;
        let v = verdict(
            &valid.table,
            Found::Conflict {
                schema: schema_cond,
                stopped,
            },
        );
        // It manages no topic now: none is recorded as its (`topic_owners`).
        let status = OutboxRelayStatus {
            topics: vec![],
            ..previous.clone()
        };
        return Ok(outcome(ctx, obj, v, status));
    }
    let (topics_cond, topics, leader_only) = relay_topics::topics(ctx, obj, previous, &valid).boxed().await;
    let (relay_cond, shares, groups) = relays(ctx, obj, &ns, &valid, pool.as_ref(), previous).await;
    let last_replay = replay(ctx, obj, &valid, pool.as_ref(), previous).await;
    let (lag_cond, lag) = self::lag(pool.as_ref(), &valid, previous, &groups).await;
    if let Some(l) = &lag {
        let before = previous.lag.as_ref().map(|p| p.quarantined);
        dead_letters::report_new(ctx, obj, &valid, before, l.quarantined).await;
    }
    let status = OutboxRelayStatus {
        schema_version: schema_version.or(previous.schema_version),
        topics,
        guarantees: match (&valid.nats, &valid.rabbitmq) {
            (_, Some(r)) => super::relay_queues::guarantees(r),
            (Some(n), None) => nats_guarantees(n),
            (None, None) => guarantees(&leader_only),
        },
        lag: lag.or_else(|| previous.lag.clone()),
        last_replay,
        table: Some(valid.table.unquoted())
            .filter(|_| schema_cond.status == Status::True)
            .or_else(|| previous.table.clone()),
        ..previous.clone()
    };
    let status = with_shares(status, &valid, shares);
    let found = Found::Parts {
        schema: schema_cond,
        topics: topics_cond,
        relay: relay_cond,
        lag: lag_cond,
        prerequisites,
    };
    Ok(outcome(ctx, obj, verdict(&valid.table, found), status))
}

/// The verdict's conditions over `status`, requeued as it says.
fn outcome(ctx: &Context, obj: &OutboxRelay, v: Verdict, status: OutboxRelayStatus) -> Outcome<OutboxRelayStatus> {
    let after = match v.next {
        Next::Retry => ctx.timing.retry,
        Next::Refresh => ctx.timing.refresh_for(obj.metadata.uid.as_deref().unwrap_or_default()),
    };
    Outcome::Status {
        conditions: v.conditions,
        status,
        action: Action::requeue(after),
    }
}

/// What holds on each hop, stated plainly; `leader_only` names topics whose acks=all is the
/// leader's alone (min.insync.replicas=1, set or by default), where an acknowledged event can still be lost.
pub fn guarantees(leader_only: &[String]) -> Vec<Guarantee> {
    let g = |hop: &str, guarantee: String| Guarantee {
        hop: hop.into(),
        guarantee,
    };
    let broker = if leader_only.is_empty() {
        "at-least-once, per-key order; idempotent producer, acks=all".to_owned()
    } else {
        format!(
            "at-least-once, per-key order; idempotent producer, acks=all, but on {} min.insync.replicas=1 (set, or Kafka's default) makes an acknowledgement the leader's alone: an event is lost if the leader fails before a follower copies it",
            leader_only.join(", ")
        )
    };
    vec![
        g(
            "service -> database",
            "atomic with the business write (transactional outbox)".into(),
        ),
        g("database -> broker", broker),
        g("broker -> consumer", "at-least-once; deduplicate with an InboxTable".into()),
    ]
}

/// What holds on each hop of an OutboxRelay publishing to NATS JetStream: the broker keeps out a
/// resend only within each stream's duplicate_window. Pure.
pub fn nats_guarantees(n: &crate::crd::ValidNats) -> Vec<Guarantee> {
    let windows: Vec<String> = n
        .streams
        .iter()
        .map(|s| format!("{} {}", s.name, crate::core::duration::format(s.duplicate_window)))
        .collect();
    let dedup = if windows.is_empty() {
        "within each stream's duplicate_window".to_owned()
    } else {
        format!("within each stream's duplicate_window ({})", windows.join(", "))
    };
    vec![
        Guarantee {
            hop: "service -> database".into(),
            guarantee: "atomic with the business write (transactional outbox)".into(),
        },
        Guarantee {
            hop: "database -> broker".into(),
            guarantee: format!(
                "at-least-once, per-key order (a key's next message waits for the previous one's PubAck); \
                 a resend of an event is dropped by the stream only {dedup}, later it is stored again"
            ),
        },
        Guarantee {
            hop: "broker -> consumer".into(),
            guarantee: "at-least-once (redelivery until acknowledged, up to the consumer's max_deliver); deduplicate with an InboxTable"
                .into(),
        },
    ]
}

/// The replay the annotation asks for, once the tables are ready; the new `status.lastReplay`
/// (unchanged when none ran or it failed: a failure is an Event and is retried).
async fn replay(
    ctx: &Context,
    obj: &OutboxRelay,
    v: &ValidOutboxRelay,
    pool: Option<&PgPool>,
    previous: &OutboxRelayStatus,
) -> Option<ReplayStatus> {
    let last = previous.last_replay.clone();
    let Some(pool) = pool else { return last };
    match dead_letters::replay_if_asked(ctx, obj, v, pool, last.as_ref()).await {
        Some(Ok(done)) => Some(done),
        _ => last,
    }
}

/// Apply the relay Deployment and judge RelayAvailable (the locks are seen once the tables are
/// ready); also `status.buckets`, `bucketsOwned` and `relays`, unchanged when pg_locks cannot be read.
async fn relays(
    ctx: &Context,
    obj: &OutboxRelay,
    ns: &str,
    valid: &ValidOutboxRelay,
    pool: Option<&PgPool>,
    previous: &OutboxRelayStatus,
) -> (Cond, Option<Shares>, Vec<lag::Group>) {
    let available = match relay_available::apply(ctx, obj, ns, valid).await {
        Ok(n) => n,
        Err(c) => return (c, None, vec![]),
    };
    let locks = match pool {
        Some(p) => match relay_buckets::read(p, valid).await {
            Ok(locks) => locks,
            Err(e) => {
                let c = Cond::unknown(
                    condition::RELAY_AVAILABLE,
                    Reason::DatabaseError,
                    format!("cannot read pg_locks: {e}"),
                );
                return (c, None, vec![]);
            }
        },
        None => relay_buckets::Locks::default(),
    };
    let oldest = match pool {
        Some(p) if valid.buckets > 1 => relay_buckets::oldest_by_bucket(p, valid).await.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot measure the buckets' oldest rows");
            None
        }),
        _ => None,
    };
    let shares = pool.map(|_| relay_buckets::shares(valid.buckets, &locks, oldest.as_ref()));
    let groups = match &shares {
        Some((_, _, relays)) => lag::groups(valid.buckets, relays, &locks.holdings.owners, oldest.as_ref()),
        None => vec![],
    };
    let was_available = conditions::status_of(&previous.conditions, condition::RELAY_AVAILABLE) == Some(Status::True);
    let uid = obj.metadata.uid.as_deref().unwrap_or_default();
    let unowned = pool.is_some() && relay_buckets::unowned(valid.buckets, &locks);
    let unowned_for = ctx.unowned.seen(uid, unowned, std::time::Instant::now()).filter(|_| was_available);
    let seen = relay_available::Seen {
        wanted: relay_deployment::replicas(valid),
        available,
        buckets: valid.buckets,
        locks,
        unowned_for,
    };
    (relay_available::verdict(&seen), shares, groups)
}

/// `status.buckets`, `bucketsOwned`, `relays`.
type Shares = (Option<i32>, Option<i32>, Vec<RelayShare>);

/// `status` with the relays' shares, or those it had when none were read (none with buckets 1).
fn with_shares(status: OutboxRelayStatus, valid: &ValidOutboxRelay, shares: Option<Shares>) -> OutboxRelayStatus {
    let (buckets, buckets_owned, relays) = match shares {
        Some(s) => s,
        None if valid.buckets <= 1 => (None, None, vec![]),
        None => return status,
    };
    OutboxRelayStatus {
        buckets,
        buckets_owned,
        relays,
        ..status
    }
}

/// LagHealthy and the measured lag, once the tables are ready (`pool`).
async fn lag(
    pool: Option<&PgPool>,
    valid: &ValidOutboxRelay,
    previous: &OutboxRelayStatus,
    groups: &[lag::Group],
) -> (Cond, Option<LagStatus>) {
    let t = condition::LAG_HEALTHY;
    let Some(pool) = pool else {
        return (Cond::unknown(t, Reason::SchemaMissing, "waiting for SchemaReady"), None);
    };
    let was = conditions::status_of(&previous.conditions, t);
    match lag::measure_lag(pool, valid).await {
        Ok(l) => (
            lag::verdict(was, &l, valid.max_oldest_age, groups),
            Some(l.status(Time(Timestamp::now()))),
        ),
        Err(e) => (
            Cond::unknown(t, Reason::DatabaseError, format!("cannot measure the outbox: {e}")),
            None,
        ),
    }
}

/// The tables `lockstep doctor`'s checks look at.
fn target(valid: &ValidOutboxRelay) -> crate::doctor::database::Target {
    crate::doctor::database::Target {
        kind: crate::doctor::database::TargetKind::OutboxRelay,
        table: valid.table.clone(),
        dead_letter: Some(valid.dead_letter_table.clone()),
        manage: valid.manage_schema,
    }
}

/// SchemaReady, the schema version when the tables are migrated, and the database's pool then.
async fn schema(ctx: &Context, obj: &OutboxRelay, ns: &str, valid: &ValidOutboxRelay) -> (Cond, Option<i32>, Option<PgPool>) {
    let (db, mut conn) = match deps::connect(ctx, ns, &valid.url_secret).await {
        Ok(c) => c,
        Err(c) => return (c, None, None),
    };
    let tables = [(TableKind::Outbox, &valid.table), (TableKind::DeadLetter, &valid.dead_letter_table)];
    match deps::migrate_tables(&mut conn, &tables, valid.manage_schema, &db.location).await {
        Err(c) => (c, None, None),
        Ok(outcomes) => {
            if let Err(c) = super::ownership::claim(ctx, &mut conn, &valid.table, valid.manage_schema, obj, &db.location).await {
                return (c, None, None);
            }
            let version = outcomes[0].version;
            let message = format!("{} and {}: schema version {version}", valid.table, valid.dead_letter_table);
            (
                Cond::yes(condition::SCHEMA_READY, Reason::SchemaUpToDate, message),
                Some(version),
                Some(db.pool),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::controller::fixtures::outbox_relay;

    #[test]
    fn shares_are_kept_when_unread_and_absent_with_one_bucket() {
        let share = RelayShare {
            pid: 7,
            buckets: 64,
            ..RelayShare::default()
        };
        let before = OutboxRelayStatus {
            buckets: Some(64),
            buckets_owned: Some(64),
            relays: vec![share.clone()],
            ..OutboxRelayStatus::default()
        };
        let mut o = outbox_relay("orders");
        let v = o.spec.validate().unwrap();
        assert_eq!(with_shares(before.clone(), &v, None), before, "pg_locks not read: as it was");
        let read = with_shares(before.clone(), &v, Some((Some(64), Some(60), vec![])));
        assert_eq!((read.buckets_owned, read.relays.len()), (Some(60), 0));
        o.spec.relay.buckets = 1;
        let one = with_shares(before, &o.spec.validate().unwrap(), None);
        assert_eq!((one.buckets, one.buckets_owned, one.relays), (None, None, vec![]));
    }

    #[test]
    fn nats_guarantees_say_how_long_the_broker_drops_a_resend() {
        let o = crate::operator::controller::fixtures::outbox_relay_minimal("n");
        let mut spec = o.spec.clone();
        spec.broker = crate::crd::Broker::Nats;
        spec.nats = Some(
            serde_json::from_value(serde_json::json!({"servers": "nats://n:4222", "streams": [{"name": "orders", "subjects": ["o.>"]}]}))
                .unwrap(),
        );
        spec.topics.clear();
        let g = nats_guarantees(spec.validate().unwrap().nats.as_ref().unwrap());
        assert!(g[1].guarantee.contains("duplicate_window (orders 2m)"), "{}", g[1].guarantee);
        assert!(!g.iter().any(|g| g.guarantee.contains("acks=all")));
    }

    #[test]
    fn guarantees_do_not_promise_what_min_insync_replicas_1_cannot_keep() {
        assert!(guarantees(&[])[1].guarantee.ends_with("acks=all"));
        let weak = guarantees(&["orders".into()]);
        assert!(
            weak[1].guarantee.contains("on orders min.insync.replicas=1"),
            "{}",
            weak[1].guarantee
        );
        assert_eq!(weak.len(), 3);
    }
}
