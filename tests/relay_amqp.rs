//! What is particular to RabbitMQ, against a real rabbitmq-server: a message the broker returns
//! (no queue bound for its routing key) or nacks (a full queue) is not a success, and the relay
//! keeps the later messages of its key back until it is stored; a message over the server's
//! max_message_size is dead-lettered.

mod common;

use std::time::{Duration, Instant};

use common::{
    broker::{Kind, Received},
    rabbitmq::{self, PrivateRabbit},
    relays::Outbox,
};
use lapin::{
    options::{BasicPublishOptions, QueueDeclareOptions, QueuePurgeOptions},
    types::{AMQPValue, FieldTable},
    BasicProperties, Confirmation,
};

async fn publish(url: &str, exchange: &str, routing_key: &str) -> Confirmation {
    let ch = rabbitmq::channel(url).await;
    ch.confirm_select(Default::default()).await.unwrap();
    let opts = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    ch.basic_publish(exchange.into(), routing_key.into(), opts, b"x", BasicProperties::default())
        .await
        .unwrap()
        .await
        .unwrap()
}

/// An outbox whose rows are routed by their type: routing key `<prefix>.<type>` on the test
/// exchange, to the queue of that name.
async fn outbox_by_type(prefix: &str, url: &str, env: Vec<(&'static str, String)>) -> (Outbox, String) {
    let base = common::unique(&format!("relay.{prefix}"));
    let o = Outbox {
        table: common::outbox::OutboxTable::create(prefix, &common::env("DATABASE_URL")).await,
        topic: format!("{base}.{{type}}"),
        bootstrap: url.to_owned(),
        url: common::env("DATABASE_URL"),
        kind: Kind::Rabbitmq,
        broker_env: env,
    };
    (o, base)
}

/// Rows (key, type, counter), one transaction, in this order.
async fn insert(o: &Outbox, rows: &[(&str, &str, i64)]) {
    let mut tx = o.pool.begin().await.unwrap();
    for (key, type_, n) in rows {
        sqlx::query(&format!(
            "insert into \"{}\".outbox (id, aggregatetype, aggregateid, type, payload)
             values (gen_random_uuid(), 'order', $1, $2, jsonb_build_object('n', $3::bigint))",
            o.schema
        ))
        .bind(key)
        .bind(type_)
        .bind(n)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
}

fn of_key(got: &[Received], key: &str) -> Vec<i64> {
    got.iter().filter(|m| m.key == key).map(Received::n).collect()
}

/// Wait until `queue` holds `want` distinct messages (or 30 s), and return them.
async fn wait_for(url: &str, queue: &str, want: usize) -> Vec<Received> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = rabbitmq::consume(url, queue, want, Duration::from_secs(2)).await;
        if got.len() >= want || Instant::now() > deadline {
            return got;
        }
    }
}

/// k's first row goes to a routing key no queue is bound for: RabbitMQ returns it, then acks
/// it. That is no success: the relay retries it, and k's second row (routable) is not stored
/// past it, within one batch and across the batches in flight (one row per batch). j's row
/// flows. Once a queue is bound, k's rows follow in order.
#[tokio::test]
async fn a_returned_message_is_retried_and_holds_back_the_later_messages_of_its_key() {
    held_by_a_return(&[]).await;
}

#[tokio::test]
async fn a_returned_message_holds_back_its_key_in_later_batches_in_flight() {
    held_by_a_return(&["--batch-size", "1"]).await;
}

async fn held_by_a_return(relay_args: &[&str]) {
    let url = rabbitmq::shared_url();
    let env = common::broker::Broker::shared(Kind::Rabbitmq).relay_env();
    let (o, base) = outbox_by_type("unroutable", &url, env).await;
    let (a, b) = (format!("{base}.a"), format!("{base}.b"));
    rabbitmq::declare(&url, &b).await;
    insert(&o, &[("k", "a", 0), ("k", "b", 1), ("j", "b", 0)]).await;
    let relay = o.relay_with(&format!("relay-unroutable{}.log", relay_args.len()), &o.url, relay_args);
    let got = wait_for(&url, &b, 1).await;
    assert_eq!(of_key(&got, "j"), vec![0], "j's row flows");
    relay.wait_log("returned the message unroutable", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = rabbitmq::consume(&url, &b, usize::MAX, Duration::from_secs(2)).await;
    assert_eq!(
        of_key(&got, "k"),
        Vec::<i64>::new(),
        "k's second row was stored past its returned first"
    );
    assert_eq!(o.remaining().await, 2);

    rabbitmq::declare(&url, &a).await;
    o.wait_drained(Duration::from_secs(60)).await;
    assert_eq!(of_key(&wait_for(&url, &a, 1).await, "k"), vec![0]);
    assert_eq!(of_key(&wait_for(&url, &b, 2).await, "k"), vec![1]);
    assert!(relay.log().contains("broker or network failed"), "{}", relay.log());
    let dead: i64 = sqlx::query_scalar(&format!("select count(*) from \"{}\".outbox_dead_letter", o.schema))
        .fetch_one(&o.pool)
        .await
        .unwrap();
    assert_eq!(dead, 0, "a returned message is the broker's state, not the row's fault");
}

/// k's first row goes to a full queue that refuses more (`x-overflow: reject-publish`): RabbitMQ
/// nacks it. The relay retries it and holds k's second row back until the queue has room.
#[tokio::test]
async fn a_nacked_message_is_retried_and_holds_back_the_later_messages_of_its_key() {
    let url = rabbitmq::shared_url();
    let env = common::broker::Broker::shared(Kind::Rabbitmq).relay_env();
    let (o, base) = outbox_by_type("nacked", &url, env).await;
    let (a, b) = (format!("{base}.a"), format!("{base}.b"));
    rabbitmq::declare(&url, &b).await;
    // a: a classic queue of one message at most, full.
    let ch = rabbitmq::channel(&url).await;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    ch.queue_declare(a.as_str().into(), QueueDeclareOptions::durable(), args)
        .await
        .unwrap();
    ch.queue_bind(
        a.as_str().into(),
        rabbitmq::EXCHANGE.into(),
        a.as_str().into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    assert_eq!(publish(&url, rabbitmq::EXCHANGE, &a).await, Confirmation::Ack(None));
    assert!(publish(&url, rabbitmq::EXCHANGE, &a).await.is_nack(), "the queue is full");

    insert(&o, &[("k", "a", 0), ("k", "b", 1), ("j", "b", 0)]).await;
    let relay = o.relay("relay-nacked.log", &o.url);
    let got = wait_for(&url, &b, 1).await;
    assert_eq!(of_key(&got, "j"), vec![0], "j's row flows");
    relay.wait_log("basic.nack", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = rabbitmq::consume(&url, &b, usize::MAX, Duration::from_secs(2)).await;
    assert_eq!(
        of_key(&got, "k"),
        Vec::<i64>::new(),
        "k's second row was stored past its nacked first"
    );

    ch.queue_purge(a.as_str().into(), QueuePurgeOptions::default()).await.unwrap();
    o.wait_drained(Duration::from_secs(60)).await;
    assert_eq!(of_key(&wait_for(&url, &b, 2).await, "k"), vec![1]);
    let left = ch.queue_declare(
        a.as_str().into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    );
    assert_eq!(left.await.unwrap().message_count(), 1, "k's first row is in the queue");
}

/// A node whose max_message_size is 4 KiB closes the channel on a 10 KB message. The relay learns
/// the limit from the server's words and dead-letters that row; the rows that went down with the
/// channel are sent again, and later rows flow.
#[tokio::test]
async fn a_message_over_the_servers_max_message_size_is_dead_lettered() {
    let r = PrivateRabbit::start_with("max_message_size = 4096");
    let q = common::unique("relay.maxsize");
    rabbitmq::declare(&r.admin_url(), &q).await;
    let env = vec![
        ("LOCKSTEP_BROKER", "rabbitmq".into()),
        ("AMQP_URL", r.url()),
        ("AMQP_USER", rabbitmq::USER.into()),
        ("AMQP_PASSWORD_FILE", r.password_file().display().to_string()),
        ("LOCKSTEP_AMQP_EXCHANGE", rabbitmq::EXCHANGE.into()),
    ];
    let o = Outbox {
        table: common::outbox::OutboxTable::create("maxsize", &common::env("DATABASE_URL")).await,
        topic: q.clone(),
        bootstrap: r.admin_url(),
        url: common::env("DATABASE_URL"),
        kind: Kind::Rabbitmq,
        broker_env: env,
    };
    o.insert(0, 20, 5).await;
    sqlx::query(&format!(
        "insert into \"{}\".outbox (id, aggregatetype, aggregateid, type, payload)
         values (gen_random_uuid(), 'order', 'big', 'created', jsonb_build_object('blob', repeat('x', 10000)))",
        o.schema
    ))
    .execute(&o.pool)
    .await
    .unwrap();
    o.insert(20, 20, 5).await;
    let relay = o.relay("relay-maxsize.log", &o.url);
    o.wait_drained(Duration::from_secs(60)).await;
    let dl: Vec<(String, String)> = sqlx::query_as(&format!("select aggregateid, last_error from \"{}\".outbox_dead_letter", o.schema))
        .fetch_all(&o.pool)
        .await
        .unwrap();
    assert_eq!(dl.len(), 1, "{dl:?}\n{}", relay.log());
    assert_eq!(dl[0].0, "big");
    assert!(dl[0].1.contains("max_message_size of 4096"), "{}", dl[0].1);
    let got = rabbitmq::consume(&r.admin_url(), &q, 40, Duration::from_secs(20)).await;
    let ids: std::collections::HashSet<String> = got.iter().map(Received::id).collect();
    assert_eq!(ids.len(), 40, "every other row published");
}

/// A test's own node keeps its stream queues and bindings across a SIGKILL, once they settled
/// (the outage tests rely on it).
#[tokio::test]
async fn a_private_node_keeps_its_stream_queues_and_bindings_across_a_kill() {
    let mut r = PrivateRabbit::start();
    let q = common::unique("relay.kept");
    rabbitmq::declare(&r.admin_url(), &q).await;
    rabbitmq::settle().await;
    assert_eq!(publish(&r.admin_url(), rabbitmq::EXCHANGE, &q).await, Confirmation::Ack(None));
    r.stop();
    r.start_again();
    // The node listens before it serves (and more slowly under load): each try in a task of its
    // own, a failed connect or publish is a try like a nack or a return.
    let mut last = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    while std::time::Instant::now() < deadline {
        let (url, q) = (r.admin_url(), q.clone());
        let c = tokio::spawn(async move { publish(&url, rabbitmq::EXCHANGE, &q).await }).await;
        if matches!(c, Ok(Confirmation::Ack(None))) {
            return;
        }
        last = Some(format!("{c:?}"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("after a restart: {last:?}");
}

/// A consumer of a quorum queue that dies with messages unacknowledged gets them again (RabbitMQ
/// requeues what a closed channel held); reading each with `Delivery::from_amqp` and claiming its
/// id in the inbox in the side effect's transaction applies every event once.
#[tokio::test]
async fn an_inbox_consumer_of_a_quorum_queue_applies_each_event_once() {
    use futures::StreamExt;
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    const EVENTS: i64 = 2_000;
    let url = rabbitmq::shared_url();
    let q = common::unique("relay.inbox");
    let ch = rabbitmq::channel(&url).await;
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    ch.queue_declare(q.as_str().into(), QueueDeclareOptions::durable(), args)
        .await
        .unwrap();
    ch.queue_bind(
        q.as_str().into(),
        rabbitmq::EXCHANGE.into(),
        q.as_str().into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let o = Outbox {
        table: common::outbox::OutboxTable::create("amqp-inbox", &common::env("DATABASE_URL")).await,
        topic: q.clone(),
        bootstrap: url.clone(),
        url: common::env("DATABASE_URL"),
        kind: Kind::Rabbitmq,
        broker_env: common::broker::Broker::shared(Kind::Rabbitmq).relay_env(),
    };
    o.insert(0, EVENTS, 20).await;
    let relay = o.relay("relay-amqp-inbox.log", &o.url);
    o.wait_drained(Duration::from_secs(60)).await;
    drop(relay);

    let s = common::pg_schema("amqp_consumer").await;
    let inbox = lockstep::inbox::Inbox::for_table(s.inbox("inbox").await, "effects");
    sqlx::query("create table effects (key text primary key, applied bigint not null)")
        .execute(&s.pool)
        .await
        .unwrap();
    let (mut applied, mut skipped) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    // The first consumer applies 300 and acknowledges only the last 200, then its channel closes.
    for (round, stop_after) in [(0, 300), (1, usize::MAX)] {
        let ch = rabbitmq::channel(&url).await;
        ch.basic_qos(500, BasicQosOptions::default()).await.unwrap();
        let mut c = ch
            .basic_consume(q.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .unwrap();
        let mut seen = 0;
        while seen < stop_after && (applied < EVENTS || skipped < 100) {
            assert!(
                Instant::now() < deadline,
                "{applied} of {EVENTS} applied, {skipped} redeliveries skipped"
            );
            let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), c.next()).await else {
                continue;
            };
            let m = m.unwrap();
            let d = lockstep::inbox::Delivery::from_amqp(&m).expect("the relay's headers");
            assert!(d.created_ms.is_some() && d.event_type == "created");
            let key = rabbitmq::received(&m).key;
            let mut tx = s.pool.begin().await.unwrap();
            if inbox.claim(&mut tx, d.id).await.unwrap() {
                sqlx::query("insert into effects values ($1, 1) on conflict (key) do update set applied = effects.applied + 1")
                    .bind(&key)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                applied += 1;
            } else {
                assert!(m.redelivered, "only a redelivery is claimed already");
                skipped += 1;
            }
            tx.commit().await.unwrap();
            seen += 1;
            if round == 1 || seen > 100 {
                m.ack(BasicAckOptions::default()).await.unwrap();
            }
        }
        ch.close(200, "done".into()).await.unwrap();
    }
    let total: i64 = sqlx::query_scalar("select sum(applied)::bigint from effects")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(total, EVENTS, "each event applied once");
    assert!(skipped >= 100, "the 100 unacknowledged came again and were skipped ({skipped})");
}

/// A node that wants TLS and a password: the relay reads both from a Secret's directory
/// (`--amqp-secret-dir`, as the operator would mount it) and publishes over amqps://; with a
/// wrong password it keeps the rows, says why, and never writes either password anywhere.
#[tokio::test]
async fn a_relay_reaches_a_tls_node_with_a_password_from_a_secret_directory_and_never_logs_it() {
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let conf = format!(
        "listeners.ssl.default = 127.0.0.1:{tls_port}\nssl_options.cacertfile = {{dir}}/ca.pem\n\
         ssl_options.certfile = {{dir}}/server.pem\nssl_options.keyfile = {{dir}}/server.key\n\
         ssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n"
    );
    let make = |dir: &std::path::Path| common::tls::make_certs(dir, "rabbitmq-test-ca");
    let r = PrivateRabbit::start_configured(&conf, &make);
    let q = common::unique("relay.tls");
    rabbitmq::declare(&r.admin_url(), &q).await;
    let secret = |name: &str, password: &str| {
        let d = r.dir().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("user"), format!("{}\n", rabbitmq::USER)).unwrap();
        std::fs::write(d.join("password"), format!("{password}\n")).unwrap();
        std::fs::copy(r.dir().join("ca.pem"), d.join("ca.crt")).unwrap();
        d.display().to_string()
    };
    let (good, bad) = (secret("good", rabbitmq::PASSWORD), secret("bad", "wrong-pw"));
    let o = Outbox {
        table: common::outbox::OutboxTable::create("amqp-tls", &common::env("DATABASE_URL")).await,
        topic: q.clone(),
        bootstrap: r.admin_url(),
        url: common::env("DATABASE_URL"),
        kind: Kind::Rabbitmq,
        broker_env: vec![
            ("LOCKSTEP_BROKER", "rabbitmq".into()),
            ("AMQP_URL", format!("amqps://127.0.0.1:{tls_port}/%2f")),
            // The test environment's user is not this node's: removed, the Secret's is used.
            ("AMQP_USER", String::new()),
            ("AMQP_PASSWORD_FILE", String::new()),
            ("LOCKSTEP_AMQP_EXCHANGE", rabbitmq::EXCHANGE.into()),
        ],
    };

    o.insert(0, 10, 2).await;
    let mut wrong = o.relay_with("relay-amqp-wrong-pw.log", &o.url, &["--amqp-secret-dir", &bad]);
    wrong.wait_log("broker or network failed", Duration::from_secs(30)).await;
    assert_eq!(o.remaining().await, 10, "nothing is removed that was not acknowledged");
    wrong.kill();
    let log = wrong.log();
    assert!(log.contains("ACCESS_REFUSED") || log.to_lowercase().contains("auth"), "{log}");
    assert!(
        !log.contains("wrong-pw") && !log.contains(rabbitmq::PASSWORD),
        "a password in the log:\n{log}"
    );

    let relay = o.relay_with("relay-amqp-tls.log", &o.url, &["--amqp-secret-dir", &good]);
    o.wait_drained(Duration::from_secs(60)).await;
    let got = rabbitmq::consume(&r.admin_url(), &q, 10, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 10);
    assert!(!relay.log().contains(rabbitmq::PASSWORD), "{}", relay.log());
}

/// A node under a disk alarm blocks publishing connections (`connection.blocked`): nothing is
/// confirmed, the relay keeps its rows, says so, and dead-letters nothing; once the alarm clears,
/// every row is published.
#[tokio::test]
async fn a_connection_the_broker_blocks_keeps_its_rows_until_the_alarm_clears() {
    let r = PrivateRabbit::start_with("disk_free_limit.absolute = 100000GB");
    let q = common::unique("relay.blocked");
    rabbitmq::declare(&r.admin_url(), &q).await;
    let o = Outbox {
        table: common::outbox::OutboxTable::create("blocked", &common::env("DATABASE_URL")).await,
        topic: q.clone(),
        bootstrap: r.admin_url(),
        url: common::env("DATABASE_URL"),
        kind: Kind::Rabbitmq,
        broker_env: vec![
            ("LOCKSTEP_BROKER", "rabbitmq".into()),
            ("AMQP_URL", r.url()),
            ("AMQP_USER", rabbitmq::USER.into()),
            ("AMQP_PASSWORD_FILE", r.password_file().display().to_string()),
            ("LOCKSTEP_AMQP_EXCHANGE", rabbitmq::EXCHANGE.into()),
        ],
    };
    o.insert(0, 50, 5).await;
    let relay = o.relay_with("relay-blocked.log", &o.url, &["--amqp-confirm-timeout", "2s"]);
    relay.wait_log("broker or network failed", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(o.remaining().await, 50, "nothing confirmed under the alarm");
    let log = relay.log();
    assert!(log.contains("connection.blocked") || log.contains("no publisher confirm"), "{log}");

    r.ctl(&["set_disk_free_limit", "1MB"]);
    o.wait_drained(Duration::from_secs(60)).await;
    let dead: i64 = sqlx::query_scalar(&format!("select count(*) from \"{}\".outbox_dead_letter", o.schema))
        .fetch_one(&o.pool)
        .await
        .unwrap();
    assert_eq!(dead, 0);
    let got = rabbitmq::consume(&r.admin_url(), &q, 50, Duration::from_secs(20)).await;
    let ids: std::collections::HashSet<String> = got.iter().map(Received::id).collect();
    assert_eq!(ids.len(), 50);
}

/// A server that accepts connections and never answers (a black hole): the relay tries to
/// connect once per batch, so a batch's messages fail within one connect timeout, not one each,
/// and the rows stay for the next try.
#[tokio::test]
async fn a_server_that_never_answers_fails_a_batch_within_one_connect_timeout() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("amqp://{}/%2f", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    let o = Outbox {
        table: common::outbox::OutboxTable::create("amqp-silent", &common::env("DATABASE_URL")).await,
        topic: "silent.events".into(),
        bootstrap: url.clone(),
        url: common::env("DATABASE_URL"),
        kind: Kind::Rabbitmq,
        broker_env: vec![("LOCKSTEP_BROKER", "rabbitmq".into()), ("AMQP_URL", url)],
    };
    o.insert(0, 50, 50).await;
    let started = Instant::now();
    let relay = o.relay("relay-amqp-silent.log", &o.url);
    relay.wait_log("broker or network failed", Duration::from_secs(30)).await;
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(o.remaining().await, 50);
    let warned = relay.log().matches("broker or network failed").count();
    assert!(warned >= 50, "the whole batch failed at once:\n{}", relay.log());
    held.abort();
}
