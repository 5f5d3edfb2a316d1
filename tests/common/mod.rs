//! Helpers for integration tests against the real servers `scripts/testenv up` starts.
//! Every test gets its own namespace, database schema and topic names.
#![allow(dead_code)]

pub mod broker;
pub mod doctor;
pub mod kafka_proxy;
pub mod outbox;
pub mod pgbouncer;
pub mod private_pg;
pub mod proxy;
pub mod rabbitmq;
pub mod relays;
pub mod standby;
pub mod tls;

#[allow(unused_imports)] // each test binary uses some of them
pub use private_pg::{pg_command, private_pg_dir, PrivatePostgres};

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    api::{Api, DeleteParams, PostParams},
    Client,
};

/// A variable `scripts/testenv up` writes; a missing one fails the test loudly.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with scripts/test, or `source target/testenv/env` after `scripts/testenv up`")
    })
}

/// The lockstep binary the tests run: this build's, or LOCKSTEP_TEST_BIN's (a copy kept aside when
/// several checkouts share one target folder, whose builds replace each other's binary).
pub fn lockstep_bin() -> String {
    std::env::var("LOCKSTEP_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_lockstep").to_owned())
}

/// A short random suffix for names.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

pub async fn kube_client() -> Client {
    env("KUBECONFIG");
    Client::try_default().await.expect("connect to the test kube-apiserver")
}

/// Apply lockstep's CRDs the way `lockstep crds --apply` does (CEL rules stripped: the 1.20 test
/// server predates them) and wait until each is Established.
pub async fn install_crds(client: &Client) {
    let stripped = lockstep::crd::crdgen::apply(client).await.expect("apply CRDs");
    assert!(stripped, "the 1.20 test server should get CRDs without CEL rules");
}

/// A namespace of its own for one test; deleted by [`TestNamespace::delete`].
pub struct TestNamespace {
    pub name: String,
    client: Client,
}

impl TestNamespace {
    pub async fn new(client: &Client, prefix: &str) -> Self {
        let name = unique(prefix);
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create test namespace");
        TestNamespace {
            name,
            client: client.clone(),
        }
    }

    pub async fn delete(self) {
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&self.name, &DeleteParams::default())
            .await;
    }
}

/// Poll `f` until it returns Some, or panic naming what was awaited.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A connection pool on the test PostgreSQL with a schema of its own as search_path.
pub struct TestSchema {
    pub pool: sqlx::PgPool,
    pub schema: String,
}

pub async fn pg_schema(prefix: &str) -> TestSchema {
    let url = env("DATABASE_URL");
    let schema = format!("t_{}", unique(prefix).replace('-', "_"));
    let admin = sqlx::PgPool::connect(&url).await.expect("connect to the test PostgreSQL");
    sqlx::query(&format!("create schema {}", lockstep::core::sql::quote_ident(&schema)))
        .execute(&admin)
        .await
        .expect("create schema");
    admin.close().await;
    let s = schema.clone();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .after_connect(move |conn, _| {
            let s = s.clone();
            Box::pin(async move {
                sqlx::query(&format!("set search_path to {}", lockstep::core::sql::quote_ident(&s)))
                    .execute(conn)
                    .await?;
                Ok(())
            })
        })
        .connect(&url)
        .await
        .expect("connect to the test PostgreSQL");
    TestSchema { pool, schema }
}

impl TestSchema {
    /// `table` in this schema.
    pub fn table(&self, table: &str) -> lockstep::core::sql::QualifiedName {
        lockstep::core::sql::QualifiedName {
            schema: lockstep::core::sql::Ident::parse(&self.schema).unwrap(),
            table: lockstep::core::sql::Ident::parse(table).unwrap(),
        }
    }

    /// `table` in this schema, migrated to lockstep's inbox contract.
    pub async fn inbox(&self, table: &str) -> lockstep::core::sql::QualifiedName {
        let t = self.table(table);
        let mut conn = self.pool.acquire().await.unwrap();
        lockstep::tables::schema::migrate(&mut conn, lockstep::tables::schema::TableKind::Inbox, &t, true)
            .await
            .expect("migrate the inbox");
        t
    }
}

/// A pool of up to `max` connections on the test PostgreSQL, for tests of many sessions at once.
pub async fn pool(max: u32) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max)
        .connect(&env("DATABASE_URL"))
        .await
        .expect("connect to the test PostgreSQL")
}

pub fn kafka_bootstrap() -> String {
    env("KAFKA_BOOTSTRAP_SERVERS")
}

/// The operator under test: one per test binary, on a runtime of its own so it outlives each
/// test's runtime, with leader election on (a Lease of its own). Returns its metrics address.
pub fn operator() -> std::net::SocketAddr {
    static ADDR: std::sync::OnceLock<std::net::SocketAddr> = std::sync::OnceLock::new();
    *ADDR.get_or_init(|| {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let lease = unique("lockstep-test-operator");
        // The operator's log, for when a test fails: target/testenv/<binary>-operator.log
        let log_path = std::path::PathBuf::from(env("LOCKSTEP_TESTENV_DIR")).join(format!(
            "{}-operator.log",
            std::env::current_exe().unwrap().file_stem().unwrap().to_string_lossy()
        ));
        let file = std::fs::File::create(&log_path).expect("operator log file");
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info,lockstep=debug"))
            .with_writer(std::sync::Mutex::new(file))
            .with_ansi(false)
            .try_init();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let client = kube_client().await;
                install_crds(&client).await;
                let args = lockstep::config::OperatorArgs {
                    metrics_addr: addr,
                    watch_namespaces: vec![],
                    leader_election: true,
                    lease_name: lease,
                    lease_namespace: "default".into(),
                    identity: None,
                    relay_image: "lockstep:test".into(),
                    relay_image_prefixes: vec![],
                    db_pool_size: 4,
                    refresh_concurrency: 4,
                };
                lockstep::operator::run(client, args, tokio_util::sync::CancellationToken::new())
                    .await
                    .expect("operator run");
            });
        });
        addr
    })
}

/// Change an annotation, which starts a reconcile now instead of at the next refresh.
pub async fn touch<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let v = uuid::Uuid::new_v4().to_string();
    let patch = serde_json::json!({"metadata": {"annotations": {"test/touch": v}}});
    api.patch(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
        .await
        .unwrap();
}

/// Wait until condition `type_` has `status` (and `reason`, when given); returns the object.
pub async fn wait_condition<K>(api: &Api<K>, name: &str, type_: &str, status: &str, reason: Option<&str>, timeout: Duration) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + serde::Serialize,
{
    let mut last = String::new();
    let what = format!("{name}: {type_}={status} {}", reason.unwrap_or(""));
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(obj) = api.get(name).await {
            let v = serde_json::to_value(&obj).unwrap();
            let conds = v["status"]["conditions"].as_array().cloned().unwrap_or_default();
            if let Some(c) = conds.iter().find(|c| c["type"] == type_) {
                if c["status"] == status && reason.is_none_or(|r| c["reason"] == r) {
                    return obj;
                }
            }
            last = serde_json::to_string_pretty(&v["status"]).unwrap();
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last status: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The first Event in `ns` with `reason` whose note holds `note`, waited for.
pub async fn wait_event(client: &kube::Client, ns: &str, reason: &str, note: &str, timeout: Duration) -> k8s_openapi::api::core::v1::Event {
    let events: kube::Api<k8s_openapi::api::core::v1::Event> = kube::Api::namespaced(client.clone(), ns);
    wait_until(timeout, &format!("an Event {reason} saying {note:?}"), || {
        let events = events.clone();
        async move {
            let list = events.list(&Default::default()).await.ok()?;
            list.items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some(reason) && e.message.as_deref().unwrap_or_default().contains(note))
        }
    })
    .await
}

pub fn condition<'a>(
    conds: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    conds
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {conds:?}"))
}

pub async fn create_secret(client: &Client, ns: &str, name: &str, url: &str) {
    let s: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "stringData": {"url": url}})).unwrap();
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &s)
        .await
        .expect("create Secret");
}

/// The response to a plain HTTP/1.1 GET of `path` at `addr`.
pub async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// `http_get`, or None when nothing answers at `addr`.
pub async fn http_get_checked(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

/// A tansu broker of a test's own, for tests that stop and start the broker.
pub struct PrivateBroker {
    pub port: u16,
    /// The address clients are told to connect to (a proxy's), when not the broker's own.
    advertised: Option<String>,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl PrivateBroker {
    pub fn start() -> Self {
        Self::start_advertising(None)
    }

    /// A broker that tells clients to connect to `advertised` (host:port), a proxy in front of it.
    pub fn start_advertising(advertised: Option<String>) -> Self {
        let dir = std::path::PathBuf::from(env("LOCKSTEP_TESTENV_DIR"))
            .join("private-tansu")
            .join(unique("b"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut b = PrivateBroker {
            port,
            advertised,
            dir,
            child: None,
        };
        b.start_again();
        b
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn start_again(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = self.advertised.as_ref().map_or(url.clone(), |a| format!("tcp://{a}"));
        let child = std::process::Command::new(env("LOCKSTEP_TANSU_BIN"))
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
                "--storage-engine",
                "sqlite://tansu.db",
            ])
            .current_dir(&self.dir)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("log")).unwrap())
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "private tansu did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        // As scripts/testenv does: index tansu's header table, or every fetch scans all headers.
        loop {
            let ok = std::process::Command::new("sqlite3")
                .arg(self.dir.join("tansu.db"))
                .arg("pragma busy_timeout = 30000; create index if not exists lockstep_header_record on header (topition, offset_id);")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("run sqlite3")
                .success();
            if ok {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "cannot index the private tansu's header table"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
