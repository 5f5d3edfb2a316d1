//! Instructions per event, a figure these shared cores resolve where times do not: the relay
//! draining preloaded events against the producer alone sending the same messages (key, ~256-byte
//! payload, headers id and type, the relay's producer settings). Counted by valgrind's callgrind
//! (`perf stat -e instructions` reports `<not supported>` on these VMs), each in a process of its
//! own, as (I(N2) - I(N1)) / (N2 - N1): start and stop cancel out. The relay process's own
//! instructions only, librdkafka's threads included; not the database's.
//!
//! With a steady flow too (BENCH_STEADY_RATE events/s, default 50): the relay runs while a writer
//! commits one event at a time at that rate, for N1 and N2 events; the figure includes what an
//! idle relay does between rows (timers, session checks, bucket rounds).
//!
//!   scripts/bench instructions   (BENCH_EVENTS, default 5000 = N2, N1 = N2 / 5; BENCH_ROUNDS,
//!                                 default 2; BENCH_RELAY_ARGS, more relay flags, e.g.
//!                                 "--buckets 64"; BENCH_STEADY_RATE, 0 skips the steady flow;
//!                                 BENCH_CALLGRIND_KEEP, a folder to keep callgrind's files in;
//!                                 BENCH_RELAYS, e.g. "1,2,3": bulk drains by that many relays in
//!                                 one process, with BENCH_RELAY_ARGS="--buckets 64")

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

#[path = "support/callgrind.rs"]
mod callgrind;

use clap::Parser;
use lockstep::{
    config::{RelayArgs, RelayConfig},
    relay::{producer_config, run_with_metrics, RelayMetrics},
};
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    relay: RelayArgs,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn config(schema: &str, topic: &str) -> RelayConfig {
    let extra = env_or("BENCH_RELAY_ARGS", "");
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
    ];
    let args = base.iter().map(|s| s.to_string()).chain(extra.split_whitespace().map(String::from));
    Wrap::parse_from(args).relay.resolve().expect("config")
}

const INSERT: &str = "insert into {t} (id, aggregatetype, aggregateid, type, payload)
     select gen_random_uuid(), 'order', 'k-' || (g % 1000), 'created', jsonb_build_object('n', g, 'pad', repeat('x', 230))
     from generate_series($1::bigint, $1::bigint + $2::bigint - 1) g";

/// The child: the relay until it published `n`, or the producer alone sending `n` messages.
async fn child(mode: &str, n: u64) {
    let cfg = config(&env_or("INSTR_SCHEMA", ""), &env_or("INSTR_TOPIC", ""));
    if mode == "producer" {
        let producer: FutureProducer = producer_config(&cfg).create().unwrap();
        let payload = format!("{{\"n\": 0, \"pad\": \"{}\"}}", "x".repeat(230));
        let topic = cfg.resolved.topic_template.text().to_string();
        let mut pending = Vec::new();
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
            let record = FutureRecord::to(&topic).key(&key).payload(&payload).headers(headers);
            pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
        for f in pending {
            f.await.unwrap().unwrap();
        }
        return;
    }
    let relays: usize = env_or("INSTR_RELAYS", "1").parse().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let metrics: Vec<Arc<RelayMetrics>> = (0..relays).map(|_| Arc::new(RelayMetrics::default())).collect();
    let tasks: Vec<_> = metrics
        .iter()
        .map(|m| tokio::spawn(run_with_metrics(cfg.clone(), stop.clone(), m.clone())))
        .collect();
    while metrics.iter().map(|m| m.published.get()).sum::<u64>() < n {
        assert!(tasks.iter().all(|t| !t.is_finished()), "a relay stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// Instructions of one child run under callgrind.
fn counted(mode: &str, n: u64, relays: usize, schema: &str, topic: &str) -> u64 {
    let relays = relays.to_string();
    callgrind::counted(
        mode,
        n,
        &[("INSTR_RELAYS", relays.as_str()), ("INSTR_SCHEMA", schema), ("INSTR_TOPIC", topic)],
    )
}

/// (I(N2) - I(N1)) / (N2 - N1) of `mode`. The relay's events are loaded before it starts, or with
/// `rate` committed one at a time at that rate by this process while it runs.
#[allow(clippy::too_many_arguments)]
async fn per_event(pool: &sqlx::PgPool, mode: &str, n1: u64, n2: u64, rate: f64, relays: usize, schema: &str, topic: &str) -> f64 {
    let t = format!("\"{schema}\".outbox");
    let insert = INSERT.replace("{t}", &t);
    let mut counts = Vec::new();
    for n in [n1, n2] {
        if mode == "relay" && rate == 0.0 {
            sqlx::query(&insert).bind(0i64).bind(n as i64).execute(pool).await.unwrap();
            sqlx::query(&format!("analyze {t}")).execute(pool).await.unwrap();
        }
        let (s, tp, m) = (schema.to_owned(), topic.to_owned(), mode.to_owned());
        let run = tokio::task::spawn_blocking(move || counted(&m, n, relays, &s, &tp));
        if rate > 0.0 {
            // Once the relay started (valgrind takes a while), then at `rate`.
            tokio::time::sleep(Duration::from_secs(10)).await;
            let started = Instant::now();
            for i in 0..n {
                tokio::time::sleep_until((started + Duration::from_secs_f64(i as f64 / rate)).into()).await;
                sqlx::query(&insert).bind(i as i64).bind(1i64).execute(pool).await.unwrap();
            }
        }
        counts.push(run.await.unwrap());
    }
    (counts[1] as f64 - counts[0] as f64) / (n2 - n1) as f64
}

#[tokio::main]
async fn main() {
    if let Ok(mode) = std::env::var("INSTR_CHILD") {
        return child(&mode, env_or("INSTR_N", "0").parse().unwrap()).await;
    }
    let n2: u64 = env_or("BENCH_EVENTS", "5000").parse().unwrap();
    let n1 = n2 / 5;
    let rounds: usize = env_or("BENCH_ROUNDS", "2").parse().unwrap();
    let steady: f64 = env_or("BENCH_STEADY_RATE", "50").parse().unwrap();
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL: run through scripts/bench");
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP_SERVERS").expect("KAFKA_BOOTSTRAP_SERVERS");
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (schema, topic) = (format!("bench_instr_{id}"), format!("bench.instr.{id}"));
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let admin = lockstep::clients::kafka::Admin::new(&bootstrap, &Default::default(), Duration::from_secs(10)).unwrap();
    admin.create_topic(&topic, 6, 1, &Default::default()).await.unwrap();
    let cfg = config(&schema, &topic);
    let r = &cfg.resolved;
    let mut c = pool.acquire().await.unwrap();
    lockstep::tables::schema::prepare_outbox(&mut c, &r.table, &r.dead_letter_table, true)
        .await
        .unwrap();
    drop(c);
    println!(
        "instructions per event (callgrind), N1 = {n1}, N2 = {n2}, relay flags {:?}:",
        env_or("BENCH_RELAY_ARGS", "")
    );
    for round in 1..=rounds {
        let p = per_event(&pool, "producer", n1, n2, 0.0, 1, &schema, &topic).await;
        let bulk = per_event(&pool, "relay", n1, n2, 0.0, 1, &schema, &topic).await;
        print!(
            "  round {round}: producer alone {p:>8.0}, relay bulk drain {bulk:>8.0} ({:.2}x the producer)",
            bulk / p
        );
        if steady > 0.0 {
            let s = per_event(&pool, "relay", n1 / 5, n2 / 5, steady, 1, &schema, &topic).await;
            print!(", relay at {steady}/s {s:>8.0} ({:.2}x its bulk drain)", s / bulk);
        }
        println!();
    }
    // Several relays in one process (--buckets from BENCH_RELAY_ARGS), bulk: their instructions
    // per event against one.
    let split = env_or("BENCH_RELAYS", "");
    for relays in split.split(',').filter_map(|r| r.trim().parse::<usize>().ok()) {
        let r = per_event(&pool, "relay", n1, n2, 0.0, relays, &schema, &topic).await;
        println!("  {relays} relay(s) in one process, bulk drain: {r:>8.0}");
    }
    sqlx::query(&format!("drop schema \"{schema}\" cascade"))
        .execute(&pool)
        .await
        .unwrap();
}
