//! The generated CRDs on a real kube-apiserver: they install and become Established, every example
//! is accepted and reads back with the schema's defaults filled in, and `kubectl get` shows the
//! printer columns.

mod common;

use std::path::Path;

use kube::{
    api::{Api, PostParams},
    Client, Resource,
};
use lockstep::crd::{DedupPolicy, InboxTable, OutboxRelay};
use serde::{de::DeserializeOwned, Serialize};

fn example<K: DeserializeOwned>(file: &str) -> K {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Column names the server reports for `kubectl get <plural>` (the Table format).
async fn printer_columns(client: &Client, path: &str) -> Vec<String> {
    let req = http::Request::get(path)
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())
        .unwrap();
    let table: serde_json::Value = client.request(req).await.expect("table request");
    table["columnDefinitions"]
        .as_array()
        .expect("columnDefinitions")
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

async fn create_and_read_back<K>(api: Api<K>, mut obj: K) -> K
where
    K: Resource + Clone + std::fmt::Debug + Serialize + DeserializeOwned,
{
    let name = common::unique("example");
    obj.meta_mut().name = Some(name.clone());
    api.create(&PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
    api.get(&name).await.unwrap_or_else(|e| panic!("get {name}: {e}"))
}

#[tokio::test]
async fn examples_are_accepted_and_read_back() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::TestNamespace::new(&client, "examples").await;

    let relay: OutboxRelay = example("outboxrelay.yaml");
    relay.spec.validate().expect("example OutboxRelay is valid");
    let got = create_and_read_back(Api::namespaced(client.clone(), &ns.name), relay.clone()).await;
    assert_eq!(got.spec, relay.spec);
    assert_eq!(got.spec.relay.cleanup, lockstep::crd::Cleanup::Delete, "default from the schema");

    let inbox: InboxTable = example("inboxtable.yaml");
    inbox.spec.validate().expect("example InboxTable is valid");
    let got = create_and_read_back(Api::namespaced(client.clone(), &ns.name), inbox.clone()).await;
    assert_eq!(got.spec, inbox.spec);
    assert_eq!(got.spec.database.url_secret_ref.key, "url", "the server applied the schema default");

    let relay: OutboxRelay = example("outboxrelay-rabbitmq.yaml");
    relay.spec.validate().expect("example RabbitMQ OutboxRelay is valid");
    let got = create_and_read_back(Api::namespaced(client.clone(), &ns.name), relay.clone()).await;
    assert_eq!(got.spec, relay.spec, "the server's defaults are the Rust types'");
    let inbox: InboxTable = example("inboxtable-rabbitmq.yaml");
    inbox.spec.validate().expect("example RabbitMQ InboxTable is valid");
    let got = create_and_read_back(Api::namespaced(client.clone(), &ns.name), inbox.clone()).await;
    assert_eq!(got.spec, inbox.spec);

    let policy: DedupPolicy = example("deduppolicy.yaml");
    policy.spec.validate().expect("example DedupPolicy is valid");
    let policies: Api<DedupPolicy> = Api::all(client.clone());
    let got = create_and_read_back(policies.clone(), policy.clone()).await;
    assert_eq!(got.spec, policy.spec);
    // Cluster-scoped: remove it so no other test sees it.
    policies
        .delete(&got.metadata.name.clone().unwrap(), &Default::default())
        .await
        .unwrap();

    // Defaults the API server fills in for a minimal spec are the ones the Rust types use.
    let minimal: OutboxRelay = serde_json::from_value(serde_json::json!({
        "apiVersion": "lockstep.dev/v1alpha1", "kind": "OutboxRelay", "metadata": {"name": "minimal"},
        "spec": {"database": {"urlSecretRef": {"name": "db"}, "table": "outbox"}, "kafka": {"bootstrapServers": "k:9092"}}
    }))
    .unwrap();
    let got = create_and_read_back(Api::<OutboxRelay>::namespaced(client.clone(), &ns.name), minimal.clone()).await;
    assert_eq!(got.spec, minimal.spec, "server defaults agree with serde defaults");

    let cols = printer_columns(&client, &format!("/apis/lockstep.dev/v1alpha1/namespaces/{}/outboxrelays", ns.name)).await;
    for c in ["Name", "Ready", "Reason", "Table", "Pending", "Oldest", "Age"] {
        assert!(cols.iter().any(|x| x == c), "kubectl get outboxrelays lacks column {c}: {cols:?}");
    }
    let cols = printer_columns(&client, &format!("/apis/lockstep.dev/v1alpha1/namespaces/{}/inboxtables", ns.name)).await;
    for c in ["Ready", "Retention", "Rows"] {
        assert!(cols.iter().any(|x| x == c), "kubectl get inboxtables lacks column {c}: {cols:?}");
    }
    ns.delete().await;
}
