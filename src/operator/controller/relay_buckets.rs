//! What pg_locks shows of an outbox's relays, in one query (no pod is asked): the table lock a
//! relay with buckets 1 holds exclusively, and the bucket and member locks of relays with more
//! (`crate::tables::buckets`). From it, RelayAvailable with buckets (every bucket owned?), a change of
//! `spec.relay.buckets` rolling out, and `status.relays`.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use sqlx::{PgPool, Row};

use crate::{
    crd::{Cleanup, RelayShare, ValidOutboxRelay},
    operator::conditions::{condition, Cond, Reason},
    tables::buckets::{class_key, Holdings},
    tables::identity::host_of,
    tables::locks::lock_key,
    tables::schema,
};

/// The relay locks of one outbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locks {
    /// A session holds the table lock exclusively: a relay with buckets 1 is active.
    pub single: bool,
    /// The bucket and member locks, decoded for the spec's bucket count.
    pub holdings: Holdings,
    /// application_name of the sessions holding them, where pg_stat_activity shows it.
    pub names: BTreeMap<i32, String>,
}

impl Locks {
    /// Some relay holds a lock of this outbox.
    pub fn any(&self) -> bool {
        let h = &self.holdings;
        self.single || !h.members.is_empty() || !h.others.is_empty() || !h.owners.is_empty() || h.others_owning > 0
    }
}

/// Read the relay locks of `v`'s outbox. A bigint advisory lock shows in pg_locks as classid =
/// high 32 bits, objid = low 32 bits, objsubid = 1; a two-int one as classid, objid, objsubid = 2
/// (oids: the negative ints read as their unsigned 32 bits).
pub async fn read(pool: &PgPool, v: &ValidOutboxRelay) -> Result<Locks, sqlx::Error> {
    let key = lock_key(&v.table) as u64;
    let rows = sqlx::query(
        "select l.objsubid::int4 as sub, l.objid::int8 as code, l.mode, l.pid, a.application_name
         from pg_locks l left join pg_stat_activity a on a.pid = l.pid
         where l.locktype = 'advisory' and l.granted
           and l.database = (select oid from pg_database where datname = current_database())
           and ((l.objsubid = 2 and l.classid::int8 = ($1::int8 & 4294967295))
             or (l.objsubid = 1 and l.classid::int8 = $2 and l.objid::int8 = $3))",
    )
    .bind(i64::from(class_key(&v.table)))
    .bind((key >> 32) as i64)
    .bind((key & 0xffff_ffff) as i64)
    .fetch_all(pool)
    .await?;
    let mut locks = Locks::default();
    let mut codes = Vec::new();
    for r in rows {
        let (sub, code, mode, pid): (i32, i64, Option<String>, Option<i32>) = (r.get("sub"), r.get("code"), r.get("mode"), r.get("pid"));
        // A prepared transaction's lock has no pid; relays hold session locks.
        let Some(pid) = pid else { continue };
        if let Some(name) = r.get::<Option<String>, _>("application_name").filter(|n| !n.is_empty()) {
            locks.names.insert(pid, name);
        }
        match sub {
            1 => locks.single |= mode.as_deref() == Some("ExclusiveLock"),
            _ => codes.push((code, pid)),
        }
    }
    locks.holdings = Holdings::from_locks(v.buckets, codes);
    Ok(locks)
}

/// Age in seconds of the oldest unpublished row of each bucket that has one: one probe per bucket
/// through the relay's index on `(lockstep_bucket(key, B), seq)`. None while that index is not
/// there and valid (the relay builds it concurrently at start): without it each probe would scan
/// the table.
pub async fn oldest_by_bucket(pool: &PgPool, v: &ValidOutboxRelay) -> Result<Option<BTreeMap<u16, f64>>, sqlx::Error> {
    let (t, b) = (&v.table, v.buckets);
    let (index, _) = schema::buckets::index(t, v.key, b, v.cleanup);
    let valid = schema::index_valid(pool, t.schema.as_str(), index.as_str()).await?;
    if valid != Some(true) {
        return Ok(None);
    }
    // The index of MarkPublished holds only the unpublished rows: the same predicate uses it.
    let unpublished = match v.cleanup {
        Cleanup::MarkPublished => " and published_at is null",
        Cleanup::Delete => "",
    };
    let rows: Vec<(i32, Option<f64>)> = sqlx::query_as(&format!(
        "select b, extract(epoch from now() - (select created_at from {t}
                where {} = b{unpublished} order by seq limit 1))::float8
         from generate_series(0, {b} - 1) b",
        schema::buckets::expression(t, v.key, b)
    ))
    .fetch_all(pool)
    .await?;
    Ok(Some(
        rows.into_iter()
            .filter_map(|(bucket, age)| Some((u16::try_from(bucket).ok()?, age?)))
            .collect(),
    ))
}

/// "1 relay" / "3 relays".
fn relays(n: usize) -> String {
    format!("{n} relay{}", if n == 1 { "" } else { "s" })
}

/// RelayAvailable while relays of another bucket count than the spec's hold locks (a change of
/// `spec.relay.buckets` rolling out), None otherwise. Pure. Relays of two counts never publish
/// at once: the new ones wait until the last old one stopped. True while the old ones still own
/// every bucket of theirs (every key still flows), False once some are unowned.
pub fn changing(buckets: u16, locks: &Locks, pods: &str) -> Option<Cond> {
    let h = &locks.holdings;
    let t = condition::RELAY_AVAILABLE;
    let waiting = match h.members.len() {
        0 => String::new(),
        n => format!(" ({} waiting)", relays(n)),
    };
    if locks.single && buckets > 1 {
        return Some(Cond::yes(
            t,
            Reason::BucketsChanging,
            format!(
                "a relay with buckets 1 holds the outbox lock and publishes every key; the relays with {buckets} buckets{waiting} \
                 start once it stopped (the Deployment's rollout replaces it); {pods}"
            ),
        ));
    }
    if locks.single || (h.others.is_empty() && h.others_owning == 0) {
        return None;
    }
    let mut by_count: BTreeMap<u16, BTreeSet<i32>> = BTreeMap::new();
    for (pid, b) in &h.others {
        by_count.entry(*b).or_default().insert(*pid);
    }
    let old: Vec<String> = by_count
        .iter()
        .map(|(b, p)| format!("{} with {b} buckets", relays(p.len())))
        .collect();
    let old = if old.is_empty() {
        "relays of another bucket count".to_owned()
    } else {
        old.join(" and ")
    };
    // Each bucket lock is held once at most: all are owned when as many are held as there are.
    let total: usize = by_count.keys().map(|b| usize::from(*b)).sum();
    let owned = match (h.others_owning, total) {
        (n, 0) => format!("{n} buckets"),
        (n, total) => format!("{n}/{total} buckets"),
    };
    let (new, take, wait) = if buckets == 1 {
        ("the relay with buckets 1".to_owned(), "takes", "waits")
    } else {
        (format!("the relays with {buckets} buckets"), "take", "wait")
    };
    if total > 0 && h.others_owning >= total {
        return Some(Cond::yes(
            t,
            Reason::BucketsChanging,
            format!(
                "{old} still {}, owning {owned}; {new}{waiting} {take} over once they stopped; {pods}",
                if h.others.len() == 1 { "publishes" } else { "publish" }
            ),
        ));
    }
    Some(Cond::no(
        t,
        Reason::BucketsChanging,
        format!(
            "{old} still {} {owned} and {new}{waiting} {wait} until the last of them stopped: the events of \
             the unowned buckets wait until then. A change of spec.relay.buckets does this while it rolls out; if it lasts, \
             a relay with the old count runs outside this Deployment (stop it); {pods}",
            if h.others.len() == 1 { "holds" } else { "hold" }
        ),
    ))
}

/// How long buckets may be without an owner, once RelayAvailable was True, before it turns False:
/// a stopped relay's buckets are taken within seconds (a rollout, a scale-down, an eviction), and
/// the condition is for what lasts longer.
pub const UNOWNED_GRACE: Duration = Duration::from_secs(10);

/// Some bucket has no owner.
pub fn unowned(buckets: u16, locks: &Locks) -> bool {
    buckets > 1 && locks.holdings.owners.len() < usize::from(buckets)
}

/// RelayAvailable with buckets (`buckets` > 1, no change rolling out). Pure. Available when every
/// bucket has an owner; each unowned bucket's events wait. `unowned_for`: how long some buckets
/// have been without an owner since RelayAvailable was last True; within [`UNOWNED_GRACE`] they
/// are changing hands, and it stays True.
pub fn verdict(buckets: u16, locks: &Locks, available: i32, pods: &str, unowned_for: Option<Duration>) -> Cond {
    let t = condition::RELAY_AVAILABLE;
    let h = &locks.holdings;
    let shares = h.shares();
    let (owned, all) = (h.owners.len(), usize::from(buckets));
    if shares.is_empty() {
        return if available == 0 {
            Cond::no(
                t,
                Reason::DeploymentUnavailable,
                format!("{pods}: see the Deployment's pods (image, scheduling, crash loops)"),
            )
        } else {
            Cond::no(
                t,
                Reason::NoActiveRelay,
                format!("{pods} but none owns a bucket: they cannot reach the database or are preparing the tables; see their logs"),
            )
        };
    }
    let counts: Vec<String> = shares.values().map(|s| s.len().to_string()).collect();
    let own = if shares.len() == 1 { "owns" } else { "own" };
    let summary = format!(
        "{} {own} {owned}/{all} buckets ({}); {pods}",
        relays(shares.len()),
        counts.join(", ")
    );
    if owned >= all {
        return Cond::yes(t, Reason::Available, summary);
    }
    if let Some(d) = unowned_for.filter(|d| *d < UNOWNED_GRACE) {
        return Cond::yes(
            t,
            Reason::BucketsMoving,
            format!(
                "{} of {all} buckets are changing hands (without an owner for {:.1}s; BucketsUnowned after {UNOWNED_GRACE:?}): {summary}",
                all - owned,
                d.as_secs_f64()
            ),
        );
    }
    Cond::no(
        t,
        Reason::BucketsUnowned,
        format!(
            "{} of {all} buckets have no owner and their events wait: {summary}. The other relays take a stopped relay's \
             buckets within seconds; if this lasts, see the relays' logs",
            all - owned
        ),
    )
}

/// `status.buckets`, `status.bucketsOwned` and `status.relays`: with buckets 1, none. `oldest`:
/// the pending age of each bucket with rows (`oldest_by_bucket`), when measured.
pub fn shares(buckets: u16, locks: &Locks, oldest: Option<&BTreeMap<u16, f64>>) -> (Option<i32>, Option<i32>, Vec<RelayShare>) {
    if buckets <= 1 {
        return (None, None, vec![]);
    }
    let h = &locks.holdings;
    let relays = h
        .shares()
        .into_iter()
        .map(|(pid, owned)| RelayShare {
            pid,
            application_name: locks.names.get(&pid).cloned(),
            pod: locks.names.get(&pid).and_then(|n| host_of(n)).map(str::to_owned),
            buckets: owned.len() as i32,
            oldest_pending_age_seconds: oldest.map(|ages| owned.iter().filter_map(|b| ages.get(b)).fold(0.0, |a: f64, x| a.max(*x))),
        })
        .collect();
    (Some(i32::from(buckets)), Some(h.owners.len() as i32), relays)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        operator::conditions::Status,
        tables::buckets::{bucket_code, member_code},
    };

    /// Relays of `buckets` (pid, owned buckets): each holds its member lock and its buckets.
    fn locks(buckets: u16, relays: &[(i32, std::ops::Range<u16>)]) -> Locks {
        let rows = relays.iter().flat_map(|(pid, owned)| {
            let member = (i64::from(member_code(buckets)), *pid);
            std::iter::once(member).chain(owned.clone().map(move |b| (i64::from(bucket_code(buckets, b)), *pid)))
        });
        Locks {
            holdings: Holdings::from_locks(buckets, rows.collect::<Vec<_>>()),
            ..Locks::default()
        }
    }

    const PODS: &str = "3/3 relay pods available";

    #[test]
    fn available_when_every_bucket_has_an_owner() {
        let l = locks(64, &[(10, 0..22), (20, 22..43), (30, 43..64)]);
        assert_eq!(changing(64, &l, PODS), None);
        let c = verdict(64, &l, 3, PODS, None);
        assert_eq!((c.status, c.reason), (Status::True, Reason::Available));
        assert_eq!(c.message, "3 relays own 64/64 buckets (22, 21, 21); 3/3 relay pods available");
        // More relays than buckets: one owns none, and that is fine.
        let l = locks(64, &[(10, 0..64), (20, 0..0)]);
        assert!(verdict(64, &l, 2, PODS, None)
            .message
            .starts_with("2 relays own 64/64 buckets (64, 0)"));
    }

    #[test]
    fn unowned_buckets_are_counted() {
        let l = locks(64, &[(10, 0..22), (30, 43..64)]);
        let c = verdict(64, &l, 3, PODS, None);
        assert_eq!((c.status, c.reason), (Status::False, Reason::BucketsUnowned));
        assert!(c.message.starts_with("21 of 64 buckets have no owner"), "{}", c.message);
        assert!(c.message.contains("2 relays own 43/64 buckets (22, 21)"), "{}", c.message);
    }

    #[test]
    fn buckets_changing_hands_stay_available_for_a_grace() {
        let l = locks(64, &[(10, 0..22), (30, 43..64)]);
        assert!(unowned(64, &l) && !unowned(64, &locks(64, &[(10, 0..64)])) && !unowned(1, &l));
        let c = verdict(64, &l, 3, PODS, Some(Duration::from_millis(1200)));
        assert_eq!((c.status, c.reason), (Status::True, Reason::BucketsMoving));
        assert!(
            c.message
                .starts_with("21 of 64 buckets are changing hands (without an owner for 1.2s; BucketsUnowned after 10s)"),
            "{}",
            c.message
        );
        let c = verdict(64, &l, 3, PODS, Some(UNOWNED_GRACE));
        assert_eq!((c.status, c.reason), (Status::False, Reason::BucketsUnowned));
    }

    #[test]
    fn no_relay_with_a_bucket_is_not_relaying() {
        let none = Locks::default();
        assert_eq!(verdict(64, &none, 0, PODS, None).reason, Reason::DeploymentUnavailable);
        let c = verdict(64, &none, 3, PODS, None);
        assert_eq!((c.status, c.reason), (Status::False, Reason::NoActiveRelay));
        // Relays that joined but own nothing yet: every bucket is unowned.
        let joined = locks(64, &[(10, 0..0)]);
        assert!(verdict(64, &joined, 1, PODS, None)
            .message
            .starts_with("64 of 64 buckets have no owner"));
    }

    #[test]
    fn a_change_of_bucket_count_is_named_until_the_old_relays_stopped() {
        // From 32 to 64: the old relays still own all 32 of theirs, a new one waits.
        let mut rows: Vec<(i64, i32)> = [(1, 0..16), (2, 16..32)]
            .into_iter()
            .flat_map(|(pid, r)| {
                std::iter::once((i64::from(member_code(32)), pid)).chain(r.map(move |b| (i64::from(bucket_code(32, b)), pid)))
            })
            .collect();
        rows.push((i64::from(member_code(64)), 3));
        let l = Locks {
            holdings: Holdings::from_locks(64, rows.clone()),
            ..Locks::default()
        };
        let c = changing(64, &l, PODS).unwrap();
        assert_eq!((c.status, c.reason), (Status::True, Reason::BucketsChanging));
        assert!(
            c.message
                .starts_with("2 relays with 32 buckets still publish, owning 32/32 buckets; the relays with 64 buckets (1 relay waiting)"),
            "{}",
            c.message
        );
        // One old relay stopped: its buckets wait for the change to complete.
        rows.retain(|(_, pid)| *pid != 2);
        let l = Locks {
            holdings: Holdings::from_locks(64, rows),
            ..Locks::default()
        };
        let c = changing(64, &l, PODS).unwrap();
        assert_eq!((c.status, c.reason), (Status::False, Reason::BucketsChanging));
        assert!(
            c.message.starts_with("1 relay with 32 buckets still holds 16/32 buckets"),
            "{}",
            c.message
        );
    }

    #[test]
    fn a_change_from_or_to_one_bucket_is_named() {
        let single = Locks {
            single: true,
            ..locks(64, &[(3, 0..0)])
        };
        let c = changing(64, &single, PODS).unwrap();
        assert_eq!((c.status, c.reason), (Status::True, Reason::BucketsChanging));
        assert!(c.message.contains("a relay with buckets 1 holds the outbox lock"), "{}", c.message);
        // Back to 1: relays with 64 buckets still run; the one with buckets 1 waits for them.
        let rows: Vec<(i64, i32)> = std::iter::once((i64::from(member_code(64)), 1))
            .chain((0..64).map(|b| (i64::from(bucket_code(64, b)), 1)))
            .collect();
        let l = Locks {
            holdings: Holdings::from_locks(1, rows),
            ..Locks::default()
        };
        let c = changing(1, &l, PODS).unwrap();
        assert_eq!(c.status, Status::True);
        assert!(c.message.contains("the relay with buckets 1 takes over"), "{}", c.message);
        // Buckets 1 as always: nothing changing.
        let single = Locks {
            single: true,
            ..Locks::default()
        };
        assert_eq!(changing(1, &single, PODS), None);
    }

    #[test]
    fn shares_name_each_relay_and_only_with_buckets() {
        let mut l = locks(64, &[(10, 0..40), (20, 40..60)]);
        l.names.insert(10, "lockstep-relay/orders-relay-6d8f9-x2x4q".into());
        // Pending rows in buckets 3 and 7 (relay 10) and 62 (no owner); none in relay 20's.
        let ages = BTreeMap::from([(3, 1.5), (7, 4.0), (62, 9.0)]);
        let (b, owned, relays) = shares(64, &l, Some(&ages));
        assert_eq!((b, owned), (Some(64), Some(60)));
        let share = |pid, name: Option<&str>, buckets, age| RelayShare {
            pid,
            application_name: name.map(str::to_owned),
            pod: name.and_then(host_of).map(str::to_owned),
            buckets,
            oldest_pending_age_seconds: age,
        };
        assert_eq!(
            relays,
            [
                share(10, Some("lockstep-relay/orders-relay-6d8f9-x2x4q"), 40, Some(4.0)),
                share(20, None, 20, Some(0.0))
            ]
        );
        assert_eq!(relays[0].pod.as_deref(), Some("orders-relay-6d8f9-x2x4q"));
        assert_eq!(shares(64, &l, None).2[0].oldest_pending_age_seconds, None, "not measured");
        assert_eq!(shares(1, &l, Some(&ages)), (None, None, vec![]));
        assert!(l.any() && !Locks::default().any());
    }
}
