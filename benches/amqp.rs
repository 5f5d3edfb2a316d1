//! RabbitMQ: the relay's drain rate R against P, lapin publishing the same messages alone
//! (persistent, `mandatory`, the event id as `message_id`, the type and timestamp in properties,
//! headers lockstep-key, id, type and lockstep-created-at, ~256-byte payload, 1000 keys, to a
//! direct exchange bound to one quorum queue) on one channel in confirm mode, every confirm
//! awaited with the relay's timeout, batches of 500 collected by a task each and as many batches
//! in flight as the relay allows (16); D the relay's own SQL alone; in interleaved rounds. Then
//! each one's instructions per event under callgrind, (I(N2) - I(N1)) / (N2 - N1), each in a
//! process of its own (start and stop cancel out; the database's and the broker's instructions
//! are not counted).
//!
//!   scripts/bench amqp   (BENCH_EVENTS, default 100000; BENCH_ROUNDS, default 3;
//!                         BENCH_INSTR_EVENTS, default 5000 = N2, N1 = N2 / 5, 0 skips;
//!                         BENCH_KEYS, default 1000: fewer keys, longer per-key chains;
//!                         BENCH_ANALYZE, default "analyze": what follows each load, e.g.
//!                         "vacuum analyze" to clear the dead rows of the earlier rounds;
//!                         BENCH_RELAY_ARGS, more relay flags, e.g. "--batch-size 2000")

#[path = "support/callgrind.rs"]
mod callgrind;
#[path = "support/sql_alone.rs"]
mod sql_alone;

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use lapin::{
    options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
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

/// The exchange the bench publishes to: direct, durable, each run's queue bound by its name.
const EXCHANGE: &str = "lockstep.bench";
/// The relay's defaults: rows per batch, batches in flight, the confirm timeout.
const BATCH: usize = 500;
const BATCHES_IN_FLIGHT: usize = 16;
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

const INSERT: &str = "insert into {t} (id, aggregatetype, aggregateid, type, payload)
     select gen_random_uuid(), 'order', 'k-' || (g % {keys}), 'created', jsonb_build_object('n', g, 'pad', repeat('x', 230))
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
        "--amqp-exchange",
        EXCHANGE,
        "--schema",
        schema,
        "--topic",
        queue,
    ];
    let more = env_or("BENCH_RELAY_ARGS", "");
    let more = more.split_whitespace();
    Wrap::parse_from(argv.into_iter().chain(more).chain(["--metrics-addr", "127.0.0.1:0"]))
        .relay
        .resolve()
        .expect("config")
}

/// A channel on a connection of its own, with the test environment's credentials.
async fn channel() -> Channel {
    let password = std::fs::read_to_string(env_or("AMQP_PASSWORD_FILE", "")).unwrap();
    let url = env_or("AMQP_URL", "").replacen("amqp://", &format!("amqp://{}:{}@", env_or("AMQP_USER", ""), password.trim()), 1);
    let c = Connection::connect(&url, ConnectionProperties::default()).await.unwrap();
    c.create_channel().await.unwrap()
}

/// Distinct keys of the events (BENCH_KEYS).
fn keys() -> u64 {
    env_or("BENCH_KEYS", "1000").parse().unwrap()
}

/// The message the relay sends for event `id` of key `key`: persistent, its id, type and
/// timestamp in properties, the relay's headers as long strings.
fn properties(id: &str, key: &str) -> BasicProperties {
    let now = lockstep::core::stamp::now_ms();
    let text = |v: &str| AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()));
    let mut headers = FieldTable::default();
    headers.insert("lockstep-key".into(), text(key));
    headers.insert("id".into(), text(id));
    headers.insert("type".into(), text("created"));
    headers.insert("lockstep-created-at".into(), text(&now.to_string()));
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(id.into())
        .with_timestamp(u64::try_from(now / 1000).unwrap_or(0))
        .with_headers(headers)
        .with_type("created".into())
}

/// P: `n` messages as the relay sends them, `mandatory`, each confirm awaited (an ack without a
/// return, within the relay's timeout); a batch of 500 collected by a task of its own, at most
/// 16 batches in flight, as the relay's are. Events per second.
async fn publish_alone(queue: &str, n: u64) -> f64 {
    let ch = channel().await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let payload = format!("{{\"n\": 0, \"pad\": \"{}\"}}", "x".repeat(230)).into_bytes();
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let keys = keys();
    let started = Instant::now();
    let mut batches = VecDeque::new();
    let mut confirms = Vec::with_capacity(BATCH);
    for i in 0..n {
        let id = uuid::Uuid::new_v4().to_string();
        let key = format!("k-{}", i % keys);
        let confirm = ch
            .basic_publish(EXCHANGE.into(), queue.into(), options, &payload, properties(&id, &key))
            .await
            .unwrap();
        confirms.push(async move {
            match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => {}
                other => panic!("not confirmed: {other:?}"),
            }
        });
        if confirms.len() == BATCH || i + 1 == n {
            if batches.len() == BATCHES_IN_FLIGHT {
                let oldest: tokio::task::JoinHandle<_> = batches.pop_front().unwrap();
                oldest.await.unwrap();
            }
            batches.push_back(tokio::spawn(futures::future::join_all(std::mem::take(&mut confirms))));
        }
    }
    for b in batches {
        b.await.unwrap();
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = ch.close(200, "published".into()).await;
    rate
}

/// Load `n` events into `table` (quoted) and analyze it, as autovacuum would have (BENCH_ANALYZE).
async fn load(pool: &sqlx::PgPool, table: &str, n: u64) {
    sqlx::query(&INSERT.replace("{t}", table).replace("{keys}", &keys().to_string()))
        .bind(0i64)
        .bind(n as i64)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(&format!("{} {table}", env_or("BENCH_ANALYZE", "analyze")))
        .execute(pool)
        .await
        .unwrap();
}

/// R: the relay draining `n` preloaded events, from its start to the last confirm.
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
async fn per_event(pool: &sqlx::PgPool, ch: &Channel, mode: &str, n: (u64, u64), schema: &str, queue: &str) -> f64 {
    let mut counts = Vec::new();
    for n in [n.0, n.1] {
        if mode == "relay" {
            load(pool, &format!("\"{schema}\".outbox"), n).await;
        }
        let (m, s, q) = (mode.to_owned(), schema.to_owned(), queue.to_owned());
        let env = move || callgrind::counted(&m, n, &[("INSTR_SCHEMA", &s), ("INSTR_QUEUE", &q)]);
        counts.push(tokio::task::spawn_blocking(env).await.unwrap());
        purge(ch, queue).await;
    }
    (counts[1] as f64 - counts[0] as f64) / (n.1 - n.0) as f64
}

/// A durable direct exchange and a quorum queue `queue` bound to it by its name.
async fn declare(ch: &Channel, queue: &str) {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(EXCHANGE.into(), ExchangeKind::Direct, durable, FieldTable::default())
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    ch.queue_declare(queue.into(), QueueDeclareOptions::durable(), args).await.unwrap();
    ch.queue_bind(
        queue.into(),
        EXCHANGE.into(),
        queue.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

/// Empty the queue between phases (outside the timings): the broker holds no backlog.
async fn purge(ch: &Channel, queue: &str) {
    ch.queue_purge(queue.into(), QueuePurgeOptions::default()).await.unwrap();
}

#[tokio::main]
async fn main() {
    if let Ok(mode) = std::env::var("INSTR_CHILD") {
        let (schema, queue, n) = (env_or("INSTR_SCHEMA", ""), env_or("INSTR_QUEUE", ""), env_or("INSTR_N", "0"));
        let n: u64 = n.parse().unwrap();
        match mode.as_str() {
            "publisher" => drop(publish_alone(&queue, n).await),
            _ => drain(&config(&schema, &queue), n).await,
        }
        return;
    }
    let n: u64 = env_or("BENCH_EVENTS", "100000").parse().unwrap();
    let rounds: usize = env_or("BENCH_ROUNDS", "3").parse().unwrap();
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL: run through scripts/bench");
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (schema, queue) = (format!("bench_amqp_{id}"), format!("bench.amqp.{id}"));
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let ch = channel().await;
    declare(&ch, &queue).await;
    let cfg = config(&schema, &queue);
    let r = &cfg.resolved;
    let mut c = pool.acquire().await.unwrap();
    let tables = lockstep::tables::schema::prepare_outbox(&mut c, &r.table, &r.dead_letter_table, true)
        .await
        .unwrap();
    drop(c);
    println!(
        "RabbitMQ, {n} events per round, payload ~256 B, {} keys, persistent, one quorum queue",
        keys()
    );
    let (mut rp, mut rpd, mut rs) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let p = publish_alone(&queue, n).await;
        purge(&ch, &queue).await;
        load(&pool, &r.table.to_string(), n).await;
        let d = sql_alone::rate(&pool, &cfg, tables.payload, n as i64).await;
        let rr = relay_rate(&pool, &cfg, n).await;
        purge(&ch, &queue).await;
        rp.push(rr / p);
        rpd.push(rr / p.min(d));
        // P and D each take the whole machine (two cores, the servers on them): one after the
        // other is what the relay's work costs at best when both are CPU-bound.
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
        let p = per_event(&pool, &ch, "publisher", (n1, n2), &schema, &queue).await;
        let rl = per_event(&pool, &ch, "relay", (n1, n2), &schema, &queue).await;
        println!(
            "instructions per event (callgrind, N1 = {n1}, N2 = {n2}): lapin alone {p:.0}, relay {rl:.0} ({:.2}x)",
            rl / p
        );
    }
    let _ = ch.queue_delete(queue.as_str().into(), Default::default()).await;
    sqlx::query(&format!("drop schema \"{schema}\" cascade"))
        .execute(&pool)
        .await
        .unwrap();
}
