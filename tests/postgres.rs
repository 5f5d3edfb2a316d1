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
