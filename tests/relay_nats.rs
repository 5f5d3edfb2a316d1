//! What is particular to NATS JetStream, against a real nats-server: a message the server refuses
//! does not stop the later ones of the same connection, so the relay itself keeps a key's later
//! messages back until the refused one is stored.

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::broker::{stream_name, Broker, Kind, Received};

/// One row of key `key` with counter `n` and `pad` bytes of padding.
async fn insert(o: &common::relays::Outbox, rows: &[(&str, i64, i64)]) {
    let mut tx = o.pool.begin().await.unwrap();
    for (key, n, pad) in rows {
        sqlx::query(&format!(
            "insert into \"{}\".outbox (id, aggregatetype, aggregateid, type, payload)
             values (gen_random_uuid(), 'order', $1, 'created', jsonb_build_object('n', $2::bigint, 'pad', repeat('x', $3::int)))",
            o.schema
        ))
        .bind(key)
        .bind(n)
        .bind(*pad as i32)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
}

fn of_key(got: &[Received], key: &str) -> Vec<i64> {
    got.iter().filter(|m| m.key == key).map(Received::n).collect()
}

/// A stream full under `discard: new` refuses a large message and takes a smaller one after it.
/// The relay must not let the smaller message of the same key be stored first: it is held until
/// the refused one is stored (once the stream has room), then follows it. Within one batch, and
/// across batches in flight (one row per batch: the relay reads later rows of a key in flight).
#[tokio::test]
async fn a_message_the_server_refuses_holds_back_the_later_messages_of_its_key() {
    refused_message_holds_back_its_key(&[]).await;
}

#[tokio::test]
async fn a_message_the_server_refuses_holds_back_its_key_in_later_batches_in_flight() {
    refused_message_holds_back_its_key(&["--batch-size", "1"]).await;
}

async fn refused_message_holds_back_its_key(relay_args: &[&str]) {
    let broker = Broker::shared(Kind::Nats);
    let o = common::relays::outbox_on("nats-full", &broker, 1, &common::env("DATABASE_URL")).await;
    let js = jetstream::new(async_nats::connect(&broker.address).await.unwrap());
    let mut config = js.get_stream(stream_name(&o.topic)).await.unwrap().cached_info().config.clone();
    config.max_bytes = 4096;
    config.discard = jetstream::stream::DiscardPolicy::New;
    js.update_stream(config).await.unwrap();

    // k's first fits, its second does not, its third would; j's only one fits.
    insert(&o, &[("k", 0, 1500), ("k", 1, 3000), ("k", 2, 10), ("j", 0, 10)]).await;
    let relay = o.relay_with(&format!("relay-nats-full{}.log", relay_args.len()), &o.url, relay_args);
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        let got = o.consume(2, Duration::from_secs(2)).await;
        if got.len() >= 2 || Instant::now() > deadline {
            break got;
        }
    };
    assert_eq!((of_key(&got, "k"), of_key(&got, "j")), (vec![0], vec![0]), "(k, j) stored first");
    // The relay keeps retrying k's second (the broker's state, not the message's fault).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let got = o.consume(usize::MAX, Duration::from_secs(2)).await;
    assert_eq!(of_key(&got, "k"), vec![0], "k's third was stored past its refused second");

    // Room again: k's second, then its third.
    js.get_stream(stream_name(&o.topic)).await.unwrap().purge().await.unwrap();
    o.wait_drained(Duration::from_secs(60)).await;
    let got = o.consume(2, Duration::from_secs(5)).await;
    assert_eq!(of_key(&got, "k"), vec![1, 2]);
    assert!(
        o.remaining().await == 0 && relay.log().contains("broker or network failed"),
        "{}",
        relay.log()
    );
}

/// A JetStream consumer that acknowledges late (as one that crashed before its ack would) gets
/// those messages again; reading each with `Delivery::from_nats` and claiming its id in the inbox
/// in the side effect's transaction applies every event once.
#[tokio::test]
async fn an_inbox_consumer_of_a_jetstream_consumer_applies_each_event_once() {
    use futures::StreamExt;
    use jetstream::consumer;
    const EVENTS: i64 = 2_000;
    let broker = Broker::shared(Kind::Nats);
    let o = common::relays::outbox_on("nats-inbox", &broker, 1, &common::env("DATABASE_URL")).await;
    o.insert(0, EVENTS, 20).await;
    let relay = o.relay("relay-nats-inbox.log", &o.url);
    o.wait_drained(Duration::from_secs(60)).await;
    drop(relay);

    let s = common::pg_schema("nats_consumer").await;
    let inbox_table = s.inbox("inbox").await;
    sqlx::query("create table effects (key text primary key, applied bigint not null)")
        .execute(&s.pool)
        .await
        .unwrap();
    let inbox = lockstep::inbox::Inbox::for_table(inbox_table, "effects");
    let js = jetstream::new(async_nats::connect(&broker.address).await.unwrap());
    let stream = js.get_stream(stream_name(&o.topic)).await.unwrap();
    let c = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("effects".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            // Long enough for a loaded machine to apply what one pull buffers, short enough for
            // the unacknowledged ones to come back soon.
            ack_wait: Duration::from_secs(3),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = c.messages().await.unwrap();
    let (mut applied, mut skipped, mut unacked) = (0, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while applied < EVENTS {
        assert!(Instant::now() < deadline, "{applied} of {EVENTS} applied");
        let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), messages.next()).await else {
            continue;
        };
        let m = m.unwrap();
        let d = lockstep::inbox::Delivery::from_nats(&m).expect("the relay's headers");
        assert!(d.created_ms.is_some());
        let key = m.headers.as_ref().and_then(|h| h.get("lockstep-key")).unwrap().to_string();
        let mut tx = s.pool.begin().await.unwrap();
        if inbox.claim(&mut tx, d.id).await.unwrap() {
            sqlx::query("insert into effects values ($1, 1) on conflict (key) do update set applied = effects.applied + 1")
                .bind(&key)
                .execute(&mut *tx)
                .await
                .unwrap();
            applied += 1;
        } else {
            skipped += 1;
        }
        tx.commit().await.unwrap();
        // The first 100 are never acknowledged: JetStream delivers them again after ack_wait.
        if unacked < 100 && skipped == 0 {
            unacked += 1;
        } else {
            m.ack().await.unwrap();
        }
    }
    // The redeliveries of the unacknowledged ones arrive; each is a duplicate the inbox drops.
    while skipped < unacked {
        assert!(Instant::now() < deadline, "{skipped} of {unacked} redeliveries seen");
        let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), messages.next()).await else {
            continue;
        };
        let m = m.unwrap();
        let d = lockstep::inbox::Delivery::from_nats(&m).unwrap();
        let mut tx = s.pool.begin().await.unwrap();
        assert!(!inbox.claim(&mut tx, d.id).await.unwrap(), "a redelivery is claimed already");
        tx.commit().await.unwrap();
        skipped += 1;
        m.ack().await.unwrap();
    }
    let total: i64 = sqlx::query_scalar("select sum(applied)::bigint from effects")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(total, EVENTS, "each event applied once ({skipped} redeliveries skipped)");
}

/// A server that wants TLS and a password: the relay reads both from a Secret's directory
/// (`--nats-secret-dir`, as the operator mounts it) and publishes; with a wrong password it keeps
/// the rows, says why, and never writes either password anywhere.
#[tokio::test]
async fn a_relay_reaches_a_tls_server_with_a_password_from_a_secret_directory_and_never_logs_it() {
    const CONFIG: &str = "listen: 127.0.0.1:{port}\njetstream { store_dir: \"{dir}/js\" }\n\
        tls { cert_file: \"{dir}/server.pem\", key_file: \"{dir}/server.key\" }\n\
        authorization { user: relay, password: \"s3cret-pw\" }\n";
    let make = |dir: &std::path::Path| common::tls::make_certs(dir, "nats-test-ca");
    let server = common::broker::PrivateNats::start_configured(Some((CONFIG, &make)));
    let url = server.url().replace("nats://", "tls://");
    let ca = server.dir().join("ca.pem");
    let client = async_nats::ConnectOptions::with_user_and_password("relay".into(), "s3cret-pw".into())
        .add_root_certificates(ca.clone())
        .require_tls(true)
        .connect(url.as_str())
        .await
        .unwrap();
    let js = jetstream::new(client);
    let subject = common::unique("relay.tls");
    js.create_stream(jetstream::stream::Config {
        name: stream_name(&subject),
        subjects: vec![subject.clone()],
        ..Default::default()
    })
    .await
    .unwrap();
    let table = common::outbox::OutboxTable::create("nats-tls", &common::env("DATABASE_URL")).await;
    let secret = |name: &str, password: &str| {
        let d = server.dir().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("user"), "relay\n").unwrap();
        std::fs::write(d.join("password"), format!("{password}\n")).unwrap();
        std::fs::copy(&ca, d.join("ca.crt")).unwrap();
        d.display().to_string()
    };
    let (good, bad) = (secret("good", "s3cret-pw"), secret("bad", "wrong-pw"));
    let o = common::relays::Outbox {
        table,
        topic: subject.clone(),
        bootstrap: url.clone(),
        url: common::env("DATABASE_URL"),
        kind: Kind::Nats,
        broker_env: vec![("LOCKSTEP_BROKER", "nats".into()), ("NATS_URL", url.clone())],
    };

    o.insert(0, 10, 2).await;
    let mut wrong = o.relay_with("relay-nats-wrong-pw.log", &o.url, &["--nats-secret-dir", &bad]);
    wrong.wait_log("broker or network failed", Duration::from_secs(30)).await;
    assert_eq!(o.remaining().await, 10, "nothing is removed that was not acknowledged");
    wrong.kill();
    let log = wrong.log();
    assert!(log.to_lowercase().contains("authorization"), "{log}");
    assert!(
        !log.contains("wrong-pw") && !log.contains("s3cret-pw"),
        "a password in the log:\n{log}"
    );

    let relay = o.relay_with("relay-nats-tls.log", &o.url, &["--nats-secret-dir", &good]);
    o.wait_drained(Duration::from_secs(60)).await;
    let got = common::broker::consume_stream(&js, &subject, 10, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 10);
    assert!(!relay.log().contains("s3cret-pw"));
}

/// A server that accepts connections and never answers (a black hole): the relay tries to
/// connect once per batch, so a batch's messages fail within one connect timeout, not one
/// timeout each, and the rows stay for the next try.
#[tokio::test]
async fn a_server_that_never_answers_fails_a_batch_within_one_connect_timeout() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("nats://{}", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    let o = common::relays::Outbox {
        table: common::outbox::OutboxTable::create("nats-silent", &common::env("DATABASE_URL")).await,
        topic: "silent.events".into(),
        bootstrap: url.clone(),
        url: common::env("DATABASE_URL"),
        kind: Kind::Nats,
        broker_env: vec![("LOCKSTEP_BROKER", "nats".into()), ("NATS_URL", url)],
    };
    o.insert(0, 50, 50).await;
    let started = Instant::now();
    let relay = o.relay("relay-nats-silent.log", &o.url);
    relay.wait_log("broker or network failed", Duration::from_secs(30)).await;
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    assert_eq!(o.remaining().await, 50);
    let count = || relay.log().matches("broker or network failed").count();
    let deadline = Instant::now() + Duration::from_secs(10);
    while count() < 50 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(count() >= 50, "the whole batch failed at once:\n{}", relay.log());
    held.abort();
}
