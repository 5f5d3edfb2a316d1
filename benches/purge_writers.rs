//! Writer throughput while the inbox purge deletes 1M expired rows, against writer throughput
//! without it, measured in the same run on the same table.
//!
//!   scripts/bench purge_writers        (starts the test PostgreSQL, then runs this)
//!
//! Env: DATABASE_URL (required), BENCH_ROWS (default 1000000), BENCH_WRITERS (default 4),
//! BENCH_BASELINE_SECS (default 10), BENCH_BATCH (default 5000).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use lockstep::{
    core::sql::{Ident, QualifiedName},
    inbox::Inbox,
    tables::purge::purge_expired,
    tables::schema::{migrate, TableKind},
};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Run `writers` claim loops until `stop`; returns committed claims.
async fn writers(pool: &sqlx::PgPool, inbox: &Inbox, n: u64, stop: Arc<AtomicBool>) -> u64 {
    let count = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (pool, inbox, stop, count) = (pool.clone(), inbox.clone(), stop.clone(), count.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let mut tx = pool.begin().await.expect("begin");
                    let id = uuid::Uuid::new_v4().to_string();
                    assert!(inbox.claim(&mut tx, &id).await.expect("claim"));
                    tx.commit().await.expect("commit");
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer");
    }
    count.load(Ordering::Relaxed)
}

#[tokio::main]
async fn main() {
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL: run through scripts/bench");
    let rows = env_num("BENCH_ROWS", 1_000_000);
    let n_writers = env_num("BENCH_WRITERS", 4);
    let base_secs = env_num("BENCH_BASELINE_SECS", 10);
    let batch = env_num("BENCH_BATCH", 5000) as i64;

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(n_writers as u32 + 4)
        .connect(&url)
        .await
        .expect("connect");
    let schema = format!("bench_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let table = QualifiedName {
        schema: Ident::parse(&schema).unwrap(),
        table: Ident::parse("inbox").unwrap(),
    };
    migrate(&mut pool.acquire().await.unwrap(), TableKind::Inbox, &table, true)
        .await
        .expect("migrate");
    let inbox = Inbox::for_table(table.clone(), "bench");

    let load = |pool: sqlx::PgPool, table: QualifiedName| async move {
        let t = Instant::now();
        sqlx::query(&format!(
            "insert into {table} (consumer, message_id, received_at) select 'old', 'm-' || g, now() - interval '2 days' from generate_series(1, $1) g"
        ))
        .bind(rows as i64)
        .execute(&pool)
        .await
        .expect("load expired rows");
        sqlx::query(&format!("analyze {table}")).execute(&pool).await.unwrap();
        println!("loaded {rows} expired rows in {:.1}s", t.elapsed().as_secs_f64());
    };
    load(pool.clone(), table.clone()).await;

    // Baseline: writers alone, with the expired rows present.
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let timer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(base_secs)).await;
        s2.store(true, Ordering::Relaxed);
    });
    let t = Instant::now();
    let base = writers(&pool, &inbox, n_writers, stop).await;
    timer.await.unwrap();
    let base_tps = base as f64 / t.elapsed().as_secs_f64();
    println!("writers: {n_writers}, purge batch: {batch}");
    println!("baseline writer TPS (no purge): {base_tps:.0} ({base} claims in {base_secs}s)");
    println!(
        "{:>11} {:>12} {:>10} {:>12} {:>14} {:>8}",
        "pause ratio", "writer TPS", "ratio", "purge secs", "purge rows/s", "batches"
    );

    // Writers while the purge deletes every expired row, at full speed and at lockstep's setting.
    for (i, pause) in [0.0, lockstep::tables::purge::PAUSE_RATIO].into_iter().enumerate() {
        if i > 0 {
            load(pool.clone(), table.clone()).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (p2, t2, s2) = (pool.clone(), table.clone(), stop.clone());
        let purge = tokio::spawn(async move {
            let r = purge_expired(&p2, &t2, Duration::from_secs(86_400), batch, pause)
                .await
                .expect("purge");
            s2.store(true, Ordering::Relaxed);
            r
        });
        let t = Instant::now();
        let during = writers(&pool, &inbox, n_writers, stop).await;
        let elapsed = t.elapsed().as_secs_f64();
        let result = purge.await.unwrap();
        assert_eq!(result.rows_deleted, rows as i64, "every expired row purged");
        let tps = during as f64 / elapsed;
        println!(
            "{pause:>11.1} {tps:>12.0} {:>10.2} {:>12.1} {:>14.0} {:>8}",
            tps / base_tps,
            result.duration.as_secs_f64(),
            result.rows_deleted as f64 / result.duration.as_secs_f64(),
            result.batches
        );
    }
    println!(
        "goal: writer TPS during purge / baseline >= 0.90 at lockstep's pause ratio ({})",
        lockstep::tables::purge::PAUSE_RATIO
    );
    sqlx::query(&format!("drop schema {} cascade", table.schema))
        .execute(&pool)
        .await
        .unwrap();
}
