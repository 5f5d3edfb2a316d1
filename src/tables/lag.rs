//! How far behind an outbox is, read the same way by the relay (its metrics) and the operator (the
//! OutboxRelay's lag condition).

use sqlx::Row;

use crate::{core::sql::QualifiedName, crd::Cleanup};

/// The filter of rows not yet published when the relay marks rows instead of deleting them.
pub const UNPUBLISHED: &str = "published_at is null";

/// Pending estimate and oldest pending age, from the seq index.
pub async fn measure(pool: &sqlx::PgPool, t: &QualifiedName, cleanup: Cleanup) -> Result<(i64, f64), sqlx::Error> {
    let filter = match cleanup {
        Cleanup::MarkPublished => format!("where {UNPUBLISHED}"),
        Cleanup::Delete => String::new(),
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

/// Age of the oldest open transaction that holds a transaction id (anywhere in the cluster),
/// prepared (two-phase) transactions included: rows committed after it started stay invisible to
/// the relay until it ends. Sessions of other roles count only where this role may see them
/// (pg_read_all_stats).
pub async fn oldest_transaction_age(pool: &sqlx::PgPool) -> Result<f64, sqlx::Error> {
    sqlx::query_scalar(
        "select coalesce(extract(epoch from now() - least(
                    (select min(xact_start) from pg_stat_activity where backend_xid is not null and pid <> pg_backend_pid()),
                    (select min(prepared) from pg_prepared_xacts)))::float8, 0)",
    )
    .fetch_one(pool)
    .await
}
