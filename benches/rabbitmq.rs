//! RabbitMQ: the relay's drain rate R against P, lapin publishing the same messages alone
//! (persistent, mandatory, message_id, headers id, type, lockstep-key and lockstep-created-at,
//! ~256-byte payload, 1000 keys, to one quorum queue through the default exchange) with the same
//! acknowledgement wait (every publisher confirm awaited, a batch of 500 collected by a task of
//! its own), in interleaved rounds; then each one's instructions per event under callgrind,
//! (I(N2) - I(N1)) / (N2 - N1), each in a process of its own (start and stop cancel out; the
//! database's instructions are not counted). The queue is purged after each run.
//!
//!   scripts/bench rabbitmq   (BENCH_EVENTS, default 100000; BENCH_ROUNDS, default 3;
//!                             BENCH_INSTR_EVENTS, default 5000 = N2, N1 = N2 / 5, 0 skips;
//!                             BENCH_RELAY_ARGS, more relay flags, e.g. "--batch-size 2000")

#[path = "support/callgrind.rs"]
mod callgrind;
#[path = "support/sql_alone.rs"]
mod sql_alone;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions},
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties, Connection, ConnectionProperties,
};
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

fn config(schema: &str, queue: &str) -> RelayConfig {
    let (url, user, password) = (env_or("AMQP_URL", ""), env_or("AMQP_USER", ""), env_or("AMQP_PASSWORD_FILE", ""));
    let argv = [
        "bench",
        "--broker",
        "rabbitmq",
        "--amqp-url",
        &url,
        "--amqp-user",
        &user,
        "--amqp-password-file",
        &password,
        "--schema",
        schema,
        "--topic",
        queue,
    ];
    let extra = env_or("BENCH_RELAY_ARGS", "");
    Wrap::parse_from(
        argv.into_iter()
            .chain(["--metrics-addr", "127.0.0.1:0"])
            .chain(extra.split_whitespace()),
    )
    .relay
    .resolve()
    .expect("config")
}

/// The test environment's node, with its credentials.
async fn channel() -> lapin::Channel {
    let password = std::fs::read_to_string(env_or("AMQP_PASSWORD_FILE", "")).unwrap();
    let url = env_or("AMQP_URL", "").replacen("amqp://", &format!("amqp://{}:{}@", env_or("AMQP_USER", ""), password.trim()), 1);
    let c = Connection::connect(&url, ConnectionProperties::default()).await.unwrap();
    c.create_channel().await.unwrap()
}

async fn purge(queue: &str) {
    channel()
        .await
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await
        .unwrap();
}

/// P: `n` messages as the relay sends them, each confirm awaited; a batch of 500 collected by a
/// task of its own, as the relay's are. Events per second.
async fn publish_alone(queue: &str, n: u64) -> f64 {
    let ch = channel().await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let payload = format!("{{\"n\": 0, \"pad\": \"{}\"}}", "x".repeat(230)).into_bytes();
    let text = |v: &str| AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()));
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let started = Instant::now();
    let mut batches = Vec::new();
    let mut confirms = Vec::with_capacity(500);
    for i in 0..n {
        let id = uuid::Uuid::new_v4().to_string();
        let now = lockstep::core::stamp::now_ms();
        let mut h = FieldTable::default();
        h.insert("lockstep-key".into(), text(&format!("k-{}", i % 1000)));
        h.insert("id".into(), text(&id));
        h.insert("type".into(), text("created"));
        h.insert("lockstep-created-at".into(), text(&now.to_string()));
        let p = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(id.into())
            .with_type("created".into())
            .with_timestamp((now / 1000) as u64)
            .with_headers(h);
        confirms.push(ch.basic_publish("".into(), queue.into(), options, &payload, p).await.unwrap());
        if confirms.len() == 500 || i + 1 == n {
            batches.push(tokio::spawn(futures::future::join_all(std::mem::take(&mut confirms))));
        }
    }
    for b in batches {
        for c in b.await.unwrap() {
            assert_eq!(c.unwrap(), lapin::Confirmation::Ack(None));
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
    let (schema, subject) = (format!("bench_amqp_{id}"), format!("bench.amqp.{id}"));
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    channel()
        .await
        .queue_declare(subject.as_str().into(), QueueDeclareOptions::durable(), args)
        .await
        .unwrap();
    let cfg = config(&schema, &subject);
    let r = &cfg.resolved;
    let mut c = pool.acquire().await.unwrap();
    let tables = lockstep::tables::schema::prepare_outbox(&mut c, &r.table, &r.dead_letter_table, true)
        .await
        .unwrap();
    drop(c);
    println!("RabbitMQ, {n} events per round, payload ~256 B, 1000 keys, one quorum queue");
    let (mut rp, mut rpd, mut rs) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let p = publish_alone(&subject, n).await;
        purge(&subject).await;
        load(&pool, &r.table.to_string(), n).await;
        let d = sql_alone::rate(&pool, &cfg, tables.payload, n as i64).await;
        let rr = relay_rate(&pool, &cfg, n).await;
        purge(&subject).await;
        rp.push(rr / p);
        rpd.push(rr / p.min(d));
        // P and D each take the whole machine here (two cores, the servers on them): one after
        // the other is what the relay's work costs at best when both are CPU-bound.
        let serial = 1.0 / (1.0 / p + 1.0 / d);
        rs.push(rr / serial);
        println!(
            "  round {round}: P lapin alone {p:>8.0}/s, D the relay's SQL alone {d:>8.0}/s, R relay {rr:>8.0}/s: R/P {:.2}, R/min(P, D) {:.2}, R/(P then D) {:.2}",
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
            "instructions per event (callgrind, N1 = {n1}, N2 = {n2}): lapin alone {p:.0}, relay {rl:.0} ({:.2}x)",
            rl / p
        );
    }
    let _ = channel().await.queue_delete(subject.as_str().into(), Default::default()).await;
    sqlx::query(&format!("drop schema \"{schema}\" cascade"))
        .execute(&pool)
        .await
        .unwrap();
}
