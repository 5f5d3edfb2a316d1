//! What stops a relay's lock session, and which of those no reconnect can fix.

use std::time::Duration;

use crate::tables::schema;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("schema: {0}")]
    Schema(#[from] schema::SchemaError),
    #[error("Kafka producer: {0}")]
    Producer(String),
    #[error(
        "the database is a read-only hot standby (pg_is_in_recovery() is true): the relay must write \
         to the outbox; point DATABASE_URL at the primary"
    )]
    Standby,
    #[error(
        "the lock connection now reaches another PostgreSQL server process (backend pid {locked}, \
         now {now}): a transaction-pooling proxy (PgBouncer pool_mode=transaction or statement) is \
         between the relay and the database, and it voids the session advisory lock that keeps a \
         single relay active; connect the relay directly or through session pooling \
         (pool_mode=session)"
    )]
    BackendChanged { locked: i32, now: i32 },
    #[error(
        "{seen} (backend pid {pid}): a transaction-pooling proxy (PgBouncer pool_mode=transaction or \
         statement) hands one server session to several clients, and a session advisory lock taken \
         again on the same session succeeds, so two relays could both run; connect the relay directly \
         or through session pooling (pool_mode=session)"
    )]
    SessionShared { pid: i32, seen: &'static str },
    #[error(
        "the lock session was not confirmed within {after:?}: the relay stopped sending and purges what \
         its producer holds before the database can give the lock to another relay"
    )]
    Fenced { after: Duration },
    #[error(
        "buckets {buckets} need the function {function} in the outbox's schema, which is missing and \
         manageSchema is false: create it with: {ddl}"
    )]
    MissingBucketFunction { buckets: u16, function: String, ddl: String },
    #[error("the database did not answer within {after:?} while {doing}")]
    Unresponsive { doing: &'static str, after: Duration },
}

impl RelayError {
    /// Errors no reconnect can fix: the relay stops and `lockstep relay` exits non-zero. A changed
    /// backend is one: reconnecting through the same pooler would take the lock on a pooled server
    /// connection again and lose it again, while another relay may be active. So is a shared
    /// session: the pooler would hand it out again.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            RelayError::Standby
                | RelayError::BackendChanged { .. }
                | RelayError::SessionShared { .. }
                | RelayError::MissingBucketFunction { .. }
        )
    }
}
