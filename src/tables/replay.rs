//! Dead-letter replay: move rows from the dead-letter table back into the outbox, to be published
//! again (after the cause was fixed). Stored before deleted: a row is deleted from the dead-letter
//! table only once the outbox holds it, and a row whose id is still in the outbox stays where it is.
//!
//! Per-key order: a replayed row gets a new `seq`, after every row already in the outbox. Later
//! events of its key, published while it sat in the dead-letter table, went out before it; it is
//! published after them.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    core::sql::QualifiedName,
    tables::schema::{OutboxTables, PayloadColumn},
};

/// The dead-letter payload as the outbox stores it, undoing the move (`relay::store::moved_payload`):
/// bytes that went into a json(b) column as a base64 string come back as bytes.
fn replayed_payload(outbox: PayloadColumn, dead_letter: PayloadColumn) -> &'static str {
    match (outbox, dead_letter) {
        (PayloadColumn::Bytea, PayloadColumn::Json) => "decode(payload #>> '{}', 'base64')",
        (PayloadColumn::Json, PayloadColumn::Bytea) => "convert_from(payload, 'UTF8')::jsonb",
        _ => "payload",
    }
}

/// $1: the ids to replay (uuid[]), or null for all; in their original seq order. The
/// traceparent column goes back too where both tables have it.
pub fn replay_sql(outbox: &QualifiedName, dead_letter: &QualifiedName, tables: &OutboxTables) -> String {
    let payload = replayed_payload(tables.payload, tables.dead_letter_payload);
    let trace = if tables.traceparent && tables.dead_letter_traceparent {
        ", traceparent"
    } else {
        ""
    };
    format!(
        "with moved as (select id, aggregatetype, aggregateid, type, {payload} as payload, headers, created_at{trace}, seq
                        from {dead_letter} where $1::uuid[] is null or id = any($1) for update),
              stored as (insert into {outbox} (id, aggregatetype, aggregateid, type, payload, headers, created_at{trace})
                         select id, aggregatetype, aggregateid, type, payload, headers, created_at{trace} from moved order by seq
                         on conflict (id) do nothing
                         returning id)
         delete from {dead_letter} where id in (select id from stored)"
    )
}

/// Replay `ids` (None: every dead-lettered row); how many rows moved.
pub async fn replay(
    conn: &mut PgConnection,
    outbox: &QualifiedName,
    dead_letter: &QualifiedName,
    tables: &OutboxTables,
    ids: Option<&[Uuid]>,
) -> Result<u64, sqlx::Error> {
    let sql = replay_sql(outbox, dead_letter, tables);
    let r = sqlx::query(&sql).bind(ids).execute(conn).await?;
    Ok(r.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::schema::qualified as q;

    fn tables(traceparent: (bool, bool)) -> OutboxTables {
        OutboxTables {
            payload: PayloadColumn::Json,
            dead_letter_payload: PayloadColumn::Json,
            traceparent: traceparent.0,
            dead_letter_traceparent: traceparent.1,
            channel: String::new(),
        }
    }

    #[test]
    fn replay_stores_before_it_deletes_and_keeps_what_the_outbox_already_has() {
        let (o, dl) = (q("public", "outbox"), q("public", "outbox_dead_letter"));
        let sql = replay_sql(&o, &dl, &tables((false, true)));
        assert!(!sql.contains("traceparent"), "{sql}");
        let traced = replay_sql(&o, &dl, &tables((true, true)));
        assert!(traced.contains("headers, created_at, traceparent)"), "{traced}");
        assert!(traced.contains("headers, created_at, traceparent from moved"), "{traced}");
        assert!(sql.contains("on conflict (id) do nothing"), "{sql}");
        assert!(
            sql.contains(r#"delete from "public"."outbox_dead_letter" where id in (select id from stored)"#),
            "{sql}"
        );
        assert!(sql.contains("from moved order by seq"), "{sql}");
    }

    #[test]
    fn replay_undoes_the_payload_conversion_of_the_move() {
        assert_eq!(
            replayed_payload(PayloadColumn::Bytea, PayloadColumn::Json),
            "decode(payload #>> '{}', 'base64')"
        );
        assert_eq!(
            replayed_payload(PayloadColumn::Json, PayloadColumn::Bytea),
            "convert_from(payload, 'UTF8')::jsonb"
        );
        assert_eq!(replayed_payload(PayloadColumn::Json, PayloadColumn::Json), "payload");
    }
}
