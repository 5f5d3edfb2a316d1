//! Dedup coverage: does an inbox's retention outlive every redelivery of its source topics?
//! A consumer reset to earliest replays a topic as far back as its retention.ms; an inbox row
//! purged before that re-opens the duplicate. Pure.

use std::time::Duration as StdDuration;

/// Kafka's default topic retention (log.retention.hours=168), assumed when a broker does not report
/// retention.ms for a topic.
pub const KAFKA_DEFAULT_RETENTION_MS: i64 = 7 * 86_400_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coverage {
    pub covered: bool,
    pub message: String,
}

/// Whether an inbox's retention outlives every redelivery of its source topics: at least each
/// topic's retention.ms (a consumer reset to earliest replays that far back), unless the spec
/// states a smaller redelivery window. `topics` holds each topic's retention.ms as reported
/// (None: not reported, Kafka's default assumed; -1: kept forever). Pure.
pub fn coverage(
    retention: StdDuration,
    retention_text: &str,
    window: Option<(&str, StdDuration)>,
    topics: &[(String, Option<i64>)],
) -> Coverage {
    let ret_ms = retention.as_millis() as i64;
    if let Some((wtext, w)) = window {
        let wms = w.as_millis() as i64;
        return if ret_ms >= wms {
            Coverage {
                covered: true,
                message: format!("retention {retention_text} ({ret_ms} ms) covers the stated redeliveryWindow {wtext} ({wms} ms)"),
            }
        } else {
            Coverage {
                covered: false,
                message: format!("retention {retention_text} ({ret_ms} ms) is shorter than the stated redeliveryWindow {wtext} ({wms} ms): ids are purged while their messages can still be redelivered"),
            }
        };
    }
    let mut short = Vec::new();
    let mut parts = Vec::new();
    for (name, r) in topics {
        let (ms, note) = match r {
            Some(ms) => (*ms, ""),
            None => (KAFKA_DEFAULT_RETENTION_MS, " (not reported; Kafka's default assumed)"),
        };
        if ms < 0 {
            short.push(format!(
                "topic {name} keeps messages forever (retention.ms=-1); state a redeliveryWindow"
            ));
        } else if ret_ms < ms {
            short.push(format!(
                "topic {name} retention.ms={ms}{note} ({})",
                crate::duration::format(StdDuration::from_millis(ms as u64))
            ));
        } else {
            parts.push(format!("{name} retention.ms={ms}{note}"));
        }
    }
    if short.is_empty() {
        Coverage {
            covered: true,
            message: format!("retention {retention_text} ({ret_ms} ms) covers {}", parts.join(", ")),
        }
    } else {
        Coverage {
            covered: false,
            message: format!(
                "retention {retention_text} ({ret_ms} ms) is shorter than {}: a consumer reset to earliest redelivers messages whose ids were already purged",
                short.join("; ")
            ),
        }
    }
}

#[cfg(test)]
mod coverage_tests {
    use super::*;

    const DAY: StdDuration = StdDuration::from_secs(86_400);

    #[test]
    fn one_day_does_not_cover_seven() {
        let c = coverage(DAY, "1d", None, &[("orders".into(), Some(604_800_000))]);
        assert!(!c.covered);
        assert!(
            c.message.contains("86400000 ms") && c.message.contains("604800000"),
            "{}",
            c.message
        );
        assert!(coverage(DAY * 8, "8d", None, &[("orders".into(), Some(604_800_000))]).covered);
        assert!(
            coverage(DAY * 7, "7d", None, &[("orders".into(), Some(604_800_000))]).covered,
            "equal is enough"
        );
    }

    #[test]
    fn the_longest_topic_decides_and_defaults_are_assumed() {
        let topics = [("a".to_string(), Some(3_600_000)), ("b".to_string(), None)];
        let c = coverage(DAY, "1d", None, &topics);
        assert!(
            !c.covered && c.message.contains("topic b") && c.message.contains("default assumed"),
            "{}",
            c.message
        );
        assert!(coverage(DAY * 7, "7d", None, &topics).covered);
    }

    #[test]
    fn infinite_retention_needs_a_window() {
        let topics = [("a".to_string(), Some(-1))];
        assert!(!coverage(DAY * 365, "365d", None, &topics).covered);
        assert!(coverage(DAY * 2, "2d", Some(("1d", DAY)), &topics).covered);
        let c = coverage(DAY, "1d", Some(("2d", DAY * 2)), &topics);
        assert!(!c.covered && c.message.contains("redeliveryWindow 2d"));
    }
}
