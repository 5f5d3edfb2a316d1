//! Relays run as the binary a Pod would run, against an outbox and a topic of a test's own, and
//! what the failover tests read back from the topic.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use lockstep::clients::kafka::Admin;
use rdkafka::{
    config::ClientConfig,
    consumer::{BaseConsumer, Consumer},
    message::{Headers, Message},
};

pub struct Outbox {
    pub table: super::outbox::OutboxTable,
    /// The topic or subject the relay publishes to.
    pub topic: String,
    /// The broker's address (Kafka's bootstrap servers, the NATS URL, the AMQP URL).
    pub bootstrap: String,
    /// The database the table is in.
    pub url: String,
    pub kind: super::broker::Kind,
    /// What a relay needs to reach the broker (`Broker::relay_env`).
    pub broker_env: Vec<(&'static str, String)>,
}

impl std::ops::Deref for Outbox {
    type Target = super::outbox::OutboxTable;
    fn deref(&self) -> &Self::Target {
        &self.table
    }
}

/// An outbox on the test PostgreSQL and a topic (one partition) on the Kafka broker `bootstrap`.
pub async fn outbox(prefix: &str, bootstrap: &str) -> Outbox {
    let topic = super::unique(&format!("relay.{prefix}"));
    let admin = Admin::new(bootstrap, &Default::default(), Duration::from_secs(10)).unwrap();
    admin.create_topic(&topic, 1, 1, &Default::default()).await.unwrap();
    let url = super::env("DATABASE_URL");
    Outbox {
        table: super::outbox::OutboxTable::create(prefix, &url).await,
        topic,
        bootstrap: bootstrap.to_owned(),
        url,
        kind: super::broker::Kind::Kafka,
        broker_env: vec![("KAFKA_BOOTSTRAP_SERVERS", bootstrap.to_owned())],
    }
}

/// An outbox in the database at `url` and a destination on `broker` (a topic of `partitions`,
/// or a stream).
pub async fn outbox_on(prefix: &str, broker: &super::broker::Broker, partitions: i32, url: &str) -> Outbox {
    Outbox {
        topic: broker.declare(prefix, partitions).await,
        table: super::outbox::OutboxTable::create(prefix, url).await,
        bootstrap: broker.address.clone(),
        url: url.to_owned(),
        kind: broker.kind,
        broker_env: broker.relay_env(),
    }
}

pub struct RelayProc {
    pub child: Child,
    pub log: PathBuf,
}

impl RelayProc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{needle:?} not in {} after {timeout:?}:\n{}",
                self.log.display(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the relay reports itself active (`lockstep_relay_active` on its metrics address,
    /// which it logs as it starts); None before it serves metrics or after it exited.
    pub async fn active(&self) -> Option<bool> {
        let log = self.log();
        let addr = log.split("relay starting addr=").nth(1)?.split_whitespace().next()?.to_owned();
        let get = tokio::time::timeout(Duration::from_secs(2), super::http_get_checked(&addr, "/metrics"));
        let body = get.await.ok()??;
        let line = body.lines().find(|l| l.starts_with("lockstep_relay_active "))?;
        Some(line.ends_with(" 1"))
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "the relay did not exit:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Outbox {
    /// What the destination holds from its first message, until `want` distinct ids or `timeout`.
    pub async fn consume(&self, want: usize, timeout: Duration) -> Vec<super::broker::Received> {
        super::broker::consume(self.kind, &self.bootstrap, &self.topic, want, timeout).await
    }

    pub fn relay(&self, log: &str, database_url: &str) -> RelayProc {
        self.relay_with(log, database_url, &[])
    }

    /// A relay with `extra` arguments, its log in the test environment's folder.
    pub fn relay_with(&self, log: &str, database_url: &str, extra: &[&str]) -> RelayProc {
        // One test body runs once per broker, at the same time: a log each.
        let log = match self.kind {
            super::broker::Kind::Kafka => log.to_owned(),
            super::broker::Kind::Nats => format!("nats-{log}"),
            super::broker::Kind::Rabbitmq => format!("rabbitmq-{log}"),
        };
        let log = PathBuf::from(super::env("LOCKSTEP_TESTENV_DIR")).join(log);
        let mut cmd = Command::new(super::lockstep_bin());
        // An empty value in the broker's environment removes the variable the test's own has.
        for (k, v) in &self.broker_env {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let child = cmd
            .args(["relay", "--schema", &self.schema, "--table", "outbox", "--topic", &self.topic])
            .args(["--metrics-addr", "127.0.0.1:0", "--poll-interval", "200ms"])
            .args(std::env::var("RELAY_TEST_ARGS").unwrap_or_default().split_whitespace())
            .args(extra)
            .env("DATABASE_URL", database_url)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start lockstep relay");
        RelayProc { child, log }
    }

    /// `n` events over `keys` keys: event g has key `k-(g % keys)`, payload
    /// `{"key": g % keys, "n": g / keys}` (so a key's `n` grows with its events) and the header
    /// `source: test`.
    pub async fn insert(&self, from: i64, n: i64, keys: i64) {
        self.table.insert(from, n, keys).await
    }

    pub async fn lock_holder(&self) -> Option<i32> {
        let t = lockstep::core::sql::QualifiedName {
            schema: lockstep::core::sql::Ident::parse(&self.schema).unwrap(),
            table: lockstep::core::sql::Ident::parse("outbox").unwrap(),
        };
        // A bigint advisory key is stored as classid (high 32 bits) and objid (low 32 bits).
        let key = lockstep::tables::locks::lock_key(&t) as u64;
        sqlx::query_scalar(
            "select pid from pg_locks where locktype = 'advisory' and granted and objsubid = 1
             and database = (select oid from pg_database where datname = current_database())
             and classid::bigint = $1 and objid::bigint = $2",
        )
        .bind((key >> 32) as i64)
        .bind((key & 0xffff_ffff) as i64)
        .fetch_optional(&self.pool)
        .await
        .unwrap()
    }

    pub async fn backend_alive(&self, pid: i32) -> bool {
        sqlx::query_scalar("select exists (select 1 from pg_stat_activity where pid = $1)")
            .bind(pid)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

/// The test PostgreSQL's address, for a proxy.
pub fn upstream() -> SocketAddr {
    let opts: sqlx::postgres::PgConnectOptions = super::env("DATABASE_URL").parse().unwrap();
    format!("{}:{}", opts.get_host(), opts.get_port()).parse().unwrap()
}

/// One message of an outbox event, as `insert` wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: String,
    pub key: String,
    pub n: i64,
}

/// A consumer of `topic` from its first message, on `partitions` (every partition when None):
/// assigned, so there is no group coordination to wait for, and nothing is committed.
pub fn from_start(bootstrap: &str, topic: &str, partitions: Option<&[i32]>) -> BaseConsumer {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", super::unique("check"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let all: Vec<i32> = match partitions {
        Some(p) => p.to_vec(),
        None => {
            let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
            md.topics()[0].partitions().iter().map(|p| p.id()).collect()
        }
    };
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in all {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning).unwrap();
    }
    c.assign(&tpl).unwrap();
    c
}

/// Every message on partition 0 of `topic`, in order, up to the high watermark.
pub fn consume_all(bootstrap: &str, topic: &str, timeout: Duration) -> Vec<Event> {
    let c = from_start(bootstrap, topic, Some(&[0]));
    let (_, high) = c.fetch_watermarks(topic, 0, Duration::from_secs(30)).expect("watermarks");
    let mut events = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut next = 0;
    while next < high {
        assert!(Instant::now() < deadline, "read {next} of {high} messages within {timeout:?}");
        let Some(m) = c.poll(Duration::from_millis(200)) else { continue };
        let m = m.expect("consume");
        next = m.offset() + 1;
        let headers = m.headers().expect("headers");
        let id = headers.iter().find(|h| h.key == "id").and_then(|h| h.value).expect("id header");
        let payload: serde_json::Value = serde_json::from_slice(m.payload().expect("payload")).unwrap();
        events.push(Event {
            id: String::from_utf8_lossy(id).into_owned(),
            key: String::from_utf8_lossy(m.key().expect("key")).into_owned(),
            n: payload["n"].as_i64().expect("n in the payload"),
        });
    }
    events
}

/// Keys that went backwards: once a message carrying a key's newest state (its greatest `n`)
/// is on the topic, every later message of that key must carry that state too (a duplicate).
/// A replay after a takeover repeats older states only before the newest one was ever sent; an
/// older state after the newest is what a last-write-wins consumer, or compaction, keeps wrongly.
/// Each such key with the offending sequence of `n`.
pub fn backwards(events: &[Event]) -> Vec<(String, Vec<i64>)> {
    let mut newest: HashMap<&str, i64> = HashMap::new();
    for e in events {
        let n = newest.entry(&e.key).or_insert(e.n);
        *n = (*n).max(e.n);
    }
    let mut seen_newest: HashMap<&str, bool> = HashMap::new();
    let mut bad: HashMap<&str, Vec<i64>> = HashMap::new();
    for e in events {
        let top = newest[e.key.as_str()];
        let after = seen_newest.entry(&e.key).or_default();
        if *after && e.n < top {
            bad.entry(&e.key).or_default().push(e.n);
        }
        *after |= e.n == top;
    }
    let mut bad: Vec<_> = bad.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    bad.sort();
    bad
}

/// A relay run in this process (`run_with_metrics`): its task, its metrics, what stops it.
pub struct InProcess {
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub metrics: std::sync::Arc<lockstep::relay::RelayMetrics>,
    pub stop: tokio_util::sync::CancellationToken,
}

/// Start a relay in this process with `cfg`, and return once it holds the outbox's lock.
pub async fn in_process(cfg: lockstep::config::RelayConfig) -> InProcess {
    let metrics = std::sync::Arc::new(lockstep::relay::RelayMetrics::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(lockstep::relay::run_with_metrics(cfg, stop.clone(), metrics.clone()));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while metrics.active.get() == 0 {
        assert!(std::time::Instant::now() < deadline, "the relay did not take the lock");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    InProcess { task, metrics, stop }
}
