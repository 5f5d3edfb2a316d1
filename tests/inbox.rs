//! The inbox handler against the real PostgreSQL: each effect once, committed claims counted by
//! result, transient errors retried (a real lock wait), refused effects not retried, and the
//! metrics as a consumer's registry renders them.

mod common;

use std::time::Duration;

use futures::FutureExt;
use lockstep::{
    core::sql::{Ident, QualifiedName},
    inbox::{BoxError, Delivery, HandleError, Handled, Inbox, InboxMetrics, Retry},
    tables::schema::{migrate, TableKind},
};
use prometheus_client::{encoding::text::encode, registry::Registry};
use sqlx::PgPool;

struct Setup {
    pool: PgPool,
    schema: String,
    inbox: Inbox,
    metrics: InboxMetrics,
    registry: Registry,
}

async fn setup(prefix: &str) -> Setup {
    let s = common::pg_schema(prefix).await;
    let t = QualifiedName {
        schema: Ident::parse(&s.schema).unwrap(),
        table: Ident::parse("inbox").unwrap(),
    };
    migrate(&mut s.pool.acquire().await.unwrap(), TableKind::Inbox, &t, true)
        .await
        .unwrap();
    sqlx::query("create table effects (id text not null, n integer not null default 1)")
        .execute(&s.pool)
        .await
        .unwrap();
    for sql in [
        "create table accounts (id integer primary key, balance integer not null)",
        "insert into accounts values (1, 0)",
    ] {
        sqlx::query(sql).execute(&s.pool).await.unwrap();
    }
    let mut registry = Registry::default();
    let metrics = InboxMetrics::register(&mut registry);
    let inbox = Inbox::for_table(t, "billing").with_metrics(metrics.clone());
    Setup {
        pool: s.pool,
        schema: s.schema,
        inbox,
        metrics,
        registry,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn delivery(id: &str, created_ms: Option<i64>) -> Delivery<'_> {
    Delivery {
        id,
        event_type: "order.created",
        created_ms,
        traceparent: None,
    }
}

/// The side effect: one row per application, and a balance moved under a 100 ms lock timeout.
fn effect(id: String) -> impl for<'c> FnMut(&'c mut sqlx::PgConnection) -> futures::future::BoxFuture<'c, Result<String, BoxError>> {
    move |tx| {
        let id = id.clone();
        async move {
            sqlx::query("set local lock_timeout = '100ms'").execute(&mut *tx).await?;
            sqlx::query("update accounts set balance = balance + 1 where id = 1")
                .execute(&mut *tx)
                .await?;
            sqlx::query("insert into effects (id) values ($1)")
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            Ok(id)
        }
        .boxed()
    }
}

async fn effects(pool: &PgPool, id: &str) -> i64 {
    sqlx::query_scalar("select count(*) from effects where id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

fn render(r: &Registry) -> String {
    let mut out = String::new();
    encode(&mut out, r).unwrap();
    out
}

fn claims(m: &InboxMetrics, result: &'static str) -> u64 {
    use lockstep::inbox::metrics::ClaimLabels;
    m.claims
        .get_or_create(&ClaimLabels {
            consumer: "billing".into(),
            result,
        })
        .get()
}

#[tokio::test]
async fn a_message_delivered_three_times_applies_once_and_is_counted_new_once() {
    let s = setup("handle").await;
    let created = now_ms() - 1500;
    for _ in 0..3 {
        let d = delivery("m-1", Some(created));
        let _ = s.inbox.handle(&s.pool, &d, Retry::default(), effect("m-1".into())).await.unwrap();
    }
    assert_eq!(effects(&s.pool, "m-1").await, 1, "the effect ran once");
    assert_eq!((claims(&s.metrics, "new"), claims(&s.metrics, "duplicate")), (1, 2));
    let d = delivery("m-2", None);
    let first = s.inbox.handle(&s.pool, &d, Retry::default(), effect("m-2".into())).await.unwrap();
    assert_eq!(first, Handled::Applied("m-2".to_owned()));
    let again = s.inbox.handle(&s.pool, &d, Retry::default(), effect("m-2".into())).await.unwrap();
    assert_eq!(again, Handled::Duplicate);

    let text = render(&s.registry);
    for line in [
        r#"lockstep_inbox_claims_total{consumer="billing",result="new"} 2"#,
        r#"lockstep_inbox_claims_total{consumer="billing",result="duplicate"} 3"#,
        // Only the message with a timestamp is measured: once.
        r#"lockstep_inbox_end_to_end_seconds_count{consumer="billing",type="order.created"} 1"#,
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
    let sum: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(r#"lockstep_inbox_end_to_end_seconds_sum{consumer="billing",type="order.created"} "#))
        .unwrap()
        .parse()
        .unwrap();
    assert!((1.5..5.0).contains(&sum), "from created_at to the commit: {sum} s");
    let _ = s.schema;
}

#[tokio::test]
async fn a_lock_wait_is_retried_until_it_clears_and_applies_once() {
    let s = setup("retry").await;
    // Another transaction holds the account row for a while: the effect's lock times out.
    let mut holder = s.pool.begin().await.unwrap();
    sqlx::query("select * from accounts where id = 1 for update")
        .execute(&mut *holder)
        .await
        .unwrap();
    let (pool, inbox) = (s.pool.clone(), s.inbox.clone());
    let handled = tokio::spawn(async move {
        let retry = Retry {
            attempts: 20,
            first: Duration::from_millis(50),
            max: Duration::from_millis(200),
        };
        inbox.handle(&pool, &delivery("m-1", None), retry, effect("m-1".into())).await
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    holder.commit().await.unwrap();
    let handled = handled.await.unwrap().unwrap();
    assert_eq!(handled, Handled::Applied("m-1".to_owned()));
    assert_eq!(effects(&s.pool, "m-1").await, 1);
    let retries = render(&s.registry)
        .lines()
        .find_map(|l| {
            l.strip_prefix(r#"lockstep_inbox_handler_retries_total{consumer="billing"} "#)
                .map(|v| v.parse::<u64>().unwrap())
        })
        .unwrap_or(0);
    assert!(retries >= 2, "retried while the lock was held: {retries}");
    assert_eq!(claims(&s.metrics, "new"), 1, "counted once, after the commit");
}

#[tokio::test]
async fn retries_run_out_or_a_refused_effect_fail_and_leave_the_id_unclaimed() {
    let s = setup("refused").await;
    let mut holder = s.pool.begin().await.unwrap();
    sqlx::query("select * from accounts where id = 1 for update")
        .execute(&mut *holder)
        .await
        .unwrap();
    let retry = Retry {
        attempts: 3,
        first: Duration::from_millis(10),
        max: Duration::from_millis(10),
    };
    let e = s
        .inbox
        .handle(&s.pool, &delivery("m-1", None), retry, effect("m-1".into()))
        .await
        .unwrap_err();
    assert!(matches!(e, HandleError::Database { attempts: 3, .. }), "{e}");
    holder.rollback().await.unwrap();

    // An effect that refuses the message: not retried, and the claim rolls back with it.
    let mut calls = 0;
    let e = s
        .inbox
        .handle(&s.pool, &delivery("m-1", None), retry, |_| {
            calls += 1;
            async { Err::<(), BoxError>("unknown currency".into()) }.boxed()
        })
        .await
        .unwrap_err();
    assert!(matches!(e, HandleError::Effect(_)), "{e}");
    assert_eq!(calls, 1);
    let text = render(&s.registry);
    for line in [
        r#"lockstep_inbox_handler_failures_total{consumer="billing",reason="retries_exhausted"} 1"#,
        r#"lockstep_inbox_handler_failures_total{consumer="billing",reason="effect"} 1"#,
        r#"lockstep_inbox_handler_retries_total{consumer="billing"} 2"#,
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
    // Nothing was claimed: the next delivery applies.
    let ok = s
        .inbox
        .handle(&s.pool, &delivery("m-1", None), retry, effect("m-1".into()))
        .await
        .unwrap();
    assert_eq!(ok, Handled::Applied("m-1".to_owned()));
}

#[tokio::test]
async fn a_claim_the_database_refuses_is_not_retried_and_not_blamed_on_the_effect() {
    let s = setup("claim-refused").await;
    // The inbox table is gone: the claim fails with undefined_table, which no retry heals.
    sqlx::query("drop table inbox").execute(&s.pool).await.unwrap();
    let mut calls = 0;
    let e = s
        .inbox
        .handle(&s.pool, &delivery("m-1", None), Retry::default(), |_| {
            calls += 1;
            async { Ok::<(), BoxError>(()) }.boxed()
        })
        .await
        .unwrap_err();
    assert!(matches!(e, HandleError::Refused(_)), "{e}");
    assert_eq!(calls, 0, "no effect without a claim");
    let text = render(&s.registry);
    let line = r#"lockstep_inbox_handler_failures_total{consumer="billing",reason="database"} 1"#;
    assert!(text.contains(line), "{line} not in\n{text}");
    assert!(!text.contains("lockstep_inbox_handler_retries_total{"), "not retried:\n{text}");
}
