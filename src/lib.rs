//! lockstep: reliable messaging plumbing for PostgreSQL + Kafka services, as a Kubernetes operator.
//!
//! - [`crd`]: the OutboxRelay, InboxTable and DedupPolicy resources and their validation.
//! - [`crd::crdgen`]: CRD YAML generated from those types.
//! - [`config`]: configuration of the `operator` and `relay` commands.
//! - [`core`](crate::core): pure building blocks (SQL identifiers, durations, routing) shared by all of them.

pub mod chaos;
pub mod clients;
pub mod config;
pub mod core;
pub mod crd;
pub mod doctor;
pub mod examples;
pub mod inbox;
pub mod operator;
pub mod relay;
pub mod tables;
