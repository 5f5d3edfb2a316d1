//! Per-key order when the broker rejects one message in the middle of a pipelined key, end to
//! end: a real PostgreSQL outbox, the relay's own code path (`run_with_metrics`), and, as the one
//! allowed stand-in for the broker, librdkafka's mock cluster with an injected Produce error
//! (tansu does not enforce a topic's max.message.bytes nor record validation, so no real setting
//! makes it reject a message).

mod common;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use rdkafka::{
    message::{Headers, Message},
    mocking::MockCluster,
    types::{RDKafkaApiKey, RDKafkaRespErr},
};

const KEYS: i64 = 4;

/// `n` rows over KEYS keys from `from`; payload {"n": i}, i increasing per key.
async fn insert(t: &common::outbox::OutboxTable, from: i64, n: i64) {
    sqlx::query(&format!(
        "insert into \"{}\".outbox (id, aggregatetype, aggregateid, type, payload)
         select gen_random_uuid(), 'order', 'k-' || (g % $3), 'created', jsonb_build_object('n', g / $3)
         from generate_series($1, $1 + $2 - 1) g",
        t.schema
    ))
    .bind(from)
    .bind(n)
    .bind(KEYS)
    .execute(&t.pool)
    .await
    .unwrap();
}

/// A message as consumed.
struct Got {
    id: String,
    key: String,
    n: i64,
    timestamp: Option<i64>,
    /// The relay's `lockstep-created-at` header.
    created: Option<i64>,
}

/// Every message of the topic, in log order per partition.
fn consume(bootstrap: &str, topic: &str, want: usize, timeout: Duration) -> Vec<Got> {
    let c = common::relays::from_start(bootstrap, topic, None);
    let (mut out, mut ids) = (Vec::new(), HashSet::new());
    let deadline = Instant::now() + timeout;
    while ids.len() < want && Instant::now() < deadline {
        let Some(m) = c.poll(Duration::from_millis(200)) else { continue };
        let m = m.expect("consume");
        let header = |name: &str| {
            let h = m.headers().and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value));
            h.map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let payload: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let g = Got {
            id: header("id").expect("id header"),
            key: String::from_utf8_lossy(m.key().unwrap()).into_owned(),
            n: payload["n"].as_i64().unwrap(),
            timestamp: m.timestamp().to_millis(),
            created: header("lockstep-created-at").map(|v| v.parse().unwrap()),
        };
        ids.insert(g.id.clone());
        out.push(g);
    }
    out
}

/// Per key, the first appearance of each message comes in seq order (duplicates allowed): the
/// reorders found, as "key: n after m".
fn reorders(got: &[Got]) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut bad = Vec::new();
    for g in got {
        if !seen.insert(&g.id) {
            continue;
        }
        if let Some(prev) = last.insert(&g.key, g.n) {
            if g.n <= prev {
                bad.push(format!("{}: {} after {prev}", g.key, g.n));
            }
        }
    }
    bad
}

/// The relay's configuration: the mock cluster, small batches, many in flight.
fn config(t: &common::outbox::OutboxTable, bootstrap: &str, topic: &str, extra: &[&str]) -> lockstep::config::RelayConfig {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: lockstep::config::RelayArgs,
    }
    let url = common::env("DATABASE_URL");
    let argv = [
        "relay",
        "--database-url",
        &url,
        "--bootstrap-servers",
        bootstrap,
        "--schema",
        &t.schema,
        "--topic",
        topic,
        "--metrics-addr",
        "127.0.0.1:0",
        "--poll-interval",
        "100ms",
        // Small batches, many in flight: a key's rows spread over batches pipelined together.
        "--batch-size",
        "10",
        "--max-batches-in-flight",
        "16",
        "--linger-ms",
        "1",
        // The mock broker checks sequences only for transactional producers: a request sent
        // behind the rejected one would be written where Kafka refuses it for the gap. One
        // request in flight per connection keeps the mock as strict as Kafka here.
        "--kafka-config",
        "max.in.flight.requests.per.connection=1",
    ];
    Cli::parse_from(argv.iter().chain(extra)).args.resolve().unwrap()
}

async fn dead_letters(t: &common::outbox::OutboxTable) -> i64 {
    sqlx::query_scalar(&format!("select count(*) from \"{}\".outbox_dead_letter", t.schema))
        .fetch_one(&t.pool)
        .await
        .unwrap()
}

/// The broker rejects one Produce request (InvalidRecord, as broker-side validation does) while
/// later batches of the same keys are handed to the producer behind it. The rejected rows are
/// retried and published; no later row of their keys may be published before them.
#[tokio::test]
async fn a_rejected_message_mid_key_is_published_before_the_keys_later_rows() {
    let mock = MockCluster::new(1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let topic = common::unique("relay.order");
    mock.create_topic(&topic, 2, 1).unwrap();
    let t = common::outbox::OutboxTable::create("order_reject", &common::env("DATABASE_URL")).await;
    let cfg = config(&t, &bootstrap, &topic, &[]);
    let metrics = Arc::new(lockstep::relay::RelayMetrics::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let relay = tokio::spawn(lockstep::relay::run_with_metrics(cfg, stop.clone(), metrics.clone()));

    // Every key's first rows published, then one request rejected in the middle of its keys.
    insert(&t, 0, 200).await;
    t.wait_drained(Duration::from_secs(60)).await;
    // A slow answer: the relay hands later batches over while the rejected request is in flight.
    mock.broker_round_trip_time(1, Duration::from_millis(200)).unwrap();
    mock.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD]);
    insert(&t, 200, 800).await;
    t.wait_drained(Duration::from_secs(90)).await;
    stop.cancel();
    relay.await.unwrap().unwrap();

    let reason = lockstep::relay::ReasonLabel {
        reason: "InvalidRecord".into(),
    };
    assert!(metrics.failures.get_or_create(&reason).get() > 0, "the broker rejected no message");
    let got = consume(&bootstrap, &topic, 1_000, Duration::from_secs(60));
    let ids: HashSet<&str> = got.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(ids.len(), 1_000, "every row published");
    assert_eq!(dead_letters(&t).await, 0);
    let bad = reorders(&got);
    assert!(
        bad.is_empty(),
        "{} messages published ahead of an earlier row of their key: {:?}",
        bad.len(),
        &bad[..bad.len().min(10)]
    );
    let failed = |reason: &str| {
        let label = lockstep::relay::ReasonLabel { reason: reason.into() };
        metrics.failures.get_or_create(&label).get()
    };
    println!(
        "{} messages for 1000 rows; {} rejected, {} purged and read again; {} producer rebuilds",
        got.len(),
        failed("InvalidRecord"),
        failed("PurgeQueue") + failed("PurgeInflight"),
        metrics.producer_rebuilds.get()
    );
}

/// A broker whose timestamp bounds are tighter than the relay's hour refuses a backlog stamped
/// with its created_at (InvalidTimestamp): the rows are sent again stamped with the publish time
/// (created_at in the header), in order, none dead-lettered and none retried forever.
#[tokio::test]
async fn a_refused_timestamp_is_sent_again_stamped_now() {
    let mock = MockCluster::new(1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let topic = common::unique("relay.stamp");
    mock.create_topic(&topic, 1, 1).unwrap();
    let t = common::outbox::OutboxTable::create("order_stamp", &common::env("DATABASE_URL")).await;
    insert(&t, 0, 100).await;
    // A backlog written 30 minutes ago: under the relay's hour, so stamped with created_at.
    sqlx::query(&format!(
        "update \"{}\".outbox set created_at = now() - interval '30 minutes'",
        t.schema
    ))
    .execute(&t.pool)
    .await
    .unwrap();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    mock.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_TIMESTAMP]);
    let metrics = Arc::new(lockstep::relay::RelayMetrics::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let relay = tokio::spawn(lockstep::relay::run_with_metrics(
        config(&t, &bootstrap, &topic, &[]),
        stop.clone(),
        metrics.clone(),
    ));
    t.wait_drained(Duration::from_secs(60)).await;
    stop.cancel();
    relay.await.unwrap().unwrap();

    let reason = lockstep::relay::ReasonLabel {
        reason: "InvalidTimestamp".into(),
    };
    assert!(metrics.failures.get_or_create(&reason).get() > 0, "the broker refused no timestamp");
    assert_eq!(dead_letters(&t).await, 0);
    let got = consume(&bootstrap, &topic, 100, Duration::from_secs(60));
    assert_eq!(got.iter().map(|g| g.id.as_str()).collect::<HashSet<_>>().len(), 100);
    assert!(reorders(&got).is_empty(), "{:?}", reorders(&got));
    for g in &got {
        assert!(g.created.is_some(), "{} was sent again stamped with its created_at", g.id);
        assert!(g.timestamp.unwrap() >= started - 1_000, "{} is stamped with the publish time", g.id);
    }
}

/// The broker rejects a batch while an earlier batch is still in flight (to a slow broker): the
/// relay sees the fatal producer before the rejected batch is the oldest. It still completes
/// every batch from its reports before rebuilding: the rejected rows' attempt is counted (with
/// maxAttempts 1 they are dead-lettered at once), the purged row is published without one.
#[tokio::test]
async fn a_rejection_behind_a_slower_batch_counts_its_attempt() {
    let mock = MockCluster::new(2).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let (slow, fast) = (common::unique("relay.slow"), common::unique("relay.fast"));
    mock.create_topic(&slow, 1, 1).unwrap();
    mock.create_topic(&fast, 1, 1).unwrap();
    mock.partition_leader(&slow, 0, Some(2)).unwrap();
    mock.partition_leader(&fast, 0, Some(1)).unwrap();
    mock.broker_round_trip_time(2, Duration::from_secs(2)).unwrap();
    let t = common::outbox::OutboxTable::create("order_slow", &common::env("DATABASE_URL")).await;
    let insert = |topic: &str, key: &str, n: i64| {
        let sql = format!(
            "insert into \"{}\".outbox (id, aggregatetype, aggregateid, type, payload)
             select gen_random_uuid(), $1, $2, 'created', jsonb_build_object('n', g) from generate_series(0, $3 - 1) g",
            t.schema
        );
        let (pool, topic, key) = (t.pool.clone(), topic.to_owned(), key.to_owned());
        async move { sqlx::query(&sql).bind(topic).bind(key).bind(n).execute(&pool).await.unwrap() }
    };
    let cfg = config(&t, &bootstrap, "{aggregatetype}", &["--max-attempts", "1"]);
    let common::relays::InProcess {
        task: relay,
        metrics,
        stop,
    } = common::relays::in_process(cfg).await;
    // A row to the slow broker: its request is answered in 2 s.
    insert(&slow, "x", 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The next request, to the other broker, is rejected meanwhile.
    mock.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD]);
    insert(&fast, "k", 5).await;
    t.wait_drained(Duration::from_secs(60)).await;
    stop.cancel();
    relay.await.unwrap().unwrap();

    let dead: Vec<(String, i32, String)> = sqlx::query_as(&format!(
        "select aggregateid, attempts, last_error from \"{}\".outbox_dead_letter",
        t.schema
    ))
    .fetch_all(&t.pool)
    .await
    .unwrap();
    assert!(!dead.is_empty(), "the rejected rows were published without their attempt counted");
    for (key, attempts, error) in &dead {
        assert_eq!((key.as_str(), *attempts), ("k", 1), "{error}");
    }
    let got = consume(&bootstrap, &slow, 1, Duration::from_secs(30));
    assert_eq!(got.len(), 1, "the slow row, in flight when the producer went fatal, is published");
    let got = consume(&bootstrap, &fast, 5 - dead.len(), Duration::from_secs(30));
    assert!(reorders(&got).is_empty(), "{:?}", reorders(&got));
    println!(
        "{} of k's 5 rows dead-lettered; {} producer rebuilds",
        dead.len(),
        metrics.producer_rebuilds.get()
    );
}
