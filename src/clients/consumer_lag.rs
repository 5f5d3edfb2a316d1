//! A consumer group's lag on its topics, read from the broker without joining the group (no
//! rebalance, nothing committed): committed offsets (OffsetFetch) against each partition's high
//! watermark (ListOffsets), and the timestamp of the first unconsumed message of each lagging
//! partition, fetched by assignment.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use rdkafka::{
    config::ClientConfig,
    consumer::{BaseConsumer, Consumer},
    error::KafkaError,
    message::Message,
    Offset, TopicPartitionList,
};

use crate::clients::kafka::config_error_text;

/// One partition as measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset; None: the group never committed on this partition.
    pub committed: Option<i64>,
    pub low: i64,
    pub high: i64,
}

impl PartitionLag {
    /// Messages not consumed yet: from the committed offset (or, without one, from the oldest
    /// retained message) to the high watermark. Pure.
    pub fn lag(&self) -> i64 {
        let from = self.committed.unwrap_or(self.low).max(self.low);
        (self.high - from).max(0)
    }

    fn next(&self) -> i64 {
        self.committed.unwrap_or(self.low).max(self.low)
    }
}

/// The group's lag on its topics.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupLag {
    pub partitions: Vec<PartitionLag>,
    /// The create/append time (ms since the epoch) of the oldest unconsumed message, where the
    /// broker gave one.
    pub oldest_unconsumed_ms: Option<i64>,
}

impl GroupLag {
    /// Lag summed per topic. Pure.
    pub fn per_topic(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for p in &self.partitions {
            *out.entry(p.topic.clone()).or_insert(0) += p.lag();
        }
        out
    }

    pub fn total(&self) -> i64 {
        self.partitions.iter().map(PartitionLag::lag).sum()
    }
}

/// The consumers lag is read with, one per (bootstrap servers, settings, group), shared by every
/// measurement: a librdkafka client is threads and connections, and a table is measured on every
/// refresh and after every purge. Keyed by a digest, so no setting is kept in the clear.
#[derive(Default)]
pub struct LagClients {
    // A mutex each: a measurement assigns partitions, which two at once would undo for each other.
    clients: crate::clients::cache::IdleCache<Arc<Mutex<BaseConsumer>>>,
    created: AtomicU64,
}

impl LagClients {
    /// How many consumers were built so far (one per distinct settings and group, again after an
    /// eviction).
    pub fn created(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }

    /// Forget consumers nobody measured with for `idle`.
    pub fn evict_idle(&self, idle: Duration) -> usize {
        self.clients.evict_idle(idle)
    }

    /// The consumer for these settings, built on first use. Blocks (librdkafka).
    fn get(&self, bootstrap: &str, settings: &BTreeMap<String, String>, group: &str) -> Result<Arc<Mutex<BaseConsumer>>, String> {
        let key = crate::clients::cache::digest([bootstrap, group], settings);
        self.clients.get_or_try_insert(key, || {
            let mut cfg = ClientConfig::new();
            for (k, v) in settings {
                cfg.set(k, v);
            }
            cfg.set("bootstrap.servers", bootstrap)
                .set("group.id", group)
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("enable.partition.eof", "false");
            let consumer: BaseConsumer = cfg
                .create()
                .map_err(|e: KafkaError| config_error_text(&e, settings.values().map(String::as_str)))?;
            self.created.fetch_add(1, Ordering::Relaxed);
            Ok(Arc::new(Mutex::new(consumer)))
        })
    }
}

/// Measure `group` on `topics` with the shared consumer for these settings. Blocking calls run
/// off the async threads. `settings` are the Secret's librdkafka settings (never logged;
/// scrubbed from errors).
pub async fn measure(
    clients: &Arc<LagClients>,
    bootstrap: &str,
    settings: &BTreeMap<String, String>,
    group: &str,
    topics: &[String],
    timeout: Duration,
) -> Result<GroupLag, String> {
    let (group, bootstrap, settings) = (group.to_owned(), bootstrap.to_owned(), settings.clone());
    let (clients, topics) = (clients.clone(), topics.to_vec());
    // Creating the client and every call after it block: none of it on an async worker.
    tokio::task::spawn_blocking(move || {
        let consumer = clients.get(&bootstrap, &settings, &group)?;
        let consumer = consumer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        measure_blocking(&consumer, &topics, timeout).map_err(|e| {
            let text = crate::core::kafka_settings::scrub(&e.to_string(), settings.values().map(String::as_str));
            format!("cannot read the offsets of consumer group {group:?} from {bootstrap}: {text}")
        })
    })
    .await
    .map_err(|e| e.to_string())?
}

/// How many queued events one call serves at most (polls cannot tell an empty queue apart).
const SERVE_AT_MOST: usize = 1000;

/// Serve what librdkafka queued for a consumer only used for requests (log lines, errors): logged
/// through its context, instead of piling up in memory for the life of a cached client.
pub(crate) fn serve_queued_events(c: &BaseConsumer) {
    for _ in 0..SERVE_AT_MOST {
        let _ = c.poll(Duration::ZERO);
    }
}

fn measure_blocking(c: &BaseConsumer, topics: &[String], timeout: Duration) -> Result<GroupLag, KafkaError> {
    // A shared consumer lives long: what it queued since the last measurement is served now.
    serve_queued_events(c);
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        let md = c.fetch_metadata(Some(t), timeout)?;
        for mt in md.topics().iter().filter(|mt| mt.error().is_none()) {
            for p in mt.partitions() {
                tpl.add_partition(t, p.id());
            }
        }
    }
    let committed = c.committed_offsets(tpl, timeout)?;
    let mut partitions = Vec::new();
    for e in committed.elements() {
        let (low, high) = c.fetch_watermarks(e.topic(), e.partition(), timeout)?;
        let committed = match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        partitions.push(PartitionLag {
            topic: e.topic().to_owned(),
            partition: e.partition(),
            committed,
            low,
            high,
        });
    }
    let oldest_unconsumed_ms = oldest_unconsumed(c, &partitions, timeout)?;
    Ok(GroupLag {
        partitions,
        oldest_unconsumed_ms,
    })
}

/// Read the first unconsumed message of each lagging partition (assigned, not subscribed: the
/// group is not joined) and keep the oldest timestamp.
fn oldest_unconsumed(c: &BaseConsumer, partitions: &[PartitionLag], timeout: Duration) -> Result<Option<i64>, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for p in partitions.iter().filter(|p| p.lag() > 0) {
        tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(p.next()))?;
    }
    let mut waiting = tpl.count();
    if waiting == 0 {
        return Ok(None);
    }
    c.assign(&tpl)?;
    let mut seen = std::collections::HashSet::new();
    let mut oldest: Option<i64> = None;
    let deadline = std::time::Instant::now() + timeout;
    while waiting > 0 && std::time::Instant::now() < deadline {
        // A partition that cannot be read (reset, deleted) just gives no timestamp.
        let Some(Ok(m)) = c.poll(Duration::from_millis(200)) else {
            continue;
        };
        if seen.insert((m.topic().to_owned(), m.partition())) {
            waiting -= 1;
            if let Some(ts) = m.timestamp().to_millis() {
                oldest = Some(oldest.map_or(ts, |o| o.min(ts)));
            }
        }
    }
    c.unassign()?;
    Ok(oldest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(topic: &str, committed: Option<i64>, low: i64, high: i64) -> PartitionLag {
        PartitionLag {
            topic: topic.into(),
            partition: 0,
            committed,
            low,
            high,
        }
    }

    #[test]
    fn lag_counts_from_the_committed_offset_or_the_oldest_retained_message() {
        assert_eq!(p("t", Some(3), 0, 10).lag(), 7);
        assert_eq!(p("t", None, 4, 10).lag(), 6, "never committed: everything retained");
        assert_eq!(p("t", Some(2), 5, 10).lag(), 5, "committed offset already deleted");
        assert_eq!(p("t", Some(10), 0, 10).lag(), 0);
    }

    #[test]
    fn lag_is_summed_per_topic() {
        let g = GroupLag {
            partitions: vec![p("a", Some(1), 0, 4), p("a", Some(0), 0, 2), p("b", None, 0, 0)],
            oldest_unconsumed_ms: None,
        };
        assert_eq!(g.per_topic(), BTreeMap::from([("a".to_string(), 5), ("b".to_string(), 0)]));
        assert_eq!(g.total(), 5);
    }
}
