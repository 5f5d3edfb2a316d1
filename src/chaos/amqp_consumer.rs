//! The chaos run on RabbitMQ: a direct exchange, and the run's quorum queue bound to it with
//! single-active-consumer, so one consumer process receives at a time and the other takes over
//! when it dies. Prefetch 1 and an ack only after the effect committed: a process killed before
//! its ack leaves the message to be delivered again, ahead of the later ones (a quorum queue
//! delivers returned messages first), so each key's first applications stay in order.

use futures::StreamExt;
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    Connection, ConnectionProperties, ExchangeKind,
};

use super::consumer::{Applier, ConsumeArgs};
use crate::inbox::Delivery;

/// The exchange the run's relays publish to (`LOCKSTEP_AMQP_EXCHANGE`).
pub const EXCHANGE: &str = "lockstep.chaos";

/// A connection to `url` (no credentials in it) as the relay's: the user and password from
/// AMQP_USER and AMQP_PASSWORD_FILE when set. Errors name neither.
pub async fn connect(url: &str) -> anyhow::Result<Connection> {
    let mut uri: lapin::uri::AMQPUri = url.parse().map_err(|e: String| anyhow::anyhow!("AMQP_URL: {e}"))?;
    if let (Ok(user), Ok(file)) = (std::env::var("AMQP_USER"), std::env::var("AMQP_PASSWORD_FILE")) {
        let password = std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("AMQP_PASSWORD_FILE: {e}"))?;
        uri.authority.userinfo = lapin::uri::AMQPUserInfo {
            username: user,
            password: password.trim().to_owned(),
        };
    }
    Ok(Connection::connect_uri(uri, ConnectionProperties::default()).await?)
}

/// The exchange, the run's queue (named as its routing key) and their binding.
pub(super) async fn declare(url: &str, queue: &str) -> anyhow::Result<()> {
    let c = connect(url).await?;
    let ch = c.create_channel().await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(EXCHANGE.into(), ExchangeKind::Direct, durable, FieldTable::default())
        .await?;
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    ch.queue_declare(queue.into(), QueueDeclareOptions::durable(), args).await?;
    ch.queue_bind(
        queue.into(),
        EXCHANGE.into(),
        queue.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let _ = c.close(200, "declared".into()).await;
    Ok(())
}

/// Until the connection or the database fails: apply each delivery, then ack it. The process
/// then exits (a dropped lapin connection stays open, holding its unacked message and the
/// queue's single active consumer) and the run starts it again.
pub(super) async fn run(args: &ConsumeArgs, applier: &Applier) -> anyhow::Result<()> {
    let c = connect(&args.amqp_url).await?;
    let ch = c.create_channel().await?;
    ch.basic_qos(1, BasicQosOptions::default()).await?;
    let mut deliveries = ch
        .basic_consume(
            args.topic.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while let Some(d) = deliveries.next().await {
        let d = d?;
        let Some(delivery) = Delivery::from_amqp(&d) else {
            anyhow::bail!("a message on {} has no id", args.topic);
        };
        applier.apply(&delivery, &d.data).await?;
        // A lost ack is a redelivery the inbox drops.
        if let Err(e) = d.ack(BasicAckOptions::default()).await {
            tracing::warn!(error = %e, "ack");
        }
    }
    anyhow::bail!("the consumer was cancelled")
}
