//! The operator against the real API server and PostgreSQL: InboxTable and DedupPolicy.
//! One operator runs for this test binary (with leader election); each test has its own
//! namespace, database schema and, where it uses one, DedupPolicy selecting only its namespace.

mod common;

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    api::{Api, Patch, PatchParams, PostParams},
    Client,
};
use lockstep::crd::{DedupPolicy, InboxTable};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

struct Env {
    client: Client,
    ns: common::TestNamespace,
    inboxes: Api<InboxTable>,
}

async fn setup(prefix: &str) -> Env {
    common::operator();
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::TestNamespace::new(&client, prefix).await;
    // A label only this namespace carries, for policies that must select it alone.
    let patch = json!({"metadata": {"labels": {"lockstep.dev/test": ns.name}}});
    Api::<Namespace>::all(client.clone())
        .patch(&ns.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let inboxes = Api::namespaced(client.clone(), &ns.name);
    Env { client, ns, inboxes }
}

fn inbox(name: &str, secret: &str, schema: &str, extra: serde_json::Value) -> InboxTable {
    let mut v = json!({
        "apiVersion": "lockstep.dev/v1alpha1", "kind": "InboxTable", "metadata": {"name": name},
        "spec": {"database": {"urlSecretRef": {"name": secret}, "schema": schema, "table": "inbox"}}
    });
    for (k, val) in extra.as_object().unwrap() {
        v["spec"][k] = val.clone();
    }
    serde_json::from_value(v).unwrap()
}

/// Insert `n` inbox rows received two hours ago; a counter of the table's rows.
async fn two_hours_old_rows(pool: &sqlx::PgPool, schema: &str, n: i64) -> impl Fn() -> futures::future::BoxFuture<'static, i64> {
    sqlx::query(&format!(
        "insert into \"{schema}\".inbox (consumer, message_id, received_at)
         select 'c', 'two-hours-' || g, now() - interval '2 hours' from generate_series(1, $1) g"
    ))
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
    let (pool, schema) = (pool.clone(), schema.to_owned());
    move || {
        let (pool, sql) = (pool.clone(), format!("select count(*) from \"{schema}\".inbox"));
        Box::pin(async move { sqlx::query_scalar::<_, i64>(&sql).fetch_one(&pool).await.unwrap() })
    }
}

fn schema_name(ns: &str) -> String {
    ns.replace('-', "_")
}

#[tokio::test]
async fn inbox_table_creates_its_table_and_a_second_reconcile_changes_nothing() {
    let e = setup("ibt-create").await;
    let url = common::env("DATABASE_URL");
    common::create_secret(&e.client, &e.ns.name, "db", &url).await;
    let schema = schema_name(&e.ns.name);
    e.inboxes
        .create(&PostParams::default(), &inbox("billing", "db", &schema, json!({"retention": "8d"})))
        .await
        .unwrap();
    let first = common::wait_condition(&e.inboxes, "billing", "Ready", "True", Some("Ready"), T).await;
    let st = first.status.clone().unwrap();
    assert_eq!(st.effective_retention.as_deref(), Some("8d"));
    assert_eq!(common::condition(&st.conditions, "SchemaReady").reason, "SchemaUpToDate");
    assert_eq!(common::condition(&st.conditions, "PrerequisitesMet").status, "True");

    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let cols: Vec<String> = sqlx::query_scalar("select column_name::text from information_schema.columns where table_schema = $1 and table_name = 'inbox' order by ordinal_position")
        .bind(&schema)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(cols, ["consumer", "message_id", "received_at"]);
    let idx: Vec<String> =
        sqlx::query_scalar("select indexname::text from pg_indexes where schemaname = $1 and tablename = 'inbox' order by 1")
            .bind(&schema)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(idx, ["inbox_pkey", "inbox_received_at_idx"]);

    // Another reconcile (an annotation change triggers one) changes nothing.
    let history = |pool: sqlx::PgPool, schema: String| async move {
        sqlx::query_as::<_, (i32, String)>(&format!(
            "select version, applied_at::text from \"{schema}\".lockstep_schema_history"
        ))
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let before = history(pool.clone(), schema.clone()).await;
    assert_eq!(before.len(), 1);
    e.inboxes
        .patch(
            "billing",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": {"touch": "1"}}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = history(pool.clone(), schema.clone()).await;
    assert_eq!(before, after, "history unchanged by a second reconcile");
    let again = e.inboxes.get("billing").await.unwrap().status.unwrap();
    for (a, b) in st.conditions.iter().zip(again.conditions.iter()) {
        assert_eq!(
            (&a.type_, &a.status, &a.last_transition_time),
            (&b.type_, &b.status, &b.last_transition_time),
            "conditions did not flip"
        );
    }
    e.ns.delete().await;
}

#[tokio::test]
async fn a_mismatched_table_is_reported_and_its_data_kept() {
    let e = setup("ibt-mismatch").await;
    let url = common::env("DATABASE_URL");
    let schema = schema_name(&e.ns.name);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql(&format!("create schema \"{schema}\"; create table \"{schema}\".inbox (consumer text, message_id integer); insert into \"{schema}\".inbox values ('c', 42);"))
        .execute(&pool)
        .await
        .unwrap();
    common::create_secret(&e.client, &e.ns.name, "db", &url).await;
    e.inboxes
        .create(&PostParams::default(), &inbox("legacy", "db", &schema, json!({})))
        .await
        .unwrap();
    let obj = common::wait_condition(&e.inboxes, "legacy", "SchemaReady", "False", Some("SchemaMismatch"), T).await;
    let msg = common::condition(&obj.status.as_ref().unwrap().conditions, "SchemaReady")
        .message
        .clone();
    assert!(msg.contains("column message_id is int4, expected text or varchar"), "{msg}");
    assert!(msg.contains("missing column received_at"), "{msg}");
    assert!(
        msg.contains("no primary key or unique constraint on (consumer, message_id)"),
        "{msg}"
    );
    let ready = common::condition(&obj.status.as_ref().unwrap().conditions, "Ready");
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "SchemaMismatch"));
    let rows: Vec<(String, i32)> = sqlx::query_as(&format!("select consumer, message_id from \"{schema}\".inbox"))
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(rows, vec![("c".to_string(), 42)]);
    e.ns.delete().await;
}

#[tokio::test]
async fn a_missing_secret_heals_once_created() {
    let e = setup("ibt-secret").await;
    let schema = schema_name(&e.ns.name);
    e.inboxes
        .create(&PostParams::default(), &inbox("orders", "orders-db", &schema, json!({})))
        .await
        .unwrap();
    let obj = common::wait_condition(&e.inboxes, "orders", "Ready", "False", Some("SecretNotFound"), T).await;
    let msg = &common::condition(&obj.status.as_ref().unwrap().conditions, "SchemaReady").message;
    assert!(msg.contains("orders-db"), "{msg}");
    let url = common::env("DATABASE_URL");
    assert!(
        !serde_json::to_string(&obj).unwrap().contains(&url),
        "the URL never appears in status"
    );
    common::create_secret(&e.client, &e.ns.name, "orders-db", &url).await;
    common::wait_condition(&e.inboxes, "orders", "Ready", "True", None, T).await;
    e.ns.delete().await;
}

/// `lockstep doctor`'s checks before the first migration: a role without CREATE on the database
/// (every migration runs `create schema if not exists`) is named, with the GRANT to run.
#[tokio::test]
async fn a_role_lacking_create_is_named_in_prerequisites_met() {
    let e = setup("ibt-prereq").await;
    let url = common::env("DATABASE_URL");
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    let role = format!("r_{}", schema_name(&e.ns.name));
    sqlx::raw_sql(&format!("create role \"{role}\" login"))
        .execute(&admin)
        .await
        .unwrap();
    let rest = url.split_once("://").unwrap().1;
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    common::create_secret(&e.client, &e.ns.name, "db", &format!("postgres://{role}@{host}")).await;
    let schema = schema_name(&e.ns.name);
    e.inboxes
        .create(&PostParams::default(), &inbox("inbox", "db", &schema, json!({})))
        .await
        .unwrap();
    let obj = common::wait_condition(&e.inboxes, "inbox", "PrerequisitesMet", "False", Some("PrerequisiteFailed"), T).await;
    let conds = &obj.status.as_ref().unwrap().conditions;
    let msg = &common::condition(conds, "PrerequisitesMet").message;
    assert!(
        msg.contains("privileges on database") && msg.contains(&format!("role {role} lacks CREATE")),
        "{msg}"
    );
    assert!(msg.contains("grant create on database"), "{msg}");
    // The migration is still tried, and fails as the check said.
    assert_eq!(common::condition(conds, "SchemaReady").reason, "PermissionDenied");
    let db: String = sqlx::query_scalar("select current_database()::text")
        .fetch_one(&admin)
        .await
        .unwrap();
    sqlx::raw_sql(&format!("grant create on database \"{db}\" to \"{role}\""))
        .execute(&admin)
        .await
        .unwrap();
    // A refused role waits for the refresh: a change reconciles now.
    common::touch(&e.inboxes, "inbox").await;
    let obj = common::wait_condition(&e.inboxes, "inbox", "Ready", "True", None, T).await;
    assert_eq!(
        common::condition(&obj.status.unwrap().conditions, "PrerequisitesMet").reason,
        "PrerequisitesMet"
    );
    e.ns.delete().await;
}

#[tokio::test]
async fn a_database_outage_is_reported_and_heals() {
    let e = setup("ibt-dbdown").await;
    let pg = common::PrivatePostgres::start();
    common::create_secret(&e.client, &e.ns.name, "db", &pg.url()).await;
    e.inboxes
        .create(
            &PostParams::default(),
            &inbox("inbox", "db", "app", json!({"purge": {"interval": "2s"}})),
        )
        .await
        .unwrap();
    common::wait_condition(&e.inboxes, "inbox", "Ready", "True", None, T).await;
    pg.stop();
    // The purge loop (every 2s) or the next reconcile notices.
    let obj = common::wait_condition(&e.inboxes, "inbox", "Ready", "False", Some("DatabaseUnreachable"), T).await;
    let text = serde_json::to_string(&obj.status).unwrap();
    assert!(
        text.contains(&format!("127.0.0.1:{}", pg.port)),
        "the message names the database: {text}"
    );
    pg.start_again();
    common::wait_condition(&e.inboxes, "inbox", "Ready", "True", None, T).await;
    e.ns.delete().await;
}

async fn policy(client: &Client, name: &str, ns_label: &str, spec: serde_json::Value) -> Api<DedupPolicy> {
    let api: Api<DedupPolicy> = Api::all(client.clone());
    let mut s = spec;
    s["namespaceSelector"] = json!({"matchLabels": {"lockstep.dev/test": ns_label}});
    let p: DedupPolicy = serde_json::from_value(
        json!({"apiVersion": "lockstep.dev/v1alpha1", "kind": "DedupPolicy", "metadata": {"name": name}, "spec": s}),
    )
    .unwrap();
    api.create(&PostParams::default(), &p).await.unwrap();
    api
}

#[tokio::test]
async fn policies_clamp_or_report_and_exceptions_expire_on_time() {
    let e = setup("ibt-policy").await;
    let url = common::env("DATABASE_URL");
    common::create_secret(&e.client, &e.ns.name, "db", &url).await;
    let pname = common::unique("floor");
    let policies = policy(
        &e.client,
        &pname,
        &e.ns.name,
        json!({"minRetention": "24h", "enforcement": "Enforce"}),
    )
    .await;
    let schema = schema_name(&e.ns.name);
    e.inboxes
        .create(&PostParams::default(), &inbox("short", "db", &schema, json!({"retention": "1h"})))
        .await
        .unwrap();

    // Enforce: clamped to the policy's minimum.
    let obj = common::wait_condition(&e.inboxes, "short", "PolicyCompliant", "True", Some("RetentionClamped"), T).await;
    let st = obj.status.unwrap();
    assert_eq!(st.effective_retention.as_deref(), Some("24h"));
    assert_eq!(st.policies, std::slice::from_ref(&pname));
    // The policy lists it.
    let p = common::wait_until(T, "policy status", || {
        let policies = policies.clone();
        let pname = pname.clone();
        async move {
            let s = policies.get(&pname).await.ok()?.status?;
            (s.matched == 1 && s.non_compliant.len() == 1).then_some(s)
        }
    })
    .await;
    assert_eq!(p.non_compliant[0].name, "short");

    // Audit: reported, not clamped.
    policies
        .patch(
            &pname,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"enforcement": "Audit"}})),
        )
        .await
        .unwrap();
    let obj = common::wait_condition(&e.inboxes, "short", "PolicyCompliant", "False", Some("PolicyViolation"), T).await;
    let st = obj.status.unwrap();
    assert_eq!(st.effective_retention.as_deref(), Some("1h"));
    assert!(common::condition(&st.conditions, "PolicyCompliant")
        .message
        .contains("below minRetention 24h"));
    assert_eq!(
        common::condition(&st.conditions, "Ready").status,
        "True",
        "Audit does not block Ready"
    );

    // An exception already expired changes nothing; one expiring in a few seconds applies until then.
    let expired = k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(60);
    let soon = k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(8);
    policies
        .patch(
            &pname,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"enforcement": "Enforce", "exceptions": [
                {"namespace": e.ns.name, "name": "short", "minRetention": "1h", "expires": expired.to_string()}
            ]}})),
        )
        .await
        .unwrap();
    common::wait_condition(&e.inboxes, "short", "PolicyCompliant", "True", Some("RetentionClamped"), T).await;
    policies
        .patch(
            &pname,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"exceptions": [
                {"namespace": e.ns.name, "name": "short", "minRetention": "1h", "expires": soon.to_string()}
            ]}})),
        )
        .await
        .unwrap();
    let obj = common::wait_condition(&e.inboxes, "short", "PolicyCompliant", "True", Some("WithinPolicy"), T).await;
    assert_eq!(obj.status.unwrap().effective_retention.as_deref(), Some("1h"));
    // Re-evaluated when it expires, without any other event (refresh is 15s; expiry is sooner).
    let obj = common::wait_condition(
        &e.inboxes,
        "short",
        "PolicyCompliant",
        "True",
        Some("RetentionClamped"),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(obj.status.unwrap().effective_retention.as_deref(), Some("24h"));
    let elapsed_after_expiry = k8s_openapi::jiff::Timestamp::now().duration_since(soon);
    assert!(
        elapsed_after_expiry.as_secs() < 12,
        "re-evaluated {elapsed_after_expiry:?} after expiry"
    );
    policies.delete(&pname, &Default::default()).await.unwrap();
    e.ns.delete().await;
}

/// Issue 12 item 2: a DedupPolicy must fail closed. Broken by an edit, its last valid spec stays
/// in force (the floor holds); invalid from the start, it holds the purges of the tables it
/// selects. Either way rows the floor protects survive, and the policy reports InvalidSpec.
#[tokio::test]
async fn an_invalid_policy_keeps_its_floor_or_holds_the_purge() {
    let e = setup("ibt-failclosed").await;
    let url = common::env("DATABASE_URL");
    common::create_secret(&e.client, &e.ns.name, "db", &url).await;
    let schema = schema_name(&e.ns.name);
    let pname = common::unique("floor");
    let policies = policy(&e.client, &pname, &e.ns.name, json!({"minRetention": "24h"})).await;
    let purge = json!({"retention": "1h", "purge": {"interval": "1s", "batchSize": 100}});
    e.inboxes
        .create(&PostParams::default(), &inbox("short", "db", &schema, purge))
        .await
        .unwrap();
    common::wait_condition(&e.inboxes, "short", "PolicyCompliant", "True", Some("RetentionClamped"), T).await;
    common::wait_until(T, "the policy's applied spec", || {
        let (policies, pname) = (policies.clone(), pname.clone());
        async move { policies.get(&pname).await.ok()?.status?.applied_spec }
    })
    .await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let count = two_hours_old_rows(&pool, &schema, 500).await;

    // Broken by an edit (a duration the schema's pattern takes and validate() refuses).
    let bad = json!({"spec": {"minRetention": "1000000d"}});
    policies.patch(&pname, &PatchParams::default(), &Patch::Merge(&bad)).await.unwrap();
    common::wait_condition(&policies, &pname, "Ready", "False", Some("InvalidSpec"), T).await;
    common::touch(&e.inboxes, "short").await;
    tokio::time::sleep(Duration::from_secs(4)).await; // several 1 s purge intervals
    let obj = common::wait_condition(&e.inboxes, "short", "RetentionEnforced", "True", Some("PurgeHealthy"), T).await;
    assert_eq!(
        obj.status.unwrap().effective_retention.as_deref(),
        Some("24h"),
        "the last valid floor holds"
    );
    assert_eq!(count().await, 500, "rows inside the last valid floor survive");

    // Invalid from the start: no floor to go by, so the purge is held. (Created before the first
    // policy goes, so the table is never without a floor.)
    let never = common::unique("never-valid");
    let never_api = policy(&e.client, &never, &e.ns.name, json!({"minRetention": "1000000d"})).await;
    common::wait_condition(&never_api, &never, "Ready", "False", Some("InvalidSpec"), T).await;
    policies.delete(&pname, &Default::default()).await.unwrap();
    let obj = common::wait_condition(&e.inboxes, "short", "RetentionEnforced", "False", Some("PolicyInvalid"), T).await;
    let msg = common::condition(&obj.status.unwrap().conditions, "RetentionEnforced")
        .message
        .clone();
    assert!(msg.contains(&never), "{msg}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(count().await, 500, "a held purge deletes nothing");

    // Fixed: the floor applies again and the purge resumes (nothing here is older than 24h).
    let fixed = json!({"spec": {"minRetention": "24h"}});
    never_api
        .patch(&never, &PatchParams::default(), &Patch::Merge(&fixed))
        .await
        .unwrap();
    common::wait_condition(&e.inboxes, "short", "RetentionEnforced", "True", Some("PurgeHealthy"), T).await;
    assert_eq!(count().await, 500);
    never_api.delete(&never, &Default::default()).await.unwrap();
    e.ns.delete().await;
}

/// Issue 12 item 4: without CEL (this 1.20 API server stores any edit), renaming the table must
/// not move the purge to another table: the object keeps managing the table it recorded, refuses
/// the new name in a condition, and never creates it.
#[tokio::test]
async fn a_table_rename_is_refused_without_cel() {
    let e = setup("ibt-rename").await;
    let url = common::env("DATABASE_URL");
    common::create_secret(&e.client, &e.ns.name, "db", &url).await;
    let schema = schema_name(&e.ns.name);
    e.inboxes
        .create(&PostParams::default(), &inbox("t", "db", &schema, json!({"retention": "1h"})))
        .await
        .unwrap();
    let obj = common::wait_condition(&e.inboxes, "t", "Ready", "True", None, T).await;
    assert_eq!(obj.status.unwrap().table, Some(format!("{schema}.inbox")));
    let rename = json!({"spec": {"database": {"table": "inbox_renamed"}}});
    e.inboxes.patch("t", &PatchParams::default(), &Patch::Merge(&rename)).await.unwrap();
    let obj = common::wait_condition(&e.inboxes, "t", "Ready", "False", Some("TableChangeRefused"), T).await;
    let st = obj.status.unwrap();
    assert_eq!(st.table, Some(format!("{schema}.inbox")), "the recorded table stays");
    let msg = &common::condition(&st.conditions, "Ready").message;
    assert!(msg.contains(&format!("{schema}.inbox_renamed")), "{msg}");
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let created: Option<String> = sqlx::query_scalar("select to_regclass($1)::text")
        .bind(format!("\"{schema}\".inbox_renamed"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(created, None, "the new name was never created");
    // Put back: reconciled as before.
    let back = json!({"spec": {"database": {"table": "inbox"}}});
    e.inboxes.patch("t", &PatchParams::default(), &Patch::Merge(&back)).await.unwrap();
    common::wait_condition(&e.inboxes, "t", "Ready", "True", None, T).await;
    e.ns.delete().await;
}

#[tokio::test]
async fn purge_deletes_expired_rows_and_keeps_fresh_ones() {
    let e = setup("ibt-purge").await;
    let url = common::env("DATABASE_URL");
    let schema = schema_name(&e.ns.name);
    common::create_secret(&e.client, &e.ns.name, "db", &url).await;
    e.inboxes
        .create(
            &PostParams::default(),
            &inbox(
                "p",
                "db",
                &schema,
                json!({"retention": "1h", "purge": {"interval": "1s", "batchSize": 100}}),
            ),
        )
        .await
        .unwrap();
    common::wait_condition(&e.inboxes, "p", "SchemaReady", "True", None, T).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(&format!(
        "insert into \"{schema}\".inbox (consumer, message_id, received_at)
         select 'c', 'old-' || g, now() - interval '2 hours' from generate_series(1, 1000) g
         union all select 'c', 'fresh-' || g, now() - interval '10 minutes' from generate_series(1, 50) g"
    ))
    .execute(&pool)
    .await
    .unwrap();
    common::wait_until(T, "expired rows purged", || {
        let pool = pool.clone();
        let schema = schema.clone();
        async move {
            let n: i64 = sqlx::query_scalar(&format!("select count(*) from \"{schema}\".inbox where message_id like 'old-%'"))
                .fetch_one(&pool)
                .await
                .ok()?;
            (n == 0).then_some(())
        }
    })
    .await;
    let fresh: i64 = sqlx::query_scalar(&format!("select count(*) from \"{schema}\".inbox"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(fresh, 50, "fresh rows are kept");
    let obj = common::wait_condition(&e.inboxes, "p", "RetentionEnforced", "True", Some("PurgeHealthy"), T).await;
    assert!(obj.status.unwrap().last_purge.is_some());
    e.ns.delete().await;
}

#[tokio::test]
async fn one_invalid_inbox_does_not_stop_the_others() {
    let e = setup("ibt-invalid").await;
    let url = common::env("DATABASE_URL");
    let schema = schema_name(&e.ns.name);
    common::create_secret(&e.client, &e.ns.name, "db", &url).await;
    // Passes the schema, fails validate(): the source broker has no port.
    let bad = inbox(
        "bad",
        "db",
        &schema,
        json!({"sources": {"kafka": {"bootstrapServers": "kafka", "topics": ["t"]}}}),
    );
    e.inboxes.create(&PostParams::default(), &bad).await.unwrap();
    for name in ["good-a", "good-b"] {
        let mut ok = inbox(name, "db", &schema, json!({}));
        ok.spec.database.table = name.replace('-', "_");
        e.inboxes.create(&PostParams::default(), &ok).await.unwrap();
    }
    let obj = common::wait_condition(&e.inboxes, "bad", "Ready", "False", Some("InvalidSpec"), T).await;
    let msg = &common::condition(&obj.status.as_ref().unwrap().conditions, "Ready").message;
    assert!(msg.contains("spec.sources.kafka.bootstrapServers"), "{msg}");
    common::wait_condition(&e.inboxes, "good-a", "Ready", "True", None, T).await;
    common::wait_condition(&e.inboxes, "good-b", "Ready", "True", None, T).await;
    e.ns.delete().await;
}

#[tokio::test]
async fn metrics_and_health_are_served() {
    let addr = common::operator();
    let e = setup("ibt-metrics").await;
    common::create_secret(&e.client, &e.ns.name, "db", &common::env("DATABASE_URL")).await;
    e.inboxes
        .create(&PostParams::default(), &inbox("m", "db", &schema_name(&e.ns.name), json!({})))
        .await
        .unwrap();
    common::wait_condition(&e.inboxes, "m", "Ready", "True", None, T).await;
    let addr = addr.to_string();
    let get = |path: &'static str| common::http_get(&addr, path);
    let m = get("/metrics").await;
    assert!(m.contains("lockstep_reconciles_total{controller=\"inboxtable\"}"), "{m}");
    assert!(m.contains("lockstep_leader 1"), "{m}");
    assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    e.ns.delete().await;
}

#[tokio::test]
async fn a_second_inbox_table_on_one_table_conflicts_purges_nothing_and_takes_over_once_alone() {
    let a = setup("ibt-own-a").await;
    let b = setup("ibt-own-b").await;
    let url = common::env("DATABASE_URL");
    common::create_secret(&a.client, &a.ns.name, "db", &url).await;
    common::create_secret(&b.client, &b.ns.name, "db", &url).await;
    let schema = schema_name(&a.ns.name);
    let purging =
        |retention: &str| json!({"retention": retention, "purge": {"interval": "1s", "batchSize": 100}, "deletionPolicy": "Delete"});
    a.inboxes
        .create(&PostParams::default(), &inbox("first", "db", &schema, json!({"retention": "3h"})))
        .await
        .unwrap();
    common::wait_condition(&a.inboxes, "first", "Ready", "True", None, T).await;
    // The second names the same table from another namespace, with a shorter retention.
    b.inboxes
        .create(&PostParams::default(), &inbox("second", "db", &schema, purging("1h")))
        .await
        .unwrap();
    let obj = common::wait_condition(&b.inboxes, "second", "Ready", "False", Some("ResourceConflict"), T).await;
    let st = obj.status.unwrap();
    let msg = &common::condition(&st.conditions, "SchemaReady").message;
    assert!(msg.contains(&format!("InboxTable {}/first", a.ns.name)), "{msg}");
    assert_eq!(st.table, None, "the table is not recorded as the second's");

    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let count = two_hours_old_rows(&pool, &schema, 300).await;
    // The second would purge every second; touch it so it reconciles (and claims) again.
    common::touch(&b.inboxes, "second").await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(count().await, 300, "the 1h retention of the conflicting object purged nothing");

    // Deleting the conflicting object (deletionPolicy Delete) drops nothing.
    b.inboxes.delete("second", &Default::default()).await.unwrap();
    common::wait_until(T, "second deleted", || {
        let api = b.inboxes.clone();
        async move { api.get_opt("second").await.unwrap().is_none().then_some(()) }
    })
    .await;
    assert_eq!(count().await, 300, "the owner's table survives the other's Delete cleanup");

    // Once the owner is gone (Retain), a new object takes the table over and purges by its own retention.
    b.inboxes
        .create(&PostParams::default(), &inbox("third", "db", &schema, purging("1h")))
        .await
        .unwrap();
    common::wait_condition(&b.inboxes, "third", "Ready", "False", Some("ResourceConflict"), T).await;
    a.inboxes.delete("first", &Default::default()).await.unwrap();
    common::wait_condition(&b.inboxes, "third", "Ready", "True", None, T).await;
    common::wait_until(T, "the new owner purges", || {
        let count = count();
        async move { (count.await == 0).then_some(()) }
    })
    .await;
    let owner: (String, String) = sqlx::query_as(&format!(
        "select namespace, name from \"{schema}\".lockstep_owners where table_name = 'inbox'"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(owner, (b.ns.name.clone(), "third".to_owned()));
    b.ns.delete().await;
    a.ns.delete().await;
}
