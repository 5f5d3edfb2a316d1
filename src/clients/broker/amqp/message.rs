//! A RabbitMQ message as the relay sends it, and what the broker's answers say about it.

use std::sync::atomic::{AtomicUsize, Ordering};

use lapin::{
    types::{AMQPValue, FieldTable, LongString, ShortString},
    BasicProperties,
};

use super::super::{Cause, Outgoing, Refusal};
use crate::core::amqp_settings::MAX_SHORT_STRING;

/// A message's key: AMQP messages have none of their own (the routing key is the destination).
pub const KEY_HEADER: &str = "lockstep-key";

/// A message as it goes on the wire.
pub(super) struct Wire {
    pub routing_key: ShortString,
    pub payload: Vec<u8>,
    pub properties: BasicProperties,
}

/// A message the broker returned (`mandatory`, no queue bound for its routing key): the broker's
/// topology, not the message, so retried until a queue is there.
pub(super) fn returned(exchange: &str, routing_key: &ShortString, r: &lapin::message::BasicReturnMessage) -> Refusal {
    let exchange = if exchange.is_empty() { "the default exchange" } else { exchange };
    Refusal::new(
        Cause::Transport,
        format!(
            "RabbitMQ returned the message unroutable ({} {}): no queue is bound to {exchange} for routing key {:?}",
            r.reply_code,
            r.reply_text.as_str(),
            routing_key.as_str()
        ),
        "Unroutable",
    )
}

/// What a lapin error says about a message of `size` bytes: over the server's max_message_size
/// (the channel closed, saying so) is the message's fault; anything else is the broker's or the
/// network's.
pub(super) fn refusal(server_limit: &AtomicUsize, e: &lapin::Error, size: usize) -> Refusal {
    let text = e.to_string();
    if let Some(limit) = server_size_limit(&text) {
        server_limit.store(limit, Ordering::Relaxed);
        if size > limit {
            return Refusal::new(
                Cause::Poison,
                format!("message too large: {size} bytes, over the server's max_message_size of {limit} ({text})"),
                "MessageTooLarge",
            );
        }
        // Another message closed the channel: this one only went down with it.
        return Refusal::new(
            Cause::Transport,
            format!("the channel closed for another message: {text}"),
            "ChannelClosed",
        );
    }
    Refusal::new(Cause::Transport, text, "Other")
}

/// The limit in RabbitMQ's refusal of a message over max_message_size ("PRECONDITION_FAILED -
/// message size 2000 is larger than configured max size 1000").
fn server_size_limit(text: &str) -> Option<usize> {
    let (_, rest) = text.split_once("larger than configured max size ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The message as sent: persistent, the event id as `message_id`, the type as `type`, the
/// timestamp in seconds, and the headers (the relay's, the key, `lockstep-created-at` when the
/// relay's do not carry it). Poison when it cannot be sent: a routing key, a header name over
/// 255 bytes, or a message over `limit` bytes.
pub(super) fn wire(m: &Outgoing<'_>, limit: usize) -> Result<Wire, Refusal> {
    let poison = |error: String, reason: &str| Err(Refusal::new(Cause::Poison, error, reason));
    if m.destination.len() > MAX_SHORT_STRING {
        return poison(
            format!(
                "routing: routing key of {} bytes, over AMQP's 255 ({:.40}...)",
                m.destination.len(),
                m.destination
            ),
            "InvalidRoutingKey",
        );
    }
    let mut headers = FieldTable::default();
    let mut size = m.payload.map_or(0, <[u8]>::len) + m.key.len();
    let text = |v: &str| AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()));
    headers.insert(KEY_HEADER.into(), text(m.key));
    let stamp = crate::core::stamp::CREATED_AT_HEADER;
    let mut event_type = None;
    for (k, v) in m.headers {
        if k.is_empty() || k.len() > MAX_SHORT_STRING {
            return poison(
                format!("header name of {} bytes cannot be sent over AMQP (1 to 255)", k.len()),
                "InvalidHeader",
            );
        }
        if k == crate::core::event_headers::TYPE {
            event_type = Some(v.as_ref());
        }
        size += k.len() + v.len();
        headers.insert(k.as_ref().into(), text(v));
    }
    if !m.headers.iter().any(|(k, _)| k == stamp) {
        headers.insert(stamp.into(), text(&m.timestamp_ms.to_string()));
    }
    if size > limit {
        return poison(
            format!("message too large: {size} bytes of payload and headers, over the limit of {limit} (--amqp-max-message-bytes or the server's max_message_size)"),
            "MessageTooLarge",
        );
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(m.id.to_string().into())
        .with_timestamp(u64::try_from(m.timestamp_ms / 1000).unwrap_or(0))
        .with_headers(headers);
    if let Some(t) = event_type.filter(|t| t.len() <= MAX_SHORT_STRING) {
        properties = properties.with_type(t.into());
    }
    Ok(Wire {
        routing_key: m.destination.into(),
        payload: m.payload.unwrap_or_default().to_vec(),
        properties,
    })
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    fn outgoing<'a>(destination: &'a str, headers: &'a [(Cow<'a, str>, Cow<'a, str>)], payload: &'a [u8]) -> Outgoing<'a> {
        Outgoing {
            destination,
            key: "k",
            id: uuid::Uuid::nil(),
            payload: Some(payload),
            headers,
            timestamp_ms: 7_000,
        }
    }

    #[test]
    fn a_message_carries_its_id_type_key_and_stamp() {
        let h = [(Cow::from("type"), Cow::from("created")), (Cow::from("source"), Cow::from("test"))];
        let w = wire(&outgoing("orders", &h, b"{}"), 1000).unwrap();
        let p = &w.properties;
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(
            p.message_id().as_ref().map(|s| s.as_str()),
            Some(uuid::Uuid::nil().to_string().as_str())
        );
        assert_eq!(p.kind().as_ref().map(|s| s.as_str()), Some("created"));
        assert_eq!(p.timestamp(), &Some(7));
        let headers = p.headers().clone().unwrap();
        let get = |k: &str| headers.inner().get(k).and_then(|v| v.as_long_string()).map(|s| s.to_string());
        assert_eq!(get("lockstep-key").as_deref(), Some("k"));
        assert_eq!(get("source").as_deref(), Some("test"));
        assert_eq!(get("lockstep-created-at").as_deref(), Some("7000"));
        assert_eq!(w.routing_key.as_str(), "orders");
    }

    #[test]
    fn what_cannot_be_sent_is_poison() {
        let long = "x".repeat(256);
        let h = [(Cow::from(long.as_str()), Cow::from("v"))];
        for (m, reason) in [
            (outgoing(&long, &[], b""), "InvalidRoutingKey"),
            (outgoing("q", &h, b""), "InvalidHeader"),
            (outgoing("q", &[], &[0u8; 2000]), "MessageTooLarge"),
        ] {
            let r = wire(&m, 1000).err().unwrap();
            assert_eq!((r.cause, r.reason.as_str()), (Cause::Poison, reason));
        }
    }

    #[test]
    fn the_servers_size_limit_is_read_from_its_refusal() {
        let t = "PRECONDITION_FAILED - message size 2000 is larger than configured max size 1000";
        assert_eq!(server_size_limit(t), Some(1000));
        assert_eq!(server_size_limit("NOT_FOUND - no exchange"), None);
    }
}
