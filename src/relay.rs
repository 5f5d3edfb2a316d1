//! The outbox relay: publishes outbox rows to Kafka at least once, in per-key order, and removes
//! them once the broker acknowledged them.
//!
//! - One active relay per outbox: the one holding a PostgreSQL session advisory lock. Batches run
//!   on that same connection, so a relay that lost its session (and so its lock) cannot go on.
//! - Woken by NOTIFY (the outbox trigger) or the poll interval; reads rows in `seq` order, only
//!   those below the snapshot's xmin (a transaction still open cannot later commit a smaller seq
//!   behind rows already published).
//! - Produces a batch through an idempotent producer (acks=all) with many messages in flight,
//!   waits for every delivery report, then deletes (or marks) the acknowledged rows in one
//!   statement. A crash between acknowledgement and delete republishes those rows: duplicates,
//!   never loss; consumers deduplicate with an inbox.
//! - A failed row is retried with exponential backoff, and later rows of its key wait behind it;
//!   after maxAttempts, or at once for errors no retry can fix (a message over the size limit, a
//!   topic name the routing cannot build), it moves to the dead-letter table with its error.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    io::IsTerminal,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures::FutureExt;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use rdkafka::{
    config::ClientConfig,
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer},
};
use sha2::{Digest, Sha256};
use sqlx::{postgres::PgListener, Connection, PgConnection, Row};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{describe_database_url, RelayConfig},
    crd::Cleanup,
    metrics::Health,
    routing::OutboxColumn,
    schema::{self, TableKind},
    sql::QualifiedName,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

pub struct RelayMetrics {
    pub published: Counter,
    pub failures: Family<ReasonLabel, Counter>,
    pub quarantined: Counter,
    pub batch_seconds: Histogram,
    pub commit_to_ack_seconds: Histogram,
    pub pending: Gauge,
    pub oldest_pending_seconds: Gauge<f64, AtomicU64>,
    pub oldest_transaction_seconds: Gauge<f64, AtomicU64>,
    pub active: Gauge,
    latency_samples: Option<Mutex<Vec<f64>>>,
    registry: Registry,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("lockstep_relay");
        let m = RelayMetrics {
            published: Counter::default(),
            failures: Family::default(),
            quarantined: Counter::default(),
            batch_seconds: Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0]),
            commit_to_ack_seconds: Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0]),
            pending: Gauge::default(),
            oldest_pending_seconds: Gauge::default(),
            oldest_transaction_seconds: Gauge::default(),
            active: Gauge::default(),
            latency_samples: None,
            registry: Registry::default(),
        };
        registry.register(
            "published",
            "Events acknowledged by the broker and removed from the outbox",
            m.published.clone(),
        );
        registry.register("failures", "Failed publishes, by reason", m.failures.clone());
        registry.register("quarantined", "Rows moved to the dead-letter table", m.quarantined.clone());
        registry.register(
            "batch_duration_seconds",
            "Read, publish, acknowledge and delete one batch",
            m.batch_seconds.clone(),
        );
        registry.register(
            "commit_to_ack_seconds",
            "From the row's created_at to the broker's acknowledgement",
            m.commit_to_ack_seconds.clone(),
        );
        registry.register("pending_events", "Unpublished rows (estimate from seq)", m.pending.clone());
        registry.register(
            "oldest_pending_age_seconds",
            "Age of the oldest unpublished row",
            m.oldest_pending_seconds.clone(),
        );
        registry.register(
            "oldest_transaction_age_seconds",
            "Age of the oldest open write transaction; rows committed after it started wait for it to end",
            m.oldest_transaction_seconds.clone(),
        );
        registry.register("active", "1 while this relay holds the outbox lock", m.active.clone());
        RelayMetrics { registry, ..m }
    }
}

impl RelayMetrics {
    /// Metrics that also keep every commit-to-acknowledgement latency, for benchmarks.
    pub fn with_latency_samples() -> Self {
        RelayMetrics {
            latency_samples: Some(Mutex::new(Vec::new())),
            ..Self::default()
        }
    }

    fn observe_commit_to_ack(&self, seconds: &[f64]) {
        for s in seconds {
            self.commit_to_ack_seconds.observe(*s);
        }
        if let Some(samples) = &self.latency_samples {
            samples.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(seconds);
        }
    }

    /// The latencies kept so far (empty unless built by `with_latency_samples`), leaving none.
    pub fn take_latency_samples(&self) -> Vec<f64> {
        self.latency_samples
            .as_ref()
            .map(|s| std::mem::take(&mut *s.lock().unwrap_or_else(|e| e.into_inner())))
            .unwrap_or_default()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encoding into a String");
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("schema: {0}")]
    Schema(#[from] schema::SchemaError),
    #[error("Kafka producer: {0}")]
    Producer(String),
}

/// The advisory lock key of an outbox table.
pub fn lock_key(t: &QualifiedName) -> i64 {
    let d = Sha256::digest(format!("lockstep-relay:{}.{}", t.schema.as_str(), t.table.as_str()).as_bytes());
    i64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// Backoff before retry `attempts` (1-based): 1s, 2s, 4s ... capped at 5 min.
pub fn backoff(attempts: i32) -> Duration {
    let exp = attempts.clamp(1, 20) as u32 - 1;
    Duration::from_secs(1u64.checked_shl(exp).unwrap_or(u64::MAX).min(300))
}

/// Errors no retry can fix: the row goes to the dead-letter table at once.
pub fn is_permanent(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidRecord
        )
    )
}

fn error_reason(e: &KafkaError) -> String {
    e.rdkafka_error_code().map(|c| format!("{c:?}")).unwrap_or_else(|| "Other".into())
}

pub fn producer_config(cfg: &RelayConfig) -> ClientConfig {
    let p = &cfg.spec.kafka.producer;
    let mut c = ClientConfig::new();
    c.set("message.timeout.ms", "120000");
    for (k, v) in &cfg.kafka_config {
        c.set(k, v.expose());
    }
    // Forced last: validation already refused weaker values, this makes sure of it.
    c.set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", p.linger_ms.to_string())
        .set("compression.type", p.compression.as_str());
    c
}

struct Row0 {
    id: uuid::Uuid,
    seq: i64,
    aggregatetype: String,
    aggregateid: String,
    type_: String,
    payload: Option<Vec<u8>>,
    headers: Option<serde_json::Value>,
    attempts: i32,
    /// created_at as seconds since the epoch.
    created: f64,
}

impl Row0 {
    fn column(&self, c: OutboxColumn) -> String {
        match c {
            OutboxColumn::Id => self.id.to_string(),
            OutboxColumn::Aggregatetype => self.aggregatetype.clone(),
            OutboxColumn::Aggregateid => self.aggregateid.clone(),
            OutboxColumn::Type => self.type_.clone(),
        }
    }
}

/// A batch handed to the producer whose delivery reports are not all in yet.
struct InFlight {
    rows: Vec<Row0>,
    /// Row index and delivery report of each message the producer accepted.
    sent: Vec<(usize, DeliveryFuture)>,
    /// Row index, error, and whether no retry can fix it.
    failures: Vec<(usize, String, bool)>,
    /// The batch's seq range: rows in flight are never read again.
    seqs: (i64, i64),
    started: Instant,
}

/// The seq range the next read must skip: from the lowest to the highest seq in flight. Rows
/// inside it that are not in flight (a blocked key, a row not yet visible) wait until it moves on.
fn excluded_range(in_flight: impl IntoIterator<Item = (i64, i64)>) -> Option<(i64, i64)> {
    in_flight.into_iter().reduce(|(lo, hi), (l, h)| (lo.min(l), hi.max(h)))
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub struct Relay {
    cfg: RelayConfig,
    metrics: Arc<RelayMetrics>,
    producer: FutureProducer,
    select_sql: String,
    done_sql: String,
    fail_sql: String,
    quarantine_sql: String,
    /// Keys whose oldest row waits for a retry, until when. Later rows of the key wait too.
    blocked: HashMap<String, Instant>,
}

impl Relay {
    pub fn new(cfg: RelayConfig, metrics: Arc<RelayMetrics>, payload_is_bytea: bool) -> Result<Self, RelayError> {
        let producer: FutureProducer = producer_config(&cfg).create().map_err(|e| RelayError::Producer(e.to_string()))?;
        let t = &cfg.resolved.table;
        let dl = &cfg.resolved.dead_letter_table;
        let key = cfg.resolved.key.name();
        let payload = if payload_is_bytea {
            "payload"
        } else {
            "convert_to(payload::text, 'UTF8')"
        };
        let unpublished = if cfg.spec.relay.cleanup == Cleanup::MarkPublished {
            "and published_at is null"
        } else {
            ""
        };
        // $3/$4: the seq range in flight (empty when $3 > $4).
        let select_sql = format!(
            "select id, seq, aggregatetype, aggregateid, type, {payload} as payload, headers::jsonb as headers, attempts,
                    extract(epoch from created_at)::float8 as created from {t}
             where txid < pg_snapshot_xmin(pg_current_snapshot()) {unpublished} and not ({key}::text = any($2))
               and (seq < $3 or seq > $4)
             order by seq limit $1"
        );
        let done_sql = match cfg.spec.relay.cleanup {
            Cleanup::Delete => format!("delete from {t} where id = any($1)"),
            Cleanup::MarkPublished => format!("update {t} set published_at = now() where id = any($1)"),
        };
        let fail_sql = format!("update {t} set attempts = attempts + 1, last_error = $2 where id = $1");
        let quarantine_sql = format!(
            "with moved as (delete from {t} where id = $1
                 returning id, aggregatetype, aggregateid, type, payload, headers, created_at, seq, attempts)
             insert into {dl} (id, aggregatetype, aggregateid, type, payload, headers, created_at, seq, attempts, last_error)
             select id, aggregatetype, aggregateid, type, payload, headers, created_at, seq, attempts + 1, $2 from moved
             on conflict (id) do nothing"
        );
        Ok(Relay {
            cfg,
            metrics,
            producer,
            select_sql,
            done_sql,
            fail_sql,
            quarantine_sql,
            blocked: HashMap::new(),
        })
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// The statements a batch runs (select, then delete or mark), for the SQL-only baseline.
    /// The select takes: $1 limit, $2 blocked keys (text[]), $3 and $4 the seq range to skip.
    pub fn statements(&self) -> (&str, &str) {
        (&self.select_sql, &self.done_sql)
    }

    /// Publish until the outbox has nothing more to read and every batch sent is acknowledged and
    /// removed. Up to `max_batches_in_flight` batches are with the producer at once, so reading
    /// and deleting overlap with publishing. Stops reading (and finishes what is in flight) when
    /// `stop` fires.
    pub async fn drain(&mut self, conn: &mut PgConnection, stop: &CancellationToken) -> Result<(), RelayError> {
        let depth = self.cfg.max_batches_in_flight.max(1);
        let mut in_flight: VecDeque<InFlight> = VecDeque::with_capacity(depth);
        // Set when a read finds nothing; cleared when a batch completes (rows may have come since).
        let mut empty = false;
        loop {
            while !empty && in_flight.len() < depth && !stop.is_cancelled() {
                let started = Instant::now();
                let range = excluded_range(in_flight.iter().map(|b| b.seqs));
                let rows = self.fetch(conn, range).await?;
                if rows.is_empty() {
                    empty = true;
                } else {
                    in_flight.push_back(self.send(rows, started).await);
                }
            }
            let Some(batch) = in_flight.pop_front() else {
                return Ok(());
            };
            self.complete(conn, batch).await?;
            empty = false;
        }
    }

    /// Rows to publish next, in seq order: visible to every snapshot, not of a blocked key, not in flight.
    async fn fetch(&mut self, conn: &mut PgConnection, skip: Option<(i64, i64)>) -> Result<Vec<Row0>, RelayError> {
        let now = Instant::now();
        self.blocked.retain(|_, until| *until > now);
        let blocked: Vec<String> = self.blocked.keys().cloned().collect();
        let (lo, hi) = skip.unwrap_or((i64::MAX, i64::MIN));
        let rows = sqlx::query(&self.select_sql)
            .bind(i64::from(self.cfg.spec.relay.batch_size))
            .bind(&blocked)
            .bind(lo)
            .bind(hi)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|r| Row0 {
                id: r.get("id"),
                seq: r.get("seq"),
                aggregatetype: r.get("aggregatetype"),
                aggregateid: r.get("aggregateid"),
                type_: r.get("type"),
                payload: r.get("payload"),
                headers: r.get("headers"),
                attempts: r.get("attempts"),
                created: r.get("created"),
            })
            .collect();
        Ok(rows)
    }

    /// Hand a batch to the producer. A row whose send fails holds back the later rows of its key.
    async fn send(&mut self, rows: Vec<Row0>, started: Instant) -> InFlight {
        let key_col = self.cfg.resolved.key;
        let template = &self.cfg.resolved.topic_template;
        let seqs = (rows[0].seq, rows[rows.len() - 1].seq);
        let mut failed_keys: HashSet<String> = HashSet::new();
        let mut failures = Vec::new();
        let mut sent = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let key = row.column(key_col);
            if failed_keys.contains(&key) {
                continue;
            }
            let topic = match template.render(|c| Some(row.column(c))) {
                Ok(t) => t,
                Err(e) => {
                    failed_keys.insert(key);
                    failures.push((i, format!("routing: {e}"), true));
                    continue;
                }
            };
            let id = row.id.to_string();
            let mut headers = OwnedHeaders::new_with_capacity(2 + row.headers.as_ref().and_then(|h| h.as_object()).map_or(0, |h| h.len()))
                .insert(Header {
                    key: "id",
                    value: Some(id.as_bytes()),
                })
                .insert(Header {
                    key: "type",
                    value: Some(row.type_.as_bytes()),
                });
            if let Some(serde_json::Value::Object(h)) = &row.headers {
                for (k, v) in h {
                    let text = match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    headers = headers.insert(Header {
                        key: k.as_str(),
                        value: Some(text.as_bytes()),
                    });
                }
            }
            let mut record = FutureRecord::to(&topic).key(key.as_bytes()).headers(headers);
            if let Some(p) = &row.payload {
                record = record.payload(p.as_slice());
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(f) => {
                        sent.push((i, f));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        // The broker is slow or away: wait for the queue to drain.
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        self.metrics.failures.get_or_create(&ReasonLabel { reason: error_reason(&e) }).inc();
                        failed_keys.insert(key.clone());
                        failures.push((i, e.to_string(), is_permanent(&e)));
                        break;
                    }
                }
            }
        }
        InFlight {
            rows,
            sent,
            failures,
            seqs,
            started,
        }
    }

    /// Wait for every delivery report of a batch, remove what was acknowledged in one statement,
    /// record what failed (retry later, or dead-letter).
    async fn complete(&mut self, conn: &mut PgConnection, batch: InFlight) -> Result<(), RelayError> {
        let InFlight {
            rows,
            sent,
            mut failures,
            started,
            ..
        } = batch;
        let mut acked = Vec::with_capacity(sent.len());
        let mut latencies = Vec::with_capacity(sent.len());
        for (i, f) in sent {
            match f.await {
                Ok(Ok(_)) => {
                    latencies.push((unix_now() - rows[i].created).max(0.0));
                    acked.push(rows[i].id)
                }
                Ok(Err((e, _))) => {
                    self.metrics.failures.get_or_create(&ReasonLabel { reason: error_reason(&e) }).inc();
                    failures.push((i, e.to_string(), is_permanent(&e)));
                }
                Err(_) => failures.push((i, "delivery report lost (producer closed)".into(), false)),
            }
        }
        if !acked.is_empty() {
            sqlx::query(&self.done_sql).bind(&acked).execute(&mut *conn).await?;
        }
        self.metrics.observe_commit_to_ack(&latencies);
        self.metrics.published.inc_by(acked.len() as u64);
        let key_col = self.cfg.resolved.key;
        for (i, error, permanent) in failures {
            let row = &rows[i];
            let attempts = row.attempts + 1;
            if permanent || attempts >= self.cfg.spec.relay.max_attempts {
                sqlx::query(&self.quarantine_sql)
                    .bind(row.id)
                    .bind(&error)
                    .execute(&mut *conn)
                    .await?;
                self.metrics.quarantined.inc();
                tracing::warn!(id = %row.id, attempts, %error, "moved to the dead-letter table");
            } else {
                sqlx::query(&self.fail_sql).bind(row.id).bind(&error).execute(&mut *conn).await?;
                self.blocked.insert(row.column(key_col), Instant::now() + backoff(attempts));
                tracing::info!(id = %row.id, attempts, %error, retry_in = ?backoff(attempts), "publish failed; will retry");
            }
        }
        self.metrics.batch_seconds.observe(started.elapsed().as_secs_f64());
        Ok(())
    }
}

/// Pending estimate and oldest pending age, from the seq index.
pub async fn measure(pool: &sqlx::PgPool, t: &QualifiedName, cleanup: Cleanup) -> Result<(i64, f64), sqlx::Error> {
    let filter = if cleanup == Cleanup::MarkPublished {
        "where published_at is null"
    } else {
        ""
    };
    let row = sqlx::query(&format!(
        "select coalesce(max(seq) - min(seq) + 1, 0) as pending,
                coalesce(extract(epoch from now() - (select created_at from {t} {filter} order by seq limit 1))::float8, 0) as oldest
         from {t} {filter}"
    ))
    .fetch_one(pool)
    .await?;
    Ok((row.get("pending"), row.get("oldest")))
}

/// Age of the oldest open transaction that holds a transaction id (anywhere in the cluster): rows
/// committed after it started stay invisible to the relay until it ends. Sessions of other roles
/// count only where this role may see them (pg_read_all_stats).
pub async fn oldest_transaction_age(pool: &sqlx::PgPool) -> Result<f64, sqlx::Error> {
    sqlx::query_scalar(
        "select coalesce(extract(epoch from now() - min(xact_start))::float8, 0) from pg_stat_activity
         where backend_xid is not null and pid <> pg_backend_pid()",
    )
    .fetch_one(pool)
    .await
}

async fn payload_is_bytea(pool: &sqlx::PgPool, t: &QualifiedName) -> Result<bool, sqlx::Error> {
    let udt: Option<String> = sqlx::query_scalar(
        "select udt_name::text from information_schema.columns where table_schema = $1 and table_name = $2 and column_name = 'payload'",
    )
    .bind(t.schema.as_str())
    .bind(t.table.as_str())
    .fetch_optional(pool)
    .await?;
    Ok(udt.as_deref() == Some("bytea"))
}

/// Run the relay until `stop`: migrate (or verify), wait for the lock, publish, repeat.
pub async fn run(cfg: RelayConfig, manage_schema: bool, stop: CancellationToken) -> anyhow::Result<()> {
    run_with_metrics(cfg, manage_schema, stop, Arc::new(RelayMetrics::default())).await
}

/// `run`, recording into the caller's metrics.
pub async fn run_with_metrics(
    cfg: RelayConfig,
    manage_schema: bool,
    stop: CancellationToken,
    metrics: Arc<RelayMetrics>,
) -> anyhow::Result<()> {
    let health = Arc::new(Health::default());
    let m = metrics.clone();
    let addr = crate::metrics::serve(
        cfg.metrics_addr,
        Arc::new(move || m.render()),
        health.clone(),
        stop.clone().cancelled_owned(),
    )
    .await?;
    let t = cfg.resolved.table.clone();
    let where_ = describe_database_url(cfg.database_url.expose());
    tracing::info!(%addr, table = %t, database = %where_, "relay starting");
    let opts: sqlx::postgres::PgConnectOptions = cfg.database_url.expose().parse()?;
    let opts = opts.application_name("lockstep-relay");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(opts.clone());

    // Tables: migrate (or verify), retrying while the database is unreachable.
    let bytea = loop {
        let r = async {
            let mut c = pool.acquire().await?;
            schema::migrate(&mut c, TableKind::Outbox, &t, manage_schema).boxed().await?;
            schema::migrate(&mut c, TableKind::DeadLetter, &cfg.resolved.dead_letter_table, manage_schema)
                .boxed()
                .await?;
            Ok::<_, RelayError>(payload_is_bytea(&pool, &t).await?)
        }
        .await;
        match r {
            Ok(b) => break b,
            Err(RelayError::Schema(e)) if e.is_permanent() => anyhow::bail!("{e}"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot prepare the outbox tables; retrying in 2s");
                tokio::select! { _ = stop.cancelled() => return Ok(()), _ = tokio::time::sleep(Duration::from_secs(2)) => {} }
            }
        }
    };

    let mut relay = Relay::new(cfg.clone(), metrics.clone(), bytea)?;
    let active = Arc::new(AtomicBool::new(false));
    spawn_measurements(
        pool.clone(),
        cfg.clone(),
        metrics.clone(),
        relay.producer().clone(),
        active.clone(),
        health.clone(),
        stop.clone(),
    );

    let key = lock_key(&t);
    let channel = schema::notify_channel(&t);
    let mut failures = 0u32;
    'session: while !stop.is_cancelled() {
        // One connection holds the lock and runs every batch.
        let mut conn = match PgConnection::connect_with(&opts).await {
            Ok(c) => c,
            Err(e) => {
                failures += 1;
                let wait = backoff(failures as i32).min(Duration::from_secs(10));
                tracing::warn!(error = %e, ?wait, "database unreachable");
                tokio::select! { _ = stop.cancelled() => break, _ = tokio::time::sleep(wait) => {} }
                continue;
            }
        };
        let mut announced = false;
        loop {
            match sqlx::query_scalar::<_, bool>("select pg_try_advisory_lock($1)")
                .bind(key)
                .fetch_one(&mut conn)
                .await
            {
                Ok(true) => break,
                Ok(false) => {
                    if !announced {
                        tracing::info!(table = %t, "another relay is active; standing by");
                        announced = true;
                    }
                    tokio::select! { _ = stop.cancelled() => break 'session, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lost the database while waiting for the lock");
                    continue 'session;
                }
            }
        }
        tracing::info!(table = %t, "holding the outbox lock: relaying");
        active.store(true, Ordering::Relaxed);
        metrics.active.set(1);
        failures = 0;
        let mut listener = if cfg.listen {
            let l = async {
                let mut l = PgListener::connect_with(&pool).await?;
                l.listen(&channel).await?;
                Ok::<_, sqlx::Error>(l)
            };
            match l.await {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot LISTEN for new rows; polling every {:?}", cfg.resolved.poll_interval);
                    None
                }
            }
        } else {
            None
        };
        let poll = cfg.resolved.poll_interval;
        let result: Result<(), RelayError> = async {
            loop {
                relay.drain(&mut conn, &stop).await?;
                if stop.is_cancelled() {
                    return Ok(());
                }
                let wake = async {
                    match listener.as_mut() {
                        Some(l) => {
                            let _ = l.recv().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(poll) => {}
                    _ = wake => {}
                }
            }
        }
        .await;
        active.store(false, Ordering::Relaxed);
        metrics.active.set(0);
        match result {
            Ok(()) => {
                let _ = sqlx::query("select pg_advisory_unlock($1)").bind(key).execute(&mut conn).await;
                let _ = conn.close().await;
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "relay session ended; reconnecting");
                failures += 1;
                tokio::select! { _ = stop.cancelled() => break, _ = tokio::time::sleep(backoff(failures as i32).min(Duration::from_secs(5))) => {} }
            }
        }
    }
    let _ = relay.producer().flush(Duration::from_secs(10));
    tracing::info!("relay stopped");
    Ok(())
}

fn spawn_measurements(
    pool: sqlx::PgPool,
    cfg: RelayConfig,
    metrics: Arc<RelayMetrics>,
    producer: FutureProducer,
    active: Arc<AtomicBool>,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let tty = std::io::stderr().is_terminal();
        let mut last = (Instant::now(), metrics.published.get());
        loop {
            if let Ok((pending, oldest)) = measure(&pool, &cfg.resolved.table, cfg.spec.relay.cleanup).await {
                metrics.pending.set(pending);
                metrics.oldest_pending_seconds.set(oldest);
            }
            if let Ok(age) = oldest_transaction_age(&pool).await {
                metrics.oldest_transaction_seconds.set(age);
            }
            let p = producer.clone();
            let reachable = tokio::task::spawn_blocking(move || p.client().fetch_metadata(None, Duration::from_secs(2)).is_ok())
                .await
                .unwrap_or(false);
            health.ready.store(active.load(Ordering::Relaxed) && reachable, Ordering::Relaxed);
            if tty {
                let published = metrics.published.get();
                let rate = (published - last.1) as f64 / last.0.elapsed().as_secs_f64().max(0.001);
                eprintln!(
                    "lockstep relay: {} | published {published} ({rate:.0}/s) | pending ~{} | oldest {:.1}s | oldest transaction {:.1}s | quarantined {} | broker {}",
                    if active.load(Ordering::Relaxed) { "active" } else { "standby" },
                    metrics.pending.get(),
                    metrics.oldest_pending_seconds.get(),
                    metrics.oldest_transaction_seconds.get(),
                    metrics.quarantined.get(),
                    if reachable { "ok" } else { "UNREACHABLE" },
                );
                last = (Instant::now(), published);
            }
            tokio::select! { _ = stop.cancelled() => break, _ = tokio::time::sleep(Duration::from_secs(5)) => {} }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(30), Duration::from_secs(300));
        assert_eq!(backoff(0), Duration::from_secs(1));
    }

    #[test]
    fn excluded_range_covers_every_batch_in_flight() {
        assert_eq!(excluded_range([]), None);
        assert_eq!(excluded_range([(5, 9)]), Some((5, 9)));
        assert_eq!(excluded_range([(10, 20), (3, 4), (21, 40)]), Some((3, 40)));
    }

    #[test]
    fn permanent_errors() {
        assert!(is_permanent(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)));
        assert!(!is_permanent(&KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)));
        assert!(!is_permanent(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)));
    }
}
