//! What the relay's publisher is built from: Kafka producer settings with delivery forced, or
//! the NATS or RabbitMQ server, named after the relay's host.

use rdkafka::config::ClientConfig;

use crate::{clients::broker::Settings, config::RelayConfig};

/// How to build the relay's publisher: NATS or RabbitMQ when the relay was given such a server,
/// else Kafka. The connection is named after the relay's host.
pub fn publisher_settings(cfg: &RelayConfig) -> Settings {
    let name = || {
        Some(crate::tables::identity::application_name(
            crate::tables::identity::host_name().as_deref(),
        ))
    };
    match (&cfg.nats, &cfg.amqp) {
        (Some(n), _) => Settings::Nats(crate::core::nats_settings::NatsSettings { name: name(), ..n.clone() }),
        (None, Some(a)) => Settings::Amqp(crate::core::amqp_settings::AmqpSettings { name: name(), ..a.clone() }),
        (None, None) => Settings::Kafka(producer_config(cfg)),
    }
}

pub fn producer_config(cfg: &RelayConfig) -> ClientConfig {
    let p = &cfg.resolved.producer;
    let mut c = ClientConfig::new();
    c.set("message.timeout.ms", "120000");
    for (k, v) in &cfg.kafka_config {
        c.set(k, v.expose());
    }
    // Forced last: validation already refused weaker values, this makes sure of it. Gapless: a
    // message the broker rejects makes the producer fatal instead of renumbering the partition's
    // later messages and sending them, ahead of the rejected row's retry (see `gate`).
    c.set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("enable.idempotence", "true")
        .set("enable.gapless.guarantee", "true")
        .set("acks", "all")
        .set("linger.ms", p.linger_ms.to_string())
        .set("compression.type", p.compression.as_str());
    c
}
