//! Read-only questions to RabbitMQ over AMQP, for `lockstep doctor`: can the relay's settings
//! connect and open a channel in confirm mode, and do an exchange and queues exist (a passive
//! declare: it creates nothing, and tells a queue's ready messages and consumers; RabbitMQ checks
//! no permission on it, so it cannot tell what the user may do). Each step has a deadline.

use lapin::{
    options::{ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::FieldTable,
    Connection, ErrorKind, ExchangeKind,
};

use super::broker::amqp::{open, AmqpSettings, CONNECT_TIMEOUT};

/// What the connection negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub vhost: String,
    pub frame_max: u32,
    pub channel_max: u16,
    pub heartbeat: u16,
}

/// An exchange or a queue, as a passive declare finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A queue's ready messages and consumers (0 and 0 for an exchange).
    Present {
        messages: u32,
        consumers: u32,
    },
    Absent,
    Failed(String),
}

pub struct AmqpProbe {
    connection: Connection,
}

/// The vhost an `amqp://` URL names, as lapin reads it ("/" when none is given).
pub fn vhost_of(url: &str) -> Result<String, String> {
    let uri: lapin::uri::AMQPUri = url.parse()?;
    Ok(uri.vhost)
}

impl AmqpProbe {
    /// Connect as the relay does and open a channel in confirm mode, as it does.
    pub async fn connect(s: &AmqpSettings) -> Result<(AmqpProbe, Negotiated), String> {
        let connection = open(s).await?;
        let channel = async {
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| format!("cannot open a channel: {e}"))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| format!("the channel refused publisher confirms: {e}"))?;
            let _ = channel.close(200, "checked".into()).await;
            Ok::<_, String>(())
        };
        within(channel).await.and_then(|r| r)?;
        let c = connection.configuration();
        let negotiated = Negotiated {
            vhost: vhost_of(&s.url)?,
            frame_max: c.frame_max(),
            channel_max: c.channel_max(),
            heartbeat: c.heartbeat(),
        };
        Ok((AmqpProbe { connection }, negotiated))
    }

    pub async fn exchange(&self, name: &str) -> Found {
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declare = async {
            let ch = self.connection.create_channel().await?;
            ch.exchange_declare(name.into(), ExchangeKind::Direct, passive, FieldTable::default())
                .await?;
            let _ = ch.close(200, "checked".into()).await;
            Ok((0, 0))
        };
        within(declare).await.map_or_else(Found::Failed, found)
    }

    pub async fn queue(&self, name: &str) -> Found {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declare = async {
            let ch = self.connection.create_channel().await?;
            let q = ch.queue_declare(name.into(), passive, FieldTable::default()).await?;
            let _ = ch.close(200, "checked".into()).await;
            Ok((q.message_count(), q.consumer_count()))
        };
        within(declare).await.map_or_else(Found::Failed, found)
    }

    pub async fn close(self) {
        let _ = self.connection.close(200, "checked".into()).await;
    }
}

/// `f`'s result, unless it takes longer than the relay's connect timeout.
async fn within<T>(f: impl std::future::Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(CONNECT_TIMEOUT, f)
        .await
        .map_err(|_| format!("no answer within {CONNECT_TIMEOUT:?}"))
}

/// A passive declare's answer. A refusal closes its channel: each declare has its own.
fn found(r: Result<(u32, u32), lapin::Error>) -> Found {
    match r {
        Ok((messages, consumers)) => Found::Present { messages, consumers },
        Err(e) => match e.kind() {
            ErrorKind::ProtocolError(p) => match p.kind() {
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => Found::Absent,
                _ => Found::Failed(e.to_string()),
            },
            _ => Found::Failed(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vhost_is_read_from_the_url() {
        assert_eq!(vhost_of("amqp://r:5672/%2f").unwrap(), "/");
        assert_eq!(vhost_of("amqp://r:5672/billing").unwrap(), "billing");
        assert_eq!(vhost_of("amqp://r:5672").unwrap(), "/");
    }
}
