//! The Kafka timestamp of a published row: its `created_at`, the business transaction's time, so
//! a consumer measures end-to-end latency as `now - timestamp`. Topic retention and segment rolls
//! count from record timestamps, though: a row published long after it was written (a backlog
//! after an outage, a replay) would be stamped old enough for retention to delete it before it is
//! consumed. Such a row is stamped with the publish time and carries its `created_at` in the
//! [`CREATED_AT_HEADER`] header instead.
//!
//! A broker may bound record timestamps tighter (`log.message.timestamp.before.max.ms` /
//! `after.max.ms` under an hour) and refuse a row's `created_at`: the relay then learns a tighter
//! bound ([`tighten`]) and sends the row again, stamped with the publish time.

/// Rows older (or younger) than this when published are stamped with the publish time, until a
/// broker's refusal teaches the relay a tighter bound.
pub const MAX_STAMP_AGE_MS: i64 = 60 * 60 * 1000;

/// Milliseconds since the epoch, as text: set only when the timestamp is not `created_at`.
pub const CREATED_AT_HEADER: &str = "lockstep-created-at";

/// (record timestamp, `created_at` for the header when it differs), in ms since the epoch: the
/// publish time `now_ms` for a row whose `created_at` is further than `max_age_ms` from it. Pure.
pub fn stamp(created_secs: f64, now_ms: i64, max_age_ms: i64) -> (i64, Option<i64>) {
    let created_ms = (created_secs * 1000.0).round() as i64;
    if (now_ms - created_ms).abs() > max_age_ms {
        (now_ms, Some(created_ms))
    } else {
        (created_ms, None)
    }
}

/// The bound after the broker refused a record stamped `refused_age_ms` from the publish time:
/// half of it, so that the row (older now) is stamped with the publish time when sent again, and
/// a backlog's later rows converge on the broker's bound in a few refusals rather than one each.
pub fn tighten(max_age_ms: i64, refused_age_ms: i64) -> i64 {
    max_age_ms.min(refused_age_ms.abs() / 2)
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
        let max = MAX_STAMP_AGE_MS;
        assert_eq!(stamp(1_699_999_999.5, now, max), (1_699_999_999_500, None));
        // A clock a little ahead of the database's is still created_at.
        assert_eq!(stamp(1_700_000_000.25, now, max), (1_700_000_000_250, None));
        let old = (now - MAX_STAMP_AGE_MS - 1) as f64 / 1000.0;
        assert_eq!(stamp(old, now, max), (now, Some(now - MAX_STAMP_AGE_MS - 1)));
        let edge = (now - MAX_STAMP_AGE_MS) as f64 / 1000.0;
        assert_eq!(stamp(edge, now, max), (now - MAX_STAMP_AGE_MS, None));
        // A database clock far ahead: brokers bound future timestamps too.
        let ahead = (now + MAX_STAMP_AGE_MS + 1) as f64 / 1000.0;
        assert_eq!(stamp(ahead, now, max), (now, Some(now + MAX_STAMP_AGE_MS + 1)));
    }

    /// A broker that refuses a 20-minute-old stamp: the row is stamped now when sent again, and
    /// so are the backlog's rows as old; younger rows keep their created_at.
    #[test]
    fn a_refused_stamp_tightens_the_bound_so_the_row_is_sent_again_stamped_now() {
        let now = 1_700_000_000_000;
        let minute = 60_000;
        let refused = now - 20 * minute;
        let bound = tighten(MAX_STAMP_AGE_MS, now - refused);
        assert_eq!(bound, 10 * minute);
        let later = now + 1_000;
        assert_eq!(stamp(refused as f64 / 1000.0, later, bound), (later, Some(refused)));
        let fresh = now - 5 * minute;
        assert_eq!(stamp(fresh as f64 / 1000.0, later, bound), (fresh, None));
        // Never loosened; a refused future stamp counts by its distance.
        assert_eq!(tighten(bound, 60 * minute), bound);
        assert_eq!(tighten(bound, -4 * minute), 2 * minute);
    }
}
