//! Print what a relay published: every message of a topic from its first offset, one line each
//! (partition, offset, key, the `id` and `type` headers, payload). It assigns the partitions itself, so
//! it joins no consumer group and commits nothing.
//!
//!   cargo run --example tail -- <bootstrap servers> <topic> [at least N messages] [timeout seconds]
//!
//! Exits 0 once N messages (default 1) have been printed and the topic's end is reached, 1 when the
//! timeout (default 60 s) passes first.

use std::time::{Duration, Instant};

use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::Headers,
    ClientConfig, Message, Offset, TopicPartitionList,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bootstrap, topic, rest @ ..] = args.as_slice() else {
        return Err("usage: tail <bootstrap servers> <topic> [at least N messages] [timeout seconds]".into());
    };
    let want: usize = rest.first().map(|n| n.parse()).transpose()?.unwrap_or(1);
    let timeout = Duration::from_secs(rest.get(1).map(|s| s.parse()).transpose()?.unwrap_or(60));
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "lockstep-tail")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()?;
    let deadline = Instant::now() + timeout;
    let partitions = loop {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
        let n = md.topics().first().map_or(0, |t| t.partitions().len());
        if n > 0 {
            break n;
        }
        if Instant::now() > deadline {
            return Err(format!("topic {topic} has no partitions").into());
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment.add_partition_offset(topic, p as i32, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;

    let (mut seen, mut at_end) = (0usize, vec![false; partitions]);
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => at_end[p as usize] = true,
            Some(Err(e)) => eprintln!("tail: {e}"),
            Some(Ok(m)) => {
                at_end[m.partition() as usize] = false;
                seen += 1;
                let header = |name: &str| {
                    m.headers()
                        .and_then(|h| h.iter().find(|h| h.key == name))
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default()
                };
                println!(
                    "partition={} offset={} key={} id={} type={} payload={}",
                    m.partition(),
                    m.offset(),
                    String::from_utf8_lossy(m.key().unwrap_or_default()),
                    header("id"),
                    header("type"),
                    String::from_utf8_lossy(m.payload().unwrap_or_default()),
                );
            }
        }
        if seen >= want && at_end.iter().all(|e| *e) {
            return Ok(());
        }
    }
    eprintln!("tail: {seen} of at least {want} messages in {}s", timeout.as_secs());
    std::process::exit(1);
}
