//! What is particular to RabbitMQ, against a real rabbitmq-server: a message the broker returns
//! (no queue bound for its routing key) or nacks (a full queue) is not a success, and the relay
//! keeps the later messages of its key back until it is stored.

mod common;

use std::time::Duration;

use common::rabbitmq::{self, PrivateRabbit};
use lapin::{options::BasicPublishOptions, BasicProperties, Confirmation};

async fn publish(url: &str, routing_key: &str) -> Confirmation {
    let ch = rabbitmq::channel(url).await;
    ch.confirm_select(Default::default()).await.unwrap();
    let opts = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    ch.basic_publish(
        rabbitmq::EXCHANGE.into(),
        routing_key.into(),
        opts,
        b"x",
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap()
}

/// A test's own node keeps its stream queues and bindings across a SIGKILL, once they settled
/// (the outage tests rely on it).
#[tokio::test]
async fn a_private_node_keeps_its_stream_queues_and_bindings_across_a_kill() {
    let mut r = PrivateRabbit::start();
    let q = common::unique("relay.kept");
    rabbitmq::declare(&r.admin_url(), &q).await;
    rabbitmq::settle().await;
    assert_eq!(publish(&r.admin_url(), &q).await, Confirmation::Ack(None));
    r.stop();
    r.start_again();
    let mut last = None;
    for _ in 0..50 {
        let c = publish(&r.admin_url(), &q).await;
        if c == Confirmation::Ack(None) {
            return;
        }
        last = Some(c);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("after a restart: {last:?}");
}
