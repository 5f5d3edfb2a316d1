//! Dedup coverage: does an inbox's retention outlive every redelivery of its source topics?
//! A consumer reset to earliest replays a topic as far back as its retention.ms; an inbox row
//! purged before that re-opens the duplicate. Pure.

use std::time::Duration as StdDuration;

/// Kafka's default topic retention (log.retention.hours=168), assumed when a broker does not report
/// retention.ms for a topic.
pub const KAFKA_DEFAULT_RETENTION_MS: i64 = 7 * 86_400_000;
/// Kafka's default segment.ms (log.roll.hours=168), assumed when not reported.
pub const KAFKA_DEFAULT_SEGMENT_MS: i64 = 7 * 86_400_000;
/// Kafka's log.retention.check.interval.ms default: how late an expired segment may be deleted.
pub const RETENTION_CHECK_MS: i64 = 300_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coverage {
    pub covered: bool,
    pub message: String,
}

/// A source topic's settings that bound how long its records can be read back (None: not
/// reported; Kafka's default assumed).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopicRetention {
    pub name: String,
    pub retention_ms: Option<i64>,
    pub segment_ms: Option<i64>,
    pub cleanup_policy: Option<String>,
}

impl TopicRetention {
    /// How long after it is written a record may still be redelivered, in ms, with how that was
    /// worked out; None: without bound. Kafka deletes whole segments once their newest record
    /// passes retention.ms, so the oldest record of a segment lives up to segment.ms longer, plus
    /// the retention check interval; a compacted topic keeps each key's latest record forever.
    pub fn horizon(&self) -> (Option<i64>, String) {
        let policy = self.cleanup_policy.as_deref().unwrap_or("delete");
        let has = |p: &str| policy.split(',').any(|x| x.trim() == p);
        if has("compact") && !has("delete") {
            return (
                None,
                format!(
                    "topic {} is compacted (cleanup.policy={policy}): it replays each key's latest record however old",
                    self.name
                ),
            );
        }
        let default = |v: Option<i64>, d: i64| v.map_or((d, " (not reported; Kafka's default assumed)"), |v| (v, ""));
        let (ret, ret_note) = default(self.retention_ms, KAFKA_DEFAULT_RETENTION_MS);
        if ret < 0 {
            return (None, format!("topic {} keeps messages forever (retention.ms=-1)", self.name));
        }
        let (seg, seg_note) = default(self.segment_ms, KAFKA_DEFAULT_SEGMENT_MS);
        let total = ret + seg + RETENTION_CHECK_MS;
        let why = format!(
            "topic {} retention.ms={ret}{ret_note} + segment.ms={seg}{seg_note} + {}s retention check = {}",
            self.name,
            RETENTION_CHECK_MS / 1000,
            crate::core::duration::format(StdDuration::from_millis(total as u64))
        );
        (Some(total), why)
    }
}

/// A JetStream stream's settings that bound how long its messages can be read back.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamRetention {
    pub name: String,
    /// Zero: no age limit.
    pub max_age: StdDuration,
}

impl StreamRetention {
    /// A message leaves the stream once older than max_age, and with it every chance of a
    /// redelivery (an unacknowledged message, a new consumer from the start); without max_age,
    /// only another limit removes it, and nothing bounds redelivery in time.
    pub fn horizon(&self) -> (Option<i64>, String) {
        if self.max_age.is_zero() {
            return (
                None,
                format!(
                    "stream {} has no max_age: it keeps messages until another limit removes them",
                    self.name
                ),
            );
        }
        let text = crate::core::duration::format(self.max_age);
        (
            Some(self.max_age.as_millis() as i64),
            format!("stream {} max_age={text}", self.name),
        )
    }
}

/// A RabbitMQ queue's settings that bound how long its messages can be redelivered (after any
/// policy: the lower of the argument and the policy's value).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueueRetention {
    pub name: String,
    /// `quorum`, `classic` or `stream`.
    pub type_: String,
    pub message_ttl_ms: Option<i64>,
    /// A stream's x-max-age, in seconds.
    pub max_age_secs: Option<u64>,
    pub delivery_limit: Option<i64>,
}

impl QueueRetention {
    /// A queue redelivers an unacknowledged message (and holds a relay's resend) until it expires:
    /// only a message TTL bounds that in time (a delivery limit bounds the count of deliveries,
    /// not how long they take). A stream keeps messages for any consumer to re-read until x-max-age.
    pub fn horizon(&self) -> (Option<i64>, String) {
        if self.type_ == "stream" {
            return match self.max_age_secs {
                Some(s) => (
                    Some(s as i64 * 1000),
                    format!(
                        "stream queue {} x-max-age={}",
                        self.name,
                        crate::core::duration::format(StdDuration::from_secs(s))
                    ),
                ),
                None => (
                    None,
                    format!(
                        "stream queue {} has no x-max-age: a consumer can re-read it from the start however old",
                        self.name
                    ),
                ),
            };
        }
        match self.message_ttl_ms {
            Some(ms) => (
                Some(ms),
                format!(
                    "queue {} x-message-ttl={}",
                    self.name,
                    crate::core::duration::format(StdDuration::from_millis(ms as u64))
                ),
            ),
            None => {
                let limit = self.delivery_limit.map_or(String::new(), |n| {
                    format!(" (x-delivery-limit={n} bounds the deliveries, not their time)")
                });
                (
                    None,
                    format!(
                        "queue {} has no message TTL: it redelivers an unacknowledged message, and holds a resend, without a time bound{limit}",
                        self.name
                    ),
                )
            }
        }
    }
}

/// A source whose redelivery an inbox must outlive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Topic(TopicRetention),
    Stream(StreamRetention),
    Queue(QueueRetention),
}

impl Source {
    pub fn horizon(&self) -> (Option<i64>, String) {
        match self {
            Source::Topic(t) => t.horizon(),
            Source::Stream(s) => s.horizon(),
            Source::Queue(q) => q.horizon(),
        }
    }
}

/// Whether an inbox's retention outlives every redelivery of its source topics: at least each
/// topic's [`TopicRetention::horizon`] (a consumer reset to earliest replays that far back), unless
/// the spec states a smaller redelivery window. Pure.
pub fn coverage(retention: StdDuration, retention_text: &str, window: Option<(&str, StdDuration)>, topics: &[Source]) -> Coverage {
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
    for t in topics {
        match t.horizon() {
            (None, why) => short.push(format!("{why}; state a redeliveryWindow")),
            (Some(ms), why) if ret_ms < ms => short.push(why),
            (Some(_), why) => parts.push(why),
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
    const WEEK_MS: i64 = 604_800_000;

    fn topic(name: &str, retention_ms: Option<i64>, segment_ms: Option<i64>, policy: Option<&str>) -> Source {
        Source::Topic(TopicRetention {
            name: name.into(),
            retention_ms,
            segment_ms,
            cleanup_policy: policy.map(Into::into),
        })
    }

    #[test]
    fn a_stream_is_covered_by_its_max_age_and_without_one_needs_a_window() {
        let stream = |max_age| {
            [Source::Stream(StreamRetention {
                name: "orders".into(),
                max_age,
            })]
        };
        assert!(coverage(DAY, "1d", None, &stream(DAY)).covered);
        let c = coverage(DAY, "1d", None, &stream(DAY * 2));
        assert!(!c.covered && c.message.contains("stream orders max_age=2d"), "{}", c.message);
        let c = coverage(DAY * 365, "365d", None, &stream(StdDuration::ZERO));
        assert!(!c.covered && c.message.contains("redeliveryWindow"), "{}", c.message);
        assert!(coverage(DAY, "1d", Some(("12h", DAY / 2)), &stream(StdDuration::ZERO)).covered);
    }

    #[test]
    fn a_queue_is_covered_only_by_a_message_ttl_and_a_stream_queue_by_its_max_age() {
        let queue = |type_: &str, ttl: Option<i64>, age: Option<u64>| {
            [Source::Queue(QueueRetention {
                name: "billing".into(),
                type_: type_.into(),
                message_ttl_ms: ttl,
                max_age_secs: age,
                delivery_limit: Some(20),
            })]
        };
        assert!(coverage(DAY, "1d", None, &queue("quorum", Some(86_400_000), None)).covered);
        let c = coverage(DAY * 365, "365d", None, &queue("quorum", None, None));
        assert!(
            !c.covered && c.message.contains("no message TTL") && c.message.contains("x-delivery-limit=20"),
            "{}",
            c.message
        );
        assert!(c.message.contains("redeliveryWindow"), "{}", c.message);
        assert!(coverage(DAY, "1d", Some(("12h", DAY / 2)), &queue("quorum", None, None)).covered);
        let c = coverage(DAY, "1d", None, &queue("stream", None, Some(2 * 86_400)));
        assert!(
            !c.covered && c.message.contains("stream queue billing x-max-age=2d"),
            "{}",
            c.message
        );
    }

    #[test]
    fn a_record_outlives_retention_by_a_segment_and_the_check_interval() {
        let daily = [topic("orders", Some(WEEK_MS), Some(86_400_000), None)];
        let c = coverage(DAY, "1d", None, &daily);
        assert!(!c.covered);
        assert!(
            c.message.contains("86400000 ms") && c.message.contains("retention.ms=604800000"),
            "{}",
            c.message
        );
        let c = coverage(DAY * 8, "8d", None, &daily);
        assert!(!c.covered, "7d + 1d segment + 5m is more than 8d: {}", c.message);
        assert!(
            c.message.contains("segment.ms=86400000") && c.message.contains("= 8d5m"),
            "{}",
            c.message
        );
        assert!(
            coverage(DAY * 8 + StdDuration::from_secs(300), "8d5m", None, &daily).covered,
            "equal is enough"
        );
    }

    #[test]
    fn the_longest_topic_decides_and_defaults_are_assumed() {
        let topics = [topic("a", Some(3_600_000), Some(3_600_000), None), topic("b", None, None, None)];
        let c = coverage(DAY * 7, "7d", None, &topics);
        assert!(
            !c.covered && c.message.contains("topic b") && c.message.contains("default assumed"),
            "{}",
            c.message
        );
        assert!(coverage(DAY * 15, "15d", None, &topics).covered, "7d + 7d + 5m");
    }

    #[test]
    fn compacted_or_infinite_topics_need_a_window() {
        for t in [
            topic("a", Some(-1), None, None),
            topic("a", Some(WEEK_MS), Some(1), Some("compact")),
        ] {
            let c = coverage(DAY * 365, "365d", None, std::slice::from_ref(&t));
            assert!(!c.covered && c.message.contains("redeliveryWindow"), "{}", c.message);
            assert!(coverage(DAY * 2, "2d", Some(("1d", DAY)), std::slice::from_ref(&t)).covered);
            let c = coverage(DAY, "1d", Some(("2d", DAY * 2)), &[t]);
            assert!(!c.covered && c.message.contains("redeliveryWindow 2d"));
        }
        // compact,delete still deletes by age.
        let both = topic("a", Some(3_600_000), Some(3_600_000), Some("compact,delete"));
        assert!(coverage(DAY, "1d", None, &[both]).covered);
    }
}
