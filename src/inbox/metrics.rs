//! What an idempotent consumer measures of itself, registered in the consumer's own Prometheus
//! registry: claims by result (the dedup hit ratio and duplicate delivery rate), handler retries
//! and failures, and end-to-end latency by event type (business commit to side-effect commit).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClaimLabels {
    pub consumer: String,
    /// `new` or `duplicate`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    pub consumer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub consumer: String,
    /// `retries_exhausted` (the database stayed unavailable), `effect` (the side effect refused) or
    /// `database` (the database refused the claim or the commit).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub consumer: String,
    /// The event's `type` header.
    pub r#type: String,
}

/// The inbox metrics; cloning shares them. Names (with the registry's prefix, if any):
/// `lockstep_inbox_claims_total{consumer,result}`, `lockstep_inbox_handler_retries_total{consumer}`,
/// `lockstep_inbox_handler_failures_total{consumer,reason}`,
/// `lockstep_inbox_end_to_end_seconds{consumer,type}`.
#[derive(Clone, Debug)]
pub struct InboxMetrics {
    pub claims: Family<ClaimLabels, Counter>,
    pub retries: Family<ConsumerLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub end_to_end: Family<LatencyLabels, Histogram, fn() -> Histogram>,
}

/// 5 ms to about 20 minutes: a healthy pipeline and a backlog after an outage both land in a bucket.
fn end_to_end_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 18))
}

impl Default for InboxMetrics {
    /// Metrics in no registry (read them from the fields, as tests do).
    fn default() -> Self {
        InboxMetrics {
            claims: Family::default(),
            retries: Family::default(),
            failures: Family::default(),
            end_to_end: Family::new_with_constructor(end_to_end_histogram),
        }
    }
}

impl InboxMetrics {
    /// Create the metrics and register them in `registry` (the consumer's own).
    pub fn register(registry: &mut Registry) -> Self {
        let m = InboxMetrics::default();
        registry.register(
            "lockstep_inbox_claims",
            "Committed inbox claims by result: new (the effect applied) or duplicate (a redelivery, skipped)",
            m.claims.clone(),
        );
        registry.register(
            "lockstep_inbox_handler_retries",
            "Handler attempts retried after a transient database error",
            m.retries.clone(),
        );
        registry.register(
            "lockstep_inbox_handler_failures",
            "Messages the handler gave up on, by reason",
            m.failures.clone(),
        );
        registry.register(
            "lockstep_inbox_end_to_end_seconds",
            "From the event's created_at (the message timestamp) to the commit of its side effect",
            m.end_to_end.clone(),
        );
        m
    }

    pub(super) fn claimed(&self, consumer: &str, new: bool) {
        let result = if new { "new" } else { "duplicate" };
        self.claims
            .get_or_create(&ClaimLabels {
                consumer: consumer.to_owned(),
                result,
            })
            .inc();
    }

    pub(super) fn retried(&self, consumer: &str) {
        self.retries
            .get_or_create(&ConsumerLabels {
                consumer: consumer.to_owned(),
            })
            .inc();
    }

    pub(super) fn failed(&self, consumer: &str, reason: &'static str) {
        self.failures
            .get_or_create(&FailureLabels {
                consumer: consumer.to_owned(),
                reason,
            })
            .inc();
    }

    pub(super) fn applied(&self, consumer: &str, event_type: &str, seconds: f64) {
        let labels = LatencyLabels {
            consumer: consumer.to_owned(),
            r#type: event_type.to_owned(),
        };
        self.end_to_end.get_or_create(&labels).observe(seconds.max(0.0));
    }
}
