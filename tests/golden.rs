//! Golden values that must never change by accident: a changed migration checksum refuses every
//! table already migrated, a changed advisory-lock key lets two relays run during an upgrade, a
//! changed NOTIFY channel leaves relays deaf to new rows, and condition reasons, field managers,
//! metric names and the relay's SQL are what users, dashboards and alerts depend on.
//! (CRD YAML is pinned by crd_drift.rs; CLI flags and environment variables by src/main.rs.)
//! Pure: needs no server.

use std::collections::BTreeMap;

use lockstep::{
    core::sql::{Ident, QualifiedName},
    operator::conditions::{condition, Reason},
    tables::schema::{self, TableKind},
};

fn q(schema: &str, table: &str) -> QualifiedName {
    QualifiedName {
        schema: Ident::parse(schema).unwrap(),
        table: Ident::parse(table).unwrap(),
    }
}

fn checksum(kind: TableKind, version: i32) -> String {
    let m = schema::migrations(kind).iter().find(|m| m.version == version).unwrap();
    m.checksum()
}

#[test]
fn migration_checksums_are_exact() {
    assert_eq!(
        checksum(TableKind::Outbox, 1),
        "7eeb6167e984f604657261cf1b75d90a81dc96ea05d3263746ca45a1dfd75b55"
    );
    assert_eq!(
        checksum(TableKind::DeadLetter, 1),
        "0763cadeee3ef43d5ba187be655515e1ea9267feb372807516fd8da6cae250d9"
    );
    assert_eq!(
        checksum(TableKind::Inbox, 1),
        "289e773e89b2b81cf477a0eab3972f1881f61dcbe942e3ae4dcfaf2879a16c66"
    );
    // Version 2 of both event tables: the traceparent column, one step for both kinds.
    let v2 = "5b8be526dcbf394ef0648770d47199159fb2b2eb4d5e7215cde3ea1754d85f27";
    assert_eq!(
        (checksum(TableKind::Outbox, 2), checksum(TableKind::DeadLetter, 2)),
        (v2.into(), v2.into())
    );
    let versions = |k: TableKind| schema::migrations(k).iter().map(|m| m.version).collect::<Vec<_>>();
    assert_eq!(
        [
            versions(TableKind::Outbox),
            versions(TableKind::DeadLetter),
            versions(TableKind::Inbox)
        ],
        [vec![1, 2], vec![1, 2], vec![1]]
    );
}

#[test]
fn migration_sql_is_byte_for_byte() {
    let t = q("billing", "orders_outbox");
    let render = |k: TableKind| (schema::migrations(k)[0].render)(&t);
    assert_eq!(
        render(TableKind::Outbox),
        r#"create table "billing"."orders_outbox" (
    id uuid primary key,
    aggregatetype text not null,
    aggregateid text not null,
    type text not null,
    payload jsonb,
    headers jsonb,
    created_at timestamptz not null default now(),
    seq bigint generated always as identity unique,
    txid xid8 not null default pg_current_xact_id(),
    attempts integer not null default 0,
    last_error text,
    published_at timestamptz
);
create or replace function "billing"."orders_outbox_notify"() returns trigger language plpgsql as $$
begin
    perform pg_notify('lockstep_outbox_b3d26c7397ee7db6', '');
    return null;
end $$;
create trigger "orders_outbox_notify_trg" after insert on "billing"."orders_outbox" for each statement execute function "billing"."orders_outbox_notify"();"#
    );
    assert_eq!(
        render(TableKind::DeadLetter),
        r#"create table "billing"."orders_outbox" (
    id uuid primary key,
    aggregatetype text not null,
    aggregateid text not null,
    type text not null,
    payload jsonb,
    headers jsonb,
    created_at timestamptz not null,
    seq bigint not null,
    attempts integer not null,
    last_error text not null,
    failed_at timestamptz not null default now()
);"#
    );
    assert_eq!(
        render(TableKind::Inbox),
        r#"create table "billing"."orders_outbox" (
    consumer text not null,
    message_id text not null,
    received_at timestamptz not null default now(),
    primary key (consumer, message_id)
);
create index "orders_outbox_received_at_idx" on "billing"."orders_outbox" (received_at);"#
    );
    for kind in [TableKind::Outbox, TableKind::DeadLetter] {
        assert_eq!(
            (schema::migrations(kind)[1].render)(&t),
            "set local lock_timeout = '2s';\nalter table \"billing\".\"orders_outbox\" add column if not exists traceparent text;"
        );
    }
    assert_eq!(
        schema::history_ddl(&t.schema),
        r#"create schema if not exists "billing";
         create table if not exists "billing"."lockstep_schema_history" (
             table_schema text not null,
             table_name text not null,
             kind text not null,
             version integer not null,
             checksum text not null,
             applied_at timestamptz not null default now(),
             primary key (table_schema, table_name, version)
         );"#
    );
    assert_eq!(schema::HISTORY_TABLE, "lockstep_schema_history");
}

#[test]
fn lock_keys_and_channels_are_exact() {
    let (public, billing) = (q("public", "outbox"), q("billing", "orders_outbox"));
    assert_eq!(schema::lock_key(&public), -767470055278674281_i64);
    assert_eq!(schema::lock_key(&billing), -5532591153421518849_i64);
    assert_eq!(lockstep::tables::locks::lock_key(&public), -5365579470686561255_i64);
    assert_eq!(lockstep::tables::locks::lock_key(&billing), -4820294839793297651_i64);
    assert_eq!(schema::notify_channel(&public), "lockstep_outbox_bbcbd30709eeccfa");
    assert_eq!(schema::notify_channel(&billing), "lockstep_outbox_b3d26c7397ee7db6");
}

#[test]
fn condition_types_and_reasons_are_exact() {
    let types = [
        condition::READY,
        condition::SCHEMA_READY,
        condition::TOPICS_READY,
        condition::RELAY_AVAILABLE,
        condition::LAG_HEALTHY,
        condition::RETENTION_ENFORCED,
        condition::POLICY_COMPLIANT,
        condition::DEDUP_COVERED,
        condition::PREREQUISITES_MET,
    ];
    assert_eq!(
        types.join(","),
        "Ready,SchemaReady,TopicsReady,RelayAvailable,LagHealthy,RetentionEnforced,PolicyCompliant,DedupCovered,PrerequisitesMet"
    );
    let reasons = [
        Reason::Ready,
        Reason::InvalidSpec,
        Reason::Paused,
        Reason::SecretNotFound,
        Reason::SecretKeyMissing,
        Reason::DatabaseUnreachable,
        Reason::DatabaseError,
        Reason::SchemaMismatch,
        Reason::SchemaMissing,
        Reason::SchemaUpToDate,
        Reason::PurgeHealthy,
        Reason::PurgePending,
        Reason::PurgeFailed,
        Reason::RetentionClamped,
        Reason::WithinPolicy,
        Reason::NoPolicy,
        Reason::PolicyViolation,
        Reason::TopicsConfigured,
        Reason::TopicConfigDrift,
        Reason::PartitionChangeRefused,
        Reason::TopicOperationFailed,
        Reason::BrokerUnreachable,
        Reason::RetentionCoversRedelivery,
        Reason::RetentionBelowTopicRetention,
        Reason::NoSourcesDeclared,
        Reason::TopicNotFound,
        Reason::LagWithinThreshold,
        Reason::LagAboveThreshold,
        Reason::LongTransaction,
        Reason::Available,
        Reason::DeploymentUnavailable,
        Reason::NoActiveRelay,
        Reason::ScaledToZero,
        Reason::DeploymentFailed,
        Reason::DeletionBlocked,
        Reason::PolicyInvalid,
        Reason::TableChangeRefused,
        Reason::PermissionDenied,
        Reason::ResourceConflict,
        Reason::SecretKeyRefused,
        Reason::PrerequisitesMet,
        Reason::PrerequisiteFailed,
        Reason::BucketsUnowned,
        Reason::BucketsChanging,
        Reason::StreamChangeRefused,
        Reason::QueueChangeRefused,
    ];
    assert_eq!(
        reasons.map(Reason::as_str).join(","),
        "Ready,InvalidSpec,Paused,SecretNotFound,SecretKeyMissing,DatabaseUnreachable,DatabaseError,\
         SchemaMismatch,SchemaMissing,SchemaUpToDate,PurgeHealthy,PurgePending,PurgeFailed,RetentionClamped,\
         WithinPolicy,NoPolicy,PolicyViolation,TopicsConfigured,TopicConfigDrift,PartitionChangeRefused,\
         TopicOperationFailed,BrokerUnreachable,RetentionCoversRedelivery,RetentionBelowTopicRetention,\
         NoSourcesDeclared,TopicNotFound,LagWithinThreshold,LagAboveThreshold,LongTransaction,\
         Available,DeploymentUnavailable,NoActiveRelay,ScaledToZero,DeploymentFailed,DeletionBlocked,\
         PolicyInvalid,TableChangeRefused,PermissionDenied,ResourceConflict,SecretKeyRefused,PrerequisitesMet,PrerequisiteFailed,\
         BucketsUnowned,BucketsChanging,StreamChangeRefused,QueueChangeRefused"
    );
    assert_eq!(lockstep::crd::PAUSED_ANNOTATION, "lockstep.dev/paused");
    assert_eq!(lockstep::crd::DELETE_UNPUBLISHED_ANNOTATION, "lockstep.dev/delete-unpublished");
    assert_eq!(lockstep::operator::controller::lifecycle::FINALIZER, "lockstep.dev/cleanup");
}

#[test]
fn field_managers_are_exact() {
    use lockstep::operator::controller::{dedup_policy, inbox_table, outbox_relay, relay_deployment};
    assert_eq!(
        [
            inbox_table::MANAGER,
            outbox_relay::MANAGER,
            dedup_policy::MANAGER,
            relay_deployment::MANAGER
        ],
        [
            "lockstep-inboxtable",
            "lockstep-outboxrelay",
            "lockstep-deduppolicy",
            "lockstep-relay-deployment"
        ]
    );
}

/// `# TYPE <name> <type>` lines of a Prometheus text rendering.
fn metric_types(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, t)| (n.to_owned(), t.to_owned()))
        .collect()
}

fn names(m: &BTreeMap<String, String>) -> String {
    m.iter().map(|(n, t)| format!("{n} {t}\n")).collect()
}

/// Cleanup MarkPublished's indexes: their names are how an existing index is found again.
#[test]
fn published_indexes_are_exact() {
    let t = lockstep::core::sql::QualifiedName {
        schema: lockstep::core::sql::Ident::parse("billing").unwrap(),
        table: lockstep::core::sql::Ident::parse("orders_outbox").unwrap(),
    };
    let ddl: Vec<String> = lockstep::tables::schema::published_indexes(&t)
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    assert_eq!(
        ddl,
        [
            r#"create index concurrently if not exists "orders_outbox_unpublished_idx" on "billing"."orders_outbox" (seq) where published_at is null"#,
            r#"create index concurrently if not exists "orders_outbox_published_at_idx" on "billing"."orders_outbox" (published_at) where published_at is not null"#,
        ]
    );
}

#[test]
fn metric_names_are_exact() {
    let op = lockstep::operator::metrics::Metrics::default();
    // The purge families (one series per InboxTable) render once they have a series.
    let table = lockstep::operator::metrics::PurgeLabel {
        namespace: "n".into(),
        inboxtable: "i".into(),
        table: "s.t".into(),
    };
    let _ = op.purged_rows.get_or_create(&table);
    let _ = op.purge_failures.get_or_create(&table);
    let _ = op.purge_duration.get_or_create(&table);
    let operator = metric_types(&op.render());
    assert_eq!(
        names(&operator),
        r#"lockstep_build_info gauge
lockstep_db_acquire_seconds histogram
lockstep_inbox_purge_duration_seconds histogram
lockstep_inbox_purge_failures counter
lockstep_inbox_purged_rows counter
lockstep_leader gauge
lockstep_refreshes_deferred counter
"#
    );
    let relay = metric_types(&lockstep::relay::RelayMetrics::default().render());
    assert_eq!(
        names(&relay),
        r#"lockstep_build_info gauge
lockstep_relay_active gauge
lockstep_relay_batch_duration_seconds histogram
lockstep_relay_blocked_keys gauge
lockstep_relay_broker_duplicates counter
lockstep_relay_broker_failing gauge
lockstep_relay_bucket_moves counter
lockstep_relay_buckets_owned gauge
lockstep_relay_commit_to_ack_seconds histogram
lockstep_relay_commit_to_read_seconds histogram
lockstep_relay_invalid_traceparent counter
lockstep_relay_notifications counter
lockstep_relay_oldest_pending_age_seconds gauge
lockstep_relay_oldest_transaction_age_seconds gauge
lockstep_relay_pending_events gauge
lockstep_relay_producer_rebuilds counter
lockstep_relay_published counter
lockstep_relay_published_rows_purged counter
lockstep_relay_purge_failures counter
lockstep_relay_quarantined counter
lockstep_relay_wakeups counter
"#
    );
}

#[derive(clap::Parser)]
struct RelayCli {
    #[command(flatten)]
    args: lockstep::config::RelayArgs,
}

fn relay_statements(extra: &[&str]) -> (String, String) {
    relay_statements_over(extra, false)
}

/// `traceparent`: the outbox and its dead-letter table have the column (migration 2).
fn relay_statements_over(extra: &[&str], traceparent: bool) -> (String, String) {
    use clap::Parser;
    let mut argv = vec![
        "relay",
        "--database-url",
        "postgres://u:p@127.0.0.1/db",
        "--bootstrap-servers",
        "127.0.0.1:9092",
    ];
    argv.extend_from_slice(extra);
    let cfg = RelayCli::parse_from(argv).args.resolve().unwrap();
    let tables = lockstep::tables::schema::OutboxTables {
        payload: lockstep::relay::PayloadColumn::Json,
        dead_letter_payload: lockstep::relay::PayloadColumn::Json,
        traceparent,
        dead_letter_traceparent: traceparent,
        channel: String::new(),
    };
    let relay = lockstep::relay::Relay::new(cfg, std::sync::Arc::new(lockstep::relay::RelayMetrics::default()), &tables).unwrap();
    let (select, done) = relay.statements();
    (select.to_owned(), done.to_owned())
}

/// Reads only below the snapshot's xmin, in seq order, skipping blocked keys and rows in flight.
#[test]
fn relay_sql_is_exact() {
    let (select, delete) = relay_statements(&[]);
    assert_eq!(
        select,
        r#"select id, seq, aggregatetype, aggregateid, type, convert_to(payload::text, 'UTF8') as payload, headers::jsonb as headers, attempts,
                    extract(epoch from created_at)::float8 as created from "public"."outbox"
             where txid < pg_snapshot_xmin(pg_current_snapshot())  and aggregateid::text not in (select unnest($2::text[]))
               and seq not in (select unnest($3::bigint[]))
             order by seq limit $1"#
    );
    assert_eq!(delete, r#"delete from "public"."outbox" where id = any($1)"#);
    let (select, mark) = relay_statements(&["--cleanup", "mark-published", "--published-retention", "1d", "--key", "type"]);
    assert_eq!(
        select,
        r#"select id, seq, aggregatetype, aggregateid, type, convert_to(payload::text, 'UTF8') as payload, headers::jsonb as headers, attempts,
                    extract(epoch from created_at)::float8 as created from "public"."outbox"
             where txid < pg_snapshot_xmin(pg_current_snapshot()) and published_at is null and type::text not in (select unnest($2::text[]))
               and seq not in (select unnest($3::bigint[]))
             order by seq limit $1"#
    );
    assert_eq!(mark, r#"update "public"."outbox" set published_at = now() where id = any($1)"#);
    // A table lockstep made or migrated: the traceparent column too.
    let (select, _) = relay_statements_over(&[], true);
    assert_eq!(
        select,
        r#"select id, seq, aggregatetype, aggregateid, type, convert_to(payload::text, 'UTF8') as payload, headers::jsonb as headers, attempts, extract(epoch from created_at)::float8 as created,
                    traceparent::text as traceparent from "public"."outbox"
             where txid < pg_snapshot_xmin(pg_current_snapshot())  and aggregateid::text not in (select unnest($2::text[]))
               and seq not in (select unnest($3::bigint[]))
             order by seq limit $1"#
    );
}
