//! An outbox table of a test's own (a fresh schema), and what every relay test asks of it.

use std::time::{Duration, Instant};

pub struct OutboxTable {
    pub schema: String,
    pub pool: sqlx::PgPool,
}

impl OutboxTable {
    /// A fresh schema named after `prefix` on `url`, with a migrated outbox table.
    pub async fn create(prefix: &str, url: &str) -> Self {
        let schema = format!("t_{}", super::unique(prefix).replace('-', "_"));
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(url).await.unwrap();
        let t = lockstep::core::sql::QualifiedName {
            schema: lockstep::core::sql::Ident::parse(&schema).unwrap(),
            table: lockstep::core::sql::Ident::parse("outbox").unwrap(),
        };
        let mut c = pool.acquire().await.unwrap();
        lockstep::tables::schema::migrate(&mut c, lockstep::tables::schema::TableKind::Outbox, &t, true)
            .await
            .unwrap();
        OutboxTable { schema, pool }
    }

    /// `n` events over `keys` keys: event g has key `k-(g % keys)`, payload
    /// `{"key": g % keys, "n": g / keys}` (so a key's `n` grows with its events) and the header
    /// `source: test`.
    pub async fn insert(&self, from: i64, n: i64, keys: i64) {
        sqlx::query(&format!(
            "insert into \"{}\".outbox (id, aggregatetype, aggregateid, type, payload, headers)
             select gen_random_uuid(), 'order', 'k-' || (g % $3), 'created', jsonb_build_object('key', g % $3, 'n', g / $3),
             '{{\"source\": \"test\"}}'
             from generate_series($1, $1 + $2 - 1) g",
            self.schema
        ))
        .bind(from)
        .bind(n)
        .bind(keys)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    pub async fn remaining(&self) -> i64 {
        sqlx::query_scalar(&format!("select count(*) from \"{}\".outbox", self.schema))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub async fn wait_drained(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.remaining().await;
            if left == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "{left} events still in the outbox after {timeout:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
