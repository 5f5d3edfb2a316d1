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

mod handler;
pub mod metrics;

use sqlx::PgConnection;

pub use self::handler::{is_transient, BoxError, Delivery, HandleError, Handled, Retry};
pub use self::metrics::InboxMetrics;
use crate::sql::{Ident, IdentError, QualifiedName};

/// An inbox table and the consumer name that claims ids in it (several consumers can share a table).
#[derive(Debug, Clone)]
pub struct Inbox {
    table: QualifiedName,
    consumer: String,
    claim_sql: String,
    claim_all_sql: String,
    insert_all_sql: String,
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
        let insert_all_sql = format!("insert into {table} (consumer, message_id) select $1, m from unnest($2::text[]) m");
        Inbox {
            table,
            consumer: consumer.into(),
            claim_sql,
            claim_all_sql,
            insert_all_sql,
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

    /// `claim` for a batch of messages: for each id, in order, true when this is its first claim.
    /// An id repeated within the batch is new only the first time.
    ///
    /// Most batches hold no id seen before, so it first inserts them all with a plain insert in a
    /// savepoint: cheaper per row than `on conflict do nothing`, which checks the key before and
    /// after each row (speculative insertion). A unique violation (an id claimed before, or by a
    /// concurrent transaction that committed) rolls back to the savepoint, and the batch goes
    /// through `on conflict do nothing`, which says which ids were new. The ids are inserted in
    /// sorted order, so concurrent batches that share ids take their row locks in one order and do
    /// not deadlock each other.
    pub async fn claim_all(&self, tx: &mut PgConnection, message_ids: &[&str]) -> Result<Vec<bool>, sqlx::Error> {
        let mut unique: Vec<&str> = message_ids.to_vec();
        unique.sort_unstable();
        unique.dedup();
        let new: std::collections::HashSet<String> = if unique.is_empty() {
            Default::default()
        } else if self.insert_all(tx, &unique).await? {
            unique.iter().map(|id| id.to_string()).collect()
        } else {
            sqlx::query_scalar(&self.claim_all_sql)
                .bind(&self.consumer)
                .bind(&unique)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect()
        };
        let mut new = new;
        let claimed: Vec<bool> = message_ids.iter().map(|id| new.remove(*id)).collect();
        if let Some(m) = &self.metrics {
            for n in &claimed {
                m.claimed(&self.consumer, *n);
            }
        }
        Ok(claimed)
    }

    /// Insert every id (sorted, distinct) in a savepoint: true when all were new, false when one
    /// was not (rolled back to the savepoint, nothing inserted) or there is no transaction to
    /// hold a savepoint.
    async fn insert_all(&self, tx: &mut PgConnection, ids: &[&str]) -> Result<bool, sqlx::Error> {
        match sqlx::query("savepoint lockstep_claim_all").execute(&mut *tx).await {
            Ok(_) => {}
            // Not in a transaction block (a bare connection): each statement commits on its own.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("25P01") => return Ok(false),
            Err(e) => return Err(e),
        }
        let inserted = sqlx::query(&self.insert_all_sql)
            .bind(&self.consumer)
            .bind(ids)
            .execute(&mut *tx)
            .await;
        match inserted {
            Ok(_) => {
                sqlx::query("release savepoint lockstep_claim_all").execute(&mut *tx).await?;
                Ok(true)
            }
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
                sqlx::query("rollback to savepoint lockstep_claim_all").execute(&mut *tx).await?;
                sqlx::query("release savepoint lockstep_claim_all").execute(&mut *tx).await?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}
