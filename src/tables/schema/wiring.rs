//! What an outbox needs beyond its columns, checked when lockstep did not create it (adopted,
//! or manageSchema false): `seq` an identity (rows are read in commit order by it), `txid`
//! defaulting to the writing transaction's id (the relay's visibility filter), and the trigger
//! that NOTIFYs the relay. And before lockstep creates an outbox: that its NOTIFY function would
//! not replace someone else's function of that name.

use sqlx::PgConnection;

use super::{
    notify_channel,
    tables::{derived_name, notify_trigger_ddl},
};
use crate::core::sql::QualifiedName;

/// The function the outbox's NOTIFY trigger calls.
pub fn notify_function(t: &QualifiedName) -> QualifiedName {
    QualifiedName {
        schema: t.schema.clone(),
        table: derived_name(&t.table, "_notify"),
    }
}

/// A function lockstep's migration would `create or replace`, when one of that name already
/// exists (and so is someone else's: lockstep creates it only with the table).
pub async fn function_in_the_way(conn: &mut PgConnection, t: &QualifiedName) -> Result<Option<String>, sqlx::Error> {
    let f = notify_function(t);
    let exists: Option<String> = sqlx::query_scalar("select to_regprocedure($1)::text")
        .bind(format!("{f}()"))
        .fetch_one(&mut *conn)
        .await?;
    Ok(exists.map(|_| {
        format!("a function {f}() already exists and the outbox migration would replace it; rename it, or choose another table name")
    }))
}

/// Adopting an outbox (manageSchema true) that has no NOTIFY trigger: add lockstep's, unless a
/// function of its name is someone else's. Returns what stands in the way, if anything.
pub async fn add_notify_trigger(conn: &mut PgConnection, t: &QualifiedName) -> Result<Option<String>, sqlx::Error> {
    if outbox_wiring(conn, t).await?.iter().all(|d| !d.starts_with("no trigger")) {
        return Ok(None);
    }
    if let Some(d) = function_in_the_way(conn, t).await? {
        return Ok(Some(d));
    }
    tracing::info!(table = %t, "adopting an outbox without a NOTIFY trigger: adding lockstep's");
    sqlx::Executor::execute(&mut *conn, notify_trigger_ddl(t).as_str()).await?;
    Ok(None)
}

/// What the observed outbox lacks of the relay's wiring, in words a user can act on.
pub async fn outbox_wiring(conn: &mut PgConnection, t: &QualifiedName) -> Result<Vec<String>, sqlx::Error> {
    let channel = notify_channel(t);
    let (identity, txid_default, notifies): (Option<String>, Option<String>, bool) = sqlx::query_as(
        "select (select a.attidentity::text from pg_attribute a where a.attrelid = $1::regclass and a.attname = 'seq'),
                (select pg_get_expr(d.adbin, d.adrelid) from pg_attrdef d
                   join pg_attribute a on a.attrelid = d.adrelid and a.attnum = d.adnum
                  where d.adrelid = $1::regclass and a.attname = 'txid'),
                exists (select 1 from pg_trigger tg join pg_proc p on p.oid = tg.tgfoid
                         where tg.tgrelid = $1::regclass and not tg.tgisinternal and tg.tgenabled <> 'D'
                           and position($2 in p.prosrc) > 0)",
    )
    .bind(t.to_string())
    .bind(&channel)
    .fetch_one(&mut *conn)
    .await?;
    Ok(differences(t, identity.as_deref(), txid_default.as_deref(), notifies, &channel))
}

/// Pure: the differences from what was read.
pub fn differences(t: &QualifiedName, identity: Option<&str>, txid_default: Option<&str>, notifies: bool, channel: &str) -> Vec<String> {
    let mut d = Vec::new();
    if !matches!(identity, Some("a" | "d")) {
        d.push("column seq is not an identity (expected: seq bigint generated always as identity)".to_owned());
    }
    if !txid_default.is_some_and(|e| e.contains("pg_current_xact_id()")) {
        d.push(format!(
            "column txid does not default to pg_current_xact_id() (has {}); the relay could publish rows of a \
             transaction out of commit order",
            txid_default.unwrap_or("no default")
        ));
    }
    if !notifies {
        let f = notify_function(t);
        d.push(format!(
            "no trigger on {t} NOTIFYs channel {channel} (the relay would wake only on its poll interval): \
             create function {f}() returns trigger language plpgsql as $$ begin perform pg_notify('{channel}', ''); \
             return null; end $$; create trigger ... after insert on {t} for each statement execute function {f}()"
        ));
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::schema::qualified;

    #[test]
    fn each_missing_piece_is_named() {
        let t = qualified("app", "outbox");
        assert!(differences(&t, Some("a"), Some("pg_current_xact_id()"), true, "c").is_empty());
        assert!(differences(&t, Some("d"), Some("pg_current_xact_id()"), true, "c").is_empty());
        let d = differences(&t, Some(""), None, false, "lockstep_outbox_x");
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].contains("seq is not an identity"));
        assert!(d[1].contains("has no default"));
        assert!(
            d[2].contains("pg_notify('lockstep_outbox_x'") && d[2].contains(r#""app"."outbox_notify"()"#),
            "{}",
            d[2]
        );
    }
}
