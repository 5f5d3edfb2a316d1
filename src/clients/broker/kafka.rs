//! Kafka behind the broker seam: an idempotent, gapless producer (acks=all), its delivery
//! reports, and what each librdkafka error says about the message.

use std::time::Duration;

use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer, PurgeConfig},
    ClientConfig,
};

use super::{Cause, Outgoing, Refusal};

/// A Kafka producer. Clones share it.
#[derive(Clone)]
pub struct KafkaPublisher {
    producer: FutureProducer,
}

impl KafkaPublisher {
    /// A producer from settings the relay forced (idempotence, acks=all, gapless). The error
    /// never holds a setting's value: they may be credentials.
    pub fn create(c: &ClientConfig) -> Result<Self, String> {
        let producer: FutureProducer = c.create().map_err(|e| {
            // Every value scrubbed from librdkafka's message, the sensitive ones too (which
            // `config_map` masks).
            let keys: Vec<String> = c.config_map().keys().map(|k| k.to_string()).collect();
            crate::clients::kafka::config_error_text(&e, keys.iter().filter_map(|k| c.get(k)))
        })?;
        Ok(KafkaPublisher { producer })
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    pub(super) async fn send(&self, m: &Outgoing<'_>) -> Result<DeliveryFuture, Refusal> {
        let mut headers = OwnedHeaders::new_with_capacity(m.headers.len());
        for (key, value) in m.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(m.destination)
            .key(m.key.as_bytes())
            .timestamp(m.timestamp_ms)
            .headers(headers);
        if let Some(p) = m.payload {
            record = record.payload(p);
        }
        loop {
            match self.producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    // The broker is slow or away: wait for the queue to drain.
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(refusal(&e)),
            }
        }
    }

    pub(super) fn fatal(&self) -> Option<String> {
        self.producer
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("{code:?}: {reason}"))
    }

    /// Fail every message the producer still holds (queued or in flight), off the runtime's
    /// workers (it waits for librdkafka's threads): their reports come at once.
    pub(super) async fn purge(&self) {
        let p = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || p.purge(PurgeConfig::default().queue().inflight())).await;
    }

    pub(super) fn in_flight(&self) -> usize {
        usize::try_from(self.producer.in_flight_count()).unwrap_or(0)
    }

    pub(super) async fn reachable(&self) -> bool {
        let p = self.producer.clone();
        tokio::task::spawn_blocking(move || p.client().fetch_metadata(None, Duration::from_secs(2)).is_ok())
            .await
            .unwrap_or(false)
    }

    pub(super) async fn flush(&self, timeout: Duration) {
        let p = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || p.flush(timeout)).await;
    }
}

/// What a Kafka error says about the message.
pub fn cause(e: &KafkaError) -> Cause {
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize | C::InvalidTopic | C::MessageBatchTooLarge) => Cause::Poison,
        Some(C::InvalidRecord | C::InvalidMessage | C::PolicyViolation | C::UnsupportedForMessageFormat) => Cause::Rejected,
        Some(C::InvalidTimestamp) => Cause::Timestamp,
        Some(C::Fatal | C::PurgeQueue | C::PurgeInflight | C::GaplessGuarantee | C::Inconsistent | C::OutOfOrderSequenceNumber) => {
            Cause::Released
        }
        _ => Cause::Transport,
    }
}

/// A Kafka error as the seam reports it. A message that timed out leaves the idempotent
/// producer's sequence state for its partition unknown (and some brokers never accept that
/// producer again): stale, so the relay starts over with a fresh one.
pub fn refusal(e: &KafkaError) -> Refusal {
    let code = e.rdkafka_error_code();
    Refusal {
        cause: cause(e),
        error: e.to_string(),
        reason: code.map(|c| format!("{c:?}")).unwrap_or_else(|| "Other".into()),
        stale: code == Some(RDKafkaErrorCode::MessageTimedOut),
    }
}

/// Errors no retry can fix: the row goes to the dead-letter table at once.
pub fn is_permanent(e: &KafkaError) -> bool {
    cause(e) == Cause::Poison
}
