//! The steady state of a migration, read without a lock: a refresh of every object runs the
//! migration again, and under the schema's advisory lock those runs queue behind each other
//! (every table of a schema shares that lock). When nothing is to be done the answer is the same
//! without it, so it is looked for first; anything else takes the locked path, which decides.

use futures::FutureExt;
use sqlx::PgConnection;

use super::{observe, verify, MigrationOutcome, Plan};

/// The outcome when nothing is to be done: with `manage`, the history names every known
/// migration with its checksum and the table still matches the contract; without, the table
/// verifies. None (or an error) when the locked path must look: it writes, or reports why not.
pub(super) async fn settled(conn: &mut PgConnection, p: &Plan<'_>, manage: bool) -> Result<Option<MigrationOutcome>, sqlx::Error> {
    if !manage {
        return Ok(verify(conn, p).boxed().await.ok());
    }
    let history = &p.history;
    // A scan of the catalog, not `to_regclass`: a name lookup that finds nothing is remembered by
    // this session (a negative catalog cache entry) until it next processes invalidations, and the
    // locked path's `create schema if not exists`, run after waiting for another session that
    // created the schema meanwhile, would then try to create it again and fail.
    let exists: bool = sqlx::query_scalar(
        "select exists (select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = $1 and c.relname = $2)",
    )
    .bind(history.schema.as_str())
    .bind(history.table.as_str())
    .fetch_one(&mut *conn)
    .await?;
    if !exists {
        return Ok(None);
    }
    let sql = format!("select version, checksum from {history} where table_schema = $1 and table_name = $2 order by version");
    let recorded: Vec<(i32, String)> = sqlx::query_as(&sql)
        .bind(p.table.schema.as_str())
        .bind(p.table.table.as_str())
        .fetch_all(&mut *conn)
        .await?;
    if recorded.last().map(|r| r.0) != Some(p.latest) || p.check_history(&recorded).is_err() {
        return Ok(None);
    }
    Ok(match observe(conn, p.table).boxed().await? {
        Some(observed) if p.check(&observed).is_ok() => Some(p.outcome()),
        _ => None,
    })
}
