//! What the relay needs of its tables beyond migrations: the outbox and dead-letter tables ready
//! and described, and the indexes cleanup MarkPublished needs.

use futures::FutureExt;
use sqlx::{Executor, PgConnection};

use super::{lock_key, migrate, notify_channel, tables::derived_name, PayloadColumn, SchemaError, TableKind};
use crate::core::sql::{Ident, QualifiedName};

/// The indexes an outbox needs when the relay marks rows published instead of deleting them
/// (cleanup MarkPublished), as (name, DDL): the relay reads and measures only unpublished rows,
/// and the purge finds the oldest published ones, neither scanning the rows kept for
/// publishedRetention. Not a versioned migration: an outbox whose rows are deleted needs neither
/// (every row is unpublished there), and CONCURRENTLY (writers keep writing while an existing
/// table is indexed) cannot run in the migration's transaction.
pub fn published_indexes(t: &QualifiedName) -> [(Ident, String); 2] {
    let unpublished = derived_name(&t.table, "_unpublished_idx");
    let published = derived_name(&t.table, "_published_at_idx");
    [
        (
            unpublished.clone(),
            format!("create index concurrently if not exists {unpublished} on {t} (seq) where published_at is null"),
        ),
        (
            published.clone(),
            format!("create index concurrently if not exists {published} on {t} (published_at) where published_at is not null"),
        ),
    ]
}

/// What the relay needs to know about its tables once they are ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxTables {
    pub payload: PayloadColumn,
    /// The dead-letter table's payload column (a user-made one may differ from the outbox's).
    pub dead_letter_payload: PayloadColumn,
    /// The outbox has the optional `traceparent` column (migration 2 adds it; a table lockstep
    /// does not manage may not have it, and is read without it).
    pub traceparent: bool,
    /// The dead-letter table has it: a quarantine and a replay carry it only when both do.
    pub dead_letter_traceparent: bool,
    /// The NOTIFY channel the outbox trigger signals.
    pub channel: String,
}

/// Migrate (or verify) an outbox and its dead-letter table and describe them: the relay's one call.
pub async fn prepare_outbox(
    conn: &mut PgConnection,
    outbox: &QualifiedName,
    dead_letter: &QualifiedName,
    manage: bool,
) -> Result<OutboxTables, SchemaError> {
    migrate(conn, TableKind::Outbox, outbox, manage).boxed().await?;
    migrate(conn, TableKind::DeadLetter, dead_letter, manage).boxed().await?;
    Ok(describe_outbox(conn, outbox, dead_letter).await?)
}

/// What the relay needs to know about tables that exist: their payload types, the channel.
pub async fn describe_outbox(
    conn: &mut PgConnection,
    outbox: &QualifiedName,
    dead_letter: &QualifiedName,
) -> Result<OutboxTables, sqlx::Error> {
    Ok(OutboxTables {
        payload: PayloadColumn::from_type_name(column_type(conn, outbox, "payload").await?.as_deref()),
        dead_letter_payload: PayloadColumn::from_type_name(column_type(conn, dead_letter, "payload").await?.as_deref()),
        traceparent: column_type(conn, outbox, "traceparent").await?.is_some(),
        dead_letter_traceparent: column_type(conn, dead_letter, "traceparent").await?.is_some(),
        channel: notify_channel(outbox),
    })
}

/// Make sure the MarkPublished indexes exist and are valid ([`published_indexes`]), under the
/// table's migration lock (a session lock: CONCURRENTLY runs outside a transaction). An invalid
/// index is what a build that was interrupted leaves behind: dropped and built again. With
/// `manage` false nothing is changed; the names of the missing (or invalid) indexes are returned.
pub async fn ensure_published_indexes(conn: &mut PgConnection, t: &QualifiedName, manage: bool) -> Result<Vec<String>, sqlx::Error> {
    let key = lock_key(t);
    if manage {
        sqlx::query("select pg_advisory_lock($1)").bind(key).execute(&mut *conn).await?;
    }
    let result = async {
        let mut missing = Vec::new();
        for (name, ddl) in published_indexes(t) {
            let valid = index_valid(&mut *conn, t.schema.as_str(), name.as_str()).await?;
            if valid == Some(true) {
                continue;
            }
            if !manage {
                missing.push(name.as_str().to_owned());
                continue;
            }
            if valid == Some(false) {
                let index = QualifiedName {
                    schema: t.schema.clone(),
                    table: name.clone(),
                };
                conn.execute(format!("drop index concurrently if exists {index}").as_str()).await?;
            }
            tracing::info!(table = %t, index = %name, "creating an index for cleanup MarkPublished");
            conn.execute(ddl.as_str()).await?;
        }
        Ok(missing)
    }
    .await;
    if manage {
        sqlx::query("select pg_advisory_unlock($1)").bind(key).execute(&mut *conn).await?;
    }
    result
}

/// Whether index `name` of `schema` is valid; None when there is no such index (an invalid one
/// is what an interrupted `create index concurrently` leaves).
pub async fn index_valid<'e>(e: impl sqlx::PgExecutor<'e>, schema: &str, name: &str) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar(
        "select i.indisvalid from pg_index i join pg_class c on c.oid = i.indexrelid
         join pg_namespace n on n.oid = c.relnamespace where n.nspname = $1 and c.relname = $2",
    )
    .bind(schema)
    .bind(name)
    .fetch_optional(e)
    .await
}

/// The type name (`udt_name`) of column `name` of `t`; None when it has no such column.
async fn column_type(conn: &mut PgConnection, t: &QualifiedName, name: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "select udt_name::text from information_schema.columns where table_schema = $1 and table_name = $2 and column_name = $3",
    )
    .bind(t.schema.as_str())
    .bind(t.table.as_str())
    .bind(name)
    .fetch_optional(&mut *conn)
    .await
}
