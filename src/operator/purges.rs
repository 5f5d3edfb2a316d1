//! The operator's purge loops: one per InboxTable, each purging expired rows on its own phase of
//! the interval, only while this replica leads. The purge SQL is in `tables::purge`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};

use crate::{
    core::sql::QualifiedName,
    tables::purge::{purge_expired_until, PurgeResult, PAUSE_RATIO},
};

#[derive(Debug, Clone, PartialEq)]
pub struct PurgeParams {
    /// Identifies the database URL (not the URL itself): a changed Secret swaps the pool.
    pub pool_key: String,
    pub table: QualifiedName,
    pub retention: Duration,
    pub interval: Duration,
    pub batch: i64,
    /// The series this table's purges count in.
    pub labels: crate::operator::metrics::PurgeLabel,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LastPurge {
    Done { at: Time, result: PurgeResult },
    Failed { at: Time, error: String, unreachable: bool },
}

struct Handle {
    params: watch::Sender<(PurgeParams, PgPool)>,
    last: Arc<Mutex<Option<LastPurge>>>,
    task: tokio::task::JoinHandle<()>,
}

/// One purge loop per InboxTable, keyed by the object's uid. Loops run only while this replica
/// leads: a standby's view (or a deposed leader's) may be stale, and a purge cannot be undone.
pub struct Purges<K: Clone + Send + 'static> {
    loops: Mutex<HashMap<String, Handle>>,
    /// Told after each purge, so the controller refreshes that object's status.
    done: mpsc::UnboundedSender<K>,
    metrics: Arc<crate::operator::metrics::Metrics>,
    /// Whether this replica holds the leader Lease (always true without leader election).
    leading: watch::Receiver<bool>,
}

impl<K: Clone + Send + Sync + 'static> Purges<K> {
    pub fn new(done: mpsc::UnboundedSender<K>, metrics: Arc<crate::operator::metrics::Metrics>, leading: watch::Receiver<bool>) -> Self {
        Purges {
            loops: Mutex::new(HashMap::new()),
            done,
            metrics,
            leading,
        }
    }

    /// Start the loop for `uid`, or hand it new parameters. Refused (false, and every loop
    /// stopped) when this replica does not lead: a reconcile still in flight after the Lease was
    /// lost must not start a purge by what it read before.
    pub fn ensure(&self, uid: &str, key: K, pool: PgPool, params: PurgeParams) -> bool {
        let mut loops = self.loops.lock().expect("purge map lock");
        if !*self.leading.borrow() {
            loops.drain().for_each(|(_, h)| h.task.abort());
            return false;
        }
        if let Some(h) = loops.get(uid) {
            if !h.task.is_finished() {
                h.params.send_if_modified(|(p, pl)| {
                    let changed = *p != params;
                    if changed {
                        *p = params.clone();
                        *pl = pool.clone();
                    }
                    changed
                });
                return true;
            }
        }
        let (tx, mut rx) = watch::channel((params, pool));
        let mut leading = self.leading.clone();
        let last = Arc::new(Mutex::new(None));
        let last2 = last.clone();
        let done = self.done.clone();
        let metrics = self.metrics.clone();
        let phase = uid.to_owned();
        let task = tokio::spawn(async move {
            loop {
                // Not leading, or nobody left to say so (the elector ended): no purge.
                if !*leading.borrow_and_update() || leading.has_changed().is_err() {
                    return;
                }
                let (p, pool) = rx.borrow_and_update().clone();
                // New parameters (a raised retention) or a lost Lease stop a running purge before
                // its next batch.
                let stop = || rx.has_changed().unwrap_or(true) || !*leading.borrow();
                let run = purge_expired_until(&pool, &p.table, p.retention, p.batch, PAUSE_RATIO, stop).await;
                let outcome = match run {
                    Ok(result) => {
                        metrics.purged_rows.get_or_create(&p.labels).inc_by(result.rows_deleted as u64);
                        metrics
                            .purge_duration
                            .get_or_create(&p.labels)
                            .observe(result.duration.as_secs_f64());
                        LastPurge::Done {
                            at: Time(Timestamp::now()),
                            result,
                        }
                    }
                    Err(e) => {
                        metrics.purge_failures.get_or_create(&p.labels).inc();
                        LastPurge::Failed {
                            at: Time(Timestamp::now()),
                            error: e.to_string(),
                            unreachable: crate::clients::db::is_unreachable(&e),
                        }
                    }
                };
                *last2.lock().expect("last purge lock") = Some(outcome);
                if done.send(key.clone()).is_err() {
                    return;
                }
                if rx.has_changed().unwrap_or(false) {
                    continue;
                }
                // On the table's own phase of the interval: loops started together (the
                // operator starting) do not purge, and then reconcile, in one burst.
                let wait = crate::core::duration::phased(p.interval, &phase, std::time::SystemTime::now());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    changed = rx.changed() => if changed.is_err() { return },
                    _ = leading.wait_for(|l| !*l) => return,
                }
            }
        });
        loops.insert(uid.to_owned(), Handle { params: tx, last, task });
        true
    }

    pub fn last(&self, uid: &str) -> Option<LastPurge> {
        self.loops
            .lock()
            .expect("purge map lock")
            .get(uid)
            .and_then(|h| h.last.lock().expect("last purge lock").clone())
    }

    pub fn stop(&self, uid: &str) {
        if let Some(h) = self.loops.lock().expect("purge map lock").remove(uid) {
            h.task.abort();
        }
    }

    /// Stop loops whose object is gone.
    pub fn retain(&self, alive: impl Fn(&str) -> bool) {
        self.loops.lock().expect("purge map lock").retain(|uid, h| {
            let keep = alive(uid);
            if !keep {
                h.task.abort();
            }
            keep
        });
    }
}
