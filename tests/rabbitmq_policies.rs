//! `settingsBy: Policy` against the test environment's rabbitmq-server: the queue's settings are
//! a policy lockstep keeps (`lockstep.<queue>`), so a longer TTL in the spec is applied where an
//! argument would be refused, a policy changed by hand is set back, and a Delete cleanup removes
//! the policy with its queue.

mod common;

use std::{collections::BTreeMap, time::Duration};

use kube::api::{Api, PostParams};
use lockstep::crd::OutboxRelay;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

fn relay(schema: &str, queue: &str, ttl: &str) -> OutboxRelay {
    let url = common::env("AMQP_URL");
    let (scheme, rest) = url.split_once("://").unwrap();
    serde_json::from_value(json!({
        "apiVersion": "lockstep.dev/v1alpha1", "kind": "OutboxRelay", "metadata": {"name": "orders"},
        "spec": {
            "database": {"urlSecretRef": {"name": "db"}, "schema": schema, "table": "outbox"},
            "broker": "Rabbitmq",
            "rabbitmq": {
                "url": format!("{scheme}://{}", rest.split('/').next().unwrap()),
                "managementUrl": common::env("RABBITMQ_MANAGEMENT_URL"),
                "authSecretRef": {"name": "rabbit"},
                "queues": [{"name": queue, "messageTtl": ttl, "deliveryLimit": 5, "settingsBy": "Policy"}]
            },
            "relay": {"replicas": 0},
            "deletionPolicy": "Delete"
        }
    }))
    .unwrap()
}

/// The policy's definition once it says `ttl_ms`.
async fn policy_says(name: &str, ttl_ms: u64) -> BTreeMap<String, Value> {
    common::wait_until(T, &format!("policy {name} with message-ttl {ttl_ms}"), || async move {
        let p = common::rabbitmq::admin().policy(name).await.unwrap()?;
        (p.definition.get("message-ttl") == Some(&json!(ttl_ms))).then_some(p.definition)
    })
    .await
}

#[tokio::test]
async fn queue_settings_by_policy_follow_the_spec_and_go_with_the_queue() {
    common::operator();
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::TestNamespace::new(&client, "obr-rabbit-policy").await;
    common::create_secret(&client, &ns.name, "db", &common::env("DATABASE_URL")).await;
    common::rabbitmq::create_secret(&client, &ns.name).await;
    let schema = ns.name.replace('-', "_");
    let queue = common::unique("billing");
    let policy = format!("lockstep.{queue}");
    let api: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns.name);
    api.create(&PostParams::default(), &relay(&schema, &queue, "1d")).await.unwrap();
    common::wait_condition(&api, "orders", "TopicsReady", "True", Some("TopicsConfigured"), T).await;

    // Declared with x-queue-type alone; the policy gives the rest, and applies.
    let admin = common::rabbitmq::admin();
    let q = admin.queue(&queue).await.unwrap().expect("the queue was declared");
    assert_eq!(q.arguments, BTreeMap::from([("x-queue-type".to_owned(), json!("quorum"))]));
    let p = admin.policy(&policy).await.unwrap().expect("the policy was set");
    assert_eq!((p.pattern, p.priority, p.apply_to.as_str()), (format!("^{queue}$"), 10, "queues"));
    assert_eq!(p.definition["delivery-limit"], json!(5));
    common::wait_until(T, "the policy in force on the queue", || async {
        let q = common::rabbitmq::admin().queue(&queue).await.unwrap()?;
        (q.policy_name.as_deref() == Some(policy.as_str()) && q.policy.get("message-ttl") == Some(&json!(86_400_000))).then_some(())
    })
    .await;

    // A longer TTL: the policy changes (an argument would be refused), the queue follows.
    let mut longer = api.get("orders").await.unwrap();
    longer.spec = relay(&schema, &queue, "2d").spec;
    let generation = api
        .replace("orders", &PostParams::default(), &longer)
        .await
        .unwrap()
        .metadata
        .generation;
    policy_says(&policy, 172_800_000).await;
    let c = common::wait_until(T, "TopicsReady of the new generation", || {
        let api = api.clone();
        async move {
            let got = api.get("orders").await.unwrap();
            let c = common::condition(&got.status?.conditions, "TopicsReady").clone();
            (c.observed_generation == generation).then_some(c)
        }
    })
    .await;
    assert_eq!(c.status, "True", "a longer TTL is no refusal with a policy: {c:?}");

    // Changed by hand: set back at the next reconcile.
    let mut by_hand = p.definition.clone();
    by_hand.insert("message-ttl".into(), json!(1000));
    admin.set_policy(&policy, &format!("^{queue}$"), 10, &by_hand).await.unwrap();
    common::touch(&api, "orders").await;
    policy_says(&policy, 172_800_000).await;

    // Delete: the queue and its policy go.
    api.delete("orders", &Default::default()).await.unwrap();
    common::wait_until(T, "the object gone", || {
        let api = api.clone();
        async move { api.get_opt("orders").await.unwrap().is_none().then_some(()) }
    })
    .await;
    assert!(admin.queue(&queue).await.unwrap().is_none(), "the queue was deleted");
    assert!(admin.policy(&policy).await.unwrap().is_none(), "the policy was deleted");
    ns.delete().await;
}
