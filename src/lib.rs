//! lockstep: reliable messaging plumbing for PostgreSQL + Kafka services, as a Kubernetes operator.
//!
//! The modules are layers, lowest first; each imports only itself and lower ranks (tests/layout.rs):
//! - [`core`](crate::core): pure building blocks (SQL identifiers, durations, routing), no I/O.
//! - [`crd`]: the OutboxRelay, InboxTable and DedupPolicy resources, their validation, CRD YAML.
//! - [`config`] and [`clients`]: configuration of the commands; PostgreSQL, Kafka, Lease and HTTP.
//! - [`tables`]: the database contract the operator and the relay share.
//! - [`doctor`]: the prerequisite checks.
//! - [`operator`], [`relay`], [`inbox`]: the operator, the outbox relay, the inbox library.
//! - [`chaos`]: the effectively-once measurement under faults.
//! - [`cli`]: what only the binary uses.

// In rank order (tests/layout.rs); blank lines keep rustfmt from sorting them.
pub mod core;

pub mod crd;

pub mod config;

pub mod clients;

pub mod tables;

pub mod doctor;

pub mod operator;

pub mod relay;

pub mod inbox;

pub mod chaos;

pub mod cli;
