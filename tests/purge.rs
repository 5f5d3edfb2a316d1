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
    tables::purge::{purge_expired, PAUSE_RATIO},
};

#[tokio::test]
async fn writers_keep_working_while_a_million_expired_rows_are_purged() {
    let s = common::pg_schema("purge").await;
    let table = s.inbox("inbox").await;
    sqlx::query(&format!(
        "insert into {table} (consumer, message_id, received_at)
         select 'old', 'm-' || g, now() - interval '2 days' from generate_series(1, 1000000) g
         union all select 'recent', 'r-' || g, now() - interval '1 hour' from generate_series(1, 100) g"
    ))
    .execute(&s.pool)
    .await
    .unwrap();

    let pool = common::pool(8).await;
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

/// Issue 12 item 3: a `ctid` is unique only inside one partition. On a partitioned inbox the first
/// row of each partition has ctid (0,1): deleting "the expired rows' ctids" took the fresh row of
/// the other partition with it.
#[tokio::test]
async fn a_partitioned_inbox_loses_only_its_expired_rows() {
    let s = common::pg_schema("purgepart").await;
    let table = s.table("inbox");
    sqlx::raw_sql(&format!(
        "create table {table} (consumer text not null, message_id text not null,
                               received_at timestamptz not null default now(),
                               primary key (consumer, message_id)) partition by list (consumer);
         create table {s}.inbox_old partition of {table} for values in ('old');
         create table {s}.inbox_new partition of {table} for values in ('new');
         insert into {table} values ('old', 'm1', now() - interval '2 days');
         insert into {table} values ('new', 'm1', now());",
        s = lockstep::core::sql::quote_ident(&s.schema)
    ))
    .execute(&s.pool)
    .await
    .unwrap();
    // Both rows sit at the same ctid, each in its own partition.
    let ctids: Vec<String> = sqlx::query_scalar(&format!("select ctid::text from {table} order by consumer"))
        .fetch_all(&s.pool)
        .await
        .unwrap();
    assert_eq!(ctids, ["(0,1)", "(0,1)"]);
    let r = purge_expired(&s.pool, &table, Duration::from_secs(86_400), 100, 0.0).await.unwrap();
    assert_eq!(r.rows_deleted, 1);
    let left: Vec<String> = sqlx::query_scalar(&format!("select consumer from {table}"))
        .fetch_all(&s.pool)
        .await
        .unwrap();
    assert_eq!(left, ["new"], "the fresh row of the other partition stays");
}

/// Issue 12 item 2: a purge working through a backlog reads new parameters before its next batch.
/// Raising the retention above the rows' age must stop the deleting within one batch, not after the
/// backlog is gone.
#[tokio::test]
async fn a_raised_retention_stops_a_running_purge_within_one_batch() {
    use lockstep::operator::purges::{PurgeParams, Purges};
    let s = common::pg_schema("purgeraise").await;
    let table = s.inbox("inbox").await;
    const ROWS: i64 = 200_000;
    const BATCH: i64 = 500;
    sqlx::query(&format!(
        "insert into {table} (consumer, message_id, received_at)
         select 'c', 'm-' || g, now() - interval '2 hours' from generate_series(1, {ROWS}) g"
    ))
    .execute(&s.pool)
    .await
    .unwrap();
    let count = || async {
        sqlx::query_scalar::<_, i64>(&format!("select count(*) from {table}"))
            .fetch_one(&s.pool)
            .await
            .unwrap()
    };
    let (done_tx, _done_rx) = tokio::sync::mpsc::unbounded_channel();
    let (_leading, lead_rx) = tokio::sync::watch::channel(true);
    let purges: Purges<String> = Purges::new(done_tx, Arc::new(lockstep::operator::metrics::Metrics::default()), lead_rx);
    let params = |retention| PurgeParams {
        pool_key: "k".into(),
        table: table.clone(),
        retention,
        interval: Duration::from_secs(3600),
        batch: BATCH,
        labels: purge_label(),
    };
    purges.ensure("uid", "key".into(), s.pool.clone(), params(Duration::from_secs(3600)));
    // Wait until the purge is well into the backlog.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count().await > ROWS - 5 * BATCH {
        assert!(tokio::time::Instant::now() < deadline, "the purge did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    purges.ensure("uid", "key".into(), s.pool.clone(), params(Duration::from_secs(86_400)));
    let at_change = count().await;
    assert!(
        at_change > ROWS / 2,
        "the backlog was nearly gone before the change ({at_change} left)"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = count().await;
    purges.stop("uid");
    assert!(
        at_change - after <= BATCH,
        "{} rows deleted after the retention was raised (at most one batch of {BATCH} may finish)",
        at_change - after
    );
}

/// Issue "Step 11" item 4: purge loops run only while the operator leads. A running loop stops
/// within one batch of the Lease being lost, and `ensure` (a reconcile still in flight) starts
/// nothing while not leading.
#[tokio::test]
async fn no_purge_runs_without_the_lease() {
    use lockstep::operator::purges::{PurgeParams, Purges};
    let s = common::pg_schema("purgelease").await;
    let table = s.inbox("inbox").await;
    const ROWS: i64 = 200_000;
    const BATCH: i64 = 500;
    let insert = format!(
        "insert into {table} (consumer, message_id, received_at)
         select 'c', 'm-' || g, now() - interval '2 hours' from generate_series(1, {ROWS}) g"
    );
    sqlx::query(&insert).execute(&s.pool).await.unwrap();
    let count = || async {
        sqlx::query_scalar::<_, i64>(&format!("select count(*) from {table}"))
            .fetch_one(&s.pool)
            .await
            .unwrap()
    };
    let (done_tx, _done_rx) = tokio::sync::mpsc::unbounded_channel();
    let (leading, lead_rx) = tokio::sync::watch::channel(true);
    let purges: Purges<String> = Purges::new(done_tx, Arc::new(lockstep::operator::metrics::Metrics::default()), lead_rx);
    let params = PurgeParams {
        pool_key: "k".into(),
        table: table.clone(),
        retention: Duration::from_secs(3600),
        interval: Duration::from_millis(200),
        batch: BATCH,
        labels: purge_label(),
    };
    assert!(purges.ensure("uid", "key".into(), s.pool.clone(), params.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count().await > ROWS - 5 * BATCH {
        assert!(tokio::time::Instant::now() < deadline, "the purge did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    leading.send(false).unwrap();
    let at_loss = count().await;
    assert!(at_loss > ROWS / 2, "the backlog was nearly gone before the loss ({at_loss} left)");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = count().await;
    assert!(
        at_loss - after <= BATCH,
        "{} rows deleted after the Lease was lost (at most the batch in flight may finish)",
        at_loss - after
    );
    // A reconcile still in flight asks for the loop again, with a shorter interval even.
    assert!(!purges.ensure("uid", "key".into(), s.pool.clone(), params.clone()));
    assert!(!purges.ensure("other", "key".into(), s.pool.clone(), params));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count().await, after, "a purge started after the Lease was lost");
}

fn purge_label() -> lockstep::operator::metrics::PurgeLabel {
    lockstep::operator::metrics::PurgeLabel {
        namespace: "shop".into(),
        inboxtable: "orders-inbox".into(),
        table: "billing.inbox".into(),
    }
}

/// The operator's purge series say which InboxTable and table they count (issue "Step 12").
#[tokio::test]
async fn purge_metrics_name_the_inbox_table() {
    use lockstep::operator::purges::{PurgeParams, Purges};
    let s = common::pg_schema("purgemetrics").await;
    let table = s.inbox("inbox").await;
    sqlx::query(&format!(
        "insert into {table} (consumer, message_id, received_at)
         select 'c', 'm-' || g, now() - interval '2 hours' from generate_series(1, 7) g"
    ))
    .execute(&s.pool)
    .await
    .unwrap();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let (_leading, lead_rx) = tokio::sync::watch::channel(true);
    let metrics = Arc::new(lockstep::operator::metrics::Metrics::default());
    let purges: Purges<String> = Purges::new(done_tx, metrics.clone(), lead_rx);
    let params = PurgeParams {
        pool_key: "k".into(),
        table: table.clone(),
        retention: Duration::from_secs(3600),
        interval: Duration::from_secs(3600),
        batch: 100,
        labels: purge_label(),
    };
    assert!(purges.ensure("uid", "key".into(), s.pool.clone(), params));
    tokio::time::timeout(Duration::from_secs(30), done_rx.recv())
        .await
        .unwrap()
        .unwrap();
    purges.stop("uid");
    let text = metrics.render();
    let series = r#"{namespace="shop",inboxtable="orders-inbox",table="billing.inbox"}"#;
    assert!(text.contains(&format!("lockstep_inbox_purged_rows_total{series} 7")), "{text}");
    assert!(
        text.contains(&format!("lockstep_inbox_purge_duration_seconds_count{series} 1")),
        "{text}"
    );
    assert!(
        text.contains(&format!("lockstep_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
}
