//! An OutboxRelay's conditions and when to look again, from what its reconcile found. Each part
//! arrives already judged by its own pure verdict (`ownership`, `relay_topics`, `relay_available`,
//! `lag`); this decides how they add up. Pure: no client, no I/O.

use crate::{
    core::sql::QualifiedName,
    operator::conditions::{self, condition, Cond, Reason, Status},
};

/// What the reconcile found.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    /// Another object manages the table (SchemaReady says which): topics, relay and lag were not
    /// looked at, and this object's relay was stopped (Err: why it could not be).
    Conflict { schema: Cond, stopped: Result<(), String> },
    /// Every part, judged; `prerequisites` while the tables were never ready.
    Parts {
        schema: Cond,
        topics: Cond,
        relay: Cond,
        lag: Cond,
        prerequisites: Option<Cond>,
    },
}

/// When to look again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// After the retry interval: what is not True may be over by then.
    Retry,
    /// After the refresh interval: all is well, or what is wrong is reported by a watch or waits
    /// for a person.
    Refresh,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Ready, SchemaReady, TopicsReady, RelayAvailable, LagHealthy, then PrerequisitesMet if found.
    pub conditions: Vec<Cond>,
    pub next: Next,
}

/// The conditions of an OutboxRelay of `table`, and when to look again. Pure.
pub fn verdict(table: &QualifiedName, found: Found) -> Verdict {
    match found {
        Found::Conflict { schema, stopped } => conflicted(schema, stopped),
        Found::Parts {
            schema,
            topics,
            relay,
            lag,
            prerequisites,
        } => {
            let mut v = judged(table, schema, topics, relay, lag);
            v.conditions.extend(prerequisites);
            v
        }
    }
}

fn judged(table: &QualifiedName, schema: Cond, topics: Cond, relay: Cond, lag: Cond) -> Verdict {
    // A relay scaled to zero on purpose does not make the resource unready, nor is it something
    // to look at again soon.
    let mut parts = vec![&schema, &topics];
    if relay.reason != Reason::ScaledToZero {
        parts.push(&relay);
    }
    // Buckets changing hands are looked at again before their grace ends.
    let retry = relay.reason == Reason::BucketsMoving || parts.iter().any(|c| c.status != Status::True && heals_soon(c.reason));
    // Lag is health, not readiness: it stays out of Ready, which `kubectl wait` watches.
    let ready = conditions::ready(
        &parts,
        format!("{table} is migrated, its topics are configured and a relay is active"),
    );
    Verdict {
        conditions: vec![ready, schema, topics, relay, lag],
        next: if retry { Next::Retry } else { Next::Refresh },
    }
}

/// Whether a part that is not True is worth looking at again soon. Not when the Deployment's pods
/// are unavailable (the Deployment watch reports when they are) nor when the database refused the
/// role (it waits for a grant, at the refresh interval).
fn heals_soon(reason: Reason) -> bool {
    !matches!(reason, Reason::DeploymentUnavailable | Reason::PermissionDenied)
}

/// Another object manages the outbox: no topics, no relay, no lag; looked at again soon, so the
/// table is claimed as soon as the other object lets it go.
fn conflicted(schema: Cond, stopped: Result<(), String>) -> Verdict {
    let stopped = match stopped {
        Ok(()) => "no relay runs for this object".to_owned(),
        Err(e) => format!("stopping this object's relay: {e}"),
    };
    let why = |type_, status, m: String| Cond::new(type_, status, Reason::ResourceConflict, m);
    let ready = conditions::ready(&[&schema], String::new());
    let topics = why(
        condition::TOPICS_READY,
        Status::Unknown,
        "topics are not configured while the table is another object's".into(),
    );
    let relay = why(condition::RELAY_AVAILABLE, Status::False, stopped);
    let lag = why(
        condition::LAG_HEALTHY,
        Status::Unknown,
        "not measured while the table is another object's".into(),
    );
    Verdict {
        conditions: vec![ready, schema, topics, relay, lag],
        next: Next::Retry,
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use super::*;
    use crate::{
        operator::controller::{
            fixtures::{lag_ok, one_relay, schema_ok, topics_ok, two_relays_owning},
            ownership, relay_topics,
        },
        operator::policy::topics::{plan, tests::desired},
        tables::schema::{qualified, Owner},
    };

    fn table() -> QualifiedName {
        qualified("billing", "orders_outbox")
    }

    fn parts(schema: Cond, topics: Cond, relay: Cond) -> Found {
        with_lag(schema, topics, relay, lag_ok(), None)
    }

    fn with_lag(schema: Cond, topics: Cond, relay: Cond, lag: Cond, prerequisites: Option<Cond>) -> Found {
        Found::Parts {
            schema,
            topics,
            relay,
            lag,
            prerequisites,
        }
    }

    /// Ready's status and reason, and when to look again.
    fn ready(v: &Verdict) -> (Status, Reason, Next) {
        assert_eq!(v.conditions[0].type_, condition::READY);
        (v.conditions[0].status, v.conditions[0].reason, v.next)
    }

    #[test]
    fn a_relay_holding_the_lock_with_its_topics_configured_is_ready() {
        let v = verdict(&table(), parts(schema_ok(), topics_ok(), one_relay(2, 2, true)));
        assert_eq!(ready(&v), (Status::True, Reason::Ready, Next::Refresh));
        assert_eq!(
            v.conditions[0].message,
            r#""billing"."orders_outbox" is migrated, its topics are configured and a relay is active"#
        );
        let types: Vec<&str> = v.conditions.iter().map(|c| c.type_).collect();
        assert_eq!(types, ["Ready", "SchemaReady", "TopicsReady", "RelayAvailable", "LagHealthy"]);
        let met = Cond::yes(condition::PREREQUISITES_MET, Reason::PrerequisitesMet, "no check failed");
        let found = with_lag(schema_ok(), topics_ok(), one_relay(2, 2, true), lag_ok(), Some(met.clone()));
        assert_eq!(verdict(&table(), found).conditions[5], met, "PrerequisitesMet comes last");
    }

    #[test]
    fn a_relay_scaled_to_zero_on_purpose_leaves_ready_alone() {
        let v = verdict(&table(), parts(schema_ok(), topics_ok(), one_relay(0, 0, false)));
        assert_eq!(ready(&v), (Status::True, Reason::Ready, Next::Refresh));
        assert_eq!(
            (v.conditions[3].status, v.conditions[3].reason),
            (Status::False, Reason::ScaledToZero)
        );
    }

    #[test]
    fn lag_is_reported_but_never_decides_ready() {
        for lag in [
            Cond::no(condition::LAG_HEALTHY, Reason::LagAboveThreshold, "the oldest is 40s old"),
            Cond::unknown(condition::LAG_HEALTHY, Reason::DatabaseError, "cannot measure the outbox"),
        ] {
            let v = verdict(
                &table(),
                with_lag(schema_ok(), topics_ok(), one_relay(1, 1, true), lag.clone(), None),
            );
            assert_eq!(ready(&v), (Status::True, Reason::Ready, Next::Refresh));
            assert_eq!(v.conditions[4], lag);
        }
    }

    #[test]
    fn a_relay_coming_back_is_looked_at_soon_and_ready_once_it_holds_the_lock() {
        let judge = |r| verdict(&table(), parts(schema_ok(), topics_ok(), r));
        // Pods up but none holds the lock yet (database away, tables being prepared): soon again.
        let v = judge(one_relay(2, 1, false));
        assert_eq!(ready(&v), (Status::False, Reason::NoActiveRelay, Next::Retry));
        assert!(
            v.conditions[0]
                .message
                .starts_with("RelayAvailable: 1/2 relay pods available but none holds"),
            "{}",
            v.conditions[0].message
        );
        // No pod available: the Deployment watch says when one is, no need to poll.
        assert_eq!(
            ready(&judge(one_relay(2, 0, false))),
            (Status::False, Reason::DeploymentUnavailable, Next::Refresh)
        );
        assert_eq!(ready(&judge(one_relay(2, 2, true))), (Status::True, Reason::Ready, Next::Refresh));
    }

    #[test]
    fn buckets_changing_hands_are_looked_at_again_before_the_grace_ends() {
        let judge = |r| verdict(&table(), parts(schema_ok(), topics_ok(), r));
        let moving = judge(two_relays_owning(0..60, Some(Duration::from_secs(3))));
        assert_eq!(moving.conditions[3].reason, Reason::BucketsMoving);
        assert_eq!(ready(&moving), (Status::True, Reason::Ready, Next::Retry));
        let unowned = judge(two_relays_owning(0..60, Some(Duration::from_secs(15))));
        assert_eq!(ready(&unowned), (Status::False, Reason::BucketsUnowned, Next::Retry));
        let taken = judge(two_relays_owning(0..64, None));
        assert_eq!(ready(&taken), (Status::True, Reason::Ready, Next::Refresh));
    }

    #[test]
    fn a_database_that_comes_back_heals_the_resource() {
        let down = Cond::no(
            condition::SCHEMA_READY,
            Reason::DatabaseUnreachable,
            "db:5432/app: connection refused",
        );
        let v = verdict(&table(), parts(down, topics_ok(), one_relay(1, 1, false)));
        assert_eq!(ready(&v), (Status::False, Reason::DatabaseUnreachable, Next::Retry));
        assert_eq!(v.conditions[0].message, "SchemaReady: db:5432/app: connection refused");
        let v = verdict(&table(), parts(schema_ok(), topics_ok(), one_relay(1, 1, true)));
        assert_eq!(ready(&v), (Status::True, Reason::Ready, Next::Refresh));
    }

    #[test]
    fn the_first_part_not_true_decides_ready() {
        let unknown = Cond::unknown(condition::SCHEMA_READY, Reason::DatabaseError, "cannot read the cluster's identity");
        let down = Cond::no(condition::TOPICS_READY, Reason::BrokerUnreachable, "k:9092: timeout");
        let v = verdict(&table(), parts(unknown, down.clone(), one_relay(1, 1, true)));
        assert_eq!(ready(&v), (Status::Unknown, Reason::DatabaseError, Next::Retry));
        let v = verdict(&table(), parts(schema_ok(), down, one_relay(1, 0, false)));
        assert_eq!(ready(&v), (Status::False, Reason::BrokerUnreachable, Next::Retry));
    }

    #[test]
    fn each_failure_is_readys_reason_and_only_some_wait_for_the_refresh() {
        use condition::{RELAY_AVAILABLE as R, SCHEMA_READY as S, TOPICS_READY as T};
        let cases = [
            (S, Reason::SecretNotFound, Next::Retry),
            (S, Reason::SecretKeyMissing, Next::Retry),
            (S, Reason::SchemaMismatch, Next::Retry),
            (S, Reason::SchemaMissing, Next::Retry),
            (S, Reason::PermissionDenied, Next::Refresh),
            (T, Reason::TopicOperationFailed, Next::Retry),
            (T, Reason::PartitionChangeRefused, Next::Retry),
            (T, Reason::SecretKeyRefused, Next::Retry),
            (R, Reason::DeploymentFailed, Next::Retry),
            (R, Reason::SecretNotFound, Next::Retry),
            (R, Reason::InvalidSpec, Next::Retry),
            (R, Reason::BucketsChanging, Next::Retry),
            (R, Reason::DatabaseError, Next::Retry),
        ];
        for (type_, reason, next) in cases {
            let failed = Cond::no(type_, reason, "m");
            let found = match type_ {
                S => parts(failed, topics_ok(), one_relay(1, 1, true)),
                T => parts(schema_ok(), failed, one_relay(1, 1, true)),
                _ => parts(schema_ok(), topics_ok(), failed),
            };
            let v = verdict(&table(), found);
            assert_eq!(ready(&v), (Status::False, reason, next), "{type_} {reason:?}");
            assert_eq!(v.conditions[0].message, format!("{type_}: m"));
        }
        // Topics restored after a drift, relays of the old bucket count still publishing: ready.
        let drift = Cond::yes(condition::TOPICS_READY, Reason::TopicConfigDrift, "restored");
        let changing = Cond::yes(condition::RELAY_AVAILABLE, Reason::BucketsChanging, "old relays publish");
        let v = verdict(&table(), parts(schema_ok(), drift, changing));
        assert_eq!(ready(&v), (Status::True, Reason::Ready, Next::Refresh));
    }

    fn owner(name: &str) -> Owner {
        Owner {
            cluster: "c1".into(),
            kind: "OutboxRelay".into(),
            namespace: "shop".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        }
    }

    /// What each condition says, in order.
    fn said(v: &Verdict) -> Vec<(&str, Status, Reason, &str)> {
        v.conditions
            .iter()
            .map(|c| (c.type_, c.status, c.reason, c.message.as_str()))
            .collect()
    }

    #[test]
    fn a_table_another_object_manages_stops_the_relay_and_says_so_everywhere() {
        let lost = ownership::conflict(&table(), &owner("first"), &owner("second"));
        let v = verdict(
            &table(),
            Found::Conflict {
                schema: lost.clone(),
                stopped: Ok(()),
            },
        );
        let ready = format!("SchemaReady: {}", lost.message);
        assert_eq!(
            said(&v),
            [
                ("Ready", Status::False, Reason::ResourceConflict, ready.as_str()),
                ("SchemaReady", Status::False, Reason::ResourceConflict, lost.message.as_str()),
                (
                    "TopicsReady",
                    Status::Unknown,
                    Reason::ResourceConflict,
                    "topics are not configured while the table is another object's"
                ),
                (
                    "RelayAvailable",
                    Status::False,
                    Reason::ResourceConflict,
                    "no relay runs for this object"
                ),
                (
                    "LagHealthy",
                    Status::Unknown,
                    Reason::ResourceConflict,
                    "not measured while the table is another object's"
                ),
            ]
        );
        // Looked at again soon: the table is claimed once the other object lets it go.
        assert_eq!(v.next, Next::Retry);
        let v = verdict(
            &table(),
            Found::Conflict {
                schema: lost,
                stopped: Err("cannot read Deployment shop/orders-relay: timeout".into()),
            },
        );
        assert_eq!(
            v.conditions[3].message,
            "stopping this object's relay: cannot read Deployment shop/orders-relay: timeout"
        );
    }

    #[test]
    fn a_table_lost_before_stays_lost_while_the_database_is_away() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
        let lost = ownership::conflict(&table(), &owner("first"), &owner("second"));
        let previous = [Condition {
            type_: lost.type_.into(),
            status: "False".into(),
            reason: lost.reason.as_str().into(),
            message: lost.message.clone(),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            observed_generation: None,
        }];
        let down = Cond::no(condition::SCHEMA_READY, Reason::DatabaseUnreachable, "db:5432/app: refused");
        let schema = ownership::sticky(&previous, down);
        assert_eq!(schema.reason, Reason::ResourceConflict, "the reconcile takes the conflict's way");
        let v = verdict(&table(), Found::Conflict { schema, stopped: Ok(()) });
        assert_eq!(ready(&v), (Status::False, Reason::ResourceConflict, Next::Retry));
        assert!(
            v.conditions[0].message.ends_with("(cannot claim again now: db:5432/app: refused)"),
            "{}",
            v.conditions[0].message
        );
    }

    #[test]
    fn a_topic_another_object_manages_makes_it_unready() {
        let d = [desired("theirs", 3, &[]), desired("mine", 1, &[])];
        let held = BTreeMap::from([("theirs".to_string(), "OutboxRelay a/orders".to_string())]);
        let (topics, _) = relay_topics::topics_verdict(&d, &BTreeMap::new(), &plan(&d[1..], &BTreeMap::new()), &[], &held);
        let v = verdict(&table(), parts(schema_ok(), topics, one_relay(1, 1, true)));
        assert_eq!(ready(&v), (Status::False, Reason::ResourceConflict, Next::Retry));
        assert!(
            v.conditions[0]
                .message
                .starts_with("TopicsReady: topic theirs is managed by OutboxRelay a/orders"),
            "{}",
            v.conditions[0].message
        );
        assert_eq!(v.conditions[3].reason, Reason::Available, "its relay still runs");
    }

    #[test]
    fn a_deployment_or_budget_another_object_controls_makes_it_unready() {
        for kind in ["Deployment", "PodDisruptionBudget"] {
            let foreign = ownership::foreign_child(kind, "shop", "orders-relay", "created outside lockstep");
            let v = verdict(&table(), parts(schema_ok(), topics_ok(), foreign));
            assert_eq!(ready(&v), (Status::False, Reason::ResourceConflict, Next::Retry));
            let expected = format!("RelayAvailable: {kind} shop/orders-relay exists and is not this OutboxRelay's");
            assert!(v.conditions[0].message.starts_with(&expected), "{}", v.conditions[0].message);
        }
    }
}
