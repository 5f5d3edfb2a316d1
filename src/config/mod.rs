//! Configuration of the `operator`, `relay` and `replay` commands, from flags and environment (what a Pod
//! gets). Secrets (the database URL) are wrapped so they never reach a log line.

mod amqp;
mod error;
pub mod headers;
mod kafka;
mod nats;

pub use amqp::AmqpArgs;
pub use error::RelayConfigError;
pub use kafka::{kafka_settings, parse_key_value, KafkaArgs};
pub use nats::{server_host_port, BrokerArg, NatsArgs};

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use clap::{Args, ValueEnum};

use crate::{
    core::duration::Duration,
    core::redacted::Redacted,
    core::routing::OutboxColumn,
    crd::{
        Cleanup, Compression, DatabaseSpec, KafkaSpec, LagSpec, OutboxRelaySpec, ProducerSpec, RelaySpec, RoutingSpec, SecretKeyRef,
        ValidOutboxRelay,
    },
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct OperatorArgs {
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "LOCKSTEP_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Watch only these namespaces, comma-separated or repeated (default: all namespaces). The
    /// operator then needs RBAC for its kinds, Secrets and Deployments in those namespaces only.
    #[arg(long = "watch-namespace", env = "LOCKSTEP_WATCH_NAMESPACE", value_delimiter = ',')]
    pub watch_namespaces: Vec<String>,
    /// Elect a leader through a Lease so several operator replicas are safe.
    #[arg(long, env = "LOCKSTEP_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the leader-election Lease (one per operator installation).
    #[arg(long, env = "LOCKSTEP_LEASE_NAME", default_value = "lockstep-operator")]
    pub lease_name: String,
    /// Namespace of the Lease (in a Pod: its own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Identity in the Lease (in a Pod: its name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Image relay Deployments run unless an OutboxRelay names one. Defaults to this operator's
    /// own version, never a moving tag: an operator upgrade says what its relays run.
    #[arg(long, env = "LOCKSTEP_RELAY_IMAGE", default_value = concat!("ghcr.io/lockstep-dev/lockstep:", env!("CARGO_PKG_VERSION")))]
    pub relay_image: String,
    /// Image repositories an OutboxRelay's spec.relay.image may name, comma-separated (an entry
    /// ending in '/' allows every repository under it). Empty: the repository of --relay-image.
    #[arg(long, env = "LOCKSTEP_RELAY_IMAGE_PREFIXES", value_delimiter = ',')]
    pub relay_image_prefixes: Vec<String>,
    /// Connections the operator opens at most to each database (per database URL), shared by
    /// the reconciles and purge loops of every resource pointing at it.
    #[arg(long, env = "LOCKSTEP_DB_POOL_SIZE", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub db_pool_size: u32,
    /// Refreshes (reconciles of objects whose status already shows their spec: the timer, a
    /// finished purge, a Deployment that changed) run at most this many at once; one that finds
    /// no free turn is put off by 1-3 s. Spec changes never wait for them. 0: no limit.
    #[arg(long, env = "LOCKSTEP_REFRESH_CONCURRENCY", default_value_t = 4)]
    pub refresh_concurrency: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CleanupArg {
    Delete,
    MarkPublished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressionArg {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyArg {
    Id,
    Aggregatetype,
    Aggregateid,
    Type,
}

/// The database and the outbox table, as `lockstep relay` and `lockstep replay` take them.
#[derive(Debug, Clone, Args)]
pub struct OutboxArgs {
    /// PostgreSQL URL (postgres://user:pass@host:5432/db). Never logged.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, conflicts_with = "database_url_file")]
    pub database_url: Option<Redacted>,
    /// File holding the PostgreSQL URL (a mounted Secret).
    #[arg(long, env = "DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,
    /// Schema of the outbox and dead-letter tables.
    #[arg(long, env = "LOCKSTEP_SCHEMA", default_value = "public")]
    pub schema: String,
    /// The outbox table; its dead-letter table is `<table>_dead_letter`.
    #[arg(long, env = "LOCKSTEP_TABLE", default_value = "outbox")]
    pub table: String,
}

impl OutboxArgs {
    /// The URL given, or read from the file given.
    pub fn database_url(&self) -> Result<Redacted, RelayConfigError> {
        match (&self.database_url, &self.database_url_file) {
            (Some(u), _) => Ok(u.clone()),
            (None, Some(path)) => Ok(Redacted::new(read_trimmed(path)?)),
            (None, None) => Err(RelayConfigError::NoDatabaseUrl),
        }
    }
}

/// `lockstep replay`: dead-lettered rows back into the outbox.
#[derive(Debug, Clone, Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["id", "all"]))]
pub struct ReplayArgs {
    #[command(flatten)]
    pub outbox: OutboxArgs,
    /// A dead-lettered event to replay (repeatable).
    #[arg(long)]
    pub id: Vec<uuid::Uuid>,
    /// Replay every dead-lettered event.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub outbox: OutboxArgs,
    /// The broker to publish to.
    #[arg(long, env = "LOCKSTEP_BROKER", value_enum, default_value = "kafka")]
    pub broker: BrokerArg,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub amqp: AmqpArgs,
    /// Topic (Kafka), subject (NATS) or routing key (RabbitMQ), or a template over
    /// {aggregatetype}, {aggregateid}, {type}.
    #[arg(long, env = "LOCKSTEP_TOPIC", default_value = "outbox.event.{aggregatetype}")]
    pub topic: String,
    /// Column used as the message key.
    #[arg(long, env = "LOCKSTEP_KEY", value_enum, default_value = "aggregateid")]
    pub key: KeyArg,
    /// Rows read (and sent as one batch) at most per read.
    #[arg(long, env = "LOCKSTEP_BATCH_SIZE", default_value_t = 500)]
    pub batch_size: i32,
    /// How often to look for rows when no NOTIFY woke the relay (e.g. 500ms, 1s, 1m); a notified
    /// row an older open transaction still holds back is looked for again every second.
    #[arg(long, env = "LOCKSTEP_POLL_INTERVAL", default_value = "1s")]
    pub poll_interval: String,
    /// Attempts at a row the broker refuses for itself (too large, invalid) before it is moved to
    /// the dead-letter table. Broker and network failures are retried forever and not counted.
    #[arg(long, env = "LOCKSTEP_MAX_ATTEMPTS", default_value_t = 10)]
    pub max_attempts: i32,
    /// Key-hash buckets: 1, one active relay (the others stand by); more, every relay is active and
    /// owns a share of them, each bucket sent by one relay at a time (docs/relay.md).
    #[arg(long, env = "LOCKSTEP_BUCKETS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub buckets: u16,
    /// The producer's linger.ms: how long it waits to fill a produce request.
    #[arg(long, env = "LOCKSTEP_LINGER_MS", default_value_t = 5)]
    pub linger_ms: u32,
    /// Compression of produce requests.
    #[arg(long, env = "LOCKSTEP_COMPRESSION", value_enum, default_value = "lz4")]
    pub compression: CompressionArg,
    /// What happens to a published row: deleted, or marked published (published_at) and kept for
    /// --published-retention.
    #[arg(long, env = "LOCKSTEP_CLEANUP", value_enum, default_value = "delete")]
    pub cleanup: CleanupArg,
    /// With --cleanup mark-published: how long published rows are kept before they are purged
    /// (e.g. 7d); unset keeps them.
    #[arg(long, env = "LOCKSTEP_PUBLISHED_RETENTION")]
    pub published_retention: Option<String>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "LOCKSTEP_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
    /// Wake on LISTEN/NOTIFY from the outbox trigger (false: poll only, at --poll-interval).
    #[arg(long, env = "LOCKSTEP_LISTEN", default_value_t = true, action = clap::ArgAction::Set)]
    pub listen: bool,
    /// Batches published but not yet acknowledged at once; reading and deleting overlap with them.
    /// Under a steady flow batches are small (rows are read as they commit), so there are many.
    #[arg(long, env = "LOCKSTEP_MAX_BATCHES_IN_FLIGHT", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub max_batches_in_flight: u16,
    /// Under a steady flow, how long a read may wait after the previous one, at most, to take the
    /// rows committed meanwhile in one batch (fewer statements on the database the writers use,
    /// fewer produce requests). The wait adapts to the flow (see `relay::gather`); a row after
    /// a quiet spell is read at once. 0s: read again as soon as there may be rows.
    #[arg(long, env = "LOCKSTEP_MAX_GATHER", default_value = "20ms", value_parser = parse_gather)]
    pub max_gather: std::time::Duration,
    /// Create or migrate the outbox and dead-letter tables (false: only verify them).
    #[arg(long, env = "LOCKSTEP_MANAGE_SCHEMA", default_value_t = true, action = clap::ArgAction::Set)]
    pub manage_schema: bool,
    #[command(flatten)]
    pub message_headers: headers::HeaderArgs,
}

/// --max-gather: a duration of at most a second (a longer wait is polling, --poll-interval's job).
fn parse_gather(s: &str) -> Result<std::time::Duration, String> {
    let d = crate::core::duration::parse(s)?;
    if d > std::time::Duration::from_secs(1) {
        return Err(format!("{s:?} is longer than 1s"));
    }
    Ok(d)
}

/// The relay's resolved configuration.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub database_url: Redacted,
    pub bootstrap_servers: String,
    /// librdkafka settings from --kafka-config and --kafka-config-dir (may hold credentials).
    pub kafka_config: BTreeMap<String, Redacted>,
    /// Set: the relay publishes to NATS JetStream, not Kafka.
    pub nats: Option<crate::core::nats_settings::NatsSettings>,
    /// Set: the relay publishes to RabbitMQ, not Kafka.
    pub amqp: Option<crate::core::amqp_settings::AmqpSettings>,
    /// Everything else, validated by the rules an OutboxRelay spec gets.
    pub resolved: ValidOutboxRelay,
    pub metrics_addr: SocketAddr,
    pub listen: bool,
    pub max_batches_in_flight: usize,
}

impl RelayArgs {
    /// Read secrets from files, then validate with the same rules an OutboxRelay spec gets.
    pub fn resolve(&self) -> Result<RelayConfig, RelayConfigError> {
        let database_url = self.outbox.database_url()?;
        let (bootstrap_servers, nats, amqp) = match self.broker {
            BrokerArg::Kafka => {
                let servers = self.kafka.bootstrap_servers.clone().filter(|s| !s.trim().is_empty());
                (servers.ok_or(RelayConfigError::NoBootstrapServers)?, None, None)
            }
            BrokerArg::Nats => {
                let n = self.nats.settings()?;
                // The spec's server list, validated as such; the relay connects by `nats`.
                let hosts: Result<Vec<String>, String> = n.servers.iter().map(|s| server_host_port(s)).collect();
                (hosts.map_err(RelayConfigError::Nats)?.join(","), Some(n), None)
            }
            BrokerArg::Rabbitmq => {
                let a = self.amqp.settings()?;
                let host = crate::core::amqp_settings::server_host_port(&a.url).map_err(RelayConfigError::Amqp)?;
                (host, None, Some(a))
            }
        };
        let kafka_config = self.kafka.settings()?;
        let resolved = self
            .as_spec(&bootstrap_servers, &kafka_config)
            .validate()
            .map_err(RelayConfigError::Invalid)?;
        Ok(RelayConfig {
            database_url,
            bootstrap_servers,
            kafka_config,
            nats,
            amqp,
            resolved,
            metrics_addr: self.metrics_addr,
            listen: self.listen,
            max_batches_in_flight: usize::from(self.max_batches_in_flight),
        })
    }

    /// The flags as an OutboxRelay spec, so that validating it resolves them.
    fn as_spec(&self, bootstrap_servers: &str, kafka_config: &BTreeMap<String, Redacted>) -> OutboxRelaySpec {
        OutboxRelaySpec {
            database: DatabaseSpec {
                url_secret_ref: SecretKeyRef {
                    name: "cli".into(),
                    key: "url".into(),
                },
                schema: self.outbox.schema.clone(),
                table: self.outbox.table.clone(),
                manage_schema: self.manage_schema,
            },
            broker: Default::default(),
            nats: None,
            rabbitmq: None,
            kafka: Some(KafkaSpec {
                bootstrap_servers: bootstrap_servers.to_owned(),
                auth_secret_ref: None,
                producer: ProducerSpec {
                    linger_ms: self.linger_ms,
                    compression: match self.compression {
                        CompressionArg::None => Compression::None,
                        CompressionArg::Gzip => Compression::Gzip,
                        CompressionArg::Snappy => Compression::Snappy,
                        CompressionArg::Lz4 => Compression::Lz4,
                        CompressionArg::Zstd => Compression::Zstd,
                    },
                    config: kafka_config.iter().map(|(k, v)| (k.clone(), v.expose().to_owned())).collect(),
                },
            }),
            routing: RoutingSpec {
                topic: self.topic.clone(),
                key: match self.key {
                    KeyArg::Id => OutboxColumn::Id,
                    KeyArg::Aggregatetype => OutboxColumn::Aggregatetype,
                    KeyArg::Aggregateid => OutboxColumn::Aggregateid,
                    KeyArg::Type => OutboxColumn::Type,
                },
            },
            topics: vec![],
            relay: RelaySpec {
                replicas: 1,
                batch_size: self.batch_size,
                poll_interval: Duration::new(self.poll_interval.clone()),
                max_gather: Duration::new(crate::core::duration::format(self.max_gather)),
                max_attempts: self.max_attempts,
                buckets: i32::from(self.buckets),
                cleanup: match self.cleanup {
                    CleanupArg::Delete => Cleanup::Delete,
                    CleanupArg::MarkPublished => Cleanup::MarkPublished,
                },
                published_retention: self.published_retention.clone().map(Duration::new),
                ..self.message_headers.relay_spec()
            },
            lag: LagSpec::default(),
            deletion_policy: Default::default(),
        }
    }
}

pub(crate) fn read_trimmed(path: &std::path::Path) -> Result<String, RelayConfigError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
        .map_err(|source| RelayConfigError::Read {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_never_prints() {
        let r = Redacted::new("postgres://u:hunter2@db/x");
        assert!(!format!("{r:?} {r}").contains("hunter2"));
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: RelayArgs,
    }

    fn resolve(extra: &[&str]) -> Result<RelayConfig, RelayConfigError> {
        use clap::Parser;
        let mut argv = vec!["relay", "--database-url", "postgres://u:p@db/x", "--bootstrap-servers", "k:9092"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().args.resolve()
    }

    #[test]
    fn flags_resolve_into_the_validated_config() {
        let cfg = resolve(&[
            "--schema",
            "billing",
            "--batch-size",
            "7",
            "--max-attempts",
            "3",
            "--poll-interval",
            "250ms",
            "--cleanup",
            "mark-published",
            "--published-retention",
            "1d",
            "--kafka-config",
            "client.id=x",
            "--manage-schema",
            "false",
        ])
        .unwrap();
        let r = &cfg.resolved;
        assert_eq!(r.table.to_string(), r#""billing"."outbox""#);
        assert_eq!(r.dead_letter_table.to_string(), r#""billing"."outbox_dead_letter""#);
        assert_eq!((r.batch_size, r.max_attempts, r.replicas), (7, 3, 1));
        assert_eq!(r.poll_interval, std::time::Duration::from_millis(250));
        assert_eq!(
            (r.cleanup, r.published_retention),
            (Cleanup::MarkPublished, Some(std::time::Duration::from_secs(86400)))
        );
        assert!(!r.manage_schema);
        assert_eq!(r.producer.config.get("client.id").map(String::as_str), Some("x"));
        assert_eq!((r.producer.linger_ms, r.producer.compression), (5, Compression::Lz4));
        assert_eq!(r.key, OutboxColumn::Aggregateid);
        assert!(resolve(&[]).unwrap().resolved.manage_schema);
    }

    #[test]
    fn invalid_flags_are_named() {
        let e = resolve(&["--batch-size", "0"]).unwrap_err().to_string();
        assert!(e.contains("--batch-size"), "{e}");
    }

    #[test]
    fn key_value_parser() {
        assert_eq!(parse_key_value("a.b=c=d").unwrap(), ("a.b".into(), "c=d".into()));
        assert!(parse_key_value("novalue").is_err());
        assert!(parse_key_value("=x").is_err());
    }
}
