//! Purging expired inbox rows in bounded batches. Each batch is its own short statement, so
//! writers claiming new ids are never blocked for long.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};

use crate::core::sql::QualifiedName;

#[derive(Debug, Clone, PartialEq)]
pub struct PurgeResult {
    pub rows_deleted: i64,
    pub duration: Duration,
    pub batches: u32,
}

/// How long the purge pauses after each batch, as a multiple of the batch's own duration. At 9 the
/// purge is busy a tenth of the time and leaves the database to the writers (see
/// docs/benchmarks.md); it still deletes tens of thousands of rows a second.
pub const PAUSE_RATIO: f64 = 9.0;

/// Delete rows older than `retention`, `batch` rows per statement, until none are left, pausing
/// `pause_ratio` times each batch's duration between batches.
/// The cutoff is fixed at the start, so rows that expire meanwhile wait for the next run.
pub async fn purge_expired(
    pool: &PgPool,
    table: &QualifiedName,
    retention: Duration,
    batch: i64,
    pause_ratio: f64,
) -> Result<PurgeResult, sqlx::Error> {
    purge_expired_until(pool, table, retention, batch, pause_ratio, || false).await
}

/// [`purge_expired`] that stops before the next batch once `stop()` says so (new parameters: a
/// raised retention must not go on deleting by the old cutoff).
pub async fn purge_expired_until(
    pool: &PgPool,
    table: &QualifiedName,
    retention: Duration,
    batch: i64,
    pause_ratio: f64,
    stop: impl FnMut() -> bool,
) -> Result<PurgeResult, sqlx::Error> {
    purge_batches(pool, &inbox_purge_sql(table), retention, batch, pause_ratio, |_| {}, stop).await
}

/// Deletes by `ctid` (a TID scan: a join on the key made the planner scan the whole table for
/// each batch), with the age checked again in the delete itself: a `ctid` is unique only within
/// one partition, so on a partitioned inbox it also names rows of other partitions, and only
/// the expired ones among them may go.
pub fn inbox_purge_sql(table: &QualifiedName) -> String {
    format!(
        "delete from {table} where ctid = any(array(select ctid from {table} where received_at < $1 limit $2)) \
         and received_at < $1"
    )
}

/// Run `sql` (deletes at most $2 rows older than the cutoff $1) until it deletes fewer than
/// `batch`, pausing `pause_ratio` times each batch's duration between batches. The cutoff is
/// now - `retention` by the database's clock, fixed at the start. `deleted` hears of each batch
/// as it commits (a purge may be cancelled between batches); `stop` is asked before every batch
/// after the first.
pub async fn purge_batches(
    pool: &PgPool,
    sql: &str,
    retention: Duration,
    batch: i64,
    pause_ratio: f64,
    mut deleted: impl FnMut(u64),
    mut stop: impl FnMut() -> bool,
) -> Result<PurgeResult, sqlx::Error> {
    let started = Instant::now();
    let cutoff: sqlx::types::chrono::DateTime<sqlx::types::chrono::Utc> = sqlx::query_scalar("select now() - make_interval(secs => $1)")
        .bind(retention.as_secs_f64())
        .fetch_one(pool)
        .await?;
    let mut total = 0i64;
    let mut batches = 0u32;
    loop {
        let t = Instant::now();
        let n = sqlx::query(sql).bind(cutoff).bind(batch).execute(pool).await?.rows_affected() as i64;
        deleted(n as u64);
        total += n;
        batches += 1;
        if n < batch {
            break;
        }
        tokio::time::sleep(t.elapsed().mul_f64(pause_ratio)).await;
        if stop() {
            break;
        }
    }
    Ok(PurgeResult {
        rows_deleted: total,
        duration: started.elapsed(),
        batches,
    })
}

/// Table size and age figures for status. The row count is PostgreSQL's estimate once the table
/// has been analyzed (exact count before that).
pub async fn measure(pool: &PgPool, table: &QualifiedName) -> Result<(i64, Option<i64>), sqlx::Error> {
    let estimate: f32 = sqlx::query_scalar("select reltuples from pg_class where oid = $1::regclass")
        .bind(table.to_string())
        .fetch_one(pool)
        .await?;
    let rows = if estimate < 0.0 {
        sqlx::query_scalar(&format!("select count(*) from {table}")).fetch_one(pool).await?
    } else {
        estimate as i64
    };
    let oldest: Option<f64> = sqlx::query_scalar(&format!("select extract(epoch from now() - min(received_at))::float8 from {table}"))
        .fetch_one(pool)
        .await?;
    Ok((rows, oldest.map(|s| s.max(0.0) as i64)))
}

#[derive(Debug, Clone, PartialEq)]
pub struct PurgeParams {
    /// Identifies the database URL (not the URL itself): a changed Secret swaps the pool.
    pub pool_key: String,
    pub table: QualifiedName,
    pub retention: Duration,
    pub interval: Duration,
    pub batch: i64,
    /// The series this table's purges count in.
    pub labels: crate::metrics::PurgeLabel,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LastPurge {
    Done { at: Time, result: PurgeResult },
    Failed { at: Time, error: String, unreachable: bool },
}

struct Handle {
    params: watch::Sender<(PurgeParams, PgPool)>,
    last: Arc<Mutex<Option<LastPurge>>>,
    task: tokio::task::JoinHandle<()>,
}

/// One purge loop per InboxTable, keyed by the object's uid. Loops run only while this replica
/// leads: a standby's view (or a deposed leader's) may be stale, and a purge cannot be undone.
pub struct Purges<K: Clone + Send + 'static> {
    loops: Mutex<HashMap<String, Handle>>,
    /// Told after each purge, so the controller refreshes that object's status.
    done: mpsc::UnboundedSender<K>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Whether this replica holds the leader Lease (always true without leader election).
    leading: watch::Receiver<bool>,
}

impl<K: Clone + Send + Sync + 'static> Purges<K> {
    pub fn new(done: mpsc::UnboundedSender<K>, metrics: Arc<crate::metrics::Metrics>, leading: watch::Receiver<bool>) -> Self {
        Purges {
            loops: Mutex::new(HashMap::new()),
            done,
            metrics,
            leading,
        }
    }

    /// Start the loop for `uid`, or hand it new parameters. Refused (false, and every loop
    /// stopped) when this replica does not lead: a reconcile still in flight after the Lease was
    /// lost must not start a purge by what it read before.
    pub fn ensure(&self, uid: &str, key: K, pool: PgPool, params: PurgeParams) -> bool {
        let mut loops = self.loops.lock().expect("purge map lock");
        if !*self.leading.borrow() {
            loops.drain().for_each(|(_, h)| h.task.abort());
            return false;
        }
        if let Some(h) = loops.get(uid) {
            if !h.task.is_finished() {
                h.params.send_if_modified(|(p, pl)| {
                    let changed = *p != params;
                    if changed {
                        *p = params.clone();
                        *pl = pool.clone();
                    }
                    changed
                });
                return true;
            }
        }
        let (tx, mut rx) = watch::channel((params, pool));
        let mut leading = self.leading.clone();
        let last = Arc::new(Mutex::new(None));
        let last2 = last.clone();
        let done = self.done.clone();
        let metrics = self.metrics.clone();
        let phase = uid.to_owned();
        let task = tokio::spawn(async move {
            loop {
                // Not leading, or nobody left to say so (the elector ended): no purge.
                if !*leading.borrow_and_update() || leading.has_changed().is_err() {
                    return;
                }
                let (p, pool) = rx.borrow_and_update().clone();
                // New parameters (a raised retention) or a lost Lease stop a running purge before
                // its next batch.
                let stop = || rx.has_changed().unwrap_or(true) || !*leading.borrow();
                let run = purge_expired_until(&pool, &p.table, p.retention, p.batch, PAUSE_RATIO, stop).await;
                let outcome = match run {
                    Ok(result) => {
                        metrics.purged_rows.get_or_create(&p.labels).inc_by(result.rows_deleted as u64);
                        metrics
                            .purge_duration
                            .get_or_create(&p.labels)
                            .observe(result.duration.as_secs_f64());
                        LastPurge::Done {
                            at: Time(Timestamp::now()),
                            result,
                        }
                    }
                    Err(e) => {
                        metrics.purge_failures.get_or_create(&p.labels).inc();
                        LastPurge::Failed {
                            at: Time(Timestamp::now()),
                            error: e.to_string(),
                            unreachable: crate::clients::db::is_unreachable(&e),
                        }
                    }
                };
                *last2.lock().expect("last purge lock") = Some(outcome);
                if done.send(key.clone()).is_err() {
                    return;
                }
                if rx.has_changed().unwrap_or(false) {
                    continue;
                }
                // On the table's own phase of the interval: loops started together (the
                // operator starting) do not purge, and then reconcile, in one burst.
                let wait = crate::core::duration::phased(p.interval, &phase, std::time::SystemTime::now());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    changed = rx.changed() => if changed.is_err() { return },
                    _ = leading.wait_for(|l| !*l) => return,
                }
            }
        });
        loops.insert(uid.to_owned(), Handle { params: tx, last, task });
        true
    }

    pub fn last(&self, uid: &str) -> Option<LastPurge> {
        self.loops
            .lock()
            .expect("purge map lock")
            .get(uid)
            .and_then(|h| h.last.lock().expect("last purge lock").clone())
    }

    pub fn stop(&self, uid: &str) {
        if let Some(h) = self.loops.lock().expect("purge map lock").remove(uid) {
            h.task.abort();
        }
    }

    /// Stop loops whose object is gone.
    pub fn retain(&self, alive: impl Fn(&str) -> bool) {
        self.loops.lock().expect("purge map lock").retain(|uid, h| {
            let keep = alive(uid);
            if !keep {
                h.task.abort();
            }
            keep
        });
    }
}
