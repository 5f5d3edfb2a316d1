//! Dropping what the migrations made, for `deletionPolicy: Delete`.

use sqlx::PgConnection;

use super::{lock_key, tables::derived_name, TableKind, HISTORY_TABLE};
use crate::core::sql::{Ident, QualifiedName};

/// The statements that drop a table of `kind` and what its migrations made beside it (the
/// outbox's NOTIFY function; triggers and indexes go with their table). Pure.
pub fn drop_ddl(kind: TableKind, t: &QualifiedName) -> String {
    match kind {
        TableKind::Outbox => {
            let func = QualifiedName {
                schema: t.schema.clone(),
                table: derived_name(&t.table, "_notify"),
            };
            format!("drop table if exists {t};\ndrop function if exists {func}();")
        }
        TableKind::DeadLetter | TableKind::Inbox => format!("drop table if exists {t};"),
    }
}

/// The table exists (as the session's search path and privileges see it).
pub async fn table_exists(conn: &mut PgConnection, t: &QualifiedName) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("select to_regclass($1) is not null")
        .bind(t.to_string())
        .fetch_one(&mut *conn)
        .await
}

/// Relation `name` of `schema` is in the catalog. A scan of the catalog, not `to_regclass`: a
/// name lookup that finds nothing is remembered by the session (a negative catalog cache entry)
/// until it next processes invalidations, and a later `create ... if not exists` after waiting
/// for a session that created it meanwhile would then try to create it again and fail.
pub async fn in_catalog(conn: &mut PgConnection, schema: &str, name: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "select exists (select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = $1 and c.relname = $2)",
    )
    .bind(schema)
    .bind(name)
    .fetch_one(&mut *conn)
    .await
}

/// Drop `tables` and forget their migration history, inside the caller's transaction, each under
/// its migration lock (a migration of the same table waits, then starts from nothing).
pub async fn drop_tables(conn: &mut PgConnection, tables: &[(TableKind, &QualifiedName)]) -> Result<(), sqlx::Error> {
    for (kind, t) in tables {
        sqlx::query("select pg_advisory_xact_lock($1)")
            .bind(lock_key(t))
            .execute(&mut *conn)
            .await?;
        sqlx::Executor::execute(&mut *conn, drop_ddl(*kind, t).as_str()).await?;
        let history = QualifiedName {
            schema: t.schema.clone(),
            table: Ident::parse(HISTORY_TABLE).expect("valid"),
        };
        if table_exists(conn, &history).await? {
            sqlx::query(&format!("delete from {history} where table_schema = $1 and table_name = $2"))
                .bind(t.schema.as_str())
                .bind(t.table.as_str())
                .execute(&mut *conn)
                .await?;
        }
        super::owners::forget(conn, t).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::schema::qualified;

    #[test]
    fn the_outbox_takes_its_notify_function_along() {
        let sql = drop_ddl(TableKind::Outbox, &qualified("billing", "outbox"));
        assert!(
            sql.starts_with("drop table if exists \"billing\".\"outbox\";\ndrop function if exists \"billing\".\"outbox_"),
            "{sql}"
        );
        assert!(sql.ends_with("_notify\"();"), "{sql}");
        assert_eq!(
            drop_ddl(TableKind::Inbox, &qualified("a", "in")),
            "drop table if exists \"a\".\"in\";"
        );
    }
}
