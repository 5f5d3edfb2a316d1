//! Purge loops obey the last verdict and the leader Lease (issue "Step 11" item 4), against the
//! real API server and PostgreSQL. Each test runs an operator of its own, watching only its
//! namespace, with a Lease of its own (the test can take it away). No other operator may watch
//! these namespaces meanwhile (`cargo test` runs one test binary at a time): one leading a Lease
//! of its own would purge these tables by its own, legitimate, view.

mod common;

use std::time::Duration;

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Namespace};
use kube::{
    api::{Api, Patch, PatchParams, PostParams},
    Client,
};
use lockstep::crd::{DedupPolicy, InboxTable};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(60);
const ROWS: i64 = 500;

struct Env {
    client: Client,
    ns: common::TestNamespace,
    inboxes: Api<InboxTable>,
    schema: String,
    pool: sqlx::PgPool,
    metrics: std::net::SocketAddr,
    lease: String,
    stop: CancellationToken,
    operator: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// A namespace labelled for policies that select it alone, a database Secret, and an operator
/// (leader election on) watching only that namespace.
async fn setup(prefix: &str) -> Env {
    // The operators' log, for when a test fails: target/testenv/purge_operator.log (one per
    // process: a nextest run replaces it with each test's own).
    static LOG: std::sync::Once = std::sync::Once::new();
    LOG.call_once(|| {
        let path = std::path::PathBuf::from(common::env("LOCKSTEP_TESTENV_DIR")).join("purge_operator.log");
        let file = std::fs::File::create(path).expect("operator log file");
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info,lockstep=debug"))
            .with_writer(std::sync::Mutex::new(file))
            .with_ansi(false)
            .try_init();
    });
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::TestNamespace::new(&client, prefix).await;
    let patch = json!({"metadata": {"labels": {"lockstep.dev/test": ns.name}}});
    Api::<Namespace>::all(client.clone())
        .patch(&ns.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let url = common::env("DATABASE_URL");
    common::create_secret(&client, &ns.name, "db", &url).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let lease = "lockstep-purge-test".to_string();
    let args = lockstep::config::OperatorArgs {
        metrics_addr: metrics,
        watch_namespaces: vec![ns.name.clone()],
        leader_election: true,
        lease_name: lease.clone(),
        lease_namespace: ns.name.clone(),
        identity: Some("purge-test-operator".into()),
        relay_image: "lockstep:test".into(),
        relay_image_prefixes: vec![],
        db_pool_size: 4,
        refresh_concurrency: 4,
    };
    let stop = CancellationToken::new();
    let operator = tokio::spawn(lockstep::operator::run(client.clone(), args, stop.clone()));
    Env {
        inboxes: Api::namespaced(client.clone(), &ns.name),
        schema: ns.name.replace('-', "_"),
        pool: sqlx::PgPool::connect(&url).await.unwrap(),
        client,
        ns,
        metrics,
        lease,
        stop,
        operator,
    }
}

impl Env {
    /// An InboxTable "t" on `<schema>.inbox`: 1h retention, purged every second; Ready once its
    /// first purge finished.
    async fn purging_table(&self, extra: serde_json::Value) {
        let mut v = json!({
            "apiVersion": "lockstep.dev/v1alpha1", "kind": "InboxTable", "metadata": {"name": "t"},
            "spec": {"database": {"urlSecretRef": {"name": "db"}, "schema": self.schema, "table": "inbox"},
                     "retention": "1h", "purge": {"interval": "1s", "batchSize": 100}}
        });
        for (k, val) in extra.as_object().unwrap() {
            v["spec"][k] = val.clone();
        }
        let obj: InboxTable = serde_json::from_value(v).unwrap();
        self.inboxes.create(&PostParams::default(), &obj).await.unwrap();
        common::wait_condition(&self.inboxes, "t", "RetentionEnforced", "True", Some("PurgeHealthy"), T).await;
    }

    /// Insert ROWS rows received two hours ago (expired by the table's 1h retention).
    async fn two_hours_old_rows(&self) {
        sqlx::query(&format!(
            "insert into \"{}\".inbox (consumer, message_id, received_at)
             select 'c', 'two-hours-' || g, now() - interval '2 hours' from generate_series(1, $1) g",
            self.schema
        ))
        .bind(ROWS)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    async fn rows(&self) -> i64 {
        sqlx::query_scalar(&format!("select count(*) from \"{}\".inbox", self.schema))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Rename the table in the spec (this 1.20 API server has no CEL to refuse it).
    async fn rename_table(&self) {
        let rename = json!({"spec": {"database": {"table": "inbox_renamed"}}});
        self.inboxes
            .patch("t", &PatchParams::default(), &Patch::Merge(&rename))
            .await
            .unwrap();
        common::wait_condition(&self.inboxes, "t", "Ready", "False", Some("TableChangeRefused"), T).await;
    }

    async fn done(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.operator).await;
        self.ns.delete().await;
    }
}

/// A table change is refused, and a running purge must not go on by the retention it had before:
/// a DedupPolicy raising the minimum to 24h must protect two-hour-old rows.
#[tokio::test]
async fn a_refused_table_change_stops_the_purge_a_raised_minimum_would_stop() {
    let e = setup("purge-rename-policy").await;
    e.purging_table(json!({})).await;
    e.rename_table().await;
    let pname = common::unique("floor");
    let policies: Api<DedupPolicy> = Api::all(e.client.clone());
    let p: DedupPolicy = serde_json::from_value(json!({
        "apiVersion": "lockstep.dev/v1alpha1", "kind": "DedupPolicy", "metadata": {"name": pname},
        "spec": {"minRetention": "24h", "namespaceSelector": {"matchLabels": {"lockstep.dev/test": e.ns.name}}}
    }))
    .unwrap();
    policies.create(&PostParams::default(), &p).await.unwrap();
    common::wait_until(T, "the policy's applied spec", || {
        let (policies, pname) = (policies.clone(), pname.clone());
        async move { policies.get(&pname).await.ok()?.status?.applied_spec }
    })
    .await;
    e.two_hours_old_rows().await;
    tokio::time::sleep(Duration::from_secs(5)).await; // several 1 s purge intervals
    let left = e.rows().await;
    policies.delete(&pname, &Default::default()).await.unwrap();
    e.done().await;
    assert_eq!(
        left, ROWS,
        "rows inside the policy's 24h minimum were purged by the old 1h retention"
    );
}

/// A table change is refused, and a paused table must not be purged.
#[tokio::test]
async fn a_refused_table_change_stops_the_purge_a_pause_would_stop() {
    let e = setup("purge-rename-pause").await;
    e.purging_table(json!({})).await;
    e.rename_table().await;
    let pause = json!({"metadata": {"annotations": {"lockstep.dev/paused": "true"}}});
    e.inboxes.patch("t", &PatchParams::default(), &Patch::Merge(&pause)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    e.two_hours_old_rows().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let left = e.rows().await;
    e.done().await;
    assert_eq!(left, ROWS, "a paused table was purged");
}

/// Once the Lease is lost, nothing may purge: not the loops that ran, and not a loop a reconcile
/// still in flight would start. The reconcile is held at its ownership claim (the owners table is
/// locked) while another holder takes the Lease; it goes on only after the operator noticed.
#[tokio::test]
async fn after_the_lease_is_lost_no_purge_deletes_anything() {
    let mut e = setup("purge-lease").await;
    // Sources on a closed port: the reconcile spends seconds on coverage after its purge call, so
    // a loop it started would have time to purge before the controllers drain.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    e.purging_table(json!({"sources": {"kafka": {"bootstrapServers": closed.to_string(), "topics": ["t"]}}}))
        .await;
    let mut lock = e.pool.begin().await.unwrap();
    sqlx::query(&format!("lock table \"{}\".lockstep_owners in access exclusive mode", e.schema))
        .execute(&mut *lock)
        .await
        .unwrap();
    common::touch(&e.inboxes, "t").await;
    let (pool, owners) = (e.pool.clone(), format!("\"{}\".lockstep_owners", e.schema));
    common::wait_until(T, "a reconcile waiting on the owners table", || {
        let (pool, owners) = (pool.clone(), owners.clone());
        async move {
            let waiting: i64 = sqlx::query_scalar("select count(*) from pg_locks where relation = $1::regclass and not granted")
                .bind(owners)
                .fetch_one(&pool)
                .await
                .ok()?;
            (waiting > 0).then_some(())
        }
    })
    .await;

    // Another holder takes the Lease.
    let leases: Api<Lease> = Api::namespaced(e.client.clone(), &e.ns.name);
    let now = k8s_openapi::jiff::Timestamp::now();
    let steal = json!({"spec": {"holderIdentity": "someone-else", "leaseDurationSeconds": 600,
                                "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now)}});
    leases
        .patch(&e.lease, &PatchParams::default(), &Patch::Merge(&steal))
        .await
        .unwrap();
    let addr = e.metrics.to_string();
    common::wait_until(T, "the operator to notice it no longer leads", || {
        let addr = addr.clone();
        async move {
            common::http_get(&addr, "/metrics")
                .await
                .contains("lockstep_leader 0")
                .then_some(())
        }
    })
    .await;

    e.two_hours_old_rows().await;
    lock.rollback().await.unwrap(); // the held reconcile goes on and asks for its purge loop
    let run = tokio::time::timeout(T, &mut e.operator).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let left = e.rows().await;
    e.ns.delete().await;
    let run = run.expect("the operator exits after losing the Lease");
    let err = run.unwrap().expect_err("losing the Lease is an error");
    assert!(err.to_string().contains("lost the leader Lease"), "{err}");
    assert_eq!(left, ROWS, "a purge ran after the Lease was lost");
}
