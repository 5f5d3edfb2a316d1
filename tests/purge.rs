//! Purge on the real PostgreSQL: writers keep committing claims while 1M expired rows are deleted,
//! expired rows go, fresh rows stay.

mod common;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use lockstep::{
    inbox::Inbox,
    purge::{purge_expired, PAUSE_RATIO},
    schema::{migrate, TableKind},
    sql::{Ident, QualifiedName},
};

#[tokio::test]
async fn writers_keep_working_while_a_million_expired_rows_are_purged() {
    let s = common::pg_schema("purge").await;
    let table = QualifiedName {
        schema: Ident::parse(&s.schema).unwrap(),
        table: Ident::parse("inbox").unwrap(),
    };
    migrate(&mut s.pool.acquire().await.unwrap(), TableKind::Inbox, &table, true)
        .await
        .unwrap();
    sqlx::query(&format!(
        "insert into {table} (consumer, message_id, received_at)
         select 'old', 'm-' || g, now() - interval '2 days' from generate_series(1, 1000000) g
         union all select 'recent', 'r-' || g, now() - interval '1 hour' from generate_series(1, 100) g"
    ))
    .execute(&s.pool)
    .await
    .unwrap();

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&common::env("DATABASE_URL"))
        .await
        .unwrap();
    let inbox = Inbox::for_table(table.clone(), "writer");
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let (pool, inbox, stop) = (pool.clone(), inbox.clone(), stop.clone());
            let done = Arc::new(AtomicU64::new(0));
            let d = done.clone();
            let task = tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let mut tx = pool.begin().await.expect("begin");
                    assert!(inbox
                        .claim(&mut tx, &uuid::Uuid::new_v4().to_string())
                        .await
                        .expect("claim during purge"));
                    tx.commit().await.expect("commit during purge");
                    d.fetch_add(1, Ordering::Relaxed);
                }
            });
            (task, done)
        })
        .collect();
    // Let the writers get going, then purge under them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before: Vec<u64> = writers.iter().map(|(_, d)| d.load(Ordering::Relaxed)).collect();
    let result = purge_expired(&pool, &table, Duration::from_secs(86_400), 5000, PAUSE_RATIO)
        .await
        .unwrap();
    let after: Vec<u64> = writers.iter().map(|(_, d)| d.load(Ordering::Relaxed)).collect();
    stop.store(true, Ordering::Relaxed);
    for (task, _) in writers {
        task.await.expect("a writer failed during the purge");
    }
    assert_eq!(result.rows_deleted, 1_000_000);
    assert!(result.batches >= 200, "deleted in bounded batches, not one statement: {result:?}");
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert!(a > b, "writer {i} committed nothing while the purge ran ({b} -> {a})");
    }
    let left: Vec<(String, i64)> = sqlx::query_as(&format!("select consumer, count(*) from {table} group by 1 order by 1"))
        .fetch_all(&s.pool)
        .await
        .unwrap();
    let writes: u64 = after.iter().sum();
    assert_eq!(left[0], ("recent".to_string(), 100), "fresh rows stay");
    assert!(left.iter().all(|(c, _)| c != "old"), "no expired row left: {left:?}");
    assert!(left.iter().any(|(c, n)| c == "writer" && *n as u64 >= writes));
}
