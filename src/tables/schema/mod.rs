//! Table migrations for the outbox, dead-letter and inbox tables.
//!
//! SQL is rendered only from validated [`Ident`]s. Migrations run in one transaction under an
//! advisory lock keyed by the table, are recorded with checksums in `lockstep_schema_history` (in
//! the table's schema), are idempotent, and never drop or rewrite data. A table that exists without
//! history is verified against the contract; a mismatch is reported and the table left alone.
//! What the tables look like (DDL, contracts, derived names) is in `tables.rs`.

pub mod buckets;
mod contract;
mod drop;
mod outbox;
mod owners;
mod settled;
mod tables;
mod wiring;

use futures::FutureExt;
use sqlx::{PgConnection, Row};

pub use self::drop::{drop_ddl, drop_tables, table_exists};
pub use self::outbox::{describe_outbox, ensure_published_indexes, index_valid, prepare_outbox, published_indexes, OutboxTables};
pub use self::owners::{claim, holder, owners_table, take_over, Claimed, Owner, OWNERS_TABLE};
#[cfg(test)]
pub(crate) use self::tables::qualified;
pub use self::{
    contract::{compare, contract, ColumnContract, Contract, ObservedColumn},
    tables::{derived_name, migrations, notify_channel, Migration, PayloadColumn, TableKind},
};
use crate::core::sql::{advisory_key, Ident, QualifiedName};

pub const HISTORY_TABLE: &str = "lockstep_schema_history";

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
    advisory_key(&format!("lockstep:{}.{}", t.schema.as_str(), t.table.as_str()))
}

/// Taken before a table's lock: the first migrations of two tables in one schema both create the
/// schema and its history table, and `create ... if not exists` races.
pub fn schema_lock_key(schema: &Ident) -> i64 {
    advisory_key(&format!("lockstep-schema:{}", schema.as_str()))
}

/// A migration waits at most this long for a lock (another migration, a long transaction on the
/// table) and runs at most [`STATEMENT_TIMEOUT`]: a reconcile must not block forever.
pub const LOCK_TIMEOUT: &str = "15s";
pub const STATEMENT_TIMEOUT: &str = "120s";

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
        let exists = drop::in_catalog(conn, t.schema.as_str(), t.table.as_str()).await?;
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
    description: &'static str,
    sql: String,
    checksum: String,
}

/// Everything a migration run of one table needs, rendered before the transaction starts.
struct Plan<'a> {
    kind: TableKind,
    table: &'a QualifiedName,
    /// `schema.table`, for messages.
    name: String,
    history: QualifiedName,
    steps: Vec<Step>,
    latest: i32,
}

impl<'a> Plan<'a> {
    fn new(kind: TableKind, table: &'a QualifiedName) -> Self {
        let steps: Vec<Step> = migrations(kind)
            .iter()
            .map(|m| Step {
                version: m.version,
                description: m.description,
                sql: (m.render)(table),
                checksum: m.checksum(),
            })
            .collect();
        Plan {
            kind,
            table,
            name: format!("{}.{}", table.schema.as_str(), table.table.as_str()),
            history: QualifiedName {
                schema: table.schema.clone(),
                table: Ident::parse(HISTORY_TABLE).expect("valid"),
            },
            latest: steps.last().map(|m| m.version).unwrap_or(0),
            steps,
        }
    }

    fn outcome(&self) -> MigrationOutcome {
        MigrationOutcome {
            version: self.latest,
            applied: vec![],
            adopted: false,
        }
    }

    fn mismatch(&self, differences: Vec<String>) -> SchemaError {
        SchemaError::Mismatch {
            table: self.name.clone(),
            kind: self.kind,
            differences,
        }
    }

    /// An outbox not made by lockstep must also be wired as the relay needs.
    async fn check_wiring(&self, conn: &mut PgConnection) -> Result<(), SchemaError> {
        if self.kind != TableKind::Outbox {
            return Ok(());
        }
        let differences = wiring::outbox_wiring(conn, self.table).await?;
        if differences.is_empty() {
            Ok(())
        } else {
            Err(self.mismatch(differences))
        }
    }

    /// The observed table against the contract.
    fn check(&self, (cols, keys): &(Vec<ObservedColumn>, Vec<Vec<String>>)) -> Result<(), SchemaError> {
        let differences = compare(self.kind, cols, keys);
        if differences.is_empty() {
            Ok(())
        } else {
            Err(self.mismatch(differences))
        }
    }

    /// The recorded history against the known migrations: every version known, every checksum equal.
    fn check_history(&self, recorded: &[(i32, String)]) -> Result<(), SchemaError> {
        for (version, checksum) in recorded {
            match self.steps.iter().find(|m| m.version == *version) {
                None => {
                    return Err(SchemaError::TooNew {
                        table: self.name.clone(),
                        found: *version,
                        known: self.latest,
                    })
                }
                Some(m) if m.checksum != *checksum => {
                    return Err(SchemaError::Checksum {
                        table: self.name.clone(),
                        version: *version,
                        recorded: checksum.clone(),
                        current: m.checksum.clone(),
                    })
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    async fn record(&self, conn: &mut PgConnection, m: &Step) -> Result<(), sqlx::Error> {
        let history = &self.history;
        let sql = format!("insert into {history} (table_schema, table_name, kind, version, checksum) values ($1, $2, $3, $4, $5)");
        sqlx::query(&sql)
            .bind(self.table.schema.as_str())
            .bind(self.table.table.as_str())
            .bind(self.kind.as_str())
            .bind(m.version)
            .bind(&m.checksum)
            .execute(conn)
            .await?;
        Ok(())
    }

    async fn run_step(&self, conn: &mut PgConnection, m: &Step) -> Result<(), sqlx::Error> {
        tracing::info!(table = %self.name, version = m.version, description = m.description, "applying migration");
        sqlx::Executor::execute(&mut *conn, m.sql.as_str()).await?;
        self.record(conn, m).boxed().await
    }
}

/// Bring a table to the newest version of its kind (or, with `manage` false, only verify it).
pub async fn migrate(conn: &mut PgConnection, kind: TableKind, t: &QualifiedName, manage: bool) -> Result<MigrationOutcome, SchemaError> {
    let plan = Plan::new(kind, t);
    if let Ok(Some(outcome)) = settled::settled(conn, &plan, manage).boxed().await {
        return Ok(outcome);
    }
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let limits = format!("set local lock_timeout = '{LOCK_TIMEOUT}'; set local statement_timeout = '{STATEMENT_TIMEOUT}'");
    sqlx::Executor::execute(&mut *tx, limits.as_str()).await?;
    for key in [schema_lock_key(&t.schema), lock_key(t)] {
        sqlx::query("select pg_advisory_xact_lock($1)").bind(key).execute(&mut *tx).await?;
    }
    let result = if manage {
        apply(&mut tx, &plan).boxed().await
    } else {
        verify(&mut tx, &plan).boxed().await
    };
    match result {
        // Dropping the transaction rolls it back.
        Err(e @ SchemaError::Database(_)) => Err(e),
        Ok(outcome) if manage => {
            tx.commit().await?;
            Ok(outcome)
        }
        other => {
            tx.rollback().await?;
            other
        }
    }
}

/// manageSchema false: the table must exist and match the contract; nothing is written.
async fn verify(conn: &mut PgConnection, p: &Plan<'_>) -> Result<MigrationOutcome, SchemaError> {
    match observe(conn, p.table).boxed().await? {
        None => Err(SchemaError::Missing {
            table: p.name.clone(),
            kind: p.kind,
        }),
        Some(observed) => {
            p.check(&observed)?;
            p.check_wiring(conn).boxed().await?;
            Ok(p.outcome())
        }
    }
}

/// Apply what the history lacks; adopt a table that exists without history if it matches.
async fn apply(conn: &mut PgConnection, p: &Plan<'_>) -> Result<MigrationOutcome, SchemaError> {
    let setup_sql = history_ddl(&p.table.schema);
    sqlx::Executor::execute(&mut *conn, setup_sql.as_str()).await?;

    let history = &p.history;
    let history_sql = format!("select version, checksum from {history} where table_schema = $1 and table_name = $2 order by version");
    let recorded: Vec<(i32, String)> = sqlx::query_as(&history_sql)
        .bind(p.table.schema.as_str())
        .bind(p.table.table.as_str())
        .fetch_all(&mut *conn)
        .await?;

    let mut outcome = p.outcome();
    let current = if recorded.is_empty() {
        match observe(conn, p.table).boxed().await? {
            Some(observed) => {
                // Someone else's table: adopt it only if it already satisfies the contract, which
                // is version 1's; it is recorded as that, and later versions apply below.
                p.check(&observed)?;
                if p.kind == TableKind::Outbox {
                    if let Some(d) = wiring::add_notify_trigger(conn, p.table).await? {
                        return Err(p.mismatch(vec![d]));
                    }
                }
                p.check_wiring(conn).boxed().await?;
                p.record(conn, &p.steps[0]).boxed().await?;
                outcome.adopted = true;
                p.steps[0].version
            }
            None => {
                if p.kind == TableKind::Outbox {
                    if let Some(d) = wiring::function_in_the_way(conn, p.table).await? {
                        return Err(p.mismatch(vec![d]));
                    }
                }
                for m in &p.steps {
                    p.run_step(conn, m).boxed().await?;
                    outcome.applied.push(m.version);
                }
                return Ok(outcome);
            }
        }
    } else {
        p.check_history(&recorded)?;
        recorded.last().map(|r| r.0).unwrap_or(0)
    };
    // Collected first: an iterator adapter holding a closure must not live across an await.
    let pending: Vec<&Step> = p.steps.iter().filter(|m| m.version > current).collect();
    for m in pending {
        p.run_step(conn, m).boxed().await?;
        outcome.applied.push(m.version);
    }
    // The history says the table is ours; it must still match (someone may have altered it).
    match observe(conn, p.table).boxed().await? {
        Some(observed) => p.check(&observed)?,
        None => return Err(p.mismatch(vec!["the table was dropped after lockstep created it".into()])),
    }
    Ok(outcome)
}

/// Compile-time guard: the migration future must stay Send (controllers run it on tokio's pool).
/// `sqlx::raw_sql(..).execute(&mut *tx)` broke this (rust-lang/rust#100013); `Executor::execute`
/// with a `&str` runs the same simple-protocol, multi-statement query without that problem.
#[allow(dead_code)]
fn assert_migrate_is_send(conn: &mut PgConnection, t: &QualifiedName) {
    fn is_send<T: Send>(_: T) {}
    is_send(migrate(conn, TableKind::Inbox, t, true));
    is_send(prepare_outbox(conn, t, t, true));
}

#[cfg(test)]
mod tests {
    use super::{qualified as q, *};

    #[test]
    fn lock_key_is_exact() {
        assert_eq!(lock_key(&q("public", "outbox")), -767470055278674281);
        assert_eq!(lock_key(&q("billing", "orders_outbox")), -5532591153421518849);
    }

    fn plan_with_history(recorded: &[(i32, &str)]) -> Result<(), SchemaError> {
        let t = q("public", "outbox");
        let recorded: Vec<(i32, String)> = recorded.iter().map(|(v, c)| (*v, c.to_string())).collect();
        Plan::new(TableKind::Outbox, &t).check_history(&recorded)
    }

    #[test]
    fn history_must_match_the_known_migrations() {
        let current = migrations(TableKind::Outbox)[0].checksum();
        assert!(plan_with_history(&[(1, &current)]).is_ok());
        assert!(matches!(
            plan_with_history(&[(1, "abc")]),
            Err(SchemaError::Checksum { version: 1, ref recorded, .. }) if recorded == "abc"
        ));
        assert!(matches!(
            plan_with_history(&[(1, &current), (3, "x")]),
            Err(SchemaError::TooNew { found: 3, known: 2, .. })
        ));
    }

    #[test]
    fn plan_renders_every_step_for_the_table() {
        let t = q("billing", "orders_outbox");
        let p = Plan::new(TableKind::Outbox, &t);
        assert_eq!((p.name.as_str(), p.latest, p.steps.len()), ("billing.orders_outbox", 2, 2));
        assert_eq!(p.history.to_string(), r#""billing"."lockstep_schema_history""#);
        assert!(p.steps[0].sql.starts_with(r#"create table "billing"."orders_outbox" ("#));
        assert_eq!(p.steps[0].checksum, migrations(TableKind::Outbox)[0].checksum());
    }
}
