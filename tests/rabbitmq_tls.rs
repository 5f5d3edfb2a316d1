//! The operator reaches a RabbitMQ management API over HTTPS with the CA of the Secret's
//! `ca.crt`, against a private rabbitmq-server whose management plugin listens with TLS only
//! (a certificate of a test CA): the topology is declared; without `ca.crt` the server's
//! certificate is not trusted and TopicsReady says so.

mod common;

use std::time::Duration;

use common::rabbitmq::{PrivateRabbit, PASSWORD, USER};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use lockstep::{
    clients::rabbitmq_admin::{ManagementSettings, RabbitAdmin},
    core::redacted::Redacted,
    crd::OutboxRelay,
};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn relay(schema: &str, amqp: &str, management: &str, secret: &str, queue: &str) -> OutboxRelay {
    serde_json::from_value(json!({
        "apiVersion": "lockstep.dev/v1alpha1", "kind": "OutboxRelay", "metadata": {"name": secret},
        "spec": {
            "database": {"urlSecretRef": {"name": "db"}, "schema": schema, "table": format!("outbox_{}", secret.replace('-', "_"))},
            "broker": "Rabbitmq",
            "rabbitmq": {"url": amqp, "managementUrl": management, "authSecretRef": {"name": secret},
                         "queues": [{"name": queue}]},
            "relay": {"replicas": 0}
        }
    }))
    .unwrap()
}

async fn secret(client: &kube::Client, ns: &str, name: &str, ca: Option<String>) {
    let mut data = json!({"user": USER, "password": PASSWORD});
    if let Some(ca) = ca {
        data["ca.crt"] = json!(ca);
    }
    let s: Secret = serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data})).unwrap();
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &s)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_management_api_over_https_is_trusted_by_the_secrets_ca_only() {
    let (https, http) = (free_port(), free_port());
    let extra = format!(
        "management.ssl.port = {https}\nmanagement.ssl.ip = 127.0.0.1\nmanagement.ssl.cacertfile = {{dir}}/ca.pem\n\
         management.ssl.certfile = {{dir}}/server.pem\nmanagement.ssl.keyfile = {{dir}}/server.key\n\
         management.tcp.port = {http}\nmanagement.tcp.ip = 127.0.0.1"
    );
    let node = PrivateRabbit::start_configured(&extra, &|dir| {
        common::tls::make_certs(dir, "lockstep-rabbit-test-ca");
        std::fs::write(dir.join("enabled_plugins"), "[rabbitmq_management].\n").unwrap();
    });
    common::wait_until(T, "the management API over TLS", || async {
        std::net::TcpStream::connect(("127.0.0.1", https)).ok().map(drop)
    })
    .await;
    let ca = std::fs::read_to_string(node.dir().join("ca.pem")).unwrap();
    let (amqp, management) = (format!("amqp://127.0.0.1:{}", node.port), format!("https://127.0.0.1:{https}"));

    common::operator();
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::TestNamespace::new(&client, "obr-rabbit-tls").await;
    common::create_secret(&client, &ns.name, "db", &common::env("DATABASE_URL")).await;
    secret(&client, &ns.name, "trusting", Some(ca.clone())).await;
    secret(&client, &ns.name, "untrusting", None).await;
    let schema = ns.name.replace('-', "_");
    let api: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns.name);
    for name in ["trusting", "untrusting"] {
        let queue = format!("{name}-queue");
        api.create(&PostParams::default(), &relay(&schema, &amqp, &management, name, &queue))
            .await
            .unwrap();
    }
    common::wait_condition(&api, "trusting", "TopicsReady", "True", Some("TopicsConfigured"), T).await;
    let got = common::wait_condition(&api, "untrusting", "TopicsReady", "False", Some("BrokerUnreachable"), T).await;
    let msg = common::condition(&got.status.unwrap().conditions, "TopicsReady").message.clone();
    assert!(msg.contains("certificate") && !msg.contains(PASSWORD), "{msg}");

    let admin = RabbitAdmin::new(&ManagementSettings {
        url: management,
        vhost: "/".into(),
        auth: Some((USER.into(), Redacted::new(PASSWORD))),
        tls_ca: Some(ca),
    })
    .unwrap();
    let q = admin.queue("trusting-queue").await.unwrap().expect("declared over HTTPS");
    assert_eq!(q.type_, "quorum");
    assert!(admin.queue("untrusting-queue").await.unwrap().is_none());
    ns.delete().await;
    drop(node);
}
