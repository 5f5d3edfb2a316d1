//! Several active relays per outbox (key-hash buckets) against the real PostgreSQL and broker:
//! the SQL hash is the documented one, a relay's read is a merge of its buckets' index scans, and
//! three relays with 64 buckets keep every key's order while writers commit and roll back and the
//! relays are killed, scaled 3 -> 1 -> 3, restarted one by one and cut off from the database.

mod common;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::{
    kafka_proxy::KafkaProxy,
    proxy::Proxy,
    relays::{backwards, consume_all, outbox, upstream, Outbox, RelayProc},
    PrivateBroker,
};
use lockstep::tables::buckets::{bucket_of, class_key, Holdings};

const BUCKETS: u16 = 64;

fn table(o: &Outbox) -> lockstep::core::sql::QualifiedName {
    lockstep::core::sql::QualifiedName {
        schema: lockstep::core::sql::Ident::parse(&o.schema).unwrap(),
        table: lockstep::core::sql::Ident::parse("outbox").unwrap(),
    }
}

/// The SQL function agrees with `bucket_of` (and so with the documented vectors) on keys of
/// every shape, for several bucket counts.
#[tokio::test]
async fn the_sql_bucket_function_is_the_documented_hash() {
    let o = outbox("bkhash", &common::kafka_bootstrap()).await;
    let t = table(&o);
    sqlx::query(&lockstep::tables::schema::buckets::function_ddl(&t.schema))
        .execute(&o.pool)
        .await
        .unwrap();
    let mut keys: Vec<String> = (0..500).map(|i| format!("order-{i}")).collect();
    keys.extend(
        [
            "",
            "ünïcode",
            "日本語のキー",
            "a b\tc",
            "'quoted'",
            "00000000-0000-0000-0000-000000000000",
        ]
        .map(String::from),
    );
    for b in [1u16, 2, 7, 64, 255, 256] {
        let got: Vec<i32> = sqlx::query_scalar(&format!(
            "select {}(k, $2) from unnest($1::text[]) with ordinality u(k, i) order by i",
            lockstep::tables::schema::buckets::function(&t.schema)
        ))
        .bind(&keys)
        .bind(i32::from(b))
        .fetch_all(&o.pool)
        .await
        .unwrap();
        let want: Vec<i32> = keys.iter().map(|k| i32::from(bucket_of(k, b))).collect();
        assert_eq!(got, want, "buckets {b}");
    }
}

/// A relay's read of its buckets is one ordered index scan per bucket that stops at the bucket's
/// share, even when planned while the outbox was empty: no bucket is read whole or sorted.
#[tokio::test]
async fn a_read_of_several_buckets_scans_each_in_seq_order_up_to_its_share() {
    let o = outbox("bkplan", &common::kafka_bootstrap()).await;
    let t = table(&o);
    let mut c = o.pool.acquire().await.unwrap();
    let key = lockstep::core::routing::OutboxColumn::Aggregateid;
    let cleanup = lockstep::crd::Cleanup::Delete;
    let missing = lockstep::tables::schema::buckets::ensure(&mut c, &t, key, BUCKETS, cleanup, true)
        .await
        .unwrap();
    assert_eq!(missing, Default::default());
    // Planned while the outbox is empty, as a relay that starts on an idle outbox plans it.
    let sql = lockstep::relay::bucket_read_sql(&t, key, cleanup, BUCKETS);
    sqlx::raw_sql(lockstep::relay::PLANNER_SETTINGS).execute(&mut *c).await.unwrap();
    sqlx::raw_sql("set plan_cache_mode = force_generic_plan")
        .execute(&mut *c)
        .await
        .unwrap();
    sqlx::raw_sql(&format!("prepare q(int8, text[], int8[], int4[], int8) as {sql}"))
        .execute(&mut *c)
        .await
        .unwrap();
    let explain = "explain analyze execute q(500, '{}', '{}', '{1,2,3}', 167)";
    let _ = sqlx::query_scalar::<_, String>(explain).fetch_all(&mut *c).await.unwrap();
    o.insert(0, 20_000, 1_000).await;
    let plan: Vec<String> = sqlx::query_scalar(explain).fetch_all(&mut *c).await.unwrap();
    let plan = plan.join("\n");
    println!("{plan}");
    // One ordered index scan per bucket, stopped at its share: 3 x 167 rows read for 500.
    assert!(plan.contains("Index Scan using outbox_bucket64_idx"), "{plan}");
    assert!(plan.contains("rows=167 loops=3"), "{plan}");
    assert_eq!(plan.matches("Sort Key").count(), 1, "only the 501 rows read are sorted: {plan}");
    assert!(plan.contains("SubPlan") && plan.matches("loops=1)").count() >= 2, "{plan}");
}

/// What pg_locks shows of the outbox's relays.
async fn holdings(o: &Outbox) -> Holdings {
    holdings_of(o, BUCKETS).await
}

/// What pg_locks shows of the outbox's relays, as a relay with `buckets` buckets sees it.
async fn holdings_of(o: &Outbox, buckets: u16) -> Holdings {
    let rows: Vec<(i64, i32)> = sqlx::query_as(
        "select objid::int8, pid from pg_locks where locktype = 'advisory' and granted and objsubid = 2
         and classid::int8 = ($1::int8 & 4294967295) and database = (select oid from pg_database where datname = current_database())",
    )
    .bind(i64::from(class_key(&table(o))))
    .fetch_all(&o.pool)
    .await
    .unwrap();
    Holdings::from_locks(buckets, rows)
}

/// Wait until `relays` relays share every bucket within one of even, not counting `except`;
/// how long it took.
async fn wait_even(o: &Outbox, relays: usize, except: Option<i32>, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        let h = holdings(o).await;
        let shares: Vec<usize> = h
            .shares()
            .into_iter()
            .filter(|(p, _)| Some(*p) != except)
            .map(|(_, b)| b.len())
            .collect();
        let owned: usize = shares.iter().sum();
        let even = shares.iter().max().zip(shares.iter().min()).is_some_and(|(a, b)| a - b <= 1);
        if shares.len() == relays && owned == usize::from(BUCKETS) && even {
            let took = started.elapsed();
            println!("{what}: {took:?} (shares {shares:?})");
            return took;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what}: not settled after 60s: {shares:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writers: each writes its own keys one transaction at a time (so a key's `n` grows with its
/// seq), every fifth transaction rolled back. The ids committed and rolled back.
struct Writers {
    stop: Arc<AtomicBool>,
    committed: Arc<Mutex<HashSet<String>>>,
    rolled_back: Arc<Mutex<HashSet<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(o: &Outbox, writers: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(Mutex::new(HashSet::new()));
        let rolled_back = Arc::new(Mutex::new(HashSet::new()));
        let tasks = (0..writers)
            .map(|w| {
                let (pool, schema) = (o.pool.clone(), o.schema.clone());
                let (stop, committed, rolled_back) = (stop.clone(), committed.clone(), rolled_back.clone());
                tokio::spawn(async move {
                    let sql = format!(
                        "insert into \"{schema}\".outbox (id, aggregatetype, aggregateid, type, payload) \
                         values ($1, 'order', $2, 'created', jsonb_build_object('n', $3::int8))"
                    );
                    let mut n = 0i64;
                    while !stop.load(Ordering::Relaxed) {
                        let mut tx = pool.begin().await.unwrap();
                        let mut ids = Vec::new();
                        for _ in 0..4 {
                            n += 1;
                            let id = uuid::Uuid::new_v4();
                            let key = format!("w{w}-k{}", n % 50);
                            sqlx::query(&sql).bind(id).bind(&key).bind(n).execute(&mut *tx).await.unwrap();
                            ids.push(id.to_string());
                        }
                        if n % 20 == 0 {
                            tx.rollback().await.unwrap();
                            rolled_back.lock().unwrap().extend(ids);
                        } else {
                            tx.commit().await.unwrap();
                            committed.lock().unwrap().extend(ids);
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Writers {
            stop,
            committed,
            rolled_back,
            tasks,
        }
    }

    async fn stop(self) -> (HashSet<String>, HashSet<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let c = self.committed.lock().unwrap().clone();
        let r = self.rolled_back.lock().unwrap().clone();
        (c, r)
    }
}

/// First deliveries only (a replay after a takeover is a duplicate): each key's n must grow.
/// (key, n before, n after) where it did not.
fn first_deliveries_out_of_order(events: &[common::relays::Event]) -> Vec<(String, i64, i64)> {
    let mut first: HashSet<&str> = HashSet::new();
    let mut last_n: HashMap<&str, i64> = HashMap::new();
    let mut out_of_order = Vec::new();
    for e in events {
        if !first.insert(&e.id) {
            continue;
        }
        if let Some(prev) = last_n.insert(&e.key, e.n) {
            if prev >= e.n {
                out_of_order.push((e.key.clone(), prev, e.n));
            }
        }
    }
    out_of_order
}

fn relay(o: &Outbox, name: &str, url: &str) -> RelayProc {
    o.relay_with(&common::unique(name), url, &["--buckets", "64"])
}

/// SIGTERM, and wait for a clean exit.
async fn stop_gracefully(mut r: RelayProc) {
    unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) };
    let status = r.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}:\n{}", r.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_relays_with_64_buckets_keep_each_keys_order_through_kills_scaling_restarts_and_a_cut() {
    let o = outbox("bkchaos", &common::kafka_bootstrap()).await;
    let url = common::env("DATABASE_URL");
    let writers = Writers::start(&o, 4);
    let mut relays: Vec<RelayProc> = (0..3).map(|i| relay(&o, &format!("bk{i}"), &url)).collect();
    let mut times: BTreeMap<&str, Duration> = BTreeMap::new();
    times.insert("1 start: 3 relays share 64 buckets", wait_even(&o, 3, None, "start").await);
    // Their sessions name the relay's host (its pod in Kubernetes), which status.relays shows.
    let names: Vec<String> = sqlx::query_scalar(
        "select distinct a.application_name from pg_locks l join pg_stat_activity a using (pid)
         where l.locktype = 'advisory' and l.granted and l.objsubid = 2 and l.classid::int8 = ($1::int8 & 4294967295)",
    )
    .bind(i64::from(class_key(&table(&o))))
    .fetch_all(&o.pool)
    .await
    .unwrap();
    let host = lockstep::tables::identity::host_name();
    assert_eq!(names, [lockstep::tables::identity::application_name(host.as_deref())]);
    assert!(names[0].starts_with("lockstep-relay/"), "{names:?}");

    // A relay SIGKILLed: its session closes, the two left take its buckets.
    relays.remove(0).kill();
    times.insert(
        "2 takeover after SIGKILL (3 -> 2)",
        wait_even(&o, 2, None, "takeover after a kill").await,
    );
    relays.push(relay(&o, "bk3", &url));
    times.insert("3 rebalance on join (2 -> 3)", wait_even(&o, 3, None, "join").await);

    // Scaled 3 -> 1 -> 3, gracefully.
    stop_gracefully(relays.remove(0)).await;
    stop_gracefully(relays.remove(0)).await;
    times.insert("4 scale down 3 -> 1 (graceful)", wait_even(&o, 1, None, "scale down").await);
    relays.push(relay(&o, "bk4", &url));
    relays.push(relay(&o, "bk5", &url));
    times.insert("5 scale up 1 -> 3", wait_even(&o, 3, None, "scale up").await);

    // A rolling restart: each replaced by a new one, one at a time.
    let started = Instant::now();
    for i in 0..3 {
        stop_gracefully(relays.remove(0)).await;
        relays.push(relay(&o, &format!("bk-roll{i}"), &url));
        wait_even(&o, 3, None, "rolling restart step").await;
    }
    times.insert("6 rolling restart of 3 (total)", started.elapsed());

    // One relay's database connection cut off (a partition): it fences itself, the server drops
    // its session, the others take its buckets.
    let proxy = Proxy::start(upstream()).await;
    relays.push(relay(&o, "bk-cut", &proxy.url(&url)));
    wait_even(&o, 4, None, "a fourth relay, through a proxy").await;
    let cut_pid = holdings(&o).await.shares().into_keys().max_by_key(|p| *p);
    proxy.blackhole().await;
    times.insert(
        "7 takeover after a cut connection",
        wait_even(&o, 3, cut_pid, "takeover after a cut").await,
    );
    relays.pop().unwrap().kill();

    let (committed, rolled_back) = writers.stop().await;
    o.wait_drained(Duration::from_secs(120)).await;
    drop(relays);
    let events = consume_all(&o.bootstrap, &o.topic, Duration::from_secs(120));
    let delivered: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let lost: Vec<&String> = committed.iter().filter(|id| !delivered.contains(id.as_str())).collect();
    let ghosts = rolled_back.iter().filter(|id| delivered.contains(id.as_str())).count();
    let out_of_order = first_deliveries_out_of_order(&events);
    let keys: HashSet<&str> = events.iter().map(|e| e.key.as_str()).collect();
    println!(
        "{} committed, {} rolled back, {} messages, {} duplicates, {} keys",
        committed.len(),
        rolled_back.len(),
        events.len(),
        events.len() - delivered.len(),
        keys.len()
    );
    for (what, took) in &times {
        println!("  {what}: {took:?}");
    }
    assert!(
        lost.is_empty(),
        "{} committed events never delivered, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert_eq!(ghosts, 0, "events of rolled-back transactions were delivered");
    assert!(out_of_order.is_empty(), "keys out of order (key, before, after): {out_of_order:?}");
    assert!(committed.len() > 1000, "the writers committed {} events", committed.len());
}

/// Relay A owns every bucket when its broker goes away for it: what it reads stays queued in its
/// producer. Relay B joins and A owes it half the buckets, but gives none back while what it sent
/// is unsettled: B would send newer rows of those keys, and A's older ones would land after them
/// when A's broker came back. Once A's messages are acknowledged the buckets move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_changes_hands_only_after_what_its_owner_sent_settled() {
    let kafka = KafkaProxy::bind().await;
    let broker = PrivateBroker::start_advertising(Some(kafka.bootstrap()));
    kafka.forward_to(broker.port);
    let o = outbox("bkgive", &kafka.bootstrap()).await;
    let url = common::env("DATABASE_URL");
    let a = o.relay_with(
        "relay-give-a.log",
        &url,
        &["--buckets", "64", "--kafka-config", "client.id=relay-a"],
    );
    wait_even(&o, 1, None, "relay a alone").await;
    let a_pid = *holdings(&o).await.members.first().unwrap();

    kafka.stall("relay-a");
    o.insert(0, 200, 20).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b = o.relay_with(
        "relay-give-b.log",
        &url,
        &["--buckets", "64", "--kafka-config", "client.id=relay-b"],
    );
    b.wait_log("joined the outbox's relays", Duration::from_secs(60)).await;
    o.insert(200, 200, 20).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let h = holdings(&o).await;
    let a_owns = h.owners.values().filter(|p| **p == a_pid).count();
    assert_eq!(
        (h.members.len(), a_owns),
        (2, 64),
        "relay a kept every bucket while its messages were unsettled:\n{}",
        a.log()
    );

    kafka.resume("relay-a");
    let moved = wait_even(&o, 2, None, "once relay a's messages settled").await;
    o.wait_drained(Duration::from_secs(120)).await;
    let events = consume_all(&o.bootstrap, &o.topic, Duration::from_secs(120));
    let ids: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    println!(
        "{} messages, {} events, buckets moved {moved:?} after a's broker came back",
        events.len(),
        ids.len()
    );
    let back = backwards(&events);
    assert!(back.is_empty(), "keys went backwards (older n after the newest): {back:?}");
    assert_eq!(ids.len(), 400, "every committed event reached the broker");
    drop((a, b));
}

/// The bucket count changed on a live outbox, 1 -> 64 -> 32, as a rollout changes it: relays of
/// the new count wait until those of the old one stopped (a relay without buckets holds the
/// outbox lock exclusively, relays with buckets hold it shared; relays of two counts never own
/// buckets at once), so no key is sent by two relays and every key keeps its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changing_the_bucket_count_on_a_live_outbox_keeps_each_keys_order() {
    let o = outbox("bkchange", &common::kafka_bootstrap()).await;
    let url = common::env("DATABASE_URL");
    let writers = Writers::start(&o, 2);
    // Two counts owning buckets at once, seen every 20 ms (bucket locks only: not the member locks,
    // nor the lock that serializes takes, whose code is 0).
    let watching = Arc::new(AtomicBool::new(true));
    let (w, pool, t) = (watching.clone(), o.pool.clone(), table(&o));
    let watcher = tokio::spawn(async move {
        let mut overlaps: Vec<Vec<i64>> = Vec::new();
        while w.load(Ordering::Relaxed) {
            let counts: Vec<i64> = sqlx::query_scalar(
                "select distinct objid::int8 >> 16 from pg_locks where locktype = 'advisory' and granted and objsubid = 2
                 and classid::int8 = ($1::int8 & 4294967295) and objid::int8 & 65535 <> 65535 and objid::int8 >> 16 > 0",
            )
            .bind(i64::from(class_key(&t)))
            .fetch_all(&pool)
            .await
            .unwrap();
            if counts.len() > 1 {
                overlaps.push(counts);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        overlaps
    });

    let one = o.relay_with(&common::unique("bk-one"), &url, &[]);
    one.wait_log("holding the outbox lock", Duration::from_secs(60)).await;
    let sixty_four: Vec<RelayProc> = (0..2).map(|i| relay(&o, &format!("bk64-{i}"), &url)).collect();
    sixty_four[0]
        .wait_log("a relay without buckets (buckets 1) is active", Duration::from_secs(60))
        .await;
    assert!(
        holdings(&o).await.owners.is_empty(),
        "relays with buckets took some while a relay without was active"
    );
    stop_gracefully(one).await;
    wait_even(&o, 2, None, "1 -> 64").await;

    let thirty_two: Vec<RelayProc> = (0..2)
        .map(|i| o.relay_with(&common::unique(&format!("bk32-{i}")), &url, &["--buckets", "32"]))
        .collect();
    // Three of their rounds.
    thirty_two[0].wait_log("joined the outbox's relays", Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        holdings_of(&o, 32).await.owners.len(),
        0,
        "relays of the new count took buckets early"
    );
    assert!(thirty_two[0].log().contains("relays with another bucket count are running"));
    for r in sixty_four {
        stop_gracefully(r).await;
    }
    let started = Instant::now();
    while holdings_of(&o, 32).await.owners.len() < 32 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the relays with 32 buckets did not take over"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "64 -> 32: every bucket owned {:?} after the last relay with 64 stopped",
        started.elapsed()
    );

    let (committed, rolled_back) = writers.stop().await;
    o.wait_drained(Duration::from_secs(120)).await;
    watching.store(false, Ordering::Relaxed);
    let overlaps = watcher.await.unwrap();
    drop(thirty_two);
    let events = consume_all(&o.bootstrap, &o.topic, Duration::from_secs(120));
    let delivered: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert!(committed.iter().all(|id| delivered.contains(id.as_str())), "committed events lost");
    assert!(
        rolled_back.iter().all(|id| !delivered.contains(id.as_str())),
        "rolled-back events delivered"
    );
    assert!(
        overlaps.is_empty(),
        "relays of two bucket counts owned buckets at once (counts seen): {overlaps:?}"
    );
    let back = first_deliveries_out_of_order(&events);
    assert!(back.is_empty(), "keys out of order: {back:?}");
}
