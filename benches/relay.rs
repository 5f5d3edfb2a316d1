//! The relay's drain rate R against two baselines measured in the same run: P, the producer alone
//! (same settings, same messages), and D, the SQL alone (the relay's own select and delete
//! statements). Reports R / min(P, D) and the relay's CPU time per event.
//!
//! Then measures commit-to-acknowledgement latency at 60% of R, woken by NOTIFY and by polling,
//! against two baselines at the same rate: the producer alone (send to acknowledgement), and the
//! dual write (the same writers publish their events themselves after commit: transaction start to
//! acknowledgement, the same span the relay's latency covers); and, with cleanup
//! MarkPublished, R with 1M published rows kept in the table against R with none.
//!
//!   scripts/bench relay   (BENCH_EVENTS, default 1000000; BENCH_BATCH, default 500; BENCH_IN_FLIGHT,
//!                          default 16; BENCH_POLL, default 1s; BENCH_LATENCY_SECS, default 10;
//!                          BENCH_LATENCY_ROUNDS, default 4;
//!                          BENCH_MARKED_EVENTS, default BENCH_EVENTS/4; BENCH_KEPT, default
//!                          1000000; BENCH_PLACEMENT, shared (default), split: PostgreSQL and the
//!                          writers on core 0, the relay, every producer and the broker on core 1,
//!                          or broker-apart: the broker alone on core 1, the rest on core 0;
//!                          BENCH_SPLIT_EVENTS, default BENCH_EVENTS/4, BENCH_SPLIT_ROUNDS, default 3:
//!                          R with 1, 2 and 3 relays over 64 buckets;
//!                          payload ~256 bytes; 1000 keys)

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

#[path = "support/placement.rs"]
mod placement;
#[path = "support/sql_alone.rs"]
mod sql_alone;

use clap::Parser;
use lockstep::{
    config::{RelayArgs, RelayConfig},
    relay::{producer_config, run_with_metrics, PayloadColumn, RelayMetrics, Samples},
    tables::schema::prepare_outbox,
};
use placement::{on_publisher, place, relay_runtime, Placement};
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};

/// The side that publishes: where the relay runs and every producer is made (see `Placement`).
#[derive(Clone)]
struct Side {
    placement: Placement,
    rt: tokio::runtime::Handle,
}

impl Side {
    fn producer(&self, cfg: &RelayConfig) -> FutureProducer {
        let config = producer_config(cfg);
        on_publisher(self.placement, move || config.create().unwrap())
    }
}

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

/// The ~256-byte JSON payload the bench's messages carry (the rows' own, as `insert_sql` builds them).
fn payload() -> String {
    format!("{{\"n\": 0, \"pad\": \"{}\"}}", "x".repeat(230))
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
/// inserts its share. Returns how many were written, and each transaction's duration (insert and
/// commit: part of the relay's latency, which starts at the row's created_at, the transaction's start).
///
/// With `direct`, each writer also publishes its events itself right after the commit (the dual
/// write the outbox replaces) and the third value holds each event's transaction start to
/// acknowledgement: the baseline for the relay's commit-to-acknowledgement latency, under the
/// same writer load on the database.
async fn write_at(pool: &sqlx::PgPool, table: &str, rate: f64, dur: Duration, direct: Option<(&Timed, &str)>) -> (u64, Vec<f64>, Vec<f64>) {
    const WRITERS: usize = 4;
    let per_tick = rate / 100.0 / WRITERS as f64;
    let payload = payload();
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let pool = pool.clone();
            let sql = insert_sql(table);
            let direct = direct.map(|(p, t)| (p.clone(), t.to_owned()));
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let end = Instant::now() + dur;
                let (mut owed, mut written, mut took, mut acks) = (0.0f64, 0u64, Vec::new(), Vec::new());
                while Instant::now() < end {
                    tick.tick().await;
                    owed += per_tick;
                    let k = owed.floor() as i64;
                    if k == 0 {
                        continue;
                    }
                    owed -= k as f64;
                    let first = (w as i64) << 40 | written as i64;
                    let t = Instant::now();
                    sqlx::query(&sql).bind(first).bind(k).execute(&pool).await.expect("insert");
                    took.push(t.elapsed().as_secs_f64());
                    written += k as u64;
                    let Some((producer, topic)) = &direct else { continue };
                    for g in first..first + k {
                        acks.push(producer.send(topic, g, &payload, t));
                    }
                }
                (written, took, acked(acks).await)
            })
        })
        .collect();
    let (mut total, mut took, mut latencies) = (0, Vec::new(), Vec::new());
    for t in tasks {
        let (w, d, l) = t.await.unwrap();
        total += w;
        took.extend(d);
        latencies.extend(l);
    }
    (total, took, latencies)
}

/// The relay configuration the bench runs with: its own schema and topic, BENCH_* settings.
fn config(schema: &str, topic: &str, extra: &[&str]) -> RelayConfig {
    let batch = std::env::var("BENCH_BATCH").unwrap_or_else(|_| "500".into());
    let in_flight = std::env::var("BENCH_IN_FLIGHT").unwrap_or_else(|_| "16".into());
    let poll = std::env::var("BENCH_POLL").unwrap_or_else(|_| "1s".into());
    let base = [
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
    ];
    Wrap::parse_from(base.iter().chain(extra)).relay.resolve().expect("config")
}

/// The headers the relay sends: a fresh `id`, and `type`.
pub fn relay_headers() -> OwnedHeaders {
    let id = uuid::Uuid::new_v4().to_string();
    OwnedHeaders::new()
        .insert(Header {
            key: "id",
            value: Some(id.as_bytes()),
        })
        .insert(Header {
            key: "type",
            value: Some("created".as_bytes()),
        })
}

/// P: the producer alone, same settings, same messages (key, ~256-byte payload, headers id and
/// type), whole run in flight. Events per second.
async fn producer_rate(side: &Side, cfg: &RelayConfig, topic: &str, n: i64) -> f64 {
    let producer = side.producer(cfg);
    let payload = payload();
    let started = Instant::now();
    let mut pending = Vec::with_capacity(n as usize);
    for i in 0..n {
        let key = format!("k-{}", i % 1000);
        let headers = relay_headers();
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

/// A producer with metadata and a connection to every partition leader, as the relay's is before
/// it is measured.
async fn warm_producer(side: &Side, cfg: &RelayConfig, topic: &str) -> Timed {
    let producer = side.producer(cfg);
    let payload = payload();
    let warm: Vec<_> = (0..1000)
        .map(|i| {
            let key = format!("k-{i}");
            producer
                .send_result(FutureRecord::to(topic).key(&key).payload(&payload))
                .map_err(|_| ())
                .unwrap()
        })
        .collect();
    for f in warm {
        f.await.unwrap().unwrap();
    }
    Timed {
        producer,
        rt: side.rt.clone(),
    }
}

/// The dual write at `rate` for `secs`: the same writers commit the same rows, and each publishes
/// its events right after its commit. Transaction start to acknowledgement, in seconds, and the
/// writers' transaction durations. The rows are removed afterwards (no relay runs).
async fn direct_latencies(side: &Side, pool: &sqlx::PgPool, cfg: &RelayConfig, topic: &str, rate: f64, secs: f64) -> (Vec<f64>, Vec<f64>) {
    let producer = warm_producer(side, cfg, topic).await;
    let table = cfg.resolved.table.to_string();
    let (_, took, l) = write_at(pool, &table, rate, Duration::from_secs_f64(secs), Some((&producer, topic))).await;
    sqlx::query(&format!("truncate {table}")).execute(pool).await.unwrap();
    (l, took)
}

/// The producer alone at `rate` for `secs`, sending each 10 ms tick's share at once (as the relay
/// sends a batch): send-to-acknowledgement latencies, in seconds.
async fn producer_latencies(side: &Side, cfg: &RelayConfig, topic: &str, rate: f64, secs: f64) -> Vec<f64> {
    let producer = warm_producer(side, cfg, topic).await;
    let payload = payload();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let (mut owed, mut i) = (0.0f64, 0u64);
    let mut acks = Vec::new();
    while Instant::now() < end {
        tick.tick().await;
        owed += rate / 100.0;
        while owed >= 1.0 {
            owed -= 1.0;
            i += 1;
            acks.push(producer.send(topic, i as i64, &payload, Instant::now()));
        }
    }
    acked(acks).await
}

/// A baseline's producer, whose acknowledgements are awaited and stamped on the publishing
/// side's runtime, as the relay's are on its own.
#[derive(Clone)]
struct Timed {
    producer: FutureProducer,
    rt: tokio::runtime::Handle,
}

impl Timed {
    /// Send event `n` (key k-(n mod 1000), the relay's headers); the task yields the time from
    /// `since` to its acknowledgement, in seconds.
    fn send(&self, topic: &str, n: i64, payload: &str, since: Instant) -> tokio::task::JoinHandle<f64> {
        let key = format!("k-{}", n % 1000);
        let f = self
            .producer
            .send_result(FutureRecord::to(topic).key(&key).payload(payload).headers(relay_headers()))
            .map_err(|_| ())
            .expect("queue full at the latency rate");
        self.rt.spawn(async move {
            f.await.unwrap().unwrap();
            since.elapsed().as_secs_f64()
        })
    }
}

async fn acked(acks: Vec<tokio::task::JoinHandle<f64>>) -> Vec<f64> {
    let mut l = Vec::with_capacity(acks.len());
    for a in acks {
        l.push(a.await.unwrap());
    }
    l
}

/// p50 and p99 in milliseconds.
fn percentiles(mut l: Vec<f64>) -> (f64, f64) {
    l.sort_by(f64::total_cmp);
    let pct = |p: f64| l[((l.len() as f64 * p) as usize).min(l.len() - 1)] * 1e3;
    (pct(0.50), pct(0.99))
}

/// D: the relay's own select + delete statements over `n` loaded events, no Kafka.
async fn sql_rate(pool: &sqlx::PgPool, cfg: &RelayConfig, payload: PayloadColumn, n: i64) -> f64 {
    load(pool, &cfg.resolved.table.to_string(), n).await;
    sql_alone::rate(pool, cfg, payload, n).await
}

/// R: the relay draining `n` loaded events. Progress comes from the relay's own counter, so the
/// bench puts no load on the database while it measures. Events per second and CPU seconds.
async fn relay_rate(side: &Side, pool: &sqlx::PgPool, cfg: &RelayConfig, n: i64) -> (f64, f64) {
    let table = cfg.resolved.table.to_string();
    load(pool, &table, n).await;
    // Statistics as autovacuum would have them once the rows have been there a while.
    sqlx::query(&format!("analyze {table}")).execute(pool).await.unwrap();
    let metrics = Arc::new(RelayMetrics::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    let task = side.rt.spawn(run_with_metrics(cfg.clone(), stop.clone(), metrics.clone()));
    while metrics.published.get() < n as u64 {
        assert!(!task.is_finished(), "relay stopped early");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    stop.cancel();
    task.await.unwrap().unwrap();
    let left: i64 = sqlx::query_scalar(&format!("select count(*) from {table} where published_at is null"))
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "published counter reached {n} but rows are left");
    (n as f64 / elapsed, cpu)
}

/// R with `relays` relays sharing `buckets` buckets: the relays run and share the buckets before
/// the `n` events come, in one transaction, and R runs from its commit to the last
/// acknowledgement. Events per second, and this process's CPU seconds over that span.
async fn shared_rate(side: &Side, pool: &sqlx::PgPool, cfg: &RelayConfig, n: i64, relays: usize, buckets: u16) -> (f64, f64) {
    let mut cfg = cfg.clone();
    cfg.resolved.buckets = buckets;
    let table = cfg.resolved.table.to_string();
    let stop = tokio_util::sync::CancellationToken::new();
    let metrics: Vec<Arc<RelayMetrics>> = (0..relays).map(|_| Arc::new(RelayMetrics::default())).collect();
    let tasks: Vec<_> = metrics
        .iter()
        .map(|m| side.rt.spawn(run_with_metrics(cfg.clone(), stop.clone(), m.clone())))
        .collect();
    let fair = i64::from(buckets) / relays as i64;
    let settled = || match buckets {
        1 => metrics.iter().any(|m| m.active.get() == 1),
        _ => {
            metrics.iter().all(|m| m.buckets_owned.get() >= fair)
                && metrics.iter().map(|m| m.buckets_owned.get()).sum::<i64>() == i64::from(buckets)
        }
    };
    let waiting = Instant::now();
    while !settled() {
        assert!(waiting.elapsed() < Duration::from_secs(60), "the relays did not share the buckets");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(&insert_sql(&table)).bind(0i64).bind(n).execute(&mut *tx).await.unwrap();
    sqlx::query(&format!("analyze {table}")).execute(&mut *tx).await.unwrap();
    let cpu0 = cpu_seconds();
    tx.commit().await.unwrap();
    let started = Instant::now();
    while metrics.iter().map(|m| m.published.get()).sum::<u64>() < n as u64 {
        assert!(tasks.iter().all(|t| !t.is_finished()), "a relay stopped early");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    stop.cancel();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    (n as f64 / elapsed, cpu)
}

/// R with 1, 2 and 3 relays over 64 buckets, and 1 relay without buckets, in interleaved rounds:
/// the mean of each against min(P, D), and CPU per event against one relay without buckets.
async fn split_rates(side: &Side, pool: &sqlx::PgPool, cfg: &RelayConfig, n: i64, pd: f64, rounds: usize) {
    let shapes: [(usize, u16); 4] = [(1, 1), (1, 64), (2, 64), (3, 64)];
    let mut rates = vec![Vec::new(); shapes.len()];
    let mut cpus = vec![Vec::new(); shapes.len()];
    for _ in 0..rounds {
        for (i, (relays, buckets)) in shapes.iter().enumerate() {
            let (r, cpu) = shared_rate(side, pool, cfg, n, *relays, *buckets).await;
            rates[i].push(r);
            cpus[i].push(cpu * 1e6 / n as f64);
        }
    }
    println!("{n} events per drain, {rounds} interleaved rounds, relays in this process:");
    let base_cpu = cpus[0].iter().sum::<f64>() / rounds as f64;
    for (i, (relays, buckets)) in shapes.iter().enumerate() {
        let (r, ri) = mean_with_interval(&rates[i]);
        let cpu = cpus[i].iter().sum::<f64>() / rounds as f64;
        println!(
            "  {relays} relay(s), {buckets:>2} bucket(s): R {r:>8.0} +/- {ri:.0} events/s, R / min(P, D) = {:.2}, CPU {cpu:.1} us/event ({:.2}x one relay without buckets)",
            r / pd,
            cpu / base_cpu
        );
    }
}

/// Latency: writers commit events at `rate` for `secs` while the relay runs, woken by NOTIFY or
/// by polling alone. Latency = broker acknowledgement time - created_at (the writer's transaction
/// start), so it includes the commit itself. The latencies, in seconds, and the writers'
/// transaction durations (and, in the samples, created_at to the read that took the row).
async fn relay_latencies(side: &Side, pool: &sqlx::PgPool, cfg: &RelayConfig, rate: f64, secs: f64, listen: bool) -> (Samples, Vec<f64>) {
    let table = cfg.resolved.table.to_string();
    let mut c = cfg.clone();
    c.listen = listen;
    let metrics = Arc::new(RelayMetrics::with_latency_samples());
    let stop = tokio_util::sync::CancellationToken::new();
    let task = side.rt.spawn(run_with_metrics(c, stop.clone(), metrics.clone()));
    // Let it take the lock and settle before measuring.
    tokio::time::sleep(Duration::from_secs(1)).await;
    metrics.take_latency_samples();
    let (written, took, _) = write_at(pool, &table, rate, Duration::from_secs_f64(secs), None).await;
    while metrics.published.get() < written {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    task.await.unwrap().unwrap();
    (metrics.take_latency_samples(), took)
}

/// The latency part: the producer alone once, then `rounds` pairs of windows, the dual write then
/// the relay woken by NOTIFY (interleaved, so both see the same drift of a shared machine: a
/// single window's p99 moves by tens of milliseconds from run to run here), then polling once.
async fn latencies(side: &Side, pool: &sqlx::PgPool, cfg: &RelayConfig, topic: &str, rate: f64, secs: f64, rounds: usize) {
    println!(
        "latency at {rate:.0} events/s (60% of R), windows of {secs}s, sent every 10 ms ({}):",
        side.placement.describe()
    );
    let show = |label: &str, l: &[f64], took: &[f64]| {
        let (p50, p99) = percentiles(l.to_vec());
        let writers = match took {
            [] => String::new(),
            _ => {
                let (w50, w99) = percentiles(took.to_vec());
                format!("  (writer tx p50 {w50:.1} ms, p99 {w99:.1} ms)")
            }
        };
        println!("  {label:<44} p50 {p50:>6.1} ms  p99 {p99:>6.1} ms{writers}");
        p99
    };
    let alone = producer_latencies(side, cfg, topic, rate, secs).await;
    show("producer only, no writers (send to ack)", &alone, &[]);
    let (mut direct_all, mut relay_all, mut read_all, mut added) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut base99 = Vec::new();
    for round in 1..=rounds {
        let (direct, took) = direct_latencies(side, pool, cfg, topic, rate, secs).await;
        let d99 = show(&format!("round {round}: dual write (tx start to ack)"), &direct, &took);
        let (relay, took) = relay_latencies(side, pool, cfg, rate, secs, true).await;
        let r99 = show(
            &format!("round {round}: relay, NOTIFY (created_at to ack)"),
            &relay.commit_to_ack,
            &took,
        );
        show_stages(&relay.stages);
        added.push(r99 - d99);
        base99.push(d99);
        direct_all.extend(direct);
        relay_all.extend(relay.commit_to_ack);
        read_all.extend(relay.commit_to_read);
    }
    let (relay, took) = relay_latencies(side, pool, cfg, rate, secs, false).await;
    show(
        &format!("relay, polling only (poll interval {:?})", cfg.resolved.poll_interval),
        &relay.commit_to_ack,
        &took,
    );
    let d99 = show("all rounds: dual write", &direct_all, &[]);
    let r99 = show("all rounds: relay, NOTIFY", &relay_all, &[]);
    show("  of which created_at to the relay's read", &read_all, &[]);
    added.sort_by(f64::total_cmp);
    let each: Vec<String> = added.iter().map(|a| format!("{a:.1}")).collect();
    println!(
        "  added by the relay (NOTIFY p99 - dual-write p99, all rounds) = {:.1} ms (goal <= 10 ms); per round, sorted: {} ms",
        r99 - d99,
        each.join(", ")
    );
    let (mean, half) = mean_with_interval(&added);
    base99.sort_by(f64::total_cmp);
    println!(
        "  per round: mean {mean:.1} ms, 95% interval +/- {half:.1} ms ({} rounds); the dual write's own p99 ranged {:.1} to {:.1} ms across rounds",
        added.len(),
        base99[0],
        base99[base99.len() - 1]
    );
}

/// Where the relay's rows spent their time (`lockstep::relay::stages`): each stage's p50 over all
/// rows, then its mean over the rows whose created_at-to-ack is in the slowest 1%, so a wait in
/// the tail shows in the stage that holds it.
fn show_stages(stages: &[lockstep::relay::stages::Stages]) {
    use lockstep::relay::stages::STAGES;
    if stages.is_empty() {
        return;
    }
    let ms = |x: f64| x * 1000.0;
    let p50: Vec<String> = (0..STAGES.len())
        .map(|k| {
            let mut v: Vec<f64> = stages.iter().map(|s| s[k]).collect();
            v.sort_by(f64::total_cmp);
            format!("{} {:.1}", STAGES[k], ms(v[v.len() / 2]))
        })
        .collect();
    let mut by_total: Vec<&lockstep::relay::stages::Stages> = stages.iter().collect();
    by_total.sort_by(|a, b| a[..4].iter().sum::<f64>().total_cmp(&b[..4].iter().sum::<f64>()));
    let tail = &by_total[by_total.len() - by_total.len().div_ceil(100)..];
    let mean: Vec<String> = (0..STAGES.len())
        .map(|k| {
            format!(
                "{} {:.1}",
                STAGES[k],
                ms(tail.iter().map(|s| s[k]).sum::<f64>() / tail.len() as f64)
            )
        })
        .collect();
    println!("    stages p50 (ms): {}", p50.join(", "));
    println!("    slowest 1% ({} rows), mean (ms): {}", tail.len(), mean.join(", "));
}

/// The mean of `x` and the half-width of its 95% confidence interval (Student's t): how far a
/// window-to-window difference can be trusted when each window's p99 moves by tens of ms.
fn mean_with_interval(x: &[f64]) -> (f64, f64) {
    const T975: [f64; 20] = [
        12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13, 2.12, 2.11, 2.10, 2.09, 2.09,
    ];
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    if x.len() < 2 {
        return (mean, f64::INFINITY);
    }
    let sd = (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let t = T975.get(x.len() - 2).copied().unwrap_or(2.0);
    (mean, t * sd / n.sqrt())
}

/// Cleanup MarkPublished: R with `kept` published rows in the table (kept for publishedRetention)
/// against R with none, `n` events each, in fresh tables.
async fn marked_rates(side: &Side, pool: &sqlx::PgPool, topic: &str, n: i64, kept: i64) {
    let mut rates = Vec::new();
    for k in [0, kept] {
        let schema = format!("bench_marked_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let cfg = config(&schema, topic, &["--cleanup", "mark-published", "--published-retention", "7d"]);
        let r = &cfg.resolved;
        let mut c = pool.acquire().await.unwrap();
        prepare_outbox(&mut c, &r.table, &r.dead_letter_table, true).await.unwrap();
        lockstep::tables::schema::ensure_published_indexes(&mut c, &r.table, true)
            .await
            .unwrap();
        drop(c);
        let table = r.table.to_string();
        for start in (0..k).step_by(100_000) {
            sqlx::query(&format!(
                "insert into {table} (id, aggregatetype, aggregateid, type, payload, published_at)
                 select gen_random_uuid(), 'order', 'k-' || (g % 1000), 'created', jsonb_build_object('n', g, 'pad', repeat('x', 230)), now()
                 from generate_series($1::bigint, $1::bigint + $2::bigint - 1) g"
            ))
            .bind(start)
            .bind(100_000.min(k - start))
            .execute(pool)
            .await
            .unwrap();
        }
        let (rate, _) = relay_rate(side, pool, &cfg, n).await;
        println!("  {k:>8} published rows kept: R {rate:>8.0} events/s");
        rates.push(rate);
        sqlx::query(&format!("drop schema \"{schema}\" cascade"))
            .execute(pool)
            .await
            .unwrap();
    }
    println!(
        "  R with {kept} kept / R with none = {:.2} (goal >= 0.90: flat)",
        rates[1] / rates[0]
    );
}

#[tokio::main]
async fn main() {
    let n: i64 = std::env::var("BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL: run through scripts/bench");
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP_SERVERS").expect("KAFKA_BOOTSTRAP_SERVERS");
    let schema = format!("bench_relay_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let topic = format!("bench.relay.{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let cfg = config(&schema, &topic, &[]);
    let placement = match std::env::var("BENCH_PLACEMENT").as_deref() {
        Ok("split") => Placement::Split,
        Ok("broker-apart") => Placement::BrokerApart,
        Ok("shared") | Err(_) => Placement::Shared,
        Ok(other) => panic!("BENCH_PLACEMENT={other}: shared, split or broker-apart"),
    };
    // Placed first: `place` pins every thread this process has so far (the writers' runtime,
    // and any Kafka client's) to the database's core.
    place(placement);
    let own_rt = placement.own_runtime().then(|| relay_runtime(placement));
    let side = Side {
        placement,
        rt: own_rt
            .as_ref()
            .map_or_else(tokio::runtime::Handle::current, |rt| rt.handle().clone()),
    };
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&url).await.unwrap();
    let admin = lockstep::clients::kafka::Admin::new(&bootstrap, &Default::default(), Duration::from_secs(10)).unwrap();
    admin.create_topic(&topic, 6, 1, &Default::default()).await.unwrap();
    let r = &cfg.resolved;
    let tables = prepare_outbox(&mut pool.acquire().await.unwrap(), &r.table, &r.dead_letter_table, true)
        .await
        .unwrap();

    let p_rate = producer_rate(&side, &cfg, &topic, n).await;
    let d_rate = sql_rate(&pool, &cfg, tables.payload, n).await;
    let (r_rate, cpu) = relay_rate(&side, &pool, &cfg, n).await;
    println!(
        "events: {n}, payload ~256 B, 1000 keys, 6 partitions, batch {}, batches in flight {}, {}",
        r.batch_size,
        cfg.max_batches_in_flight,
        placement.describe()
    );
    println!("P producer only:        {p_rate:>10.0} events/s");
    println!("D SQL read+delete only: {d_rate:>10.0} events/s");
    println!("R relay drain:          {r_rate:>10.0} events/s");
    println!("R / min(P, D) = {:.2} (goal >= 0.90)", r_rate / p_rate.min(d_rate));
    println!(
        "relay CPU: {:.1} us/event (this process; includes librdkafka threads)",
        cpu * 1e6 / n as f64
    );

    let split: i64 = std::env::var("BENCH_SPLIT_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n / 4);
    if split > 0 {
        let rounds = std::env::var("BENCH_SPLIT_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
        split_rates(&side, &pool, &cfg, split, p_rate.min(d_rate), rounds).await;
    }

    let rate = 0.6 * r_rate;
    let secs: f64 = std::env::var("BENCH_LATENCY_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10.0);
    if secs > 0.0 {
        let rounds = std::env::var("BENCH_LATENCY_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
        latencies(&side, &pool, &cfg, &topic, rate, secs, rounds).await;
    }
    sqlx::query(&format!("drop schema \"{schema}\" cascade"))
        .execute(&pool)
        .await
        .unwrap();

    let marked: i64 = std::env::var("BENCH_MARKED_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n / 4);
    let kept: i64 = std::env::var("BENCH_KEPT").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    if marked > 0 {
        println!("cleanup MarkPublished, {marked} events:");
        marked_rates(&side, &pool, &topic, marked, kept).await;
    }
    place(Placement::Shared);
    if let Some(rt) = own_rt {
        rt.shutdown_background();
    }
}
