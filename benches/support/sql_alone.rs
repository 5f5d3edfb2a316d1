//! D, the relay's database work alone: its own select and delete statements over the `n` events
//! loaded in its outbox, no broker. Shared by the benches that compare a relay with it.

use std::{sync::Arc, time::Instant};

use lockstep::{
    config::RelayConfig,
    relay::{PayloadColumn, Relay, RelayMetrics},
};
use sqlx::Row;

/// Events per second of the relay's select + delete until the outbox is empty.
pub async fn rate(pool: &sqlx::PgPool, cfg: &RelayConfig, payload: PayloadColumn, n: i64) -> f64 {
    let tables = lockstep::tables::schema::OutboxTables {
        payload,
        dead_letter_payload: payload,
        // prepare_outbox made the table: it has the column the relay reads.
        traceparent: true,
        dead_letter_traceparent: true,
        channel: String::new(),
    };
    let relay = Relay::new(cfg.clone(), Arc::new(RelayMetrics::default()), &tables).unwrap();
    let (select_sql, done_sql) = relay.statements();
    let mut conn = pool.acquire().await.unwrap();
    let started = Instant::now();
    let empty: Vec<String> = vec![];
    loop {
        let ids: Vec<uuid::Uuid> = sqlx::query(select_sql)
            .bind(i64::from(cfg.resolved.batch_size))
            .bind(&empty)
            .bind(Vec::<i64>::new())
            .fetch_all(&mut *conn)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get("id"))
            .collect();
        if ids.is_empty() {
            break;
        }
        sqlx::query(done_sql).bind(&ids).execute(&mut *conn).await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}
