//! The chaos run's consumer: a process of its own (so it can be SIGKILLed mid-batch) reading
//! fixed partitions from the group's committed offsets, applying each order's effect through
//! [`Inbox::handle`], committing offsets only after the effects committed, and serving the inbox
//! metrics for the run to scrape.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use futures::FutureExt;
use rdkafka::{
    consumer::{BaseConsumer, CommitMode, Consumer},
    ClientConfig, Message, Offset, TopicPartitionList,
};

use crate::{
    core::sql::{Ident, QualifiedName},
    inbox::{Delivery, HandleError, Inbox, InboxMetrics, Retry},
};

#[derive(clap::Args, Debug, Clone)]
pub struct ConsumeArgs {
    /// PostgreSQL URL of the run's database. Never logged.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// The broker: kafka, nats (one JetStream durable consumer the run's consumers share) or
    /// rabbitmq (one queue with a single active consumer).
    #[arg(long, value_enum, default_value = "kafka")]
    pub broker: crate::config::BrokerArg,
    /// Kafka bootstrap servers, host:port[,host:port...] (with --broker kafka).
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", default_value = "")]
    pub bootstrap_servers: String,
    /// NATS server URL (with --broker nats).
    #[arg(long, env = "NATS_URL", default_value = "")]
    pub nats_url: String,
    /// RabbitMQ URL without credentials (with --broker rabbitmq; AMQP_USER and
    /// AMQP_PASSWORD_FILE give them).
    #[arg(long, env = "AMQP_URL", default_value = "")]
    pub amqp_url: String,
    /// The run's schema (its orders and inbox tables).
    #[arg(long)]
    pub schema: String,
    /// The run's topic.
    #[arg(long)]
    pub topic: String,
    /// The run's consumer group.
    #[arg(long)]
    pub group: String,
    /// The partitions this consumer reads, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub partitions: Vec<i32>,
    /// Where /metrics is served; the bound address is printed on stdout.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub metrics_addr: SocketAddr,
}

/// A pool of the run's database; the URL is never shown (parse errors name no part of it).
pub fn pool(url: &str, connections: u32) -> anyhow::Result<sqlx::PgPool> {
    let options =
        crate::clients::db::parse_database_url(url).ok_or_else(|| anyhow::anyhow!("the database URL does not parse (postgres://...)"))?;
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options))
}

pub async fn run(args: ConsumeArgs) -> anyhow::Result<()> {
    let pool = pool(&args.database_url, 2)?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = InboxMetrics::register(&mut registry);
    let table = QualifiedName {
        schema: Ident::parse(&args.schema)?,
        table: Ident::parse("inbox")?,
    };
    let inbox = Inbox::for_table(table, "chaos").with_metrics(metrics);
    serve(args.metrics_addr, registry).await?;
    // The effect: one row per application, so a second application of an order is visible.
    let effect_sql = format!(
        "insert into {}.effects (order_id, key, n) values ($1, $2, $3)",
        crate::core::sql::quote_ident(&args.schema)
    );
    let applier = Applier { pool, inbox, effect_sql };
    match args.broker {
        crate::config::BrokerArg::Kafka => run_kafka(&args, &applier).await,
        crate::config::BrokerArg::Nats => super::nats_consumer::run(&args, &applier).await,
        crate::config::BrokerArg::Rabbitmq => super::amqp_consumer::run(&args, &applier).await,
    }
}

/// Applies a message's order through the inbox.
pub(super) struct Applier {
    pool: sqlx::PgPool,
    inbox: Inbox,
    effect_sql: String,
}

impl Applier {
    /// Claim the message and apply its order in one transaction; a database away longer than
    /// the handler's retries gets the same message again, never skips it.
    pub(super) async fn apply(&self, d: &Delivery<'_>, payload: &[u8]) -> anyhow::Result<()> {
        let body: serde_json::Value = serde_json::from_slice(payload)?;
        let order = body["order"].as_str().unwrap_or_default().to_owned();
        let key = body["key"].as_str().unwrap_or_default().to_owned();
        let n = body["n"].as_i64().unwrap_or(-1);
        loop {
            let r = self
                .inbox
                .handle(&self.pool, d, Retry::default(), |tx| {
                    // The future may outlive this call's borrows: it owns what it binds.
                    let (sql, order, key) = (self.effect_sql.clone(), order.clone(), key.clone());
                    async move {
                        sqlx::query(&sql).bind(order).bind(key).bind(n).execute(&mut *tx).await?;
                        Ok(())
                    }
                    .boxed()
                })
                .await;
            match r {
                Ok(_) => return Ok(()),
                Err(HandleError::Database { source, .. }) => {
                    tracing::warn!(error = %source, "database unavailable; the message is handled again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => anyhow::bail!("message {}: {e}", d.id),
            }
        }
    }
}

async fn run_kafka(args: &ConsumeArgs, applier: &Applier) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.bootstrap_servers)
        .set("group.id", &args.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.assign(&assignment(&consumer, args)?)?;
    let mut pending: HashMap<i32, i64> = HashMap::new();
    // Offsets are committed every 50 messages and when idle: a kill redelivers up to that many.
    let mut handled = 0u64;
    loop {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            commit(&consumer, &args.topic, &mut pending);
            continue;
        };
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "poll");
                continue;
            }
        };
        let Some(d) = Delivery::from_message(&m) else {
            anyhow::bail!("message at {}:{} has no id header", m.partition(), m.offset());
        };
        applier.apply(&d, m.payload().unwrap_or_default()).await?;
        pending.insert(m.partition(), m.offset() + 1);
        handled += 1;
        if handled.is_multiple_of(50) {
            commit(&consumer, &args.topic, &mut pending);
        }
    }
}

/// The partitions from the group's committed offsets (the beginning where none is committed).
fn assignment(consumer: &BaseConsumer, args: &ConsumeArgs) -> anyhow::Result<TopicPartitionList> {
    let mut want = TopicPartitionList::new();
    for p in &args.partitions {
        want.add_partition(&args.topic, *p);
    }
    let committed = consumer.committed_offsets(want, Duration::from_secs(30))?;
    let mut tpl = TopicPartitionList::new();
    for e in committed.elements() {
        let offset = match e.offset() {
            Offset::Offset(o) => Offset::Offset(o),
            _ => Offset::Beginning,
        };
        tpl.add_partition_offset(&args.topic, e.partition(), offset)?;
    }
    Ok(tpl)
}

/// Commit what was handled; a failed commit is tried again with the next batch.
fn commit(consumer: &BaseConsumer, topic: &str, pending: &mut HashMap<i32, i64>) {
    if pending.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in pending.iter() {
        let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*o));
    }
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => pending.clear(),
        Err(e) => tracing::warn!(error = %e, "offset commit failed; retried with the next batch"),
    }
}

async fn serve(addr: SocketAddr, registry: prometheus_client::registry::Registry) -> anyhow::Result<()> {
    let registry = std::sync::Arc::new(registry);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut out = String::new();
                let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
                out
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("metrics {}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(())
}
