//! What lockstep's tables look like: the versioned DDL of each kind and the names derived from a
//! table (trigger, function, index, NOTIFY channel); the contract an existing table must satisfy
//! is `contract.rs`. Pure: no connection.

use std::fmt;

use crate::core::sql::{quote_literal, sha256_hex, Ident, QualifiedName};

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
    /// For the log line when the step is applied; not part of the checksum or the history.
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
        sha256_hex(&(self.render)(&canonical))
    }
}

/// A name derived from a table name (index, trigger, function), kept within 63 characters:
/// long names are shortened and given a hash so two tables never share one.
pub fn derived_name(table: &Ident, suffix: &str) -> Ident {
    let full = format!("{}{suffix}", table.as_str());
    if let Ok(id) = Ident::parse(&full) {
        return id;
    }
    let h = sha256_hex(&full);
    let keep = crate::core::sql::MAX_IDENT_LEN - suffix.len() - 9;
    Ident::parse(&format!("{}_{}{suffix}", &table.as_str()[..keep], &h[..8])).expect("derived name is a valid identifier")
}

/// The NOTIFY channel the outbox trigger signals and the relay listens on.
pub fn notify_channel(t: &QualifiedName) -> String {
    let h = sha256_hex(&format!("{}.{}", t.schema.as_str(), t.table.as_str()));
    format!("lockstep_outbox_{}", &h[..16])
}

/// The event columns both the outbox and the dead-letter table start with.
const EVENT_DDL: &str = "    id uuid primary key,
    aggregatetype text not null,
    aggregateid text not null,
    type text not null,
    payload jsonb,
    headers jsonb,";

fn outbox_v1(t: &QualifiedName) -> String {
    format!(
        "create table {t} (
{EVENT_DDL}
    created_at timestamptz not null default now(),
    seq bigint generated always as identity unique,
    txid xid8 not null default pg_current_xact_id(),
    attempts integer not null default 0,
    last_error text,
    published_at timestamptz
);
{}",
        notify_trigger_ddl(t)
    )
}

/// The function and trigger that NOTIFY the relay after each insert into the outbox.
pub fn notify_trigger_ddl(t: &QualifiedName) -> String {
    let func = QualifiedName {
        schema: t.schema.clone(),
        table: derived_name(&t.table, "_notify"),
    };
    let trigger = derived_name(&t.table, "_notify_trg");
    let channel = quote_literal(&notify_channel(t));
    format!(
        "create or replace function {func}() returns trigger language plpgsql as $$
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
{EVENT_DDL}
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

/// Version 2 of the outbox and dead-letter tables: the optional `traceparent` column (W3C Trace
/// Context), which the relay sends as the `traceparent` header and a quarantine keeps. Nullable
/// without a default, so PostgreSQL changes only its catalog and rewrites no row; the ACCESS
/// EXCLUSIVE lock it takes for that instant queues the writers behind it while it waits for one,
/// so it waits briefly and is retried rather than holding them up to the migration's 15 s.
fn traceparent_v2(t: &QualifiedName) -> String {
    format!("set local lock_timeout = '2s';\nalter table {t} add column if not exists traceparent text;")
}

const TRACEPARENT_V2: Migration = Migration {
    version: 2,
    description: "traceparent column",
    render: traceparent_v2,
};

pub fn migrations(kind: TableKind) -> &'static [Migration] {
    const OUTBOX: &[Migration] = &[
        Migration {
            version: 1,
            description: "outbox table and NOTIFY trigger",
            render: outbox_v1,
        },
        TRACEPARENT_V2,
    ];
    const DEAD_LETTER: &[Migration] = &[
        Migration {
            version: 1,
            description: "dead-letter table",
            render: dead_letter_v1,
        },
        TRACEPARENT_V2,
    ];
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

/// How an outbox stores payloads; the contract allows jsonb, json and bytea.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadColumn {
    /// jsonb or json: published as its UTF-8 text.
    Json,
    /// Published byte for byte.
    Bytea,
}

impl PayloadColumn {
    /// From the column's type name (`udt_name`); anything but bytea is read as text.
    pub fn from_type_name(udt: Option<&str>) -> Self {
        if udt == Some("bytea") {
            PayloadColumn::Bytea
        } else {
            PayloadColumn::Json
        }
    }
}

/// `schema.table` from names known to be valid, for tests.
#[cfg(test)]
pub(crate) fn qualified(schema: &str, table: &str) -> QualifiedName {
    QualifiedName {
        schema: Ident::parse(schema).unwrap(),
        table: Ident::parse(table).unwrap(),
    }
}

#[cfg(test)]
mod tests {
    use super::{qualified as q, *};

    #[test]
    fn rendered_sql_uses_quoted_identifiers_only() {
        let sql = inbox_v1(&q("billing", "inbox"));
        assert!(sql.contains(r#"create table "billing"."inbox""#));
        assert!(sql.contains(r#"create index "inbox_received_at_idx" on "billing"."inbox""#));
        let sql = outbox_v1(&q("public", "outbox"));
        assert!(sql.contains(r#"create trigger "outbox_notify_trg" after insert on "public"."outbox""#));
        assert!(dead_letter_v1(&q("public", "outbox_dead_letter"))
            .starts_with("create table \"public\".\"outbox_dead_letter\" (\n    id uuid primary key,\n"));
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

    #[test]
    fn notify_channel_is_exact() {
        assert_eq!(notify_channel(&q("public", "outbox")), "lockstep_outbox_bbcbd30709eeccfa");
    }

    #[test]
    fn payload_column_from_type_name() {
        assert_eq!(PayloadColumn::from_type_name(Some("bytea")), PayloadColumn::Bytea);
        for other in [Some("jsonb"), Some("json"), None] {
            assert_eq!(PayloadColumn::from_type_name(other), PayloadColumn::Json);
        }
    }
}
