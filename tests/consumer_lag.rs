//! `status.consumerLag` of an InboxTable naming `sources.kafka.consumerGroup`, against the real
//! API server and Kafka-protocol broker: committed offsets against high watermarks, summed, and
//! the age of the oldest unconsumed message.

mod common;

use std::time::Duration;

use kube::api::{Api, PostParams};
use lockstep::{clients::kafka::Admin, crd::InboxTable};
use rdkafka::{
    config::ClientConfig,
    consumer::{BaseConsumer, CommitMode, Consumer},
    producer::{FutureProducer, FutureRecord},
    Offset, TopicPartitionList,
};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

fn commit(group: &str, topic: &str, offsets: &[(i32, i64)]) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", common::kafka_bootstrap())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o)).unwrap();
    }
    c.commit(&tpl, CommitMode::Sync).unwrap();
}

async fn wait_lag(api: &Api<InboxTable>, messages: i64) -> lockstep::crd::ConsumerLagStatus {
    common::wait_until(T, &format!("consumerLag.messages = {messages}"), || async {
        let lag = api.get("orders").await.unwrap().status?.consumer_lag?;
        (lag.messages == messages && lag.error.is_none()).then_some(lag)
    })
    .await
}

#[tokio::test]
async fn consumer_lag_is_committed_offset_against_high_watermark() {
    common::operator();
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::TestNamespace::new(&client, "lag-group").await;
    common::create_secret(&client, &ns.name, "db", &common::env("DATABASE_URL")).await;
    let bootstrap = common::kafka_bootstrap();
    let topic = common::unique("group.events");
    let group = common::unique("billing");
    Admin::new(&bootstrap, &Default::default(), Duration::from_secs(10))
        .unwrap()
        .create_topic(&topic, 2, 1, &Default::default())
        .await
        .unwrap();

    // 10 messages on partition 0 and 4 on partition 1, stamped two minutes ago.
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 120_000;
    for (partition, n) in [(0, 10), (1, 4)] {
        for i in 0..n {
            let key = format!("k{i}");
            let r = FutureRecord::to(&topic)
                .partition(partition)
                .key(&key)
                .payload("{}")
                .timestamp(stamp);
            producer.send(r, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
        }
    }
    // The group consumed 3 of partition 0 and never committed on partition 1.
    commit(&group, &topic, &[(0, 3)]);

    let inboxes: Api<InboxTable> = Api::namespaced(client.clone(), &ns.name);
    let obj: InboxTable = serde_json::from_value(json!({
        "apiVersion": "lockstep.dev/v1alpha1", "kind": "InboxTable", "metadata": {"name": "orders"},
        "spec": {
            "database": {"urlSecretRef": {"name": "db"}, "schema": ns.name.replace('-', "_"), "table": "inbox"},
            "sources": {"kafka": {"bootstrapServers": bootstrap, "topics": [topic], "consumerGroup": group}}
        }
    }))
    .unwrap();
    inboxes.create(&PostParams::default(), &obj).await.unwrap();
    let lag = wait_lag(&inboxes, 7 + 4).await;
    assert_eq!(lag.group, group);
    assert_eq!(lag.topics.len(), 1);
    assert_eq!((lag.topics[0].topic.as_str(), lag.topics[0].messages), (topic.as_str(), 11));
    let age = lag.oldest_unconsumed_age_seconds.expect("the broker gives timestamps");
    assert!((110.0..600.0).contains(&age), "oldest unconsumed message is about 120 s old: {age}");

    // The group catches up: no lag, no oldest message.
    commit(&group, &topic, &[(0, 10), (1, 4)]);
    common::touch(&inboxes, "orders").await;
    let lag = wait_lag(&inboxes, 0).await;
    assert_eq!(lag.oldest_unconsumed_age_seconds, None);
    ns.delete().await;
}
