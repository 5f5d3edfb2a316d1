//! The private PostgreSQL the test environment starts: reachable over TCP with sqlx, and each test
//! works in a schema of its own.

mod common;

use sqlx::Row;

#[tokio::test]
async fn connects_over_tcp_in_its_own_schema() {
    let s = common::pg_schema("pg").await;
    let version: i32 = sqlx::query_scalar("select current_setting('server_version_num')::int")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert!(version >= 150000, "PostgreSQL 15 or newer expected, got {version}");
    let addr: Option<String> = sqlx::query_scalar("select inet_server_addr()::text")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(addr.as_deref(), Some("127.0.0.1/32"), "connected over TCP, not a socket");

    sqlx::query("create table t (id bigint primary key, v text)")
        .execute(&s.pool)
        .await
        .unwrap();
    sqlx::query("insert into t values (1, 'a'), (2, 'b')")
        .execute(&s.pool)
        .await
        .unwrap();
    let row = sqlx::query("select count(*) as n, current_schema() as s from t")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(row.get::<i64, _>("n"), 2);
    assert_eq!(row.get::<String, _>("s"), s.schema);
    // A unique key rejects a duplicate: the basis of the inbox.
    assert!(sqlx::query("insert into t values (1, 'again')").execute(&s.pool).await.is_err());
    // pg_current_xact_id / pg_snapshot_xmin, which the relay's visibility filter needs, exist here.
    let ok: bool = sqlx::query_scalar("select pg_current_xact_id() >= pg_snapshot_xmin(pg_current_snapshot())")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert!(ok);
}

/// Issue 12 item 8: a rotated password (or a typo) must not leave its pool cached forever. The
/// pool a live resource keeps asking for stays; the others go once unused for the idle window.
#[tokio::test]
async fn pools_of_urls_nobody_uses_any_more_are_evicted() {
    use lockstep::{clients::db::Pools, core::redacted::Redacted};
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL (source target/testenv/env)");
    let sep = if base.contains('?') { '&' } else { '?' };
    // Three spellings of one database: to the cache, three credentials.
    let urls: Vec<Redacted> = (0..3)
        .map(|i| Redacted::new(format!("{base}{sep}connect_timeout={}", 10 + i)))
        .collect();
    let pools = Pools::new(2);
    for u in &urls {
        let p = pools.get(u).unwrap();
        let one: i32 = sqlx::query_scalar("select 1").fetch_one(&p).await.unwrap();
        assert_eq!(one, 1);
    }
    assert_eq!(pools.len(), 3);
    // Asking again hands out the same pool, not a new one.
    pools.get(&urls[0]).unwrap();
    assert_eq!(pools.len(), 3);
    assert_eq!(pools.evict_idle(std::time::Duration::from_secs(600)), 0, "all were used just now");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    pools.get(&urls[2]).unwrap(); // the URL a resource still points at
    assert_eq!(pools.evict_idle(std::time::Duration::from_millis(200)), 2);
    assert_eq!(pools.len(), 1);
    // The survivor is the one still in use (asking for it adds nothing), and it still works.
    let p = pools.get(&urls[2]).unwrap();
    assert_eq!(pools.len(), 1);
    let one: i32 = sqlx::query_scalar("select 1").fetch_one(&p).await.unwrap();
    assert_eq!(one, 1);
    pools.get(&urls[0]).unwrap();
    assert_eq!(pools.len(), 2, "an evicted URL asked for again gets a new pool");
}
