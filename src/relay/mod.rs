//! The outbox relay: publishes outbox rows to Kafka at least once, in per-key order, and removes
//! them once the broker acknowledged them.
//!
//! - One active relay per outbox: the one holding a PostgreSQL session advisory lock. Batches run
//!   on that same connection, so a relay that lost its session (and so its lock) cannot go on.
//! - Woken by NOTIFY (the outbox trigger) or the poll interval; reads rows in `seq` order, only
//!   those below the snapshot's xmin (a transaction still open cannot later commit a smaller seq
//!   behind rows already published).
//! - Produces a batch through an idempotent producer (acks=all) with many messages in flight,
//!   waits for every delivery report, then deletes (or marks) the acknowledged rows in one
//!   statement. A crash between acknowledgement and delete republishes those rows: duplicates,
//!   never loss; consumers deduplicate with an inbox.
//! - A failed row is retried with exponential backoff, and later rows of its key wait behind it;
//!   after maxAttempts, or at once for errors no retry can fix (a message over the size limit, a
//!   topic name the routing cannot build), it moves to the dead-letter table with its error.
//!
//! `run` starts the relay (tables, producer, measurements); `session` the session (lock,
//! LISTEN, reconnect, stop), `fence` when the relay must stop sending, `publisher` the batch pipeline, `reports` a batch's delivery reports
//! (stamped as they arrive), `store` its SQL, `metrics` what it reports.

mod cleanup;
mod error;
mod failure;
mod fence;
mod gate;
mod gather;
mod headers;
mod listen;
mod metrics;
mod ownership;
mod publisher;
mod reports;
mod run;
mod session;
mod settings;
pub mod stages;
mod store;

pub use self::{
    error::RelayError,
    failure::{backoff, cause, is_permanent, transport_backoff, Cause},
    fence::{CHECK_EVERY, FENCE, GAP},
    metrics::{ReasonLabel, RelayMetrics, Samples, WakeLabel},
    ownership::PLANNER_SETTINGS,
    publisher::Relay,
    run::{banner, run, run_with_metrics},
    session::{keepalive_sql, DEAD_PEER_TIMEOUT},
    settings::{producer_config, publisher_settings},
    store::bucket_read_sql,
};
pub use crate::tables::schema::PayloadColumn;
