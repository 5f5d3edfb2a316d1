//! Reading a message a RabbitMQ consumer received (lapin) as a [`Delivery`].

use lapin::types::AMQPValue;

use super::Delivery;
use crate::core::event_headers as h;

impl<'a> Delivery<'a> {
    /// Read a message the relay published to RabbitMQ (or any message with those headers or
    /// properties); None without an `id` or `ce_id` header or a `message_id`. Headers first (the
    /// relay's and CloudEvents'), then the AMQP properties: `message_id` (the relay sets it to the
    /// event id), `type`, and `timestamp` (seconds) for when the event was created.
    pub fn from_amqp(d: &'a lapin::message::Delivery) -> Option<Self> {
        let p = &d.properties;
        let headers = p.headers().as_ref();
        let text = |name: &str| -> Option<&'a str> {
            match headers?.inner().get(name)? {
                AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
                AMQPValue::ShortString(s) => Some(s.as_str()),
                _ => None,
            }
        };
        let created = text(crate::core::stamp::CREATED_AT_HEADER)
            .and_then(|v| v.parse().ok())
            .or_else(|| text(h::CE_TIME).and_then(h::rfc3339_ms))
            .or_else(|| p.timestamp().and_then(|s| i64::try_from(s).ok()).map(|s| s.saturating_mul(1000)));
        Some(Delivery {
            id: text(h::ID)
                .or_else(|| text(h::CE_ID))
                .or_else(|| p.message_id().as_ref().map(|s| s.as_str()))?,
            event_type: text(h::TYPE)
                .or_else(|| text(h::CE_TYPE))
                .or_else(|| p.kind().as_ref().map(|s| s.as_str()))
                .unwrap_or(""),
            created_ms: created,
            traceparent: text(h::TRACEPARENT).filter(|t| h::valid_traceparent(t)),
        })
    }
}

#[cfg(test)]
mod tests {
    use lapin::{
        types::{FieldTable, LongString},
        BasicProperties,
    };

    use super::*;

    fn delivery(headers: &[(&str, &str)], properties: BasicProperties) -> lapin::message::Delivery {
        let mut t = FieldTable::default();
        for (k, v) in headers {
            t.insert((*k).into(), AMQPValue::LongString(LongString::from(v.as_bytes().to_vec())));
        }
        let mut d = lapin::message::Delivery::mock(1, "ex".into(), "rk".into(), false, b"{}".to_vec());
        d.properties = properties.with_headers(t);
        d
    }

    #[test]
    fn a_delivery_reads_the_relays_headers_then_the_amqp_properties() {
        let m = delivery(
            &[("id", "e-1"), ("type", "created"), ("lockstep-created-at", "42")],
            BasicProperties::default().with_message_id("other".into()).with_timestamp(7),
        );
        let d = Delivery::from_amqp(&m).unwrap();
        assert_eq!(
            (d.id, d.event_type, d.created_ms, d.traceparent),
            ("e-1", "created", Some(42), None)
        );
        let m = delivery(
            &[],
            BasicProperties::default()
                .with_message_id("e-2".into())
                .with_type("shipped".into())
                .with_timestamp(7),
        );
        let d = Delivery::from_amqp(&m).unwrap();
        assert_eq!((d.id, d.event_type, d.created_ms), ("e-2", "shipped", Some(7000)));
        assert_eq!(
            Delivery::from_amqp(&delivery(&[("type", "created")], BasicProperties::default())),
            None
        );
    }
}
