//! The consumer's whole step in one call: claim the message id, apply the side effect when the
//! claim is new, commit both together, and retry the lot on a transient database error. A retry
//! after a commit whose outcome was lost finds the id claimed and applies nothing twice.

use std::{error::Error as StdError, time::Duration};

use futures::future::BoxFuture;
use rdkafka::message::{Headers, Message};
use sqlx::{PgConnection, PgPool};

use super::Inbox;

pub type BoxError = Box<dyn StdError + Send + Sync>;

/// What the handler needs of a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery<'a> {
    /// The id to deduplicate on (the relay's `id` header).
    pub id: &'a str,
    /// The event type (the relay's `type` header), for the latency metric.
    pub event_type: &'a str,
    /// When the event was created, in ms since the epoch: the relay's `lockstep-created-at`
    /// header when present, else the message timestamp (the row's created_at).
    pub created_ms: Option<i64>,
}

impl<'a> Delivery<'a> {
    /// Read a message the relay published; None when it has no `id` header.
    pub fn from_message<M: Message>(m: &'a M) -> Option<Self> {
        let headers = m.headers()?;
        let text = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
        };
        let created = text(crate::relay::stamp::CREATED_AT_HEADER).and_then(|v| v.parse().ok());
        Some(Delivery {
            id: text("id")?,
            event_type: text("type").unwrap_or(""),
            created_ms: created.or_else(|| m.timestamp().to_millis()),
        })
    }
}

/// What happened to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled<T> {
    /// First delivery: the effect ran and committed with the claim.
    Applied(T),
    /// The id was claimed before: nothing ran.
    Duplicate,
}

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The side effect returned an error that is not a transient database error: not retried
    /// (the claim rolled back with it, so a later delivery tries again).
    #[error("the side effect failed: {0}")]
    Effect(BoxError),
    /// The database stayed unavailable through every attempt; nothing committed.
    #[error("database error after {attempts} attempts: {source}")]
    Database { attempts: u32, source: sqlx::Error },
    /// The database refused the claim or the commit (not something a retry heals: a privilege,
    /// a missing table). When the commit was refused its outcome is the database's to tell.
    #[error("the database refused the claim or its commit: {0}")]
    Refused(sqlx::Error),
}

/// How a transient database error is retried: backoff doubling from `first` up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub attempts: u32,
    pub first: Duration,
    pub max: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 10,
            first: Duration::from_millis(50),
            max: Duration::from_secs(5),
        }
    }
}

impl Retry {
    /// The wait before attempt `n + 1` (n counted from 1). Pure.
    pub fn backoff(&self, n: u32) -> Duration {
        self.first.saturating_mul(1 << n.saturating_sub(1).min(16)).min(self.max)
    }
}

/// An error a retry can heal: the connection, a serialization failure or deadlock, a lock or
/// statement timeout, the server restarting or out of connections.
pub fn is_transient(e: &sqlx::Error) -> bool {
    if crate::db::is_unreachable(e) {
        return true;
    }
    matches!(e, sqlx::Error::Database(d) if d.code().is_some_and(|c| {
        matches!(c.as_ref(), "40001" | "40P01" | "55P03" | "57014" | "53300" | "53400")
    }))
}

enum Attempt<T> {
    Done(Handled<T>),
    Transient(sqlx::Error),
    /// The effect's own error.
    Failed(BoxError),
    /// A non-transient error of begin, claim or commit.
    Refused(sqlx::Error),
}

impl Inbox {
    /// Claim `d.id`, run `effect` in the same transaction when the claim is new, commit. The effect
    /// must return its database errors (`?`), never swallow them: a failed statement aborts the
    /// transaction, and PostgreSQL answers the COMMIT of an aborted transaction with a rollback
    /// that is not an error, so a swallowed error would read as applied. A commit whose outcome
    /// was lost is retried and then reads as `Duplicate` (the effect did commit). Transient
    /// database errors (from the claim, the effect or the commit) retry the whole step per
    /// `retry`; any other error from the effect rolls back and is returned. Counted in the
    /// inbox's metrics ([`Inbox::with_metrics`]) once the outcome is committed.
    pub async fn handle<T, F>(&self, pool: &PgPool, d: &Delivery<'_>, retry: Retry, mut effect: F) -> Result<Handled<T>, HandleError>
    where
        F: for<'c> FnMut(&'c mut PgConnection) -> BoxFuture<'c, Result<T, BoxError>>,
    {
        let mut n = 0;
        loop {
            n += 1;
            match self.attempt(pool, d, &mut effect).await {
                Attempt::Done(h) => {
                    self.committed(d, matches!(h, Handled::Applied(_)));
                    return Ok(h);
                }
                Attempt::Failed(e) => {
                    self.count_failure("effect");
                    return Err(HandleError::Effect(e));
                }
                Attempt::Refused(e) => {
                    self.count_failure("database");
                    return Err(HandleError::Refused(e));
                }
                Attempt::Transient(e) if n >= retry.attempts => {
                    self.count_failure("retries_exhausted");
                    return Err(HandleError::Database { attempts: n, source: e });
                }
                Attempt::Transient(e) => {
                    tracing::debug!(consumer = %self.consumer, id = d.id, attempt = n, error = %e, "inbox handler retries");
                    if let Some(m) = &self.metrics {
                        m.retried(&self.consumer);
                    }
                    tokio::time::sleep(retry.backoff(n)).await;
                }
            }
        }
    }

    async fn attempt<T, F>(&self, pool: &PgPool, d: &Delivery<'_>, effect: &mut F) -> Attempt<T>
    where
        F: for<'c> FnMut(&'c mut PgConnection) -> BoxFuture<'c, Result<T, BoxError>>,
    {
        let sql = |e: sqlx::Error| {
            if is_transient(&e) {
                Attempt::Transient(e)
            } else {
                Attempt::Refused(e)
            }
        };
        let mut tx = match pool.begin().await {
            Ok(tx) => tx,
            Err(e) => return sql(e),
        };
        let handled = match self.claim_uncounted(&mut tx, d.id).await {
            Err(e) => return sql(e),
            Ok(false) => Handled::Duplicate,
            Ok(true) => match effect(&mut tx).await {
                Ok(t) => Handled::Applied(t),
                Err(e) => {
                    return match e.downcast::<sqlx::Error>() {
                        Ok(e) if is_transient(&e) => Attempt::Transient(*e),
                        Ok(e) => Attempt::Failed(e),
                        Err(e) => Attempt::Failed(e),
                    }
                }
            },
        };
        match tx.commit().await {
            Ok(()) => Attempt::Done(handled),
            Err(e) => sql(e),
        }
    }

    fn committed(&self, d: &Delivery<'_>, new: bool) {
        let Some(m) = &self.metrics else { return };
        m.claimed(&self.consumer, new);
        if let (true, Some(created)) = (new, d.created_ms) {
            let seconds = (crate::relay::stamp::now_ms() - created) as f64 / 1000.0;
            m.applied(&self.consumer, d.event_type, seconds);
        }
    }

    fn count_failure(&self, reason: &'static str) {
        if let Some(m) = &self.metrics {
            m.failed(&self.consumer, reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let r = Retry::default();
        let waits: Vec<u128> = (1..=9).map(|n| r.backoff(n).as_millis()).collect();
        assert_eq!(waits, [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(r.backoff(1000), Duration::from_secs(5));
    }

    #[test]
    fn a_refused_statement_is_not_transient_and_a_lost_connection_is() {
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(is_transient(&sqlx::Error::Io(std::io::Error::other("reset"))));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
        assert!(!is_transient(&sqlx::Error::ColumnNotFound("x".into())));
    }

    #[test]
    fn a_delivery_reads_the_relays_headers_and_prefers_the_created_at_header() {
        use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "id",
                value: Some("m-1"),
            })
            .insert(Header {
                key: "type",
                value: Some("order.created"),
            });
        let msg = |h: Option<OwnedHeaders>| OwnedMessage::new(None, None, "t".into(), Timestamp::CreateTime(1_000), 0, 0, h);
        let m = msg(Some(headers.clone()));
        assert_eq!(
            Delivery::from_message(&m),
            Some(Delivery {
                id: "m-1",
                event_type: "order.created",
                created_ms: Some(1_000)
            })
        );
        let moved = msg(Some(headers.insert(Header {
            key: "lockstep-created-at",
            value: Some("42"),
        })));
        assert_eq!(Delivery::from_message(&moved).unwrap().created_ms, Some(42));
        assert_eq!(Delivery::from_message(&msg(None)), None);
    }
}
