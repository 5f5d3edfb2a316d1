//! The broker a relay test publishes to: Kafka (tansu), NATS JetStream (nats-server) or RabbitMQ
//! (rabbitmq-server), shared or a test's own (to stop and start). The same test body runs against
//! each (`brokers!`).

use std::{
    collections::HashSet,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures::StreamExt;
use lockstep::clients::kafka::Admin;
use rdkafka::message::{Headers, Message};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Kafka,
    Nats,
    Rabbitmq,
}

/// A test body run once per broker: `brokers!(name, body)` makes `name::kafka`, `name::nats` and
/// `name::rabbitmq`, each calling `body(Kind)`.
#[macro_export]
macro_rules! brokers {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test]
            async fn kafka() {
                super::$body(super::common::broker::Kind::Kafka).await
            }
            #[tokio::test]
            async fn nats() {
                super::$body(super::common::broker::Kind::Nats).await
            }
            #[tokio::test]
            async fn rabbitmq() {
                super::$body(super::common::broker::Kind::Rabbitmq).await
            }
        }
    };
}

/// A message as a consumer reads it.
#[derive(Debug, Clone)]
pub struct Received {
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
    /// Kafka's record timestamp (ms).
    pub timestamp: Option<i64>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn id(&self) -> String {
        self.header("id").expect("id header").to_owned()
    }

    /// The payload's per-key counter (`OutboxTable` inserts `{"key": .., "n": ..}`).
    pub fn n(&self) -> i64 {
        let v: serde_json::Value = serde_json::from_slice(&self.payload).expect("JSON payload");
        v["n"].as_i64().expect("n in the payload")
    }
}

enum Private {
    Kafka(super::PrivateBroker),
    Nats(PrivateNats),
    Rabbitmq(super::rabbitmq::PrivateRabbit),
}

pub struct Broker {
    pub kind: Kind,
    /// Kafka's bootstrap servers, the NATS URL, or the AMQP URL with its credentials.
    pub address: String,
    /// RabbitMQ: the file of the password in `address`, for the relay.
    password_file: Option<String>,
    private: Option<Private>,
}

impl Broker {
    /// The test environment's broker of this kind.
    pub fn shared(kind: Kind) -> Self {
        let address = match kind {
            Kind::Kafka => super::kafka_bootstrap(),
            Kind::Nats => super::env("NATS_URL"),
            Kind::Rabbitmq => super::rabbitmq::shared_url(),
        };
        Broker {
            kind,
            address,
            password_file: (kind == Kind::Rabbitmq).then(|| super::env("AMQP_PASSWORD_FILE")),
            private: None,
        }
    }

    /// A broker of this test's own, which it may stop.
    pub fn private(kind: Kind) -> Self {
        let (address, p) = match kind {
            Kind::Kafka => {
                let b = super::PrivateBroker::start();
                (b.bootstrap(), Private::Kafka(b))
            }
            Kind::Nats => {
                let n = PrivateNats::start();
                (n.url(), Private::Nats(n))
            }
            Kind::Rabbitmq => {
                let r = super::rabbitmq::PrivateRabbit::start();
                (r.admin_url(), Private::Rabbitmq(r))
            }
        };
        let password_file = match &p {
            Private::Rabbitmq(r) => Some(r.password_file().display().to_string()),
            _ => None,
        };
        Broker {
            kind,
            address,
            password_file,
            private: Some(p),
        }
    }

    pub fn stop(&mut self) {
        match self.private.as_mut().expect("a private broker") {
            Private::Kafka(b) => b.stop(),
            Private::Nats(n) => n.stop(),
            Private::Rabbitmq(r) => r.stop(),
        }
    }

    pub fn start_again(&mut self) {
        match self.private.as_mut().expect("a private broker") {
            Private::Kafka(b) => b.start_again(),
            Private::Nats(n) => n.start_again(),
            Private::Rabbitmq(r) => r.start_again(),
        }
    }

    /// The environment a relay needs to publish here.
    pub fn relay_env(&self) -> Vec<(&'static str, String)> {
        match self.kind {
            Kind::Kafka => vec![("KAFKA_BOOTSTRAP_SERVERS", self.address.clone())],
            Kind::Nats => vec![("LOCKSTEP_BROKER", "nats".into()), ("NATS_URL", self.address.clone())],
            Kind::Rabbitmq => vec![
                ("LOCKSTEP_BROKER", "rabbitmq".into()),
                ("AMQP_URL", super::rabbitmq::without_credentials(&self.address)),
                ("AMQP_USER", super::rabbitmq::USER.into()),
                ("AMQP_PASSWORD_FILE", self.password_file.clone().unwrap_or_default()),
                ("LOCKSTEP_AMQP_EXCHANGE", super::rabbitmq::EXCHANGE.into()),
            ],
        }
    }

    /// A destination named after `prefix`: a topic of `partitions`, a stream of that one subject,
    /// or a stream queue bound to the test exchange by its name.
    pub async fn declare(&self, prefix: &str, partitions: i32) -> String {
        let name = super::unique(&format!("relay.{prefix}"));
        match self.kind {
            Kind::Kafka => {
                let admin = Admin::new(&self.address, &Default::default(), Duration::from_secs(10)).unwrap();
                admin.create_topic(&name, partitions, 1, &Default::default()).await.unwrap();
            }
            Kind::Nats => {
                let js = jetstream(&self.address).await;
                js.create_stream(async_nats::jetstream::stream::Config {
                    name: stream_name(&name),
                    subjects: vec![name.clone()],
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
            Kind::Rabbitmq => {
                super::rabbitmq::declare(&self.address, &name).await;
                if self.private.is_some() {
                    super::rabbitmq::settle().await;
                }
            }
        }
        name
    }
}

/// Messages of `destination` on the broker at `address` from its first, until `want` distinct
/// ids were read or `timeout`.
pub async fn consume(kind: Kind, address: &str, destination: &str, want: usize, timeout: Duration) -> Vec<Received> {
    match kind {
        Kind::Kafka => {
            let c = super::relays::from_start(address, destination, None);
            let mut out = Vec::new();
            let mut ids = HashSet::new();
            let deadline = Instant::now() + timeout;
            while ids.len() < want && Instant::now() < deadline {
                if let Some(m) = c.poll(Duration::from_millis(200)) {
                    let r = kafka_received(&m.expect("consume"));
                    ids.insert(r.id());
                    out.push(r);
                }
            }
            out
        }
        Kind::Nats => consume_nats(address, destination, want, timeout).await,
        Kind::Rabbitmq => super::rabbitmq::consume(address, destination, want, timeout).await,
    }
}

async fn consume_nats(address: &str, destination: &str, want: usize, timeout: Duration) -> Vec<Received> {
    consume_stream(&jetstream(address).await, destination, want, timeout).await
}

/// Messages of the stream of `destination` through `js`, from its first.
pub async fn consume_stream(js: &async_nats::jetstream::Context, destination: &str, want: usize, timeout: Duration) -> Vec<Received> {
    use async_nats::jetstream::consumer;
    let stream = js.get_stream(stream_name(destination)).await.expect("the stream");
    let c = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = c.messages().await.unwrap();
    let mut out = Vec::new();
    let mut ids = HashSet::new();
    let deadline = Instant::now() + timeout;
    while ids.len() < want && Instant::now() < deadline {
        let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), messages.next()).await else {
            continue;
        };
        let m = m.expect("consume");
        let headers: Vec<(String, String)> = m
            .headers
            .iter()
            .flat_map(|h| h.iter())
            .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
            .collect();
        let r = Received {
            key: headers
                .iter()
                .find(|(k, _)| k == "lockstep-key")
                .map(|(_, v)| v.clone())
                .unwrap_or_default(),
            payload: m.payload.to_vec(),
            headers,
            timestamp: None,
        };
        ids.insert(r.id());
        out.push(r);
    }
    out
}

async fn jetstream(address: &str) -> async_nats::jetstream::Context {
    let client = async_nats::connect(address).await.expect("connect to NATS");
    async_nats::jetstream::new(client)
}

/// An admin connection to the test environment's nats-server.
pub async fn nats_admin() -> lockstep::clients::nats_admin::NatsAdmin {
    let s = lockstep::core::nats_settings::NatsSettings {
        servers: vec![super::env("NATS_URL")],
        ack_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    lockstep::clients::nats_admin::NatsAdmin::connect(&s).await.unwrap()
}

/// A stream's name for a subject: streams may not hold dots.
pub fn stream_name(subject: &str) -> String {
    subject.replace('.', "_")
}

fn kafka_received(m: &rdkafka::message::BorrowedMessage<'_>) -> Received {
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                .collect()
        })
        .unwrap_or_default();
    Received {
        key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
        payload: m.payload().unwrap_or_default().to_vec(),
        headers,
        timestamp: m.timestamp().to_millis(),
    }
}

/// What a test puts in a private server's folder before it starts (certificates).
pub type Prepare = dyn Fn(&std::path::Path);

/// A nats-server with JetStream of a test's own, on its own port and store.
pub struct PrivateNats {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// A configuration file's text (`{port}` and `{dir}` filled in), instead of the flags.
    config: Option<String>,
}

impl PrivateNats {
    pub fn start() -> Self {
        Self::start_configured(None)
    }

    /// A server started from `config` (`{port}` and `{dir}`, its folder, filled in); the folder
    /// is made first, so the caller's files may go in it through `prepare`.
    pub fn start_configured(config: Option<(&str, &Prepare)>) -> Self {
        let dir = PathBuf::from(super::env("LOCKSTEP_TESTENV_DIR"))
            .join("private-nats")
            .join(super::unique("n"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = config.map(|(text, prepare)| {
            prepare(&dir);
            text.replace("{port}", &port.to_string())
                .replace("{dir}", &dir.display().to_string())
        });
        let mut n = PrivateNats {
            port,
            dir,
            child: None,
            config,
        };
        n.start_again();
        n
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Start again: same port, same store, so the streams and their messages are kept.
    pub fn start_again(&mut self) {
        let mut cmd = Command::new(super::env("LOCKSTEP_NATS_BIN"));
        match &self.config {
            Some(text) => {
                std::fs::write(self.dir.join("nats.conf"), text).unwrap();
                cmd.arg("-c").arg(self.dir.join("nats.conf"));
            }
            None => {
                cmd.args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
                    .arg(self.dir.join("store"));
            }
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("log")).unwrap())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "private nats-server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
