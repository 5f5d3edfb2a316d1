//! Kafka clients the operator keeps per reconcile, against the real Kafka-protocol broker (issue
//! "Step 11" item 8): consumer lag reuses one consumer per settings and group, and describing
//! topics asks the broker about the named topics only.

mod common;

use std::{
    collections::BTreeMap,
    io::Write,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use lockstep::{
    clients::consumer_lag::{self, LagClients},
    clients::kafka::Admin,
};

/// Everything logged in this test binary (librdkafka's debug lines included), from the first call on.
fn captured() -> Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("librdkafka=debug"))
            .with_writer(move || Sink(b.clone()))
            .with_ansi(false)
            .try_init()
            .expect("the only subscriber of this test binary");
        buf
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn topic(admin: &Admin, prefix: &str) -> String {
    let t = common::unique(prefix);
    admin.create_topic(&t, 1, 1, &BTreeMap::new()).await.unwrap();
    t
}

/// Every reconcile measured consumer lag with a consumer of its own: librdkafka threads and
/// connections built and torn down once per table per refresh (and per purge).
#[tokio::test]
async fn consumer_lag_reuses_one_consumer_per_settings_and_group() {
    let bootstrap = common::kafka_bootstrap();
    let admin = Admin::new(&bootstrap, &BTreeMap::new(), Duration::from_secs(10)).unwrap();
    let t = topic(&admin, "lag.reuse").await;
    let clients = Arc::new(LagClients::default());
    let (group, settings) = (common::unique("g"), BTreeMap::new());
    for _ in 0..3 {
        let lag = consumer_lag::measure(
            &clients,
            &bootstrap,
            &settings,
            &group,
            std::slice::from_ref(&t),
            Duration::from_secs(10),
        )
        .await
        .expect("measure");
        assert_eq!(lag.total(), 0);
    }
    assert_eq!(clients.created(), 1, "three measurements of one group built more than one consumer");
    let other = common::unique("g");
    consumer_lag::measure(
        &clients,
        &bootstrap,
        &settings,
        &other,
        std::slice::from_ref(&t),
        Duration::from_secs(10),
    )
    .await
    .expect("measure another group");
    assert_eq!(clients.created(), 2, "another group gets a consumer of its own");
    admin.delete_topic(&t).await.unwrap();
}

/// Describing a relay's topics fetched the metadata of every topic of the cluster (thousands on a
/// real one) to keep a few. librdkafka says which it asks for in its metadata debug lines.
#[tokio::test]
async fn describe_asks_for_the_named_topics_only() {
    let log = captured();
    let bootstrap = common::kafka_bootstrap();
    let debug = BTreeMap::from([("debug".to_string(), "metadata".to_string())]);
    let admin = Admin::new(&bootstrap, &debug, Duration::from_secs(10)).unwrap();
    let (a, b) = (topic(&admin, "describe.a").await, topic(&admin, "describe.b").await);
    let missing = common::unique("describe.none");
    log.lock().unwrap().clear();
    let found = admin.describe(&[a.clone(), missing.clone(), b.clone()]).await.unwrap();
    let mut want = vec![a.clone(), b.clone()];
    want.sort();
    assert_eq!(found.keys().cloned().collect::<Vec<_>>(), want, "the named topics that exist");
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    assert!(
        !text.contains("Request metadata for all topics: application requested"),
        "describe asked for every topic of the cluster:\n{text}"
    );
    assert!(
        text.contains("Request metadata for 1 topic(s): application requested"),
        "no metadata request by name was logged:\n{text}"
    );
    admin.delete_topic(&a).await.unwrap();
    admin.delete_topic(&b).await.unwrap();
}
