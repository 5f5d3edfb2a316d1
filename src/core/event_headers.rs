//! The message headers an outbox event carries, shared by the relay (which writes them) and the
//! inbox library (which reads them): names, and the checks and formats of their values. Pure.
//!
//! - lockstep's own: `id` (the dedup key), `type`, `lockstep-created-at` (see `core::stamp`).
//! - W3C Trace Context: `traceparent`, from the outbox's optional `traceparent` column, so a
//!   consumer's span continues the producer's.
//! - CloudEvents, binary content mode of the Kafka protocol binding: `ce_id`, `ce_type`,
//!   `ce_source`, `ce_specversion`, `ce_time`, and `content-type` (the `datacontenttype`).

use std::time::{Duration, UNIX_EPOCH};

pub const ID: &str = "id";
pub const TYPE: &str = "type";
pub const TRACEPARENT: &str = "traceparent";

pub const CE_ID: &str = "ce_id";
pub const CE_TYPE: &str = "ce_type";
pub const CE_SOURCE: &str = "ce_source";
pub const CE_SPECVERSION: &str = "ce_specversion";
pub const CE_TIME: &str = "ce_time";
/// The binding maps `datacontenttype` to this header, not to a `ce_` one.
pub const CONTENT_TYPE: &str = "content-type";
pub const SPECVERSION: &str = "1.0";
/// What a json or jsonb payload is sent as: its UTF-8 text.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// A W3C Trace Context `traceparent` (version 00: `00-<32 hex>-<16 hex>-<2 hex>`, lowercase):
/// true when a tracer would accept it. All-zero trace and parent ids are invalid, and so is
/// version `ff`. A later version may append fields after a `-`; its first four are checked.
pub fn valid_traceparent(s: &str) -> bool {
    const LEN: usize = 55;
    let b = s.as_bytes();
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c));
    let nonzero = |r: std::ops::Range<usize>| b[r].iter().any(|c| *c != b'0');
    let length_ok = match b.get(..2) {
        Some(b"00") => b.len() == LEN,
        Some(b"ff") | None => false,
        Some(_) => b.len() == LEN || (b.len() > LEN && b[LEN] == b'-'),
    };
    length_ok
        && [2, 35, 52].iter().all(|i| b[*i] == b'-')
        && hex(0..2)
        && hex(3..35)
        && hex(36..52)
        && hex(53..55)
        && nonzero(3..35)
        && nonzero(36..52)
}

/// Seconds since the epoch (as the relay reads `created_at`) as RFC 3339 in UTC, to the
/// microsecond PostgreSQL keeps: `2026-12-05T11:01:45.123456Z`.
pub fn rfc3339(epoch_secs: f64) -> String {
    let micros = (epoch_secs * 1e6).round();
    let t = if micros >= 0.0 {
        UNIX_EPOCH + Duration::from_micros(micros as u64)
    } else {
        UNIX_EPOCH - Duration::from_micros((-micros) as u64)
    };
    humantime::format_rfc3339_micros(t).to_string()
}

/// An RFC 3339 time in UTC (`Z` or `+00:00`) as ms since the epoch; None for anything else.
pub fn rfc3339_ms(s: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339(s).ok()?;
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).ok(),
        Err(e) => i64::try_from(e.duration().as_millis()).ok().map(|ms| -ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_is_checked_as_w3c_trace_context_says() {
        assert!(valid_traceparent(GOOD));
        assert!(valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"));
        // A later version may carry more; version 00 may not.
        assert!(valid_traceparent(&format!("01{}-what-comes-next", &GOOD[2..])));
        assert!(!valid_traceparent(&format!("{GOOD}-x")));
        for bad in [
            "",
            "00",
            "garbage",
            &GOOD.to_uppercase(),
            &GOOD[..54],
            &GOOD.replace('-', "_"),
            &format!("ff{}", &GOOD[2..]),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0z",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
        ] {
            assert!(!valid_traceparent(bad), "{bad:?}");
        }
        // Not a panic on multi-byte text of the right length.
        assert!(!valid_traceparent(&"é".repeat(27)));
        assert!(!valid_traceparent(&format!("00-{}", "é".repeat(26))));
    }

    #[test]
    fn times_are_rfc3339_utc_to_the_microsecond_and_read_back() {
        assert_eq!(rfc3339(1_700_000_000.123456), "2023-11-14T22:13:20.123456Z");
        assert_eq!(rfc3339(0.0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339_ms("2023-11-14T22:13:20.123456Z"), Some(1_700_000_000_123));
        assert_eq!(rfc3339_ms("2023-11-14T22:13:20+00:00"), Some(1_700_000_000_000));
        assert_eq!(rfc3339_ms("2023-11-14T23:13:20+01:00"), None, "only UTC is read");
        assert_eq!(rfc3339_ms("yesterday"), None);
    }
}
