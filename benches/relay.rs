//! The relay's drain rate R against two baselines measured in the same run: P, the producer alone
//! (same settings, same messages), and D, the SQL alone (the relay's own select and delete
//! statements). Reports R / min(P, D) and the relay's CPU time per event.
//!
//! Then measures commit-to-acknowledgement latency at 60% of R, woken by NOTIFY and by polling.
//!
//!   scripts/bench relay   (BENCH_EVENTS, default 1000000; BENCH_BATCH, default 500; BENCH_IN_FLIGHT,
//!                          default 4; BENCH_POLL, default 1s; BENCH_LATENCY_SECS, default 10;
//!                          payload ~256 bytes; 1000 keys)

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use lockstep::{
    config::{RelayArgs, RelayConfig},
    relay::{producer_config, run_with_metrics, PayloadColumn, Relay, RelayMetrics},
    schema::prepare_outbox,
};
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
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

/// Insert $2 events numbered from $1: ~256-byte JSON payloads over 1,000 keys.
fn insert_sql(table: &str) -> String {
    format!(
        "insert into {table} (id, aggregatetype, aggregateid, type, payload)
             select gen_random_uuid(), 'order', 'k-' || (g % 1000), 'created', jsonb_build_object('n', g, 'pad', repeat('x', 230))
             from generate_series($1::bigint, $1::bigint + $2::bigint - 1) g"
    )
}

async fn load(pool: &sqlx::PgPool, table: &str, n: i64) {
    let t = Instant::now();
    for start in (0..n).step_by(50_000) {
        let count = 50_000.min(n - start);
        sqlx::query(&insert_sql(table))
            .bind(start)
            .bind(count)
            .execute(pool)
            .await
            .expect("load");
    }
    println!("loaded {n} events in {:.1}s", t.elapsed().as_secs_f64());
}

/// Commit events at `rate` per second for `dur`: every 10 ms, one transaction per writer connection
/// inserts its share. Returns how many were written.
async fn write_at(pool: &sqlx::PgPool, table: &str, rate: f64, dur: Duration) -> u64 {
    const WRITERS: usize = 4;
    let per_tick = rate / 100.0 / WRITERS as f64;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let pool = pool.clone();
            let sql = insert_sql(table);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let end = Instant::now() + dur;
                let (mut owed, mut written) = (0.0f64, 0u64);
                while Instant::now() < end {
                    tick.tick().await;
                    owed += per_tick;
                    let k = owed.floor() as i64;
                    if k == 0 {
                        continue;
                    }
                    owed -= k as f64;
                    sqlx::query(&sql)
                        .bind((w as i64) << 40 | written as i64)
                        .bind(k)
                        .execute(&pool)
                        .await
                        .expect("insert");
                    written += k as u64;
                }
                written
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

/// The relay configuration the bench runs with: its own schema and topic, BENCH_* settings.
fn config(schema: &str, topic: &str) -> RelayConfig {
    let batch = std::env::var("BENCH_BATCH").unwrap_or_else(|_| "500".into());
    let in_flight = std::env::var("BENCH_IN_FLIGHT").unwrap_or_else(|_| "4".into());
    let poll = std::env::var("BENCH_POLL").unwrap_or_else(|_| "1s".into());
    let args = Wrap::parse_from([
        "bench",
        "--schema",
        schema,
        "--table",
        "outbox",
        "--topic",
        topic,
        "--metrics-addr",
        "127.0.0.1:0",
        "--batch-size",
        &batch,
        "--max-batches-in-flight",
        &in_flight,
        "--poll-interval",
        &poll,
    ]);
    args.relay.resolve().expect("config")
}

/// P: the producer alone, same settings, same messages (key, ~256-byte payload, headers id and
/// type), whole run in flight. Events per second.
async fn producer_rate(cfg: &RelayConfig, topic: &str, n: i64) -> f64 {
    let producer: FutureProducer = producer_config(cfg).create().unwrap();
    let payload = format!("{{\"n\": 0, \"pad\": \"{}\"}}", "x".repeat(230));
    let started = Instant::now();
    let mut pending = Vec::with_capacity(n as usize);
    for i in 0..n {
        let key = format!("k-{}", i % 1000);
        let id = uuid::Uuid::new_v4().to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "id",
                value: Some(id.as_bytes()),
            })
            .insert(Header {
                key: "type",
                value: Some("created".as_bytes()),
            });
        loop {
            match producer.send_result(FutureRecord::to(topic).key(&key).payload(&payload).headers(headers.clone())) {
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
    n as f64 / started.elapsed().as_secs_f64()
}

/// D: the relay's own select + delete statements over `n` loaded events, no Kafka.
async fn sql_rate(pool: &sqlx::PgPool, cfg: &RelayConfig, payload: PayloadColumn, n: i64) -> f64 {
    load(pool, &cfg.resolved.table.to_string(), n).await;
    let tables = lockstep::schema::OutboxTables {
        payload,
        dead_letter_payload: payload,
        channel: String::new(),
    };
    let relay = Relay::new(cfg.clone(), Arc::new(RelayMetrics::default()), &tables).unwrap();
    let (select_sql, done_sql) = relay.statements();
    let mut conn = pool.acquire().await.unwrap();
    let started = Instant::now();
    let empty: Vec<String> = vec![];
    loop {
        let ids: Vec<uuid::Uuid> = sqlx::query(select_sql)
            .bind(i64::from(cfg.resolved.batch_size))
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
    n as f64 / started.elapsed().as_secs_f64()
}

/// R: the relay draining `n` loaded events. Progress comes from the relay's own counter, so the
/// bench puts no load on the database while it measures. Events per second and CPU seconds.
async fn relay_rate(pool: &sqlx::PgPool, cfg: &RelayConfig, n: i64) -> (f64, f64) {
    let table = cfg.resolved.table.to_string();
    load(pool, &table, n).await;
    let metrics = Arc::new(RelayMetrics::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    let task = tokio::spawn(run_with_metrics(cfg.clone(), stop.clone(), metrics.clone()));
    while metrics.published.get() < n as u64 {
        assert!(!task.is_finished(), "relay stopped early");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    stop.cancel();
    task.await.unwrap().unwrap();
    let left: i64 = sqlx::query_scalar(&format!("select count(*) from {table}"))
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "published counter reached {n} but rows are left");
    (n as f64 / elapsed, cpu)
}

/// Latency: writers commit events at `rate` while the relay runs, once woken by NOTIFY and once by
/// polling alone. Latency = broker acknowledgement time - created_at (the writer's transaction
/// start), so it includes the commit itself.
async fn latencies(pool: &sqlx::PgPool, cfg: &RelayConfig, rate: f64, secs: f64) {
    let table = cfg.resolved.table.to_string();
    let modes: &[(&str, bool)] = if secs > 0.0 { &[("NOTIFY", true), ("polling", false)] } else { &[] };
    for &(label, listen) in modes {
        let mut c = cfg.clone();
        c.listen = listen;
        let metrics = Arc::new(RelayMetrics::with_latency_samples());
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(run_with_metrics(c, stop.clone(), metrics.clone()));
        // Let it take the lock and settle before measuring.
        tokio::time::sleep(Duration::from_secs(1)).await;
        metrics.take_latency_samples();
        let written = write_at(pool, &table, rate, Duration::from_secs_f64(secs)).await;
        while metrics.published.get() < written {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        task.await.unwrap().unwrap();
        let mut l = metrics.take_latency_samples();
        l.sort_by(f64::total_cmp);
        let pct = |p: f64| l[((l.len() as f64 * p) as usize).min(l.len() - 1)] * 1e3;
        println!(
            "  {label:<8} (poll interval {:?}): p50 {:>7.1} ms   p99 {:>7.1} ms   ({} events)",
            cfg.resolved.poll_interval,
            pct(0.50),
            pct(0.99),
            l.len()
        );
    }
}

#[tokio::main]
async fn main() {
    let n: i64 = std::env::var("BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL: run through scripts/bench");
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP_SERVERS").expect("KAFKA_BOOTSTRAP_SERVERS");
    let schema = format!("bench_relay_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let topic = format!("bench.relay.{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let cfg = config(&schema, &topic);
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&url).await.unwrap();
    let admin = lockstep::kafka::Admin::new(&bootstrap, &Default::default(), Duration::from_secs(10)).unwrap();
    admin.create_topic(&topic, 6, 1, &Default::default()).await.unwrap();
    let r = &cfg.resolved;
    let tables = prepare_outbox(&mut pool.acquire().await.unwrap(), &r.table, &r.dead_letter_table, true)
        .await
        .unwrap();

    let p_rate = producer_rate(&cfg, &topic, n).await;
    let d_rate = sql_rate(&pool, &cfg, tables.payload, n).await;
    let (r_rate, cpu) = relay_rate(&pool, &cfg, n).await;
    println!(
        "events: {n}, payload ~256 B, 1000 keys, 6 partitions, batch {}, batches in flight {}",
        r.batch_size, cfg.max_batches_in_flight
    );
    println!("P producer only:        {p_rate:>10.0} events/s");
    println!("D SQL read+delete only: {d_rate:>10.0} events/s");
    println!("R relay drain:          {r_rate:>10.0} events/s");
    println!("R / min(P, D) = {:.2} (goal >= 0.85)", r_rate / p_rate.min(d_rate));
    println!(
        "relay CPU: {:.1} us/event (this process; includes librdkafka threads)",
        cpu * 1e6 / n as f64
    );

    let rate = 0.6 * r_rate;
    let secs: f64 = std::env::var("BENCH_LATENCY_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10.0);
    println!("commit-to-ack latency at {rate:.0} events/s (60% of R), {secs}s each, writers commit every 10 ms:");
    latencies(&pool, &cfg, rate, secs).await;
    sqlx::query(&format!("drop schema \"{schema}\" cascade"))
        .execute(&pool)
        .await
        .unwrap();
}
