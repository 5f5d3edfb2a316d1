//! Why the relay's flags do not make a configuration, in the flags' own words.

use std::path::PathBuf;

use crate::core::validation::ValidationErrors;

#[derive(Debug, thiserror::Error)]
pub enum RelayConfigError {
    #[error("no database URL: set DATABASE_URL, --database-url or --database-url-file")]
    NoDatabaseUrl,
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("no Kafka bootstrap servers: set KAFKA_BOOTSTRAP_SERVERS or --bootstrap-servers")]
    NoBootstrapServers,
    #[error("invalid NATS settings: {0}")]
    Nats(String),
    #[error("invalid RabbitMQ settings: {0}")]
    Amqp(String),
    #[error("invalid relay configuration: {}", describe_cli_errors(.0))]
    Invalid(ValidationErrors),
}

/// Name CLI flags instead of spec fields in messages.
fn describe_cli_errors(e: &ValidationErrors) -> String {
    const FLAGS: [(&str, &str); 13] = [
        ("spec.database.schema", "--schema"),
        ("spec.database.table", "--table"),
        ("spec.kafka.bootstrapServers", "--bootstrap-servers"),
        ("spec.kafka.producer.config", "--kafka-config"),
        ("spec.kafka.producer.lingerMs", "--linger-ms"),
        ("spec.routing.topic", "--topic"),
        ("spec.relay.batchSize", "--batch-size"),
        ("spec.relay.pollInterval", "--poll-interval"),
        ("spec.relay.maxAttempts", "--max-attempts"),
        ("spec.relay.publishedRetention", "--published-retention"),
        ("spec.relay.cloudEvents", "--cloudevents-source"),
        ("spec.relay.replicas", "(replicas)"),
        ("spec.lag.maxOldestAge", "(maxOldestAge)"),
    ];
    e.0.iter()
        .map(|fe| {
            let flag = FLAGS
                .iter()
                .find(|(f, _)| fe.field.starts_with(f))
                .map(|(_, fl)| *fl)
                .unwrap_or(fe.field.as_str());
            format!("{flag}: {}", fe.message)
        })
        .collect::<Vec<_>>()
        .join("; ")
}
