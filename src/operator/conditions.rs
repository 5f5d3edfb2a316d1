//! Conditions per Kubernetes API conventions. `lastTransitionTime` moves only when a condition's
//! status flips, so an unchanged outcome produces an identical status and no write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types.
pub mod condition {
    pub const READY: &str = "Ready";
    pub const SCHEMA_READY: &str = "SchemaReady";
    pub const TOPICS_READY: &str = "TopicsReady";
    pub const RELAY_AVAILABLE: &str = "RelayAvailable";
    pub const LAG_HEALTHY: &str = "LagHealthy";
    pub const RETENTION_ENFORCED: &str = "RetentionEnforced";
    pub const POLICY_COMPLIANT: &str = "PolicyCompliant";
    pub const DEDUP_COVERED: &str = "DedupCovered";
    /// `lockstep doctor`'s database checks, before the tables were first migrated.
    pub const PREREQUISITES_MET: &str = "PrerequisitesMet";
}

/// Condition reasons: CamelCase names users can search for (documented in
/// docs/troubleshooting.md). Decisions match on the variant; its name is written only into
/// status, Events and metrics (`as_str`).
macro_rules! reasons {
    ($($(#[$doc:meta])* $r:ident,)*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[$doc])* $r,)*
        }

        impl Reason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [Reason] = &[$(Reason::$r),*];

            /// The reason as status, Events and metrics carry it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$r => stringify!($r),)*
                }
            }

            /// The reason a status carries, read back; None for one this version does not write.
            pub fn parse(s: &str) -> Option<Reason> {
                Reason::ALL.iter().copied().find(|r| r.as_str() == s)
            }
        }
    };
}

reasons! {
    Ready,
    InvalidSpec,
    Paused,
    SecretNotFound,
    SecretKeyMissing,
    DatabaseUnreachable,
    DatabaseError,
    SchemaMismatch,
    SchemaMissing,
    SchemaUpToDate,
    PurgeHealthy,
    PurgePending,
    PurgeFailed,
    RetentionClamped,
    WithinPolicy,
    NoPolicy,
    PolicyViolation,
    TopicsConfigured,
    TopicConfigDrift,
    PartitionChangeRefused,
    TopicOperationFailed,
    BrokerUnreachable,
    RetentionCoversRedelivery,
    RetentionBelowTopicRetention,
    NoSourcesDeclared,
    TopicNotFound,
    LagWithinThreshold,
    LagAboveThreshold,
    LongTransaction,
    Available,
    DeploymentUnavailable,
    NoActiveRelay,
    ScaledToZero,
    DeploymentFailed,
    DeletionBlocked,
    /// A DedupPolicy that may select the table is invalid and has no earlier valid spec.
    PolicyInvalid,
    /// The spec names another table than the one the object manages.
    TableChangeRefused,
    /// The database refused the role (privilege, password): retried only at the refresh interval.
    PermissionDenied,
    /// Another object (any namespace or cluster) manages the table: this one leaves it alone.
    ResourceConflict,
    /// A Secret holds a key lockstep will not hand to librdkafka (it loads code or reads a file).
    SecretKeyRefused,
    /// Every database check of `lockstep doctor` passed (warnings allowed).
    PrerequisitesMet,
    /// A database check of `lockstep doctor` failed: the message names it and what to do.
    PrerequisiteFailed,
    /// With spec.relay.buckets above 1: some buckets have no relay, their events wait.
    BucketsUnowned,
    /// With spec.relay.buckets above 1: some buckets have had no owner for less than the grace
    /// (relays taking a stopped relay's share); RelayAvailable stays True.
    BucketsMoving,
    /// Relays of another bucket count than the spec's still hold the outbox (a change rolling out).
    BucketsChanging,
    /// A stream setting the server cannot change (storage), or a stream that deletes consumed
    /// messages: refused, nothing changed.
    StreamChangeRefused,
    /// A RabbitMQ exchange or queue property the server cannot change on one that exists
    /// (exchange type or durability, queue type or arguments): refused, nothing declared on it.
    QueueChangeRefused,
}

/// A condition as computed by a reconcile, before timestamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: Status,
    pub reason: Reason,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

/// The status of condition `type_` in `conditions` (a previous status), if it is there.
pub fn status_of(conditions: &[Condition], type_: &str) -> Option<Status> {
    conditions.iter().find(|c| c.type_ == type_).map(|c| match c.status.as_str() {
        "True" => Status::True,
        "False" => Status::False,
        _ => Status::Unknown,
    })
}

impl Cond {
    pub fn new(type_: &'static str, status: Status, reason: Reason, message: impl Into<String>) -> Self {
        Cond {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
    pub fn yes(type_: &'static str, reason: Reason, message: impl Into<String>) -> Self {
        Self::new(type_, Status::True, reason, message)
    }
    pub fn no(type_: &'static str, reason: Reason, message: impl Into<String>) -> Self {
        Self::new(type_, Status::False, reason, message)
    }
    pub fn unknown(type_: &'static str, reason: Reason, message: impl Into<String>) -> Self {
        Self::new(type_, Status::Unknown, reason, message)
    }
}

/// Merge computed conditions into the previous ones: keep `lastTransitionTime` unless the status
/// flipped. Conditions not computed this time are kept as they were. Returns the new list and the
/// conditions whose status changed (for Events).
pub fn merge(previous: &[Condition], computed: &[Cond], generation: Option<i64>, now: &Time) -> (Vec<Condition>, Vec<Cond>) {
    let mut out: Vec<Condition> = Vec::new();
    let mut flipped = Vec::new();
    for c in computed {
        let prev = previous.iter().find(|p| p.type_ == c.type_);
        let changed = prev.is_none_or(|p| p.status != c.status.as_str());
        if changed {
            flipped.push(c.clone());
        }
        out.push(Condition {
            type_: c.type_.to_owned(),
            status: c.status.as_str().to_owned(),
            reason: c.reason.as_str().to_owned(),
            message: c.message.clone(),
            observed_generation: generation,
            last_transition_time: if changed {
                now.clone()
            } else {
                prev.map(|p| p.last_transition_time.clone()).unwrap_or_else(|| now.clone())
            },
        });
    }
    for p in previous {
        if !computed.iter().any(|c| c.type_ == p.type_) {
            out.push(p.clone());
        }
    }
    (out, flipped)
}

/// Ready summarises: the first condition that is not True (in the given order) decides.
pub fn ready(parts: &[&Cond], ready_message: impl Into<String>) -> Cond {
    match parts.iter().find(|c| c.status != Status::True) {
        Some(c) => Cond::new(
            condition::READY,
            if c.status == Status::False {
                Status::False
            } else {
                Status::Unknown
            },
            c.reason,
            format!("{}: {}", c.type_, c.message),
        ),
        None => Cond::yes(condition::READY, Reason::Ready, ready_message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let c1 = [Cond::no("SchemaReady", Reason::DatabaseUnreachable, "down")];
        let (a, f) = merge(&[], &c1, Some(1), &t("2026-01-01T00:00:00Z"));
        assert_eq!(f.len(), 1);
        // Same status, other message: time kept, nothing flipped.
        let c2 = [Cond::no("SchemaReady", Reason::DatabaseUnreachable, "still down")];
        let (b, f) = merge(&a, &c2, Some(1), &t("2026-01-01T00:01:00Z"));
        assert!(f.is_empty());
        assert_eq!(b[0].last_transition_time, t("2026-01-01T00:00:00Z"));
        assert_eq!(b[0].message, "still down");
        // Flip: time moves.
        let c3 = [Cond::yes("SchemaReady", Reason::SchemaUpToDate, "v1")];
        let (c, f) = merge(&b, &c3, Some(2), &t("2026-01-01T00:02:00Z"));
        assert_eq!(f, c3.to_vec());
        assert_eq!(c[0].last_transition_time, t("2026-01-01T00:02:00Z"));
        assert_eq!(c[0].observed_generation, Some(2));
        // Recomputing the same outcome gives an identical list: no status write needed.
        let (d, _) = merge(&c, &c3, Some(2), &t("2026-01-01T00:09:00Z"));
        assert_eq!(c, d);
    }

    #[test]
    fn ready_takes_the_first_failure() {
        let a = Cond::yes("SchemaReady", Reason::SchemaUpToDate, "ok");
        let b = Cond::no("RetentionEnforced", Reason::PurgeFailed, "boom");
        let r = ready(&[&a, &b], "fine");
        assert_eq!((r.status, r.reason), (Status::False, Reason::PurgeFailed));
        assert!(r.message.contains("RetentionEnforced: boom"));
        assert_eq!(ready(&[&a], "fine").status, Status::True);
    }

    #[test]
    fn status_of_reads_a_previous_condition() {
        let now = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let computed = [Cond::no(condition::LAG_HEALTHY, Reason::LagAboveThreshold, "m")];
        let (prev, _) = merge(&[], &computed, None, &now);
        assert_eq!(status_of(&prev, condition::LAG_HEALTHY), Some(Status::False));
        assert_eq!(status_of(&prev, condition::READY), None);
    }

    #[test]
    fn reasons_read_back_as_written() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(*r));
        }
        assert_eq!(Reason::parse("resourceconflict"), None);
    }
}
