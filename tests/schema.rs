//! Migrations on the real PostgreSQL: create, re-run (no change), history, mismatched tables left
//! untouched, manageSchema false, and the inbox claim under concurrency.

mod common;

use lockstep::{
    inbox::Inbox,
    schema::{migrate, SchemaError, TableKind},
    sql::{Ident, QualifiedName},
};

fn qn(schema: &str, table: &str) -> QualifiedName {
    QualifiedName {
        schema: Ident::parse(schema).unwrap(),
        table: Ident::parse(table).unwrap(),
    }
}

#[tokio::test]
async fn inbox_migration_creates_table_key_index_and_is_idempotent() {
    let s = common::pg_schema("mig").await;
    let t = qn(&s.schema, "inbox");
    let mut conn = s.pool.acquire().await.unwrap();
    let first = migrate(&mut conn, TableKind::Inbox, &t, true).await.unwrap();
    assert_eq!(first.applied, vec![1]);
    let second = migrate(&mut conn, TableKind::Inbox, &t, true).await.unwrap();
    assert!(
        second.applied.is_empty() && !second.adopted,
        "second run changes nothing: {second:?}"
    );

    let pk: Vec<String> = sqlx::query_scalar(
        "select a.attname::text from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
         where i.indrelid = $1::regclass and i.indisprimary order by a.attname",
    )
    .bind(format!("{}.inbox", s.schema))
    .fetch_all(&s.pool)
    .await
    .unwrap();
    assert_eq!(pk, ["consumer", "message_id"]);
    let idx: i64 = sqlx::query_scalar("select count(*) from pg_indexes where schemaname = $1 and indexname = 'inbox_received_at_idx'")
        .bind(&s.schema)
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(idx, 1);
    let history: Vec<(String, i32, String)> =
        sqlx::query_as("select kind, version, checksum from lockstep_schema_history where table_schema = $1 and table_name = 'inbox'")
            .bind(&s.schema)
            .fetch_all(&s.pool)
            .await
            .unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!((history[0].0.as_str(), history[0].1), ("inbox", 1));
    assert_eq!(history[0].2, lockstep::schema::migrations(TableKind::Inbox)[0].checksum());
}

#[tokio::test]
async fn mismatched_table_is_reported_and_left_untouched() {
    let s = common::pg_schema("mismatch").await;
    sqlx::raw_sql("create table inbox (consumer text, message_id integer, note text); insert into inbox values ('a', 1, 'keep me');")
        .execute(&s.pool)
        .await
        .unwrap();
    let mut conn = s.pool.acquire().await.unwrap();
    let err = migrate(&mut conn, TableKind::Inbox, &qn(&s.schema, "inbox"), true)
        .await
        .unwrap_err();
    match &err {
        SchemaError::Mismatch { differences, .. } => {
            let all = differences.join("; ");
            assert!(all.contains("column message_id is int4"), "{all}");
            assert!(all.contains("missing column received_at"), "{all}");
            assert!(
                all.contains("no primary key or unique constraint on (consumer, message_id)"),
                "{all}"
            );
            assert!(all.contains("column consumer allows NULL"), "{all}");
        }
        other => panic!("expected a mismatch, got {other}"),
    }
    assert!(err.is_permanent());
    let rows: Vec<(String, i32, String)> = sqlx::query_as("select consumer, message_id, note from inbox")
        .fetch_all(&s.pool)
        .await
        .unwrap();
    assert_eq!(rows, vec![("a".to_string(), 1, "keep me".to_string())]);
    let cols: i64 = sqlx::query_scalar("select count(*) from information_schema.columns where table_schema = $1 and table_name = 'inbox'")
        .bind(&s.schema)
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(cols, 3, "no column was added");
    // The whole run rolled back: not even the history table was left behind.
    let history: Option<String> = sqlx::query_scalar("select to_regclass('lockstep_schema_history')::text")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(history, None);
}

#[tokio::test]
async fn matching_foreign_table_is_adopted_and_unmanaged_is_only_verified() {
    let s = common::pg_schema("adopt").await;
    sqlx::raw_sql(
        "create table inbox (consumer varchar(200) not null, message_id text not null, received_at timestamptz not null default now(),
                             extra text, unique (message_id, consumer));
         insert into inbox (consumer, message_id) values ('c', 'm1');",
    )
    .execute(&s.pool)
    .await
    .unwrap();
    let mut conn = s.pool.acquire().await.unwrap();
    let t = qn(&s.schema, "inbox");
    let unmanaged = migrate(&mut conn, TableKind::Inbox, &t, false).await.unwrap();
    assert!(unmanaged.applied.is_empty() && !unmanaged.adopted);
    let adopted = migrate(&mut conn, TableKind::Inbox, &t, true).await.unwrap();
    assert!(adopted.adopted && adopted.applied.is_empty());
    let n: i64 = sqlx::query_scalar("select count(*) from inbox").fetch_one(&s.pool).await.unwrap();
    assert_eq!(n, 1);
    let missing = migrate(&mut conn, TableKind::Inbox, &qn(&s.schema, "nothere"), false)
        .await
        .unwrap_err();
    assert!(matches!(missing, SchemaError::Missing { .. }), "{missing}");
}

#[tokio::test]
async fn outbox_and_dead_letter_migrate_and_notify() {
    let s = common::pg_schema("outbox").await;
    let mut conn = s.pool.acquire().await.unwrap();
    let t = qn(&s.schema, "outbox");
    assert_eq!(migrate(&mut conn, TableKind::Outbox, &t, true).await.unwrap().applied, vec![1]);
    assert_eq!(
        migrate(&mut conn, TableKind::DeadLetter, &qn(&s.schema, "outbox_dead_letter"), true)
            .await
            .unwrap()
            .applied,
        vec![1]
    );
    assert!(migrate(&mut conn, TableKind::Outbox, &t, true).await.unwrap().applied.is_empty());

    let mut listener = sqlx::postgres::PgListener::connect_with(&s.pool).await.unwrap();
    listener.listen(&lockstep::schema::notify_channel(&t)).await.unwrap();
    sqlx::query(
        "insert into outbox (id, aggregatetype, aggregateid, type, payload) values (gen_random_uuid(), 'order', '1', 'created', '{}')",
    )
    .execute(&s.pool)
    .await
    .unwrap();
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), listener.recv())
        .await
        .expect("NOTIFY within 5s")
        .unwrap();
    assert_eq!(n.channel(), lockstep::schema::notify_channel(&t));
    let (seq, attempts): (i64, i32) = sqlx::query_as("select seq, attempts from outbox").fetch_one(&s.pool).await.unwrap();
    assert_eq!((seq, attempts), (1, 0));
}

#[tokio::test]
async fn fifty_concurrent_claims_of_one_id_succeed_exactly_once() {
    let s = common::pg_schema("claim").await;
    let t = qn(&s.schema, "inbox");
    migrate(&mut s.pool.acquire().await.unwrap(), TableKind::Inbox, &t, true)
        .await
        .unwrap();
    let url = common::env("DATABASE_URL");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(50)
        .connect(&url)
        .await
        .unwrap();
    let inbox = Inbox::for_table(t.clone(), "billing");
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (pool, inbox, barrier) = (pool.clone(), inbox.clone(), barrier.clone());
            tokio::spawn(async move {
                let mut tx = pool.begin().await.unwrap();
                barrier.wait().await;
                let first = inbox.claim(&mut tx, "msg-1").await.unwrap();
                if first {
                    // the side effect, in the same transaction
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                tx.commit().await.unwrap();
                first
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        wins += t.await.unwrap() as usize;
    }
    assert_eq!(wins, 1, "exactly one claim wins");
    let rows: i64 = sqlx::query_scalar(&format!("select count(*) from {t}"))
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
    // A claim that rolls back leaves the id free for the next delivery.
    let mut tx = pool.begin().await.unwrap();
    assert!(inbox.claim(&mut tx, "msg-2").await.unwrap());
    tx.rollback().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    assert!(inbox.claim(&mut tx, "msg-2").await.unwrap());
    tx.commit().await.unwrap();
    // Another consumer of the same table has its own ids.
    let other = Inbox::for_table(t, "shipping");
    let mut tx = pool.begin().await.unwrap();
    assert!(other.claim(&mut tx, "msg-1").await.unwrap());
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_batch_claim_is_new_once_per_id_including_repeats_in_the_batch() {
    let s = common::pg_schema("claim_all").await;
    let t = qn(&s.schema, "inbox");
    migrate(&mut s.pool.acquire().await.unwrap(), TableKind::Inbox, &t, true)
        .await
        .unwrap();
    let inbox = Inbox::for_table(t.clone(), "billing");
    let mut tx = s.pool.begin().await.unwrap();
    assert!(inbox.claim(&mut tx, "m-2").await.unwrap());
    tx.commit().await.unwrap();
    let mut tx = s.pool.begin().await.unwrap();
    let new = inbox.claim_all(&mut tx, &["m-1", "m-2", "m-3", "m-1"]).await.unwrap();
    assert_eq!(new, [true, false, true, false]);
    tx.rollback().await.unwrap();
    // Rolled back: the ids are free again, for this consumer and every other.
    let mut tx = s.pool.begin().await.unwrap();
    assert_eq!(inbox.claim_all(&mut tx, &["m-1", "m-3"]).await.unwrap(), [true, true]);
    tx.commit().await.unwrap();
    let mut tx = s.pool.begin().await.unwrap();
    assert_eq!(inbox.claim_all(&mut tx, &[]).await.unwrap(), Vec::<bool>::new());
    assert_eq!(inbox.claim_all(&mut tx, &["m-1", "m-4"]).await.unwrap(), [false, true]);
    tx.commit().await.unwrap();
    let rows: i64 = sqlx::query_scalar(&format!("select count(*) from {t}"))
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(rows, 4);
}
