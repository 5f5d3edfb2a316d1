//! The idempotent consumer, for Rust consumers: claim a message id in the inbox table inside the
//! caller's own transaction, and apply the side effect only when the claim is new.
//!
//! ```no_run
//! # async fn handle(pool: sqlx::PgPool, msg_id: &str) -> Result<(), Box<dyn std::error::Error>> {
//! let inbox = lockstep::inbox::Inbox::new("billing", "inbox", "billing-service")?;
//! let mut tx = pool.begin().await?;
//! if inbox.claim(&mut tx, msg_id).await? {
//!     // first delivery: apply the side effect in the same transaction
//!     sqlx::query("update accounts set balance = balance - 10 where id = 1").execute(&mut *tx).await?;
//! }
//! tx.commit().await?; // the claim and the effect commit together, or neither does
//! # Ok(()) }
//! ```
//!
//! The same in SQL, for any language:
//! `INSERT INTO billing.inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING`,
//! then apply the effect only when one row was inserted, and commit both together.

mod amqp;
mod handler;
pub mod metrics;

use sqlx::PgConnection;

pub use self::handler::{is_transient, BoxError, Delivery, HandleError, Handled, Retry};
pub use self::metrics::InboxMetrics;
use crate::core::sql::{Ident, IdentError, QualifiedName};

/// An inbox table and the consumer name that claims ids in it (several consumers can share a table).
#[derive(Debug, Clone)]
pub struct Inbox {
    table: QualifiedName,
    consumer: String,
    claim_sql: String,
    claim_all_sql: String,
    metrics: Option<InboxMetrics>,
}

impl Inbox {
    pub fn new(schema: &str, table: &str, consumer: impl Into<String>) -> Result<Self, IdentError> {
        Ok(Self::for_table(
            QualifiedName {
                schema: Ident::parse(schema)?,
                table: Ident::parse(table)?,
            },
            consumer,
        ))
    }

    pub fn for_table(table: QualifiedName, consumer: impl Into<String>) -> Self {
        let claim_sql = format!("insert into {table} (consumer, message_id) values ($1, $2) on conflict do nothing");
        let claim_all_sql = format!(
            "insert into {table} (consumer, message_id) select $1, m from unnest($2::text[]) m on conflict do nothing returning message_id"
        );
        Inbox {
            table,
            consumer: consumer.into(),
            claim_sql,
            claim_all_sql,
            metrics: None,
        }
    }

    /// Count claims (and, through [`Inbox::handle`], retries, failures and end-to-end latency)
    /// in `metrics`. A bare `claim` is counted when it returns, even if its transaction then
    /// rolls back; `handle` counts only what committed.
    pub fn with_metrics(mut self, metrics: InboxMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn table(&self) -> &QualifiedName {
        &self.table
    }

    /// True exactly once per (consumer, message id): the first time, in the transaction that commits.
    /// Call it inside the transaction that applies the side effect. A concurrent claim of the same id
    /// waits for this transaction and then returns false (or true, if this one rolled back).
    pub async fn claim(&self, tx: &mut PgConnection, message_id: &str) -> Result<bool, sqlx::Error> {
        let new = self.claim_uncounted(tx, message_id).await?;
        if let Some(m) = &self.metrics {
            m.claimed(&self.consumer, new);
        }
        Ok(new)
    }

    async fn claim_uncounted(&self, tx: &mut PgConnection, message_id: &str) -> Result<bool, sqlx::Error> {
        let r = sqlx::query(&self.claim_sql)
            .bind(&self.consumer)
            .bind(message_id)
            .execute(tx)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// `claim` for a batch of messages in one statement (one round trip): for each id, in order,
    /// true when this is its first claim. An id repeated within the batch is new only the first
    /// time. The distinct ids are inserted in sorted order, so concurrent batches that share ids
    /// take their locks in one order and do not deadlock each other (unsorted, two consumers
    /// claiming overlapping batches at once, as in a rebalance, could).
    pub async fn claim_all(&self, tx: &mut PgConnection, message_ids: &[&str]) -> Result<Vec<bool>, sqlx::Error> {
        let mut unique: Vec<&str> = message_ids.to_vec();
        unique.sort_unstable();
        unique.dedup();
        let new: Vec<String> = if unique.is_empty() {
            Vec::new()
        } else {
            sqlx::query_scalar(&self.claim_all_sql)
                .bind(&self.consumer)
                .bind(&unique)
                .fetch_all(tx)
                .await?
        };
        let mut new: std::collections::HashSet<String> = new.into_iter().collect();
        let claimed: Vec<bool> = message_ids.iter().map(|id| new.remove(*id)).collect();
        if let Some(m) = &self.metrics {
            for n in &claimed {
                m.claimed(&self.consumer, *n);
            }
        }
        Ok(claimed)
    }
}
