//! The relay's drain rate R against two baselines measured in the same run: P, the producer alone
//! (same settings, same messages), and D, the SQL alone (the relay's own select and delete
//! statements). Reports R / min(P, D) and the relay's CPU time per event.
//!
//!   scripts/bench relay            (BENCH_EVENTS, default 200000; BENCH_BATCH, default 500;
//!                                   payload 256 bytes; 1000 keys)

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use lockstep::{
    config::RelayArgs,
    relay::{producer_config, Relay, RelayMetrics},
    schema::{migrate, TableKind},
};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::Row;

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    relay: RelayArgs,
}

fn cpu_seconds() -> f64 {
    // utime + stime of this process, from /proc (Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

async fn load(pool: &sqlx::PgPool, table: &str, n: i64) {
    let t = Instant::now();
    for start in (0..n).step_by(50_000) {
        let count = 50_000.min(n - start);
        sqlx::query(&format!(
            "insert into {table} (id, aggregatetype, aggregateid, type, payload)
             select gen_random_uuid(), 'order', 'k-' || (g % 1000), 'created', jsonb_build_object('n', g, 'pad', repeat('x', 230))
             from generate_series($1::bigint, $1::bigint + $2::bigint - 1) g"
        ))
        .bind(start)
        .bind(count)
        .execute(pool)
        .await
        .expect("load");
    }
    println!("loaded {n} events in {:.1}s", t.elapsed().as_secs_f64());
}

#[tokio::main]
async fn main() {
    let n: i64 = std::env::var("BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL: run through scripts/bench");
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP_SERVERS").expect("KAFKA_BOOTSTRAP_SERVERS");
    let schema = format!("bench_relay_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let topic = format!("bench.relay.{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let batch = std::env::var("BENCH_BATCH").unwrap_or_else(|_| "500".into());
    let args = Wrap::parse_from([
        "bench",
        "--schema",
        &schema,
        "--table",
        "outbox",
        "--topic",
        &topic,
        "--metrics-addr",
        "127.0.0.1:0",
        "--poll-interval",
        "100ms",
        "--batch-size",
        &batch,
    ]);
    let cfg = args.relay.resolve().expect("config");
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&url).await.unwrap();
    let admin = lockstep::kafka::Admin::new(&bootstrap, &Default::default(), Duration::from_secs(10)).unwrap();
    admin.create_topic(&topic, 6, 1, &Default::default()).await.unwrap();
    let t = &cfg.resolved.table;
    migrate(&mut pool.acquire().await.unwrap(), TableKind::Outbox, t, true)
        .await
        .unwrap();
    migrate(
        &mut pool.acquire().await.unwrap(),
        TableKind::DeadLetter,
        &cfg.resolved.dead_letter_table,
        true,
    )
    .await
    .unwrap();
    let table = t.to_string();

    // P: the producer alone, same settings, same-sized messages, whole run in flight.
    let producer: FutureProducer = producer_config(&cfg).create().unwrap();
    let payload = format!("{{\"n\": 0, \"pad\": \"{}\"}}", "x".repeat(230));
    let started = Instant::now();
    let mut pending = Vec::with_capacity(n as usize);
    for i in 0..n {
        let key = format!("k-{}", i % 1000);
        loop {
            match producer.send_result(FutureRecord::to(&topic).key(&key).payload(&payload)) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
    for f in pending {
        f.await.unwrap().unwrap();
    }
    let p_rate = n as f64 / started.elapsed().as_secs_f64();

    // D: the relay's own select + delete statements, no Kafka.
    load(&pool, &table, n).await;
    let relay = Relay::new(cfg.clone(), Arc::new(RelayMetrics::default()), false).unwrap();
    let (select_sql, done_sql) = relay.statements();
    let mut conn = pool.acquire().await.unwrap();
    let started = Instant::now();
    let empty: Vec<String> = vec![];
    loop {
        let ids: Vec<uuid::Uuid> = sqlx::query(select_sql)
            .bind(i64::from(cfg.spec.relay.batch_size))
            .bind(&empty)
            .fetch_all(&mut *conn)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get("id"))
            .collect();
        if ids.is_empty() {
            break;
        }
        sqlx::query(done_sql).bind(&ids).execute(&mut *conn).await.unwrap();
    }
    let d_rate = n as f64 / started.elapsed().as_secs_f64();
    drop(conn);

    // R: the relay draining the same number of events.
    load(&pool, &table, n).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    let task = tokio::spawn(lockstep::relay::run(cfg.clone(), true, stop.clone()));
    loop {
        let left: i64 = sqlx::query_scalar(&format!("select count(*) from {table}"))
            .fetch_one(&pool)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    stop.cancel();
    task.await.unwrap().unwrap();
    let r_rate = n as f64 / elapsed;

    println!(
        "events: {n}, payload ~256 B, 1000 keys, 6 partitions, batch {}",
        cfg.spec.relay.batch_size
    );
    println!("P producer only:        {p_rate:>10.0} events/s");
    println!("D SQL read+delete only: {d_rate:>10.0} events/s");
    println!("R relay drain:          {r_rate:>10.0} events/s");
    println!("R / min(P, D) = {:.2} (goal >= 0.85)", r_rate / p_rate.min(d_rate));
    println!(
        "relay CPU: {:.1} us/event (this process; includes librdkafka threads)",
        cpu * 1e6 / n as f64
    );
    println!("not measured yet: commit-to-ack latency p50/p99 at 60% of R, NOTIFY vs polling");
    sqlx::query(&format!("drop schema \"{schema}\" cascade"))
        .execute(&pool)
        .await
        .unwrap();
}
