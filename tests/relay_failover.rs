//! Failover when the active relay did not exit cleanly, with relays run as the binary a Pod would
//! run and a proxy of the test's own (common/proxy.rs) between relay A and PostgreSQL: a relay cut
//! off by a partition is replaced within 30 s and nothing is lost; a transaction pooler that moves
//! the relay's session to another server process stops the relay with a clear error; a relay
//! pointed at a real hot standby (a base backup of the test server, started in recovery) refuses.

mod common;

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use common::{
    proxy::Proxy,
    relays::{self, upstream, Outbox},
    standby::Standby,
};
use rdkafka::{
    config::ClientConfig,
    consumer::{BaseConsumer, Consumer},
    message::{Headers, Message},
};

/// What the issue asks: a relay whose packets are dropped is replaced within this.
const TAKEOVER_BOUND: Duration = Duration::from_secs(30);

async fn outbox(prefix: &str) -> Outbox {
    relays::outbox(prefix, &common::kafka_bootstrap()).await
}

/// The distinct event ids on the topic (read from the beginning until `want` or timeout).
fn consume_ids(bootstrap: &str, topic: &str, want: usize, timeout: Duration) -> HashSet<String> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", common::unique("check"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning).unwrap();
    c.assign(&tpl).unwrap();
    let mut ids = HashSet::new();
    let deadline = Instant::now() + timeout;
    while ids.len() < want && Instant::now() < deadline {
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = m.expect("consume");
            let headers = m.headers().expect("headers");
            let id = headers.iter().find(|h| h.key == "id").and_then(|h| h.value).expect("id header");
            ids.insert(String::from_utf8_lossy(id).into_owned());
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_relay_is_replaced_within_30s_and_nothing_is_lost() {
    let url = common::env("DATABASE_URL");
    let o = outbox("partition").await;
    let proxy = Proxy::start(upstream()).await;
    let mut a = o.relay("relay-partition-a.log", &proxy.url(&url));
    o.insert(0, 100, 10).await;
    o.wait_drained(Duration::from_secs(120)).await;
    let holder = o.lock_holder().await.expect("relay a holds the lock");
    let mut b = o.relay("relay-partition-b.log", &url);
    b.wait_log("another relay is active; standing by", Duration::from_secs(120)).await;

    // The partition: relay a's packets go nowhere, and nothing answers them.
    proxy.blackhole().await;
    let cut = Instant::now();
    o.insert(100, 100, 10).await;
    let mut session_dropped = None;
    let took = loop {
        if session_dropped.is_none() && !o.backend_alive(holder).await {
            session_dropped = Some(cut.elapsed());
        }
        if o.remaining().await == 0 {
            break cut.elapsed();
        }
        // Past the bound only to measure how far past.
        assert!(
            cut.elapsed() < TAKEOVER_BOUND * 3,
            "no takeover within {:?} of the partition (server dropped relay a's session after: {session_dropped:?})",
            cut.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "partition: the server dropped relay a's session after {session_dropped:?}; relay b published the pending rows {took:?} after the partition (bound {TAKEOVER_BOUND:?}, server-side detection {:?})",
        lockstep::relay::DEAD_PEER_TIMEOUT
    );
    assert!(took < TAKEOVER_BOUND, "takeover took {took:?}");
    assert!(b.log().contains("holding the outbox lock"), "relay b took over:\n{}", b.log());
    if let Some(line) = a.log().lines().find(|l| l.contains("did not answer")) {
        println!("relay a noticed: {line}");
    }
    a.kill();
    b.kill();
    let ids = consume_ids(&o.bootstrap, &o.topic, 200, Duration::from_secs(120));
    assert_eq!(ids.len(), 200, "every committed event reached the broker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_pooler_moving_the_session_stops_the_relay_with_a_clear_error() {
    let url = common::env("DATABASE_URL");
    let o = outbox("pooler").await;
    // The relay's own session check runs on the relay's server connection; a pooler may hand it
    // another one, as the proxy now does (the old one, holding the lock, stays in its pool).
    let proxy = Proxy::start(upstream()).await;
    let mut a = o.relay("relay-pooler-a.log", &proxy.url(&url));
    o.insert(0, 10, 2).await;
    o.wait_drained(Duration::from_secs(120)).await;
    proxy.repin_at(b"select pg_backend_pid(), current_setting(");
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.repinned() == 0 {
        assert!(Instant::now() < deadline, "relay a never checked its session");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    o.insert(10, 10, 2).await;
    let status = a.wait_exit(Duration::from_secs(60)).await;
    let log = a.log();
    println!("relay a: {status}; {}", log.lines().last().unwrap_or_default());
    assert_eq!(status.code(), Some(1), "exits non-zero:\n{log}");
    for part in ["transaction-pooling proxy", "PgBouncer pool_mode=transaction", "session pooling"] {
        assert!(log.contains(part), "{part:?} in the relay's error:\n{log}");
    }
    assert_eq!(o.remaining().await, 10, "nothing relayed on a server process without the lock");
    assert_eq!(proxy.repinned(), 1);
}

#[tokio::test]
async fn a_relay_on_a_hot_standby_refuses_with_what_to_do() {
    let o = outbox("hotstandby").await;
    o.insert(0, 5, 1).await;
    let standby = Standby::start(&common::env("DATABASE_URL")).await;
    let replica = sqlx::PgPool::connect(&standby.url()).await.unwrap();
    let in_recovery: bool = sqlx::query_scalar("select pg_is_in_recovery()").fetch_one(&replica).await.unwrap();
    assert!(in_recovery, "the base backup runs as a standby");
    let mut a = o.relay("relay-hotstandby.log", &standby.url());
    let status = a.wait_exit(Duration::from_secs(60)).await;
    let log = a.log();
    assert_eq!(status.code(), Some(1), "exits non-zero:\n{log}");
    for part in ["read-only hot standby", "point DATABASE_URL at the primary"] {
        assert!(log.contains(part), "{part:?} in the relay's error:\n{log}");
    }
    assert_eq!(o.remaining().await, 5, "nothing relayed from the replica");
}
