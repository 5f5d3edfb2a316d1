//! What lockstep costs the service it runs beside, against baselines measured in the same run:
//!
//! - ingest: writer transactions per second (a business row and its outbox row in one
//!   transaction) while the relay drains, against the same writers with no relay; and the backlog
//!   (outbox rows) sampled every second while the relay runs: flat means the relay keeps up.
//!   Twice: with every process on both cores, and split as a deployment has it (PostgreSQL and the
//!   writers on one core, the relay and the broker on the other; see `Placement`);
//! - inbox: consumer transactions per second with `Inbox::claim` in the same transaction as the
//!   side effect, against the side effect alone, at 1 and at 100 messages per transaction;
//! - inbox handler: `Inbox::handle` (claim, effect, commit, metrics counted, latency recorded)
//!   against the same claim, effect and commit written by hand, one message per transaction.
//!
//!   scripts/bench throughput
//!
//! Knobs: BENCH_WRITERS (4), BENCH_SECS (10), BENCH_ROUNDS (8 for ingest, half as many for each
//! inbox size), BENCH_ONLY (e.g. ingest,inbox: only those parts), BENCH_PLACEMENT (shared,
//! split or broker-apart: only that ingest), BENCH_RELAY_ARGS (more relay flags, e.g. "--listen false"),
//! BENCH_INBOX_FLOOR (1: also the least a claim could cost, see `inbox`).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

#[path = "support/placement.rs"]
mod placement;

use clap::Parser;
use lockstep::{
    config::RelayArgs,
    core::sql::{Ident, QualifiedName},
    inbox::Inbox,
    relay::{run_with_metrics, RelayMetrics},
    tables::schema::{migrate, prepare_outbox, TableKind},
};
use placement::{place, relay_runtime, Placement};

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

/// The machine's CPU time counters (/proc/stat, in ticks): all, busy (user, nice, system, irq,
/// softirq) and stolen by the hypervisor.
#[derive(Clone, Copy)]
struct CpuTimes {
    all: u64,
    busy: u64,
    stolen: u64,
    /// Per group of `GROUPS` (set by `measured`).
    by_process: [u64; 4],
}

impl CpuTimes {
    fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let f: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        CpuTimes {
            all: (0..8).map(at).sum(),
            busy: at(0) + at(1) + at(2) + at(5) + at(6),
            stolen: at(7),
            by_process: [0; 4],
        }
    }

    fn busy_us(&self) -> f64 {
        ticks_us(self.busy)
    }

    fn since(self, earlier: CpuTimes) -> CpuTimes {
        CpuTimes {
            all: self.all - earlier.all,
            busy: self.busy - earlier.busy,
            stolen: self.stolen - earlier.stolen,
            by_process: [0; 4],
        }
    }
}

/// Microseconds in `ticks` of CPU time (a tick is 1/USER_HZ s, and USER_HZ is 100 on Linux).
fn ticks_us(ticks: u64) -> f64 {
    ticks as f64 * 1e4
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// CPU time (user + system, in ticks) of the processes that share the machine, by what they are:
/// PostgreSQL's, the broker's (tansu) and this one (the writers' client side and the relay, which
/// runs in this process). Per process id, so a process that starts during a window counts from zero.
#[derive(Default)]
struct ProcessTimes(std::collections::HashMap<u32, (usize, u64)>);

/// The groups of `ProcessTimes`, by index.
const GROUPS: [&str; 4] = ["postgres (the relay's sessions)", "postgres (the rest)", "broker", "this process"];

impl ProcessTimes {
    fn now() -> Self {
        let me = std::process::id();
        let mut times = std::collections::HashMap::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((head, rest)) = stat.rsplit_once(')') else { continue };
            let comm = head.split_once('(').map(|(_, c)| c).unwrap_or("");
            let group = match comm {
                _ if pid == me => 3,
                "postgres" => 1,
                "tansu" => 2,
                _ => continue,
            };
            let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
            times.insert(pid, (group, f.iter().sum()));
        }
        ProcessTimes(times)
    }

    /// Ticks per group since `earlier`; the server processes in `relay` (the relay's sessions)
    /// are a group of their own.
    fn since(&self, earlier: &ProcessTimes, relay: &[i32]) -> [u64; 4] {
        let mut d = [0; 4];
        for (pid, (group, ticks)) in &self.0 {
            let group = if *group == 1 && relay.contains(&(*pid as i32)) { 0 } else { *group };
            d[group] += ticks - earlier.0.get(pid).map_or(0, |e| e.1.min(*ticks));
        }
        d
    }
}

/// A window of `run_for` with the machine's CPU time it took: on a virtual machine another guest
/// can take this one's CPU ("steal"), which moves a window's throughput by a third and more, while
/// the CPU time spent per transaction stays put.
async fn measured<F>(pool: &sqlx::PgPool, window: F) -> (f64, CpuTimes)
where
    F: std::future::Future<Output = f64>,
{
    let t0 = CpuTimes::now();
    let p0 = ProcessTimes::now();
    let tps = window.await;
    let mut cpu = CpuTimes::now().since(t0);
    let p1 = ProcessTimes::now();
    let relay: Vec<i32> = sqlx::query_scalar("select pid from pg_stat_activity where application_name like 'lockstep-relay%'")
        .fetch_all(pool)
        .await
        .unwrap_or_default();
    cpu.by_process = p1.since(&p0, &relay);
    (tps, cpu)
}

/// A sample's value in the relay's /metrics text.
fn metric(m: &RelayMetrics, name: &str) -> f64 {
    m.render()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn qualified(schema: &str, table: &str) -> QualifiedName {
    QualifiedName {
        schema: Ident::parse(schema).unwrap(),
        table: Ident::parse(table).unwrap(),
    }
}

/// Writers commit an order and its outbox row per transaction, without a relay and with one.
async fn ingest(pool: &sqlx::PgPool, bootstrap: &str, writers: u64, secs: u64, placement: Placement) {
    let schema = format!("bench_ingest_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let topic = format!("bench.ingest.{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let admin = lockstep::clients::kafka::Admin::new(bootstrap, &Default::default(), Duration::from_secs(10)).unwrap();
    admin.create_topic(&topic, 6, 1, &Default::default()).await.unwrap();
    let cfg = Wrap::parse_from(
        [
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
        ]
        .into_iter()
        .map(String::from)
        // BENCH_RELAY_ARGS: more relay flags, e.g. "--listen false".
        .chain(
            std::env::var("BENCH_RELAY_ARGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(String::from),
        ),
    )
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
    // Rounds of a window alone and a window with the relay, interleaved: a single pair of windows
    // on this machine varies by a third from run to run (mostly CPU the host steals, see
    // `measured`), and alternating lets both sides see the same drift.
    let rounds = env_num("BENCH_ROUNDS", 8);
    // Placed first: `place` pins every thread this process has so far to the database's core.
    place(placement);
    // Shared: the relay on the writers' runtime. Split: on its own, on the second core.
    let own_rt = placement.own_runtime().then(|| relay_runtime(placement));
    let relay_rt = own_rt
        .as_ref()
        .map_or_else(tokio::runtime::Handle::current, |rt| rt.handle().clone());
    let (mut alone_all, mut relay_all) = (Vec::new(), Vec::new());
    let (mut backlog, mut batches, mut published, mut notifications) = (Vec::new(), 0.0, 0.0, 0.0);
    let (mut cpu_alone, mut cpu_relay) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (tps, cpu) = measured(pool, run_for(writers, secs, write.clone())).await;
        alone_all.push(tps);
        cpu_alone.push(cpu);
        // The rows written alone are drained first, so the measured window starts empty.
        let metrics = Arc::new(RelayMetrics::default());
        let stop = tokio_util::sync::CancellationToken::new();
        let relay = relay_rt.spawn(run_with_metrics(cfg.clone(), stop.clone(), metrics.clone()));
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
        let counts = || {
            (
                metric(&metrics, "lockstep_relay_batch_duration_seconds_count"),
                metric(&metrics, "lockstep_relay_published_total"),
                metric(&metrics, "lockstep_relay_notifications_total"),
            )
        };
        let before = counts();
        let (tps, cpu) = measured(pool, run_for(writers, secs, write.clone())).await;
        relay_all.push(tps);
        cpu_relay.push(cpu);
        backlog.extend(sampler.await.unwrap());
        let after = counts();
        batches += after.0 - before.0;
        published += after.1 - before.1;
        notifications += after.2 - before.2;
        stop.cancel();
        relay.await.unwrap().unwrap();
    }
    let (alone, with_relay) = (mean(&alone_all), mean(&relay_all));
    place(Placement::Shared);
    if let Some(rt) = own_rt {
        rt.shutdown_background();
    }
    // The broker's share, where it shares the cores: the same writers while the producer alone
    // publishes what the relay published, at the same rate.
    let with_producer = match placement {
        Placement::Shared => Some(producer_alone(&cfg, &topic, writers, secs, with_relay, write).await),
        Placement::Split | Placement::BrokerApart => None,
    };
    let cores = placement.describe();
    println!(
        "ingest ({cores}): {writers} writers, each transaction = 1 order row + 1 outbox row (~256 B payload), \
         {rounds} rounds of {secs}s alone then {secs}s with the relay"
    );
    let each = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
    println!("  writer TPS without relay:   {alone:>6.0}  (rounds: {})", each(&alone_all));
    println!("  writer TPS, relay draining: {with_relay:>6.0}  (rounds: {})", each(&relay_all));
    let per_round: Vec<String> = alone_all.iter().zip(&relay_all).map(|(a, r)| format!("{:.2}", r / a)).collect();
    println!(
        "  ratio = {:.2} (goal >= 0.90; per round: {})",
        with_relay / alone,
        per_round.join(", ")
    );
    // CPU per transaction (busy machine time over the window's transactions): steady under steal.
    let per_tx = |cpu: &[CpuTimes], tps: &[f64]| cpu.iter().map(CpuTimes::busy_us).sum::<f64>() / (tps.iter().sum::<f64>() * secs as f64);
    let stolen = |cpu: &[CpuTimes]| {
        let s: Vec<String> = cpu
            .iter()
            .map(|c| format!("{:.0}", 100.0 * c.stolen as f64 / c.all.max(1) as f64))
            .collect();
        s.join(", ")
    };
    let (us_alone, us_relay) = (per_tx(&cpu_alone, &alone_all), per_tx(&cpu_relay, &relay_all));
    println!(
        "  machine CPU per writer transaction: alone {us_alone:.0} us, relay draining {us_relay:.0} us; \
         alone / relay = {:.2} (the TPS ratio where CPU is what limits)",
        us_alone / us_relay
    );
    println!(
        "  CPU stolen by the host (%), alone windows: {}; relay windows: {}",
        stolen(&cpu_alone),
        stolen(&cpu_relay)
    );
    if let Some(p) = with_producer {
        println!(
            "  writer TPS, the producer alone publishing {with_relay:.0}/s (the broker's share): {p:.0} ({:.2} of alone)",
            p / alone
        );
    }
    // Where the relay's extra CPU goes, per group of processes: (ticks per transaction in the
    // relay windows) - (ticks per transaction alone); one event per transaction.
    let group_us = |cpu: &[CpuTimes], tps: &[f64], g: usize| {
        cpu.iter().map(|c| ticks_us(c.by_process[g])).sum::<f64>() / (tps.iter().sum::<f64>() * secs as f64)
    };
    let extra: Vec<f64> = (0..GROUPS.len())
        .map(|g| group_us(&cpu_relay, &relay_all, g) - group_us(&cpu_alone, &alone_all, g))
        .collect();
    let split: Vec<String> = GROUPS.iter().zip(&extra).map(|(name, us)| format!("{name} +{us:.0}")).collect();
    println!("  extra CPU per event by process (us): {}", split.join(", "));
    // The relay's own: what it makes PostgreSQL do (its sessions' statements, and the rest's
    // extra: vacuum of the rows it deletes, WAL) and its process. The broker's share would be on
    // another machine in production.
    let own = extra[0] + extra[1] + extra[3];
    println!(
        "  the relay's own CPU per event {own:.0} us; alone / (alone + relay's own) = {:.2} \
         (the ratio where CPU limits and the broker has its own machine)",
        us_alone / (us_alone + own)
    );
    println!("  outbox backlog each second while relaying: {backlog:?}");
    println!(
        "  relay batches while the writers ran: {batches:.0} ({:.0}/s), {:.1} rows each",
        batches / (secs * rounds) as f64,
        published / batches.max(1.0)
    );
    println!("  NOTIFYs the relay received while the writers ran: {notifications:.0}");
    sqlx::query(&format!("drop schema \"{schema}\" cascade"))
        .execute(pool)
        .await
        .unwrap();
}

/// Writer TPS while the producer alone publishes `rate` messages a second like the relay's.
async fn producer_alone<F, Fut>(cfg: &lockstep::config::RelayConfig, topic: &str, writers: u64, secs: u64, rate: f64, write: F) -> f64
where
    F: Fn(u64, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let with_relay = rate;
    let producer: rdkafka::producer::FutureProducer = lockstep::relay::producer_config(cfg).create().unwrap();
    let publishing = {
        let (topic, stop) = (topic.to_owned(), Arc::new(AtomicBool::new(false)));
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
                    // The writers' keys, as the relay's messages have them.
                    let key = format!("c-{}", acks.len() as u64 % writers);
                    let record = rdkafka::producer::FutureRecord::to(&topic)
                        .key(&key)
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
    with_producer
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

/// What a consumer transaction writes besides its side effect.
#[derive(Clone, Copy)]
enum Claim {
    None,
    Inbox,
    Floor,
}

/// Consumers apply side effects (an insert into `effects`) with and without `Inbox::claim`, in
/// interleaved rounds (see `ingest`), with the machine's CPU time per message.
async fn inbox(pool: &sqlx::PgPool, consumers: u64, secs: u64) {
    let (schema, inbox_table, effects) = consumer_tables(pool, "bench_inbox").await;
    // BENCH_INBOX_FLOOR=1: also the ids inserted into a table with nothing but a one-column
    // primary key, no ON CONFLICT: no dedup at all, the least any claim written to the database
    // in the same transaction could cost.
    let floor_table = qualified(&schema, "floor");
    let floor = env_num("BENCH_INBOX_FLOOR", 0) == 1;
    if floor {
        sqlx::query(&format!("create table {floor_table} (message_id text primary key)"))
            .execute(pool)
            .await
            .unwrap();
    }
    let floor_sql = format!("insert into {floor_table} (message_id) select m from unnest($1::text[]) m");
    let db = pool;
    let rounds = env_num("BENCH_ROUNDS", 8).div_ceil(2);
    println!("inbox: {consumers} consumers, side effect = insert one row per message, {rounds} rounds of {secs}s each way");
    for per_tx in [1u64, 100] {
        let (mut rates, mut cpus) = ([vec![], vec![], vec![]], [vec![], vec![], vec![]]);
        let slots: &[(usize, Claim)] = match floor {
            false => &[(0, Claim::None), (1, Claim::Inbox)],
            true => &[(0, Claim::None), (1, Claim::Inbox), (2, Claim::Floor)],
        };
        for _ in 0..rounds {
            for &(slot, claim) in slots {
                let (pool, effects) = (pool.clone(), effects.clone());
                let inbox = Inbox::for_table(inbox_table.clone(), "bench");
                let effect_sql = format!("insert into {effects} (message_id, amount) values ($1, $2)");
                let floor_sql = floor_sql.clone();
                let (tps, cpu) = measured(
                    db,
                    run_for(consumers, secs, move |_, _| {
                        let (pool, inbox, sql, floor_sql) = (pool.clone(), inbox.clone(), effect_sql.clone(), floor_sql.clone());
                        async move {
                            let ids: Vec<String> = (0..per_tx).map(|_| uuid::Uuid::new_v4().to_string()).collect();
                            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
                            let mut tx = pool.begin().await.unwrap();
                            // One message: `claim`; a batch: `claim_all`, one statement for the batch.
                            let new = match (claim, per_tx) {
                                (Claim::None, _) => vec![true; refs.len()],
                                (Claim::Inbox, 1) => vec![inbox.claim(&mut tx, refs[0]).await.unwrap()],
                                (Claim::Inbox, _) => inbox.claim_all(&mut tx, &refs).await.unwrap(),
                                (Claim::Floor, _) => {
                                    sqlx::query(&floor_sql).bind(&refs).execute(&mut *tx).await.unwrap();
                                    vec![true; refs.len()]
                                }
                            };
                            for (k, (id, new)) in refs.iter().zip(new).enumerate() {
                                if new {
                                    sqlx::query(&sql).bind(id).bind(k as i64).execute(&mut *tx).await.unwrap();
                                }
                            }
                            tx.commit().await.unwrap();
                        }
                    }),
                )
                .await;
                rates[slot].push(tps * per_tx as f64);
                cpus[slot].push(cpu);
            }
        }
        let (alone, claimed) = (mean(&rates[0]), mean(&rates[1]));
        let per_round: Vec<String> = rates[0].iter().zip(&rates[1]).map(|(a, c)| format!("{:.2}", c / a)).collect();
        let us_per_msg =
            |slot: usize| cpus[slot].iter().map(CpuTimes::busy_us).sum::<f64>() / (rates[slot].iter().sum::<f64>() * secs as f64);
        let goal = if per_tx == 1 { 0.8 } else { 0.9 };
        println!(
            "  {per_tx:>3} per transaction: side effect only {alone:>8.0} msg/s, with claim {claimed:>8.0} msg/s, \
             ratio {:.2} (goal >= {goal}; per round: {})",
            claimed / alone,
            per_round.join(", ")
        );
        println!(
            "      machine CPU per message: side effect only {:.0} us, with claim {:.0} us; ratio {:.2}",
            us_per_msg(0),
            us_per_msg(1),
            us_per_msg(0) / us_per_msg(1)
        );
        if floor {
            let per_round: Vec<String> = rates[0].iter().zip(&rates[2]).map(|(a, c)| format!("{:.2}", c / a)).collect();
            println!(
                "      floor (ids into a one-column primary key, no dedup) {:>8.0} msg/s, ratio {:.2} (per round: {}); CPU per message {:.0} us",
                mean(&rates[2]),
                mean(&rates[2]) / alone,
                per_round.join(", "),
                us_per_msg(2)
            );
        }
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
    // BENCH_ONLY: a comma-separated subset of ingest, inbox, handler.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let part = |name: &str| only.is_empty() || only.split(',').any(|p| p.trim() == name);
    // BENCH_PLACEMENT: shared, split, broker-apart, or shared then split (the default).
    let placement = std::env::var("BENCH_PLACEMENT").unwrap_or_default();
    if part("ingest") {
        let placements = [
            ("shared", Placement::Shared),
            ("split", Placement::Split),
            ("broker-apart", Placement::BrokerApart),
        ];
        for (name, p) in placements {
            // broker-apart only when asked for.
            if placement == name || (placement.is_empty() && p != Placement::BrokerApart) {
                ingest(&pool, &bootstrap, writers, secs, p).await;
            }
        }
    }
    if part("inbox") {
        inbox(&pool, writers, secs).await;
    }
    if part("handler") {
        handler(&pool, writers, secs).await;
    }
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
                        traceparent: None,
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
