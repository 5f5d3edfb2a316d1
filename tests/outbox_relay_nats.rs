//! An OutboxRelay with `broker: Nats` and an InboxTable reading JetStream, against the real API
//! server, PostgreSQL and nats-server: streams declared and kept to the spec, the relay pod told
//! to publish to NATS, DedupCovered from the stream's max_age.

mod common;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, PostParams};
use lockstep::crd::{InboxTable, OutboxRelay};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_nats_relay_gets_its_stream_kept_to_the_spec_and_an_inbox_its_coverage() {
    common::operator();
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::TestNamespace::new(&client, "obr-nats").await;
    common::create_secret(&client, &ns.name, "db", &common::env("DATABASE_URL")).await;
    let schema = ns.name.replace('-', "_");
    let stream = common::unique("orders").replace(['.', '-'], "_");
    let nats_url = common::env("NATS_URL");
    let api: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns.name);
    let obj: OutboxRelay = serde_json::from_value(json!({
        "apiVersion": "lockstep.dev/v1alpha1", "kind": "OutboxRelay", "metadata": {"name": "orders"},
        "spec": {
            "database": {"urlSecretRef": {"name": "db"}, "schema": schema, "table": "outbox"},
            "broker": "Nats",
            "nats": {"servers": nats_url, "streams": [{"name": stream, "subjects": [format!("{stream}.>")], "maxAge": "1d"}]},
            "routing": {"topic": format!("{stream}.{{type}}")},
            "relay": {"replicas": 0}
        }
    }))
    .unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
    let got = common::wait_condition(&api, "orders", "Ready", "True", None, T).await;
    let st = got.status.unwrap();
    assert_eq!(common::condition(&st.conditions, "TopicsReady").reason, "TopicsConfigured");
    assert!(st.topics[0].ready && st.topics[0].name == stream);
    assert!(st.guarantees[1].guarantee.contains("PubAck"), "{:?}", st.guarantees);
    let a = common::broker::nats_admin().await;
    let o = a.describe(&stream).await.unwrap().expect("the stream was created");
    assert_eq!(
        (o.max_age, o.duplicate_window),
        (Duration::from_secs(86400), Duration::from_secs(120))
    );

    // The relay pod publishes to NATS, not Kafka.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let d = deployments.get("orders-relay").await.unwrap();
    let args = d.spec.unwrap().template.spec.unwrap().containers[0].args.clone().unwrap();
    assert!(
        args.contains(&"--broker=nats".to_string()) && args.contains(&format!("--nats-url={nats_url}")),
        "{args:?}"
    );
    assert!(!args.iter().any(|a| a.starts_with("--bootstrap-servers")), "{args:?}");

    // Shortened outside lockstep: reported and restored at the next reconcile.
    let changed = lockstep::crd::DesiredStream {
        name: stream.clone(),
        subjects: vec![format!("{stream}.>")],
        storage: lockstep::crd::StreamStorage::File,
        replicas: 1,
        max_age: Duration::from_secs(3600),
        duplicate_window: Duration::from_secs(120),
        discard: lockstep::crd::Discard::Old,
        max_bytes: None,
        ignore: Default::default(),
    };
    a.update(&changed).await.unwrap();
    common::touch(&api, "orders").await;
    let got = common::wait_condition(&api, "orders", "TopicsReady", "True", Some("TopicConfigDrift"), T).await;
    let msg = common::condition(&got.status.unwrap().conditions, "TopicsReady").message.clone();
    assert!(msg.contains("maxAge: 1h -> 1d"), "{msg}");
    assert_eq!(a.describe(&stream).await.unwrap().unwrap().max_age, Duration::from_secs(86400));

    // An inbox of that stream: 12h does not outlive a day of redelivery, 2d does.
    let inboxes: Api<InboxTable> = Api::namespaced(client.clone(), &ns.name);
    let inbox = |retention: &str| -> InboxTable {
        serde_json::from_value(json!({
            "apiVersion": "lockstep.dev/v1alpha1", "kind": "InboxTable", "metadata": {"name": "payments"},
            "spec": {
                "database": {"urlSecretRef": {"name": "db"}, "schema": schema, "table": "inbox"},
                "retention": retention,
                "sources": {"nats": {"servers": nats_url, "streams": [stream]}}
            }
        }))
        .unwrap()
    };
    inboxes.create(&PostParams::default(), &inbox("12h")).await.unwrap();
    let got = common::wait_condition(
        &inboxes,
        "payments",
        "DedupCovered",
        "False",
        Some("RetentionBelowTopicRetention"),
        T,
    )
    .await;
    let st = got.status.unwrap();
    let msg = &common::condition(&st.conditions, "DedupCovered").message;
    assert!(msg.contains(&format!("stream {stream} max_age=1d")), "{msg}");
    assert!(st.guarantees[0].guarantee.contains("max_deliver"), "{:?}", st.guarantees);
    let mut bigger = inboxes.get("payments").await.unwrap();
    bigger.spec.retention = Some(lockstep::core::duration::Duration::new("2d"));
    inboxes.replace("payments", &PostParams::default(), &bigger).await.unwrap();
    common::wait_condition(&inboxes, "payments", "DedupCovered", "True", Some("RetentionCoversRedelivery"), T).await;
    a.delete(&stream).await.unwrap();
    ns.delete().await;
}
