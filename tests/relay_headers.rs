//! Trace context and CloudEvents headers, read at the broker: the relay (the binary a Pod runs)
//! publishes the outbox's `traceparent` column as the `traceparent` header and, with
//! `--headers cloudevents`, the binary-mode CloudEvents headers; a malformed traceparent is left
//! out and counted, never blocking or dead-lettering its event; a consumer reads them through
//! `inbox::Delivery`. Real PostgreSQL, real broker.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::relays::{outbox, Outbox, RelayProc};
use lockstep::inbox::Delivery;
use rdkafka::{
    consumer::Consumer,
    message::{Headers, Message},
};

const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// One message as a consumer sees it: its key, every header, and what `Delivery` made of it.
#[derive(Debug)]
struct Received {
    key: String,
    headers: BTreeMap<String, String>,
    delivery_id: String,
    delivery_traceparent: Option<String>,
    delivery_created_ms: Option<i64>,
}

/// Every message on partition 0 of `topic`, up to the high watermark.
fn receive(bootstrap: &str, topic: &str) -> BTreeMap<String, Received> {
    let c = common::relays::from_start(bootstrap, topic, Some(&[0]));
    let (_, high) = c.fetch_watermarks(topic, 0, Duration::from_secs(30)).expect("watermarks");
    let mut out = BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut next = 0;
    while next < high {
        assert!(std::time::Instant::now() < deadline, "read {next} of {high} messages");
        let Some(m) = c.poll(Duration::from_millis(200)) else { continue };
        let m = m.expect("consume");
        next = m.offset() + 1;
        let headers = m
            .headers()
            .expect("headers")
            .iter()
            .map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
            .collect();
        let d = Delivery::from_message(&m).expect("a delivery");
        let key = String::from_utf8_lossy(m.key().expect("key")).into_owned();
        let r = Received {
            key: key.clone(),
            headers,
            delivery_id: d.id.to_owned(),
            delivery_traceparent: d.traceparent().map(str::to_owned),
            delivery_created_ms: d.created_ms,
        };
        out.insert(key, r);
    }
    out
}

/// Rows keyed `valid`, `malformed`, `null` (their traceparent column so), and `poison` (valid,
/// over the broker's message size: dead-lettered). Their ids and created_at as RFC 3339 (UTC, µs).
async fn insert_traced(o: &Outbox) -> BTreeMap<String, (String, String)> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(&format!(
        "insert into \"{}\".outbox (id, aggregatetype, aggregateid, type, payload, headers, traceparent)
         select gen_random_uuid(), 'order', k, 'order.created',
                case when k = 'poison' then jsonb_build_object('blob', repeat('x', 2000000)) else jsonb_build_object('k', k) end,
                '{{\"source\": \"test\"}}', t
         from (values ('valid', $1), ('malformed', '00-not-a-trace'), ('null', null), ('poison', $1)) v(k, t)
         returning aggregateid, id::text, to_char(created_at at time zone 'utc', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
        o.schema
    ))
    .bind(TRACE)
    .fetch_all(&o.pool)
    .await
    .unwrap();
    rows.into_iter().map(|(k, id, at)| (k, (id, at))).collect()
}

/// The relay's counter of malformed traceparents, from its /metrics.
async fn invalid_traceparents(relay: &RelayProc) -> Option<u64> {
    let log = relay.log();
    let addr = log.split("relay starting addr=").nth(1)?.split_whitespace().next()?.to_owned();
    let body = common::http_get_checked(&addr, "/metrics").await?;
    let line = body.lines().find(|l| l.starts_with("lockstep_relay_invalid_traceparent_total "))?;
    line.rsplit(' ').next()?.parse().ok()
}

async fn dead_lettered(o: &Outbox) -> Vec<(String, Option<String>)> {
    sqlx::query_as(&format!("select aggregateid, traceparent from \"{}\".outbox_dead_letter", o.schema))
        .fetch_all(&o.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn traceparent_reaches_the_consumer_and_a_malformed_one_blocks_nothing() {
    let o = outbox("trace", &common::kafka_bootstrap()).await;
    let rows = insert_traced(&o).await;
    let relay = o.relay("relay-trace.log", &common::env("DATABASE_URL"));
    o.wait_drained(Duration::from_secs(60)).await;
    let got = receive(&o.bootstrap, &o.topic);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ["malformed", "null", "valid"],
        "every event but the oversized one"
    );
    let valid = &got["valid"];
    assert_eq!(valid.headers.get("traceparent").map(String::as_str), Some(TRACE));
    assert_eq!(valid.delivery_traceparent.as_deref(), Some(TRACE), "Delivery::traceparent");
    assert_eq!(valid.delivery_id, rows["valid"].0);
    for k in ["malformed", "null"] {
        assert!(!got[k].headers.contains_key("traceparent"), "{k}: {:?}", got[k].headers);
        assert_eq!(got[k].delivery_traceparent, None);
    }
    for r in got.values() {
        assert_eq!(r.headers["source"], "test", "the row's own headers still go");
        assert!(
            !r.headers.keys().any(|k| k.starts_with("ce_")),
            "no CloudEvents headers by default: {:?}",
            r.headers
        );
    }
    let counted = common::wait_until(Duration::from_secs(10), "the malformed traceparent counted", || async {
        invalid_traceparents(&relay).await.filter(|n| *n >= 1)
    })
    .await;
    assert_eq!(counted, 1);
    assert!(relay.log().contains("not a W3C traceparent"), "logged");
    assert!(!relay.log().contains("00-not-a-trace"), "the value itself is not logged");
    // The oversized row kept its trace context in the dead-letter table, and a replay brings it back.
    assert_eq!(dead_lettered(&o).await, [("poison".to_owned(), Some(TRACE.to_owned()))]);
    let (t, dl) = (qualified(&o.schema, "outbox"), qualified(&o.schema, "outbox_dead_letter"));
    let mut conn = o.pool.acquire().await.unwrap();
    let tables = lockstep::tables::schema::describe_outbox(&mut conn, &t, &dl).await.unwrap();
    assert!(tables.traceparent && tables.dead_letter_traceparent);
    drop(relay);
    let moved = lockstep::tables::replay::replay(&mut conn, &t, &dl, &tables, None).await.unwrap();
    assert_eq!(moved, 1);
    let back: Option<String> = sqlx::query_scalar(&format!("select traceparent from {t}"))
        .fetch_one(&o.pool)
        .await
        .unwrap();
    assert_eq!(back.as_deref(), Some(TRACE));
}

#[tokio::test]
async fn cloudevents_headers_reach_the_consumer() {
    let o = outbox("cloudevents", &common::kafka_bootstrap()).await;
    let rows = insert_traced(&o).await;
    let args = ["--headers", "cloudevents", "--cloudevents-source", "https://orders.example/outbox"];
    let relay = o.relay_with("relay-cloudevents.log", &common::env("DATABASE_URL"), &args);
    o.wait_drained(Duration::from_secs(60)).await;
    drop(relay);
    let got = receive(&o.bootstrap, &o.topic);
    assert_eq!(got.len(), 3);
    for (k, r) in &got {
        let (id, created) = &rows[k];
        let h = |name: &str| r.headers.get(name).map(String::as_str);
        assert_eq!(h("ce_id"), Some(id.as_str()), "{k}");
        assert_eq!(h("ce_type"), Some("order.created"));
        assert_eq!(h("ce_source"), Some("https://orders.example/outbox"));
        assert_eq!(h("ce_specversion"), Some("1.0"));
        assert_eq!(h("ce_time"), Some(created.as_str()));
        assert_eq!(h("content-type"), Some("application/json"));
        // lockstep's own headers too: an inbox consumer deduplicates on them as before.
        assert_eq!((h("id"), h("type")), (Some(id.as_str()), Some("order.created")));
        assert_eq!(r.delivery_id, *id);
        let micros_to_ms = lockstep::core::event_headers::rfc3339_ms(created);
        assert_eq!(r.delivery_created_ms, micros_to_ms, "{k}: the created time, to the ms");
        assert_eq!(r.key, *k);
    }
    assert_eq!(got["valid"].headers.get("traceparent").map(String::as_str), Some(TRACE));
    assert!(!got["malformed"].headers.contains_key("traceparent"));
}

/// An outbox lockstep does not manage, without the column: relayed as before, no traceparent.
#[tokio::test]
async fn an_outbox_without_the_traceparent_column_is_relayed_as_before() {
    let o = outbox("notrace", &common::kafka_bootstrap()).await;
    let dead_letter = qualified(&o.schema, "outbox_dead_letter");
    let mut conn = o.pool.acquire().await.unwrap();
    lockstep::tables::schema::migrate(&mut conn, lockstep::tables::schema::TableKind::DeadLetter, &dead_letter, true)
        .await
        .unwrap();
    for t in [qualified(&o.schema, "outbox"), dead_letter] {
        sqlx::query(&format!("alter table {t} drop column traceparent"))
            .execute(&o.pool)
            .await
            .unwrap();
    }
    o.insert(0, 5, 5).await;
    let args = ["--manage-schema", "false", "--headers", "cloudevents"];
    let relay = o.relay_with("relay-notrace.log", &common::env("DATABASE_URL"), &args);
    o.wait_drained(Duration::from_secs(60)).await;
    drop(relay);
    let got = receive(&o.bootstrap, &o.topic);
    assert_eq!(got.len(), 5);
    for r in got.values() {
        assert!(!r.headers.contains_key("traceparent"));
        let source = format!("/lockstep/{}/outbox", o.schema);
        assert_eq!(r.headers.get("ce_source"), Some(&source), "the default source names the table");
    }
}

fn qualified(schema: &str, table: &str) -> lockstep::core::sql::QualifiedName {
    lockstep::core::sql::QualifiedName {
        schema: lockstep::core::sql::Ident::parse(schema).unwrap(),
        table: lockstep::core::sql::Ident::parse(table).unwrap(),
    }
}
