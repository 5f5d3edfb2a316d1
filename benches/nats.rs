//! NATS JetStream: the relay's drain rate R against P, async-nats publishing the same messages
//! alone (subject, headers Nats-Msg-Id, id, type, lockstep-key and lockstep-created-at, ~256-byte
//! payload, 1000 keys) with the same acknowledgement wait (every PubAck awaited, as many at once
//! as the relay allows), in interleaved rounds; then each one's instructions per event under
//! callgrind, (I(N2) - I(N1)) / (N2 - N1), each in a process of its own (start and stop cancel
//! out; the database's instructions are not counted).
//!
//!   scripts/bench nats   (BENCH_EVENTS, default 100000; BENCH_ROUNDS, default 3;
//!                         BENCH_INSTR_EVENTS, default 5000 = N2, N1 = N2 / 5, 0 skips;
//!                         BENCH_RELAY_ARGS, more relay flags, e.g. "--batch-size 2000")

#[path = "support/callgrind.rs"]
mod callgrind;
#[path = "support/sql_alone.rs"]
mod sql_alone;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::{jetstream, HeaderMap};
use clap::Parser;
use lockstep::{
    config::{RelayArgs, RelayConfig},
    relay::{run_with_metrics, RelayMetrics},
};

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    relay: RelayArgs,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

const INSERT: &str = "insert into {t} (id, aggregatetype, aggregateid, type, payload)
     select gen_random_uuid(), 'order', 'k-' || (g % 1000), 'created', jsonb_build_object('n', g, 'pad', repeat('x', 230))
     from generate_series($1::bigint, $1::bigint + $2::bigint - 1) g";

fn config(schema: &str, subject: &str) -> RelayConfig {
    let url = env_or("NATS_URL", "");
    let argv = [
        "bench",
        "--broker",
        "nats",
        "--nats-url",
        &url,
        "--schema",
        schema,
        "--topic",
        subject,
    ];
    Wrap::parse_from(argv.into_iter().chain(["--metrics-addr", "127.0.0.1:0"]))
        .relay
        .resolve()
        .expect("config")
}

/// P: `n` messages as the relay sends them, each PubAck awaited; a batch of 500 collected by a
/// task of its own, as the relay's are. Events per second.
async fn publish_alone(subject: &str, n: u64) -> f64 {
    let client = async_nats::connect(env_or("NATS_URL", "")).await.unwrap();
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(8192)
        .backpressure_on_inflight(true)
        .build(client);
    let payload = bytes::Bytes::from(format!("{{\"n\": 0, \"pad\": \"{}\"}}", "x".repeat(230)));
    let started = Instant::now();
    let mut batches = Vec::new();
    let mut acks = Vec::with_capacity(500);
    for i in 0..n {
        let id = uuid::Uuid::new_v4().to_string();
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", id.as_str());
        h.insert("lockstep-key", format!("k-{}", i % 1000).as_str());
        h.insert("id", id.as_str());
        h.insert("type", "created");
        h.insert("lockstep-created-at", lockstep::core::stamp::now_ms().to_string().as_str());
        let ack = js.publish_with_headers(subject.to_owned(), h, payload.clone()).await.unwrap();
        acks.push(std::future::IntoFuture::into_future(ack));
        if acks.len() == 500 || i + 1 == n {
            batches.push(tokio::spawn(futures::future::join_all(std::mem::take(&mut acks))));
        }
    }
    for b in batches {
        for ack in b.await.unwrap() {
            ack.unwrap();
        }
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Load `n` events into `table` (quoted) and analyze it, as autovacuum would have.
async fn load(pool: &sqlx::PgPool, table: &str, n: u64) {
    sqlx::query(&INSERT.replace("{t}", table))
        .bind(0i64)
        .bind(n as i64)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(&format!("analyze {table}")).execute(pool).await.unwrap();
}

/// R: the relay draining `n` preloaded events, from its start to the last acknowledgement.
async fn relay_rate(pool: &sqlx::PgPool, cfg: &RelayConfig, n: u64) -> f64 {
    load(pool, &cfg.resolved.table.to_string(), n).await;
    let started = Instant::now();
    drain(cfg, n).await;
    n as f64 / started.elapsed().as_secs_f64()
}

/// Run the relay until it published `n`.
async fn drain(cfg: &RelayConfig, n: u64) {
    let metrics = Arc::new(RelayMetrics::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(run_with_metrics(cfg.clone(), stop.clone(), metrics.clone()));
    while metrics.published.get() < n {
        assert!(!task.is_finished(), "the relay stopped");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// (I(N2) - I(N1)) / (N2 - N1) of `mode`; the relay's events are loaded before it starts.
async fn per_event(pool: &sqlx::PgPool, mode: &str, n1: u64, n2: u64, schema: &str, subject: &str) -> f64 {
    let mut counts = Vec::new();
    for n in [n1, n2] {
        if mode == "relay" {
            load(pool, &format!("\"{schema}\".outbox"), n).await;
        }
        let (m, s, sub) = (mode.to_owned(), schema.to_owned(), subject.to_owned());
        let env = move || callgrind::counted(&m, n, &[("INSTR_SCHEMA", &s), ("INSTR_SUBJECT", &sub)]);
        counts.push(tokio::task::spawn_blocking(env).await.unwrap());
    }
    (counts[1] as f64 - counts[0] as f64) / (n2 - n1) as f64
}

#[tokio::main]
async fn main() {
    if let Ok(mode) = std::env::var("INSTR_CHILD") {
        let (schema, subject, n) = (env_or("INSTR_SCHEMA", ""), env_or("INSTR_SUBJECT", ""), env_or("INSTR_N", "0"));
        let n: u64 = n.parse().unwrap();
        match mode.as_str() {
            "publisher" => drop(publish_alone(&subject, n).await),
            _ => drain(&config(&schema, &subject), n).await,
        }
        return;
    }
    let n: u64 = env_or("BENCH_EVENTS", "100000").parse().unwrap();
    let rounds: usize = env_or("BENCH_ROUNDS", "3").parse().unwrap();
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL: run through scripts/bench");
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (schema, subject) = (format!("bench_nats_{id}"), format!("bench.nats.{id}"));
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let js = jetstream::new(async_nats::connect(env_or("NATS_URL", "")).await.unwrap());
    js.create_stream(jetstream::stream::Config {
        name: format!("bench_nats_{id}"),
        subjects: vec![subject.clone()],
        ..Default::default()
    })
    .await
    .unwrap();
    let cfg = config(&schema, &subject);
    let r = &cfg.resolved;
    let mut c = pool.acquire().await.unwrap();
    let tables = lockstep::tables::schema::prepare_outbox(&mut c, &r.table, &r.dead_letter_table, true)
        .await
        .unwrap();
    drop(c);
    println!("NATS JetStream, {n} events per round, payload ~256 B, 1000 keys, file storage, one stream");
    let (mut rp, mut rpd, mut rs) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let p = publish_alone(&subject, n).await;
        load(&pool, &r.table.to_string(), n).await;
        let d = sql_alone::rate(&pool, &cfg, tables.payload, n as i64).await;
        let rr = relay_rate(&pool, &cfg, n).await;
        rp.push(rr / p);
        rpd.push(rr / p.min(d));
        // P and D each take the whole machine here (two cores, the servers on them): one after
        // the other is what the relay's work costs at best when both are CPU-bound.
        let serial = 1.0 / (1.0 / p + 1.0 / d);
        rs.push(rr / serial);
        println!(
            "  round {round}: P async-nats alone {p:>8.0}/s, D the relay's SQL alone {d:>8.0}/s, R relay {rr:>8.0}/s: R/P {:.2}, R/min(P, D) {:.2}, R/(P then D) {:.2}",
            rr / p,
            rr / p.min(d),
            rr / serial
        );
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "median over {rounds} rounds: R/P {:.2} (goal >= 0.90), R/min(P, D) {:.2}, R/(P then D) {:.2}",
        median(rp),
        median(rpd),
        median(rs)
    );

    let n2: u64 = env_or("BENCH_INSTR_EVENTS", "5000").parse().unwrap();
    if n2 > 0 {
        let n1 = n2 / 5;
        let p = per_event(&pool, "publisher", n1, n2, &schema, &subject).await;
        let rl = per_event(&pool, "relay", n1, n2, &schema, &subject).await;
        println!(
            "instructions per event (callgrind, N1 = {n1}, N2 = {n2}): async-nats alone {p:.0}, relay {rl:.0} ({:.2}x)",
            rl / p
        );
    }
    let _ = js.delete_stream(format!("bench_nats_{id}")).await;
    sqlx::query(&format!("drop schema \"{schema}\" cascade"))
        .execute(&pool)
        .await
        .unwrap();
}
