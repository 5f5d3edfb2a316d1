//! DedupPolicy: which InboxTables a policy selects and which of them are out of its bounds.

use std::{collections::BTreeMap, sync::Arc};

use futures::{future::BoxFuture, FutureExt};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    api::Api,
    runtime::controller::{Action, Controller},
    ResourceExt,
};

use super::{
    reconciler::{self, Outcome, Reconciler},
    status::requeue,
    watches::{every, label_changes, spec_changes, Watches},
    Context, Error,
};
use crate::{
    crd::{DedupPolicy, DedupPolicyStatus, NonCompliant, ValidDedupPolicy},
    operator::conditions::{condition, Cond, Reason},
    operator::policy::retention::{self, Compliance, PolicyView},
};

/// The server-side apply field manager of DedupPolicy status writes.
pub const MANAGER: &str = "lockstep-deduppolicy";

pub struct DedupPolicies;

/// Wire the controller: its own objects, and every InboxTable or namespace-label change (each may
/// change what a policy selects) re-reconciles every policy.
pub fn controller(
    watches: &mut Watches,
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> impl std::future::Future<Output = ()> {
    let store = watches.policies.store();
    let own = spec_changes(watches.policies.subscribe());
    let tables = spec_changes(watches.inboxes.subscribe());
    let namespaces = label_changes(watches.namespaces.subscribe());
    let (all, all_too) = (store.clone(), store.clone());
    let c = Controller::for_stream(own, store)
        .with_config(super::config())
        .watches_stream(tables, move |_| every(&all))
        .watches_stream(namespaces, move |_| every(&all_too))
        .graceful_shutdown_on(shutdown)
        .run(
            reconciler::reconcile::<DedupPolicies>,
            reconciler::error_policy::<DedupPolicies>,
            ctx,
        );
    super::drain(DedupPolicies::NAME, c)
}

impl Reconciler for DedupPolicies {
    type K = DedupPolicy;
    const NAME: &'static str = "deduppolicy";
    const MANAGER: &'static str = MANAGER;
    const PAUSED: Option<&'static str> = None;

    fn api(ctx: &Context, _namespace: Option<&str>) -> Result<Api<DedupPolicy>, Error> {
        Ok(Api::all(ctx.client.clone()))
    }
    fn reconcile<'a>(
        obj: &'a DedupPolicy,
        valid: ValidDedupPolicy,
        previous: &'a DedupPolicyStatus,
        ctx: &'a Context,
    ) -> BoxFuture<'a, Result<Outcome<DedupPolicyStatus>, Error>> {
        async move {
            if !ctx.caches_ready().await {
                return Ok(Outcome::Later(Action::requeue(ctx.timing.caches_filling)));
            }
            let view = PolicyView {
                name: obj.name_any(),
                policy: valid,
            };
            let tables = selectable_tables(ctx);
            let a = assess(&view, &tables, Timestamp::now());
            let msg = format!("selects {} InboxTable(s), {} outside its bounds", a.matched, a.non_compliant.len());
            let status = DedupPolicyStatus {
                matched: a.matched,
                non_compliant: a.non_compliant,
                applied_spec: Some(obj.spec.clone()),
                ..previous.clone()
            };
            Ok(Outcome::Status {
                conditions: vec![Cond::yes(condition::READY, Reason::Ready, msg)],
                status,
                action: requeue(ctx.timing.policy_refresh, a.next_change.as_ref()),
            })
        }
        .boxed()
    }
}

/// An InboxTable as a policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TableView {
    pub namespace: String,
    pub name: String,
    pub namespace_labels: BTreeMap<String, String>,
    /// The requested retention as written and parsed; None: none requested. Err: invalid spec.
    pub requested: Result<Option<(String, std::time::Duration)>, ()>,
}

fn selectable_tables(ctx: &Context) -> Vec<TableView> {
    let mut tables: Vec<TableView> = ctx
        .caches
        .inboxes
        .state()
        .iter()
        .filter_map(|t| {
            let (ns, inbox) = (t.namespace()?, t.0.as_ref().ok()?);
            let requested = inbox
                .spec
                .validate()
                .map(|v| v.retention.map(|r| (r.text, r.value)))
                .map_err(|_| ());
            Some(TableView {
                namespace_labels: ctx.namespace_labels(&ns),
                namespace: ns,
                name: inbox.name_any(),
                requested,
            })
        })
        .collect();
    tables.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    tables
}

/// What one policy makes of the tables it selects.
#[derive(Debug, Clone, PartialEq)]
pub struct Assessment {
    pub matched: i32,
    pub non_compliant: Vec<NonCompliant>,
    /// The next time the outcome can change by itself (an exception expiring).
    pub next_change: Option<Time>,
}

/// Which tables the policy selects, and which of them ask for a retention outside its bounds
/// (judged by this policy alone). A table with an invalid spec counts as selected. Pure.
pub fn assess(policy: &PolicyView, tables: &[TableView], now: Timestamp) -> Assessment {
    let mut a = Assessment {
        matched: 0,
        non_compliant: Vec::new(),
        next_change: None,
    };
    for t in tables {
        if !retention::selector_matches(policy.policy.namespace_selector.as_ref(), &t.namespace_labels) {
            continue;
        }
        a.matched += 1;
        let Ok(requested) = &t.requested else { continue };
        let requested = requested.as_ref().map(|(text, v)| (text.as_str(), *v));
        let eff = retention::effective(
            &t.namespace,
            &t.name,
            &t.namespace_labels,
            requested,
            std::slice::from_ref(policy),
            now,
        );
        if let Some(c) = eff.next_change {
            a.next_change = Some(match a.next_change.take() {
                Some(n) if n.0 <= c.0 => n,
                _ => c,
            });
        }
        let reason = match eff.compliance {
            Compliance::Clamped { .. } => Some(format!("{} (Enforce)", eff.message)),
            Compliance::Violation { messages } => Some(messages.join("; ")),
            _ => None,
        };
        if let Some(reason) = reason {
            a.non_compliant.push(NonCompliant {
                namespace: t.namespace.clone(),
                name: t.name.clone(),
                reason,
            });
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{crd::Enforcement, operator::controller::fixtures::*};

    #[test]
    fn selects_by_namespace_labels_and_lists_tables_out_of_bounds() {
        let p = policy("payments-floor", Some("24h"), Some("payments"), Enforcement::Enforce);
        let tables = [
            table("pay", "short", "payments", Ok(Some("1h"))),
            table("pay", "long", "payments", Ok(Some("7d"))),
            table("pay", "default", "payments", Ok(None)),
            table("pay", "broken", "payments", Err(())),
            table("web", "short", "web", Ok(Some("1h"))),
        ];
        let a = assess(&p, &tables, now());
        assert_eq!(a.matched, 4, "invalid tables count as selected; other teams do not");
        assert_eq!(a.non_compliant.len(), 1);
        let nc = &a.non_compliant[0];
        assert_eq!((nc.namespace.as_str(), nc.name.as_str()), ("pay", "short"));
        assert!(nc.reason.ends_with("(Enforce)"), "{}", nc.reason);
        assert_eq!(a.next_change, None);
    }

    #[test]
    fn audit_reports_violations() {
        let p = policy("audit", Some("24h"), None, Enforcement::Audit);
        let a = assess(&p, &[table("a", "t", "x", Ok(Some("1h")))], now());
        assert_eq!(a.matched, 1);
        assert!(!a.non_compliant[0].reason.contains("(Enforce)"), "{}", a.non_compliant[0].reason);
    }

    #[test]
    fn earliest_exception_expiry_is_the_next_change() {
        let exceptions = vec![
            exception("a", "t1", "1h", "2026-06-03T00:00:00Z"),
            exception("a", "t2", "1h", "2026-06-02T00:00:00Z"),
        ];
        let p = policy_with("floor", Some("24h"), None, Enforcement::Enforce, exceptions);
        let tables = [table("a", "t1", "x", Ok(Some("1h"))), table("a", "t2", "x", Ok(Some("1h")))];
        let a = assess(&p, &tables, now());
        assert!(a.non_compliant.is_empty(), "{:?}", a.non_compliant);
        assert_eq!(a.next_change, Some(Time("2026-06-02T00:00:00Z".parse().unwrap())));
    }
}
