//! The chaos run's writer, its checks of the outcome (counted in the database, not trusted from
//! any process), and the inbox metrics it scrapes for the printed ratios.

use std::{net::SocketAddr, time::Duration};

use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::core::sql::quote_ident;

/// Events per transaction; one transaction in ten rolls back.
const BATCH: u64 = 20;

/// Commit `events` orders with their outbox rows, paced over `span`; returns the transactions that
/// failed (a database restart) and were written again under new ids. A commit whose outcome was
/// lost may have committed: the orders table is the truth the checks read.
pub async fn write(pool: PgPool, schema: String, events: u64, keys: u64, span: Duration) -> anyhow::Result<u64> {
    let q = quote_ident(&schema);
    let insert = format!(
        "with o as (insert into {q}.orders (id, key, n) select * from unnest($1::text[], $2::text[], $3::int[]) returning id, key, n)
         insert into {q}.outbox (id, aggregatetype, aggregateid, type, payload)
         select gen_random_uuid(), 'order', key, 'order.created', jsonb_build_object('order', id, 'key', key, 'n', n) from o order by n"
    );
    let rolled_back = format!("insert into {q}.rolled_back (id) select * from unnest($1::text[])");
    let started = std::time::Instant::now();
    let per_event = span.as_secs_f64() / events.max(1) as f64;
    let (mut next, mut committed, mut failures, mut tx_no) = (0u64, 0u64, 0u64, 0u64);
    let mut counters = vec![0i32; keys as usize];
    while committed < events {
        tx_no += 1;
        let rollback = tx_no.is_multiple_of(10);
        let mut ids = Vec::new();
        let mut ks = Vec::new();
        let mut ns = Vec::new();
        for _ in 0..BATCH.min(events - committed).max(1) {
            let k = (next % keys) as usize;
            ids.push(format!("o-{next}"));
            ks.push(format!("k-{k}"));
            ns.push(counters[k]);
            counters[k] += 1;
            next += 1;
        }
        let attempt = async {
            let mut tx = pool.begin().await?;
            sqlx::query(&insert).bind(&ids).bind(&ks).bind(&ns).execute(&mut *tx).await?;
            if rollback {
                tx.rollback().await
            } else {
                tx.commit().await
            }
        };
        match attempt.await {
            Ok(()) if rollback => {
                // Recorded outside the rolled-back transaction, for the check.
                while sqlx::query(&rolled_back).bind(&ids).execute(&pool).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            Ok(()) => committed += ids.len() as u64,
            Err(_) => {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let due = Duration::from_secs_f64(per_event * committed as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    Ok(failures)
}

pub async fn committed(pool: &PgPool, schema: &str) -> Result<u64, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(&format!("select count(*) from {}.orders", quote_ident(schema)))
        .fetch_one(pool)
        .await?;
    Ok(n as u64)
}

/// Committed orders without an effect, plus rows still in the outbox: 0 once the run settled.
pub async fn unsettled(pool: &PgPool, schema: &str) -> Result<i64, sqlx::Error> {
    let q = quote_ident(schema);
    sqlx::query_scalar(&format!(
        "select (select count(*) from {q}.orders o where not exists (select 1 from {q}.effects e where e.order_id = o.id))
              + (select count(*) from {q}.outbox)"
    ))
    .fetch_one(pool)
    .await
}

/// The outcome, counted in the database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub committed: i64,
    pub rolled_back: i64,
    /// Committed orders whose effect is missing, or applied more than once.
    pub missing: i64,
    pub applied_twice: i64,
    /// Effects of orders that never committed (rolled back, or unknown).
    pub phantom: i64,
    /// First applications of a key that came after a later event of that key.
    pub out_of_order: i64,
}

pub async fn check(pool: &PgPool, schema: &str) -> Result<Report, sqlx::Error> {
    let q = quote_ident(schema);
    let sql = format!(
        "with per_order as (select o.id, count(e.seq) as applied from {q}.orders o left join {q}.effects e on e.order_id = o.id group by o.id),
              firsts as (select key, n, lag(n) over (partition by key order by seq) as before
                         from (select distinct on (order_id) order_id, key, n, seq from {q}.effects order by order_id, seq) f)
         select (select count(*) from {q}.orders),
                (select count(*) from {q}.rolled_back),
                (select count(*) from per_order where applied = 0),
                (select count(*) from per_order where applied > 1),
                (select count(*) from {q}.effects e where not exists (select 1 from {q}.orders o where o.id = e.order_id)),
                (select count(*) from firsts where before >= n)"
    );
    let (committed, rolled_back, missing, applied_twice, phantom, out_of_order): (i64, i64, i64, i64, i64, i64) =
        sqlx::query_as(&sql).fetch_one(pool).await?;
    Ok(Report {
        committed,
        rolled_back,
        missing,
        applied_twice,
        phantom,
        out_of_order,
    })
}

impl Report {
    pub fn passed(&self) -> bool {
        self.committed > 0 && self.missing + self.applied_twice + self.phantom + self.out_of_order == 0
    }

    /// The outcome and the measured ratios. Pure.
    pub fn render(&self, c: &Claims, settled: bool) -> String {
        let deliveries = c.new + c.duplicate;
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let mean_ms = 1000.0 * ratio(c.latency_sum, c.latency_count as f64);
        format!(
            "committed orders: {}; rolled back: {} (ids recorded)\n\
             effects: missing {}, applied twice {}, from uncommitted orders {}, out of per-key order {}{}\n\
             deliveries handled: {deliveries} ({} new, {} duplicate); duplicate delivery rate {:.4} per event; \
             dedup hit ratio {:.4}; handler retries {}, failures {}; end-to-end mean {:.0} ms over {} effects\n\
             {}",
            self.committed,
            self.rolled_back,
            self.missing,
            self.applied_twice,
            self.phantom,
            self.out_of_order,
            if settled {
                ""
            } else {
                " (NOT SETTLED: effects still missing at the timeout)"
            },
            c.new,
            c.duplicate,
            ratio(c.duplicate as f64, self.committed as f64),
            ratio(c.duplicate as f64, deliveries as f64),
            c.retries,
            c.failures,
            mean_ms,
            c.latency_count,
            if self.passed() && settled {
                "PASS: every committed order's effect applied exactly once"
            } else {
                "FAIL"
            }
        )
    }
}

/// Inbox counters of the consumers, summed over every process that ran.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Claims {
    pub new: u64,
    pub duplicate: u64,
    pub retries: u64,
    pub failures: u64,
    pub latency_sum: f64,
    pub latency_count: u64,
}

impl Claims {
    pub fn add(&mut self, o: &Claims) {
        self.new += o.new;
        self.duplicate += o.duplicate;
        self.retries += o.retries;
        self.failures += o.failures;
        self.latency_sum += o.latency_sum;
        self.latency_count += o.latency_count;
    }

    /// From Prometheus text. Pure.
    pub fn parse(text: &str) -> Claims {
        let mut c = Claims::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else { continue };
            let v: f64 = value.parse().unwrap_or(0.0);
            let metric = name.split('{').next().unwrap_or(name);
            match metric {
                "lockstep_inbox_claims_total" if name.contains("result=\"new\"") => c.new += v as u64,
                "lockstep_inbox_claims_total" if name.contains("result=\"duplicate\"") => c.duplicate += v as u64,
                "lockstep_inbox_handler_retries_total" => c.retries += v as u64,
                "lockstep_inbox_handler_failures_total" => c.failures += v as u64,
                "lockstep_inbox_end_to_end_seconds_sum" => c.latency_sum += v,
                "lockstep_inbox_end_to_end_seconds_count" => c.latency_count += v as u64,
                _ => {}
            }
        }
        c
    }

    pub async fn scrape(addr: SocketAddr) -> std::io::Result<Claims> {
        let get = async {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: chaos\r\n\r\n").await?;
            let mut body = String::new();
            s.read_to_string(&mut body).await?;
            Ok::<_, std::io::Error>(body)
        };
        let body = tokio::time::timeout(Duration::from_secs(5), get)
            .await
            .map_err(|_| std::io::Error::other("scrape timed out"))??;
        Ok(Claims::parse(&body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_read_from_the_inbox_metrics() {
        let text = "# HELP x\n\
            lockstep_inbox_claims_total{consumer=\"chaos\",result=\"new\"} 90\n\
            lockstep_inbox_claims_total{consumer=\"chaos\",result=\"duplicate\"} 10\n\
            lockstep_inbox_handler_retries_total{consumer=\"chaos\"} 3\n\
            lockstep_inbox_end_to_end_seconds_sum{consumer=\"chaos\",type=\"order.created\"} 4.5\n\
            lockstep_inbox_end_to_end_seconds_count{consumer=\"chaos\",type=\"order.created\"} 90\n";
        let c = Claims::parse(text);
        assert_eq!((c.new, c.duplicate, c.retries, c.failures, c.latency_count), (90, 10, 3, 0, 90));
        let r = Report {
            committed: 90,
            ..Report::default()
        };
        let out = r.render(&c, true);
        assert!(
            out.contains("duplicate delivery rate 0.1111 per event; dedup hit ratio 0.1000"),
            "{out}"
        );
        assert!(out.contains("end-to-end mean 50 ms over 90 effects"), "{out}");
        assert!(out.ends_with("PASS: every committed order's effect applied exactly once"), "{out}");
        let bad = Report {
            committed: 90,
            applied_twice: 1,
            ..Report::default()
        };
        assert!(!bad.passed() && bad.render(&c, true).ends_with("FAIL"));
        assert!(!r.passed() || r.render(&c, false).ends_with("FAIL"));
    }
}
