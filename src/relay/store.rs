//! The relay's own SQL over the outbox. Every statement is rendered from one list of the event
//! columns, so what a batch reads and what a failed row takes to the dead-letter table agree.

use sqlx::{postgres::PgRow, PgConnection, Row};
use uuid::Uuid;

use crate::{
    core::routing::OutboxColumn,
    core::sql::QualifiedName,
    crd::{Cleanup, ValidOutboxRelay},
    tables::{
        lag::UNPUBLISHED,
        schema::{OutboxTables, PayloadColumn},
    },
};

/// How the select reads a column.
#[derive(Clone, Copy)]
enum Read {
    AsIs,
    /// The payload's bytes, whatever its type (see [`payload_bytes`]).
    Payload,
    Expr(&'static str),
}

/// An outbox column an event consists of.
struct Column {
    name: &'static str,
    read: Read,
    /// What the dead-letter row gets instead of the value as is.
    moved: Option<&'static str>,
}

impl Column {
    const fn read(name: &'static str, read: Read) -> Self {
        Column { name, read, moved: None }
    }

    const fn plain(name: &'static str) -> Self {
        Column::read(name, Read::AsIs)
    }

    const fn moved_as(self, value: &'static str) -> Self {
        Column {
            moved: Some(value),
            ..self
        }
    }
}

/// The event columns, in the order the select reads them.
static COLUMNS: [Column; 9] = [
    Column::plain("id"),
    Column::plain("seq"),
    Column::plain("aggregatetype"),
    Column::plain("aggregateid"),
    Column::plain("type"),
    Column::read("payload", Read::Payload),
    Column::read("headers", Read::Expr("headers::jsonb as headers")),
    // The attempt that failed last counts.
    Column::plain("attempts").moved_as("attempts + 1"),
    Column::read("created_at", Read::Expr("extract(epoch from created_at)::float8 as created")),
];

/// The optional event column: read where the outbox has it, moved where both tables have it.
static TRACEPARENT: Column = Column::read("traceparent", Read::Expr("traceparent::text as traceparent"));

/// The event columns a statement reads or moves: [`COLUMNS`], then traceparent if `traceparent`.
fn columns(traceparent: bool) -> impl Iterator<Item = &'static Column> {
    COLUMNS.iter().chain(traceparent.then_some(&TRACEPARENT))
}

/// The payload as bytes: bytea as is, json and jsonb as their UTF-8 text.
fn payload_bytes(payload: PayloadColumn) -> &'static str {
    match payload {
        PayloadColumn::Bytea => "payload",
        PayloadColumn::Json => "convert_to(payload::text, 'UTF8')",
    }
}

/// Rows to publish next, in seq order, only below the snapshot's xmin. $1 limit, $2 the keys to
/// leave out (text[]: keys waiting for a retry), $3 the rows in flight (bigint[] of seq); see `gate`.
/// `not in (select unnest(..))` is a hashed subplan even in a generic plan, so the statement is
/// planned once per connection (see `session::configure`) and a long list is still not searched
/// row by row.
fn select_sql(t: &QualifiedName, key: OutboxColumn, payload: PayloadColumn, cleanup: Cleanup, traceparent: bool) -> String {
    let (first, last) = reads_sql(payload, traceparent);
    let unpublished = match cleanup {
        Cleanup::MarkPublished => format!("and {UNPUBLISHED}"),
        Cleanup::Delete => String::new(),
    };
    let key = key.name();
    format!(
        "select {first},
                    {last} from {t}
             where txid < pg_snapshot_xmin(pg_current_snapshot()) {unpublished} and {key}::text not in (select unnest($2::text[]))
               and seq not in (select unnest($3::bigint[]))
             order by seq limit $1"
    )
}

/// The read's column list, split before its last column (the statement's text is pinned:
/// tests/golden.rs).
fn reads_sql(payload: PayloadColumn, traceparent: bool) -> (String, String) {
    let reads: Vec<String> = columns(traceparent)
        .map(|c| match c.read {
            Read::AsIs => c.name.to_owned(),
            Read::Payload => format!("{} as payload", payload_bytes(payload)),
            Read::Expr(e) => e.to_owned(),
        })
        .collect();
    let (last, first) = reads.split_last().expect("columns");
    (first.join(", "), last.clone())
}

/// [`select_sql`] over the buckets $4 (int4[]) of `buckets`, at most $5 rows from each: one index
/// scan per bucket on the bucket index, in seq order, that stops at $5 rows; the oldest $1 of
/// those. The lists of keys and rows to leave out are hashed once and used by every bucket's scan.
/// (A UNION ALL of the buckets would let one statement merge them, but PostgreSQL 15 sorts the
/// union of whole buckets instead of merging index scans.) Rows of a key are in one bucket, so
/// they come in seq order.
pub(super) fn bucket_select_sql(cfg: &ValidOutboxRelay, tables: &OutboxTables) -> String {
    let (first, last) = reads_sql(tables.payload, tables.traceparent);
    // The bucket too: the relay counts rows per bucket without hashing their keys again.
    bucket_read(
        &cfg.table,
        cfg.key,
        cfg.cleanup,
        cfg.buckets,
        &format!("{first}, {last}, b.n as bucket"),
    )
}

/// The bucket read, reading `reads` (columns of `r`).
pub fn bucket_read(t: &QualifiedName, key: OutboxColumn, cleanup: Cleanup, buckets: u16, reads: &str) -> String {
    let unpublished = match cleanup {
        Cleanup::MarkPublished => format!(" and {UNPUBLISHED}"),
        Cleanup::Delete => String::new(),
    };
    let bucket = crate::tables::schema::buckets::expression(t, key, buckets);
    let key = key.name();
    format!(
        "select {reads} from unnest($4::int4[]) b(n), lateral (
             select * from {t} where {bucket} = b.n and txid < pg_snapshot_xmin(pg_current_snapshot()){unpublished}
               and {key}::text not in (select unnest($2::text[])) and seq not in (select unnest($3::bigint[]))
             order by seq limit $5) r
         order by seq limit $1"
    )
}

/// The payload as the dead-letter table stores it: as is when the types agree; bytes into a
/// json(b) column as a base64 JSON string (any bytes fit); json(b) into bytea as its UTF-8 text.
fn moved_payload(outbox: PayloadColumn, dead_letter: PayloadColumn) -> &'static str {
    match (outbox, dead_letter) {
        (PayloadColumn::Bytea, PayloadColumn::Json) => "to_jsonb(encode(payload, 'base64'))",
        (PayloadColumn::Json, PayloadColumn::Bytea) => "convert_to(payload::text, 'UTF8')",
        _ => "payload",
    }
}

/// Move row $1 to the dead-letter table with error $2: stored first, then deleted, and deleted
/// only if stored. A row already there (replayed, failed again) is replaced by the new failure.
/// `traceparent`: both tables have the column.
fn quarantine_sql(t: &QualifiedName, dead_letter: &QualifiedName, outbox: PayloadColumn, dl: PayloadColumn, traceparent: bool) -> String {
    let names = columns(traceparent).map(|c| c.name).collect::<Vec<_>>().join(", ");
    let values = columns(traceparent)
        .map(|c| match c.name {
            "payload" => moved_payload(outbox, dl),
            _ => c.moved.unwrap_or(c.name),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let updates: String = columns(traceparent)
        .filter(|c| c.name != "id")
        .map(|c| format!("{0} = excluded.{0}, ", c.name))
        .collect();
    format!(
        "with moved as (select {names} from {t} where id = $1),
             stored as (insert into {dead_letter} ({names}, last_error)
                 select {values}, $2 from moved
                 on conflict (id) do update set {updates}last_error = excluded.last_error, failed_at = now()
                 returning id)
             delete from {t} where id in (select id from stored)"
    )
}

/// An outbox row as the select reads it.
pub(super) struct OutboxRow {
    pub id: Uuid,
    pub seq: i64,
    pub aggregatetype: String,
    pub aggregateid: String,
    pub type_: String,
    pub payload: Option<Vec<u8>>,
    pub headers: Option<serde_json::Value>,
    pub attempts: i32,
    /// created_at as seconds since the epoch.
    pub created: f64,
    /// The optional traceparent column, as text (unchecked: see `headers`).
    pub traceparent: Option<String>,
}

impl OutboxRow {
    fn from_row(r: &PgRow) -> Self {
        OutboxRow {
            id: r.get("id"),
            seq: r.get("seq"),
            aggregatetype: r.get("aggregatetype"),
            aggregateid: r.get("aggregateid"),
            type_: r.get("type"),
            payload: r.get("payload"),
            headers: r.get("headers"),
            attempts: r.get("attempts"),
            created: r.get("created"),
            // Not selected where the outbox has no such column.
            traceparent: r.try_get("traceparent").unwrap_or(None),
        }
    }

    pub fn column(&self, c: OutboxColumn) -> String {
        match c {
            OutboxColumn::Id => self.id.to_string(),
            OutboxColumn::Aggregatetype => self.aggregatetype.clone(),
            OutboxColumn::Aggregateid => self.aggregateid.clone(),
            OutboxColumn::Type => self.type_.clone(),
        }
    }
}

/// The statements a relay runs, rendered once.
pub(super) struct Statements {
    pub select: String,
    /// Delete (or mark published) the acknowledged rows $1.
    pub done: String,
    /// Count a failed attempt of row $1, with error $2.
    fail: String,
    quarantine: String,
    /// With buckets: the read of some of them.
    bucket_select: String,
}

impl Statements {
    pub fn new(cfg: &ValidOutboxRelay, tables: &OutboxTables) -> Self {
        let t = &cfg.table;
        let both = tables.traceparent && tables.dead_letter_traceparent;
        Statements {
            select: select_sql(t, cfg.key, tables.payload, cfg.cleanup, tables.traceparent),
            done: match cfg.cleanup {
                Cleanup::Delete => format!("delete from {t} where id = any($1)"),
                Cleanup::MarkPublished => format!("update {t} set published_at = now() where id = any($1)"),
            },
            fail: format!("update {t} set attempts = attempts + 1, last_error = $2 where id = $1"),
            quarantine: quarantine_sql(t, &cfg.dead_letter_table, tables.payload, tables.dead_letter_payload, both),
            bucket_select: bucket_select_sql(cfg, tables),
        }
    }

    /// Up to `limit` rows, leaving out the `keys` and the rows `seqs`.
    pub async fn fetch(&self, conn: &mut PgConnection, limit: i32, keys: &[String], seqs: &[i64]) -> Result<Vec<OutboxRow>, sqlx::Error> {
        let rows = sqlx::query(&self.select)
            .bind(i64::from(limit))
            .bind(keys)
            .bind(seqs)
            .fetch_all(conn)
            .await?;
        Ok(rows.iter().map(OutboxRow::from_row).collect())
    }

    /// [`Self::fetch`], from `buckets` only, at most `each` rows from each (none: nothing read);
    /// with each row its bucket.
    pub async fn fetch_buckets(
        &self,
        conn: &mut PgConnection,
        limit: i32,
        keys: &[String],
        seqs: &[i64],
        buckets: &[i32],
        each: i64,
    ) -> Result<(Vec<OutboxRow>, Vec<u16>), sqlx::Error> {
        if buckets.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let rows = sqlx::query(&self.bucket_select)
            .bind(i64::from(limit))
            .bind(keys)
            .bind(seqs)
            .bind(buckets)
            .bind(each)
            .fetch_all(conn)
            .await?;
        let of = rows.iter().map(|r| r.get::<i32, _>("bucket") as u16).collect();
        Ok((rows.iter().map(OutboxRow::from_row).collect(), of))
    }

    pub async fn done(&self, conn: &mut PgConnection, ids: &[Uuid]) -> Result<(), sqlx::Error> {
        sqlx::query(&self.done).bind(ids).execute(conn).await.map(drop)
    }

    pub async fn fail(&self, conn: &mut PgConnection, id: Uuid, error: &str) -> Result<(), sqlx::Error> {
        sqlx::query(&self.fail).bind(id).bind(error).execute(conn).await.map(drop)
    }

    pub async fn quarantine(&self, conn: &mut PgConnection, id: Uuid, error: &str) -> Result<(), sqlx::Error> {
        sqlx::query(&self.quarantine).bind(id).bind(error).execute(conn).await.map(drop)
    }
}

/// The read of some of `buckets` buckets (`store::bucket_read`), for tests and EXPLAIN.
pub fn bucket_read_sql(t: &QualifiedName, key: crate::core::routing::OutboxColumn, cleanup: Cleanup, buckets: u16) -> String {
    bucket_read(t, key, cleanup, buckets, "id, seq")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::schema::qualified as q;

    #[test]
    fn select_reads_every_event_column_below_the_snapshot_xmin() {
        let sql = select_sql(
            &q("billing", "orders"),
            OutboxColumn::Id,
            PayloadColumn::Bytea,
            Cleanup::Delete,
            false,
        );
        assert_eq!(
            sql,
            r#"select id, seq, aggregatetype, aggregateid, type, payload as payload, headers::jsonb as headers, attempts,
                    extract(epoch from created_at)::float8 as created from "billing"."orders"
             where txid < pg_snapshot_xmin(pg_current_snapshot())  and id::text not in (select unnest($2::text[]))
               and seq not in (select unnest($3::bigint[]))
             order by seq limit $1"#
        );
        let json = select_sql(
            &q("billing", "orders"),
            OutboxColumn::Type,
            PayloadColumn::Json,
            Cleanup::MarkPublished,
            false,
        );
        assert!(
            json.contains("type, convert_to(payload::text, 'UTF8') as payload, headers"),
            "{json}"
        );
        assert!(
            json.contains("(pg_current_snapshot()) and published_at is null and type::text not in (select unnest($2::text[]))"),
            "{json}"
        );
    }

    #[test]
    fn quarantine_stores_before_it_deletes_and_counts_the_last_attempt() {
        let (o, dl) = (q("public", "outbox"), q("public", "outbox_dead_letter"));
        assert_eq!(
            quarantine_sql(&o, &dl, PayloadColumn::Json, PayloadColumn::Json, false),
            r#"with moved as (select id, seq, aggregatetype, aggregateid, type, payload, headers, attempts, created_at from "public"."outbox" where id = $1),
             stored as (insert into "public"."outbox_dead_letter" (id, seq, aggregatetype, aggregateid, type, payload, headers, attempts, created_at, last_error)
                 select id, seq, aggregatetype, aggregateid, type, payload, headers, attempts + 1, created_at, $2 from moved
                 on conflict (id) do update set seq = excluded.seq, aggregatetype = excluded.aggregatetype, aggregateid = excluded.aggregateid, type = excluded.type, payload = excluded.payload, headers = excluded.headers, attempts = excluded.attempts, created_at = excluded.created_at, last_error = excluded.last_error, failed_at = now()
                 returning id)
             delete from "public"."outbox" where id in (select id from stored)"#
        );
        let bytes_into_json = quarantine_sql(&o, &dl, PayloadColumn::Bytea, PayloadColumn::Json, false);
        assert!(
            bytes_into_json.contains("type, to_jsonb(encode(payload, 'base64')), headers"),
            "{bytes_into_json}"
        );
        let json_into_bytes = quarantine_sql(&o, &dl, PayloadColumn::Json, PayloadColumn::Bytea, false);
        assert!(
            json_into_bytes.contains("type, convert_to(payload::text, 'UTF8'), headers"),
            "{json_into_bytes}"
        );
    }

    #[test]
    fn traceparent_is_read_and_moved_only_where_the_tables_have_it() {
        let (o, dl) = (q("public", "outbox"), q("public", "outbox_dead_letter"));
        let select = select_sql(&o, OutboxColumn::Id, PayloadColumn::Json, Cleanup::Delete, true);
        assert!(
            select.contains("as created,\n                    traceparent::text as traceparent from \"public\".\"outbox\""),
            "{select}"
        );
        let moved = quarantine_sql(&o, &dl, PayloadColumn::Json, PayloadColumn::Json, true);
        assert!(
            moved.contains("attempts, created_at, traceparent from \"public\".\"outbox\" where id = $1"),
            "{moved}"
        );
        assert!(moved.contains("created_at, traceparent, last_error)"), "{moved}");
        assert!(moved.contains("attempts + 1, created_at, traceparent, $2 from moved"), "{moved}");
        assert!(moved.contains("traceparent = excluded.traceparent, last_error"), "{moved}");
        for without in [
            select_sql(&o, OutboxColumn::Id, PayloadColumn::Json, Cleanup::Delete, false),
            quarantine_sql(&o, &dl, PayloadColumn::Json, PayloadColumn::Json, false),
        ] {
            assert!(!without.contains("traceparent"), "{without}");
        }
    }

    #[test]
    fn every_dead_letter_column_but_its_own_is_moved() {
        // The dead-letter table's columns, less those it fills itself, are exactly what is moved.
        let moved: Vec<&str> = COLUMNS.iter().map(|c| c.name).collect();
        let mut wanted: Vec<&str> = crate::tables::schema::contract(crate::tables::schema::TableKind::DeadLetter)
            .columns()
            .map(|c| c.name)
            .filter(|n| !["last_error", "failed_at"].contains(n))
            .collect();
        let mut moved_sorted = moved.clone();
        moved_sorted.sort_unstable();
        wanted.sort_unstable();
        assert_eq!(moved_sorted, wanted);
    }
}
