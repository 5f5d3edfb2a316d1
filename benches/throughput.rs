//! What lockstep costs the service it runs beside, against baselines measured in the same run:
//!
//! - ingest: writer transactions per second (a business row and its outbox row in one
//!   transaction) while the relay drains, against the same writers with no relay; and the backlog
//!   (outbox rows) sampled every second while the relay runs: flat means the relay keeps up;
//! - inbox: consumer transactions per second with `Inbox::claim` in the same transaction as the
//!   side effect, against the side effect alone, at 1 and at 100 messages per transaction;
//! - inbox handler: `Inbox::handle` (claim, effect, commit, metrics counted, latency recorded)
//!   against the same claim, effect and commit written by hand, one message per transaction.
//!
//!   scripts/bench throughput   (BENCH_WRITERS, default 4; BENCH_SECS, default 10)

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use clap::Parser;
use lockstep::{
    config::RelayArgs,
    inbox::Inbox,
    relay::{run_with_metrics, RelayMetrics},
    schema::{migrate, prepare_outbox, TableKind},
    sql::{Ident, QualifiedName},
};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    relay: RelayArgs,
}

/// Run `n` tasks, each repeating `work(task, i)` (one transaction) for `secs`; transactions per second.
async fn run_for<F, Fut>(n: u64, secs: u64, work: F) -> f64
where
    F: Fn(u64, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let work = Arc::new(work);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|w| {
            let (work, stop, count) = (work.clone(), stop.clone(), count.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    work(w, i).await;
                    i += 1;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn qualified(schema: &str, table: &str) -> QualifiedName {
    QualifiedName {
        schema: Ident::parse(schema).unwrap(),
        table: Ident::parse(table).unwrap(),
    }
}

/// Writers commit an order and its outbox row per transaction, without a relay and with one.
async fn ingest(pool: &sqlx::PgPool, bootstrap: &str, writers: u64, secs: u64) {
    let schema = format!("bench_ingest_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let topic = format!("bench.ingest.{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let admin = lockstep::kafka::Admin::new(bootstrap, &Default::default(), Duration::from_secs(10)).unwrap();
    admin.create_topic(&topic, 6, 1, &Default::default()).await.unwrap();
    let cfg = Wrap::parse_from([
        "bench",
        "--database-url",
        &std::env::var("DATABASE_URL").unwrap(),
        "--bootstrap-servers",
        bootstrap,
        "--schema",
        &schema,
        "--topic",
        &topic,
        "--metrics-addr",
        "127.0.0.1:0",
    ])
    .relay
    .resolve()
    .expect("config");
    let r = &cfg.resolved;
    prepare_outbox(&mut pool.acquire().await.unwrap(), &r.table, &r.dead_letter_table, true)
        .await
        .unwrap();
    let orders = qualified(&schema, "orders");
    sqlx::query(&format!(
        "create table {orders} (id uuid primary key, customer text not null, total bigint not null)"
    ))
    .execute(pool)
    .await
    .unwrap();
    let outbox = r.table.clone();
    let write = {
        let pool = pool.clone();
        move |w: u64, i: u64| {
            let (pool, orders, outbox) = (pool.clone(), orders.clone(), outbox.clone());
            async move {
                let id = uuid::Uuid::new_v4();
                let mut tx = pool.begin().await.unwrap();
                sqlx::query(&format!("insert into {orders} (id, customer, total) values ($1, $2, $3)"))
                    .bind(id)
                    .bind(format!("c-{w}"))
                    .bind(i as i64)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                sqlx::query(&format!(
                    "insert into {outbox} (id, aggregatetype, aggregateid, type, payload)
                     values ($1, 'order', $2, 'created', jsonb_build_object('id', $1::text, 'customer', $2, 'total', $3::bigint, 'pad', repeat('x', 150)))"
                ))
                .bind(id)
                .bind(format!("c-{w}"))
                .bind(i as i64)
                .execute(&mut *tx)
                .await
                .unwrap();
                tx.commit().await.unwrap();
            }
        }
    };
    let backlog_sql = format!("select count(*) from {}", r.table);
    let alone = run_for(writers, secs, write.clone()).await;
    // The rows written alone are drained first, so the measured window starts empty.
    let metrics = Arc::new(RelayMetrics::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let relay = tokio::spawn(run_with_metrics(cfg.clone(), stop.clone(), metrics.clone()));
    loop {
        let left: i64 = sqlx::query_scalar(&backlog_sql).fetch_one(pool).await.unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sampler = {
        let (pool, sql) = (pool.clone(), backlog_sql.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            for _ in 0..secs {
                tokio::time::sleep(Duration::from_secs(1)).await;
                samples.push(sqlx::query_scalar::<_, i64>(&sql).fetch_one(&pool).await.unwrap());
            }
            samples
        })
    };
    let with_relay = run_for(writers, secs, write.clone()).await;
    let backlog = sampler.await.unwrap();
    stop.cancel();
    relay.await.unwrap().unwrap();
    // The broker's share: the same writers while the producer alone publishes what the relay
    // published, at the same rate, on this machine.
    let producer: rdkafka::producer::FutureProducer = lockstep::relay::producer_config(&cfg).create().unwrap();
    let publishing = {
        let (topic, stop) = (topic.clone(), Arc::new(AtomicBool::new(false)));
        let s2 = stop.clone();
        let task = tokio::spawn(async move {
            let payload = format!("{{\"customer\": \"c-0\", \"pad\": \"{}\"}}", "x".repeat(150));
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut owed = 0.0f64;
            let mut acks = Vec::new();
            while !s2.load(Ordering::Relaxed) {
                tick.tick().await;
                owed += with_relay / 100.0;
                while owed >= 1.0 {
                    owed -= 1.0;
                    let id = uuid::Uuid::new_v4().to_string();
                    let headers = rdkafka::message::OwnedHeaders::new()
                        .insert(rdkafka::message::Header {
                            key: "id",
                            value: Some(id.as_bytes()),
                        })
                        .insert(rdkafka::message::Header {
                            key: "type",
                            value: Some("created".as_bytes()),
                        });
                    let record = rdkafka::producer::FutureRecord::to(&topic)
                        .key("c-0")
                        .payload(&payload)
                        .headers(headers);
                    if let Ok(f) = producer.send_result(record) {
                        acks.push(f);
                    }
                }
            }
            for f in acks {
                let _ = f.await;
            }
        });
        (stop, task)
    };
    let with_producer = run_for(writers, secs, write).await;
    publishing.0.store(true, Ordering::Relaxed);
    publishing.1.await.unwrap();
    println!("ingest: {writers} writers, each transaction = 1 order row + 1 outbox row (~256 B payload), {secs}s each");
    println!("  writer TPS without relay: {alone:>8.0}");
    println!("  writer TPS, relay draining: {with_relay:>6.0}");
    println!("  ratio = {:.2} (goal >= 0.90)", with_relay / alone);
    println!(
        "  writer TPS, the producer alone publishing {with_relay:.0}/s (the broker's share): {with_producer:.0} ({:.2} of alone)",
        with_producer / alone
    );
    println!("  outbox backlog each second while relaying: {backlog:?}");
    sqlx::query(&format!("drop schema \"{schema}\" cascade"))
        .execute(pool)
        .await
        .unwrap();
}

/// A schema of its own with an inbox and an `effects` table: (schema, inbox, effects).
async fn consumer_tables(pool: &sqlx::PgPool, prefix: &str) -> (String, QualifiedName, QualifiedName) {
    let schema = format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let inbox_table = qualified(&schema, "inbox");
    migrate(&mut pool.acquire().await.unwrap(), TableKind::Inbox, &inbox_table, true)
        .await
        .unwrap();
    let effects = qualified(&schema, "effects");
    sqlx::query(&format!(
        "create table {effects} (message_id text primary key, amount bigint not null)"
    ))
    .execute(pool)
    .await
    .unwrap();
    (schema, inbox_table, effects)
}

/// Consumers apply side effects (an insert into `effects`) with and without `Inbox::claim`.
async fn inbox(pool: &sqlx::PgPool, consumers: u64, secs: u64) {
    let (schema, inbox_table, effects) = consumer_tables(pool, "bench_inbox").await;
    println!("inbox: {consumers} consumers, side effect = insert one row per message, {secs}s each");
    for per_tx in [1u64, 100] {
        let mut rates = [0.0f64; 2];
        for (slot, claim) in [(0, false), (1, true)] {
            let (pool, effects) = (pool.clone(), effects.clone());
            let inbox = Inbox::for_table(inbox_table.clone(), "bench");
            let effect_sql = format!("insert into {effects} (message_id, amount) values ($1, $2)");
            let tps = run_for(consumers, secs, move |_, _| {
                let (pool, inbox, sql) = (pool.clone(), inbox.clone(), effect_sql.clone());
                async move {
                    let ids: Vec<String> = (0..per_tx).map(|_| uuid::Uuid::new_v4().to_string()).collect();
                    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
                    let mut tx = pool.begin().await.unwrap();
                    // One message: `claim`; a batch: `claim_all`, one statement for the batch.
                    let new = match (claim, per_tx) {
                        (false, _) => vec![true; refs.len()],
                        (true, 1) => vec![inbox.claim(&mut tx, refs[0]).await.unwrap()],
                        (true, _) => inbox.claim_all(&mut tx, &refs).await.unwrap(),
                    };
                    for (k, (id, new)) in refs.iter().zip(new).enumerate() {
                        if new {
                            sqlx::query(&sql).bind(id).bind(k as i64).execute(&mut *tx).await.unwrap();
                        }
                    }
                    tx.commit().await.unwrap();
                }
            })
            .await;
            rates[slot] = tps * per_tx as f64;
        }
        let goal = if per_tx == 1 { 0.8 } else { 0.9 };
        println!(
            "  {per_tx:>3} per transaction: side effect only {:>8.0} msg/s, with claim {:>8.0} msg/s, ratio {:.2} (goal >= {goal})",
            rates[0],
            rates[1],
            rates[1] / rates[0]
        );
    }
    sqlx::query(&format!("drop schema \"{schema}\" cascade"))
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::main]
async fn main() {
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL: run through scripts/bench");
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP_SERVERS").expect("KAFKA_BOOTSTRAP_SERVERS");
    let writers = env_num("BENCH_WRITERS", 4);
    let secs = env_num("BENCH_SECS", 10);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(writers as u32 + 4)
        .connect(&url)
        .await
        .unwrap();
    ingest(&pool, &bootstrap, writers, secs).await;
    inbox(&pool, writers, secs).await;
    handler(&pool, writers, secs).await;
}

/// `Inbox::handle` with metrics against claim + effect + commit by hand.
async fn handler(pool: &sqlx::PgPool, consumers: u64, secs: u64) {
    use futures::FutureExt;
    let (schema, inbox_table, effects) = consumer_tables(pool, "bench_handler").await;
    let effect_sql = format!("insert into {effects} (message_id, amount) values ($1, $2)");
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = lockstep::inbox::InboxMetrics::register(&mut registry);
    let mut rates = [0.0f64; 2];
    for (slot, helper) in [(0, false), (1, true)] {
        let (pool, sql) = (pool.clone(), effect_sql.clone());
        let inbox = Inbox::for_table(inbox_table.clone(), "bench").with_metrics(metrics.clone());
        rates[slot] = run_for(consumers, secs, move |_, _| {
            let (pool, inbox, sql) = (pool.clone(), inbox.clone(), sql.clone());
            async move {
                let id = uuid::Uuid::new_v4().to_string();
                if helper {
                    let created = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_millis() as i64;
                    let d = lockstep::inbox::Delivery {
                        id: &id,
                        event_type: "order.created",
                        created_ms: Some(created),
                    };
                    inbox
                        .handle(&pool, &d, lockstep::inbox::Retry::default(), |tx| {
                            let (sql, id) = (sql.clone(), id.clone());
                            async move {
                                sqlx::query(&sql).bind(id).bind(1i64).execute(&mut *tx).await?;
                                Ok(())
                            }
                            .boxed()
                        })
                        .await
                        .unwrap();
                } else {
                    let mut tx = pool.begin().await.unwrap();
                    if inbox.claim(&mut tx, &id).await.unwrap() {
                        sqlx::query(&sql).bind(&id).bind(1i64).execute(&mut *tx).await.unwrap();
                    }
                    tx.commit().await.unwrap();
                }
            }
        })
        .await;
    }
    println!(
        "inbox handler: claim + effect + commit by hand {:>8.0} msg/s, Inbox::handle {:>8.0} msg/s, ratio {:.2}",
        rates[0],
        rates[1],
        rates[1] / rates[0]
    );
    sqlx::query(&format!("drop schema \"{schema}\" cascade"))
        .execute(pool)
        .await
        .unwrap();
}
