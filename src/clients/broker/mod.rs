//! The seam between the relay and a broker: publish a batch with one acknowledgement per message,
//! keep each key's order, and say why a message was not published. Kafka (`kafka`), NATS
//! JetStream (`nats`) and RabbitMQ (`amqp`) sit behind it; the relay's pipeline names none.
//!
//! Per-key order is the publisher's promise: a key's message is never stored past an earlier one
//! of the same batch that failed. Kafka keeps it with its idempotent, gapless producer (a
//! rejection fails every later message of the partition); NATS and RabbitMQ publish a key's next
//! message only once the previous one was acknowledged (confirmed).

pub mod amqp;
pub mod chain;
pub mod kafka;
pub mod nats;

use std::{
    borrow::Cow,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use futures::future::BoxFuture;

/// Why a message was not published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The message itself, and no retry can fix it (over the size limit, a destination name that
    /// cannot exist, a routing template the row cannot fill): dead-lettered at once.
    Poison,
    /// The message itself, rejected by the broker: retried, and dead-lettered after maxAttempts.
    Rejected,
    /// The broker refused the message's timestamp (outside Kafka's `log.message.timestamp.*`
    /// bounds, tighter than [`crate::core::stamp::MAX_STAMP_AGE_MS`]): sent again stamped with the
    /// publish time, not counted. A row already stamped so is `Transport` (the clocks differ).
    Timestamp,
    /// The publisher failed the message for another's sake: it went fatal (Kafka's gapless
    /// producer after an earlier rejection), was purged to be rebuilt, or an earlier message of
    /// the key failed (NATS). Read again behind the key's earlier rows; not counted, no wait.
    Released,
    /// The broker or the network (timeouts, a missing topic or stream, leader moves, not enough
    /// replicas, brokers down, a closed connection): retried until it works; never counted toward
    /// maxAttempts, never dead-lettered. A missing topic or a slow broker is not a poison message.
    Transport,
}

/// A message the publisher refused or the broker did not acknowledge.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub cause: Cause,
    /// What the broker or client said (never a credential: clients are given none in messages).
    pub error: String,
    /// The error's code, as the failures metric labels it.
    pub reason: String,
    /// The publisher's state is unknown after this (Kafka: a message timed out in the idempotent
    /// producer): replace it before sending more.
    pub stale: bool,
}

impl Refusal {
    pub fn new(cause: Cause, error: impl Into<String>, reason: impl Into<String>) -> Self {
        Refusal {
            cause,
            error: error.into(),
            reason: reason.into(),
            stale: false,
        }
    }

    /// The publisher went away before it said what became of the message.
    pub fn lost() -> Self {
        Refusal::new(Cause::Transport, "delivery report lost (publisher closed)", "Lost")
    }

    /// Not sent: an earlier message of its key in the same batch failed.
    pub fn behind_failed() -> Self {
        Refusal::new(Cause::Released, "an earlier message of its key failed", "Released")
    }
}

/// What the broker said of a message it stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Acked {
    /// The broker had it already and dropped this copy (NATS: the same `Nats-Msg-Id` within the
    /// stream's duplicate_window).
    pub duplicate: bool,
}

/// One message as the relay hands it over.
pub struct Outgoing<'a> {
    /// The topic (Kafka), subject (NATS) or routing key (RabbitMQ).
    pub destination: &'a str,
    pub key: &'a str,
    /// The event id: NATS's `Nats-Msg-Id`, so the stream drops a resend within its window.
    pub id: uuid::Uuid,
    pub payload: Option<&'a [u8]>,
    pub headers: &'a [(Cow<'a, str>, Cow<'a, str>)],
    /// Milliseconds since the epoch: Kafka's record timestamp; a header on NATS.
    pub timestamp_ms: i64,
}

/// How to build a publisher, kept to rebuild one.
#[derive(Clone, Debug)]
pub enum Settings {
    Kafka(rdkafka::ClientConfig),
    Nats(nats::NatsSettings),
    Amqp(amqp::AmqpSettings),
}

/// A broker's publisher. Clones share it.
#[derive(Clone)]
pub enum Publisher {
    Kafka(kafka::KafkaPublisher),
    Nats(nats::NatsPublisher),
    Amqp(amqp::AmqpPublisher),
}

impl Publisher {
    /// A publisher; Kafka's checks its settings here, NATS and RabbitMQ connect at the first send.
    pub fn create(settings: &Settings) -> Result<Publisher, String> {
        Ok(match settings {
            Settings::Kafka(c) => Publisher::Kafka(kafka::KafkaPublisher::create(c)?),
            Settings::Nats(s) => Publisher::Nats(nats::NatsPublisher::new(s.clone())),
            Settings::Amqp(s) => Publisher::Amqp(amqp::AmqpPublisher::new(s.clone())),
        })
    }

    /// A batch's sender: per-key order holds within it and across the batches in flight.
    pub fn batch(&self) -> Batch<'_> {
        match self {
            Publisher::Kafka(k) => Batch::Kafka(k),
            Publisher::Nats(n) => Batch::Nats(Box::new(n.batch())),
            Publisher::Amqp(a) => Batch::Amqp(Box::new(a.batch())),
        }
    }

    /// The relay completed batch `id` (`Batch::id`) of these keys: what became of each message is
    /// known, and the relay's gate holds a failed key back from now on.
    pub fn completed<'k>(&self, id: u64, keys: impl IntoIterator<Item = &'k str>) {
        match self {
            Publisher::Kafka(_) => {}
            Publisher::Nats(n) => n.completed(id, keys),
            Publisher::Amqp(a) => a.completed(id, keys),
        }
    }

    /// The relay gave up the batches in flight and will read their rows again.
    pub fn forget(&self) {
        match self {
            Publisher::Kafka(_) => {}
            Publisher::Nats(n) => n.forget(),
            Publisher::Amqp(a) => a.forget(),
        }
    }

    /// Why every later send would fail, when it would: replace the publisher.
    pub fn fatal(&self) -> Option<String> {
        match self {
            Publisher::Kafka(k) => k.fatal(),
            Publisher::Nats(n) => n.fatal(),
            Publisher::Amqp(a) => a.fatal(),
        }
    }

    /// Make sure nothing this publisher still holds reaches the broker later: Kafka's queue is
    /// purged (its reports come at once), NATS's and RabbitMQ's connection closed without
    /// reconnecting.
    pub async fn purge(&self) {
        match self {
            Publisher::Kafka(k) => k.purge().await,
            Publisher::Nats(n) => n.purge().await,
            Publisher::Amqp(a) => a.purge().await,
        }
    }

    /// Messages handed over and not yet acknowledged or failed.
    pub fn in_flight(&self) -> usize {
        match self {
            Publisher::Kafka(k) => k.in_flight(),
            Publisher::Nats(n) => n.in_flight(),
            Publisher::Amqp(a) => a.in_flight(),
        }
    }

    /// Whether the broker answers (readiness).
    pub async fn reachable(&self) -> bool {
        match self {
            Publisher::Kafka(k) => k.reachable().await,
            Publisher::Nats(n) => n.reachable().await,
            Publisher::Amqp(a) => a.reachable().await,
        }
    }

    /// Wait up to `timeout` for what was handed over (a relay that stops).
    pub async fn flush(&self, timeout: std::time::Duration) {
        match self {
            Publisher::Kafka(k) => k.flush(timeout).await,
            Publisher::Nats(n) => n.flush(timeout).await,
            Publisher::Amqp(a) => a.flush(timeout).await,
        }
    }
}

/// Sends one batch's messages.
pub enum Batch<'a> {
    Kafka(&'a kafka::KafkaPublisher),
    // Boxed: a batch, not a message, pays for it.
    Nats(Box<nats::NatsBatch<'a>>),
    Amqp(Box<amqp::AmqpBatch<'a>>),
}

impl Batch<'_> {
    /// The batch's number, for `Publisher::completed` (Kafka's are all 0: it keeps no chain).
    pub fn id(&self) -> u64 {
        match self {
            Batch::Kafka(_) => 0,
            Batch::Nats(n) => n.id(),
            Batch::Amqp(a) => a.id(),
        }
    }

    /// Hand a message over, waiting while the publisher's queue is full. A refusal here means the
    /// publisher never had it.
    pub async fn send(&mut self, m: &Outgoing<'_>) -> Result<Ack, Refusal> {
        match self {
            Batch::Kafka(k) => k.send(m).await.map(Ack::Kafka),
            Batch::Nats(n) => n.send(m).await.map(Ack::Other),
            Batch::Amqp(a) => a.send(m).await.map(Ack::Other),
        }
    }
}

/// A message's acknowledgement, or why it did not come.
pub enum Ack {
    /// Kafka's delivery future as it is: a box per message would cost the hot path.
    Kafka(rdkafka::producer::DeliveryFuture),
    Other(BoxFuture<'static, Result<Acked, Refusal>>),
}

impl Future for Ack {
    type Output = Result<Acked, Refusal>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Ack::Kafka(f) => Pin::new(f).poll(cx).map(|r| match r {
                Ok(Ok(_)) => Ok(Acked::default()),
                Ok(Err((e, _))) => Err(kafka::refusal(&e)),
                Err(_) => Err(Refusal::lost()),
            }),
            Ack::Other(f) => f.as_mut().poll(cx),
        }
    }
}
