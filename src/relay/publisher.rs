//! The batch pipeline: read a batch, hand it to the producer, and while its delivery reports come
//! in read and send the next ones; then remove what was acknowledged, in one statement, and retry
//! or dead-letter what failed. A failed row holds back the later rows of its key.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use rdkafka::{
    config::ClientConfig,
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{DeliveryFuture, FutureProducer, FutureRecord},
};
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;

use super::{
    backoff,
    metrics::RelayMetrics,
    store::{OutboxRow, Statements},
    RelayError,
};
use crate::{config::RelayConfig, schema::PayloadColumn};

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

pub fn producer_config(cfg: &RelayConfig) -> ClientConfig {
    let p = &cfg.resolved.producer;
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

/// A row of a batch that was not published.
#[derive(Debug, PartialEq)]
struct Failure {
    /// Index of the row in its batch.
    row: usize,
    error: String,
    /// No retry can fix it.
    permanent: bool,
}

/// What becomes of a failed row.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// Count the attempt; the row and the later rows of its key wait this long.
    Retry(Duration),
    DeadLetter,
}

impl Failure {
    fn routing(row: usize, e: String) -> Self {
        Failure {
            row,
            error: format!("routing: {e}"),
            permanent: true,
        }
    }

    fn kafka(row: usize, e: &KafkaError) -> Self {
        Failure {
            row,
            error: e.to_string(),
            permanent: is_permanent(e),
        }
    }

    fn report_lost(row: usize) -> Self {
        Failure {
            row,
            error: "delivery report lost (producer closed)".into(),
            permanent: false,
        }
    }

    /// After the row's `attempts`-th failed attempt (this one included).
    fn verdict(&self, attempts: i32, max_attempts: i32) -> Verdict {
        if self.permanent || attempts >= max_attempts {
            Verdict::DeadLetter
        } else {
            Verdict::Retry(backoff(attempts))
        }
    }
}

/// A batch handed to the producer whose delivery reports are not all in yet.
struct InFlight {
    rows: Vec<OutboxRow>,
    /// Row index and delivery report of each message the producer accepted.
    sent: Vec<(usize, DeliveryFuture)>,
    failures: Vec<Failure>,
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

/// The message headers: `id` and `type`, then each entry of the row's `headers` object as text.
fn headers(row: &OutboxRow) -> OwnedHeaders {
    let extra = row.headers.as_ref().and_then(|h| h.as_object());
    let id = row.id.to_string();
    let mut headers = OwnedHeaders::new_with_capacity(2 + extra.map_or(0, |h| h.len()))
        .insert(Header {
            key: "id",
            value: Some(id.as_bytes()),
        })
        .insert(Header {
            key: "type",
            value: Some(row.type_.as_bytes()),
        });
    for (k, v) in extra.into_iter().flatten() {
        let text = match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        headers = headers.insert(Header {
            key: k.as_str(),
            value: Some(text.as_bytes()),
        });
    }
    headers
}

pub struct Relay {
    cfg: RelayConfig,
    metrics: Arc<RelayMetrics>,
    producer: FutureProducer,
    sql: Statements,
    /// Keys whose oldest row waits for a retry, until when. Later rows of the key wait too.
    blocked: HashMap<String, Instant>,
}

impl Relay {
    pub fn new(cfg: RelayConfig, metrics: Arc<RelayMetrics>, payload: PayloadColumn) -> Result<Self, RelayError> {
        let producer: FutureProducer = producer_config(&cfg)
            .create()
            .map_err(|e| RelayError::Producer(crate::kafka::config_error_text(&e, cfg.kafka_config.values().map(|v| v.expose()))))?;
        Ok(Relay {
            sql: Statements::new(&cfg.resolved, payload),
            cfg,
            metrics,
            producer,
            blocked: HashMap::new(),
        })
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// The statements a batch runs (select, then delete or mark), for the SQL-only baseline.
    /// The select takes: $1 limit, $2 blocked keys (text[]), $3 and $4 the seq range to skip.
    pub fn statements(&self) -> (&str, &str) {
        (&self.sql.select, &self.sql.done)
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
    async fn fetch(&mut self, conn: &mut PgConnection, skip: Option<(i64, i64)>) -> Result<Vec<OutboxRow>, RelayError> {
        let now = Instant::now();
        self.blocked.retain(|_, until| *until > now);
        let blocked: Vec<String> = self.blocked.keys().cloned().collect();
        Ok(self.sql.fetch(conn, self.cfg.resolved.batch_size, &blocked, skip).await?)
    }

    /// Hand a batch to the producer. A row whose send fails holds back the later rows of its key.
    async fn send(&mut self, rows: Vec<OutboxRow>, started: Instant) -> InFlight {
        let key_col = self.cfg.resolved.key;
        let seqs = (rows[0].seq, rows[rows.len() - 1].seq);
        let mut failed_keys: HashSet<String> = HashSet::new();
        let mut failures = Vec::new();
        let mut sent = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let key = row.column(key_col);
            if failed_keys.contains(&key) {
                continue;
            }
            match self.send_row(i, row, &key).await {
                Ok(f) => sent.push((i, f)),
                Err(failure) => {
                    failed_keys.insert(key);
                    failures.push(failure);
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

    /// Route one row and hand it to the producer, waiting while its queue is full.
    async fn send_row(&self, i: usize, row: &OutboxRow, key: &str) -> Result<DeliveryFuture, Failure> {
        let topic = self
            .cfg
            .resolved
            .topic_template
            .render(|c| Some(row.column(c)))
            .map_err(|e| Failure::routing(i, e))?;
        let mut record = FutureRecord::to(&topic).key(key.as_bytes()).headers(headers(row));
        if let Some(p) = &row.payload {
            record = record.payload(p.as_slice());
        }
        loop {
            match self.producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    // The broker is slow or away: wait for the queue to drain.
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    self.metrics.count_failure(&e);
                    return Err(Failure::kafka(i, &e));
                }
            }
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
                    self.metrics.count_failure(&e);
                    failures.push(Failure::kafka(i, &e));
                }
                Err(_) => failures.push(Failure::report_lost(i)),
            }
        }
        if !acked.is_empty() {
            self.sql.done(conn, &acked).await?;
        }
        self.metrics.observe_commit_to_ack(&latencies);
        self.metrics.published.inc_by(acked.len() as u64);
        for failure in failures {
            self.settle(conn, &rows[failure.row], failure).await?;
        }
        self.metrics.batch_seconds.observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Record a failed row: count the attempt and block its key for a while, or dead-letter it.
    async fn settle(&mut self, conn: &mut PgConnection, row: &OutboxRow, failure: Failure) -> Result<(), RelayError> {
        let attempts = row.attempts + 1;
        let error = failure.error.as_str();
        match failure.verdict(attempts, self.cfg.resolved.max_attempts) {
            Verdict::DeadLetter => {
                self.sql.quarantine(conn, row.id, error).await?;
                self.metrics.quarantined.inc();
                tracing::warn!(id = %row.id, attempts, %error, "moved to the dead-letter table");
            }
            Verdict::Retry(wait) => {
                self.sql.fail(conn, row.id, error).await?;
                self.blocked.insert(row.column(self.cfg.resolved.key), Instant::now() + wait);
                tracing::info!(id = %row.id, attempts, %error, retry_in = ?wait, "publish failed; will retry");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn failures_are_classified() {
        let too_large = Failure::kafka(3, &KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge));
        assert_eq!((too_large.row, too_large.permanent), (3, true));
        let timed_out = Failure::kafka(0, &KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut));
        assert!(!timed_out.permanent);
        let routing = Failure::routing(1, "column type is null; it routes the message".into());
        assert_eq!(routing.error, "routing: column type is null; it routes the message");
        assert!(routing.permanent);
        assert!(!Failure::report_lost(2).permanent);
    }

    #[test]
    fn a_failure_is_retried_until_max_attempts_unless_permanent() {
        let transient = Failure::report_lost(0);
        assert_eq!(transient.verdict(1, 10), Verdict::Retry(Duration::from_secs(1)));
        assert_eq!(transient.verdict(3, 10), Verdict::Retry(Duration::from_secs(4)));
        assert_eq!(transient.verdict(10, 10), Verdict::DeadLetter);
        assert_eq!(Failure::routing(0, "x".into()).verdict(1, 10), Verdict::DeadLetter);
    }

    fn row(headers: Option<serde_json::Value>) -> OutboxRow {
        OutboxRow {
            id: uuid::Uuid::nil(),
            seq: 1,
            aggregatetype: "order".into(),
            aggregateid: "42".into(),
            type_: "created".into(),
            payload: None,
            headers,
            attempts: 0,
            created: 0.0,
        }
    }

    fn header_pairs(h: &OwnedHeaders) -> Vec<(String, String)> {
        use rdkafka::message::Headers;
        h.iter()
            .map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
            .collect()
    }

    #[test]
    fn headers_carry_id_type_and_the_row_headers_as_text() {
        let h = headers(&row(Some(serde_json::json!({"n": 1, "trace": "abc"}))));
        let pairs = header_pairs(&h);
        let want = [
            ("id", "00000000-0000-0000-0000-000000000000"),
            ("type", "created"),
            ("n", "1"),
            ("trace", "abc"),
        ];
        assert_eq!(pairs, want.map(|(k, v)| (k.to_owned(), v.to_owned())));
        assert_eq!(header_pairs(&headers(&row(None))).len(), 2);
    }
}
