//! LagHealthy and `status.lag`: the operator measures the outbox itself on every refresh (no pod is
//! scraped), and judges with hysteresis so a figure hovering at the threshold does not flap.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use sqlx::PgPool;

use crate::{
    crd::{LagStatus, RelayShare, ValidOutboxRelay},
    operator::conditions::{condition, Cond, Reason, Status},
    tables::lag::{measure, oldest_transaction_age},
};

/// What the outbox looks like now.
#[derive(Debug, Clone, PartialEq)]
pub struct Lag {
    /// Unpublished rows (estimate from seq).
    pub pending: i64,
    /// Age of the oldest unpublished row, seconds.
    pub oldest: f64,
    /// Rows in the dead-letter table.
    pub quarantined: i64,
    /// Age of the oldest open write transaction, seconds (0: none).
    pub blocking: f64,
}

impl Lag {
    pub fn status(&self, at: Time) -> LagStatus {
        LagStatus {
            pending_events: self.pending,
            oldest_pending_age_seconds: self.oldest,
            quarantined: self.quarantined,
            blocking_transaction_age_seconds: (self.blocking > 0.0).then_some(self.blocking),
            measured_at: Some(at),
        }
    }
}

/// With buckets: the oldest pending age of one group of buckets, a relay's share or the buckets
/// without an owner, so LagHealthy says whose events wait.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// "relay orders-relay-6d8f9-x2x4q" (its pod, else its database pid), or "no relay".
    pub name: String,
    pub buckets: usize,
    pub oldest: f64,
}

/// The groups of `shares` (`status.relays`) and the buckets no relay owns. Pure. Empty when the
/// buckets' ages were not measured (buckets 1, or the bucket index not built yet).
pub fn groups(buckets: u16, shares: &[RelayShare], owners: &BTreeMap<u16, i32>, oldest: Option<&BTreeMap<u16, f64>>) -> Vec<Group> {
    let Some(ages) = oldest.filter(|_| buckets > 1) else {
        return vec![];
    };
    let mut groups: Vec<Group> = shares
        .iter()
        .filter_map(|s| {
            Some(Group {
                name: match &s.pod {
                    Some(pod) => format!("relay {pod}"),
                    None => format!("relay pid {}", s.pid),
                },
                buckets: usize::try_from(s.buckets).ok()?,
                oldest: s.oldest_pending_age_seconds?,
            })
        })
        .collect();
    let unowned = usize::from(buckets).saturating_sub(owners.len());
    if unowned > 0 {
        let oldest = ages
            .iter()
            .filter(|(b, _)| !owners.contains_key(b))
            .fold(0.0, |a: f64, (_, x)| a.max(*x));
        groups.push(Group {
            name: "no relay".into(),
            buckets: unowned,
            oldest,
        });
    }
    groups
}

/// "; behind: relay a (22 buckets) 45.0s, no relay (3 buckets) 40.1s": the groups above `max_s`,
/// the oldest first, three at most.
fn behind(groups: &[Group], max_s: f64) -> String {
    let mut late: Vec<&Group> = groups.iter().filter(|g| g.oldest > max_s).collect();
    if late.is_empty() {
        return String::new();
    }
    late.sort_by(|a, b| b.oldest.total_cmp(&a.oldest));
    let named: Vec<String> = late
        .iter()
        .take(3)
        .map(|g| format!("{} ({} buckets) {:.1}s", g.name, g.buckets, g.oldest))
        .collect();
    let more = match late.len() {
        n if n > 3 => format!(" and {} more", n - 3),
        _ => String::new(),
    };
    format!("; behind: {}{more}", named.join(", "))
}

/// Measure the outbox and its dead-letter table.
pub async fn measure_lag(pool: &PgPool, v: &ValidOutboxRelay) -> Result<Lag, sqlx::Error> {
    let (pending, oldest) = measure(pool, &v.table, v.cleanup).await?;
    let quarantined: i64 = sqlx::query_scalar(&format!("select count(*) from {}", v.dead_letter_table))
        .fetch_one(pool)
        .await?;
    let blocking = oldest_transaction_age(pool).await?;
    Ok(Lag {
        pending,
        oldest,
        quarantined,
        blocking,
    })
}

/// LagHealthy: False above `max` (the oldest unpublished row's age); once False, True again only
/// below half of it. An open transaction at least as old as the oldest pending row is what holds
/// the rows back (rows committed after it started stay invisible to the relay): its own reason,
/// since restarting the relay would not help.
/// With buckets, the message names the bucket groups behind (`groups`).
pub fn verdict(was: Option<Status>, lag: &Lag, max: Duration, groups: &[Group]) -> Cond {
    let max_s = max.as_secs_f64();
    let above = if was == Some(Status::False) {
        lag.oldest >= max_s / 2.0
    } else {
        lag.oldest > max_s
    };
    let dead = if lag.quarantined > 0 {
        format!("; {} rows in the dead-letter table", lag.quarantined)
    } else {
        String::new()
    };
    let t = condition::LAG_HEALTHY;
    if !above {
        return Cond::yes(
            t,
            Reason::LagWithinThreshold,
            format!(
                "{} events pending, the oldest {:.1}s old (threshold {max:?}){dead}",
                lag.pending, lag.oldest
            ),
        );
    }
    if lag.blocking > 0.0 && lag.blocking + 1.0 >= lag.oldest {
        return Cond::no(
            t,
            Reason::LongTransaction,
            format!(
                "an open transaction {:.0}s old holds back {} events (the oldest {:.1}s old, threshold {max:?}): rows \
                 committed after it started wait until it ends; find it in pg_stat_activity or pg_prepared_xacts{dead}",
                lag.blocking, lag.pending, lag.oldest
            ),
        );
    }
    let again = if was == Some(Status::False) {
        format!(", healthy again below {:?}", max / 2)
    } else {
        String::new()
    };
    Cond::no(
        t,
        Reason::LagAboveThreshold,
        format!(
            "the oldest of {} pending events is {:.1}s old, above {max:?}{again}{}: is a relay running and reaching the broker? \
             (RelayAvailable, the relay's lockstep_relay_broker_failing){dead}",
            lag.pending,
            lag.oldest,
            behind(groups, max_s)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lag(oldest: f64, blocking: f64) -> Lag {
        Lag {
            pending: 10,
            oldest,
            quarantined: 0,
            blocking,
        }
    }

    const MAX: Duration = Duration::from_secs(30);

    #[test]
    fn false_above_the_threshold_and_true_again_only_below_half() {
        assert_eq!(verdict(None, &lag(29.0, 0.0), MAX, &[]).status, Status::True);
        assert_eq!(
            verdict(Some(Status::True), &lag(31.0, 0.0), MAX, &[]).reason,
            Reason::LagAboveThreshold
        );
        // Between half and the threshold: it stays as it was.
        assert_eq!(verdict(Some(Status::False), &lag(20.0, 0.0), MAX, &[]).status, Status::False);
        assert_eq!(verdict(Some(Status::True), &lag(20.0, 0.0), MAX, &[]).status, Status::True);
        assert_eq!(verdict(Some(Status::False), &lag(14.0, 0.0), MAX, &[]).status, Status::True);
        assert_eq!(verdict(Some(Status::Unknown), &lag(20.0, 0.0), MAX, &[]).status, Status::True);
    }

    #[test]
    fn an_open_transaction_older_than_the_rows_is_named() {
        let c = verdict(None, &lag(40.0, 45.0), MAX, &[]);
        assert_eq!((c.status, c.reason), (Status::False, Reason::LongTransaction));
        assert!(c.message.contains("open transaction 45s old"), "{}", c.message);
        // A younger transaction is not what holds the rows back.
        assert_eq!(verdict(None, &lag(40.0, 5.0), MAX, &[]).reason, Reason::LagAboveThreshold);
    }

    #[test]
    fn the_bucket_groups_behind_are_named() {
        let share = |pid, pod: Option<&str>, buckets, age| RelayShare {
            pid,
            pod: pod.map(str::to_owned),
            buckets,
            oldest_pending_age_seconds: age,
            ..RelayShare::default()
        };
        let shares = [share(10, Some("orders-relay-a"), 22, Some(45.0)), share(20, None, 21, Some(2.0))];
        // Relay 10 owns 0..22, relay 20 22..43; 43..64 have no owner, the oldest of them 40 s.
        let owners: BTreeMap<u16, i32> = (0..43).map(|b| (b, if b < 22 { 10 } else { 20 })).collect();
        let ages = BTreeMap::from([(3, 45.0), (30, 2.0), (50, 40.0), (60, 12.0)]);
        let g = groups(64, &shares, &owners, Some(&ages));
        assert_eq!(g.len(), 3);
        assert_eq!((g[2].name.as_str(), g[2].buckets, g[2].oldest), ("no relay", 21, 40.0));
        let c = verdict(None, &lag(45.0, 0.0), MAX, &g);
        assert!(
            c.message
                .contains("above 30s; behind: relay orders-relay-a (22 buckets) 45.0s, no relay (21 buckets) 40.0s:"),
            "{}",
            c.message
        );
        assert!(!c.message.contains("pid 20"), "a group within the threshold is not named");
        // Not measured, or buckets 1: no groups.
        assert!(groups(64, &shares, &owners, None).is_empty() && groups(1, &shares, &owners, Some(&ages)).is_empty());
        let many: Vec<Group> = (0..5)
            .map(|i| Group {
                name: format!("relay pid {i}"),
                buckets: 1,
                oldest: 31.0 + f64::from(i),
            })
            .collect();
        assert!(behind(&many, 30.0).ends_with("relay pid 2 (1 buckets) 33.0s and 2 more"));
    }

    #[test]
    fn dead_lettered_rows_are_in_the_message() {
        let mut l = lag(1.0, 0.0);
        l.quarantined = 3;
        assert!(verdict(None, &l, MAX, &[]).message.ends_with("; 3 rows in the dead-letter table"));
    }

    #[test]
    fn status_names_the_blocking_transaction_only_when_there_is_one() {
        let at = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        assert_eq!(lag(1.0, 0.0).status(at.clone()).blocking_transaction_age_seconds, None);
        assert_eq!(lag(1.0, 2.0).status(at).blocking_transaction_age_seconds, Some(2.0));
    }
}
