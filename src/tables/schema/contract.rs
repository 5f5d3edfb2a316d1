//! The contract an existing table must satisfy: the columns each kind needs, their types, and
//! the unique key; and the differences of an observed table from it, in words. Pure.

use super::TableKind;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
