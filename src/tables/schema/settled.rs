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
    // Not `to_regclass`: see `drop::in_catalog`.
    let exists = super::drop::in_catalog(conn, history.schema.as_str(), history.table.as_str()).await?;
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
