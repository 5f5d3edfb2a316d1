//! Cleanup MarkPublished: published rows stay in the outbox for publishedRetention (to audit or
//! replay them), then the active relay deletes them in bounded batches, pausing between batches as
//! the inbox purge does, so writers keep their throughput. The relay's reads and measurements use
//! a partial index on unpublished rows, so the rows kept cost them nothing.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::RelayMetrics;
use crate::{
    core::sql::QualifiedName,
    tables::purge::{purge_batches, PAUSE_RATIO},
};

/// Rows per delete statement.
pub const PURGE_BATCH: i64 = 5_000;

/// How often the purge runs: a quarter of the retention, between 1 s and 1 min.
pub fn purge_interval(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Delete up to $2 rows published before $1, oldest first (the partial index on published_at).
fn purge_sql(t: &QualifiedName) -> String {
    format!("delete from {t} where id = any(array(select id from {t} where published_at < $1 order by published_at limit $2))")
}

/// Every `purge_interval`, while this relay is the active one, until `stop`.
pub(super) fn spawn_purge(
    pool: PgPool,
    table: QualifiedName,
    retention: Duration,
    metrics: Arc<RelayMetrics>,
    active: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let every = purge_interval(retention);
    let sql = purge_sql(&table);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if !active.load(Ordering::Relaxed) {
                continue;
            }
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = purge_batches(&pool, &sql, retention, PURGE_BATCH, PAUSE_RATIO, |n| {
                    metrics.purged.inc_by(n);
                }, || false) => r,
            };
            match result {
                Ok(r) => {
                    if r.rows_deleted > 0 {
                        tracing::debug!(%table, rows = r.rows_deleted, batches = r.batches, took = ?r.duration, "purged published rows");
                    }
                }
                Err(e) => {
                    metrics.purge_failures.inc();
                    tracing::warn!(%table, error = %e, "purging published rows failed; retrying in {every:?}");
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_runs_four_times_per_retention_within_bounds() {
        assert_eq!(purge_interval(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(purge_interval(Duration::from_secs(120)), Duration::from_secs(30));
        assert_eq!(purge_interval(Duration::from_secs(7 * 86400)), Duration::from_secs(60));
    }

    #[test]
    fn the_purge_deletes_by_key_oldest_published_first() {
        assert_eq!(
            purge_sql(&crate::tables::schema::qualified("billing", "outbox")),
            r#"delete from "billing"."outbox" where id = any(array(select id from "billing"."outbox" where published_at < $1 order by published_at limit $2))"#
        );
    }
}
