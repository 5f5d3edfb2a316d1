//! The relay's LISTEN for new outbox rows, on a pooled connection of its own.

use std::{sync::Arc, time::Duration};

use sqlx::{postgres::PgListener, PgPool};
use tokio::sync::{watch, Notify};

use super::RelayMetrics;
use crate::config::RelayConfig;

/// The task forwarding NOTIFYs, stopped with the session.
pub(super) struct Listening(tokio::task::JoinHandle<()>);

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// LISTEN on the outbox's channel, unless disabled (the relay then polls), and tell
/// `new_rows` of each NOTIFY. Notifications that arrive together wake one drain (a Notify
/// keeps one permit). While `wanted` is false (a drain under a steady flow polls instead) the
/// channel is unlistened; listening again tells `new_rows` once, for the rows committed
/// meanwhile, which no NOTIFY announced.
pub(super) async fn listen(
    cfg: &RelayConfig,
    pool: &PgPool,
    channel: &str,
    metrics: &Arc<RelayMetrics>,
    new_rows: Arc<Notify>,
    mut wanted: watch::Receiver<bool>,
) -> Option<Listening> {
    if !cfg.listen {
        return None;
    }
    let channel = channel.to_owned();
    let l = async {
        let mut l = PgListener::connect_with(pool).await?;
        l.listen(&channel).await?;
        Ok::<_, sqlx::Error>(l)
    };
    let mut l = match l.await {
        Ok(l) => l,
        Err(e) => {
            let poll = cfg.resolved.poll_interval;
            tracing::warn!(error = %e, "cannot LISTEN for new rows; polling every {poll:?}");
            return None;
        }
    };
    let metrics = metrics.clone();
    Some(Listening(tokio::spawn(async move {
        let mut on = true;
        loop {
            // try_recv is cancel-safe: a notification is taken whole or left for the next call.
            tokio::select! {
                r = l.try_recv() => match r {
                    Ok(Some(_)) => {
                        metrics.notifications.inc();
                    }
                    // Reconnected: rows may have come meanwhile, unannounced.
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection failed; retrying in 1s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
                changed = wanted.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let want = *wanted.borrow_and_update();
                    if want == on {
                        continue;
                    }
                    // Until it worked (the listener reconnects by itself): a relay that stopped
                    // listening would otherwise wake only at the poll interval.
                    while let Err(e) = if want { l.listen(&channel).await } else { l.unlisten(&channel).await } {
                        tracing::warn!(error = %e, listen = want, "cannot change LISTEN; retrying in 1s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    on = want;
                    if !want {
                        continue;
                    }
                }
            }
            new_rows.notify_one();
        }
    })))
}
