//! The relay's Prometheus metrics, and the loop that measures the outbox every 5 s (pending rows,
//! oldest row, oldest open transaction, broker reachable) for /metrics, /readyz and a terminal.

use std::{
    io::IsTerminal,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio_util::sync::CancellationToken;

use crate::tables::lag::{measure, oldest_transaction_age};
use crate::{clients::http::Health, config::RelayConfig};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Buckets taken or given back.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MoveLabel {
    pub direction: &'static str,
}

/// What started a drain.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WakeLabel {
    pub by: &'static str,
}

pub struct RelayMetrics {
    pub published: Counter,
    pub failures: Family<ReasonLabel, Counter>,
    pub quarantined: Counter,
    pub batch_seconds: Histogram,
    pub commit_to_ack_seconds: Histogram,
    pub commit_to_read_seconds: Histogram,
    pub pending: Gauge,
    pub oldest_pending_seconds: Gauge<f64, AtomicU64>,
    pub oldest_transaction_seconds: Gauge<f64, AtomicU64>,
    pub active: Gauge,
    pub blocked_keys: Gauge,
    pub broker_failing: Gauge,
    pub producer_rebuilds: Counter,
    pub duplicates: Counter,
    pub wakeups: Family<WakeLabel, Counter>,
    pub notifications: Counter,
    pub purged: Counter,
    pub purge_failures: Counter,
    pub invalid_traceparent: Counter,
    pub buckets_owned: Gauge,
    pub bucket_moves: Family<MoveLabel, Counter>,
    latency_samples: Option<Mutex<Samples>>,
    registry: Registry,
}

const LATENCY_BUCKETS: [f64; 13] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0];

/// Latencies kept for benchmarks, in seconds.
#[derive(Debug, Default)]
pub struct Samples {
    pub commit_to_ack: Vec<f64>,
    pub commit_to_read: Vec<f64>,
    /// Per acknowledged row, where its time went (`stages::STAGES`).
    pub stages: Vec<super::stages::Stages>,
}

/// `registry.register(name, help, m.field.clone())` for each `field: name, help;`, one line each.
macro_rules! register {
    ($registry:ident, $m:ident, { $($field:ident: $name:literal, $help:literal;)* }) => {
        $($registry.register($name, $help, $m.$field.clone());)*
    };
}

impl Default for RelayMetrics {
    fn default() -> Self {
        // lockstep_relay_* plus lockstep_build_info, named as the operator's.
        let mut root = Registry::default();
        crate::clients::http::register_build_info(root.sub_registry_with_prefix("lockstep"));
        let registry = root.sub_registry_with_prefix("lockstep_relay");
        let m = RelayMetrics {
            published: Counter::default(),
            failures: Family::default(),
            quarantined: Counter::default(),
            batch_seconds: Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0]),
            commit_to_ack_seconds: Histogram::new(LATENCY_BUCKETS),
            commit_to_read_seconds: Histogram::new(LATENCY_BUCKETS),
            pending: Gauge::default(),
            oldest_pending_seconds: Gauge::default(),
            oldest_transaction_seconds: Gauge::default(),
            active: Gauge::default(),
            blocked_keys: Gauge::default(),
            broker_failing: Gauge::default(),
            producer_rebuilds: Counter::default(),
            duplicates: Counter::default(),
            wakeups: Family::default(),
            notifications: Counter::default(),
            purged: Counter::default(),
            purge_failures: Counter::default(),
            invalid_traceparent: Counter::default(),
            buckets_owned: Gauge::default(),
            bucket_moves: Family::default(),
            latency_samples: None,
            registry: Registry::default(),
        };
        register!(registry, m, {
            published: "published", "Events acknowledged by the broker and removed from the outbox";
            failures: "failures", "Failed publishes, by reason";
            quarantined: "quarantined", "Rows moved to the dead-letter table";
            batch_seconds: "batch_duration_seconds", "Read, publish, acknowledge and delete one batch";
            commit_to_ack_seconds: "commit_to_ack_seconds", "From the row's created_at to the broker's acknowledgement";
            commit_to_read_seconds: "commit_to_read_seconds", "From the row's created_at to the read that took it (the database side of commit_to_ack: open older transactions, the wait between reads)";
            pending: "pending_events", "Unpublished rows (estimate from seq)";
            oldest_pending_seconds: "oldest_pending_age_seconds", "Age of the oldest unpublished row";
            oldest_transaction_seconds: "oldest_transaction_age_seconds", "Age of the oldest open write transaction; rows committed after it started wait for it to end";
            active: "active", "1 while this relay holds the outbox lock (with buckets: while it is one of the outbox's relays)";
            blocked_keys: "blocked_keys", "Keys left out of reads: their oldest row waits for a retry, or was refused at send";
            broker_failing: "broker_failing", "1 while publishes fail for broker or network reasons (retried, never dead-lettered)";
            producer_rebuilds: "producer_rebuilds", "Producers replaced after a fatal producer error";
            duplicates: "broker_duplicates", "Messages the broker acknowledged as copies it already stored and dropped (NATS: the same event id within the stream's duplicate_window)";
            wakeups: "wakeups", "Drains started after a wait, by what ended it (notify, poll)";
            notifications: "notifications", "NOTIFYs received; those that arrived together woke one drain";
            purged: "published_rows_purged", "Published rows deleted after publishedRetention (cleanup MarkPublished)";
            purge_failures: "purge_failures", "Purges of published rows that failed (retried at the next interval)";
            invalid_traceparent: "invalid_traceparent", "Rows whose traceparent column held no valid W3C traceparent: sent without the header";
            buckets_owned: "buckets_owned", "Key-hash buckets this relay owns (with --buckets above 1)";
            bucket_moves: "bucket_moves", "Buckets this relay took or gave back, by direction";
        });
        // Both series from the start, so a rate over them is defined before the first wake-up.
        for by in ["notify", "poll"] {
            let _ = m.wakeups.get_or_create(&WakeLabel { by });
        }
        for direction in ["taken", "given"] {
            let _ = m.bucket_moves.get_or_create(&MoveLabel { direction });
        }
        RelayMetrics { registry: root, ..m }
    }
}

impl RelayMetrics {
    /// Metrics that also keep every commit-to-acknowledgement latency, for benchmarks.
    pub fn with_latency_samples() -> Self {
        RelayMetrics {
            latency_samples: Some(Mutex::new(Samples::default())),
            ..Self::default()
        }
    }

    pub(super) fn observe_commit_to_ack(&self, seconds: &[f64]) {
        for s in seconds {
            self.commit_to_ack_seconds.observe(*s);
        }
        if let Some(samples) = &self.latency_samples {
            samples
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .commit_to_ack
                .extend_from_slice(seconds);
        }
    }

    /// Whether samples are kept (a benchmark's metrics): only then are stages stamped.
    pub(super) fn keeps_samples(&self) -> bool {
        self.latency_samples.is_some()
    }

    pub(super) fn observe_stages(&self, stages: impl Iterator<Item = super::stages::Stages>) {
        if let Some(samples) = &self.latency_samples {
            samples.lock().unwrap_or_else(|e| e.into_inner()).stages.extend(stages);
        }
    }

    pub(super) fn observe_commit_to_read(&self, seconds: impl Iterator<Item = f64>) {
        let mut kept = self.latency_samples.as_ref().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()));
        for s in seconds {
            self.commit_to_read_seconds.observe(s);
            if let Some(k) = kept.as_mut() {
                k.commit_to_read.push(s);
            }
        }
    }

    /// A publish the producer refused or the broker failed, counted by its error code.
    pub(super) fn count_failure(&self, reason: &str) {
        self.failures.get_or_create(&ReasonLabel { reason: reason.to_owned() }).inc();
    }

    /// A row sent without its malformed traceparent. The value is not logged (it is the
    /// application's data); the first such row is a warning, later ones only counted.
    pub(super) fn count_invalid_traceparent(&self, id: uuid::Uuid) {
        if self.invalid_traceparent.inc() == 0 {
            tracing::warn!(%id, "a row's traceparent column is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>): sent without the header; later ones are counted in lockstep_relay_invalid_traceparent_total");
        } else {
            tracing::debug!(%id, "a row's traceparent column is not a W3C traceparent: sent without the header");
        }
    }

    /// The latencies kept so far (empty unless built by `with_latency_samples`), leaving none.
    pub fn take_latency_samples(&self) -> Samples {
        self.latency_samples
            .as_ref()
            .map(|s| std::mem::take(&mut *s.lock().unwrap_or_else(|e| e.into_inner())))
            .unwrap_or_default()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encoding into a String");
        out
    }
}

/// Every 5 s until `stop`: pending rows, oldest row and oldest transaction into the gauges; ready
/// while this relay holds the lock and the broker answers; a status line when stderr is a terminal.
pub(super) fn spawn_measurements(
    pool: sqlx::PgPool,
    cfg: RelayConfig,
    metrics: Arc<RelayMetrics>,
    producer: tokio::sync::watch::Receiver<crate::clients::broker::Publisher>,
    active: Arc<AtomicBool>,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let tty = std::io::stderr().is_terminal();
        let mut last = (Instant::now(), metrics.published.get());
        loop {
            if let Ok((pending, oldest)) = measure(&pool, &cfg.resolved.table, cfg.resolved.cleanup).await {
                metrics.pending.set(pending);
                metrics.oldest_pending_seconds.set(oldest);
            }
            if let Ok(age) = oldest_transaction_age(&pool).await {
                metrics.oldest_transaction_seconds.set(age);
            }
            // The producer in use: one rebuilt since must not be kept alive here.
            let p = producer.borrow().clone();
            let reachable = p.reachable().await;
            let active = active.load(Ordering::Relaxed);
            let failing = metrics.broker_failing.get() != 0;
            health.ready.store(active && reachable && !failing, Ordering::Relaxed);
            if tty {
                eprintln!("{}", status_line(&metrics, last, active, reachable));
                last = (Instant::now(), metrics.published.get());
            }
            tokio::select! { _ = stop.cancelled() => break, _ = tokio::time::sleep(Duration::from_secs(5)) => {} }
        }
    });
}

/// The terminal status line; the rate is over the time since `last` (when, published then).
fn status_line(metrics: &RelayMetrics, last: (Instant, u64), active: bool, reachable: bool) -> String {
    let published = metrics.published.get();
    let rate = (published - last.1) as f64 / last.0.elapsed().as_secs_f64().max(0.001);
    format!(
        "lockstep relay: {} | published {published} ({rate:.0}/s) | pending ~{} | oldest {:.1}s | oldest transaction {:.1}s | quarantined {} | broker {}",
        if active { "active" } else { "standby" },
        metrics.pending.get(),
        metrics.oldest_pending_seconds.get(),
        metrics.oldest_transaction_seconds.get(),
        metrics.quarantined.get(),
        if reachable { "ok" } else { "UNREACHABLE" },
    )
}

#[cfg(test)]
mod tests {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};

    use super::*;

    #[test]
    fn failures_are_counted_by_error_code() {
        let m = RelayMetrics::default();
        m.count_failure(
            &crate::clients::broker::kafka::refusal(&KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)).reason,
        );
        m.count_failure(&crate::clients::broker::kafka::refusal(&KafkaError::Canceled).reason);
        let text = m.render();
        assert!(
            text.contains(r#"lockstep_relay_failures_total{reason="MessageSizeTooLarge"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"lockstep_relay_failures_total{reason="Other"} 1"#), "{text}");
    }

    #[test]
    fn latency_samples_are_kept_only_when_asked() {
        let plain = RelayMetrics::default();
        plain.observe_commit_to_ack(&[0.5]);
        plain.observe_commit_to_read([0.25].into_iter());
        let none = plain.take_latency_samples();
        assert!(none.commit_to_ack.is_empty() && none.commit_to_read.is_empty());
        assert!(plain.render().contains("lockstep_relay_commit_to_read_seconds_count 1"));
        let bench = RelayMetrics::with_latency_samples();
        bench.observe_commit_to_ack(&[0.5, 1.5]);
        bench.observe_commit_to_read([0.25].into_iter());
        let kept = bench.take_latency_samples();
        assert_eq!(kept.commit_to_ack, [0.5, 1.5]);
        assert_eq!(kept.commit_to_read, [0.25]);
        assert!(bench.take_latency_samples().commit_to_ack.is_empty());
    }

    #[test]
    fn status_line_says_what_the_relay_does() {
        let m = RelayMetrics::default();
        m.published.inc_by(10);
        m.quarantined.inc();
        let line = status_line(&m, (Instant::now(), 10), false, false);
        assert!(
            line.starts_with("lockstep relay: standby | published 10 (0/s) | pending ~0 |"),
            "{line}"
        );
        assert!(line.ends_with("| quarantined 1 | broker UNREACHABLE"), "{line}");
    }
}
