//! Production Kafka settings, for real: the relay binary publishes over TLS (a socat proxy from
//! Debian terminating TLS in front of a private tansu advertised on the proxy's port, with a CA the
//! test makes) and over SASL_SSL with SCRAM-SHA-512, compressing with zstd; and no setting value
//! (ssl.key.password, sasl.password) reaches an error or a log line.

mod common;

use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use common::tls::TlsBroker;
use lockstep::clients::kafka::{config_error_text, Admin, AdminError};
use lockstep::core::kafka_settings::{scrub, REDACTED};
use rdkafka::{
    config::ClientConfig,
    consumer::{BaseConsumer, Consumer},
    message::{Headers, Message},
    producer::FutureProducer,
};

const SENTINEL: &str = "lockstep-sentinel-7f3a";

fn settings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn client_config(bootstrap: &str, settings: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = ClientConfig::new();
    settings.iter().for_each(|(k, v)| {
        c.set(k, v);
    });
    c.set("bootstrap.servers", bootstrap);
    c
}

// ---------------------------------------------------------------- scrubbing, no server needed

#[test]
fn scrub_replaces_every_value_and_values_cut_short() {
    assert_eq!(scrub("a secret-pw b", ["secret-pw"]), format!("a {REDACTED} b"));
    // Overlapping values become one placeholder; a short value is not searched inside it.
    assert_eq!(scrub("x abcdef y", ["abcd", "cdef", "red"]), format!("x {REDACTED} y"));
    // librdkafka's 512-byte buffer cut the value short at the end of the text.
    assert_eq!(
        scrub("Invalid value \"lockstep-sen", [SENTINEL]),
        format!("Invalid value \"{REDACTED}")
    );
    assert_eq!(scrub("ends with lock", [SENTINEL]), format!("ends with {REDACTED}"));
    assert_eq!(scrub("ends with loc", [SENTINEL]), "ends with loc", "3 bytes are too few to tell");
    assert_eq!(scrub("ü-pässwörd-ü", ["pässwörd", ""]), format!("ü-{REDACTED}-ü"));
    assert_eq!(scrub("nothing here", ["zzz"]), "nothing here");
}

#[test]
fn a_client_config_error_names_the_key_and_hides_the_value() {
    let s = settings(&[("security.protocol", SENTINEL), ("sasl.password", SENTINEL)]);
    let e = client_config("127.0.0.1:1", &s)
        .create::<FutureProducer>()
        .err()
        .expect("invalid protocol refused");
    assert!(e.to_string().contains(SENTINEL), "rdkafka echoes the value: {e}");
    let text = config_error_text(&e, s.values().map(String::as_str));
    assert!(!text.contains(SENTINEL), "{text}");
    assert!(text.contains("security.protocol") && text.contains(REDACTED), "{text}");
}

/// Settings librdkafka refuses, each in its own way, with the sentinel as every value that matters.
fn bad_settings() -> [BTreeMap<String, String>; 3] {
    [
        // conf_set refuses the value and echoes it (KafkaError::ClientConfig).
        settings(&[("security.protocol", SENTINEL), ("sasl.password", SENTINEL)]),
        // rd_kafka_new refuses the value and echoes it (KafkaError::ClientCreation).
        settings(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", SENTINEL),
            ("sasl.password", SENTINEL),
        ]),
        // rd_kafka_new fails on the key material.
        settings(&[
            ("security.protocol", "SSL"),
            ("ssl.key.pem", SENTINEL),
            ("ssl.key.password", SENTINEL),
        ]),
    ]
}

#[test]
fn admin_new_keeps_setting_values_out_of_its_error() {
    for s in bad_settings() {
        let e = Admin::new("127.0.0.1:1", &s, Duration::from_secs(1))
            .err()
            .expect("bad settings refused");
        assert!(matches!(e, AdminError::Config(_)), "{e:?}");
        for text in [e.to_string(), format!("{e:?}")] {
            assert!(!text.contains(SENTINEL) && !text.contains("lockstep-sen"), "{text}");
        }
        println!("Admin::new error: {e}");
    }
}

#[test]
fn a_sasl_ssl_scram_zstd_producer_can_be_created() {
    let s = settings(&[
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanism", "SCRAM-SHA-512"),
        ("sasl.username", "u"),
        ("sasl.password", "p"),
        ("compression.type", "zstd"),
    ]);
    let _: FutureProducer = client_config("127.0.0.1:1", &s)
        .create()
        .expect("librdkafka built with OpenSSL, SCRAM and zstd");
    let plain = settings(&[
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanism", "PLAIN"),
        ("sasl.username", "u"),
        ("sasl.password", "p"),
    ]);
    let _: FutureProducer = client_config("127.0.0.1:1", &plain).create().expect("SASL PLAIN");
}

// ---------------------------------------------------------------- the relay binary, for real

struct Outbox {
    table: common::outbox::OutboxTable,
    topic: String,
}

impl std::ops::Deref for Outbox {
    type Target = common::outbox::OutboxTable;
    fn deref(&self) -> &Self::Target {
        &self.table
    }
}

/// An outbox table of its own on the test PostgreSQL, `n` events over 10 keys, and the topic.
async fn outbox(prefix: &str, admin: Option<&Admin>, n: i64) -> Outbox {
    let topic = common::unique(&format!("tls.{prefix}"));
    if let Some(admin) = admin {
        admin.create_topic(&topic, 3, 1, &Default::default()).await.expect("create topic");
    }
    let table = common::outbox::OutboxTable::create(prefix, &common::env("DATABASE_URL")).await;
    sqlx::query(&format!(
        "insert into \"{}\".outbox (id, aggregatetype, aggregateid, type, payload)
         select gen_random_uuid(), 'order', 'k-' || (g % 10), 'created', jsonb_build_object('n', g, 'pad', repeat('x', 200))
         from generate_series(1, $1) g",
        table.schema
    ))
    .bind(n)
    .execute(&table.pool)
    .await
    .unwrap();
    Outbox { table, topic }
}

struct RelayProc(std::process::Child);

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Outbox {
    /// Start `lockstep relay` with `settings` as --kafka-config flags; stderr goes to `log`.
    fn relay(&self, bootstrap: &str, settings: &BTreeMap<String, String>, log: &Path, rust_log: &str) -> RelayProc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockstep"));
        cmd.args(["relay", "--schema", &self.schema, "--table", "outbox", "--topic", &self.topic])
            .args(["--metrics-addr", "127.0.0.1:0", "--poll-interval", "200ms", "--compression", "zstd"]);
        for (k, v) in settings {
            cmd.arg("--kafka-config").arg(format!("{k}={v}"));
        }
        cmd.env("DATABASE_URL", common::env("DATABASE_URL"))
            .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .map(RelayProc)
            .expect("start lockstep relay")
    }
}

/// Distinct event ids read from `topic` from the beginning, until `want` or the timeout.
fn consume_ids(bootstrap: &str, settings: &BTreeMap<String, String>, topic: &str, want: usize, wait: Duration) -> HashSet<String> {
    let c: BaseConsumer = client_config(bootstrap, settings)
        .set("group.id", common::unique("check"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning).unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut ids = HashSet::new();
    let deadline = Instant::now() + wait;
    while ids.len() < want && Instant::now() < deadline {
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = match m {
                Ok(m) => m,
                // tansu 0.6 grants SASL sessions 60 s but refuses re-authentication on the same
                // connection: librdkafka reports it and reconnects, so it is logged, not fatal.
                Err(e) => {
                    println!("consume error ({want} wanted, {} seen): {e}", ids.len());
                    continue;
                }
            };
            let id = m.headers().and_then(|h| h.iter().find(|h| h.key == "id").and_then(|h| h.value));
            ids.insert(String::from_utf8_lossy(id.expect("id header")).into_owned());
        }
    }
    ids
}

/// Whether a client with `settings` gets the broker's metadata through `bootstrap`.
fn metadata_ok(bootstrap: &str, settings: &BTreeMap<String, String>) -> bool {
    let c: BaseConsumer = client_config(bootstrap, settings).create().unwrap();
    c.fetch_metadata(None, Duration::from_secs(3)).is_ok()
}

fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the relay did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

const EVENTS: i64 = 2000;

#[tokio::test]
async fn relays_every_event_over_tls_with_zstd() {
    let b = TlsBroker::start(false);
    let tls = b.ssl_settings();
    let admin = Admin::new(&b.bootstrap(), &tls, Duration::from_secs(10)).unwrap();
    let o = outbox("tls", Some(&admin), EVENTS).await;
    let log = b.dir.join("relay.log");
    let relay = o.relay(&b.bootstrap(), &tls, &log, "info");
    o.wait_drained(Duration::from_secs(120)).await;
    let ids = consume_ids(&b.bootstrap(), &tls, &o.topic, EVENTS as usize, Duration::from_secs(60));
    drop(relay);
    assert_eq!(ids.len(), EVENTS as usize, "every committed event arrived over TLS");
    assert_eq!(
        b.stored_codecs(&o.topic),
        vec![4],
        "every batch the broker stored was zstd-compressed"
    );

    // The broker is reachable over TLS only, and the CA is checked.
    let handshakes = b.proxy_log().matches("SSL connection using").count();
    assert!(
        handshakes >= 2,
        "the proxy saw the relay's and the consumer's TLS handshakes: {handshakes}"
    );
    assert!(
        !metadata_ok(&b.bootstrap(), &BTreeMap::new()),
        "plain TCP to the TLS port gets nothing"
    );
    let other = b.dir.join("other-ca");
    std::fs::create_dir_all(&other).unwrap();
    common::tls::make_certs(&other, "another CA");
    let wrong_ca = settings(&[
        ("security.protocol", "SSL"),
        ("ssl.ca.location", other.join("ca.pem").to_str().unwrap()),
    ]);
    assert!(!metadata_ok(&b.bootstrap(), &wrong_ca), "a certificate from another CA is refused");
    println!("{EVENTS} events over TLS, {handshakes} TLS handshakes at the proxy, batches stored as zstd");
}

fn scram(user: &str, password: &str, ca: &Path) -> BTreeMap<String, String> {
    settings(&[
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanism", "SCRAM-SHA-512"),
        ("sasl.username", user),
        ("sasl.password", password),
        ("ssl.ca.location", ca.to_str().unwrap()),
    ])
}

#[tokio::test]
async fn relays_every_event_over_sasl_ssl_scram() {
    let b = TlsBroker::start(true);
    let password = format!("{SENTINEL}-scram");
    b.add_scram_user("lockstep", &password);
    let auth = scram("lockstep", &password, &b.ca());
    let admin = Admin::new(&b.bootstrap(), &auth, Duration::from_secs(10)).unwrap();
    let o = outbox("scram", Some(&admin), EVENTS).await;

    // A wrong password: nothing is published, and the password is in no log line (debug logs on).
    let wrong = scram("lockstep", &format!("{SENTINEL}-wrong"), &b.ca());
    let bad_log = b.dir.join("relay-wrong-password.log");
    let bad = o.relay(&b.bootstrap(), &wrong, &bad_log, "debug");
    tokio::time::sleep(Duration::from_secs(8)).await;
    drop(bad);
    let text = std::fs::read_to_string(&bad_log).unwrap();
    assert!(!text.contains(SENTINEL), "a password reached the relay's log:\n{text}");
    assert!(text.to_lowercase().contains("authentication"), "the log says why:\n{text}");
    assert!(
        consume_ids(&b.bootstrap(), &auth, &o.topic, 1, Duration::from_secs(5)).is_empty(),
        "no event published without auth"
    );

    let log = b.dir.join("relay.log");
    let relay = o.relay(&b.bootstrap(), &auth, &log, "debug");
    o.wait_drained(Duration::from_secs(120)).await;
    let ids = consume_ids(&b.bootstrap(), &auth, &o.topic, EVENTS as usize, Duration::from_secs(60));
    drop(relay);
    assert_eq!(ids.len(), EVENTS as usize, "every committed event arrived over SASL_SSL/SCRAM");
    assert_eq!(b.stored_codecs(&o.topic), vec![4], "zstd batches");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(SENTINEL), "the password reached the relay's log");
    let plain = settings(&[("security.protocol", "SSL"), ("ssl.ca.location", b.ca().to_str().unwrap())]);
    assert!(!metadata_ok(&b.bootstrap(), &plain), "TLS without SASL is refused by the broker");
    println!("{EVENTS} events over SASL_SSL/SCRAM-SHA-512");
}

#[tokio::test]
async fn relay_start_failure_never_shows_a_setting_value() {
    let o = outbox("sentinel", None, 1).await;
    for (i, s) in bad_settings().iter().enumerate() {
        let log = std::path::PathBuf::from(common::env("LOCKSTEP_TESTENV_DIR")).join(format!("kafka-tls-sentinel-{i}.log"));
        let mut relay = o.relay(&common::kafka_bootstrap(), s, &log, "debug");
        let status = wait_exit(&mut relay.0, Duration::from_secs(60));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!status.success(), "a relay with bad settings fails: {text}");
        // Refused when the settings are read (--kafka-config) or when the producer is made.
        assert!(
            text.contains("Kafka producer") || text.contains("--kafka-config: librdkafka refuses"),
            "it says what failed:\n{text}"
        );
        assert!(
            !text.contains(SENTINEL) && !text.contains("lockstep-sen"),
            "a value reached stderr:\n{text}"
        );
        println!("exit {status}: {}", text.lines().last().unwrap_or_default());
    }
}
