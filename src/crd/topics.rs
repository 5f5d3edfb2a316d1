//! The topics a resource asks for, as the topic plan reads them: kept out of the crd glob
//! because the name is generic.

use std::collections::{BTreeMap, BTreeSet};

/// A topic as a validated spec wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub config: BTreeMap<String, String>,
    pub ignore: BTreeSet<String>,
    pub allow_partition_increase: bool,
    /// Messages carry keys whose order matters (always true for an outbox relay).
    pub keyed: bool,
}
