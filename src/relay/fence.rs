//! Fencing: a relay hands messages to its producer only while the database cannot yet have given
//! the outbox lock to another relay.
//!
//! The server drops a silent relay's session, which releases its lock, no earlier than
//! [`DEAD_PEER_TIMEOUT`] after it last heard from the relay (`session::keepalive_sql`), and so no
//! earlier than that after the relay *sent* its last statement on the lock session that got an
//! answer (`confirmed`). The relay hands messages to the producer only before `confirmed` +
//! [`FENCE`]; it checks its session every [`CHECK_EVERY`], also while a drain waits for delivery
//! reports, and bounds every statement on the lock session by that deadline. When the deadline
//! passes or a check fails, the session ends and the relay purges and drops its producer before
//! anything else (`Session::run`). [`GAP`] = DEAD_PEER_TIMEOUT - FENCE is the margin for timer
//! slack, the purge, and produce requests already on the wire: those cannot be recalled, and one
//! the network holds back longer than the margin can still land after another relay's messages.

use std::time::{Duration, Instant};

use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;

use super::{session::DEAD_PEER_TIMEOUT, Relay, RelayError};
use crate::tables::locks::MARKER;

/// How long after the send time of its last answered round trip on the lock session a relay may
/// still hand messages to its producer.
pub const FENCE: Duration = Duration::from_millis(DEAD_PEER_TIMEOUT.as_millis() as u64 / 2);

/// The margin between the relay's own bound and the earliest the server can release the lock.
pub const GAP: Duration = Duration::from_millis((DEAD_PEER_TIMEOUT.as_millis() - FENCE.as_millis()) as u64);

/// How often a relay checks that its lock session still answers and is still its own, at most.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The lock attempt, in one statement: whether this server session already held the outbox lock
/// before (then it is another client's session, handed over by a pooler: a session advisory lock
/// taken again on the same session succeeds, so both would run; not taken again), whether it took
/// it, its backend pid, and the marker set once taken. `$1` the key, `$2` the marker.
/// The subqueries (OFFSET 0 keeps them apart) look before the lock is tried. `shared`: the
/// lock relays with buckets hold, which excludes a relay without (`crate::tables::buckets`).
pub fn lock_sql(shared: bool) -> String {
    let take = if shared {
        "pg_try_advisory_lock_shared"
    } else {
        "pg_try_advisory_lock"
    };
    format!(
        "select held, got, pid, case when got then set_config('{MARKER}', $2, false) end \
         from (select held, case when held then false else {take}($1) end as got, pg_backend_pid() as pid \
         from (select exists (select 1 from pg_locks where locktype = 'advisory' and granted and objsubid = 1 \
         and pid = pg_backend_pid() and database = (select oid from pg_database where datname = current_database()) \
         and classid::bigint = ($1 >> 32) & 4294967295 and objid::bigint = $1 & 4294967295) as held offset 0) s offset 0) t"
    )
}

/// The server session this relay's lock is on.
#[derive(Debug, Clone)]
pub(super) struct Holder {
    pub(super) pid: i32,
    pub(super) marker: String,
}

/// The session a check reached must be the one that took the lock: same backend, and still
/// carrying this relay's marker (another client's statements on it, or another session, would not).
pub fn require_own_session(locked: i32, marker: &str, pid: i32, seen: Option<&str>) -> Result<(), RelayError> {
    super::session::require_same_backend(locked, pid)?;
    if seen != Some(marker) {
        return Err(RelayError::SessionShared {
            pid,
            seen: "the lock session no longer carries this relay's marker",
        });
    }
    Ok(())
}

/// The deadline of one lock session (see the module).
pub(super) struct Fence {
    confirmed: Instant,
    checked: Instant,
    window: Duration,
    holder: Option<Holder>,
}

impl Fence {
    /// The fence of a lock taken by a statement sent at `sent`.
    pub(super) fn new(sent: Instant, holder: Holder) -> Self {
        Fence {
            confirmed: sent,
            checked: sent,
            window: FENCE,
            holder: Some(holder),
        }
    }

    /// No lock session: no checks, no deadline (a caller that drains on a connection of its own).
    pub(super) fn unchecked() -> Self {
        let now = Instant::now();
        Fence {
            confirmed: now,
            checked: now,
            window: Duration::from_secs(100 * 365 * 86_400),
            holder: None,
        }
    }

    /// The backend pid of the lock session, if any.
    pub(super) fn pid(&self) -> Option<i32> {
        self.holder.as_ref().map(|h| h.pid)
    }

    /// No message goes to the producer from this instant on.
    pub(super) fn deadline(&self) -> Instant {
        self.confirmed + self.window
    }

    /// When the next check is due: a drain waiting for reports wakes for it.
    pub(super) fn due(&self) -> Instant {
        match self.holder {
            Some(_) => (self.checked + CHECK_EVERY).min(self.deadline()),
            None => self.deadline(),
        }
    }

    /// The earlier of `t` and the next check: a wait in a drain ends by then.
    pub(super) fn until(&self, t: Option<Instant>) -> Instant {
        t.map_or(self.due(), |t| t.min(self.due()))
    }

    /// `f`, unless the deadline comes first (`RelayError::Fenced`). The deadline is looked at
    /// before `f` is polled, so nothing `f` does starts past it.
    pub(super) async fn bound<T>(&self, f: impl std::future::Future<Output = Result<T, RelayError>>) -> Result<T, RelayError> {
        let deadline = self.deadline();
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(deadline.into()) => Err(RelayError::Fenced { after: self.window }),
            r = f => r,
        }
    }

    /// When a check is due: the session still answers within the deadline and is still this
    /// relay's; the deadline then moves to the check's send time + FENCE.
    pub(super) async fn keep(&mut self, conn: &mut PgConnection) -> Result<(), RelayError> {
        let sent = Instant::now();
        let Some(holder) = &self.holder else { return Ok(()) };
        if sent < self.due() {
            return Ok(());
        }
        let sql = format!("select pg_backend_pid(), current_setting('{MARKER}', true)");
        let (pid, seen) = self
            .bound(async {
                Ok(sqlx::query_as::<_, (i32, Option<String>)>(&sql)
                    .persistent(false)
                    .fetch_one(&mut *conn)
                    .await?)
            })
            .await?;
        require_own_session(holder.pid, &holder.marker, pid, seen.as_deref())?;
        self.confirmed = sent;
        self.checked = sent;
        Ok(())
    }
}

impl Relay {
    /// Publish until the outbox has nothing more to read and every batch sent is acknowledged and
    /// removed (`drain_in`), on a connection without the lock session's checks.
    pub async fn drain(&mut self, conn: &mut PgConnection, stop: &CancellationToken) -> Result<(), RelayError> {
        self.drain_in(conn, stop, &mut Fence::unchecked()).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_fences_itself_strictly_before_the_server_can_release_the_lock() {
        assert_eq!(FENCE, Duration::from_secs(10));
        assert_eq!(GAP, Duration::from_secs(10));
        assert_eq!(FENCE + GAP, DEAD_PEER_TIMEOUT);
        // A check that waits its full bound still ends the session before the deadline passes.
        assert!(CHECK_EVERY < FENCE);
    }

    fn holder() -> Holder {
        Holder {
            pid: 7,
            marker: "m".into(),
        }
    }

    #[test]
    fn checks_come_every_second_and_never_after_the_deadline() {
        let t = Instant::now();
        let mut f = Fence::new(t, holder());
        assert_eq!(f.deadline(), t + FENCE);
        assert_eq!(f.due(), t + CHECK_EVERY);
        assert_eq!(f.until(None), t + CHECK_EVERY);
        assert_eq!(f.until(Some(t)), t);
        f.window = Duration::from_millis(300);
        assert_eq!(f.due(), t + Duration::from_millis(300));
        let u = Fence::unchecked();
        assert!(u.due() > t + Duration::from_secs(86_400 * 365));
    }

    #[tokio::test]
    async fn a_bounded_step_ends_at_the_deadline_and_one_past_it_never_starts() {
        let mut f = Fence::new(Instant::now(), holder());
        f.window = Duration::from_millis(200);
        let began = Instant::now();
        let r = f.bound(std::future::pending::<Result<(), RelayError>>()).await;
        assert!(matches!(r, Err(RelayError::Fenced { .. })), "{r:?}");
        let took = began.elapsed();
        assert!(took >= Duration::from_millis(190) && took < Duration::from_secs(5), "{took:?}");
        let mut ran = false;
        let r = f
            .bound(async {
                ran = true;
                Ok(())
            })
            .await;
        assert!(r.is_err() && !ran, "a step past the deadline does not start");
        assert!(Fence::unchecked().bound(async { Ok(1) }).await.is_ok());
    }

    #[test]
    fn another_clients_session_is_refused_and_names_transaction_pooling() {
        assert!(require_own_session(7, "m", 7, Some("m")).is_ok());
        assert!(matches!(
            require_own_session(7, "m", 8, Some("m")),
            Err(RelayError::BackendChanged { locked: 7, now: 8 })
        ));
        for seen in [None, Some("other")] {
            let e = require_own_session(7, "m", 7, seen).unwrap_err();
            assert!(e.is_fatal());
            let msg = e.to_string();
            for part in ["marker", "backend pid 7", "PgBouncer pool_mode=transaction", "pool_mode=session"] {
                assert!(msg.contains(part), "{part:?} in {msg}");
            }
        }
    }

    #[test]
    fn the_lock_statement_reads_the_lock_table_with_the_keys_halves() {
        let sql = lock_sql(false);
        assert!(sql.contains("classid::bigint = ($1 >> 32) & 4294967295 and objid::bigint = $1 & 4294967295"));
        assert!(sql.contains("case when held then false else pg_try_advisory_lock($1) end"));
        assert!(sql.contains("set_config('lockstep.relay_session', $2, false)"));
    }
}
