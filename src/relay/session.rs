//! The relay's session on PostgreSQL: connect, wait for the outbox lock, relay on that same
//! connection, start over when it is lost.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use sqlx::{
    postgres::{PgConnectOptions, PgListener},
    Connection, PgConnection, PgPool,
};
use tokio_util::sync::CancellationToken;

use super::{backoff, Relay, RelayError, RelayMetrics};
use crate::config::RelayConfig;

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
    pub(super) async fn run(&self, relay: &mut Relay) {
        let mut failures = 0u32;
        while !self.stop.is_cancelled() {
            // One connection holds the lock and runs every batch.
            let mut conn = match PgConnection::connect_with(&self.opts).await {
                Ok(c) => c,
                Err(e) => {
                    failures += 1;
                    let wait = backoff(failures as i32).min(Duration::from_secs(10));
                    tracing::warn!(error = %e, ?wait, "database unreachable");
                    if self.stopped_during(wait).await {
                        break;
                    }
                    continue;
                }
            };
            match self.lock(&mut conn).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "lost the database while waiting for the lock");
                    continue;
                }
            }
            tracing::info!(table = %self.cfg.resolved.table, "holding the outbox lock: relaying");
            self.set_active(true);
            failures = 0;
            let result = self.relay(relay, &mut conn).await;
            self.set_active(false);
            match result {
                Ok(()) => {
                    let _ = sqlx::query("select pg_advisory_unlock($1)").bind(self.key).execute(&mut conn).await;
                    let _ = conn.close().await;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "relay session ended; reconnecting");
                    failures += 1;
                    if self.stopped_during(backoff(failures as i32).min(Duration::from_secs(5))).await {
                        break;
                    }
                }
            }
        }
    }

    /// Sleep; true when `stop` fired first.
    async fn stopped_during(&self, wait: Duration) -> bool {
        tokio::select! { _ = self.stop.cancelled() => true, _ = tokio::time::sleep(wait) => false }
    }

    fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::Relaxed);
        self.metrics.active.set(i64::from(active));
    }

    /// Wait until this connection holds the outbox lock; false when stopped first.
    async fn lock(&self, conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
        let mut announced = false;
        loop {
            let held = sqlx::query_scalar::<_, bool>("select pg_try_advisory_lock($1)")
                .bind(self.key)
                .fetch_one(&mut *conn)
                .await?;
            if held {
                return Ok(true);
            }
            if !announced {
                tracing::info!(table = %self.cfg.resolved.table, "another relay is active; standing by");
                announced = true;
            }
            if self.stopped_during(Duration::from_secs(1)).await {
                return Ok(false);
            }
        }
    }

    /// LISTEN on the outbox's channel, unless disabled; without it the relay polls.
    async fn listen(&self) -> Option<PgListener> {
        if !self.cfg.listen {
            return None;
        }
        let l = async {
            let mut l = PgListener::connect_with(&self.pool).await?;
            l.listen(&self.channel).await?;
            Ok::<_, sqlx::Error>(l)
        };
        match l.await {
            Ok(l) => Some(l),
            Err(e) => {
                let poll = self.cfg.resolved.poll_interval;
                tracing::warn!(error = %e, "cannot LISTEN for new rows; polling every {poll:?}");
                None
            }
        }
    }

    /// Drain, then wait for NOTIFY or the poll interval, until `stop` (Ok) or an error.
    async fn relay(&self, relay: &mut Relay, conn: &mut PgConnection) -> Result<(), RelayError> {
        let mut listener = self.listen().await;
        let poll = self.cfg.resolved.poll_interval;
        loop {
            relay.drain(conn, self.stop).await?;
            if self.stop.is_cancelled() {
                return Ok(());
            }
            let wake = async {
                match listener.as_mut() {
                    Some(l) => {
                        let _ = l.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(poll) => {}
                _ = wake => {}
            }
        }
    }
}
