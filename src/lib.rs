//! lockstep: reliable messaging plumbing for PostgreSQL + Kafka services, as a Kubernetes operator.
//!
//! - [`crd`]: the OutboxRelay, InboxTable and DedupPolicy resources and their validation.
//! - [`crdgen`]: CRD YAML generated from those types.
//! - [`config`]: configuration of the `operator` and `relay` commands.
//! - [`sql`], [`duration`], [`routing`]: pure building blocks shared by all of them.

pub mod buckets;
pub mod cache;
pub mod chaos;
pub mod conditions;
pub mod config;
pub mod consumer_lag;
pub mod controller;
pub mod coverage;
pub mod crd;
pub mod crdgen;
pub mod db;
pub mod doctor;
pub mod duration;
pub mod event_headers;
pub mod examples;
pub mod inbox;
pub mod kafka;
pub mod leader;
pub mod metrics;
pub mod operator;
pub mod purge;
pub mod quantity;
pub mod redacted;
pub mod relay;
pub mod retention;
pub mod routing;
pub mod schema;
pub mod sql;
pub mod topics;
pub mod validation;
