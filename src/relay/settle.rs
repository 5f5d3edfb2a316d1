//! What becomes of a batch once its delivery reports are in: the acknowledged rows removed in
//! one statement, the failed ones retried, dead-lettered or read again, by their `Cause`. A child
//! of `publisher` (it reads the relay's and the batch's fields).

use std::time::{Duration, Instant};

use sqlx::PgConnection;

use super::{unix_now, InFlight, Relay};
use crate::relay::{
    failure::{transport_backoff, Cause, Failure, Verdict},
    stages::After,
    store::OutboxRow,
    RelayError,
};

impl Relay {
    /// Wait for every delivery report of a batch, remove what was acknowledged in one statement,
    /// record what failed (retry later, or dead-letter), and let the batch's keys be read again.
    pub(super) async fn complete(&mut self, conn: &mut PgConnection, batch: InFlight) -> Result<(), RelayError> {
        let InFlight {
            n,
            sent_as,
            rows,
            keys,
            sent,
            ages,
            reports,
            mut failures,
            started,
            stamps,
        } = batch;
        let reports = reports.all().await;
        // Stage stamps are a benchmark's: a production relay takes no clock and no pass for them.
        let collected = if stamps.is_some() { unix_now() } else { 0.0 };
        let mut acked = Vec::with_capacity(sent.len());
        let mut latencies = Vec::with_capacity(sent.len());
        let last = match stamps {
            Some(_) => reports.iter().fold(0.0, |a: f64, (_, at)| a.max(*at)),
            None => 0.0,
        };
        let mut acked_at = Vec::new();
        let mut reports = reports.into_iter();
        for i in sent {
            let Some((report, at)) = reports.next() else {
                failures.push(Failure::report_lost(i));
                continue;
            };
            match report {
                Ok(acked_by) => {
                    if acked_by.duplicate {
                        self.metrics.duplicates.inc();
                    }
                    latencies.push((at - rows[i].created).max(0.0));
                    if stamps.is_some() {
                        acked_at.push((i, at));
                    }
                    acked.push(rows[i].id)
                }
                Err(refusal) => {
                    self.metrics.count_failure(&refusal.reason);
                    self.stale_producer |= refusal.stale;
                    let failure = Failure::delivery(i, refusal, ages[i].is_none());
                    if let (Cause::Timestamp, Some(age)) = (failure.cause, ages[i]) {
                        let bound = crate::core::stamp::tighten(self.stamp_bound, age);
                        if bound < self.stamp_bound {
                            tracing::warn!(
                                bound_ms = bound,
                                "the broker refused a created_at timestamp: rows further from the publish time are stamped with it"
                            );
                        }
                        self.stamp_bound = bound;
                    }
                    failures.push(failure);
                }
            }
        }
        if !acked.is_empty() {
            let deleting = Instant::now();
            self.sql.done(conn, &acked).await?;
            if let Some(s) = &stamps {
                let after = After {
                    collected,
                    delete: deleting.elapsed().as_secs_f64(),
                };
                let stages = acked_at.iter().map(|(i, at)| s.of(*i, rows[*i].created, *at, last, after));
                self.metrics.observe_stages(stages);
            }
            self.transport_failures = 0;
            self.metrics.broker_failing.set(0);
        }
        self.metrics.observe_commit_to_ack(&latencies);
        self.metrics.published.inc_by(acked.len() as u64);
        let mut waits = Vec::with_capacity(failures.len());
        for failure in failures {
            let key = keys[failure.row].as_str();
            if let Some(until) = self.settle(conn, &rows[failure.row], failure).await? {
                waits.push((key, until));
            }
        }
        self.gate.complete(n, waits);
        // The outcome of each message is in: the gate, not the publisher, holds failed keys now.
        self.publisher.completed(sent_as, keys.iter().map(String::as_str));
        self.metrics.batch_seconds.observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Record a failed row: dead-letter it, or say until when its key waits.
    async fn settle(&mut self, conn: &mut PgConnection, row: &OutboxRow, failure: Failure) -> Result<Option<Instant>, RelayError> {
        let error = failure.error.as_str();
        let attempts = row.attempts + i32::from(matches!(failure.cause, Cause::Rejected | Cause::Poison));
        let wait = match failure.verdict(attempts, self.cfg.resolved.max_attempts) {
            Verdict::DeadLetter => {
                self.sql.quarantine(conn, row.id, error).await?;
                self.metrics.quarantined.inc();
                tracing::warn!(id = %row.id, attempts, %error, "moved to the dead-letter table");
                return Ok(None);
            }
            Verdict::Retry(wait) => {
                self.sql.fail(conn, row.id, error).await?;
                tracing::info!(id = %row.id, attempts, %error, retry_in = ?wait, "the broker rejected the message; will retry");
                wait
            }
            Verdict::Again => {
                tracing::debug!(id = %row.id, %error, "failed for another message's sake; will read it again");
                Duration::ZERO
            }
            Verdict::Wait => {
                self.transport_failures += 1;
                self.metrics.broker_failing.set(1);
                let wait = transport_backoff(self.transport_failures);
                tracing::warn!(id = %row.id, %error, retry_in = ?wait, "broker or network failed; will retry (not counted toward maxAttempts)");
                wait
            }
        };
        Ok(Some(Instant::now() + wait))
    }
}
