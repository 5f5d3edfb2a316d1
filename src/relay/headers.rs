//! The headers of a relay message (names in `event_headers`).

use std::borrow::Cow;

use super::store::OutboxRow;
use crate::{
    core::event_headers as h,
    crd::{HeaderSet, ValidOutboxRelay},
    tables::schema::PayloadColumn,
};

/// The headers the relay sets itself: a row header of one of these names is left out rather
/// than sent twice (consumers deduplicate and route on them).
const OWN: [&str; 3] = [h::ID, h::TYPE, crate::core::stamp::CREATED_AT_HEADER];
const CLOUD_EVENTS: [&str; 5] = [h::CE_ID, h::CE_TYPE, h::CE_SOURCE, h::CE_SPECVERSION, h::CE_TIME];

/// A message's headers, name and text, in the order sent.
pub(super) type HeaderList<'a> = Vec<(Cow<'a, str>, Cow<'a, str>)>;

/// How a relay builds each message's headers.
pub(super) struct MessageHeaders {
    set: HeaderSet,
    /// `ce_source`: the spec's, or `/lockstep/<schema>/<table>`.
    source: String,
    /// `content-type` under CloudEvents: a json(b) payload is JSON text; of bytes nothing is known
    /// (a row header `content-type` says what they are).
    content_type: Option<&'static str>,
}

impl MessageHeaders {
    pub fn new(cfg: &ValidOutboxRelay, payload: PayloadColumn) -> Self {
        let t = &cfg.table;
        MessageHeaders {
            set: cfg.headers,
            source: cfg
                .cloud_events_source
                .clone()
                .unwrap_or_else(|| format!("/lockstep/{}/{}", t.schema.as_str(), t.table.as_str())),
            content_type: (payload == PayloadColumn::Json).then_some(h::JSON_CONTENT_TYPE),
        }
    }

    /// `id` and `type`; `lockstep-created-at` when the timestamp is not created_at (`stamp`);
    /// `traceparent` when the row's column holds a valid one; the CloudEvents headers under
    /// `cloudevents`; then each entry of the row's `headers` object as text. With true when the
    /// traceparent column held something that is not a traceparent: left out, the event still sent.
    pub fn of<'a>(&'a self, row: &'a OutboxRow, created_ms: Option<i64>) -> (HeaderList<'a>, bool) {
        let extra = row.headers.as_ref().and_then(|x| x.as_object());
        let mut out: HeaderList<'a> = Vec::with_capacity(11 + extra.map_or(0, |x| x.len()));
        out.push((h::ID.into(), row.id.to_string().into()));
        out.push((h::TYPE.into(), row.type_.as_str().into()));
        if let Some(ms) = created_ms {
            out.push((crate::core::stamp::CREATED_AT_HEADER.into(), ms.to_string().into()));
        }
        let trace = row.traceparent.as_deref().filter(|t| !t.is_empty());
        let valid_trace = trace.filter(|t| h::valid_traceparent(t));
        if let Some(t) = valid_trace {
            out.push((h::TRACEPARENT.into(), t.into()));
        }
        let cloud_events = self.set == HeaderSet::CloudEvents;
        if cloud_events {
            out.push((h::CE_ID.into(), row.id.to_string().into()));
            out.push((h::CE_TYPE.into(), row.type_.as_str().into()));
            out.push((h::CE_SOURCE.into(), self.source.as_str().into()));
            out.push((h::CE_SPECVERSION.into(), h::SPECVERSION.into()));
            out.push((h::CE_TIME.into(), h::rfc3339(row.created).into()));
        }
        let content_type = self.content_type.filter(|_| cloud_events);
        if let Some(ct) = content_type {
            out.push((h::CONTENT_TYPE.into(), ct.into()));
        }
        let own = |k: &str| {
            OWN.contains(&k)
                || (k == h::TRACEPARENT && valid_trace.is_some())
                || (cloud_events && CLOUD_EVENTS.contains(&k))
                || (k == h::CONTENT_TYPE && content_type.is_some())
        };
        for (k, v) in extra.into_iter().flatten().filter(|(k, _)| !own(k)) {
            let text = match v {
                serde_json::Value::String(s) => Cow::Borrowed(s.as_str()),
                other => Cow::Owned(other.to_string()),
            };
            out.push((k.as_str().into(), text));
        }
        (out, trace.is_some() && valid_trace.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn row(headers: Option<serde_json::Value>, traceparent: Option<&str>) -> OutboxRow {
        OutboxRow {
            id: uuid::Uuid::nil(),
            seq: 1,
            aggregatetype: "order".into(),
            aggregateid: "42".into(),
            type_: "created".into(),
            payload: None,
            headers,
            attempts: 0,
            created: 1_700_000_000.5,
            traceparent: traceparent.map(str::to_owned),
        }
    }

    fn message_headers(extra: &[&str], payload: PayloadColumn) -> MessageHeaders {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: crate::config::RelayArgs,
        }
        let argv = [
            "relay",
            "--database-url",
            "postgres://h/db",
            "--bootstrap-servers",
            "k:9092",
            "--table",
            "orders",
        ];
        let cfg = Cli::parse_from(argv.iter().chain(extra)).args.resolve().unwrap();
        MessageHeaders::new(&cfg.resolved, payload)
    }

    /// The headers of `r` as owned pairs, and whether its traceparent was malformed.
    fn of(m: &MessageHeaders, r: OutboxRow, created_ms: Option<i64>) -> (Vec<(String, String)>, bool) {
        let (h, bad) = m.of(&r, created_ms);
        (h.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), bad)
    }

    fn want(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const NIL: &str = "00000000-0000-0000-0000-000000000000";

    #[test]
    fn headers_carry_id_type_and_the_row_headers_as_text() {
        let m = message_headers(&[], PayloadColumn::Json);
        let (h, bad) = of(&m, row(Some(serde_json::json!({"n": 1, "trace": "abc"})), None), None);
        assert!(!bad);
        assert_eq!(h.clone(), want(&[("id", NIL), ("type", "created"), ("n", "1"), ("trace", "abc")]));
        assert_eq!(of(&m, row(None, None), None).0.len(), 2);
        let forged = serde_json::json!({"id": "forged", "type": "other", "lockstep-created-at": "1", "trace": "abc"});
        let keys: Vec<String> = of(&m, row(Some(forged), None), Some(7)).0.into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            ["id", "type", "lockstep-created-at", "trace"],
            "the relay's own headers are not sent twice"
        );
    }

    #[test]
    fn a_valid_traceparent_column_is_sent_and_a_malformed_one_left_out_and_reported() {
        let m = message_headers(&[], PayloadColumn::Json);
        let row_header = Some(serde_json::json!({"traceparent": "from-headers"}));
        let (h, bad) = of(&m, row(row_header.clone(), Some(TRACE)), None);
        assert_eq!(h.clone(), want(&[("id", NIL), ("type", "created"), ("traceparent", TRACE)]));
        assert!(!bad);
        // Malformed: left out (the row's own header, if any, goes as before), reported.
        let (h, bad) = of(&m, row(row_header, Some("00-xyz")), None);
        assert_eq!(
            h.clone(),
            want(&[("id", NIL), ("type", "created"), ("traceparent", "from-headers")])
        );
        assert!(bad);
        // NULL or empty: nothing to send, nothing wrong.
        for none in [None, Some("")] {
            let (h, bad) = of(&m, row(None, none), None);
            assert_eq!((h.clone().len(), bad), (2, false));
        }
    }

    #[test]
    fn cloudevents_adds_the_binary_mode_headers() {
        let m = message_headers(&["--headers", "cloudevents"], PayloadColumn::Json);
        let extra = serde_json::json!({"ce_id": "forged", "ce_subject": "o-42", "content-type": "text/plain"});
        let (h, _) = of(&m, row(Some(extra), Some(TRACE)), None);
        let ce = [
            ("id", NIL),
            ("type", "created"),
            ("traceparent", TRACE),
            ("ce_id", NIL),
            ("ce_type", "created"),
            ("ce_source", "/lockstep/public/orders"),
            ("ce_specversion", "1.0"),
            ("ce_time", "2023-11-14T22:13:20.500000Z"),
            ("content-type", "application/json"),
            // An extension attribute of the row's own passes.
            ("ce_subject", "o-42"),
        ];
        assert_eq!(h.clone(), want(&ce));
        // Bytes: no content-type of the relay's; the row may say what they are. A source given.
        let m = message_headers(
            &["--headers", "cloudevents", "--cloudevents-source", "urn:orders"],
            PayloadColumn::Bytea,
        );
        let (h, _) = of(&m, row(Some(serde_json::json!({"content-type": "application/avro"})), None), None);
        let got = h.clone();
        assert!(got.contains(&("ce_source".into(), "urn:orders".into())), "{got:?}");
        assert_eq!(got.last(), Some(&("content-type".into(), "application/avro".into())));
        assert_eq!(got.iter().filter(|(k, _)| k == "content-type").count(), 1);
    }
}
