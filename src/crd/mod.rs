//! The lockstep custom resources (group lockstep.dev, version v1alpha1).

pub mod common;
pub mod crdgen;
pub mod dedup_policy;
pub mod inbox_table;
pub mod outbox_relay;
pub mod rabbitmq_source;
pub mod topics;

pub use common::*;
pub use dedup_policy::*;
pub use inbox_table::*;
pub use outbox_relay::*;
pub use rabbitmq_source::*;
