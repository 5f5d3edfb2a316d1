//! The privileges lockstep uses on a database, per resource and manageSchema, read off the
//! statements it runs (schema/, relay/, purge.rs), and the verdict on what a role lacks. Pure.
//!
//! PostgreSQL checks CREATE on the database for `create schema if not exists` and CREATE on
//! the schema for `create table if not exists` even when the object exists, and every migration
//! runs both (schema::history_ddl, schema::owners_ddl): so manageSchema true needs them always.

use std::collections::BTreeSet;

use super::{database::Target, database::TargetKind, Check};
use crate::core::sql::{quote_literal, QualifiedName};

/// What a privilege is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    /// The database the URL names.
    Database,
    Schema(String),
    Table(QualifiedName),
    /// A function by signature, e.g. `pg_try_advisory_lock(bigint)`.
    Function(&'static str),
}

impl Object {
    /// How a GRANT names it.
    fn grant_target(&self, database: &str) -> String {
        match self {
            Object::Database => format!("database {}", quote_ident(database)),
            Object::Schema(s) => format!("schema {}", quote_ident(s)),
            Object::Table(t) => format!("table {t}"),
            Object::Function(f) => format!("function {f}"),
        }
    }

    fn describe(&self, database: &str) -> String {
        match self {
            Object::Database => format!("database {database}"),
            Object::Schema(s) => format!("schema {s}"),
            Object::Table(t) => format!("table {}.{}", t.schema.as_str(), t.table.as_str()),
            Object::Function(f) => format!("function {f}"),
        }
    }

    /// The `has_*_privilege` call that answers for `privilege` (a literal, from this module).
    pub fn probe_sql(&self, privilege: &str) -> String {
        let p = quote_literal(privilege);
        match self {
            Object::Database => format!("select has_database_privilege(current_database(), {p})"),
            Object::Schema(s) => format!("select has_schema_privilege({}, {p})", quote_literal(s)),
            // By oid: a name would be resolved first, which fails without USAGE on the schema
            // (reported on the schema's own line).
            Object::Table(t) => format!(
                "select has_table_privilege((select c.oid from pg_class c join pg_namespace n on n.oid = c.relnamespace \
                 where n.nspname = {} and c.relname = {}), {p})",
                quote_literal(t.schema.as_str()),
                quote_literal(t.table.as_str())
            ),
            Object::Function(f) => format!("select has_function_privilege({}, {p})", quote_literal(f)),
        }
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Privileges lockstep uses on one object, and what for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub object: Object,
    pub privileges: &'static [&'static str],
    pub why: &'static str,
}

/// What exists already: the schema, and which of the tables lockstep touches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    pub schema_exists: bool,
    /// Table names (in the target's schema) that exist.
    pub tables: BTreeSet<String>,
}

impl Layout {
    fn has(&self, t: &QualifiedName) -> bool {
        self.schema_exists && self.tables.contains(t.table.as_str())
    }
}

fn in_schema(t: &Target, name: &str) -> QualifiedName {
    QualifiedName {
        schema: t.table.schema.clone(),
        table: crate::core::sql::Ident::parse(name).expect("a valid identifier"),
    }
}

/// The privileges `t` needs given what exists. Tables lockstep will create are its role's own
/// and need nothing more; tables that exist may belong to another role.
pub fn needs(t: &Target, layout: &Layout) -> Vec<Need> {
    let schema = t.table.schema.as_str().to_owned();
    let history = in_schema(t, crate::tables::schema::HISTORY_TABLE);
    let owners = in_schema(t, crate::tables::schema::OWNERS_TABLE);
    let table = |q: &QualifiedName, privileges: &'static [&'static str], why: &'static str| Need {
        object: Object::Table(q.clone()),
        privileges,
        why,
    };
    let mut out = Vec::new();
    if t.manage {
        out.push(Need {
            object: Object::Database,
            privileges: &["CREATE"],
            why: "every migration runs `create schema if not exists` (manageSchema true)",
        });
    }
    if layout.schema_exists {
        let privileges: &'static [&'static str] = if t.manage { &["USAGE", "CREATE"] } else { &["USAGE"] };
        out.push(Need {
            object: Object::Schema(schema),
            privileges,
            why: if t.manage {
                "the tables, the NOTIFY trigger function, lockstep_schema_history and lockstep_owners are created there"
            } else {
                "the tables are read and written there"
            },
        });
    }
    if t.manage && layout.has(&history) {
        out.push(table(
            &history,
            &["SELECT", "INSERT"],
            "migrations read and record their history there",
        ));
    }
    if layout.has(&owners) {
        let (privileges, why): (&'static [&'static str], _) = if t.manage {
            (&["SELECT", "INSERT", "UPDATE"], "the object managing the table is recorded there")
        } else {
            (&["SELECT"], "the object managing the table is read there")
        };
        out.push(table(&owners, privileges, why));
    }
    out.extend(table_needs(t, layout));
    out.push(Need {
        object: Object::Function("pg_advisory_xact_lock(bigint)"),
        privileges: &["EXECUTE"],
        why: "migrations and verification run under the table's lock",
    });
    out
}

/// What the resource itself does with its tables (beyond migrations).
fn table_needs(t: &Target, layout: &Layout) -> Vec<Need> {
    let table = |q: &QualifiedName, privileges: &'static [&'static str], why: &'static str| Need {
        object: Object::Table(q.clone()),
        privileges,
        why,
    };
    let mut out = Vec::new();
    match t.kind {
        TargetKind::OutboxRelay => {
            if layout.has(&t.table) {
                out.push(table(
                    &t.table,
                    &["SELECT", "UPDATE", "DELETE"],
                    "the relay reads rows, counts attempts, deletes or marks published rows",
                ));
            }
            if let Some(dl) = t.dead_letter.as_ref().filter(|dl| layout.has(dl)) {
                out.push(table(
                    dl,
                    &["SELECT", "INSERT", "UPDATE"],
                    "the relay quarantines failing events (insert ... on conflict do update); the operator counts them",
                ));
            }
            out.push(Need {
                object: Object::Function("pg_try_advisory_lock(bigint)"),
                privileges: &["EXECUTE"],
                why: "one relay at a time holds the outbox's lock",
            });
        }
        TargetKind::InboxTable => {
            if layout.has(&t.table) {
                out.push(table(
                    &t.table,
                    &["SELECT", "DELETE"],
                    "the operator purges rows past retention and measures the table",
                ));
            }
        }
    }
    out
}

/// One check per object: PASS when the role has every privilege, FAIL naming the missing ones
/// and the GRANT that gives them. `missing` is what the probes found lacking.
pub fn verdict(need: &Need, missing: &[&str], role: &str, database: &str) -> Check {
    let name = format!("privileges on {}", need.object.describe(database));
    if missing.is_empty() {
        return Check::pass(name, format!("{} ({})", need.privileges.join(", "), need.why));
    }
    let grant = format!(
        "grant {} on {} to {}",
        missing.join(", ").to_lowercase(),
        need.object.grant_target(database),
        quote_ident(role)
    );
    Check::fail(
        name,
        format!("role {role} lacks {}: {}", missing.join(", "), need.why),
        format!("as the object's owner or a superuser: {grant}"),
    )
}

/// The tables themselves: with manageSchema false they must exist; otherwise they are created.
pub fn presence(t: &Target, layout: &Layout) -> Vec<Check> {
    let mut tables = vec![&t.table];
    tables.extend(t.dead_letter.as_ref());
    tables
        .into_iter()
        .map(|q| {
            let name = format!("table {}.{}", q.schema.as_str(), q.table.as_str());
            match (layout.has(q), t.manage) {
                (true, _) => Check::pass(name, "exists (its columns are verified when lockstep starts)"),
                (false, true) => Check::pass(name, "does not exist yet: lockstep creates it (manageSchema true)"),
                (false, false) => Check::fail(
                    name,
                    "does not exist and manageSchema is false",
                    "create it with lockstep's contract (docs: manageSchema false), or set manageSchema true",
                ),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Verdict;

    fn target(kind: TargetKind, manage: bool) -> Target {
        let q = |t: &str| QualifiedName {
            schema: crate::core::sql::Ident::parse("billing").unwrap(),
            table: crate::core::sql::Ident::parse(t).unwrap(),
        };
        Target {
            kind,
            table: q(if kind == TargetKind::OutboxRelay { "outbox" } else { "inbox" }),
            dead_letter: (kind == TargetKind::OutboxRelay).then(|| q("outbox_dead_letter")),
            manage,
        }
    }

    fn layout(tables: &[&str]) -> Layout {
        Layout {
            schema_exists: true,
            tables: tables.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn listed(needs: &[Need]) -> Vec<String> {
        let db = "app";
        needs
            .iter()
            .map(|n| format!("{} {}", n.object.describe(db), n.privileges.join(",")))
            .collect()
    }

    #[test]
    fn managed_outbox_on_an_empty_schema_needs_create_on_database_and_schema() {
        let n = needs(&target(TargetKind::OutboxRelay, true), &layout(&[]));
        assert_eq!(
            listed(&n),
            [
                "database app CREATE",
                "schema billing USAGE,CREATE",
                "function pg_try_advisory_lock(bigint) EXECUTE",
                "function pg_advisory_xact_lock(bigint) EXECUTE"
            ]
        );
    }

    #[test]
    fn unmanaged_outbox_needs_the_relay_privileges_on_existing_tables() {
        let l = layout(&["outbox", "outbox_dead_letter", "lockstep_owners", "lockstep_schema_history"]);
        let n = needs(&target(TargetKind::OutboxRelay, false), &l);
        assert_eq!(
            listed(&n),
            [
                "schema billing USAGE",
                "table billing.lockstep_owners SELECT",
                "table billing.outbox SELECT,UPDATE,DELETE",
                "table billing.outbox_dead_letter SELECT,INSERT,UPDATE",
                "function pg_try_advisory_lock(bigint) EXECUTE",
                "function pg_advisory_xact_lock(bigint) EXECUTE"
            ]
        );
    }

    #[test]
    fn inbox_purge_needs_delete() {
        let l = layout(&["inbox", "lockstep_schema_history"]);
        let n = needs(&target(TargetKind::InboxTable, true), &l);
        assert!(listed(&n).contains(&"table billing.inbox SELECT,DELETE".to_owned()));
        assert!(listed(&n).contains(&"table billing.lockstep_schema_history SELECT,INSERT".to_owned()));
    }

    #[test]
    fn a_missing_privilege_fails_with_the_grant_that_gives_it() {
        let n = Need {
            object: Object::Table(target(TargetKind::InboxTable, true).table),
            privileges: &["SELECT", "DELETE"],
            why: "purges",
        };
        let c = verdict(&n, &["DELETE"], "app", "db");
        assert_eq!(c.verdict, Verdict::Fail);
        assert_eq!(c.detail, "role app lacks DELETE: purges");
        assert_eq!(
            c.what_to_do.unwrap(),
            r#"as the object's owner or a superuser: grant delete on table "billing"."inbox" to "app""#
        );
        assert_eq!(verdict(&n, &[], "app", "db").verdict, Verdict::Pass);
        let db = Need {
            object: Object::Database,
            privileges: &["CREATE"],
            why: "w",
        };
        assert!(verdict(&db, &["CREATE"], "app", "my db")
            .what_to_do
            .unwrap()
            .ends_with(r#"grant create on database "my db" to "app""#));
    }

    #[test]
    fn unmanaged_tables_must_exist() {
        let c = presence(&target(TargetKind::OutboxRelay, false), &layout(&["outbox"]));
        assert_eq!((c[0].verdict, c[1].verdict), (Verdict::Pass, Verdict::Fail));
        assert_eq!(c[1].name, "table billing.outbox_dead_letter");
        let c = presence(&target(TargetKind::OutboxRelay, true), &layout(&[]));
        assert!(c.iter().all(|c| c.verdict == Verdict::Pass));
    }

    #[test]
    fn probes_quote_their_arguments() {
        let t = target(TargetKind::InboxTable, true).table;
        assert_eq!(
            Object::Table(t).probe_sql("DELETE"),
            "select has_table_privilege((select c.oid from pg_class c join pg_namespace n on n.oid = c.relnamespace \
             where n.nspname = 'billing' and c.relname = 'inbox'), 'DELETE')"
        );
        assert_eq!(
            Object::Schema("o'k".into()).probe_sql("USAGE"),
            "select has_schema_privilege('o''k', 'USAGE')"
        );
    }
}
