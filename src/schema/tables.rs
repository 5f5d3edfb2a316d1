//! What lockstep's tables look like: the versioned DDL of each kind, the contract an existing
//! table must satisfy, and the names derived from a table (trigger, function, index, NOTIFY
//! channel). Pure: no connection.

use std::fmt;

use crate::sql::{quote_literal, sha256_hex, Ident, QualifiedName};

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
    let keep = crate::sql::MAX_IDENT_LEN - suffix.len() - 9;
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

/// A column the contract requires: name and acceptable types (`udt_name` in information_schema).
pub struct ColumnContract {
    pub name: &'static str,
    pub types: &'static [&'static str],
    pub not_null: bool,
}

pub struct Contract {
    /// The event columns, where the table holds events (outbox, dead-letter); checked first.
    pub shared: &'static [ColumnContract],
    /// The table's own columns.
    pub own: &'static [ColumnContract],
    /// Columns that must be covered by a primary key or unique constraint, exactly.
    pub unique_key: &'static [&'static str],
}

impl Contract {
    pub fn columns(&self) -> impl Iterator<Item = &ColumnContract> {
        self.shared.iter().chain(self.own)
    }
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

const EVENT_COLUMNS: &[ColumnContract] = &[
    col("id", &["uuid"], true),
    col("aggregatetype", &["text", "varchar"], true),
    col("aggregateid", &["text", "varchar"], true),
    col("type", &["text", "varchar"], true),
    col("payload", &["jsonb", "bytea", "json"], false),
    col("headers", &["jsonb"], false),
    col("created_at", &["timestamptz"], true),
    col("seq", &["int8"], true),
];

/// A table of events keyed by id: the outbox or its dead-letter table.
const fn event_table(own: &'static [ColumnContract]) -> Contract {
    Contract {
        shared: EVENT_COLUMNS,
        own,
        unique_key: &["id"],
    }
}

const OUTBOX_CONTRACT: Contract = event_table(&[
    col("txid", &["xid8"], true),
    col("attempts", &["int4"], true),
    col("last_error", &["text"], false),
    col("published_at", &["timestamptz"], false),
]);

// Every dead-letter row says why it is there.
const DEAD_LETTER_CONTRACT: Contract = event_table(&[
    col("attempts", &["int4"], true),
    col("last_error", &["text"], true),
    col("failed_at", &["timestamptz"], true),
]);

const INBOX_CONTRACT: Contract = Contract {
    shared: &[],
    own: &[
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
    for want in c.columns() {
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

    fn names(kind: TableKind) -> Vec<&'static str> {
        contract(kind).columns().map(|c| c.name).collect()
    }

    #[test]
    fn outbox_and_dead_letter_contracts_list_every_column_in_table_order() {
        let event = [
            "id",
            "aggregatetype",
            "aggregateid",
            "type",
            "payload",
            "headers",
            "created_at",
            "seq",
        ];
        let outbox = [&event[..], &["txid", "attempts", "last_error", "published_at"]].concat();
        let dead_letter = [&event[..], &["attempts", "last_error", "failed_at"]].concat();
        assert_eq!(names(TableKind::Outbox), outbox);
        assert_eq!(names(TableKind::DeadLetter), dead_letter);
        assert_eq!(names(TableKind::Inbox), ["consumer", "message_id", "received_at"]);
        let last_error_required = |k| contract(k).columns().find(|c| c.name == "last_error").unwrap().not_null;
        assert!(!last_error_required(TableKind::Outbox));
        assert!(last_error_required(TableKind::DeadLetter));
    }

    /// A table exactly as the contract describes it (the first type of each column).
    fn as_contracted(kind: TableKind) -> Vec<ObservedColumn> {
        contract(kind)
            .columns()
            .map(|c| ObservedColumn {
                name: c.name.into(),
                udt: c.types[0].into(),
                not_null: c.not_null,
            })
            .collect()
    }

    #[test]
    fn dead_letter_rows_need_an_error_and_a_failure_time() {
        let id = [vec!["id".to_string()]];
        for kind in [TableKind::Outbox, TableKind::DeadLetter] {
            assert!(compare(kind, &as_contracted(kind), &id).is_empty(), "{kind}");
        }
        let outbox = as_contracted(TableKind::Outbox);
        assert_eq!(
            compare(TableKind::DeadLetter, &outbox, &id),
            vec![
                "column last_error allows NULL, expected NOT NULL",
                "missing column failed_at (timestamptz)"
            ]
        );
    }

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
