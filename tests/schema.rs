//! Migrations on the real PostgreSQL: create, re-run (no change), history, mismatched tables left
//! untouched, manageSchema false, and the inbox claim under concurrency.

mod common;

use lockstep::{
    core::sql::{Ident, QualifiedName},
    inbox::Inbox,
    tables::schema::{migrate, SchemaError, TableKind},
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
    assert_eq!(history[0].2, lockstep::tables::schema::migrations(TableKind::Inbox)[0].checksum());
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
    assert_eq!(migrate(&mut conn, TableKind::Outbox, &t, true).await.unwrap().applied, vec![1, 2]);
    assert_eq!(
        migrate(&mut conn, TableKind::DeadLetter, &qn(&s.schema, "outbox_dead_letter"), true)
            .await
            .unwrap()
            .applied,
        vec![1, 2]
    );
    assert!(migrate(&mut conn, TableKind::Outbox, &t, true).await.unwrap().applied.is_empty());

    let mut listener = sqlx::postgres::PgListener::connect_with(&s.pool).await.unwrap();
    listener.listen(&lockstep::tables::schema::notify_channel(&t)).await.unwrap();
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
    assert_eq!(n.channel(), lockstep::tables::schema::notify_channel(&t));
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
    // Outside a transaction it still claims (the statement commits on its own).
    let mut conn = s.pool.acquire().await.unwrap();
    assert_eq!(inbox.claim_all(&mut conn, &["m-5", "m-1"]).await.unwrap(), [true, false]);
    let rows: i64 = sqlx::query_scalar(&format!("select count(*) from {t}"))
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(rows, 5);
}

#[tokio::test]
async fn concurrent_batch_claims_that_share_ids_each_id_wins_once_and_none_deadlocks() {
    let s = common::pg_schema("claim_all_race").await;
    let t = s.inbox("inbox").await;
    let pool = common::pool(8).await;
    let inbox = Inbox::for_table(t.clone(), "billing");
    // 8 consumers, each a batch of 2,000 of the same 3,000 ids in an order of its own (a
    // rotation, reversed for odd ones), started together: lock order differs between batches
    // unless claim_all orders it (batches this large overlap in time). Two ids were claimed
    // before.
    let ids: Vec<String> = (0..3000).map(|i| format!("m-{i:04}")).collect();
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(inbox.claim_all(&mut tx, &["m-0007", "m-0500"]).await.unwrap(), [true, true]);
    tx.commit().await.unwrap();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8usize)
        .map(|k| {
            let mut batch: Vec<String> = ids.iter().cycle().skip(k * 377).take(2000).cloned().collect();
            if k % 2 == 1 {
                batch.reverse();
            }
            let (pool, inbox, barrier) = (pool.clone(), inbox.clone(), barrier.clone());
            tokio::spawn(async move {
                let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
                let mut tx = pool.begin().await.unwrap();
                barrier.wait().await;
                let new = inbox.claim_all(&mut tx, &refs).await.expect("no deadlock, no error");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                tx.commit().await.unwrap();
                batch.into_iter().zip(new).filter(|(_, n)| *n).map(|(id, _)| id).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut won: Vec<String> = Vec::new();
    for task in tasks {
        won.extend(task.await.unwrap());
    }
    won.sort();
    let before = won.len();
    won.dedup();
    assert_eq!(before, won.len(), "an id won by two batches");
    assert!(!won.contains(&"m-0007".to_string()) && !won.contains(&"m-0500".to_string()));
    let rows: i64 = sqlx::query_scalar(&format!("select count(*) from {t}"))
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(rows as usize, won.len() + 2, "every claimed row was reported new exactly once");
}

// ---- Issue 12 item 5: migrations that must not overwrite, race, hang, retry forever or adopt
// what the relay cannot order by.

const OUTBOX_COLUMNS: &str = "id uuid primary key, aggregatetype text not null, aggregateid text not null,
    type text not null, payload jsonb, headers jsonb, created_at timestamptz not null default now(),
    attempts integer not null default 0, last_error text, published_at timestamptz";

fn mismatch(r: Result<lockstep::tables::schema::MigrationOutcome, SchemaError>) -> Vec<String> {
    match r {
        Err(SchemaError::Mismatch { differences, .. }) => differences,
        other => panic!("expected a mismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn a_users_function_of_the_notify_name_is_not_replaced() {
    let s = common::pg_schema("fnclash").await;
    let mine = "create function outbox_notify() returns trigger language plpgsql as $$ begin return null; end $$";
    sqlx::query(mine).execute(&s.pool).await.unwrap();
    let t = qn(&s.schema, "outbox");
    let d = mismatch(migrate(&mut s.pool.acquire().await.unwrap(), TableKind::Outbox, &t, true).await);
    assert!(d[0].contains("outbox_notify\"() already exists"), "{d:?}");
    // This schema's function: other tests' outboxes have functions of that name in theirs.
    let body: String = sqlx::query_scalar("select prosrc from pg_proc where proname = 'outbox_notify' and pronamespace = $1::regnamespace")
        .bind(format!("\"{}\"", s.schema))
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert!(!body.contains("pg_notify"), "the user's function is untouched: {body}");
    let created: Option<String> = sqlx::query_scalar("select to_regclass($1)::text")
        .bind(format!("\"{}\".outbox", s.schema))
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(created, None, "nothing was created");
}

#[tokio::test]
async fn first_migrations_of_many_tables_in_one_new_schema_do_not_race() {
    let url = common::env("DATABASE_URL");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(12)
        .connect(&url)
        .await
        .unwrap();
    for round in 0..5 {
        // A schema nobody created yet: each migration creates it and its history table.
        let schema = format!("t_{}", common::unique(&format!("race{round}")).replace('-', "_"));
        let runs: Vec<_> = (0..8)
            .map(|i| {
                let (pool, t) = (pool.clone(), qn(&schema, &format!("inbox{i}")));
                tokio::spawn(async move { migrate(&mut pool.acquire().await.unwrap(), TableKind::Inbox, &t, true).await })
            })
            .collect();
        for r in runs {
            let outcome = r.await.unwrap().unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(outcome.applied, vec![1]);
        }
    }
}

#[tokio::test]
async fn a_migration_waiting_on_a_lock_gives_up_instead_of_hanging() {
    let s = common::pg_schema("locktimeout").await;
    let t = qn(&s.schema, "inbox");
    // Another session holds the table's migration lock and never lets go.
    let mut holder = s.pool.acquire().await.unwrap();
    sqlx::query("select pg_advisory_lock($1)")
        .bind(lockstep::tables::schema::lock_key(&t))
        .execute(&mut *holder)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        migrate(&mut s.pool.acquire().await.unwrap(), TableKind::Inbox, &t, true),
    )
    .await
    .expect("the migration hung on the lock");
    match r {
        Err(SchemaError::Database(e)) => assert!(e.to_string().contains("lock timeout"), "{e}"),
        other => panic!("expected a lock timeout, got {other:?}"),
    }
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(10),
        "gave up at the lock timeout, not at once"
    );
}

#[tokio::test]
async fn a_role_without_privileges_is_reported_as_permission_denied() {
    let s = common::pg_schema("noperm").await;
    let role = format!("r_{}", common::unique("noperm").replace('-', "_"));
    sqlx::raw_sql(&format!(
        "create role \"{role}\" login; revoke create on schema \"{}\" from public",
        s.schema
    ))
    .execute(&s.pool)
    .await
    .unwrap();
    let url = common::env("DATABASE_URL");
    let rest = url.split_once("://").unwrap().1;
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let mut conn: sqlx::PgConnection = sqlx::Connection::connect(&format!("postgres://{role}@{host}")).await.unwrap();
    let t = qn(&s.schema, "inbox");
    match migrate(&mut conn, TableKind::Inbox, &t, true).await {
        Err(SchemaError::Database(e)) => {
            assert!(lockstep::clients::db::is_permission_denied(&e), "{e}");
            let c = lockstep::operator::controller::deps::schema_failure(TableKind::Inbox, &t, "db", SchemaError::Database(e));
            assert_eq!(c.reason.as_str(), "PermissionDenied");
        }
        other => panic!("expected permission denied, got {other:?}"),
    }
}

#[tokio::test]
async fn an_adopted_outbox_must_order_by_identity_and_transaction_id() {
    let s = common::pg_schema("adopt").await;
    let mut conn = s.pool.acquire().await.unwrap();
    // seq a plain bigserial, txid without the default: both refused, nothing changed.
    sqlx::raw_sql(&format!(
        "create table wrong ({OUTBOX_COLUMNS}, seq bigserial not null unique, txid xid8 not null)"
    ))
    .execute(&s.pool)
    .await
    .unwrap();
    let d = mismatch(migrate(&mut conn, TableKind::Outbox, &qn(&s.schema, "wrong"), true).await);
    assert!(d.iter().any(|x| x.contains("seq is not an identity")), "{d:?}");
    assert!(
        d.iter().any(|x| x.contains("txid does not default to pg_current_xact_id()")),
        "{d:?}"
    );
    // Right columns, no trigger: verified (manageSchema false) it is refused with the DDL to add;
    // adopted (true), lockstep adds its trigger.
    sqlx::raw_sql(&format!(
        "create table mine ({OUTBOX_COLUMNS}, seq bigint generated always as identity unique,
                             txid xid8 not null default pg_current_xact_id())"
    ))
    .execute(&s.pool)
    .await
    .unwrap();
    let t = qn(&s.schema, "mine");
    let d = mismatch(migrate(&mut conn, TableKind::Outbox, &t, false).await);
    assert!(d.len() == 1 && d[0].contains("no trigger") && d[0].contains("pg_notify("), "{d:?}");
    let adopted = migrate(&mut conn, TableKind::Outbox, &t, true).await.unwrap();
    assert!(adopted.adopted);
    migrate(&mut conn, TableKind::Outbox, &t, false).await.expect("wired now");
}

// ---- Issue 26: the optional traceparent column (migration 2 of the outbox and dead-letter tables).

async fn has_traceparent(pool: &sqlx::PgPool, schema: &str, table: &str) -> bool {
    sqlx::query_scalar(
        "select exists (select 1 from information_schema.columns where table_schema = $1 and table_name = $2 and column_name = 'traceparent')",
    )
    .bind(schema)
    .bind(table)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A table an earlier lockstep made (history at version 1) gains the nullable column, its rows
/// untouched; a table adopted without history too; one only verified (manageSchema false)
/// without the column still passes.
#[tokio::test]
async fn migration_2_adds_a_nullable_traceparent_and_old_tables_keep_working() {
    let s = common::pg_schema("trace").await;
    let mut conn = s.pool.acquire().await.unwrap();
    // As lockstep 1-version-ago left it: version 1 applied and recorded, a row written.
    let t = qn(&s.schema, "old");
    let v1 = &lockstep::tables::schema::migrations(TableKind::Outbox)[0];
    sqlx::raw_sql(&(v1.render)(&t)).execute(&s.pool).await.unwrap();
    sqlx::raw_sql(&lockstep::tables::schema::history_ddl(&t.schema))
        .execute(&s.pool)
        .await
        .unwrap();
    sqlx::query(
        "insert into lockstep_schema_history (table_schema, table_name, kind, version, checksum) values ($1, 'old', 'outbox', 1, $2)",
    )
    .bind(&s.schema)
    .bind(v1.checksum())
    .execute(&s.pool)
    .await
    .unwrap();
    sqlx::query("insert into old (id, aggregatetype, aggregateid, type) values (gen_random_uuid(), 'a', 'k', 't')")
        .execute(&s.pool)
        .await
        .unwrap();
    assert!(!has_traceparent(&s.pool, &s.schema, "old").await);
    // Verified only: version 1 is still a valid outbox.
    migrate(&mut conn, TableKind::Outbox, &t, false)
        .await
        .expect("verified without the column");
    let upgraded = migrate(&mut conn, TableKind::Outbox, &t, true).await.unwrap();
    assert_eq!((upgraded.applied, upgraded.version), (vec![2], 2));
    assert!(has_traceparent(&s.pool, &s.schema, "old").await);
    let (rows, traced): (i64, i64) = sqlx::query_as("select count(*), count(traceparent) from old")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!((rows, traced), (1, 0), "the row is kept, its traceparent NULL");
    let again = migrate(&mut conn, TableKind::Outbox, &t, true).await.unwrap();
    assert!(again.applied.is_empty());

    // A user's dead-letter table, adopted: recorded as version 1, then given the column.
    sqlx::raw_sql(&(lockstep::tables::schema::migrations(TableKind::DeadLetter)[0].render)(&qn(
        &s.schema,
        "theirs_dead_letter",
    )))
    .execute(&s.pool)
    .await
    .unwrap();
    let dl = qn(&s.schema, "theirs_dead_letter");
    let adopted = migrate(&mut conn, TableKind::DeadLetter, &dl, true).await.unwrap();
    assert!(adopted.adopted && adopted.applied == [2], "{adopted:?}");
    assert!(has_traceparent(&s.pool, &s.schema, "theirs_dead_letter").await);
    let versions: Vec<i32> = sqlx::query_scalar(
        "select version from lockstep_schema_history where table_schema = $1 and table_name = 'theirs_dead_letter' order by version",
    )
    .bind(&s.schema)
    .fetch_all(&s.pool)
    .await
    .unwrap();
    assert_eq!(versions, [1, 2]);
}
