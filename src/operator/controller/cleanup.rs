//! What `deletionPolicy: Delete` removes outside Kubernetes before the object goes.
//!
//! OutboxRelay: refuse while events are unpublished (the relay keeps running so they drain),
//! stop the relay (delete its Deployment, then wait until no session holds the outbox's relay
//! lock), drop the outbox and dead-letter tables under that lock after counting once more, delete
//! the topics in `spec.topics`. InboxTable: stop the purge, drop the table. Tables are dropped
//! only when lockstep manages them (manageSchema), and never, nor topics, when another object
//! owns the table (`ownership`). Every step is idempotent: a cleanup cut short starts again from
//! the top.

use k8s_openapi::api::apps::v1::Deployment;
use kube::runtime::reflector::ObjectRef;
use kube::{
    api::{Api, DeleteParams, Preconditions},
    runtime::events::{Event, EventType},
    Resource, ResourceExt,
};
use sqlx::{pool::PoolConnection, Connection, PgConnection, Postgres};

use super::{
    deps::{self, Database},
    relay_available,
    relay_deployment::relay_name,
    Context,
};
use crate::{
    core::sql::QualifiedName,
    crd::SecretKeyRef,
    crd::{InboxTable, OutboxRelay, ValidInboxTable, ValidNats, ValidOutboxRelay, DELETE_UNPUBLISHED_ANNOTATION},
    operator::conditions::{Cond, Reason, Status},
    tables::schema::{drop_tables, table_exists, TableKind},
};

/// Why the outbox cannot be dropped yet, if it cannot. Pure.
pub fn refusal(table: &QualifiedName, pending: i64, dead_lettered: i64, forced: bool) -> Option<String> {
    if forced || pending + dead_lettered == 0 {
        return None;
    }
    Some(format!(
        "{table} holds {pending} unpublished and {dead_lettered} dead-lettered events; the relay keeps running until \
         they are published (replay dead-lettered ones with the lockstep.dev/replay annotation). To drop them \
         unpublished, annotate {DELETE_UNPUBLISHED_ANNOTATION}=true"
    ))
}

pub async fn outbox_relay(ctx: &Context, obj: &OutboxRelay, v: &ValidOutboxRelay) -> Result<(), String> {
    let ns = obj.namespace().unwrap_or_default();
    if lost(obj.status.as_ref().map(|s| s.conditions.as_slice())) {
        stop_relay(ctx, &ns, obj).await?;
        cleaned(ctx, obj, format!("kept the tables and topics: {} is another object's", v.table)).await;
        return Ok(());
    }
    let forced = obj.annotations().get(DELETE_UNPUBLISHED_ANNOTATION).is_some_and(|a| a == "true");
    let mut done = Vec::new();
    let connected = if v.manage_schema {
        connect(ctx, &ns, &v.url_secret).await?
    } else {
        None
    };
    // Tables kept because their Secret went with the namespace: keep the topics with them.
    let orphan = v.manage_schema && connected.is_none();
    if let Some((db, mut conn)) = connected {
        if let Some(h) = super::ownership::other_owner(ctx, &mut conn, &v.table, obj).await? {
            stop_relay(ctx, &ns, obj).await?;
            let note = format!("kept the tables and topics: {} is managed by {}", v.table, h.describe());
            cleaned(ctx, obj, note).await;
            return Ok(());
        }
        let failed = |e: sqlx::Error| format!("cannot drop the outbox at {}: {e}", db.location);
        let (pending, dead) = unpublished(&mut conn, v).await.map_err(failed)?;
        if let Some(m) = refusal(&v.table, pending, dead, forced) {
            if foreground(obj) {
                return Err(format!(
                    "{m}. It was deleted with foreground propagation, so its relay Deployment cannot run to \
                     publish them: delete it with --cascade=background instead"
                ));
            }
            // The relay may have been stopped by an earlier attempt: run it again so they drain.
            let _ = relay_available::apply(ctx, obj, &ns, v).await;
            return Err(m);
        }
        stop_relay(ctx, &ns, obj).await?;
        drop_outbox(&mut conn, v, forced).await.map_err(|e| match e {
            Dropped::Refused(m) => m,
            Dropped::Database(e) => failed(e),
        })?;
        done.push(format!("dropped {} and {}", v.table, v.dead_letter_table));
    } else {
        stop_relay(ctx, &ns, obj).await?;
        done.push(format!("kept the tables ({})", kept_because(v.manage_schema)));
    }
    let names: Vec<String> = v.topics.iter().map(|t| t.name.clone()).collect();
    let on = deps::Reporting {
        type_: crate::operator::conditions::condition::READY,
        status: crate::operator::conditions::Status::False,
    };
    let settings = match deps::kafka_settings(&ctx.client, &ns, v.auth_secret.as_deref(), on).await {
        Ok(s) => Some(s),
        Err(c) if orphaned(ctx, &ns, &c) => None,
        Err(c) => return Err(c.message),
    };
    if let (false, false, Some(settings)) = (orphan, names.is_empty(), settings) {
        // A topic another OutboxRelay names (and may manage, and whose records someone may not
        // have read yet) is kept.
        let others = super::topic_owners::others(ctx, obj, v, super::topic_owners::Unsure::Same).await?;
        let (kept, names): (Vec<String>, Vec<String>) = names.into_iter().partition(|n| others.contains_key(n));
        let admin = ctx.admins.get(&v.bootstrap_servers, &settings).map_err(|e| e.to_string())?;
        for n in &names {
            admin.delete_topic(n).await.map_err(|e| e.to_string())?;
        }
        if !names.is_empty() {
            done.push(format!("deleted topics {}", names.join(", ")));
        }
        for n in &kept {
            let by: Vec<String> = others[n].iter().map(|c| c.describe()).collect();
            done.push(format!("kept topic {n}: {} names it too", by.join(", ")));
        }
    }
    if !orphan {
        done.extend(delete_streams_or_queues(ctx, obj, v).await?);
    }
    cleaned(ctx, obj, done.join("; ")).await;
    Ok(())
}

/// With broker Nats or Rabbitmq: delete the streams, or the exchange and queues, no other object names.
async fn delete_streams_or_queues(ctx: &Context, obj: &OutboxRelay, v: &ValidOutboxRelay) -> Result<Vec<String>, String> {
    match (&v.nats, &v.rabbitmq) {
        (Some(n), _) if !n.streams.is_empty() => delete_streams(ctx, obj, v, n).await,
        (_, Some(_)) => delete_queues(ctx, obj, v).await,
        _ => Ok(vec![]),
    }
}

/// Delete the streams no other OutboxRelay names (on the same NATS); keep the others. A Secret
/// gone with the namespace keeps them all.
async fn delete_streams(ctx: &Context, obj: &OutboxRelay, v: &ValidOutboxRelay, n: &ValidNats) -> Result<Vec<String>, String> {
    let ns = obj.namespace().unwrap_or_default();
    let on = deps::Reporting {
        type_: crate::operator::conditions::condition::READY,
        status: crate::operator::conditions::Status::False,
    };
    let settings = match super::nats_deps::nats_settings(&ctx.client, &ns, &n.servers, n.auth_secret.as_deref(), on).await {
        Ok(s) => s,
        Err(c) if orphaned(ctx, &ns, &c) => return Ok(vec!["kept the streams: their Secret is gone".into()]),
        Err(c) => return Err(c.message),
    };
    let others = super::topic_owners::others(ctx, obj, v, super::topic_owners::Unsure::Same).await?;
    let names = n.streams.iter().map(|s| s.name.clone());
    let (kept, names): (Vec<String>, Vec<String>) = names.partition(|s| others.contains_key(s));
    let mut done = Vec::new();
    if !names.is_empty() {
        let admin = crate::clients::nats_admin::NatsAdmin::connect(&settings).await?;
        for s in &names {
            admin.delete(s).await?;
        }
        done.push(format!("deleted streams {}", names.join(", ")));
    }
    for s in &kept {
        let by: Vec<String> = others[s].iter().map(|c| c.describe()).collect();
        done.push(format!("kept stream {s}: {} names it too", by.join(", ")));
    }
    Ok(done)
}

/// Delete the exchange and queues no other OutboxRelay names (on the same RabbitMQ vhost); keep
/// the others, and the dead-letter exchanges and queues (shared, and holding what failed). A
/// Secret gone with the namespace keeps them all.
async fn delete_queues(ctx: &Context, obj: &OutboxRelay, v: &ValidOutboxRelay) -> Result<Vec<String>, String> {
    let (Some(r), ns) = (&v.rabbitmq, obj.namespace().unwrap_or_default()) else {
        return Ok(vec![]);
    };
    let Some(url) = r.management_url.as_deref() else {
        return Ok(vec![]);
    };
    let on = deps::Reporting {
        type_: crate::operator::conditions::condition::READY,
        status: crate::operator::conditions::Status::False,
    };
    let m = super::rabbitmq_deps::Management {
        url,
        vhost: &r.vhost,
        secret: r.auth_secret.as_deref(),
        field: "rabbitmq.authSecretRef",
    };
    let admin = match super::rabbitmq_deps::admin(&ctx.client, &ns, m, on).await {
        Ok(a) => a,
        Err(c) if orphaned(ctx, &ns, &c) => return Ok(vec!["kept the exchange and queues: their Secret is gone".into()]),
        Err(c) => return Err(c.message),
    };
    let others = super::topic_owners::others(ctx, obj, v, super::topic_owners::Unsure::Same).await?;
    let names = super::topic_owners::destinations(v);
    let (kept, names): (Vec<String>, Vec<String>) = names.into_iter().partition(|s| others.contains_key(s));
    for n in &names {
        let (kind, name) = n.split_once('/').unwrap_or(("queues", n));
        admin.delete(&format!("{kind}s"), name).await?;
        if let Some(p) = r
            .queues
            .iter()
            .filter(|q| kind == "queue" && q.name == name)
            .find_map(|q| q.policy.as_ref())
        {
            admin.delete("policies", &p.name).await?;
        }
    }
    let mut done: Vec<String> = (!names.is_empty())
        .then(|| format!("deleted {}", names.join(", ")))
        .into_iter()
        .collect();
    for s in &kept {
        let by: Vec<String> = others[s].iter().map(|c| c.describe()).collect();
        done.push(format!("kept {s}: {} names it too", by.join(", ")));
    }
    Ok(done)
}

pub async fn inbox_table(ctx: &Context, obj: &InboxTable, v: &ValidInboxTable) -> Result<(), String> {
    ctx.purges.stop(&obj.uid().unwrap_or_default());
    let ns = obj.namespace().unwrap_or_default();
    if lost(obj.status.as_ref().map(|s| s.conditions.as_slice())) {
        cleaned(ctx, obj, format!("kept {}: it is another object's", v.table)).await;
        return Ok(());
    }
    let connected = if v.manage_schema {
        connect(ctx, &ns, &v.url_secret).await?
    } else {
        None
    };
    let Some((db, mut conn)) = connected else {
        let note = format!("kept the table ({})", kept_because(v.manage_schema));
        cleaned(ctx, obj, note).await;
        return Ok(());
    };
    if let Some(h) = super::ownership::other_owner(ctx, &mut conn, &v.table, obj).await? {
        cleaned(ctx, obj, format!("kept {}: it is managed by {}", v.table, h.describe())).await;
        return Ok(());
    }
    let dropped = async {
        let mut tx = conn.begin().await?;
        sqlx::query("set local lock_timeout = '5s'").execute(&mut *tx).await?;
        drop_tables(&mut tx, &[(TableKind::Inbox, &v.table)]).await?;
        tx.commit().await
    };
    dropped
        .await
        .map_err(|e| format!("cannot drop {} at {}: {e}", v.table, db.location))?;
    cleaned(ctx, obj, format!("dropped {}", v.table)).await;
    Ok(())
}

/// The object last saw its table held by another (ResourceConflict): whatever manageSchema says
/// (with false there is no connection to ask), its cleanup touches neither tables nor topics.
fn lost(conditions: Option<&[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]>) -> bool {
    conditions.is_some_and(super::ownership::was_conflicted)
}

/// The database, or None when its Secret went with a namespace being deleted: waiting would hold
/// the namespace in Terminating forever, so the tables are kept (and the Event says so).
async fn connect(ctx: &Context, ns: &str, r: &SecretKeyRef) -> Result<Option<(Database, PoolConnection<Postgres>)>, String> {
    match deps::connect(ctx, ns, r).await {
        Ok(c) => Ok(Some(c)),
        Err(c) if orphaned(ctx, ns, &c) => Ok(None),
        Err(c) => Err(c.message),
    }
}

/// A Secret is missing because the namespace is being deleted.
fn orphaned(ctx: &Context, ns: &str, c: &Cond) -> bool {
    let terminating = ctx
        .caches
        .namespaces
        .get(&ObjectRef::new(ns))
        .is_some_and(|n| n.metadata.deletion_timestamp.is_some());
    // Status False: the Secret (or its key) is known to be gone, not merely unreadable just now.
    terminating && c.status == Status::False && matches!(c.reason, Reason::SecretNotFound | Reason::SecretKeyMissing)
}

/// Why tables were kept under deletionPolicy Delete. Pure.
fn kept_because(manage_schema: bool) -> &'static str {
    if manage_schema {
        "their Secret was deleted with the namespace, so they cannot be reached"
    } else {
        "manageSchema: false"
    }
}

/// Delete the relay Deployment (the garbage collector would only after the object is gone), so
/// the relays stop; `drop_outbox` then checks that none still holds the lock. Only a Deployment
/// this object controls: one of that name made otherwise is left alone.
pub(super) async fn stop_relay(ctx: &Context, ns: &str, obj: &OutboxRelay) -> Result<(), String> {
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let name = relay_name(&obj.name_any());
    let uid = obj.metadata.uid.as_deref().unwrap_or_default();
    let found = match api.get_metadata_opt(&name).await {
        Ok(Some(m)) if super::ownership::foreign_holder(&m.metadata, uid).is_none() => m,
        Ok(_) => return Ok(()),
        Err(e) => return Err(format!("cannot read Deployment {ns}/{name}: {e}")),
    };
    // Foreground: the Deployment stays until its pods are gone, so a standby (which holds no
    // lock) cannot start after the drop and create the tables again. The uid precondition: only
    // the Deployment just read, not one made under its name meanwhile.
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: found.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::foreground()
    };
    match api.delete(&name, &params).await {
        Ok(_) => {}
        // Gone, or replaced meanwhile (409: the uid precondition failed): not this object's.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => return Ok(()),
        Err(e) => return Err(format!("cannot delete Deployment {ns}/{name}: {e}")),
    }
    match api.get_opt(&name).await {
        Ok(None) => Ok(()),
        Ok(Some(_)) => Err(format!("waiting for the relay pods of Deployment {ns}/{name} to stop")),
        Err(e) => Err(format!("cannot read Deployment {ns}/{name}: {e}")),
    }
}

/// Deleted with foreground propagation: the garbage collector would delete a relay Deployment
/// re-created to drain the outbox, again and again.
fn foreground(obj: &OutboxRelay) -> bool {
    obj.finalizers().iter().any(|f| f == "foregroundDeletion")
}

enum Dropped {
    Refused(String),
    Database(sqlx::Error),
}

impl From<sqlx::Error> for Dropped {
    fn from(e: sqlx::Error) -> Self {
        Dropped::Database(e)
    }
}

/// In one transaction: take the relay lock (no relay runs, none can start), lock the tables so
/// no writer commits meanwhile, count once more, drop.
async fn drop_outbox(conn: &mut PgConnection, v: &ValidOutboxRelay, forced: bool) -> Result<(), Dropped> {
    let mut tx = conn.begin().await?;
    sqlx::query("set local lock_timeout = '5s'").execute(&mut *tx).await?;
    let free: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock($1)")
        .bind(crate::tables::locks::lock_key(&v.table))
        .fetch_one(&mut *tx)
        .await?;
    if !free {
        return Err(Dropped::Refused(format!(
            "waiting for the relays to stop: a session still holds the relay lock of {} (its Deployment is deleted; \
             a relay run outside it must be stopped)",
            v.table
        )));
    }
    for t in [&v.table, &v.dead_letter_table] {
        // The migration lock first: a migration creating the table meanwhile is waited for.
        sqlx::query("select pg_advisory_xact_lock($1)")
            .bind(crate::tables::schema::lock_key(t))
            .execute(&mut *tx)
            .await?;
        if table_exists(&mut tx, t).await? {
            sqlx::query(&format!("lock table {t} in access exclusive mode"))
                .execute(&mut *tx)
                .await?;
        }
    }
    let (pending, dead) = unpublished(&mut tx, v).await?;
    if let Some(m) = refusal(&v.table, pending, dead, forced) {
        return Err(Dropped::Refused(format!("events were committed after the relay stopped: {m}")));
    }
    drop_tables(
        &mut tx,
        &[(TableKind::Outbox, &v.table), (TableKind::DeadLetter, &v.dead_letter_table)],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Unpublished outbox rows and dead-lettered rows (0 for a table that does not exist).
async fn unpublished(conn: &mut PgConnection, v: &ValidOutboxRelay) -> Result<(i64, i64), sqlx::Error> {
    let pending = count(conn, &v.table, " where published_at is null").await?;
    let dead = count(conn, &v.dead_letter_table, "").await?;
    Ok((pending, dead))
}

async fn count(conn: &mut PgConnection, t: &QualifiedName, filter: &str) -> Result<i64, sqlx::Error> {
    if !table_exists(conn, t).await? {
        return Ok(0);
    }
    sqlx::query_scalar(&format!("select count(*) from {t}{filter}"))
        .fetch_one(&mut *conn)
        .await
}

async fn cleaned<K: Resource<DynamicType = ()>>(ctx: &Context, obj: &K, note: String) {
    let e = Event {
        type_: EventType::Normal,
        reason: "CleanedUp".into(),
        note: Some(format!("deletionPolicy Delete: {note}")),
        action: "Delete".into(),
        secondary: None,
    };
    super::status::publish(ctx, obj, e).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::schema::qualified;

    #[test]
    fn unpublished_or_dead_lettered_events_refuse_the_drop_unless_forced() {
        let t = qualified("app", "outbox");
        assert_eq!(refusal(&t, 0, 0, false), None);
        let m = refusal(&t, 3, 1, false).unwrap();
        assert!(
            m.starts_with("\"app\".\"outbox\" holds 3 unpublished and 1 dead-lettered events"),
            "{m}"
        );
        assert!(m.contains("lockstep.dev/delete-unpublished=true"), "{m}");
        assert!(refusal(&t, 0, 2, false).is_some(), "dead-lettered events are unpublished too");
        assert_eq!(refusal(&t, 3, 1, true), None);
    }
}
