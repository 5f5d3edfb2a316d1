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
    // Said in TopicsReady until the next reconcile, and in an Event that stays.
    common::wait_event(&client, &ns.name, "TopicConfigDrift", "maxAge: 1h -> 1d", T).await;
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

fn nats_relay(schema: &str, servers: &str, stream: &str, max_age: &str, policy: &str) -> OutboxRelay {
    serde_json::from_value(json!({
        "apiVersion": "lockstep.dev/v1alpha1", "kind": "OutboxRelay", "metadata": {"name": "orders"},
        "spec": {
            "database": {"urlSecretRef": {"name": "db"}, "schema": schema, "table": "outbox"},
            "broker": "Nats",
            "nats": {"servers": servers, "streams": [{"name": stream, "subjects": [format!("{stream}.>")], "maxAge": max_age}]},
            "routing": {"topic": format!("{stream}.{{type}}")},
            "relay": {"replicas": 0},
            "deletionPolicy": policy
        }
    }))
    .unwrap()
}

/// Two OutboxRelays naming one stream, the second through another address of the same server
/// (`localhost`: the server's identity tells): the second reports ResourceConflict naming the
/// first, never changes the stream, and its Delete cleanup keeps it with its message; the first's
/// Delete cleanup, alone in naming it, deletes it.
#[tokio::test]
async fn a_second_relay_naming_a_managed_stream_conflicts_and_never_alters_nor_deletes_it() {
    common::operator();
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let mut spaces = Vec::new();
    let mut apis = Vec::new();
    for prefix in ["obr-nats-a", "obr-nats-b"] {
        let ns = common::TestNamespace::new(&client, prefix).await;
        common::create_secret(&client, &ns.name, "db", &common::env("DATABASE_URL")).await;
        apis.push(Api::<OutboxRelay>::namespaced(client.clone(), &ns.name));
        spaces.push(ns);
    }
    let (a, b) = (&apis[0], &apis[1]);
    let stream = common::unique("shared").replace(['.', '-'], "_");
    let url = common::env("NATS_URL");
    let alias = url.replace("127.0.0.1", "localhost");
    assert_ne!(alias, url, "the test server listens on 127.0.0.1");
    let schema = |i: usize| spaces[i].name.replace('-', "_");
    a.create(&PostParams::default(), &nats_relay(&schema(0), &url, &stream, "7d", "Delete"))
        .await
        .unwrap();
    common::wait_condition(a, "orders", "TopicsReady", "True", None, T).await;
    b.create(&PostParams::default(), &nats_relay(&schema(1), &alias, &stream, "1h", "Delete"))
        .await
        .unwrap();
    let got = common::wait_condition(b, "orders", "TopicsReady", "False", Some("ResourceConflict"), T).await;
    let st = got.status.unwrap();
    let holder = format!("OutboxRelay {}/orders", spaces[0].name);
    let msg = &common::condition(&st.conditions, "TopicsReady").message;
    assert!(msg.contains(&format!("stream {stream} is managed by {holder}")), "{msg}");
    assert_eq!(st.topics[0].managed_by.as_deref(), Some(holder.as_str()));

    let admin = common::broker::nats_admin().await;
    let week = Duration::from_secs(7 * 86400);
    for _ in 0..4 {
        common::touch(b, "orders").await;
        common::touch(a, "orders").await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            admin.describe(&stream).await.unwrap().unwrap().max_age,
            week,
            "B changed A's stream"
        );
    }
    let nc = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    js.publish(format!("{stream}.created"), "unconsumed".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let gone = |api: Api<OutboxRelay>| async move {
        api.delete("orders", &Default::default()).await.unwrap();
        common::wait_until(T, "deleted", || {
            let api = api.clone();
            async move { api.get_opt("orders").await.unwrap().is_none().then_some(()) }
        })
        .await;
    };
    gone(b.clone()).await;
    let kept = admin.describe(&stream).await.unwrap().expect("the stream survives B's cleanup");
    assert_eq!((kept.max_age, kept.messages), (week, 1), "with its message");
    gone(a.clone()).await;
    assert!(
        admin.describe(&stream).await.unwrap().is_none(),
        "A, alone in naming it, deletes it"
    );
    for ns in spaces {
        ns.delete().await;
    }
}
