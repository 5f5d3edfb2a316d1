//! The consumer's whole step in one call: claim the message id, apply the side effect when the
//! claim is new, commit both together, and retry the lot on a transient database error. A retry
//! after a commit whose outcome was lost finds the id claimed and applies nothing twice.

use std::{error::Error as StdError, time::Duration};

use futures::future::BoxFuture;
use rdkafka::message::{Headers, Message};
use sqlx::{PgConnection, PgPool};

use super::Inbox;
use crate::core::event_headers as h;

pub type BoxError = Box<dyn StdError + Send + Sync>;

/// What the handler needs of a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delivery<'a> {
    /// The id to deduplicate on (the relay's `id` header; `ce_id` for a CloudEvent without it).
    pub id: &'a str,
    /// The event type (the relay's `type` header, or `ce_type`), for the latency metric.
    pub event_type: &'a str,
    /// When the event was created, in ms since the epoch: the relay's `lockstep-created-at`
    /// header when present, else `ce_time`, else the message timestamp (the row's created_at).
    pub created_ms: Option<i64>,
    /// The producer's W3C trace context (the `traceparent` header) when it is a valid one: a
    /// consumer's span continues the producer's from it.
    pub traceparent: Option<&'a str>,
}

impl<'a> Delivery<'a> {
    /// Read a message the relay published (or any binary-mode CloudEvent); None when it has
    /// neither an `id` nor a `ce_id` header.
    pub fn from_message<M: Message>(m: &'a M) -> Option<Self> {
        let headers = m.headers()?;
        let text = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
        };
        let created = text(crate::core::stamp::CREATED_AT_HEADER)
            .and_then(|v| v.parse().ok())
            .or_else(|| text(h::CE_TIME).and_then(h::rfc3339_ms));
        Some(Delivery {
            id: text(h::ID).or_else(|| text(h::CE_ID))?,
            event_type: text(h::TYPE).or_else(|| text(h::CE_TYPE)).unwrap_or(""),
            created_ms: created.or_else(|| m.timestamp().to_millis()),
            traceparent: text(h::TRACEPARENT).filter(|t| h::valid_traceparent(t)),
        })
    }

    /// Read a message the relay published to NATS JetStream (or any message with those headers);
    /// None without an `id` or `ce_id` header. NATS messages carry no timestamp of their own: the
    /// relay always sends `lockstep-created-at`.
    pub fn from_nats(m: &'a async_nats::Message) -> Option<Self> {
        let headers = m.headers.as_ref()?;
        let text = |name: &str| headers.get(name).map(|v| v.as_str());
        Some(Delivery {
            id: text(h::ID).or_else(|| text(h::CE_ID))?,
            event_type: text(h::TYPE).or_else(|| text(h::CE_TYPE)).unwrap_or(""),
            created_ms: text(crate::core::stamp::CREATED_AT_HEADER)
                .and_then(|v| v.parse().ok())
                .or_else(|| text(h::CE_TIME).and_then(h::rfc3339_ms)),
            traceparent: text(h::TRACEPARENT).filter(|t| h::valid_traceparent(t)),
        })
    }

    /// The producer's `traceparent`, if the message carried a valid one.
    pub fn traceparent(&self) -> Option<&'a str> {
        self.traceparent
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

/// How a transient database error is retried: backoff doubling from `first` up to `max`, with
/// jitter ([`Retry::wait`]).
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
    /// The backoff before attempt `n + 1` (n counted from 1), before jitter. Pure.
    pub fn backoff(&self, n: u32) -> Duration {
        self.first.saturating_mul(1 << n.saturating_sub(1).min(16)).min(self.max)
    }

    /// [`Retry::backoff`] with equal jitter: half of it fixed, half spread by `unit` (in [0, 1)).
    /// Consumers restarted together, or failed together by one database restart, would otherwise
    /// retry at the same instants again and again; each still waits at least half the backoff,
    /// time the database gets to come back. Pure.
    pub fn jittered(&self, n: u32, unit: f64) -> Duration {
        let b = self.backoff(n);
        b / 2 + (b / 2).mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The wait [`Inbox::handle`] takes before attempt `n + 1`: jittered with fresh randomness.
    pub fn wait(&self, n: u32) -> Duration {
        self.jittered(n, random_unit())
    }
}

/// A uniform number in [0, 1) from the operating system's randomness: the top 48 bits of a v4
/// uuid, all random (its version and variant bits are further down).
fn random_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() >> 80) as f64 / (1u64 << 48) as f64
}

/// An error a retry can heal: the connection, a serialization failure or deadlock, a lock or
/// statement timeout, the server restarting or out of connections.
pub fn is_transient(e: &sqlx::Error) -> bool {
    if crate::clients::db::is_unreachable(e) {
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
                    tokio::time::sleep(retry.wait(n)).await;
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
            let seconds = (crate::core::stamp::now_ms() - created) as f64 / 1000.0;
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
    fn waits_keep_half_the_backoff_and_spread_the_other_half() {
        let r = Retry::default();
        for n in 1..=9 {
            let b = r.backoff(n);
            assert_eq!(r.jittered(n, 0.0), b / 2);
            assert_eq!(r.jittered(n, 0.5), b / 2 + b / 4);
            assert!(r.jittered(n, 0.999_999) < b && r.jittered(n, 7.0) <= b);
        }
        // Consumers that failed together: their waits differ, within the bounds.
        let waits: Vec<Duration> = (0..64).map(|_| r.wait(4)).collect();
        let (b, distinct) = (r.backoff(4), waits.iter().collect::<std::collections::BTreeSet<_>>().len());
        assert!(waits.iter().all(|w| *w >= b / 2 && *w < b), "{waits:?}");
        assert!(distinct > 32, "only {distinct} distinct waits of 64: {waits:?}");
        let low = waits.iter().filter(|w| **w < b / 2 + b / 4).count();
        assert!((8..=56).contains(&low), "{low} of 64 in the lower half of the spread");
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
                created_ms: Some(1_000),
                traceparent: None,
            })
        );
        let moved = msg(Some(headers.insert(Header {
            key: "lockstep-created-at",
            value: Some("42"),
        })));
        assert_eq!(Delivery::from_message(&moved).unwrap().created_ms, Some(42));
        assert_eq!(Delivery::from_message(&msg(None)), None);
        let nats = |headers: &[(&str, &str)]| {
            let mut h = async_nats::HeaderMap::new();
            for (k, v) in headers {
                h.insert(*k, *v);
            }
            async_nats::Message {
                subject: "s".into(),
                reply: None,
                payload: Default::default(),
                headers: Some(h),
                status: None,
                description: None,
                length: 0,
            }
        };
        let m = nats(&[("id", "e-1"), ("type", "created"), ("lockstep-created-at", "42")]);
        let d = Delivery::from_nats(&m).unwrap();
        assert_eq!(
            (d.id, d.event_type, d.created_ms, d.traceparent),
            ("e-1", "created", Some(42), None)
        );
        assert_eq!(Delivery::from_nats(&nats(&[("type", "created")])), None);
    }

    #[test]
    fn a_delivery_reads_a_valid_traceparent_and_a_cloudevent_without_lockstep_headers() {
        use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
        let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let with = |pairs: &[(&str, &str)]| {
            let h = pairs
                .iter()
                .fold(OwnedHeaders::new(), |h, (key, v)| h.insert(Header { key, value: Some(*v) }));
            OwnedMessage::new(None, None, "t".into(), Timestamp::CreateTime(1_000), 0, 0, Some(h))
        };
        let m = with(&[("id", "m-1"), ("traceparent", trace)]);
        let d = Delivery::from_message(&m).unwrap();
        assert_eq!((d.traceparent(), d.traceparent), (Some(trace), Some(trace)));
        let m = with(&[("id", "m-1"), ("traceparent", "00-not-a-trace")]);
        assert_eq!(
            Delivery::from_message(&m).unwrap().traceparent(),
            None,
            "a malformed one is not passed on"
        );
        let ce = with(&[
            ("ce_id", "c-1"),
            ("ce_type", "com.example.order.created"),
            ("ce_time", "2023-11-14T22:13:20.123456Z"),
        ]);
        let want = Delivery {
            id: "c-1",
            event_type: "com.example.order.created",
            created_ms: Some(1_700_000_000_123),
            traceparent: None,
        };
        assert_eq!(Delivery::from_message(&ce), Some(want));
        // Both sets (the relay's cloudevents mode): lockstep's own win.
        let both = with(&[
            ("id", "m-1"),
            ("type", "created"),
            ("ce_id", "c-1"),
            ("ce_time", "2023-11-14T22:13:20Z"),
        ]);
        let d = Delivery::from_message(&both).unwrap();
        assert_eq!((d.id, d.event_type, d.created_ms), ("m-1", "created", Some(1_700_000_000_000)));
    }
}
