//! RabbitMQ for the relay tests: the test environment's node or a test's own (to stop and start),
//! destinations as stream queues (read from their first message, again and again, as a Kafka
//! topic or a JetStream stream is), and a reader of them.

use std::{
    collections::HashSet,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures::StreamExt;
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    Channel, Connection, ConnectionProperties, ExchangeKind,
};

use super::broker::Received;

/// The exchange the relay tests publish to (`--amqp-exchange`): direct, each test's stream queue
/// bound to it by its own name.
pub const EXCHANGE: &str = "lockstep.test";

/// The URL of the test environment's node, with its credentials (for the tests' own clients).
pub fn shared_url() -> String {
    let password = std::fs::read_to_string(super::env("AMQP_PASSWORD_FILE")).unwrap();
    with_credentials(&super::env("AMQP_URL"), &super::env("AMQP_USER"), password.trim())
}

/// The password of the test environment's node.
pub fn password() -> String {
    std::fs::read_to_string(super::env("AMQP_PASSWORD_FILE")).unwrap().trim().to_owned()
}

/// The Secret `rabbit` in `ns`: the test environment's user and password, as an OutboxRelay's
/// `authSecretRef` names it.
pub async fn create_secret(client: &kube::Client, ns: &str) {
    let s: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "rabbit"}, "stringData": {"user": super::env("AMQP_USER"), "password": password()}
    }))
    .unwrap();
    kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns)
        .create(&Default::default(), &s)
        .await
        .unwrap();
}

/// The test environment's node, over its management API.
pub fn admin() -> lockstep::clients::rabbitmq_admin::RabbitAdmin {
    let password = password();
    lockstep::clients::rabbitmq_admin::RabbitAdmin::new(&lockstep::clients::rabbitmq_admin::ManagementSettings {
        url: super::env("RABBITMQ_MANAGEMENT_URL"),
        vhost: "/".into(),
        auth: Some((super::env("AMQP_USER"), lockstep::core::redacted::Redacted::new(password.trim()))),
        tls_ca: None,
    })
    .unwrap()
}

pub fn with_credentials(url: &str, user: &str, password: &str) -> String {
    url.replacen("amqp://", &format!("amqp://{user}:{password}@"), 1)
}

/// The URL without its credentials, as the relay takes it.
pub fn without_credentials(url: &str) -> String {
    match url.split_once('@') {
        Some((_, rest)) => format!("amqp://{rest}"),
        None => url.to_owned(),
    }
}

pub async fn channel(url: &str) -> Channel {
    let c = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let ch = c.create_channel().await.unwrap();
    // The channel keeps the connection open (lapin: dropping a Connection does not close it).
    ch
}

/// A stream queue `name` bound to [`EXCHANGE`] with routing key `name`.
pub async fn declare(url: &str, name: &str) {
    let ch = channel(url).await;
    ch.exchange_declare(
        EXCHANGE.into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
    ch.queue_declare(name.into(), QueueDeclareOptions::durable(), args).await.unwrap();
    ch.queue_bind(
        name.into(),
        EXCHANGE.into(),
        name.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let _ = ch.close(200, "declared".into()).await;
}

/// Wait until a queue just declared outlives a SIGKILL of its node. RabbitMQ 3.10 loses a stream
/// queue declared a moment before its node is killed (seen: killed 0.6 s after the declare, the
/// node came back with the binding and without the queue, and returned every message as
/// unroutable); a second was enough in tries here, the outage tests give it five.
pub async fn settle() {
    tokio::time::sleep(Duration::from_secs(5)).await;
}

/// Messages of the stream queue `queue` from its first, until `want` distinct ids or `timeout`.
pub async fn consume(url: &str, queue: &str, want: usize, timeout: Duration) -> Vec<Received> {
    let ch = channel(url).await;
    ch.basic_qos(1000, BasicQosOptions::default()).await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), AMQPValue::LongString("first".into()));
    let mut consumer = ch
        .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), args)
        .await
        .expect("consume the stream queue");
    let mut out = Vec::new();
    let mut ids = HashSet::new();
    let deadline = Instant::now() + timeout;
    while ids.len() < want && Instant::now() < deadline {
        let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await else {
            continue;
        };
        let d = d.expect("consume");
        let r = received(&d);
        d.ack(BasicAckOptions::default()).await.unwrap();
        if let Some(id) = r.header("id") {
            ids.insert(id.to_owned());
        }
        out.push(r);
    }
    let _ = ch.close(200, "read".into()).await;
    out
}

/// A delivery's headers as text (the relay sends every header as a long string).
pub fn received(d: &lapin::message::Delivery) -> Received {
    let headers: Vec<(String, String)> = d
        .properties
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .filter_map(|(k, v)| v.as_long_string().map(|s| (k.to_string(), s.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Received {
        key: headers
            .iter()
            .find(|(k, _)| k == "lockstep-key")
            .map(|(_, v)| v.clone())
            .unwrap_or_default(),
        payload: d.data.clone(),
        headers,
        timestamp: None,
    }
}

/// A rabbitmq-server of a test's own, on its own ports (AMQP and distribution; the epmd of the
/// test environment) and store, as scripts/testenv starts its node. It runs as the test's user.
pub struct PrivateRabbit {
    pub port: u16,
    dist: u16,
    name: String,
    dir: PathBuf,
    child: Option<Child>,
}

/// The private node's user and password.
pub const USER: &str = "lockstep";
pub const PASSWORD: &str = "private-rabbit-pw";

impl PrivateRabbit {
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// A node whose rabbitmq.conf also holds `extra` (`{dir}`, its folder, filled in); the folder
    /// is made first, so `prepare` may put files in it.
    pub fn start_configured(extra: &str, prepare: &dyn Fn(&std::path::Path)) -> Self {
        let mut r = Self::make(extra);
        prepare(&r.dir);
        r.start_again();
        r
    }

    pub fn start_with(extra: &str) -> Self {
        let mut r = Self::make(extra);
        r.start_again();
        r
    }

    fn make(extra: &str) -> Self {
        let name = super::unique("r");
        let dir = PathBuf::from(super::env("LOCKSTEP_TESTENV_DIR"))
            .join("private-rabbitmq")
            .join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (port, dist) = (free(), free());
        let conf = format!(
            "listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\ndefault_user = {USER}\ndefault_pass = {PASSWORD}\n\
             default_user_tags.administrator = true\n{}\n",
            extra.replace("{dir}", &dir.display().to_string())
        );
        std::fs::write(dir.join("rabbitmq.conf"), conf).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(dir.join("rabbitmq-env.conf"), "").unwrap();
        std::fs::write(dir.join("password"), PASSWORD).unwrap();
        PrivateRabbit {
            port,
            dist,
            name,
            dir,
            child: None,
        }
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The URL without credentials, as the relay takes it (AMQP_URL).
    pub fn url(&self) -> String {
        format!("amqp://127.0.0.1:{}/%2f", self.port)
    }

    /// The URL with the credentials, for the test's own clients.
    pub fn admin_url(&self) -> String {
        with_credentials(&self.url(), USER, PASSWORD)
    }

    pub fn password_file(&self) -> PathBuf {
        self.dir.join("password")
    }

    /// Start again: same ports, same store, so queues and their messages are kept.
    pub fn start_again(&mut self) {
        let d = &self.dir;
        let _ = std::fs::remove_file(d.join("pid"));
        let child = Command::new(PathBuf::from(super::env("LOCKSTEP_RABBITMQ_SBIN")).join("rabbitmq-server"))
            .env("HOME", d)
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_NODENAME", format!("{}@localhost", self.name))
            .env("RABBITMQ_DIST_PORT", self.dist.to_string())
            .env("ERL_EPMD_PORT", super::env("LOCKSTEP_RABBITMQ_EPMD_PORT"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_FLAGS", "-kernel inet_dist_use_interface {127,0,0,1}")
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(d.join("out.log")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("start rabbitmq-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "private rabbitmq-server did not listen; see {}",
                d.join("out.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Run `rabbitmqctl` against this node; its output.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(PathBuf::from(super::env("LOCKSTEP_RABBITMQ_SBIN")).join("rabbitmqctl"))
            .env("HOME", &self.dir)
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .env("ERL_EPMD_PORT", super::env("LOCKSTEP_RABBITMQ_EPMD_PORT"))
            .args(["-n", &format!("{}@localhost", self.name)])
            .args(args)
            .output()
            .expect("run rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Kill the node (SIGKILL: an outage, not a clean stop).
    pub fn stop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
