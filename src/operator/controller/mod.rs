//! The controllers, one per kind. Each runs the shared steps in `reconciler` (guard, validate,
//! status) around its own fetch (`deps`) and pure verdict.

pub mod cleanup;
pub mod context;
pub mod dead_letters;
pub mod dedup_covered;
pub mod dedup_policy;
pub mod deps;
pub mod events;
pub mod group_lag;
pub mod inbox_guarantees;
pub mod inbox_table;
pub mod lag;
pub mod lifecycle;
pub mod merged_watch;
pub mod nats_deps;
pub mod outbox_relay;
pub mod outbox_verdict;
pub mod ownership;
pub mod prerequisites;
pub mod rabbitmq_deps;
pub mod reconciler;
pub mod relay_available;
pub mod relay_buckets;
pub mod relay_deployment;
pub mod relay_image;
pub mod relay_pod;
pub mod relay_queues;
pub mod relay_streams;
pub mod relay_topics;
pub mod status;
pub mod topic_owners;
pub mod watches;

#[cfg(test)]
mod fixtures;

pub use context::{Caches, Context, Error, Timing};

use futures::StreamExt;

/// Reconciles one controller runs at once. Unbounded, the first reconciles of 1,000 objects ran
/// together and opened about as many API server connections, each with its TLS state and
/// buffers: the largest part of the operator's peak memory at that size (docs/benchmarks.md). A
/// spec change waits for a slot only while this many reconciles run; refreshes already take
/// turns (`--refresh-concurrency`).
pub const CONCURRENCY: u16 = 32;

/// The kube controller settings every controller runs with.
fn config() -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().concurrency(CONCURRENCY)
}

/// Drain a controller's output, logging what failed.
async fn drain<S, T, E>(name: &'static str, s: S)
where
    S: futures::Stream<Item = Result<T, E>>,
    E: std::fmt::Display,
{
    s.for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(controller = name, error = %e, "reconcile");
        }
    })
    .await;
}
