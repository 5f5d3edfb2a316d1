//! deletionPolicy against the real API server (and its garbage collector), PostgreSQL and the
//! Kafka-protocol broker: Retain keeps tables and topics; Delete drops them, but only once every
//! event is published (or the user says to drop them anyway) and no relay holds the outbox.

mod common;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    api::{Api, DeleteParams, Patch, PatchParams, PostParams},
    Client, ResourceExt,
};
use lockstep::{
    clients::kafka::Admin,
    crd::{InboxTable, OutboxRelay},
};
use serde_json::json;
use sqlx::PgPool;

const T: Duration = Duration::from_secs(60);
const FINALIZER: &str = "lockstep.dev/cleanup";

struct Env {
    client: Client,
    ns: common::TestNamespace,
    relays: Api<OutboxRelay>,
    schema: String,
    pool: PgPool,
}

async fn setup(prefix: &str) -> Env {
    common::operator();
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::TestNamespace::new(&client, prefix).await;
    common::create_secret(&client, &ns.name, "db", &common::env("DATABASE_URL")).await;
    let relays = Api::namespaced(client.clone(), &ns.name);
    let schema = ns.name.replace('-', "_");
    let pool = PgPool::connect(&common::env("DATABASE_URL")).await.unwrap();
    Env {
        client,
        ns,
        relays,
        schema,
        pool,
    }
}

fn relay(name: &str, schema: &str, topic: &str, policy: &str) -> OutboxRelay {
    serde_json::from_value(json!({
        "apiVersion": "lockstep.dev/v1alpha1", "kind": "OutboxRelay", "metadata": {"name": name},
        "spec": {
            "database": {"urlSecretRef": {"name": "db"}, "schema": schema, "table": "outbox"},
            "kafka": {"bootstrapServers": common::kafka_bootstrap()},
            "routing": {"topic": topic},
            "topics": [{"name": topic, "partitions": 1, "replicationFactor": 1}],
            "relay": {"replicas": 1},
            "deletionPolicy": policy
        }
    }))
    .unwrap()
}

fn admin() -> Admin {
    Admin::new(&common::kafka_bootstrap(), &Default::default(), Duration::from_secs(10)).unwrap()
}

/// Asked again on an error: a broker under the load of the parallel tests may answer a topic's
/// metadata with a transient error, which is no answer to "does it exist".
async fn topic_exists(topic: &str) -> bool {
    let mut last = None;
    for _ in 0..10 {
        match admin().describe(&[topic.to_string()]).await {
            Ok(found) => return found.contains_key(topic),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("cannot describe {topic}: {last:?}")
}

async fn table_exists(pool: &PgPool, schema: &str, table: &str) -> bool {
    sqlx::query_scalar("select to_regclass($1) is not null")
        .bind(format!("\"{schema}\".\"{table}\""))
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn history_rows(pool: &PgPool, schema: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "select count(*) from \"{schema}\".lockstep_schema_history where table_schema = $1"
    ))
    .bind(schema)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn insert_events(pool: &PgPool, schema: &str, n: i64) {
    sqlx::query(&format!(
        "insert into \"{schema}\".outbox (id, aggregatetype, aggregateid, type, payload)
         select gen_random_uuid(), 'order', 'k-' || g, 'created', '{{}}' from generate_series(1, $1) g"
    ))
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

async fn wait_gone<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    common::wait_until(T, &format!("{name} deleted"), || async {
        api.get_opt(name).await.unwrap().is_none().then_some(())
    })
    .await
}

/// Ready's message, once Ready is False with reason DeletionBlocked and the message contains `text`.
async fn wait_blocked(api: &Api<OutboxRelay>, name: &str, text: &str) -> String {
    common::wait_until(T, &format!("{name}: DeletionBlocked with {text:?}"), || async {
        let obj = api.get(name).await.unwrap();
        let conds = obj.status.map(|s| s.conditions).unwrap_or_default();
        let ready = conds.iter().find(|c| c.type_ == "Ready")?;
        (ready.reason == "DeletionBlocked" && ready.message.contains(text)).then(|| ready.message.clone())
    })
    .await
}

/// Wait until our finalizer is on `name` (`want`) or off.
async fn wait_finalizer<K>(api: &Api<K>, name: &str, want: bool)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    common::wait_until(T, &format!("{name}: finalizer present: {want}"), || async {
        let obj = api.get(name).await.unwrap();
        (obj.finalizers().iter().any(|f| f == FINALIZER) == want).then_some(())
    })
    .await
}

/// Create OutboxRelay "orders" on `topic` with `policy`; wait until its tables and topic are
/// there, and, under Delete, its finalizer.
async fn create_orders(env: &Env, topic: &str, policy: &str) {
    env.relays
        .create(&PostParams::default(), &relay("orders", &env.schema, topic, policy))
        .await
        .unwrap();
    common::wait_condition(&env.relays, "orders", "SchemaReady", "True", None, T).await;
    common::wait_condition(&env.relays, "orders", "TopicsReady", "True", None, T).await;
    if policy == "Delete" {
        wait_finalizer(&env.relays, "orders", true).await;
    }
}

/// Retain (the default): no finalizer; deleting the OutboxRelay leaves its tables and topic, and
/// the garbage collector takes its Deployment.
#[tokio::test]
async fn retain_keeps_the_tables_and_topics() {
    let env = setup("del-retain").await;
    let topic = common::unique("retain.events");
    create_orders(&env, &topic, "Retain").await;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns.name);
    assert!(deployments.get_opt("orders-relay").await.unwrap().is_some());
    assert!(
        env.relays.get("orders").await.unwrap().finalizers().is_empty(),
        "Retain needs no finalizer"
    );
    insert_events(&env.pool, &env.schema, 5).await;

    env.relays.delete("orders", &DeleteParams::default()).await.unwrap();
    wait_gone(&env.relays, "orders").await;
    wait_gone(&deployments, "orders-relay").await;
    assert!(table_exists(&env.pool, &env.schema, "outbox").await);
    assert!(table_exists(&env.pool, &env.schema, "outbox_dead_letter").await);
    let kept: i64 = sqlx::query_scalar(&format!("select count(*) from \"{}\".outbox", env.schema))
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(kept, 5, "the events stay");
    // This once failed now and then: the published tansu deleted every topic with any one of them,
    // and the Delete tests beside this one delete theirs (tests/kafka.rs::deleting_a_topic_leaves_the_others).
    assert!(topic_exists(&topic).await, "the topic stays");
    env.ns.delete().await;
}

/// Delete: refused while events are unpublished; once a relay published them and stopped, the
/// tables, their history and the topic are gone, and so is the object.
#[tokio::test]
async fn delete_waits_for_unpublished_events_and_the_relay_then_drops_everything() {
    let env = setup("del-delete").await;
    let topic = common::unique("delete.events");
    create_orders(&env, &topic, "Delete").await;
    insert_events(&env.pool, &env.schema, 10).await;

    env.relays.delete("orders", &DeleteParams::default()).await.unwrap();
    let m = wait_blocked(&env.relays, "orders", "10 unpublished").await;
    assert!(m.contains("lockstep.dev/delete-unpublished=true"), "{m}");
    assert!(
        table_exists(&env.pool, &env.schema, "outbox").await,
        "nothing dropped while refused"
    );

    // A relay publishes them; while it runs, its lock holds the drop back.
    let log =
        std::fs::File::create(std::path::PathBuf::from(common::env("LOCKSTEP_TESTENV_DIR")).join(format!("{}.log", env.ns.name))).unwrap();
    let mut relay = std::process::Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["relay", "--schema", &env.schema, "--table", "outbox", "--topic", &topic])
        .args(["--metrics-addr", "127.0.0.1:0", "--poll-interval", "200ms"])
        .env("DATABASE_URL", common::env("DATABASE_URL"))
        .env("KAFKA_BOOTSTRAP_SERVERS", common::kafka_bootstrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_blocked(&env.relays, "orders", "waiting for the relays to stop").await;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns.name);
    assert!(
        deployments.get_opt("orders-relay").await.unwrap().is_none(),
        "the relay Deployment is deleted first"
    );
    assert!(table_exists(&env.pool, &env.schema, "outbox").await);
    let _ = relay.kill();
    let _ = relay.wait();

    wait_gone(&env.relays, "orders").await;
    assert!(!table_exists(&env.pool, &env.schema, "outbox").await);
    assert!(!table_exists(&env.pool, &env.schema, "outbox_dead_letter").await);
    assert_eq!(history_rows(&env.pool, &env.schema).await, 0, "their migration history is gone too");
    assert!(!topic_exists(&topic).await, "the topic is deleted");
    env.ns.delete().await;
}

/// Delete with lockstep.dev/delete-unpublished=true drops unpublished events; switching back to
/// Retain takes the finalizer off.
#[tokio::test]
async fn delete_unpublished_drops_pending_events_and_retain_drops_the_finalizer() {
    let env = setup("del-force").await;
    let topic = common::unique("force.events");
    create_orders(&env, &topic, "Delete").await;
    let set_policy = |p: &'static str| {
        let api = env.relays.clone();
        async move {
            api.patch(
                "orders",
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"deletionPolicy": p}})),
            )
            .await
            .unwrap();
        }
    };
    set_policy("Retain").await;
    wait_finalizer(&env.relays, "orders", false).await;
    set_policy("Delete").await;
    wait_finalizer(&env.relays, "orders", true).await;

    insert_events(&env.pool, &env.schema, 3).await;
    let force = json!({"metadata": {"annotations": {"lockstep.dev/delete-unpublished": "true"}}});
    env.relays
        .patch("orders", &PatchParams::default(), &Patch::Merge(&force))
        .await
        .unwrap();
    env.relays.delete("orders", &DeleteParams::default()).await.unwrap();
    wait_gone(&env.relays, "orders").await;
    assert!(!table_exists(&env.pool, &env.schema, "outbox").await);
    env.ns.delete().await;
}

/// An InboxTable with Delete: its table is dropped before the object goes; with Retain it stays.
#[tokio::test]
async fn inbox_table_delete_drops_its_table_and_retain_keeps_it() {
    let env = setup("del-inbox").await;
    let inboxes: Api<InboxTable> = Api::namespaced(env.client.clone(), &env.ns.name);
    for (name, policy) in [("dropped", "Delete"), ("kept", "Retain")] {
        let obj: InboxTable = serde_json::from_value(json!({
            "apiVersion": "lockstep.dev/v1alpha1", "kind": "InboxTable", "metadata": {"name": name},
            "spec": {"database": {"urlSecretRef": {"name": "db"}, "schema": env.schema, "table": name},
                     "deletionPolicy": policy}
        }))
        .unwrap();
        inboxes.create(&PostParams::default(), &obj).await.unwrap();
        common::wait_condition(&inboxes, name, "SchemaReady", "True", None, T).await;
    }
    wait_finalizer(&inboxes, "dropped", true).await;
    for name in ["dropped", "kept"] {
        inboxes.delete(name, &DeleteParams::default()).await.unwrap();
        wait_gone(&inboxes, name).await;
    }
    assert!(!table_exists(&env.pool, &env.schema, "dropped").await);
    assert!(table_exists(&env.pool, &env.schema, "kept").await);
    env.ns.delete().await;
}

/// Deleting the namespace deletes its Secrets too: a Delete-policy OutboxRelay whose Secret is
/// gone cannot reach its database, and waiting would hold the namespace in Terminating forever.
/// It lets go and keeps the tables; the unpublished events are still there.
#[tokio::test]
async fn a_deleted_namespace_is_not_held_and_unpublished_events_are_kept() {
    use k8s_openapi::api::core::v1::Namespace;
    let env = setup("del-ns").await;
    let topic = common::unique("ns.events");
    create_orders(&env, &topic, "Delete").await;
    insert_events(&env.pool, &env.schema, 3).await;

    let namespaces: Api<Namespace> = Api::all(env.client.clone());
    let name = env.ns.name.clone();
    namespaces.delete(&name, &DeleteParams::default()).await.unwrap();
    common::wait_until(Duration::from_secs(120), "the namespace deleted", || async {
        namespaces.get_opt(&name).await.unwrap().is_none().then_some(())
    })
    .await;
    let kept: i64 = sqlx::query_scalar(&format!("select count(*) from \"{}\".outbox", env.schema))
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(kept, 3, "unpublished events are never dropped unseen");
}
