//! An idempotent consumer with `lockstep::inbox`: each message's side effect (crediting an account)
//! is applied exactly once, however often the message is delivered.
//!
//!   DATABASE_URL=postgres://... cargo run --example inbox_consumer
//!
//! It creates `demo.inbox` (as an InboxTable would) and `demo.accounts`, then "receives" a stream of
//! messages in which every message arrives twice, as at-least-once delivery allows.

use lockstep::{
    core::sql::{Ident, QualifiedName},
    inbox::Inbox,
    tables::schema::{migrate, TableKind},
};

struct Message {
    id: String,
    account: i64,
    amount: i64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL to a PostgreSQL URL")?;
    let pool = sqlx::PgPool::connect(&url).await?;
    let table = QualifiedName {
        schema: Ident::parse("demo")?,
        table: Ident::parse("inbox")?,
    };
    migrate(&mut *pool.acquire().await?, TableKind::Inbox, &table, true).await?;
    sqlx::query("create table if not exists demo.accounts (id bigint primary key, balance bigint not null default 0)")
        .execute(&pool)
        .await?;
    sqlx::query("insert into demo.accounts (id) values (1), (2) on conflict do nothing")
        .execute(&pool)
        .await?;

    let inbox = Inbox::for_table(table, "billing");
    let run = uuid::Uuid::new_v4().simple().to_string();
    let messages: Vec<Message> = (0..10)
        .map(|i| Message {
            id: format!("{run}-{i}"),
            account: 1 + i % 2,
            amount: 10,
        })
        .collect();
    let (mut applied, mut duplicates) = (0, 0);
    // Every message delivered twice.
    for m in messages.iter().chain(messages.iter()) {
        let mut tx = pool.begin().await?;
        if inbox.claim(&mut tx, &m.id).await? {
            sqlx::query("update demo.accounts set balance = balance + $1 where id = $2")
                .bind(m.amount)
                .bind(m.account)
                .execute(&mut *tx)
                .await?;
            applied += 1;
        } else {
            duplicates += 1;
        }
        tx.commit().await?;
    }
    println!("20 deliveries of 10 messages: {applied} applied, {duplicates} duplicates ignored");
    Ok(())
}
