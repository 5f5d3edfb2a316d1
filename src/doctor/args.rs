//! `lockstep doctor`'s flags: the database and Kafka flags of `lockstep relay` under the same
//! names (and environment variables), so the settings a relay or an InboxTable uses are passed as
//! they are; plus what to check them for.

use std::collections::BTreeMap;

use clap::{Args, ValueEnum};

use super::database::{Target, TargetKind};
use crate::{
    config::{AmqpArgs, BrokerArg, KafkaArgs, NatsArgs, OutboxArgs},
    core::redacted::Redacted,
    core::sql::{Ident, QualifiedName},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    /// The outbox of an OutboxRelay (`--table`) and its dead-letter table (`<table>_dead_letter`).
    OutboxRelay,
    /// An InboxTable's table (`--table`).
    InboxTable,
}

#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    /// --database-url, --database-url-file, --schema, --table as `lockstep relay` takes them.
    #[command(flatten)]
    pub outbox: OutboxArgs,
    /// What the table is for: it decides the privileges checked.
    #[arg(long = "for", value_enum, default_value = "outbox-relay")]
    pub kind: KindArg,
    /// Check for manageSchema true (lockstep creates and migrates the tables) or false (they
    /// exist already; lockstep only verifies and uses them).
    #[arg(long, env = "LOCKSTEP_MANAGE_SCHEMA", default_value_t = true, action = clap::ArgAction::Set)]
    pub manage_schema: bool,
    /// Relay replicas that will connect (an OutboxRelay's spec.relay.replicas), for the
    /// connection headroom: each holds up to 4 connections, the operator's pool 4 more.
    #[arg(long, default_value_t = 2)]
    pub relay_replicas: u32,
    /// The broker the relay publishes to, or the InboxTable's source.
    #[arg(long, env = "LOCKSTEP_BROKER", value_enum, default_value = "kafka")]
    pub broker: BrokerArg,
    // The broker, as the relay reaches it (without bootstrap servers Kafka is not checked).
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub amqp: AmqpArgs,
    /// A RabbitMQ queue lockstep declares or reads (repeatable): an OutboxRelay's
    /// spec.rabbitmq.queues[].name, or an InboxTable's spec.sources.rabbitmq.queues.
    #[arg(long = "queue", value_name = "QUEUE")]
    pub queues: Vec<String>,
    /// The RabbitMQ management API (spec.rabbitmq.managementUrl), reached with the AMQP user and
    /// password: the server's version, its resource alarms, and each queue's settings.
    #[arg(long, env = "RABBITMQ_MANAGEMENT_URL")]
    pub rabbitmq_management_url: Option<String>,
    /// A NATS stream lockstep declares or reads (repeatable): an OutboxRelay's
    /// spec.nats.streams[].name, or an InboxTable's spec.sources.nats.streams.
    #[arg(long = "stream", value_name = "STREAM")]
    pub streams: Vec<String>,
    /// An InboxTable's JetStream consumer (spec.sources.nats.consumer): its backlog must be readable.
    #[arg(long)]
    pub consumer: Option<String>,
    /// A topic lockstep publishes to or creates (repeatable): an OutboxRelay's spec.topics, or
    /// the topics its routing template produces.
    #[arg(long = "topic", value_name = "TOPIC")]
    pub topics: Vec<String>,
    /// An InboxTable's consumer group (spec.sources.consumerGroup): its offsets must be readable.
    #[arg(long)]
    pub group: Option<String>,
    /// One line per check (text), or one JSON document (json).
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

/// Kafka settings resolved from the flags.
#[derive(Debug, Clone)]
pub struct BrokerTarget {
    pub bootstrap: String,
    /// librdkafka settings (may hold credentials: never printed).
    pub settings: BTreeMap<String, String>,
    pub topics: Vec<String>,
    pub group: Option<String>,
    pub kind: TargetKind,
}

/// What `run` checks, resolved from the flags.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub database: DatabaseTarget,
    pub broker: Option<BrokerTarget>,
    /// With `--broker nats`, in place of `broker`.
    pub nats: Option<super::nats::NatsTarget>,
    /// With `--broker rabbitmq`, in place of `broker`.
    pub rabbitmq: Option<super::rabbitmq::RabbitTarget>,
}

#[derive(Debug, Clone)]
pub struct DatabaseTarget {
    pub url: Redacted,
    pub target: Target,
    /// Connections lockstep will hold on this database at most.
    pub connections: u32,
}

/// The connections the operator's pool holds per database URL (`operator::run`'s `Pools`).
pub const OPERATOR_POOL: u32 = 4;
/// The connections one relay holds: its lock session and a pool of 3 (LISTEN, measurements,
/// the MarkPublished purge; `relay::run`).
pub const PER_RELAY: u32 = 4;

impl DoctorArgs {
    /// Everything needed to run; Err is exit code 2 (the checks cannot run).
    pub fn resolve(&self) -> Result<Resolved, String> {
        let url = self.outbox.database_url().map_err(|e| e.to_string())?;
        if crate::clients::db::parse_database_url(url.expose()).is_none() {
            return Err("the database URL does not parse as a postgres:// URL (its text is not shown)".into());
        }
        let schema = Ident::parse(&self.outbox.schema).map_err(|e| format!("--schema: {e}"))?;
        let ident = |t: &str| Ident::parse(t).map_err(|e| format!("--table: {e}"));
        let table = QualifiedName {
            schema: schema.clone(),
            table: ident(&self.outbox.table)?,
        };
        let (kind, dead_letter, relays) = match self.kind {
            KindArg::OutboxRelay => {
                let dl = ident(&format!("{}{}", self.outbox.table, crate::crd::DEAD_LETTER_SUFFIX))?;
                let dead_letter = QualifiedName { schema, table: dl };
                (TargetKind::OutboxRelay, Some(dead_letter), self.relay_replicas)
            }
            KindArg::InboxTable => (TargetKind::InboxTable, None, 0),
        };
        let target = Target {
            kind,
            table,
            dead_letter,
            manage: self.manage_schema,
        };
        let rabbitmq = self.rabbitmq(kind)?;
        let (broker, nats) = self.brokers(kind)?;
        Ok(Resolved {
            database: DatabaseTarget {
                url,
                target,
                connections: OPERATOR_POOL + relays * PER_RELAY,
            },
            broker,
            nats,
            rabbitmq,
        })
    }

    /// The RabbitMQ target, with `--broker rabbitmq`.
    fn rabbitmq(&self, kind: TargetKind) -> Result<Option<super::rabbitmq::RabbitTarget>, String> {
        if self.broker != BrokerArg::Rabbitmq {
            return Ok(None);
        }
        let amqp = self.amqp.settings().map_err(|e| e.to_string())?;
        let management = match self.rabbitmq_management_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
            None => None,
            Some(url) => {
                crate::crd::management_url_problem(url).map_err(|e| format!("--rabbitmq-management-url: {e}"))?;
                let tls_ca = match &amqp.tls_ca {
                    Some(f) => Some(std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?),
                    None => None,
                };
                Some(crate::clients::rabbitmq_admin::ManagementSettings {
                    url: url.to_owned(),
                    vhost: crate::clients::amqp_probe::vhost_of(&amqp.url)?,
                    auth: amqp.auth.clone(),
                    tls_ca,
                })
            }
        };
        Ok(Some(super::rabbitmq::RabbitTarget {
            amqp,
            management,
            queues: self.queues.clone(),
            kind,
        }))
    }

    /// The Kafka or NATS target the flags name (Kafka: none without bootstrap servers).
    fn brokers(&self, kind: TargetKind) -> Result<(Option<BrokerTarget>, Option<super::nats::NatsTarget>), String> {
        if self.broker == BrokerArg::Nats {
            let settings = self.nats.settings().map_err(|e| e.to_string())?;
            let nats = super::nats::NatsTarget {
                settings,
                streams: self.streams.clone(),
                consumer: self.consumer.clone(),
                kind,
            };
            return Ok((None, Some(nats)));
        }
        if self.broker == BrokerArg::Rabbitmq {
            return Ok((None, None)); // self.rabbitmq
        }
        let Some(bootstrap) = self.kafka.bootstrap_servers.as_deref().map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok((None, None));
        };
        let settings = self.kafka.settings().map_err(|e| e.to_string())?;
        let broker = BrokerTarget {
            bootstrap: bootstrap.to_owned(),
            settings: settings.into_iter().map(|(k, v)| (k, v.expose().to_owned())).collect(),
            topics: self.topics.clone(),
            group: self.group.clone(),
            kind,
        };
        Ok((Some(broker), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: DoctorArgs,
    }

    fn resolve(argv: &[&str]) -> Result<Resolved, String> {
        use clap::Parser;
        let mut all = vec!["doctor"];
        all.extend_from_slice(argv);
        Cli::try_parse_from(all).unwrap().args.resolve()
    }

    #[test]
    fn outbox_relay_checks_the_dead_letter_table_and_counts_relay_connections() {
        let r = resolve(&[
            "--database-url",
            "postgres://u:p@db/x",
            "--schema",
            "billing",
            "--relay-replicas",
            "3",
            // Set as flags: the test environment exports KAFKA_BOOTSTRAP_SERVERS.
            "--bootstrap-servers",
            "",
            "--manage-schema",
            "true",
        ])
        .unwrap();
        let t = &r.database.target;
        assert_eq!(t.table.to_string(), r#""billing"."outbox""#);
        assert_eq!(t.dead_letter.as_ref().unwrap().to_string(), r#""billing"."outbox_dead_letter""#);
        assert_eq!(r.database.connections, 4 + 3 * 4);
        assert!(t.manage && r.broker.is_none());
    }

    #[test]
    fn inbox_table_has_no_relays_and_no_dead_letter_table() {
        let r = resolve(&[
            "--database-url",
            "postgres://u:p@db/x",
            "--for",
            "inbox-table",
            "--table",
            "inbox",
            "--manage-schema",
            "false",
            "--bootstrap-servers",
            "k:9092",
            "--group",
            "billing",
            "--kafka-config",
            "sasl.password=hunter2",
        ])
        .unwrap();
        assert_eq!((r.database.target.kind, r.database.connections), (TargetKind::InboxTable, 4));
        assert!(r.database.target.dead_letter.is_none() && !r.database.target.manage);
        let b = r.broker.unwrap();
        assert_eq!(
            (b.group.as_deref(), b.settings["sasl.password"].as_str()),
            (Some("billing"), "hunter2")
        );
    }

    #[test]
    fn unusable_settings_cannot_run_and_hide_the_url() {
        let e = resolve(&["--database-url", "u:hunter2@db/x"]).unwrap_err();
        assert!(e.contains("does not parse") && !e.contains("hunter2"), "{e}");
        let e = resolve(&["--database-url", "postgres://db/x", "--table", "bad name"]).unwrap_err();
        assert!(e.starts_with("--table"), "{e}");
    }
}
