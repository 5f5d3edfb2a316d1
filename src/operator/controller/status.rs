//! Status: merge computed conditions into the previous status, write it only when it changed
//! (server-side apply, one field manager per controller), an Event per condition that flipped,
//! and when to look again.

use std::time::Duration;

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    api::{Api, Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType},
    },
    Resource,
};
use serde::{de::DeserializeOwned, Serialize};

use super::{Context, Error};
use crate::{
    crd::{DedupPolicyStatus, InboxTableStatus, OutboxRelayStatus},
    operator::conditions::{self, condition, Cond, Reason, Status},
};

/// A status with Kubernetes conditions and an observed generation.
pub trait Conditioned: Clone + Default + PartialEq + Serialize + Send + Sync {
    fn conditions(&self) -> &[Condition];
    fn observed_generation(&self) -> Option<i64>;
    fn set_conditions(&mut self, generation: Option<i64>, conditions: Vec<Condition>);
}

macro_rules! conditioned {
    ($($t:ty),*) => {$(
        impl Conditioned for $t {
            fn conditions(&self) -> &[Condition] {
                &self.conditions
            }
            fn observed_generation(&self) -> Option<i64> {
                self.observed_generation
            }
            fn set_conditions(&mut self, generation: Option<i64>, conditions: Vec<Condition>) {
                self.observed_generation = generation;
                self.conditions = conditions;
            }
        }
    )*};
}
conditioned!(InboxTableStatus, OutboxRelayStatus, DedupPolicyStatus);

pub fn now() -> Time {
    Time(Timestamp::now())
}

/// `status` with `computed` merged into its conditions; also the conditions that flipped.
pub fn merged<S: Conditioned>(status: S, generation: Option<i64>, computed: &[Cond], now: &Time) -> (S, Vec<Cond>) {
    let (conds, flipped) = conditions::merge(status.conditions(), computed, generation, now);
    let mut status = status;
    status.set_conditions(generation, conds);
    (status, flipped)
}

/// Server-side apply of a status, with apiVersion and kind, under the controller's field manager.
pub async fn apply<K>(api: &Api<K>, name: &str, manager: &str, status: &impl Serialize) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(name, &PatchParams::apply(manager).force(), &Patch::Apply(&patch))
        .await?;
    Ok(())
}

/// Write `status` if it differs from `previous`, then an Event per flipped condition.
pub async fn write<K, S>(
    ctx: &Context,
    api: &Api<K>,
    obj: &K,
    manager: &str,
    previous: &S,
    status: &S,
    flipped: &[Cond],
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize + PartialEq,
{
    if status != previous {
        let name = obj.meta().name.clone().unwrap_or_default();
        apply(api, &name, manager, status).await?;
    }
    publish_flips(ctx, obj, flipped).await;
    Ok(())
}

/// An object the Rust type cannot read (DeserializeGuard): say so on it and wait for a fix.
pub async fn report_unreadable<K>(api: &Api<K>, name: &str, manager: &str, generation: Option<i64>, error: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let c = Cond::no(
        condition::READY,
        Reason::InvalidSpec,
        format!("the object does not match the {} schema: {error}", K::kind(&())),
    );
    let (conds, _) = conditions::merge(&[], &[c], generation, &now());
    apply(api, name, manager, &serde_json::json!({ "conditions": conds })).await
}

/// The conditions an Event tells of: each that flipped, and a TopicConfigDrift even when its
/// status stays True, since it says what the operator set back (changed outside lockstep), which
/// the next reconcile's message no longer shows.
pub fn noted(computed: &[Cond], flipped: &[Cond]) -> Vec<Cond> {
    let drift = computed
        .iter()
        .filter(|c| c.reason == Reason::TopicConfigDrift && !flipped.iter().any(|f| f.type_ == c.type_));
    flipped.iter().chain(drift).cloned().collect()
}

/// One Event per condition whose status flipped.
async fn publish_flips<K: Resource<DynamicType = ()>>(ctx: &Context, obj: &K, flipped: &[Cond]) {
    // Events about cluster-scoped objects (DedupPolicy) are rejected by some API servers
    // (1.20 demands a namespace); their status carries the same information.
    if obj.meta().namespace.is_none() {
        return;
    }
    for c in flipped {
        publish(ctx, obj, event(c)).await;
    }
}

/// Publish an Event about `obj`; a failure is logged, never fatal.
pub async fn publish<K: Resource<DynamicType = ()>>(ctx: &Context, obj: &K, e: Event) {
    if let Err(err) = ctx.recorder.publish(&e, &obj.object_ref(&())).await {
        tracing::warn!(error = %err, "cannot publish Event");
    }
}

fn event(c: &Cond) -> Event {
    Event {
        type_: if c.status == Status::False {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: c.reason.as_str().to_owned(),
        note: Some(format!("{} is {}: {}", c.type_, c.status.as_str(), truncate(&c.message, 1000))),
        action: "Reconcile".into(),
        secondary: None,
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Requeue after `refresh`, or earlier when the outcome changes by itself at `next_change`.
pub fn requeue(refresh: Duration, next_change: Option<&Time>) -> Action {
    Action::requeue(requeue_delay(refresh, next_change, Timestamp::now()))
}

fn requeue_delay(refresh: Duration, next_change: Option<&Time>, now: Timestamp) -> Duration {
    let until = next_change.and_then(|t| {
        let d = t.0.duration_since(now).as_secs_f64();
        (d > 0.0).then(|| Duration::from_secs_f64(d) + Duration::from_millis(100))
    });
    until.map_or(refresh, |u| u.min(refresh))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    #[test]
    fn drift_is_noted_every_time_and_other_conditions_only_when_they_flip() {
        let ready = Cond::yes(condition::READY, Reason::Ready, "ok");
        let drift = Cond::yes(condition::TOPICS_READY, Reason::TopicConfigDrift, "retention.ms: 1 -> 2");
        let computed = [ready.clone(), drift.clone()];
        assert_eq!(noted(&computed, &[]), vec![drift.clone()]);
        assert_eq!(noted(&computed, std::slice::from_ref(&drift)), vec![drift.clone()], "once");
        assert_eq!(noted(&computed, std::slice::from_ref(&ready)), vec![ready, drift]);
        assert!(noted(&[Cond::yes(condition::TOPICS_READY, Reason::TopicsConfigured, "1")], &[]).is_empty());
    }

    #[test]
    fn merged_keeps_measured_fields_and_sets_generation() {
        let previous = InboxTableStatus {
            rows: Some(7),
            ..Default::default()
        };
        let c = [Cond::yes(condition::READY, Reason::Ready, "ok")];
        let (s, flipped) = merged(previous.clone(), Some(3), &c, &t("2026-01-01T00:00:00Z"));
        assert_eq!((s.rows, s.observed_generation, flipped.len()), (Some(7), Some(3), 1));
        // The same verdict again: an identical status, so no write and no Event.
        let (again, flipped) = merged(s.clone(), Some(3), &c, &t("2026-01-01T00:05:00Z"));
        assert_eq!((again, flipped.len()), (s, 0));
    }

    #[test]
    fn events_warn_on_false_only_and_stay_short() {
        let e = event(&Cond::no(condition::SCHEMA_READY, Reason::SchemaMismatch, "x".repeat(5000)));
        assert_eq!(e.type_, EventType::Warning);
        assert_eq!(e.reason, "SchemaMismatch");
        assert!(e.note.unwrap().len() < 1100);
        assert_eq!(
            event(&Cond::unknown(condition::READY, Reason::Paused, "p")).type_,
            EventType::Normal
        );
    }

    #[test]
    fn requeue_comes_early_for_a_change_due_sooner() {
        let now = t("2026-01-01T00:00:00Z").0;
        let minute = Duration::from_secs(60);
        let soon = t("2026-01-01T00:00:02Z");
        assert_eq!(requeue_delay(minute, Some(&soon), now), Duration::from_millis(2100));
        assert_eq!(requeue_delay(minute, None, now), minute);
        assert_eq!(requeue_delay(minute, Some(&t("2025-01-01T00:00:00Z")), now), minute);
        assert_eq!(requeue_delay(minute, Some(&t("2026-01-02T00:00:00Z")), now), minute);
    }
}
