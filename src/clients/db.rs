//! Connection pools, one per database URL, shared by every resource that points at it and bounded
//! in size. URLs are secrets: they are keyed by hash and never logged.

use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::{postgres::PgPoolOptions, PgPool};

use crate::{clients::cache::IdleCache, core::redacted::Redacted, core::sql::hex};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The text is not shown: a key holding a bare password is the usual cause.
    #[error("the database URL in the Secret does not parse as a postgres:// URL (its text is not shown)")]
    InvalidUrl,
}

pub struct Pools {
    pools: IdleCache<PgPool>,
    max_connections: u32,
}

impl Pools {
    pub fn new(max_connections: u32) -> Self {
        Pools {
            pools: IdleCache::default(),
            max_connections,
        }
    }

    /// The pool for a URL; created lazily, so an unreachable database shows up on first use.
    pub fn get(&self, url: &Redacted) -> Result<PgPool, DbError> {
        let key: [u8; 32] = Sha256::digest(url.expose().as_bytes()).into();
        self.pools.get_or_try_insert(key, || {
            let opts = parse_database_url(url.expose())
                .ok_or(DbError::InvalidUrl)?
                .application_name("lockstep");
            Ok(PgPoolOptions::new()
                .max_connections(self.max_connections)
                .min_connections(0)
                .acquire_timeout(Duration::from_secs(5))
                .idle_timeout(Duration::from_secs(60))
                .connect_lazy_with(opts))
        })
    }

    /// Forget pools no resource asked for in `idle` (a rotated or mistyped URL); returns how many.
    pub fn evict_idle(&self, idle: Duration) -> usize {
        self.pools.evict_idle(idle)
    }

    pub fn len(&self) -> usize {
        self.pools.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }
}

/// Where a database URL points (host:port/database), for messages. Built from what the URL
/// parses into, never from its text: a Secret key that holds a bare password or a key=value DSN
/// is not a URL, and showing "the part after the @" would show the secret.
pub fn describe_database_url(url: &str) -> String {
    match parse_database_url(url) {
        Some(o) => {
            let host = o.get_socket().map_or_else(|| o.get_host().to_owned(), |p| p.display().to_string());
            match o.get_database() {
                Some(db) => format!("{host}:{}/{db}", o.get_port()),
                None => format!("{host}:{}", o.get_port()),
            }
        }
        None => "a database URL that does not parse (not shown)".into(),
    }
}

/// A postgres:// (or postgresql://) URL's connection options. sqlx alone takes any scheme, so
/// "user:password@host" would parse, with the password read as part of a database name that
/// the server then echoes in its "does not exist" error.
pub fn parse_database_url(url: &str) -> Option<sqlx::postgres::PgConnectOptions> {
    use std::str::FromStr;
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return None;
    }
    sqlx::postgres::PgConnectOptions::from_str(url).ok()
}

/// A stable, non-secret identity for a database URL (a purge loop restarts on a new one).
pub fn url_key(url: &Redacted) -> String {
    hex(&Sha256::digest(url.expose().as_bytes())[..8])
}

/// Whether the database refused who we are or what we asked (insufficient privilege, bad
/// password, unknown role): no retry heals it, only a GRANT or a fixed Secret.
pub fn is_permission_denied(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().is_some_and(|c| matches!(c.as_ref(), "42501" | "28P01" | "28000")))
}

/// Whether an error means the database cannot be reached (as opposed to refusing a statement).
pub fn is_unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) | sqlx::Error::PoolClosed => true,
        // 57P01..57P03: shutting down, crash recovery, not accepting connections yet; 08xxx: connection
        sqlx::Error::Database(d) => d.code().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_url_without_credentials() {
        assert_eq!(describe_database_url("postgres://u:hunter2@db:5432/x?sslmode=require"), "db:5432/x");
        assert_eq!(describe_database_url("postgres://db/x"), "db:5432/x");
        assert_eq!(describe_database_url("postgres://u@db:6543/x?password=hunter2"), "db:6543/x");
        // Not URLs: nothing of them is shown.
        for secret in ["hunter2", "host=db password=hunter2", "postgres://u:hun/ter2@db/x", "u:hunter2@db"] {
            let d = describe_database_url(secret);
            assert!(!d.contains("hunter2") && !d.contains("ter2"), "{secret:?} -> {d:?}");
        }
    }

    #[test]
    fn url_key_is_the_first_8_bytes_of_the_digest() {
        let url = Redacted::new("postgres://u:p@db/x");
        assert_eq!(url_key(&url), crate::core::sql::sha256_hex("postgres://u:p@db/x")[..16]);
        assert_eq!(url_key(&Redacted::new("abc")), "ba7816bf8f01cfea");
    }
}
