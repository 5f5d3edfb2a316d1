//! `lockstep doctor --broker nats`, the real binary, against the real servers: the test
//! environment's nats-server (a stream that exists, one that does not, an InboxTable's consumer),
//! a private server without JetStream, and one with a password the doctor gets wrong.

mod common;

use async_nats::jetstream;
use common::doctor::{doctor, line};

/// A folder of the test's own for the password files.
fn scratch() -> std::path::PathBuf {
    let d = std::path::PathBuf::from(common::env("LOCKSTEP_TESTENV_DIR")).join(common::unique("doctor-nats"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An existing stream with a consumer, and an absent one: an OutboxRelay passes (its operator
/// creates the absent one), an InboxTable fails on it; nothing is created.
#[tokio::test]
async fn streams_and_a_consumer_are_described_and_nothing_is_created() {
    let s = common::pg_schema("doctornats").await;
    let url = common::env("NATS_URL");
    let js = jetstream::new(async_nats::connect(&url).await.unwrap());
    let name = common::unique("doc").replace(['.', '-'], "_");
    let absent = format!("{name}_absent");
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
    stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("payments".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    js.publish(format!("{name}.created"), "x".into()).await.unwrap().await.unwrap();
    let db = common::env("DATABASE_URL");
    let base = ["--database-url", &db, "--schema", &s.schema, "--broker", "nats", "--nats-url", &url];

    let (code, out, _) = doctor(&[&base[..], &["--stream", &name, "--stream", &absent]].concat());
    assert_eq!(code, 0, "{out}");
    assert!(line(&out, "PASS  nats server:").contains("nats-server 2."), "{out}");
    assert!(line(&out, "PASS  jetstream:").contains("enabled"), "{out}");
    assert!(line(&out, &format!("PASS  stream {name}:")).contains("1 message(s)"), "{out}");
    assert!(
        line(&out, &format!("PASS  stream {absent}:")).contains("the operator creates it"),
        "{out}"
    );
    assert!(!out.contains("broker: not checked"), "{out}");

    let inbox = [
        &base[..],
        &[
            "--for",
            "inbox-table",
            "--stream",
            &name,
            "--stream",
            &absent,
            "--consumer",
            "payments",
        ],
    ]
    .concat();
    let (code, out, _) = doctor(&inbox);
    assert_eq!(code, 1, "{out}");
    line(&out, &format!("FAIL  stream {absent}: absent"));
    assert!(
        line(&out, &format!("PASS  consumer payments of stream {name}:")).contains("1 pending"),
        "{out}"
    );
    assert!(js.get_stream(&absent).await.is_err(), "doctor created nothing");
    js.delete_stream(&name).await.unwrap();
}

/// A server without JetStream fails its check; one whose password the doctor gets wrong fails
/// the connection without printing the password.
#[tokio::test]
async fn no_jetstream_and_a_wrong_password_fail() {
    let s = common::pg_schema("doctornatsbad").await;
    let dir = scratch();
    let url = common::env("DATABASE_URL");
    let db = ["--database-url", &url, "--schema", &s.schema, "--broker", "nats"];

    let plain = common::broker::PrivateNats::start_configured(Some(("listen: 127.0.0.1:{port}\n", &|_| ())));
    let (code, out, _) = doctor(&[&db[..], &["--nats-url", &plain.url()]].concat());
    assert_eq!(code, 1, "{out}");
    line(&out, "PASS  nats server:");
    line(&out, "FAIL  jetstream:");

    const CONFIG: &str = "listen: 127.0.0.1:{port}\njetstream { store_dir: \"{dir}/store\" }\n\
        authorization { user: relay, password: \"right-pw\" }\n";
    let guarded = common::broker::PrivateNats::start_configured(Some((CONFIG, &|_| ())));
    let pw = dir.join("pw");
    std::fs::write(&pw, "wrong-pw-7f3a\n").unwrap();
    let pw = pw.display().to_string();
    let (code, out, err) = doctor(
        &[
            &db[..],
            &["--nats-url", &guarded.url(), "--nats-user", "relay", "--nats-password-file", &pw],
        ]
        .concat(),
    );
    assert_eq!(code, 1, "{out}");
    line(&out, "FAIL  nats server:");
    assert!(
        !out.contains("wrong-pw") && !err.contains("wrong-pw"),
        "the password is never printed"
    );
    std::fs::write(dir.join("pw"), "right-pw\n").unwrap();
    let (code, out, _) = doctor(
        &[
            &db[..],
            &["--nats-url", &guarded.url(), "--nats-user", "relay", "--nats-password-file", &pw],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
