//! The batch pipeline: read a batch, hand it to the producer, and while its delivery reports come
//! in read and send the next ones; then remove what was acknowledged, in one statement, and retry
//! or dead-letter what failed. A failed row holds back the later rows of its key.

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use sqlx::PgConnection;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::{
    failure::Failure,
    fence::Fence,
    gate::KeyGate,
    gather::Gather,
    headers::MessageHeaders,
    metrics::RelayMetrics,
    reports::{unix_now, Reports},
    settings::publisher_settings,
    stages::Stamps,
    store::{OutboxRow, Statements},
    RelayError,
};
use crate::{
    clients::broker::{Ack, Outgoing, Publisher, Settings},
    config::RelayConfig,
    tables::schema::OutboxTables,
};

// A child module in a file beside this one: it reads the relay's and the batch's private fields.
#[path = "settle.rs"]
mod settle;

/// A batch handed to the producer whose delivery reports are not all in yet.
pub(super) struct InFlight {
    /// The gate's number for the batch.
    n: u64,
    /// The publisher's number for it (`Publisher::completed`).
    sent_as: u64,
    rows: Vec<OutboxRow>,
    /// Each row's message key.
    keys: Vec<String>,
    /// Row index of each message the producer accepted, in the order of its reports.
    sent: Vec<usize>,
    /// Per row: how far its `created_at` stamp was from the publish time (ms), None when it was
    /// stamped with the publish time (or not sent).
    ages: Vec<Option<i64>>,
    reports: Reports,
    failures: Vec<Failure>,
    started: Instant,
    /// When its steps happened, for benchmarks only.
    stamps: Option<Stamps>,
}

#[cfg(test)]
impl Relay {
    /// The keys the next read would leave out.
    pub(super) fn excluded_keys(&mut self) -> Vec<String> {
        self.gate.excluded_keys(Instant::now())
    }
}

#[cfg(test)]
impl InFlight {
    /// Every delivery report of the batch, in send order.
    pub(super) async fn reports(self) -> Vec<super::reports::Report> {
        self.reports.all().await.into_iter().map(|(r, _)| r).collect()
    }
}

/// Wait for the oldest batch's reports, or until `until` (true then).
async fn oldest_delivered(oldest: &mut InFlight, until: Option<Instant>) -> bool {
    let until = async {
        match until {
            Some(t) => tokio::time::sleep_until(t.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = oldest.reports.delivered() => false,
        _ = until => true,
    }
}

pub struct Relay {
    cfg: RelayConfig,
    metrics: Arc<RelayMetrics>,
    publisher: Publisher,
    /// How to build it again.
    settings: Settings,
    /// The publisher in use, for whoever checks the broker through it (readiness).
    current: watch::Sender<Publisher>,
    sql: Statements,
    /// Rows and keys the next read leaves out: in flight, or waiting for a retry.
    gate: KeyGate<Instant>,
    /// Told when new rows were committed (NOTIFY): an idle relay starts a drain.
    new_rows: Arc<Notify>,
    /// Whether the session should LISTEN (see UNLISTEN_AFTER).
    listening: watch::Sender<bool>,
    /// Broker or network failures in a row (reset by an acknowledgement).
    transport_failures: u32,
    /// A message left the publisher's state unknown (Kafka: it timed out in the idempotent
    /// producer, some brokers never accept that producer again): start over with a fresh one.
    stale_producer: bool,
    /// Rows whose `created_at` is further than this (ms) from the publish time are stamped with
    /// the publish time: `core::stamp::MAX_STAMP_AGE_MS`, tightened by the broker's refusals.
    stamp_bound: i64,
    /// No read starts before this (see `gather`).
    next_read: Instant,
    /// The flow's rate, for the wait after a read that caught up.
    gather: Gather,
    /// When the last read started.
    last_read: Option<Instant>,
    headers: MessageHeaders,
    /// With buckets: the ones this relay's lock session owns (set per session).
    pub(super) buckets: Option<super::ownership::Ownership>,
    /// When the last read started and ended (unix seconds), kept for benchmarks' stages.
    read_stamps: Option<(f64, f64)>,
}

/// A drain running this long is under a steady flow: the session stops listening until it ends.
/// Every NOTIFY wakes the listening server process and the relay once per writer transaction,
/// work that a drain reading every `gather` does not need.
const UNLISTEN_AFTER: Duration = Duration::from_millis(50);

impl Relay {
    pub fn new(cfg: RelayConfig, metrics: Arc<RelayMetrics>, tables: &OutboxTables) -> Result<Self, RelayError> {
        let settings = publisher_settings(&cfg);
        let publisher = Publisher::create(&settings).map_err(RelayError::Producer)?;
        Ok(Relay {
            current: watch::Sender::new(publisher.clone()),
            publisher,
            settings,
            sql: Statements::new(&cfg.resolved, tables),
            headers: MessageHeaders::new(&cfg.resolved, tables.payload),
            cfg,
            metrics,
            gate: KeyGate::default(),
            new_rows: Arc::new(Notify::new()),
            listening: watch::Sender::new(true),
            transport_failures: 0,
            stale_producer: false,
            stamp_bound: crate::core::stamp::MAX_STAMP_AGE_MS,
            next_read: Instant::now(),
            gather: Gather::default(),
            last_read: None,
            buckets: None,
            read_stamps: None,
        })
    }

    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// The publisher in use, replaced when it is rebuilt.
    pub(super) fn current_producer(&self) -> watch::Receiver<Publisher> {
        self.current.subscribe()
    }

    /// What to tell when new rows were committed: an idle relay starts a drain.
    pub fn new_rows(&self) -> Arc<Notify> {
        self.new_rows.clone()
    }

    /// Whether the session should LISTEN for new rows now: false while a drain has been running
    /// for UNLISTEN_AFTER (it polls), true again when it ends.
    /// Starts as true: a new session listens.
    pub(super) fn listening(&self) -> watch::Receiver<bool> {
        self.set_listening(true);
        self.listening.subscribe()
    }

    fn set_listening(&self, on: bool) {
        self.listening.send_if_modified(|v| std::mem::replace(v, on) != on);
    }

    /// The statements a batch runs (select, then delete or mark), for the SQL-only baseline.
    /// The select takes: $1 limit, $2 the keys to leave out (text[]).
    pub fn statements(&self) -> (&str, &str) {
        (&self.sql.select, &self.sql.done)
    }

    /// Publish until the outbox has nothing more to read and every batch sent is acknowledged and
    /// removed. Up to `max_batches_in_flight` batches are with the producer at once, so reading
    /// and deleting overlap with publishing. Stops reading (and finishes what is in flight) when
    /// `stop` fires. A fatal producer error completes what is in flight from its reports (the
    /// purged rows stay in the outbox and are read again) and rebuilds the producer. On the lock
    /// session (`lock`), the session is checked when due, also while waiting for reports, and
    /// nothing is read, handed to the producer or removed past the fence's deadline.
    /// Returns how many rows it read.
    pub(super) async fn drain_in(
        &mut self,
        conn: &mut PgConnection,
        stop: &CancellationToken,
        lock: &mut Fence,
    ) -> Result<usize, RelayError> {
        let depth = self.cfg.max_batches_in_flight.max(1);
        // Batches of a drain that ended in an error are gone (their rows are still in the
        // outbox): their keys must not stay out of reads.
        self.gate.abandon_in_flight();
        self.publisher.forget();
        let mut in_flight: VecDeque<InFlight> = VecDeque::with_capacity(depth);
        // There may be rows to read: at the start, after a full batch, a NOTIFY or a completed
        // batch (rows may have come since, keys may be free again). Cleared by a read that
        // caught up; a read waits for `next_read` (see `gather`).
        let mut want = true;
        let began = Instant::now();
        let mut read = 0;
        loop {
            lock.keep(conn).await?;
            want |= self.tick_buckets(conn, lock, in_flight.is_empty()).await?;
            // Rebuilt after completing every batch in flight: their keys may be read again.
            want |= lock.bound(self.rebuild_if_needed(conn, &mut in_flight)).await?;
            while want && !self.giving_back() && in_flight.len() < depth && !stop.is_cancelled() && Instant::now() >= self.next_read {
                let started = Instant::now();
                let (rows, more) = lock.bound(self.fetch(conn)).await?;
                read += rows.len();
                want = more;
                self.gather.read(rows.len(), self.last_read.map(|t| started - t));
                self.last_read = Some(started);
                self.next_read = if want {
                    started
                } else {
                    started + self.gather.wait(self.cfg.resolved.max_gather)
                };
                if !rows.is_empty() {
                    in_flight.push_back(lock.bound(async { Ok(self.send(rows, started).await) }).await?);
                }
            }
            let Some(mut batch) = in_flight.pop_front() else {
                if !want || stop.is_cancelled() {
                    self.set_listening(true);
                    return Ok(read);
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep_until(lock.until(Some(self.next_read)).into()) => {}
                }
                continue;
            };
            // Room for another batch: wait for the oldest batch's reports, or read again once
            // `gather` has passed. While batches are in flight the relay polls at that pace rather
            // than waiting for NOTIFYs, which it stops listening for under a steady flow.
            let room = in_flight.len() + 1 < depth && !stop.is_cancelled();
            if oldest_delivered(&mut batch, Some(lock.until(room.then_some(self.next_read)))).await {
                in_flight.push_front(batch);
                want |= room && Instant::now() >= self.next_read;
                continue;
            }
            if began.elapsed() >= UNLISTEN_AFTER {
                self.set_listening(false);
            }
            lock.bound(self.complete(conn, batch)).await?;
            want = true;
        }
    }

    /// With buckets: give back what is leaving once `settled` (nothing in flight) and plan the
    /// share when due (`ownership`). True when the buckets to read changed.
    pub(super) async fn tick_buckets(&mut self, conn: &mut PgConnection, lock: &Fence, settled: bool) -> Result<bool, RelayError> {
        let Some(o) = self.buckets.as_mut() else {
            return Ok(false);
        };
        lock.bound(async { Ok(o.tick(conn, settled).await?) }).await
    }

    fn giving_back(&self) -> bool {
        self.buckets.as_ref().is_some_and(|o| o.giving_back())
    }

    /// After a fatal error (the broker rejected a message: gapless; or the idempotent producer
    /// can no longer guarantee order or no duplicates) every send fails, and after a local message
    /// timeout its state is unknown: replace the producer. First the batches in flight complete
    /// from their reports, the old producer's queue purged so that they all come: the rejected
    /// row's attempt is counted (or it is dead-lettered) and its key waits; the rows failed only
    /// because the producer went fatal or was purged are read again, in order, behind their
    /// keys' earlier rows. True when it did.
    async fn rebuild_if_needed(&mut self, conn: &mut PgConnection, in_flight: &mut VecDeque<InFlight>) -> Result<bool, RelayError> {
        let fatal = self.publisher.fatal();
        if fatal.is_none() && !self.stale_producer {
            return Ok(false);
        }
        match fatal {
            Some(reason) => tracing::error!(%reason, "fatal producer error: rebuilding the producer"),
            None => tracing::warn!("a message timed out: rebuilding the producer"),
        }
        self.publisher.purge().await;
        while let Some(batch) = in_flight.pop_front() {
            self.complete(conn, batch).await?;
        }
        self.replace_producer().await?;
        self.stale_producer = false;
        self.metrics.producer_rebuilds.inc();
        Ok(true)
    }

    /// A new producer; the old one's queue is purged, whoever still holds it: a message left
    /// there could reach the broker after the new producer resent its row and a later row of its
    /// key, putting an old state last.
    pub(super) async fn replace_producer(&mut self) -> Result<(), RelayError> {
        let new = Publisher::create(&self.settings).map_err(RelayError::Producer)?;
        let old = std::mem::replace(&mut self.publisher, new);
        let stale = self.current.send_replace(self.publisher.clone());
        old.purge().await;
        // The last drop of a Kafka producer waits for librdkafka's threads (a flush and a join):
        // off the runtime's workers, and done before anything is resent.
        let _ = tokio::task::spawn_blocking(move || drop((old, stale))).await;
        Ok(())
    }

    /// Rows to publish next, in seq order: visible to every snapshot, not in flight, of no key
    /// waiting for a retry; and whether there may be more to read at once.
    async fn fetch(&mut self, conn: &mut PgConnection) -> Result<(Vec<OutboxRow>, bool), RelayError> {
        let keys = self.gate.excluded_keys(Instant::now());
        self.metrics.blocked_keys.set(self.gate.blocked() as i64);
        let seqs = self.gate.excluded_seqs();
        let at = unix_now();
        let limit = self.cfg.resolved.batch_size;
        let (rows, more) = match self.buckets.as_mut() {
            Some(o) => {
                let each = o.each(i64::from(limit));
                let (rows, of) = self.sql.fetch_buckets(conn, limit, &keys, &seqs, &o.readable(), each).await?;
                let more = o.read(&of, i64::from(limit));
                (rows, more)
            }
            None => {
                let rows = self.sql.fetch(conn, limit, &keys, &seqs).await?;
                let more = rows.len() >= limit as usize;
                (rows, more)
            }
        };
        self.metrics.observe_commit_to_read(rows.iter().map(|r| (at - r.created).max(0.0)));
        self.read_stamps = self.metrics.keeps_samples().then(|| (at, unix_now()));
        Ok((rows, more))
    }

    /// Hand a batch to the producer. A row whose send fails holds back the later rows of its key,
    /// in this batch and in reads before it completes.
    pub(super) async fn send(&mut self, rows: Vec<OutboxRow>, started: Instant) -> InFlight {
        let key_col = self.cfg.resolved.key;
        let keys: Vec<String> = rows.iter().map(|r| r.column(key_col)).collect();
        let n = self.gate.dispatch(rows.iter().map(|r| r.seq));
        let mut failed_keys: HashSet<&str> = HashSet::new();
        let mut failures = Vec::new();
        let mut sent = Vec::with_capacity(rows.len());
        let mut ages = vec![None; rows.len()];
        let mut futures = Vec::with_capacity(rows.len());
        let mut stamps = self.read_stamps.take().map(|read| Stamps {
            read,
            handed: vec![f64::NAN; rows.len()],
        });
        // A clone (a reference count) so that the batch's sender does not borrow the relay.
        let publisher = self.publisher.clone();
        let mut batch = publisher.batch();
        let sent_as = batch.id();
        for (i, (row, key)) in rows.iter().zip(&keys).enumerate() {
            if failed_keys.contains(key.as_str()) {
                continue;
            }
            match self.send_row(&mut batch, i, row, key).await {
                Ok((f, age)) => {
                    if let Some(s) = stamps.as_mut() {
                        s.handed[i] = unix_now();
                    }
                    sent.push(i);
                    ages[i] = age;
                    futures.push(f);
                }
                Err(failure) => {
                    // The producer never had this row, so it fails none of the key's later rows:
                    // later reads must leave the key out from now on, not once the batch completes.
                    self.gate.hold(n, key);
                    failed_keys.insert(key);
                    failures.push(failure);
                }
            }
        }
        InFlight {
            n,
            sent_as,
            rows,
            keys,
            sent,
            ages,
            reports: Reports::collect(futures),
            failures,
            started,
            stamps,
        }
    }

    /// Route one row and hand it to the publisher, waiting while its queue is full. With the
    /// distance of its `created_at` stamp from now, when it has one.
    async fn send_row(
        &self,
        batch: &mut crate::clients::broker::Batch<'_>,
        i: usize,
        row: &OutboxRow,
        key: &str,
    ) -> Result<(Ack, Option<i64>), Failure> {
        let topic = self
            .cfg
            .resolved
            .topic_template
            .render(|c| Some(row.column(c)))
            .map_err(|e| Failure::routing(i, e))?;
        let now = crate::core::stamp::now_ms();
        let (timestamp, created_ms) = crate::core::stamp::stamp(row.created, now, self.stamp_bound);
        let age = created_ms.is_none().then_some(now - timestamp);
        let (headers, invalid_traceparent) = self.headers.of(row, created_ms);
        if invalid_traceparent {
            self.metrics.count_invalid_traceparent(row.id);
        }
        let message = Outgoing {
            destination: &topic,
            key,
            id: row.id,
            payload: row.payload.as_deref(),
            headers: &headers,
            timestamp_ms: timestamp,
        };
        match batch.send(&message).await {
            Ok(ack) => Ok((ack, age)),
            Err(refusal) => {
                self.metrics.count_failure(&refusal.reason);
                Err(Failure::refused(i, refusal))
            }
        }
    }
}
