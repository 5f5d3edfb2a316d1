//! The Kafka timestamp of a published row: its `created_at`, the business transaction's time, so
//! a consumer measures end-to-end latency as `now - timestamp`. Topic retention and segment rolls
//! count from record timestamps, though: a row published long after it was written (a backlog
//! after an outage, a replay) would be stamped old enough for retention to delete it before it is
//! consumed. Such a row is stamped with the publish time and carries its `created_at` in the
//! [`CREATED_AT_HEADER`] header instead.

/// Rows older than this when published are stamped with the publish time.
pub const MAX_STAMP_AGE_MS: i64 = 60 * 60 * 1000;

/// Milliseconds since the epoch, as text: set only when the timestamp is not `created_at`.
pub const CREATED_AT_HEADER: &str = "lockstep-created-at";

/// (record timestamp, `created_at` for the header when it differs), in ms since the epoch. Pure.
pub fn stamp(created_secs: f64, now_ms: i64) -> (i64, Option<i64>) {
    let created_ms = (created_secs * 1000.0).round() as i64;
    if now_ms - created_ms > MAX_STAMP_AGE_MS {
        (now_ms, Some(created_ms))
    } else {
        (created_ms, None)
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_row_keeps_its_created_at_and_an_old_one_is_stamped_now() {
        let now = 1_700_000_000_000;
        assert_eq!(stamp(1_699_999_999.5, now), (1_699_999_999_500, None));
        // A clock a little ahead of the database's is still created_at.
        assert_eq!(stamp(1_700_000_000.25, now), (1_700_000_000_250, None));
        let old = (now - MAX_STAMP_AGE_MS - 1) as f64 / 1000.0;
        assert_eq!(stamp(old, now), (now, Some(now - MAX_STAMP_AGE_MS - 1)));
        let edge = (now - MAX_STAMP_AGE_MS) as f64 / 1000.0;
        assert_eq!(stamp(edge, now), (now - MAX_STAMP_AGE_MS, None));
    }
}
