//! LagHealthy and `status.lag`: the operator measures the outbox itself on every refresh (no pod is
//! scraped), and judges with hysteresis so a figure hovering at the threshold does not flap.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use sqlx::PgPool;

use crate::{
    conditions::{condition, reason, Cond, Status},
    crd::{LagStatus, ValidOutboxRelay},
    relay::{measure, oldest_transaction_age},
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
pub fn verdict(was: Option<Status>, lag: &Lag, max: Duration) -> Cond {
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
            reason::LAG_WITHIN_THRESHOLD,
            format!(
                "{} events pending, the oldest {:.1}s old (threshold {max:?}){dead}",
                lag.pending, lag.oldest
            ),
        );
    }
    if lag.blocking > 0.0 && lag.blocking + 1.0 >= lag.oldest {
        return Cond::no(
            t,
            reason::LONG_TRANSACTION,
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
        reason::LAG_ABOVE_THRESHOLD,
        format!(
            "the oldest of {} pending events is {:.1}s old, above {max:?}{again}: is a relay running and reaching the broker? \
             (RelayAvailable, the relay's lockstep_relay_broker_failing){dead}",
            lag.pending, lag.oldest
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
        assert_eq!(verdict(None, &lag(29.0, 0.0), MAX).status, Status::True);
        assert_eq!(
            verdict(Some(Status::True), &lag(31.0, 0.0), MAX).reason,
            reason::LAG_ABOVE_THRESHOLD
        );
        // Between half and the threshold: it stays as it was.
        assert_eq!(verdict(Some(Status::False), &lag(20.0, 0.0), MAX).status, Status::False);
        assert_eq!(verdict(Some(Status::True), &lag(20.0, 0.0), MAX).status, Status::True);
        assert_eq!(verdict(Some(Status::False), &lag(14.0, 0.0), MAX).status, Status::True);
        assert_eq!(verdict(Some(Status::Unknown), &lag(20.0, 0.0), MAX).status, Status::True);
    }

    #[test]
    fn an_open_transaction_older_than_the_rows_is_named() {
        let c = verdict(None, &lag(40.0, 45.0), MAX);
        assert_eq!((c.status, c.reason), (Status::False, reason::LONG_TRANSACTION));
        assert!(c.message.contains("open transaction 45s old"), "{}", c.message);
        // A younger transaction is not what holds the rows back.
        assert_eq!(verdict(None, &lag(40.0, 5.0), MAX).reason, reason::LAG_ABOVE_THRESHOLD);
    }

    #[test]
    fn dead_lettered_rows_are_in_the_message() {
        let mut l = lag(1.0, 0.0);
        l.quarantined = 3;
        assert!(verdict(None, &l, MAX).message.ends_with("; 3 rows in the dead-letter table"));
    }

    #[test]
    fn status_names_the_blocking_transaction_only_when_there_is_one() {
        let at = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        assert_eq!(lag(1.0, 0.0).status(at.clone()).blocking_transaction_age_seconds, None);
        assert_eq!(lag(1.0, 2.0).status(at).blocking_transaction_age_seconds, Some(2.0));
    }
}
