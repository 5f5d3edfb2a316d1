//! `status.relays`: which relay owns how many buckets, with spec.relay.buckets above 1.

use serde::{Deserialize, Serialize};

/// One relay's share of the buckets, as pg_locks shows it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayShare {
    /// The relay's database session (`pg_stat_activity.pid`, `pg_terminate_backend`).
    pub pid: i32,
    /// The session's application_name (`lockstep-relay/<pod>`), where pg_stat_activity shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_name: Option<String>,
    /// The relay's pod (its host name), from the application_name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Buckets it owns.
    pub buckets: i32,
    /// Age of the oldest unpublished event in its buckets (0: none), when the bucket index is
    /// there to read it cheaply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending_age_seconds: Option<f64>,
}
