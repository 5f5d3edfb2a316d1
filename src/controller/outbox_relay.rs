//! OutboxRelay, first half: validate -> migrate the outbox and dead-letter tables -> plan and apply
//! topics -> status. (The relay Deployment and lag come with the relay.)

use std::sync::Arc;

use futures::FutureExt;
use kube::{
    api::Api,
    core::DeserializeGuard,
    runtime::{
        controller::{Action, Controller},
        predicates, reflector,
        utils::Predicate,
        watcher, WatchStreamExt,
    },
    Client, Resource, ResourceExt,
};

use super::{is_paused, now, secret_settings, secret_url, Context, Error};
use crate::{
    conditions::{self, reason, Cond, Status},
    crd::{condition, Guarantee, OutboxRelay, OutboxRelayStatus, TopicStatus, ValidOutboxRelay},
    kafka::AdminError,
    schema::{migrate, SchemaError, TableKind},
    topics::{plan, Action as TopicAction, Desired},
};

/// The server-side apply field manager of this controller's status writes.
pub const MANAGER: &str = "lockstep-outboxrelay";
const NAME: &str = "outboxrelay";

type Guarded = DeserializeGuard<OutboxRelay>;

pub async fn controller(
    client: &Client,
    namespace: Option<&str>,
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<Guarded> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation.combine(predicates::annotations), Default::default());
    let c = Controller::for_stream(stream, reader)
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

pub fn guarantees() -> Vec<Guarantee> {
    let g = |hop: &str, guarantee: &str| Guarantee {
        hop: hop.into(),
        guarantee: guarantee.into(),
    };
    vec![
        g("service -> database", "atomic with the business write (transactional outbox)"),
        g("database -> broker", "at-least-once, per-key order; idempotent producer, acks=all"),
        g("broker -> consumer", "at-least-once; deduplicate with an InboxTable"),
    ]
}

async fn reconcile_inner(obj: &Guarded, ctx: &Context) -> Result<(Action, Option<String>), Error> {
    let ns = obj.namespace().ok_or(Error::MissingNamespace)?;
    let name = obj.name_any();
    let api: Api<OutboxRelay> = Api::namespaced(ctx.client.clone(), &ns);
    let relay = match &obj.0 {
        Ok(r) => r,
        Err(invalid) => {
            return super::report_unreadable(&api, &name, MANAGER, obj.meta().generation, &invalid.error).await;
        }
    };
    let previous = relay.status.clone().unwrap_or_default();
    let generation = relay.metadata.generation;

    let early = |c: Cond| {
        let (conds, flipped) = conditions::merge(&previous.conditions, &[c], generation, &now());
        let status = OutboxRelayStatus {
            observed_generation: generation,
            conditions: conds,
            ..previous.clone()
        };
        (status, flipped)
    };
    if is_paused(relay) {
        let (status, flipped) = early(Cond::no(
            condition::READY,
            reason::PAUSED,
            format!("annotation {}=true: not reconciling", crate::crd::PAUSED_ANNOTATION),
        ));
        super::write_status(ctx, &api, relay, MANAGER, status != previous, &status, &flipped)
            .boxed()
            .await?;
        return Ok((Action::await_change(), Some(reason::PAUSED.into())));
    }
    let valid = match relay.spec.validate() {
        Ok(v) => v,
        Err(e) => {
            let (status, flipped) = early(Cond::no(condition::READY, reason::INVALID_SPEC, e.to_string()));
            super::write_status(ctx, &api, relay, MANAGER, status != previous, &status, &flipped)
                .boxed()
                .await?;
            return Ok((Action::await_change(), Some(reason::INVALID_SPEC.into())));
        }
    };

    let schema_cond = schema(ctx, &ns, relay, &valid).boxed().await;
    let (topics_cond, topic_status) = topics(ctx, &ns, relay).boxed().await;

    let ready = conditions::ready(
        &[&schema_cond, &topics_cond],
        format!("{} is migrated and its topics are configured", valid.table),
    );
    let failure = (ready.status != Status::True).then(|| ready.reason.to_string());
    let healing = schema_cond.status != Status::True || topics_cond.status != Status::True;
    let (conds, flipped) = conditions::merge(&previous.conditions, &[ready, schema_cond, topics_cond], generation, &now());
    let status = OutboxRelayStatus {
        observed_generation: generation,
        conditions: conds,
        schema_version: Some(crate::schema::migrations(TableKind::Outbox).last().map(|m| m.version).unwrap_or(0)),
        topics: topic_status,
        lag: previous.lag.clone(),
        guarantees: guarantees(),
    };
    super::write_status(ctx, &api, relay, MANAGER, status != previous, &status, &flipped)
        .boxed()
        .await?;
    Ok((Action::requeue(if healing { ctx.retry } else { ctx.refresh }), failure))
}

async fn schema(ctx: &Context, ns: &str, relay: &OutboxRelay, valid: &ValidOutboxRelay) -> Cond {
    let url = match secret_url(&ctx.client, ns, &relay.spec.database.url_secret_ref).boxed().await {
        Ok(u) => u,
        Err(c) => return c,
    };
    let pool = match ctx.pools.get(&url) {
        Ok(p) => p,
        Err(e) => return Cond::no(condition::SCHEMA_READY, reason::DATABASE_ERROR, e.to_string()),
    };
    let where_ = crate::config::describe_database_url(url.expose());
    let mut conn = match pool.acquire().await {
        Ok(c) => c,
        Err(e) => {
            return Cond::no(
                condition::SCHEMA_READY,
                super::db_reason(&e),
                format!("cannot connect to {where_}: {e}"),
            )
        }
    };
    let manage = relay.spec.database.manage_schema;
    for (kind, table) in [(TableKind::Outbox, &valid.table), (TableKind::DeadLetter, &valid.dead_letter_table)] {
        match migrate(&mut conn, kind, table, manage).boxed().await {
            Ok(_) => {}
            Err(SchemaError::Mismatch { differences, .. }) => {
                return Cond::no(
                    condition::SCHEMA_READY,
                    reason::SCHEMA_MISMATCH,
                    format!(
                        "{table} exists but does not match the {kind} contract, left untouched: {}",
                        differences.join("; ")
                    ),
                )
            }
            Err(e @ SchemaError::Missing { .. }) => return Cond::no(condition::SCHEMA_READY, reason::SCHEMA_MISSING, e.to_string()),
            Err(SchemaError::Database(e)) => return Cond::no(condition::SCHEMA_READY, super::db_reason(&e), format!("{where_}: {e}")),
            Err(e) => return Cond::no(condition::SCHEMA_READY, reason::SCHEMA_MISMATCH, e.to_string()),
        }
    }
    Cond::yes(
        condition::SCHEMA_READY,
        reason::SCHEMA_UP_TO_DATE,
        format!("{} and {}: schema version 1", valid.table, valid.dead_letter_table),
    )
}

async fn topics(ctx: &Context, ns: &str, relay: &OutboxRelay) -> (Cond, Vec<TopicStatus>) {
    let k = &relay.spec.kafka;
    let names: Vec<String> = relay.spec.topics.iter().map(|t| t.name.clone()).collect();
    let unknown = |c: Cond| {
        let st = names
            .iter()
            .map(|n| TopicStatus {
                name: n.clone(),
                partitions: None,
                ready: false,
                drift: vec![],
            })
            .collect();
        (c, st)
    };
    let settings = match &k.auth_secret_ref {
        None => Default::default(),
        Some(r) => match secret_settings(&ctx.client, ns, &r.name).await {
            Ok(s) => s,
            Err(m) => return unknown(Cond::no(condition::TOPICS_READY, reason::SECRET_NOT_FOUND, m)),
        },
    };
    let admin = match ctx.admins.get(&k.bootstrap_servers, &settings) {
        Ok(a) => a,
        Err(e) => return unknown(Cond::no(condition::TOPICS_READY, reason::TOPIC_OPERATION_FAILED, e.to_string())),
    };
    let broker_err = |e: AdminError| {
        let r = if e.is_unreachable() {
            reason::BROKER_UNREACHABLE
        } else {
            reason::TOPIC_OPERATION_FAILED
        };
        Cond::no(condition::TOPICS_READY, r, e.to_string())
    };
    let observed = match admin.describe(&names).await {
        Ok(o) => o,
        Err(e) => return unknown(broker_err(e)),
    };
    let desired: Vec<Desired> = relay.spec.validate().map(|v| v.topics).unwrap_or_default();
    let p = plan(&desired, &observed);
    let mut failed: Vec<(String, AdminError)> = Vec::new();
    for a in &p.actions {
        let (topic, r) = match a {
            TopicAction::Create {
                name,
                partitions,
                replication_factor,
                config,
            } => (name, admin.create_topic(name, *partitions, *replication_factor, config).await),
            TopicAction::SetConfig { name, set } => (name, admin.alter_configs(name, set).await),
            TopicAction::AddPartitions { name, total } => (name, admin.create_partitions(name, *total).await),
        };
        if let Err(e) = r {
            failed.push((topic.clone(), e));
        }
    }
    let status: Vec<TopicStatus> = desired
        .iter()
        .map(|d| {
            let created = p
                .actions
                .iter()
                .any(|a| matches!(a, TopicAction::Create { name, .. } if name == &d.name));
            let bad = failed.iter().any(|(t, _)| t == &d.name) || p.refusals.iter().any(|r| r.topic == d.name);
            TopicStatus {
                name: d.name.clone(),
                partitions: observed.get(&d.name).map(|o| o.partitions).or(created.then_some(d.partitions)),
                ready: !bad,
                drift: p.drift.get(&d.name).cloned().unwrap_or_default(),
            }
        })
        .collect();
    let warn = if p.warnings.is_empty() {
        String::new()
    } else {
        format!(" Warnings: {}", p.warnings.join("; "))
    };
    let cond = if let Some((_, e)) = failed.iter().find(|(_, e)| e.is_unreachable()) {
        Cond::no(condition::TOPICS_READY, reason::BROKER_UNREACHABLE, e.to_string())
    } else if !failed.is_empty() {
        let msgs: Vec<String> = failed.iter().map(|(_, e)| e.to_string()).collect();
        Cond::no(
            condition::TOPICS_READY,
            reason::TOPIC_OPERATION_FAILED,
            format!("{}{warn}", msgs.join("; ")),
        )
    } else if !p.refusals.is_empty() {
        let msgs: Vec<&str> = p.refusals.iter().map(|r| r.message.as_str()).collect();
        Cond::no(
            condition::TOPICS_READY,
            reason::PARTITION_CHANGE_REFUSED,
            format!("{}; nothing was changed on those topics{warn}", msgs.join("; ")),
        )
    } else if !p.drift.is_empty() {
        let msgs: Vec<String> = p.drift.iter().map(|(t, d)| format!("{t}: {}", d.join(", "))).collect();
        Cond::yes(
            condition::TOPICS_READY,
            reason::TOPIC_CONFIG_DRIFT,
            format!("restored config changed outside lockstep: {}{warn}", msgs.join("; ")),
        )
    } else {
        Cond::yes(
            condition::TOPICS_READY,
            reason::TOPICS_CONFIGURED,
            format!("{} topic(s) as specified{warn}", desired.len()),
        )
    };
    (cond, status)
}
