//! Two relays over time never interleave a key, with relays run as the binary a Pod would run:
//! a relay cut off from its database stops sending and purges its producer before another can
//! take the lock (fencing); two relays through a transaction pooler that hands both the same
//! server session are never both active; a lock statement that keeps failing is retried with
//! backoff, not in a tight loop.

mod common;

use std::time::{Duration, Instant};

use common::{
    kafka_proxy::KafkaProxy,
    pgbouncer::PgBouncer,
    proxy::Proxy,
    relays::{self, backwards, upstream, Event},
    PrivateBroker,
};

fn ev(key: &str, n: i64) -> Event {
    Event {
        id: format!("{key}-{n}"),
        key: key.into(),
        n,
    }
}

#[test]
fn a_replay_before_the_newest_state_is_fine_an_old_state_after_it_is_not() {
    let replay: Vec<Event> = [0, 1, 2, 3, 2, 3, 4, 5, 5].iter().map(|n| ev("k", *n)).collect();
    assert!(backwards(&replay).is_empty());
    let late: Vec<Event> = [0, 1, 2, 3, 2, 3, 4, 5, 2, 3].iter().map(|n| ev("k", *n)).collect();
    assert_eq!(backwards(&late), vec![("k".to_owned(), vec![2, 3])]);
}

/// The first log line containing each of `parts`.
fn line<'a>(log: &'a str, parts: &[&str]) -> Option<&'a str> {
    log.lines().find(|l| parts.iter().all(|p| l.contains(p)))
}

/// When a relay fenced itself (its log's timestamp: RFC 3339, UTC, same width throughout), and
/// how many messages its producer still held then.
fn fenced(log: &str) -> Option<(String, u64)> {
    let l = line(log, &["fenced: ", "purged="])?;
    let n = l.split("purged=").nth(1)?.split_whitespace().next()?.parse().ok()?;
    Some((l.split_whitespace().next()?.to_owned(), n))
}

/// Relay A reads rows while its broker is away (they wait in its producer), then loses its
/// database; relay B takes over and publishes those rows and newer ones of the same keys; then
/// A's broker comes back. Without fencing A's producer sends the old rows then, after B's newer
/// ones: the keys go backwards. With it, A purged them before B could take the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cut_off_from_its_database_stops_sending_before_another_takes_over() {
    let kafka = KafkaProxy::bind().await;
    let broker = PrivateBroker::start_advertising(Some(kafka.bootstrap()));
    kafka.forward_to(broker.port);
    let o = relays::outbox("fence", &kafka.bootstrap()).await;
    let url = common::env("DATABASE_URL");
    let pg = Proxy::start(upstream()).await;
    let a = o.relay_with("relay-fence-a.log", &pg.url(&url), &["--kafka-config", "client.id=relay-a"]);
    o.insert(0, 100, 10).await;
    o.wait_drained(Duration::from_secs(120)).await;
    let b = o.relay_with("relay-fence-b.log", &url, &["--kafka-config", "client.id=relay-b"]);
    b.wait_log("another relay is active; standing by", Duration::from_secs(120)).await;

    // A's broker goes away for A: what A reads now stays queued in its producer.
    kafka.stall("relay-a");
    o.insert(100, 100, 10).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.blackhole().await;
    let cut = Instant::now();
    o.insert(200, 100, 10).await;
    while o.remaining().await > 0 {
        assert!(cut.elapsed() < Duration::from_secs(120), "relay b did not take over:\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A's broker is back: a producer that kept its queue sends it now (librdkafka reconnects
    // within reconnect.backoff.max.ms, 10 s).
    kafka.resume("relay-a");
    tokio::time::sleep(Duration::from_secs(20)).await;
    let took_over = line(&b.log(), &["holding the outbox lock"]).map(|l| l.split_whitespace().next().unwrap().to_owned());
    let a_fenced = fenced(&a.log());

    let events = relays::consume_all(&o.bootstrap, &o.topic, Duration::from_secs(120));
    let ids: std::collections::HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    println!(
        "{} messages, {} events; relay a fenced (at, messages purged): {a_fenced:?}; relay b took over at \
         {took_over:?}; a's broker connections refused while away: {}",
        events.len(),
        ids.len(),
        kafka.refused()
    );
    let back = backwards(&events);
    assert!(back.is_empty(), "keys went backwards (older n after the newest): {back:?}");
    assert_eq!(ids.len(), 300, "every committed event reached the broker");
    let took_over = took_over.expect("relay b took over");
    let (at, purged) = a_fenced.unwrap_or_else(|| panic!("relay a fenced itself:\n{}", a.log()));
    assert!(purged > 0, "relay a's producer held the rows it read while its broker was away");
    assert!(
        at < took_over,
        "relay a fenced itself ({at}) before relay b held the lock ({took_over})"
    );
    assert!(kafka.refused() > 0, "relay a's producer tried its broker while it was away");
}

/// PgBouncer in transaction pooling with one server connection: every client's statements run on
/// the session that holds the lock, where a session advisory lock taken again succeeds. (The
/// relays' named prepared statements also clash there, so which one gets how far varies; what
/// must hold is that the two are never active at once and that the pooler is refused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_through_a_transaction_pooler_are_never_both_active() {
    let bouncer = PgBouncer::start(&common::env("DATABASE_URL"));
    let o = relays::outbox("bouncer", &common::kafka_bootstrap()).await;
    o.insert(0, 10, 2).await;
    let mut a = o.relay("relay-bouncer-a.log", &bouncer.url());
    a.wait_log("holding the outbox lock", Duration::from_secs(60)).await;
    let mut b = o.relay("relay-bouncer-b.log", &bouncer.url());
    // Watched until both exited, or 40 s after the first did (b retries its preparation every
    // 2 s until its prepared statements' names no longer clash with a's), or 100 s.
    let mut until = Instant::now() + Duration::from_secs(100);
    let mut refused = Vec::new();
    while Instant::now() < until && refused.len() < 2 {
        assert!(
            !b.log().contains("holding the outbox lock"),
            "relay b took the lock on a server session that held it already (re-entrant):\nrelay b:\n{}",
            b.log()
        );
        let (aa, ba) = (a.active().await, b.active().await);
        assert!(
            aa != Some(true) || ba != Some(true),
            "both relays active through the pooler:\nrelay a:\n{}\nrelay b:\n{}",
            a.log(),
            b.log()
        );
        for (name, r) in [("a", &mut a), ("b", &mut b)] {
            if let Some(status) = r.child.try_wait().unwrap() {
                if !refused.iter().any(|(n, _, _)| *n == name) {
                    refused.push((name, status, r.log()));
                    until = until.min(Instant::now() + Duration::from_secs(40));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !refused.is_empty(),
        "no relay refused the pooler within 100 s:\nrelay a:\n{}\nrelay b:\n{}",
        a.log(),
        b.log()
    );
    // A refuses when it reconnects (its first session failed on a clashing statement name) and
    // its new connection lands on the session holding its old lock; b when its lock attempt does.
    for (name, status, log) in &refused {
        println!("relay {name}: {status}; {}", log.lines().last().unwrap_or_default());
        assert_eq!(status.code(), Some(1), "relay {name} exits non-zero:\n{log}");
        for part in [
            "already holds the outbox lock, which this relay did not take",
            "PgBouncer pool_mode=transaction",
            "pool_mode=session",
        ] {
            assert!(log.contains(part), "{part:?} in relay {name}'s error:\n{log}");
        }
    }
    assert_eq!(refused.len(), 2, "both relays refused the pooler:\nrelay b:\n{}", b.log());
}

/// A server that accepts connections and fails the lock statement (here the connection drops as
/// it is sent) is retried with backoff: 1, 2, 4, 8 s..., not hundreds of times a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_statement_that_keeps_failing_is_retried_with_backoff() {
    let o = relays::outbox("lockloop", &common::kafka_bootstrap()).await;
    let pg = Proxy::start(upstream()).await;
    pg.close_at(b"pg_try_advisory_lock");
    let a = o.relay("relay-lockloop.log", &pg.url(&common::env("DATABASE_URL")));
    a.wait_log("lost the database while waiting for the lock", Duration::from_secs(60))
        .await;
    let first = Instant::now();
    let before = pg.closed();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let attempts = pg.closed() - before;
    println!("{attempts} lock attempts in {:?}", first.elapsed());
    // Backoff: 1 + 2 + 4 s after the first failure, so about 3 in 10 s; without it, one per
    // connection set-up (27 in 10 s here).
    assert!(attempts >= 1, "the relay kept trying:\n{}", a.log());
    assert!(attempts <= 6, "{attempts} lock attempts in 10 s:\n{}", a.log());
}
