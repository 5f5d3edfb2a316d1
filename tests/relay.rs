//! The outbox relay, run as the binary a Pod would run, against real PostgreSQL and a real
//! Kafka-protocol broker: nothing lost, per-key order kept, crashes and outages survived, poison
//! rows quarantined.

mod common;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    process::Command,
    time::{Duration, Instant},
};

use common::{
    broker::{Broker, Kind},
    relays::Outbox,
};
use lockstep::clients::kafka::Admin;

/// An outbox in the database at `url` and a destination of `partitions` on `broker`.
async fn outbox(prefix: &str, url: &str, broker: &Broker, partitions: i32) -> Outbox {
    common::relays::outbox_on(prefix, broker, partitions, url).await
}

/// A message as consumed: event id header, key, per-key counter.
#[derive(Debug, Clone)]
struct Got {
    id: String,
    key: String,
    n: i64,
    source_header: Option<String>,
    /// The record timestamp (ms) and the relay's `lockstep-created-at` header.
    timestamp: Option<i64>,
    created_header: Option<i64>,
}

/// Read the destination from the beginning until `want` distinct ids were seen (or timeout).
async fn consume(o: &Outbox, want: usize, timeout: Duration) -> Vec<Got> {
    let got = o.consume(want, timeout).await;
    got.iter()
        .map(|m| {
            assert_eq!(m.header("type"), Some("created"));
            Got {
                id: m.id(),
                key: m.key.clone(),
                n: m.n(),
                source_header: m.header("source").map(str::to_owned),
                timestamp: m.timestamp,
                created_header: m.header("lockstep-created-at").map(|v| v.parse().unwrap()),
            }
        })
        .collect()
}

/// Every id once at least; per key, first deliveries in increasing order. Returns duplicates.
fn check(got: &[Got], events: usize, keys: usize) -> usize {
    let ids: HashSet<&str> = got.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(ids.len(), events, "every event published (distinct ids)");
    let mut seen: HashSet<&str> = HashSet::new();
    let mut last: HashMap<&str, i64> = HashMap::new();
    for g in got {
        if !seen.insert(g.id.as_str()) {
            continue; // a redelivery of an earlier message
        }
        if let Some(prev) = last.insert(g.key.as_str(), g.n) {
            assert!(g.n > prev, "key {}: {} published after {}", g.key, g.n, prev);
        }
    }
    assert_eq!(last.len(), keys);
    got.len() - events
}

brokers!(publishes_events_over_1k_keys_in_order, publish_in_order);
async fn publish_in_order(kind: Kind) {
    let o = outbox("order", &common::env("DATABASE_URL"), &Broker::shared(kind), 6).await;
    let n: i64 = std::env::var("RELAY_TEST_N").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    o.insert(0, n, 1000).await;
    let mut relay = o.relay("relay-order.log", &o.url);
    let t = Instant::now();
    o.wait_drained(Duration::from_secs(300)).await;
    println!("relay drained {n} events in {:?}", t.elapsed());
    let t = Instant::now();
    let got = consume(&o, n as usize, Duration::from_secs(300)).await;
    println!("consumed {} messages in {:?}", got.len(), t.elapsed());
    let dups = check(&got, n as usize, 1000.min(n as usize));
    assert_eq!(dups, 0, "no crash, no duplicates");
    assert!(
        got.iter().all(|g| g.source_header.as_deref() == Some("test")),
        "row headers become message headers"
    );
    relay.kill();
}

brokers!(survives_sigkill_and_an_inbox_consumer_applies_each_event_once, survive_sigkills);
async fn survive_sigkills(kind: Kind) {
    const EVENTS: i64 = 100_000;
    const STEPS: i64 = 40;
    let o = outbox("crash", &common::env("DATABASE_URL"), &Broker::shared(kind), 4).await;
    // Events keep arriving in 40 transactions while the relay is killed again and again.
    let writer = {
        let pool = o.pool.clone();
        let schema = o.schema.clone();
        tokio::spawn(async move {
            for step in 0..STEPS {
                let o2 = common::outbox::OutboxTable {
                    schema: schema.clone(),
                    pool: pool.clone(),
                };
                o2.insert(step * EVENTS / STEPS, EVENTS / STEPS, 1000).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let mut kills = 0;
    let mut rng = 0x2545F4914F6CDD1Du64;
    let mut relay = o.relay("relay-crash-0.log", &o.url);
    // At least 12 kills, and kills until the last event was written.
    while kills < 12 || !writer.is_finished() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(250 + rng % 400)).await;
        relay.kill(); // SIGKILL
        kills += 1;
        relay = o.relay(&format!("relay-crash-{kills}.log"), &o.url);
    }
    writer.await.unwrap();
    o.wait_drained(Duration::from_secs(120)).await;
    relay.kill();
    let got = consume(&o, EVENTS as usize, Duration::from_secs(300)).await;
    let dups = check(&got, EVENTS as usize, 1000);
    println!(
        "{kills} SIGKILLs: {} messages at the broker for {EVENTS} events: {dups} duplicates from in-flight batches",
        got.len()
    );
    // Only batches in flight at a kill can be republished: at most batch size x batches in flight
    // (the relay's defaults, 500 x 16) per kill.
    assert!(
        dups <= kills * 500 * 16,
        "duplicates bounded by the batches in flight at each kill: {dups}"
    );

    // A consumer with lockstep::inbox applies each event's side effect exactly once.
    let s = common::pg_schema("crash_consumer").await;
    let t = lockstep::core::sql::QualifiedName {
        schema: lockstep::core::sql::Ident::parse(&s.schema).unwrap(),
        table: lockstep::core::sql::Ident::parse("inbox").unwrap(),
    };
    lockstep::tables::schema::migrate(
        &mut s.pool.acquire().await.unwrap(),
        lockstep::tables::schema::TableKind::Inbox,
        &t,
        true,
    )
    .await
    .unwrap();
    sqlx::query("create table effects (key text primary key, applied bigint not null)")
        .execute(&s.pool)
        .await
        .unwrap();
    let inbox = lockstep::inbox::Inbox::for_table(t, "effects");
    let mut applied = 0u64;
    for chunk in got.chunks(500) {
        let mut tx = s.pool.begin().await.unwrap();
        for g in chunk {
            if inbox.claim(&mut tx, &g.id).await.unwrap() {
                sqlx::query("insert into effects values ($1, 1) on conflict (key) do update set applied = effects.applied + 1")
                    .bind(&g.key)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                applied += 1;
            }
        }
        tx.commit().await.unwrap();
    }
    let total: i64 = sqlx::query_scalar("select sum(applied)::bigint from effects")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    println!(
        "side effects applied: {total} for {EVENTS} events ({} duplicate deliveries skipped)",
        got.len() as u64 - applied
    );
    assert_eq!(total, EVENTS);
    assert_eq!(applied, EVENTS as u64);
}

brokers!(recovers_from_a_30s_broker_outage_and_a_database_restart, recover_from_outages);
async fn recover_from_outages(kind: Kind) {
    let pg = common::PrivatePostgres::start();
    let mut broker = Broker::private(kind);
    let o = outbox("outage", &pg.url(), &broker, 3).await;
    o.insert(0, 5_000, 1_000).await;
    let mut relay = o.relay("relay-outage.log", &o.url);
    o.wait_drained(Duration::from_secs(120)).await;

    // Broker down for 30 s while events keep arriving.
    broker.stop();
    o.insert(5_000, 5_000, 1_000).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(o.remaining().await > 0, "nothing can be acknowledged while the broker is down");
    broker.start_again();
    o.wait_drained(Duration::from_secs(180)).await;

    // PostgreSQL restarted mid-run.
    o.insert(10_000, 5_000, 1_000).await;
    pg.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.start_again();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg.url())
        .await
        .unwrap();
    sqlx::query(&format!(
        "insert into \"{}\".outbox (id, aggregatetype, aggregateid, type, payload, headers)
         select gen_random_uuid(), 'order', 'k-' || (g % 1000), 'created', jsonb_build_object('key', g % 1000, 'n', g / 1000), '{{\"source\": \"test\"}}'
         from generate_series(15000, 19999) g",
        o.schema
    ))
    .execute(&pool)
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let left: i64 = sqlx::query_scalar(&format!("select count(*) from \"{}\".outbox", o.schema))
            .fetch_one(&pool)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} events left after the database restart");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    relay.kill();
    let got = consume(&o, 20_000, Duration::from_secs(120)).await;
    let dups = check(&got, 20_000, 1_000);
    println!("outage run: {} messages for 20000 events ({dups} duplicates)", got.len());
}

brokers!(an_oversized_row_is_quarantined_and_later_events_flow, quarantine_an_oversized_row);
async fn quarantine_an_oversized_row(kind: Kind) {
    let o = outbox("poison", &common::env("DATABASE_URL"), &Broker::shared(kind), 1).await;
    let t = format!("\"{}\".outbox", o.schema);
    o.insert(0, 10, 1).await;
    // 2 MB: over the 1 MB message limit.
    sqlx::query(&format!(
        "insert into {t} (id, aggregatetype, aggregateid, type, payload) values (gen_random_uuid(), 'order', 'big', 'created', jsonb_build_object('blob', repeat('x', 2000000)))"
    ))
    .execute(&o.pool)
    .await
    .unwrap();
    o.insert(10, 10, 1).await;
    let mut relay = o.relay("relay-poison.log", &o.url);
    o.wait_drained(Duration::from_secs(60)).await;
    relay.kill();
    let dl: Vec<(String, i32, String)> = sqlx::query_as(&format!(
        "select aggregateid, attempts, last_error from \"{}\".outbox_dead_letter",
        o.schema
    ))
    .fetch_all(&o.pool)
    .await
    .unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].0, "big");
    let says = match kind {
        Kind::Kafka => "too large",
        Kind::Nats => "max payload",
        Kind::Rabbitmq => "too large",
    };
    assert!(dl[0].2.to_lowercase().contains(says), "error recorded: {}", dl[0].2);
    let got = consume(&o, 20, Duration::from_secs(60)).await;
    let by_id: BTreeMap<&str, &Got> = got.iter().map(|g| (g.id.as_str(), g)).collect();
    assert_eq!(by_id.len(), 20, "every other event published");
}

brokers!(a_standby_takes_over_when_the_active_relay_dies, standby_takes_over);
async fn standby_takes_over(kind: Kind) {
    let o = outbox("standby", &common::env("DATABASE_URL"), &Broker::shared(kind), 1).await;
    let mut a = o.relay("relay-standby-a.log", &o.url);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut b = o.relay("relay-standby-b.log", &o.url);
    o.insert(0, 100, 10).await;
    o.wait_drained(Duration::from_secs(30)).await;
    a.kill();
    let killed = Instant::now();
    o.insert(100, 100, 10).await;
    o.wait_drained(Duration::from_secs(30)).await;
    println!(
        "standby drained the outbox {:?} after the active relay was killed",
        killed.elapsed()
    );
    b.kill();
    let got = consume(&o, 200, Duration::from_secs(60)).await;
    check(&got, 200, 10);
}

brokers!(
    sigterm_finishes_the_batches_in_flight_and_hands_over_without_duplicates,
    hand_over_on_sigterm
);
async fn hand_over_on_sigterm(kind: Kind) {
    const EVENTS: i64 = 100_000;
    let o = outbox("sigterm", &common::env("DATABASE_URL"), &Broker::shared(kind), 4).await;
    o.insert(0, EVENTS, 1000).await;
    let mut a = o.relay("relay-sigterm-a.log", &o.url);
    let deadline = Instant::now() + Duration::from_secs(60);
    while o.remaining().await == EVENTS {
        assert!(Instant::now() < deadline, "relay a never started publishing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut b = o.relay("relay-sigterm-b.log", &o.url);
    let left = o.remaining().await;
    let status = Command::new("kill").args(["-TERM", &a.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let exit = loop {
        if let Some(s) = a.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "relay a did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(left > 0, "SIGTERM arrived mid-run ({left} events left)");
    assert_eq!(exit.code(), Some(0), "SIGTERM exits 0");
    // b takes the released lock and publishes the rest.
    o.wait_drained(Duration::from_secs(120)).await;
    b.kill();
    let got = consume(&o, EVENTS as usize, Duration::from_secs(120)).await;
    let dups = check(&got, EVENTS as usize, 1000);
    println!("SIGTERM with {left} events left: {} messages, {dups} duplicates", got.len());
    assert_eq!(dups, 0, "a clean stop acknowledges and removes what it sent: no duplicates");
}

#[tokio::test]
async fn an_open_transaction_holds_back_later_rows_in_order_and_is_reported() {
    let o = outbox("longtx", &common::env("DATABASE_URL"), &Broker::shared(Kind::Kafka), 1).await;
    // One event (key k-100) committed before: it shows the relay is running meanwhile.
    o.insert(100, 1, 1000).await;
    // The first event of key k-0 (n = 0) is written by a transaction that stays open.
    let mut tx = o.pool.begin().await.unwrap();
    sqlx::query(&format!(
        "insert into \"{}\".outbox (id, aggregatetype, aggregateid, type, payload, headers)
         values (gen_random_uuid(), 'order', 'k-0', 'created', '{{\"key\": 0, \"n\": 0}}', '{{\"source\": \"test\"}}')",
        o.schema
    ))
    .execute(&mut *tx)
    .await
    .unwrap();
    // Later events of the same key commit while it is open.
    o.insert(1, 10, 1).await;
    let mut relay = o.relay("relay-longtx.log", &o.url);
    common::wait_until(
        Duration::from_secs(60),
        "the 100 rows before the open transaction published",
        || async { (o.remaining().await == 10).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        o.remaining().await,
        10,
        "rows committed after the open transaction began wait for it"
    );
    let age = lockstep::tables::lag::oldest_transaction_age(&o.pool).await.unwrap();
    assert!(age >= 2.0, "the blocking transaction's age is reported: {age}");
    tx.commit().await.unwrap();
    o.wait_drained(Duration::from_secs(30)).await;
    relay.kill();
    let got = consume(&o, 12, Duration::from_secs(60)).await;
    // Per key in order: k-0's held-back first event went out before its later ones.
    check(&got, 12, 2);
}

/// A prepared transaction (two-phase commit) holds back later rows as an open one does, and its
/// age is the oldest transaction's: no session shows it in pg_stat_activity once prepared. (It
/// writes a table of its own: the outbox trigger's NOTIFY cannot be prepared.)
#[tokio::test]
async fn a_prepared_transaction_holds_back_later_rows_and_is_reported() {
    let o = outbox("prepared", &common::env("DATABASE_URL"), &Broker::shared(Kind::Kafka), 1).await;
    let enabled: String = sqlx::query_scalar("show max_prepared_transactions")
        .fetch_one(&o.pool)
        .await
        .unwrap();
    assert_ne!(
        enabled, "0",
        "the test server runs without prepared transactions: restart it (scripts/testenv down; scripts/testenv up)"
    );
    // A prepared transaction outlives its session and a server restart, and would hold back
    // every later row of the server: one a killed run left behind goes first, and this one is
    // ended before any assertion can panic.
    let left: Vec<String> = sqlx::query_scalar("select gid from pg_prepared_xacts where gid like 'lockstep-test-%'")
        .fetch_all(&o.pool)
        .await
        .unwrap();
    for gid in left {
        sqlx::query(&format!("rollback prepared '{gid}'")).execute(&o.pool).await.unwrap();
    }
    let gid = format!("lockstep-test-{}", o.schema);
    let other = format!("\"{}\".other", o.schema);
    sqlx::query(&format!("create table {other} (n int)"))
        .execute(&o.pool)
        .await
        .unwrap();
    let mut c = o.pool.acquire().await.unwrap();
    sqlx::query("begin").execute(&mut *c).await.unwrap();
    sqlx::query(&format!("insert into {other} values (1)"))
        .execute(&mut *c)
        .await
        .unwrap();
    sqlx::query(&format!("prepare transaction '{gid}'")).execute(&mut *c).await.unwrap();
    drop(c);
    let held = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(async {
        o.insert(1, 10, 1).await;
        let relay = o.relay("relay-prepared.log", &o.url);
        tokio::time::sleep(Duration::from_secs(6)).await;
        let remaining = o.remaining().await;
        let age = lockstep::tables::lag::oldest_transaction_age(&o.pool).await;
        (relay, remaining, age)
    }))
    .await;
    sqlx::query(&format!("commit prepared '{gid}'")).execute(&o.pool).await.unwrap();
    let (mut relay, remaining, age) = held.unwrap_or_else(|p| std::panic::resume_unwind(p));
    let age = age.unwrap();
    assert_eq!(remaining, 10, "rows committed after the prepared transaction began wait for it");
    assert!(age >= 6.0, "the prepared transaction's age is reported: {age}");
    o.wait_drained(Duration::from_secs(30)).await;
    relay.kill();
    let got = consume(&o, 10, Duration::from_secs(60)).await;
    check(&got, 10, 1);
}

async fn dead_letters(o: &Outbox) -> Vec<(String, String, i32, String)> {
    sqlx::query_as(&format!(
        "select id::text, aggregateid, attempts, last_error from \"{}\".outbox_dead_letter order by failed_at",
        o.schema
    ))
    .fetch_all(&o.pool)
    .await
    .unwrap()
}

/// A broker (or network) outage is not a poison message: with a 5 s message timeout and two
/// attempts, three minutes without a broker dead-letter nothing, and every event arrives in order.
#[tokio::test]
async fn a_three_minute_broker_outage_dead_letters_nothing() {
    let mut broker = Broker::private(Kind::Kafka);
    let o = outbox("long-outage", &common::env("DATABASE_URL"), &broker, 3).await;
    o.insert(0, 2_000, 100).await;
    let args = ["--kafka-config", "message.timeout.ms=5000", "--max-attempts", "2"];
    let mut relay = o.relay_with("relay-long-outage.log", &o.url, &args);
    o.wait_drained(Duration::from_secs(120)).await;

    broker.stop();
    o.insert(2_000, 2_000, 100).await;
    let outage = Instant::now();
    let mut shown = false;
    while outage.elapsed() < Duration::from_secs(180) {
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(dead_letters(&o).await, vec![], "nothing is dead-lettered during an outage");
        if !shown && outage.elapsed() >= Duration::from_secs(30) {
            // Messages did time out, and the outage shows: not ready, broker_failing 1.
            let log = std::fs::read_to_string(std::path::PathBuf::from(common::env("LOCKSTEP_TESTENV_DIR")).join("relay-long-outage.log"))
                .unwrap();
            assert!(
                log.contains("a message timed out"),
                "no message timed out during the outage:\n{log}"
            );
            let addr = log
                .split("relay starting addr=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .expect("the relay's metrics address in its log");
            assert!(
                common::http_get(addr, "/readyz").await.starts_with("HTTP/1.1 503"),
                "/readyz fails while the broker is down"
            );
            let metrics = common::http_get(addr, "/metrics").await;
            assert!(metrics.contains("lockstep_relay_broker_failing 1"), "{metrics}");
            shown = true;
        }
    }
    assert!(shown);
    assert!(o.remaining().await > 0, "nothing can be acknowledged while the broker is down");
    broker.start_again();
    let back = Instant::now();
    o.wait_drained(Duration::from_secs(240)).await;
    println!("outbox drained {:?} after the broker came back", back.elapsed());
    relay.kill();
    assert_eq!(dead_letters(&o).await, vec![]);
    let got = consume(&o, 4_000, Duration::from_secs(120)).await;
    let dups = check(&got, 4_000, 100);
    println!("3-minute outage: {} messages for 4000 events ({dups} duplicates)", got.len());
}

/// Replaying a dead-lettered row (copy it back, it fails again) must not lose it: the move stores
/// first, replaces the earlier failure, and deletes only what it stored.
#[tokio::test]
async fn a_replayed_poison_row_that_fails_again_is_kept() {
    let o = outbox("replay", &common::env("DATABASE_URL"), &Broker::shared(Kind::Kafka), 1).await;
    let mut relay = o.relay("relay-replay.log", &o.url);
    let id = uuid::Uuid::new_v4();
    let big = format!(
        "insert into \"{}\".outbox (id, aggregatetype, aggregateid, type, payload) values ($1, 'order', 'big', 'created', jsonb_build_object('blob', repeat('x', 2000000)))",
        o.schema
    );
    sqlx::query(&big).bind(id).execute(&o.pool).await.unwrap();
    o.wait_drained(Duration::from_secs(60)).await;
    let first = dead_letters(&o).await;
    assert_eq!(first.len(), 1);
    // The usual replay: copy it back while its dead-letter row stays.
    sqlx::query(&format!(
        "update \"{}\".outbox_dead_letter set last_error = 'first failure' where id = $1",
        o.schema
    ))
    .bind(id)
    .execute(&o.pool)
    .await
    .unwrap();
    sqlx::query(&big).bind(id).execute(&o.pool).await.unwrap();
    o.insert(0, 10, 1).await;
    o.wait_drained(Duration::from_secs(60)).await;
    relay.kill();
    let again = dead_letters(&o).await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].0, id.to_string());
    assert!(
        again[0].3.to_lowercase().contains("too large"),
        "the new failure replaced the old: {}",
        again[0].3
    );
    assert_eq!(consume(&o, 10, Duration::from_secs(60)).await.len(), 10);
}

/// A bytea outbox beside a lockstep-made (jsonb) dead-letter table: a poison row moves, its bytes
/// kept as base64, and the relay goes on.
#[tokio::test]
async fn a_poison_row_of_a_bytea_outbox_moves_to_a_jsonb_dead_letter_table() {
    let schema = format!("t_{}", common::unique("bytea").replace('-', "_"));
    let topic = common::unique("relay.bytea");
    let bootstrap = common::kafka_bootstrap();
    let admin = Admin::new(&bootstrap, &Default::default(), Duration::from_secs(10)).unwrap();
    admin.create_topic(&topic, 1, 1, &Default::default()).await.unwrap();
    let url = common::env("DATABASE_URL");
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&url).await.unwrap();
    // The contract with a bytea payload, made by the application.
    sqlx::raw_sql(&format!(
        "create schema \"{schema}\";
         create table \"{schema}\".outbox (
             id uuid primary key, aggregatetype text not null, aggregateid text not null, type text not null,
             payload bytea, headers jsonb, created_at timestamptz not null default now(),
             seq bigint generated always as identity unique, txid xid8 not null default pg_current_xact_id(),
             attempts integer not null default 0, last_error text, published_at timestamptz);
         insert into \"{schema}\".outbox (id, aggregatetype, aggregateid, type, payload)
             values (gen_random_uuid(), 'order', 'big', 'created', convert_to(repeat('x', 2000000), 'UTF8')),
                    (gen_random_uuid(), 'order', 'small', 'created', '\\x7b7d');"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let o = Outbox {
        table: common::outbox::OutboxTable { schema, pool },
        topic,
        url,
        kind: Kind::Kafka,
        broker_env: vec![("KAFKA_BOOTSTRAP_SERVERS", bootstrap.clone())],
        bootstrap,
    };
    let mut relay = o.relay("relay-bytea.log", &o.url);
    o.wait_drained(Duration::from_secs(60)).await;
    relay.kill();
    let payload: serde_json::Value = sqlx::query_scalar(&format!("select payload from \"{}\".outbox_dead_letter", o.schema))
        .fetch_one(&o.pool)
        .await
        .unwrap();
    let text = payload.as_str().expect("bytes kept as a base64 JSON string");
    assert!(text.starts_with("eHh4eHh4"), "base64 of the original bytes: {}", &text[..16]);
}

/// A fatal idempotent-producer error makes every send fail: the relay replaces the producer and
/// goes on from the outbox, losing nothing.
/// The relay's configuration for `o`, as `lockstep relay` would parse it from `extra` arguments.
fn config(o: &Outbox, extra: &[&str]) -> lockstep::config::RelayConfig {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: lockstep::config::RelayArgs,
    }
    let argv = [
        "relay",
        "--database-url",
        &o.url,
        "--bootstrap-servers",
        &o.bootstrap,
        "--schema",
        &o.schema,
        "--topic",
        &o.topic,
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    Cli::parse_from(argv.iter().chain(extra)).args.resolve().unwrap()
}

#[tokio::test]
async fn a_fatal_producer_error_rebuilds_the_producer_and_loses_nothing() {
    let o = outbox("fatal", &common::env("DATABASE_URL"), &Broker::shared(Kind::Kafka), 3).await;
    let cfg = config(&o, &[]);
    let mut conn = o.pool.acquire().await.unwrap();
    let r = &cfg.resolved;
    let tables = lockstep::tables::schema::prepare_outbox(&mut conn, &r.table, &r.dead_letter_table, true)
        .await
        .unwrap();
    let metrics = std::sync::Arc::new(lockstep::relay::RelayMetrics::default());
    let mut relay = lockstep::relay::Relay::new(cfg, metrics.clone(), &tables).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    o.insert(0, 500, 10).await;
    // Drained until empty: an open transaction of a test running beside this one can hold the
    // rows back (the relay reads only below every open transaction) for a while.
    let deadline = Instant::now() + Duration::from_secs(60);
    while o.remaining().await > 0 {
        assert!(Instant::now() < deadline, "the outbox did not drain");
        relay.drain(&mut conn, &stop).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let reason = std::ffi::CString::new("injected by the test").unwrap();
    let code = rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER;
    // SAFETY: the producer's native handle is alive for the duration of the call.
    let lockstep::clients::broker::Publisher::Kafka(kafka) = relay.publisher() else {
        panic!("a Kafka relay")
    };
    let client = rdkafka::producer::Producer::client(kafka.producer());
    unsafe { rdkafka::bindings::rd_kafka_test_fatal_error(client.native_ptr(), code, reason.as_ptr()) };
    o.insert(500, 500, 10).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while o.remaining().await > 0 {
        assert!(Instant::now() < deadline, "the outbox did not drain after the fatal error");
        relay.drain(&mut conn, &stop).await.unwrap();
    }
    assert_eq!(metrics.producer_rebuilds.get(), 1, "the producer was rebuilt once");
    assert_eq!(dead_letters(&o).await, vec![]);
    let got = consume(&o, 1_000, Duration::from_secs(60)).await;
    check(&got, 1_000, 10);
}

/// Under sustained load the relay does not run a drain per writer transaction: NOTIFYs that
/// arrive together wake one drain, and a drain under a steady flow stops listening and polls.
/// Once the flow ends it listens again: a row committed later is published at once, not at the
/// (here 60 s) poll interval.
#[tokio::test]
async fn a_steady_flow_wakes_few_drains_and_a_later_row_still_wakes_the_relay() {
    const WRITERS: i64 = 8;
    const EACH: i64 = 250;
    let o = outbox("notify", &common::env("DATABASE_URL"), &Broker::shared(Kind::Kafka), 3).await;
    // A long poll interval: every wake-up here is a NOTIFY.
    let cfg = config(&o, &["--poll-interval", "60s"]);
    let common::relays::InProcess {
        task: relay,
        metrics,
        stop,
    } = common::relays::in_process(cfg).await;
    // One row per transaction: one NOTIFY each.
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let pool = o.pool.clone();
            let sql = format!(
                "insert into \"{}\".outbox (id, aggregatetype, aggregateid, type, payload)
                 values (gen_random_uuid(), 'order', 'k-' || $1::text, 'created', jsonb_build_object('key', $1::bigint, 'n', $2::bigint))",
                o.schema
            );
            tokio::spawn(async move {
                for n in 0..EACH {
                    sqlx::query(&sql).bind(w).bind(n).execute(&pool).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    o.wait_drained(Duration::from_secs(60)).await;
    let notified = metrics.notifications.get();
    let wakeups = metrics.wakeups.get_or_create(&lockstep::relay::WakeLabel { by: "notify" }).get();
    println!("{} transactions: {notified} NOTIFYs received, {wakeups} wake-ups", WRITERS * EACH);
    assert!(
        wakeups * 4 <= (WRITERS * EACH) as u64,
        "far fewer drains than transactions: {wakeups} wake-ups for {} transactions",
        WRITERS * EACH
    );
    // Idle now (nothing in flight): a lone row must wake it through NOTIFY.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sql = format!(
        "insert into \"{}\".outbox (id, aggregatetype, aggregateid, type, payload)
         values (gen_random_uuid(), 'order', 'k-0', 'created', jsonb_build_object('key', 0, 'n', {EACH}))",
        o.schema
    );
    sqlx::query(&sql).execute(&o.pool).await.unwrap();
    o.wait_drained(Duration::from_secs(20)).await;
    stop.cancel();
    relay.await.unwrap().unwrap();
    let got = consume(&o, (WRITERS * EACH + 1) as usize, Duration::from_secs(60)).await;
    check(&got, (WRITERS * EACH + 1) as usize, WRITERS as usize);
}

/// A NOTIFY whose row an older open transaction still holds above the relay's snapshot horizon
/// (the drain it wakes reads nothing) is not left to a long poll interval: the relay looks again
/// each second and publishes the row soon after that transaction ends.
#[tokio::test]
async fn a_notified_row_an_open_transaction_holds_back_is_read_once_it_ends() {
    let o = outbox("heldback", &common::env("DATABASE_URL"), &Broker::shared(Kind::Kafka), 1).await;
    let cfg = config(&o, &["--poll-interval", "60s"]);
    let common::relays::InProcess {
        task: relay,
        metrics,
        stop,
    } = common::relays::in_process(cfg).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A transaction with a transaction id, open across the row's commit.
    let mut tx = o.pool.begin().await.unwrap();
    sqlx::query("select pg_current_xact_id()").execute(&mut *tx).await.unwrap();
    o.insert(1, 1, 1).await;
    let notify = || metrics.wakeups.get_or_create(&lockstep::relay::WakeLabel { by: "notify" }).get();
    common::wait_until(Duration::from_secs(10), "the NOTIFY's wake-up", || async {
        (notify() >= 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(o.remaining().await, 1, "held back while the older transaction is open");
    tx.commit().await.unwrap();
    // Within the poll interval (60 s), with room for other tests' transactions on the server.
    o.wait_drained(Duration::from_secs(30)).await;
    stop.cancel();
    relay.await.unwrap().unwrap();
}

/// Cleanup MarkPublished: the relay reads past published rows through the partial index, keeps
/// published rows for publishedRetention, then purges them; unpublished rows are never purged.
#[tokio::test]
async fn mark_published_keeps_rows_for_the_retention_then_purges_them() {
    const OLD: i64 = 60_000;
    const NEW: i64 = 1_000;
    let o = outbox("marked", &common::env("DATABASE_URL"), &Broker::shared(Kind::Kafka), 1).await;
    let table = lockstep::core::sql::QualifiedName {
        schema: lockstep::core::sql::Ident::parse(&o.schema).unwrap(),
        table: lockstep::core::sql::Ident::parse("outbox").unwrap(),
    };
    let mut conn = o.pool.acquire().await.unwrap();
    let missing = lockstep::tables::schema::ensure_published_indexes(&mut conn, &table, false)
        .await
        .unwrap();
    assert_eq!(
        missing,
        ["outbox_unpublished_idx", "outbox_published_at_idx"],
        "manageSchema false changes nothing"
    );
    // Rows published two hours ago (older than the retention), then events to publish.
    sqlx::query(&format!(
        "insert into {table} (id, aggregatetype, aggregateid, type, payload, published_at)
         select gen_random_uuid(), 'order', 'old-' || g, 'created', '{{}}', now() - interval '2 hours'
         from generate_series(1, $1) g"
    ))
    .bind(OLD)
    .execute(&o.pool)
    .await
    .unwrap();
    o.insert(0, NEW, 10).await;

    let cfg = config(&o, &["--cleanup", "mark-published", "--published-retention", "1m"]);
    let (select, _) = {
        let mut c = o.pool.acquire().await.unwrap();
        assert_eq!(
            lockstep::tables::schema::ensure_published_indexes(&mut c, &table, true)
                .await
                .unwrap(),
            Vec::<String>::new()
        );
        let r = &cfg.resolved;
        let tables = lockstep::tables::schema::prepare_outbox(&mut c, &r.table, &r.dead_letter_table, true)
            .await
            .unwrap();
        let relay = lockstep::relay::Relay::new(cfg.clone(), Default::default(), &tables).unwrap();
        let (s, d) = relay.statements();
        (s.to_owned(), d.to_owned())
    };
    sqlx::query(&format!("analyze {table}")).execute(&o.pool).await.unwrap();
    let plan: Vec<String> = sqlx::query_scalar(&format!("explain {select}"))
        .bind(500i64)
        .bind(Vec::<String>::new())
        .bind(Vec::<i64>::new())
        .fetch_all(&o.pool)
        .await
        .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("outbox_unpublished_idx"),
        "the read skips published rows by index:\n{plan}"
    );

    let metrics = std::sync::Arc::new(lockstep::relay::RelayMetrics::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let relay = tokio::spawn(lockstep::relay::run_with_metrics(cfg, stop.clone(), metrics.clone()));
    let count = |filter: &'static str| {
        let sql = format!("select count(*) from {table} where {filter}");
        let pool = o.pool.clone();
        async move { sqlx::query_scalar::<_, i64>(&sql).fetch_one(&pool).await.unwrap() }
    };
    let deadline = Instant::now() + Duration::from_secs(45);
    while count("published_at is null").await > 0 || count("published_at < now() - interval '1 hour'").await > 0 {
        assert!(Instant::now() < deadline, "not published and purged within 45s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Published within the retention: kept.
    assert_eq!(
        count("published_at is not null").await,
        NEW,
        "rows published within the retention are kept"
    );
    stop.cancel();
    relay.await.unwrap().unwrap();
    assert_eq!(metrics.purged.get(), OLD as u64);
    assert_eq!(metrics.purge_failures.get(), 0);
    let got = consume(&o, NEW as usize, Duration::from_secs(60)).await;
    check(&got, NEW as usize, 10);
}

/// Dead-letter replay: poison rows dead-lettered, fixed in place, replayed with `lockstep replay`,
/// delivered. A row whose id the outbox still holds stays in the dead-letter table.
#[tokio::test]
async fn dead_lettered_rows_fixed_and_replayed_are_delivered() {
    let o = outbox("replay-cli", &common::env("DATABASE_URL"), &Broker::shared(Kind::Kafka), 1).await;
    let (t, dl) = (format!("\"{}\".outbox", o.schema), format!("\"{}\".outbox_dead_letter", o.schema));
    // Three oversized events (over the 1 MB message limit) between good ones.
    o.insert(0, 5, 1).await;
    sqlx::query(&format!(
        "insert into {t} (id, aggregatetype, aggregateid, type, payload)
         select gen_random_uuid(), 'order', 'big-' || g, 'created', jsonb_build_object('n', g, 'blob', repeat('x', 2000000))
         from generate_series(1, 3) g"
    ))
    .execute(&o.pool)
    .await
    .unwrap();
    o.insert(5, 5, 1).await;
    let mut relay = o.relay("relay-replay-cli.log", &o.url);
    o.wait_drained(Duration::from_secs(60)).await;
    relay.kill();
    let count = |sql: String| {
        let pool = o.pool.clone();
        async move { sqlx::query_scalar::<_, i64>(&sql).fetch_one(&pool).await.unwrap() }
    };
    assert_eq!(count(format!("select count(*) from {dl}")).await, 3);

    // Fixed in place (the blob dropped); one of them also still in the outbox, as if copied back by hand.
    sqlx::query(&format!("update {dl} set payload = payload - 'blob'"))
        .execute(&o.pool)
        .await
        .unwrap();
    let kept: uuid::Uuid = sqlx::query_scalar(&format!(
        "insert into {t} (id, aggregatetype, aggregateid, type, payload)
         select id, aggregatetype, aggregateid, type, payload from {dl} where aggregateid = 'big-1' returning id"
    ))
    .fetch_one(&o.pool)
    .await
    .unwrap();
    let replay = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .args(["replay", "--schema", &o.schema, "--table", "outbox"])
            .args(extra)
            .env("DATABASE_URL", &o.url)
            .output()
            .unwrap()
    };
    let refused = replay(&[]);
    assert!(!refused.status.success(), "--all or --id is required");
    let out = replay(&["--all"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("replayed 2 dead-lettered events"), "{stderr}");
    let left: Vec<uuid::Uuid> = sqlx::query_scalar(&format!("select id from {dl}"))
        .fetch_all(&o.pool)
        .await
        .unwrap();
    assert_eq!(left, [kept], "the row the outbox already held stays in the dead-letter table");
    assert_eq!(
        count(format!("select count(*) from {t} where attempts = 0 and last_error is null")).await,
        3
    );

    let mut relay = o.relay("relay-replay-cli-2.log", &o.url);
    o.wait_drained(Duration::from_secs(60)).await;
    relay.kill();
    let got = consume(&o, 13, Duration::from_secs(60)).await;
    let keys: HashSet<&str> = got.iter().map(|g| g.key.as_str()).collect();
    for k in ["big-1", "big-2", "big-3"] {
        assert!(keys.contains(k), "{k} delivered after the replay");
    }
}

#[tokio::test]
async fn messages_are_stamped_with_created_at_unless_older_than_an_hour() {
    let o = outbox("stamp", &common::env("DATABASE_URL"), &Broker::shared(Kind::Kafka), 1).await;
    o.insert(0, 20, 1).await;
    // The first ten were written 5 minutes ago, the last ten 3 hours ago (a backlog, a replay).
    sqlx::query(&format!(
        "update \"{}\".outbox set created_at = now() - case when (payload->>'n')::int < 10
             then interval '5 minutes' else interval '3 hours' end",
        o.schema
    ))
    .execute(&o.pool)
    .await
    .unwrap();
    let created: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(&format!(
        "select id::text, (extract(epoch from created_at) * 1000)::bigint from \"{}\".outbox",
        o.schema
    ))
    .fetch_all(&o.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut relay = o.relay("relay-stamp.log", &o.url);
    let got = consume(&o, 20, Duration::from_secs(60)).await;
    relay.kill();
    check(&got, 20, 1);
    for g in &got {
        let c = created[&g.id];
        if g.n < 10 {
            assert_eq!(
                (g.timestamp, g.created_header),
                (Some(c), None),
                "a fresh row's timestamp is its created_at"
            );
        } else {
            assert_eq!(g.created_header, Some(c), "an old row carries created_at in a header");
            assert!(g.timestamp.unwrap() >= started - 1000, "and is stamped when it was published");
        }
    }
}
