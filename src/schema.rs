//! Table migrations for the outbox, dead-letter and inbox tables.
//!
//! SQL is rendered only from validated [`Ident`]s. Migrations run in one transaction under an
//! advisory lock keyed by the table, are recorded with checksums in `lockstep_schema_history` (in
//! the table's schema), are idempotent, and never drop or rewrite data. A table that exists without
//! history is verified against the contract; a mismatch is reported and the table left alone.

use std::fmt;

use futures::FutureExt;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, Row};

use crate::sql::{quote_literal, Ident, QualifiedName};

pub const HISTORY_TABLE: &str = "lockstep_schema_history";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TableKind {
    Outbox,
    DeadLetter,
    Inbox,
}

impl TableKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TableKind::Outbox => "outbox",
            TableKind::DeadLetter => "dead_letter",
            TableKind::Inbox => "inbox",
        }
    }
}

impl fmt::Display for TableKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One versioned step.
pub struct Migration {
    pub version: i32,
    pub description: &'static str,
    pub render: fn(&QualifiedName) -> String,
}

impl Migration {
    /// Checksum of the migration's shape, independent of the table it is applied to.
    pub fn checksum(&self) -> String {
        let canonical = QualifiedName {
            schema: Ident::parse("lockstep_schema").unwrap(),
            table: Ident::parse("lockstep_table").unwrap(),
        };
        hex(&Sha256::digest((self.render)(&canonical).as_bytes()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A name derived from a table name (index, trigger, function), kept within 63 characters:
/// long names are shortened and given a hash so two tables never share one.
pub fn derived_name(table: &Ident, suffix: &str) -> Ident {
    let full = format!("{}{suffix}", table.as_str());
    if let Ok(id) = Ident::parse(&full) {
        return id;
    }
    let h = hex(&Sha256::digest(full.as_bytes()));
    let keep = crate::sql::MAX_IDENT_LEN - suffix.len() - 9;
    Ident::parse(&format!("{}_{}{suffix}", &table.as_str()[..keep], &h[..8])).expect("derived name is a valid identifier")
}

/// The NOTIFY channel the outbox trigger signals and the relay listens on.
pub fn notify_channel(t: &QualifiedName) -> String {
    let h = hex(&Sha256::digest(format!("{}.{}", t.schema.as_str(), t.table.as_str()).as_bytes()));
    format!("lockstep_outbox_{}", &h[..16])
}

fn outbox_v1(t: &QualifiedName) -> String {
    let func = QualifiedName {
        schema: t.schema.clone(),
        table: derived_name(&t.table, "_notify"),
    };
    let trigger = derived_name(&t.table, "_notify_trg");
    let channel = quote_literal(&notify_channel(t));
    format!(
        "create table {t} (
    id uuid primary key,
    aggregatetype text not null,
    aggregateid text not null,
    type text not null,
    payload jsonb,
    headers jsonb,
    created_at timestamptz not null default now(),
    seq bigint generated always as identity unique,
    txid xid8 not null default pg_current_xact_id(),
    attempts integer not null default 0,
    last_error text,
    published_at timestamptz
);
create or replace function {func}() returns trigger language plpgsql as $$
begin
    perform pg_notify({channel}, '');
    return null;
end $$;
create trigger {trigger} after insert on {t} for each statement execute function {func}();"
    )
}

fn dead_letter_v1(t: &QualifiedName) -> String {
    format!(
        "create table {t} (
    id uuid primary key,
    aggregatetype text not null,
    aggregateid text not null,
    type text not null,
    payload jsonb,
    headers jsonb,
    created_at timestamptz not null,
    seq bigint not null,
    attempts integer not null,
    last_error text not null,
    failed_at timestamptz not null default now()
);"
    )
}

fn inbox_v1(t: &QualifiedName) -> String {
    let idx = derived_name(&t.table, "_received_at_idx");
    format!(
        "create table {t} (
    consumer text not null,
    message_id text not null,
    received_at timestamptz not null default now(),
    primary key (consumer, message_id)
);
create index {idx} on {t} (received_at);"
    )
}

pub fn migrations(kind: TableKind) -> &'static [Migration] {
    const OUTBOX: &[Migration] = &[Migration {
        version: 1,
        description: "outbox table and NOTIFY trigger",
        render: outbox_v1,
    }];
    const DEAD_LETTER: &[Migration] = &[Migration {
        version: 1,
        description: "dead-letter table",
        render: dead_letter_v1,
    }];
    const INBOX: &[Migration] = &[Migration {
        version: 1,
        description: "inbox table and received_at index",
        render: inbox_v1,
    }];
    match kind {
        TableKind::Outbox => OUTBOX,
        TableKind::DeadLetter => DEAD_LETTER,
        TableKind::Inbox => INBOX,
    }
}

/// A column the contract requires: name and acceptable types (`udt_name` in information_schema).
pub struct ColumnContract {
    pub name: &'static str,
    pub types: &'static [&'static str],
    pub not_null: bool,
}

pub struct Contract {
    pub columns: &'static [ColumnContract],
    /// Columns that must be covered by a primary key or unique constraint, exactly.
    pub unique_key: &'static [&'static str],
}

const fn col(name: &'static str, types: &'static [&'static str], not_null: bool) -> ColumnContract {
    ColumnContract { name, types, not_null }
}

pub fn contract(kind: TableKind) -> &'static Contract {
    match kind {
        TableKind::Outbox => &OUTBOX_CONTRACT,
        TableKind::DeadLetter => &DEAD_LETTER_CONTRACT,
        TableKind::Inbox => &INBOX_CONTRACT,
    }
}

const OUTBOX_CONTRACT: Contract = Contract {
    columns: &[
        col("id", &["uuid"], true),
        col("aggregatetype", &["text", "varchar"], true),
        col("aggregateid", &["text", "varchar"], true),
        col("type", &["text", "varchar"], true),
        col("payload", &["jsonb", "bytea", "json"], false),
        col("headers", &["jsonb"], false),
        col("created_at", &["timestamptz"], true),
        col("seq", &["int8"], true),
        col("txid", &["xid8"], true),
        col("attempts", &["int4"], true),
        col("last_error", &["text"], false),
        col("published_at", &["timestamptz"], false),
    ],
    unique_key: &["id"],
};

const DEAD_LETTER_CONTRACT: Contract = Contract {
    columns: &[
        col("id", &["uuid"], true),
        col("aggregatetype", &["text", "varchar"], true),
        col("aggregateid", &["text", "varchar"], true),
        col("type", &["text", "varchar"], true),
        col("payload", &["jsonb", "bytea", "json"], false),
        col("headers", &["jsonb"], false),
        col("created_at", &["timestamptz"], true),
        col("seq", &["int8"], true),
        col("attempts", &["int4"], true),
        col("last_error", &["text"], true),
        col("failed_at", &["timestamptz"], true),
    ],
    unique_key: &["id"],
};

const INBOX_CONTRACT: Contract = Contract {
    columns: &[
        col("consumer", &["text", "varchar"], true),
        col("message_id", &["text", "varchar"], true),
        col("received_at", &["timestamptz"], true),
    ],
    unique_key: &["consumer", "message_id"],
};

/// A column as the database describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedColumn {
    pub name: String,
    pub udt: String,
    pub not_null: bool,
}

/// Differences between an observed table and the contract, in words a user can act on. Pure.
pub fn compare(kind: TableKind, columns: &[ObservedColumn], unique_keys: &[Vec<String>]) -> Vec<String> {
    let c = contract(kind);
    let mut diffs = Vec::new();
    for want in c.columns {
        match columns.iter().find(|o| o.name == want.name) {
            None => diffs.push(format!("missing column {} ({})", want.name, want.types[0])),
            Some(o) if !want.types.contains(&o.udt.as_str()) => {
                diffs.push(format!("column {} is {}, expected {}", want.name, o.udt, want.types.join(" or ")))
            }
            Some(o) if want.not_null && !o.not_null => diffs.push(format!("column {} allows NULL, expected NOT NULL", want.name)),
            Some(_) => {}
        }
    }
    let mut want_key: Vec<&str> = c.unique_key.to_vec();
    want_key.sort_unstable();
    let has_key = unique_keys.iter().any(|k| {
        let mut k: Vec<&str> = k.iter().map(String::as_str).collect();
        k.sort_unstable();
        k == want_key
    });
    if !has_key {
        diffs.push(format!("no primary key or unique constraint on ({})", c.unique_key.join(", ")));
    }
    diffs
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("table {table} does not match the {kind} contract: {}", .differences.join("; "))]
    Mismatch {
        table: String,
        kind: TableKind,
        differences: Vec<String>,
    },
    #[error("table {table} does not exist and manageSchema is false; create it with the {kind} contract or set manageSchema: true")]
    Missing { table: String, kind: TableKind },
    #[error("migration {version} of {table} was applied with checksum {recorded} but this lockstep has {current}; refusing to continue")]
    Checksum {
        table: String,
        version: i32,
        recorded: String,
        current: String,
    },
    #[error("table {table} has schema version {found}, newer than this lockstep knows ({known}); upgrade lockstep")]
    TooNew { table: String, found: i32, known: i32 },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl SchemaError {
    /// Errors that a retry cannot fix without someone changing something.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, SchemaError::Database(_))
    }
}

/// What a migration run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationOutcome {
    pub version: i32,
    /// Versions applied in this run (empty: nothing changed).
    pub applied: Vec<i32>,
    /// The table existed without history, matched the contract, and was recorded as is.
    pub adopted: bool,
}

/// The advisory lock key migrations of a table run under.
pub fn lock_key(t: &QualifiedName) -> i64 {
    let d = Sha256::digest(format!("lockstep:{}.{}", t.schema.as_str(), t.table.as_str()).as_bytes());
    i64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// Read the table's columns and unique keys; None when the table does not exist.
pub async fn observe(conn: &mut PgConnection, t: &QualifiedName) -> Result<Option<(Vec<ObservedColumn>, Vec<Vec<String>>)>, sqlx::Error> {
    let rows = sqlx::query(
        "select a.attname::text as name, ty.typname::text as udt, a.attnotnull as not_null
         from pg_attribute a
         join pg_class c on c.oid = a.attrelid
         join pg_namespace n on n.oid = c.relnamespace
         join pg_type ty on ty.oid = a.atttypid
         where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p') and a.attnum > 0 and not a.attisdropped
         order by a.attnum",
    )
    .bind(t.schema.as_str())
    .bind(t.table.as_str())
    .fetch_all(&mut *conn)
    .await?;
    if rows.is_empty() {
        let exists: bool = sqlx::query_scalar(
            "select exists (select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = $1 and c.relname = $2)",
        )
        .bind(t.schema.as_str())
        .bind(t.table.as_str())
        .fetch_one(&mut *conn)
        .await?;
        if !exists {
            return Ok(None);
        }
    }
    let columns = rows
        .iter()
        .map(|r| ObservedColumn {
            name: r.get("name"),
            udt: r.get("udt"),
            not_null: r.get("not_null"),
        })
        .collect();
    let keys: Vec<Vec<String>> = sqlx::query_scalar(
        "select array(select a.attname::text from unnest(i.indkey) k join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k)
         from pg_index i
         join pg_class c on c.oid = i.indrelid
         join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = $1 and c.relname = $2 and i.indisunique and i.indpred is null",
    )
    .bind(t.schema.as_str())
    .bind(t.table.as_str())
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some((columns, keys)))
}

/// The schema and the migration history table, created before the first migration of a schema.
pub fn history_ddl(schema: &Ident) -> String {
    let history = QualifiedName {
        schema: schema.clone(),
        table: Ident::parse(HISTORY_TABLE).expect("valid"),
    };
    format!(
        "create schema if not exists {schema};
         create table if not exists {history} (
             table_schema text not null,
             table_name text not null,
             kind text not null,
             version integer not null,
             checksum text not null,
             applied_at timestamptz not null default now(),
             primary key (table_schema, table_name, version)
         );"
    )
}

/// A migration rendered for one table (no function pointers held across awaits).
struct Step {
    version: i32,
    sql: String,
    checksum: String,
}

async fn record(conn: &mut PgConnection, history: &QualifiedName, t: &QualifiedName, kind: TableKind, m: &Step) -> Result<(), sqlx::Error> {
    let sql = format!("insert into {history} (table_schema, table_name, kind, version, checksum) values ($1, $2, $3, $4, $5)");
    sqlx::query(&sql)
        .bind(t.schema.as_str())
        .bind(t.table.as_str())
        .bind(kind.as_str())
        .bind(m.version)
        .bind(&m.checksum)
        .execute(conn)
        .await?;
    Ok(())
}

/// Bring a table to the newest version of its kind (or, with `manage` false, only verify it).
pub async fn migrate(conn: &mut PgConnection, kind: TableKind, t: &QualifiedName, manage: bool) -> Result<MigrationOutcome, SchemaError> {
    let known: Vec<Step> = migrations(kind)
        .iter()
        .map(|m| Step {
            version: m.version,
            sql: (m.render)(t),
            checksum: m.checksum(),
        })
        .collect();
    let latest = known.last().map(|m| m.version).unwrap_or(0);
    let history = QualifiedName {
        schema: t.schema.clone(),
        table: Ident::parse(HISTORY_TABLE).expect("valid"),
    };
    let name = format!("{}.{}", t.schema.as_str(), t.table.as_str());

    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query("select pg_advisory_xact_lock($1)")
        .bind(lock_key(t))
        .execute(&mut *tx)
        .await?;

    if !manage {
        let outcome = match observe(&mut tx, t).boxed().await? {
            None => Err(SchemaError::Missing { table: name, kind }),
            Some((cols, keys)) => {
                let differences = compare(kind, &cols, &keys);
                if differences.is_empty() {
                    Ok(MigrationOutcome {
                        version: latest,
                        applied: vec![],
                        adopted: false,
                    })
                } else {
                    Err(SchemaError::Mismatch {
                        table: name,
                        kind,
                        differences,
                    })
                }
            }
        };
        tx.rollback().await?;
        return outcome;
    }

    let setup_sql = history_ddl(&t.schema);
    sqlx::Executor::execute(&mut *tx, setup_sql.as_str()).await?;

    let history_sql = format!("select version, checksum from {history} where table_schema = $1 and table_name = $2 order by version");
    let recorded: Vec<(i32, String)> = sqlx::query_as(&history_sql)
        .bind(t.schema.as_str())
        .bind(t.table.as_str())
        .fetch_all(&mut *tx)
        .await?;

    let observed = observe(&mut tx, t).boxed().await?;
    let mut applied = Vec::new();
    let mut adopted = false;

    if recorded.is_empty() {
        match observed {
            Some((cols, keys)) => {
                // Someone else's table: adopt it only if it already satisfies the contract.
                let differences = compare(kind, &cols, &keys);
                if !differences.is_empty() {
                    tx.rollback().await?;
                    return Err(SchemaError::Mismatch {
                        table: name,
                        kind,
                        differences,
                    });
                }
                for m in &known {
                    record(&mut tx, &history, t, kind, m).boxed().await?;
                }
                adopted = true;
            }
            None => {
                for m in &known {
                    sqlx::Executor::execute(&mut *tx, m.sql.as_str()).await?;
                    record(&mut tx, &history, t, kind, m).boxed().await?;
                    applied.push(m.version);
                }
            }
        }
    } else {
        for (version, checksum) in &recorded {
            match known.iter().find(|m| m.version == *version) {
                None => {
                    tx.rollback().await?;
                    return Err(SchemaError::TooNew {
                        table: name,
                        found: *version,
                        known: latest,
                    });
                }
                Some(m) if m.checksum != *checksum => {
                    tx.rollback().await?;
                    return Err(SchemaError::Checksum {
                        table: name,
                        version: *version,
                        recorded: checksum.clone(),
                        current: m.checksum.clone(),
                    });
                }
                Some(_) => {}
            }
        }
        let current = recorded.last().map(|r| r.0).unwrap_or(0);
        // Collected first: an iterator adapter holding a closure must not live across an await.
        let pending: Vec<&Step> = known.iter().filter(|m| m.version > current).collect();
        for m in pending {
            sqlx::Executor::execute(&mut *tx, m.sql.as_str()).await?;
            record(&mut tx, &history, t, kind, m).boxed().await?;
            applied.push(m.version);
        }
        // The history says the table is ours; it must still match (someone may have altered it).
        let (cols, keys) = match observe(&mut tx, t).boxed().await? {
            Some(o) => o,
            None => {
                tx.rollback().await?;
                return Err(SchemaError::Mismatch {
                    table: name,
                    kind,
                    differences: vec!["the table was dropped after lockstep created it".into()],
                });
            }
        };
        let differences = compare(kind, &cols, &keys);
        if !differences.is_empty() {
            tx.rollback().await?;
            return Err(SchemaError::Mismatch {
                table: name,
                kind,
                differences,
            });
        }
    }
    tx.commit().await?;
    Ok(MigrationOutcome {
        version: latest,
        applied,
        adopted,
    })
}

/// Compile-time guard: the migration future must stay Send (controllers run it on tokio's pool).
/// `sqlx::raw_sql(..).execute(&mut *tx)` broke this (rust-lang/rust#100013); `Executor::execute`
/// with a `&str` runs the same simple-protocol, multi-statement query without that problem.
#[allow(dead_code)]
fn assert_migrate_is_send(conn: &mut PgConnection, t: &QualifiedName) {
    fn is_send<T: Send>(_: T) {}
    is_send(migrate(conn, TableKind::Inbox, t, true));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str, t: &str) -> QualifiedName {
        QualifiedName {
            schema: Ident::parse(s).unwrap(),
            table: Ident::parse(t).unwrap(),
        }
    }

    fn cols(spec: &[(&str, &str, bool)]) -> Vec<ObservedColumn> {
        spec.iter()
            .map(|(n, u, nn)| ObservedColumn {
                name: n.to_string(),
                udt: u.to_string(),
                not_null: *nn,
            })
            .collect()
    }

    #[test]
    fn inbox_contract_differences_are_precise() {
        let ok = cols(&[
            ("consumer", "text", true),
            ("message_id", "text", true),
            ("received_at", "timestamptz", true),
        ]);
        let key = vec![vec!["consumer".to_string(), "message_id".to_string()]];
        assert!(compare(TableKind::Inbox, &ok, &key).is_empty());
        let bad = cols(&[("consumer", "text", true), ("message_id", "int4", true), ("extra", "text", false)]);
        let d = compare(TableKind::Inbox, &bad, &[vec!["message_id".into()]]);
        assert_eq!(
            d,
            vec![
                "column message_id is int4, expected text or varchar",
                "missing column received_at (timestamptz)",
                "no primary key or unique constraint on (consumer, message_id)"
            ]
        );
        let nullable = cols(&[
            ("consumer", "text", true),
            ("message_id", "text", false),
            ("received_at", "timestamptz", true),
        ]);
        assert_eq!(
            compare(TableKind::Inbox, &nullable, &key),
            vec!["column message_id allows NULL, expected NOT NULL"]
        );
    }

    #[test]
    fn rendered_sql_uses_quoted_identifiers_only() {
        let sql = inbox_v1(&q("billing", "inbox"));
        assert!(sql.contains(r#"create table "billing"."inbox""#));
        assert!(sql.contains(r#"create index "inbox_received_at_idx" on "billing"."inbox""#));
        let sql = outbox_v1(&q("public", "outbox"));
        assert!(sql.contains(r#"create trigger "outbox_notify_trg" after insert on "public"."outbox""#));
    }

    #[test]
    fn checksums_do_not_depend_on_the_table() {
        for kind in [TableKind::Outbox, TableKind::DeadLetter, TableKind::Inbox] {
            let m = &migrations(kind)[0];
            assert_eq!(m.checksum().len(), 64);
            assert_eq!(m.checksum(), m.checksum());
        }
        assert_ne!(
            migrations(TableKind::Outbox)[0].checksum(),
            migrations(TableKind::Inbox)[0].checksum()
        );
    }

    #[test]
    fn derived_names_fit() {
        let long = Ident::parse(&"t".repeat(63)).unwrap();
        let a = derived_name(&long, "_received_at_idx");
        assert!(a.as_str().len() <= 63 && a.as_str().ends_with("_received_at_idx"));
        let other = Ident::parse(&format!("{}u", "t".repeat(62))).unwrap();
        assert_ne!(a, derived_name(&other, "_received_at_idx"));
        assert_eq!(derived_name(&Ident::parse("inbox").unwrap(), "_x").as_str(), "inbox_x");
    }
}
