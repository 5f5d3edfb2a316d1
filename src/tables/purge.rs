//! Purging expired inbox rows in bounded batches. Each batch is its own short statement, so
//! writers claiming new ids are never blocked for long.

use std::time::{Duration, Instant};

use sqlx::PgPool;

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
