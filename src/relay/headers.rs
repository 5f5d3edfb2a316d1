//! The headers of a relay message.

use rdkafka::message::{Header, OwnedHeaders};

use super::store::OutboxRow;

const RESERVED_HEADERS: [&str; 3] = ["id", "type", super::stamp::CREATED_AT_HEADER];

/// The message headers: `id` and `type`, `created_at` when the timestamp is not it (`stamp`),
/// then each entry of the row's `headers` object as text.
pub(super) fn headers(row: &OutboxRow, created_ms: Option<i64>) -> OwnedHeaders {
    let extra = row.headers.as_ref().and_then(|h| h.as_object());
    let id = row.id.to_string();
    let mut headers = OwnedHeaders::new_with_capacity(3 + extra.map_or(0, |h| h.len()))
        .insert(Header {
            key: "id",
            value: Some(id.as_bytes()),
        })
        .insert(Header {
            key: "type",
            value: Some(row.type_.as_bytes()),
        });
    if let Some(ms) = created_ms {
        headers = headers.insert(Header {
            key: super::stamp::CREATED_AT_HEADER,
            value: Some(ms.to_string().as_bytes()),
        });
    }
    // The relay's own `id` and `type` are what consumers deduplicate and route on: a row header
    // of the same name is left out rather than sent twice.
    for (k, v) in extra.into_iter().flatten().filter(|(k, _)| !RESERVED_HEADERS.contains(&k.as_str())) {
        let text = match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        headers = headers.insert(Header {
            key: k.as_str(),
            value: Some(text.as_bytes()),
        });
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(headers: Option<serde_json::Value>) -> OutboxRow {
        OutboxRow {
            id: uuid::Uuid::nil(),
            seq: 1,
            aggregatetype: "order".into(),
            aggregateid: "42".into(),
            type_: "created".into(),
            payload: None,
            headers,
            attempts: 0,
            created: 0.0,
        }
    }

    fn header_pairs(h: &OwnedHeaders) -> Vec<(String, String)> {
        use rdkafka::message::Headers;
        h.iter()
            .map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
            .collect()
    }

    #[test]
    fn headers_carry_id_type_and_the_row_headers_as_text() {
        let h = headers(&row(Some(serde_json::json!({"n": 1, "trace": "abc"}))), None);
        let pairs = header_pairs(&h);
        let want = [
            ("id", "00000000-0000-0000-0000-000000000000"),
            ("type", "created"),
            ("n", "1"),
            ("trace", "abc"),
        ];
        assert_eq!(pairs, want.map(|(k, v)| (k.to_owned(), v.to_owned())));
        assert_eq!(header_pairs(&headers(&row(None), None)).len(), 2);
        let clash = headers(
            &row(Some(
                serde_json::json!({"id": "forged", "type": "other", "lockstep-created-at": "1", "trace": "abc"}),
            )),
            Some(7),
        );
        let pairs = header_pairs(&clash);
        let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["id", "type", "lockstep-created-at", "trace"],
            "the relay's own headers are not sent twice"
        );
        assert_eq!(pairs[2].1, "7");
    }
}
