//! `lockstep doctor --broker rabbitmq`, the real binary, against real servers: the test
//! environment's node (an exchange and queues that exist or not, read by passive declares and the
//! management API), and a private node with a memory alarm and a password the doctor gets wrong.

mod common;

use std::time::Duration;

use common::{
    doctor::{doctor, line},
    rabbitmq::PrivateRabbit,
};
use lapin::{options::QueueDeclareOptions, types::FieldTable};

/// An existing queue and an absent one, with and without the management API: an OutboxRelay
/// passes (its operator declares what is absent), an InboxTable fails on the absent queue and is
/// warned that nothing bounds the present one's redelivery; nothing is created.
#[tokio::test]
async fn queues_are_found_and_described_and_nothing_is_created() {
    let s = common::pg_schema("doctorrabbit").await;
    let ch = common::rabbitmq::channel(&common::rabbitmq::shared_url()).await;
    let (queue, absent, exchange) = (common::unique("doc"), common::unique("doc-absent"), common::unique("doc-x"));
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString("quorum".into()));
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
        .await
        .unwrap();
    let (db, url, user) = (common::env("DATABASE_URL"), common::env("AMQP_URL"), common::env("AMQP_USER"));
    let pw = common::env("AMQP_PASSWORD_FILE");
    let base = [
        "--database-url",
        &db,
        "--schema",
        &s.schema,
        "--broker",
        "rabbitmq",
        "--amqp-url",
        &url,
        "--amqp-user",
        &user,
        "--amqp-password-file",
        &pw,
        "--amqp-exchange",
        &exchange,
        "--queue",
        &queue,
        "--queue",
        &absent,
    ];

    let (code, out, _) = doctor(&base);
    assert_eq!(code, 0, "{out}");
    assert!(line(&out, "PASS  rabbitmq server:").contains("confirm mode"), "{out}");
    assert!(
        line(&out, &format!("PASS  exchange {exchange}:")).contains("the operator declares it"),
        "{out}"
    );
    assert!(line(&out, &format!("PASS  queue {queue}:")).contains("0 message(s) ready"), "{out}");
    assert!(
        line(&out, &format!("PASS  queue {absent}:")).contains("the operator declares it"),
        "{out}"
    );
    line(&out, "WARN  management api: not checked");

    let management = common::env("RABBITMQ_MANAGEMENT_URL");
    let inbox = [&base[..], &["--for", "inbox-table", "--rabbitmq-management-url", &management]].concat();
    let (code, out, _) = doctor(&inbox);
    assert_eq!(code, 1, "{out}");
    assert!(line(&out, "PASS  management api:").contains("RabbitMQ 3."), "{out}");
    line(&out, "PASS  resource alarms: none in effect");
    line(&out, &format!("FAIL  queue {absent}: absent"));
    assert!(
        line(&out, &format!("WARN  queue {queue} settings:")).contains("durable quorum; nothing bounds"),
        "{out}"
    );
    assert!(
        !out.contains(&format!("exchange {exchange}")),
        "an InboxTable has no exchange to check: {out}"
    );

    let admin = common::rabbitmq::admin();
    for (kind, name) in [("exchanges", &exchange), ("queues", &absent)] {
        let found = if kind == "queues" {
            admin.queue(name).await.unwrap().is_some()
        } else {
            admin.exchange(name).await.unwrap().is_some()
        };
        assert!(!found, "doctor declared {kind} {name}");
    }
    admin.delete("queues", &queue).await.unwrap();
}

/// A node in a memory alarm fails its alarm check (the relay could publish nothing); a wrong
/// password fails the connection without being printed.
#[tokio::test]
async fn a_memory_alarm_and_a_wrong_password_fail() {
    let s = common::pg_schema("doctorrabbitbad").await;
    let mp = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let extra = format!("vm_memory_high_watermark.absolute = 1MB\nmanagement.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {mp}\n");
    let node = PrivateRabbit::start_configured(&extra, &|dir| {
        std::fs::write(dir.join("enabled_plugins"), "[rabbitmq_management].\n").unwrap();
    });
    let management = format!("http://127.0.0.1:{mp}");
    common::wait_until(Duration::from_secs(60), "the management API", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", mp)).await.ok().map(drop)
    })
    .await;
    let db = common::env("DATABASE_URL");
    let pw = node.password_file().display().to_string();
    let url = node.url();
    let base = [
        "--database-url",
        &db,
        "--schema",
        &s.schema,
        "--broker",
        "rabbitmq",
        "--amqp-url",
        &url,
    ];

    let right = [&base[..], &["--amqp-user", common::rabbitmq::USER, "--amqp-password-file", &pw]].concat();
    let (code, out, _) = doctor(&[&right[..], &["--rabbitmq-management-url", &management]].concat());
    assert_eq!(code, 1, "{out}");
    line(&out, "PASS  rabbitmq server:");
    assert!(line(&out, "FAIL  resource alarms:").contains("memory on "), "{out}");

    let wrong = node.dir().join("wrong");
    std::fs::write(&wrong, "wrong-pw-5c1e\n").unwrap();
    let wrong = wrong.display().to_string();
    let (code, out, err) = doctor(&[&base[..], &["--amqp-user", common::rabbitmq::USER, "--amqp-password-file", &wrong]].concat());
    assert_eq!(code, 1, "{out}");
    assert!(line(&out, "FAIL  rabbitmq server:").contains("ACCESS_REFUSED"), "{out}");
    assert!(
        !out.contains("wrong-pw") && !err.contains("wrong-pw"),
        "the password is never printed"
    );
}

/// A node that demands a client certificate (TLS with verify_peer and fail_if_no_peer_cert): the
/// relay's connection, as doctor opens it, gets in with the CA and the client certificate files
/// (`--amqp-tls-*`, as a Secret's `ca.crt`, `tls.crt`, `tls.key` give them) and not without one.
#[tokio::test]
async fn a_client_certificate_opens_a_server_that_demands_one() {
    let s = common::pg_schema("doctorrabbittls").await;
    let tls = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let extra = format!(
        "listeners.ssl.default = 127.0.0.1:{tls}\nssl_options.cacertfile = {{dir}}/ca.pem\n\
         ssl_options.certfile = {{dir}}/server.pem\nssl_options.keyfile = {{dir}}/server.key\n\
         ssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n"
    );
    let node = PrivateRabbit::start_configured(&extra, &|dir| {
        common::tls::make_certs(dir, "lockstep-amqp-client-test-ca");
        common::tls::make_client_cert(dir, "relay");
    });
    common::wait_until(Duration::from_secs(60), "the TLS listener", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", tls)).await.ok().map(drop)
    })
    .await;
    let (db, pw, url) = (
        common::env("DATABASE_URL"),
        node.password_file().display().to_string(),
        format!("amqps://127.0.0.1:{tls}/%2f"),
    );
    let file = |f: &str| node.dir().join(f).display().to_string();
    let (ca, cert, key) = (file("ca.pem"), file("client.pem"), file("client.key"));
    let base = [
        "--database-url",
        &db,
        "--schema",
        &s.schema,
        "--broker",
        "rabbitmq",
        "--amqp-url",
        &url,
        "--amqp-user",
        common::rabbitmq::USER,
        "--amqp-password-file",
        &pw,
        "--amqp-tls-ca-file",
        &ca,
    ];
    let (code, out, _) = doctor(&base);
    assert_eq!(code, 1, "{out}");
    line(&out, "FAIL  rabbitmq server:");

    let with_cert = [&base[..], &["--amqp-tls-cert-file", &cert, "--amqp-tls-key-file", &key]].concat();
    let (code, out, _) = doctor(&with_cert);
    assert_eq!(code, 0, "{out}");
    assert!(line(&out, "PASS  rabbitmq server:").contains(&format!("127.0.0.1:{tls}")), "{out}");
}
