//! The relay's session on PostgreSQL: connect, wait for the outbox lock, relay on that same
//! connection, start over when it is lost.
//!
//! Failover when the active relay did not exit cleanly (its node was lost, or the network cut it
//! off): PostgreSQL keeps a session, and so its advisory lock, until TCP reports the client gone,
//! which with the server's defaults takes hours when no packet comes back. The lock session
//! therefore sets the server's TCP keepalives and `tcp_user_timeout` (per-session settings any
//! user may change), so that the server drops a silent relay's session, and releases its lock,
//! within [`DEAD_PEER_TIMEOUT`]; a standby polls the lock every second and takes over. The relay
//! itself stops sending, and purges what its producer holds, within half that time (`fence`), so
//! its messages cannot land behind those of the relay that takes over.
//!
//! Two setups that would void the lock are refused: a hot standby (read-only; the relay would
//! publish a replica's rows it can never remove), and a transaction-pooling proxy, which runs each
//! transaction on any of its server connections: the server process that took the session lock is
//! not the one running the batches (seen as `pg_backend_pid()` changing under the lock, or the
//! session losing the relay's marker), or a standby's lock attempt lands on the session that holds
//! the lock and, the lock being re-entrant, would succeed (seen as the session holding the lock
//! before the attempt).

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use sqlx::{postgres::PgConnectOptions, Connection, Executor, PgConnection, PgPool};

use tokio_util::sync::CancellationToken;

use super::{
    backoff,
    fence::{lock_sql, Fence, Holder},
    metrics::WakeLabel,
    ownership::Ownership,
    Relay, RelayError, RelayMetrics,
};
use crate::config::RelayConfig;

/// How long a dead peer of a relay's connection goes unnoticed, at most (plus timer slack): the
/// server drops the session of a relay that stopped answering, which releases its lock; a relay
/// gives up on a server that did not answer a session statement within it.
pub const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(20);

/// Keepalive probes before the server gives up on a silent relay.
const KEEPALIVE_PROBES: u64 = 3;
/// How soon a relay looks again for a notified row it could not read yet.
const HELD_RETRY: Duration = Duration::from_secs(1);

/// The server-side TCP settings of a relay's session, derived from `t`: the first keepalive probe
/// after `t`/4 of silence, then one every `t`/4, the connection dropped when 3 went unanswered
/// (`t`/4 + 3 x `t`/4 = `t`); `tcp_user_timeout` = `t` bounds what keepalives do not cover, data
/// the server sent and the relay never acknowledged (such as the answer to its last query), and
/// on Linux also caps the keepalive wait at `t`. Set with SET rather than as startup options, which
/// PgBouncer refuses even in session pooling.
pub fn keepalive_sql(t: Duration) -> String {
    let every = (t.as_secs() / (KEEPALIVE_PROBES + 1)).max(1);
    format!(
        "set tcp_keepalives_idle = {every}; set tcp_keepalives_interval = {every}; \
         set tcp_keepalives_count = {KEEPALIVE_PROBES}; set tcp_user_timeout = {}",
        t.as_millis()
    )
}

/// A hot standby cannot take the relay's writes (marking, deleting, quarantining rows), and its
/// outbox is a replica of the primary's, which a relay there publishes already.
pub fn require_primary(in_recovery: bool) -> Result<(), RelayError> {
    if in_recovery {
        return Err(RelayError::Standby);
    }
    Ok(())
}

/// The session lock belongs to the server process that took it: if this connection now reaches
/// another one, a pooler moved it and the lock no longer guards the batches.
pub fn require_same_backend(locked: i32, now: i32) -> Result<(), RelayError> {
    if locked != now {
        return Err(RelayError::BackendChanged { locked, now });
    }
    Ok(())
}

/// Fail with `RelayError::Standby` on a hot standby.
pub(super) async fn refuse_standby(conn: &mut PgConnection) -> Result<(), RelayError> {
    let in_recovery: bool = sqlx::query_scalar("select pg_is_in_recovery()")
        .persistent(false)
        .fetch_one(&mut *conn)
        .await?;
    require_primary(in_recovery)
}

/// Set up a new connection: the server-side TCP settings (`keepalive_sql`); each statement planned
/// once (a custom plan per read cost a fifth of the relay session's CPU; the read's lists are
/// hashed subplans, fast in a generic plan too); and commits that do not wait for the WAL flush. The
/// relay only removes, marks or moves rows it has published: a commit lost in a database crash
/// brings those rows back, to be published again (a duplicate consumers drop, never a loss), and
/// not waiting for the disk leaves the writers' commits the log to themselves.
pub(super) async fn configure(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    conn.execute(keepalive_sql(DEAD_PEER_TIMEOUT).as_str()).await?;
    conn.execute("set plan_cache_mode = force_generic_plan").await?;
    conn.execute("set synchronous_commit = off").await.map(drop)
}

/// The wait before the next connection after `failures` in a row (connect, lock or session).
pub fn reconnect_wait(failures: u32) -> Duration {
    backoff(failures.min(30) as i32).min(Duration::from_secs(10))
}

/// `f`, or `RelayError::Unresponsive` when the database did not answer within DEAD_PEER_TIMEOUT.
async fn answered<T>(doing: &'static str, f: impl Future<Output = Result<T, RelayError>>) -> Result<T, RelayError> {
    match tokio::time::timeout(DEAD_PEER_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(RelayError::Unresponsive {
            doing,
            after: DEAD_PEER_TIMEOUT,
        }),
    }
}

/// One relay's sessions: connect, wait for the lock, relay on that connection; start over when
/// the connection is lost.
pub(super) struct Session<'a> {
    pub(super) cfg: &'a RelayConfig,
    pub(super) opts: PgConnectOptions,
    /// For LISTEN; batches never run on it.
    pub(super) pool: PgPool,
    pub(super) key: i64,
    pub(super) channel: String,
    pub(super) active: Arc<AtomicBool>,
    pub(super) metrics: Arc<RelayMetrics>,
    pub(super) stop: &'a CancellationToken,
}

impl Session<'_> {
    /// Until `stop` (Ok), or an error no reconnect can fix (a standby, a transaction pooler).
    pub(super) async fn run(&self, relay: &mut Relay) -> Result<(), RelayError> {
        let mut failures = 0u32;
        while !self.stop.is_cancelled() {
            // One connection holds the lock and runs every batch.
            let mut conn = match self.connect().await {
                Ok(c) => c,
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    failures += 1;
                    let wait = reconnect_wait(failures);
                    tracing::warn!(error = %e, ?wait, "database unreachable");
                    if self.stopped_during(wait).await {
                        break;
                    }
                    continue;
                }
            };
            let fence = match self.lock(&mut conn).await {
                Ok(Some(fence)) => fence,
                Ok(None) => break,
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    // A server that accepts connections and fails the lock statement would
                    // otherwise be reconnected to in a tight loop.
                    failures += 1;
                    let wait = reconnect_wait(failures);
                    tracing::warn!(error = %e, ?wait, "lost the database while waiting for the lock");
                    if self.stopped_during(wait).await {
                        break;
                    }
                    continue;
                }
            };
            if let Err(e) = self.join(relay, &mut conn, &fence).await {
                failures += 1;
                tracing::warn!(error = %e, "lost the database while joining the outbox's relays");
                if self.stopped_during(reconnect_wait(failures)).await {
                    break;
                }
                continue;
            }
            self.set_active(true);
            failures = 0;
            let result = self.relay(relay, &mut conn, fence).await;
            self.set_active(false);
            relay.buckets = None;
            self.metrics.buckets_owned.set(0);
            if let Err(e) = &result {
                // The lock may be gone, or about to be: nothing this relay queued may be sent.
                tracing::warn!(error = %e, "relay session ended");
                fence_off(relay).await;
            }
            match result {
                Ok(()) => {
                    // Everything sent settled (the drain finished): the buckets may go at once.
                    let _ = sqlx::query("select pg_advisory_unlock_all()").execute(&mut conn).await;
                    let _ = conn.close().await;
                    break;
                }
                // Not unlocked: through a pooler, the unlock would run on some other session.
                Err(e) if e.is_fatal() => return Err(e),
                Err(_) => {
                    failures += 1;
                    if self.stopped_during(reconnect_wait(failures).min(Duration::from_secs(5))).await {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// With buckets: join the outbox's relays on the lock session (`ownership`).
    async fn join(&self, relay: &mut Relay, conn: &mut PgConnection, fence: &Fence) -> Result<(), RelayError> {
        let r = &self.cfg.resolved;
        if r.buckets <= 1 {
            return Ok(());
        }
        let me = fence.pid().unwrap_or_default();
        let joined = fence
            .bound(async { Ok(Ownership::join(conn, &r.table, r.buckets, me, self.metrics.clone()).await?) })
            .await?;
        relay.buckets = Some(joined);
        Ok(())
    }

    /// A new connection for the lock: server-side TCP settings set, standby refused.
    async fn connect(&self) -> Result<PgConnection, RelayError> {
        answered("connecting", async {
            let mut conn = PgConnection::connect_with(&self.opts).await?;
            configure(&mut conn).await?;
            refuse_standby(&mut conn).await?;
            Ok(conn)
        })
        .await
    }

    /// Sleep; true when `stop` fired first.
    async fn stopped_during(&self, wait: Duration) -> bool {
        tokio::select! { _ = self.stop.cancelled() => true, _ = tokio::time::sleep(wait) => false }
    }

    fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::Relaxed);
        self.metrics.active.set(i64::from(active));
    }

    /// Wait until this connection holds the outbox lock; its fence, from the send time of the
    /// statement that took it, or None when stopped first. Refused when the server session held
    /// the lock before this relay tried: another client's session, handed over by a pooler.
    /// Unnamed: a prepared statement's name would clash on a session a pooler shares.
    async fn lock(&self, conn: &mut PgConnection) -> Result<Option<Fence>, RelayError> {
        let mut announced = false;
        let marker = uuid::Uuid::new_v4().to_string();
        let bucketed = self.cfg.resolved.buckets > 1;
        let sql = lock_sql(bucketed);
        loop {
            let sent = Instant::now();
            let (held, got, pid, _) = answered("taking the outbox lock", async {
                Ok(sqlx::query_as::<_, (bool, bool, i32, Option<String>)>(&sql)
                    .bind(self.key)
                    .bind(&marker)
                    .persistent(false)
                    .fetch_one(&mut *conn)
                    .await?)
            })
            .await?;
            if held {
                return Err(RelayError::SessionShared {
                    pid,
                    seen: "the server session this relay reached already holds the outbox lock, which this relay did not take",
                });
            }
            if got {
                match bucketed {
                    true => {
                        tracing::info!(table = %self.cfg.resolved.table, pid, buckets = self.cfg.resolved.buckets, "joined the outbox's relays")
                    }
                    false => tracing::info!(table = %self.cfg.resolved.table, pid, "holding the outbox lock: relaying"),
                }
                return Ok(Some(Fence::new(sent, Holder { pid, marker })));
            }
            if !announced {
                match bucketed {
                    true => {
                        tracing::info!(table = %self.cfg.resolved.table, "a relay without buckets (buckets 1) is active; waiting until it stopped")
                    }
                    false => tracing::info!(table = %self.cfg.resolved.table, "another relay is active; standing by"),
                }
                announced = true;
            }
            if self.stopped_during(Duration::from_secs(1)).await {
                return Ok(None);
            }
        }
    }

    /// Check the session, drain, then wait for NOTIFY or the poll interval, until `stop` (Ok) or
    /// an error.
    /// Drain, then wait for NOTIFY or the poll interval, until `stop` (Ok) or an error; the session
    /// is checked every CHECK_EVERY throughout (`Fence::keep`: idle, between batches, and while a
    /// drain waits for delivery reports), so the fence never lapses on a live session.
    async fn relay(&self, relay: &mut Relay, conn: &mut PgConnection, mut fence: Fence) -> Result<(), RelayError> {
        let new_rows = relay.new_rows();
        let _listening = super::listen::listen(
            self.cfg,
            &self.pool,
            &self.channel,
            &self.metrics,
            new_rows.clone(),
            relay.listening(),
        )
        .await;
        let poll = self.cfg.resolved.poll_interval;
        let (mut woken_by, mut held) = ("start", false);
        loop {
            let read = relay.drain_in(conn, self.stop, &mut fence).await?;
            if self.stop.is_cancelled() {
                return Ok(());
            }
            // A NOTIFY whose row the drain could not read yet (an older transaction still open
            // keeps it above the snapshot's horizon) is not left to the poll interval: look again
            // every HELD_RETRY until a drain reads something.
            held = (held || woken_by == "notify") && read == 0;
            let poll_at = tokio::time::Instant::now() + if held { poll.min(HELD_RETRY) } else { poll };
            let by = loop {
                tokio::select! {
                    _ = self.stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep_until(poll_at) => break "poll",
                    _ = new_rows.notified() => break "notify",
                    _ = tokio::time::sleep_until(fence.due().into()) => {
                        fence.keep(conn).await?;
                        if relay.tick_buckets(conn, &fence, true).await? {
                            break "buckets";
                        }
                    }
                }
            };
            self.metrics.wakeups.get_or_create(&WakeLabel { by }).inc();
            woken_by = by;
        }
    }
}

/// After a lock session ended in an error: purge and drop the producer (what it queued or has
/// in flight must not reach the broker after another relay resent those rows and later rows of
/// their keys), before anything else. The gate forgets the batches at the next drain.
async fn fence_off(relay: &mut Relay) {
    let publisher = relay.publisher().clone();
    let held = publisher.in_flight();
    // Purged here too: a replacement that cannot be created leaves the old producer in place.
    publisher.purge().await;
    match relay.replace_producer().await {
        Ok(()) => tracing::warn!(purged = held, "fenced: the producer's queue was purged and the producer dropped"),
        Err(e) => tracing::error!(error = %e, "cannot create a new producer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_drops_a_silent_relay_within_the_dead_peer_timeout() {
        assert_eq!(
            keepalive_sql(DEAD_PEER_TIMEOUT),
            "set tcp_keepalives_idle = 5; set tcp_keepalives_interval = 5; \
             set tcp_keepalives_count = 3; set tcp_user_timeout = 20000"
        );
        // Idle, then every probe unanswered: the whole timeout, no more.
        assert_eq!(5 + 3 * 5, DEAD_PEER_TIMEOUT.as_secs());
        assert!(keepalive_sql(Duration::from_secs(2)).starts_with("set tcp_keepalives_idle = 1;"));
    }

    #[test]
    fn a_standby_is_refused_with_what_to_do() {
        assert!(require_primary(false).is_ok());
        let e = require_primary(true).unwrap_err();
        assert!(e.is_fatal());
        let msg = e.to_string();
        assert!(msg.contains("read-only hot standby"), "{msg}");
        assert!(msg.contains("point DATABASE_URL at the primary"), "{msg}");
    }

    #[test]
    fn a_changed_backend_voids_the_lock_and_names_transaction_pooling() {
        assert!(require_same_backend(4242, 4242).is_ok());
        let e = require_same_backend(4242, 4343).unwrap_err();
        assert!(e.is_fatal());
        let msg = e.to_string();
        for part in [
            "backend pid 4242, now 4343",
            "PgBouncer pool_mode=transaction",
            "session pooling",
            "directly",
        ] {
            assert!(msg.contains(part), "{part:?} in {msg}");
        }
    }

    #[test]
    fn reconnects_back_off_to_ten_seconds() {
        let waits: Vec<u64> = (1..=6).map(|f| reconnect_wait(f).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 10, 10]);
        assert_eq!(reconnect_wait(u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn an_unresponsive_database_is_not_fatal() {
        let e = RelayError::Unresponsive {
            doing: "checking the lock session",
            after: DEAD_PEER_TIMEOUT,
        };
        assert!(!e.is_fatal());
        assert_eq!(
            e.to_string(),
            "the database did not answer within 20s while checking the lock session"
        );
    }
}
