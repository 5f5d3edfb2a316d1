//! The operator's Prometheus metrics (reconciles, purges, database pool waits); the HTTP
//! endpoints that serve them are in `clients::http`.

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::clients::http::register_build_info;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabel {
    pub controller: &'static str,
    pub reason: String,
}

/// Which InboxTable a purge series belongs to (`table` is schema.table in the database).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PurgeLabel {
    pub namespace: String,
    pub inboxtable: String,
    pub table: String,
}

pub struct Metrics {
    pub reconciles: Family<ControllerLabel, Counter>,
    pub failures: Family<FailureLabel, Counter>,
    pub reconcile_duration: Family<ControllerLabel, Histogram>,
    pub leader: Gauge,
    pub purged_rows: Family<PurgeLabel, Counter>,
    pub purge_failures: Family<PurgeLabel, Counter>,
    pub purge_duration: Family<PurgeLabel, Histogram>,
    /// How long a reconcile waited for a connection of its database's pool.
    pub db_acquire: Histogram,
    /// Refreshes put off because `--refresh-concurrency` were running.
    pub refreshes_deferred: Counter,
    pub registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("lockstep");
        let reconciles = Family::<ControllerLabel, Counter>::default();
        let failures = Family::<FailureLabel, Counter>::default();
        let reconcile_duration = Family::<ControllerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
        });
        let leader = Gauge::default();
        let purged_rows = Family::<PurgeLabel, Counter>::default();
        let purge_failures = Family::<PurgeLabel, Counter>::default();
        let purge_duration = Family::<PurgeLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0])
        });
        let db_acquire = Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]);
        let refreshes_deferred = Counter::default();
        register_build_info(&mut registry);
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that ended in a failure condition or error, by reason",
            failures.clone(),
        );
        registry.register("reconcile_duration_seconds", "Reconcile duration", reconcile_duration.clone());
        registry.register("leader", "1 while this replica holds the leader Lease", leader.clone());
        registry.register("inbox_purged_rows", "Expired inbox rows deleted", purged_rows.clone());
        registry.register("inbox_purge_failures", "Purge runs that failed", purge_failures.clone());
        registry.register("inbox_purge_duration_seconds", "Purge run duration", purge_duration.clone());
        registry.register(
            "db_acquire_seconds",
            "How long reconciles waited for a database connection (--db-pool-size per database URL)",
            db_acquire.clone(),
        );
        registry.register(
            "refreshes_deferred",
            "Refreshes put off for 1-3 s because --refresh-concurrency refreshes were running",
            refreshes_deferred.clone(),
        );
        Metrics {
            reconciles,
            failures,
            reconcile_duration,
            leader,
            purged_rows,
            purge_failures,
            purge_duration,
            db_acquire,
            refreshes_deferred,
            registry,
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("encoding metrics into a String cannot fail");
        out
    }
}
