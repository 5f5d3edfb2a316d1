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

use sqlx::PgConnection;

use crate::sql::{Ident, IdentError, QualifiedName};

/// An inbox table and the consumer name that claims ids in it (several consumers can share a table).
#[derive(Debug, Clone)]
pub struct Inbox {
    table: QualifiedName,
    consumer: String,
    claim_sql: String,
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
        Inbox {
            table,
            consumer: consumer.into(),
            claim_sql,
        }
    }

    pub fn table(&self) -> &QualifiedName {
        &self.table
    }

    /// True exactly once per (consumer, message id): the first time, in the transaction that commits.
    /// Call it inside the transaction that applies the side effect. A concurrent claim of the same id
    /// waits for this transaction and then returns false (or true, if this one rolled back).
    pub async fn claim(&self, tx: &mut PgConnection, message_id: &str) -> Result<bool, sqlx::Error> {
        let r = sqlx::query(&self.claim_sql)
            .bind(&self.consumer)
            .bind(message_id)
            .execute(tx)
            .await?;
        Ok(r.rows_affected() == 1)
    }
}
