//! What relays with key-hash buckets need in the outbox's schema: the bucket function (the same
//! hash as `crate::tables::buckets::bucket_of`) and an index per bucket count, which keeps a read of a
//! relay's buckets as cheap as a read of the whole outbox: each bucket's rows in seq order.

use sqlx::{Executor, PgConnection};

use super::lock_key;
use crate::{
    core::routing::OutboxColumn,
    core::sql::{Ident, QualifiedName},
    crd::Cleanup,
};

/// The bucket function's name (docs/relay.md).
pub const FUNCTION_NAME: &str = "lockstep_bucket";

/// The bucket function of `schema`, qualified.
pub fn function(schema: &Ident) -> String {
    format!("{schema}.{FUNCTION_NAME}")
}

/// The function: the first 4 bytes of SHA-256 over the key's UTF-8 bytes, big-endian, mod B. A
/// null key hashes as ''. `convert_to` is only stable (conversions are catalog lookups), but a
/// conversion to the database's own encoding, UTF8 here, is the identity, so immutable holds.
pub fn function_ddl(schema: &Ident) -> String {
    format!(
        "create or replace function {}(key text, buckets integer) returns integer \
         language sql immutable parallel safe as \
         $$ select (('x' || left(encode(sha256(convert_to(coalesce(key, ''), 'UTF8')), 'hex'), 8))::bit(32)::bigint % buckets)::int $$",
        function(schema)
    )
}

/// The bucket of a row, as the index and the reads spell it.
pub fn expression(t: &QualifiedName, key: OutboxColumn, buckets: u16) -> String {
    format!("{}({}::text, {buckets})", function(&t.schema), key.name())
}

/// The index of `buckets` buckets: its name and DDL.
pub fn index(t: &QualifiedName, key: OutboxColumn, buckets: u16, cleanup: Cleanup) -> (Ident, String) {
    let name = t
        .table
        .with_suffix(&format!("_bucket{buckets}_idx"))
        .unwrap_or_else(|_| Ident::parse(&format!("lockstep_bucket{buckets}_idx")).expect("a plain name"));
    let partial = match cleanup {
        Cleanup::MarkPublished => " where published_at is null",
        Cleanup::Delete => "",
    };
    let ddl = format!(
        "create index concurrently if not exists {name} on {t} ({}, seq){partial}",
        expression(t, key, buckets)
    );
    (name, ddl)
}

/// What is missing for relays with buckets, when the schema is not lockstep's to change.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Missing {
    pub function: bool,
    pub index: bool,
}

/// Make sure the function and the index of `buckets` exist (the index valid), under the table's
/// migration lock (a session lock: CONCURRENTLY runs outside a transaction). With `manage` false
/// nothing changes and what is missing is returned.
pub async fn ensure(
    conn: &mut PgConnection,
    t: &QualifiedName,
    key: OutboxColumn,
    buckets: u16,
    cleanup: Cleanup,
    manage: bool,
) -> Result<Missing, sqlx::Error> {
    let lock = lock_key(t);
    if manage {
        sqlx::query("select pg_advisory_lock($1)").bind(lock).execute(&mut *conn).await?;
    }
    let result = async {
        let function_there: bool = sqlx::query_scalar(
            "select exists (select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
             where n.nspname = $1 and p.proname = $2)",
        )
        .bind(t.schema.as_str())
        .bind(FUNCTION_NAME)
        .fetch_one(&mut *conn)
        .await?;
        let (name, ddl) = index(t, key, buckets, cleanup);
        let valid = super::index_valid(&mut *conn, t.schema.as_str(), name.as_str()).await?;
        if !manage {
            return Ok(Missing {
                function: !function_there,
                index: valid != Some(true),
            });
        }
        if !function_there {
            conn.execute(function_ddl(&t.schema).as_str()).await?;
        }
        if valid == Some(false) {
            let index = QualifiedName {
                schema: t.schema.clone(),
                table: name.clone(),
            };
            conn.execute(format!("drop index concurrently if exists {index}").as_str()).await?;
        }
        if valid != Some(true) {
            tracing::info!(table = %t, index = %name, buckets, "creating the bucket index");
            conn.execute(ddl.as_str()).await?;
        }
        Ok(Missing::default())
    }
    .await;
    if manage {
        sqlx::query("select pg_advisory_unlock($1)").bind(lock).execute(&mut *conn).await?;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_orders_each_bucket_by_seq() {
        let t = crate::tables::schema::qualified("billing", "outbox");
        let (name, ddl) = index(&t, OutboxColumn::Aggregateid, 64, Cleanup::Delete);
        assert_eq!(name.as_str(), "outbox_bucket64_idx");
        assert_eq!(
            ddl,
            r#"create index concurrently if not exists "outbox_bucket64_idx" on "billing"."outbox" ("billing".lockstep_bucket(aggregateid::text, 64), seq)"#
        );
        let (_, ddl) = index(&t, OutboxColumn::Id, 8, Cleanup::MarkPublished);
        assert!(ddl.ends_with("(id::text, 8), seq) where published_at is null"), "{ddl}");
    }
}
