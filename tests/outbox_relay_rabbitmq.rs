//! An OutboxRelay with `broker: Rabbitmq` and an InboxTable reading its queue, against the real
//! API server, PostgreSQL and rabbitmq-server (its management plugin): the exchange, a quorum
//! queue with its arguments, bindings and dead-letter exchange declared to the spec; a changed
//! argument refused with what to do; drift reported; the relay pod told to publish to RabbitMQ;
//! DedupCovered from the queue's message TTL and the queue's ready + unacked count as lag.

mod common;

use std::time::Duration;

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Secret};
use kube::api::{Api, PostParams};
use lockstep::{
    clients::rabbitmq_admin::RabbitAdmin,
    crd::{InboxTable, OutboxRelay},
};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

use common::rabbitmq::password;

fn admin() -> RabbitAdmin {
    common::rabbitmq::admin()
}

/// The server part of AMQP_URL (the spec takes the vhost apart).
fn amqp_server() -> String {
    let url = common::env("AMQP_URL");
    let (scheme, rest) = url.split_once("://").unwrap();
    format!("{scheme}://{}", rest.split('/').next().unwrap())
}

/// Publish `n` messages to `exchange` by `key` through the management API (plain HTTP).
async fn publish(exchange: &str, key: &str, n: usize) {
    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = common::env("RABBITMQ_MANAGEMENT_URL").trim_start_matches("http://").to_owned();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", common::env("AMQP_USER"), password()));
    for i in 0..n {
        let body =
            json!({"properties": {"delivery_mode": 2}, "routing_key": key, "payload": format!("m{i}"), "payload_encoding": "string"})
                .to_string();
        let req = format!(
            "POST /api/exchanges/%2F/{exchange}/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.contains("\"routed\":true"), "{out}");
    }
}

fn relay(schema: &str, exchange: &str, queue: &str, ttl: &str, ignore: &[&str]) -> OutboxRelay {
    serde_json::from_value(json!({
        "apiVersion": "lockstep.dev/v1alpha1", "kind": "OutboxRelay", "metadata": {"name": "orders"},
        "spec": {
            "database": {"urlSecretRef": {"name": "db"}, "schema": schema, "table": "outbox"},
            "broker": "Rabbitmq",
            "rabbitmq": {
                "url": amqp_server(), "managementUrl": common::env("RABBITMQ_MANAGEMENT_URL"),
                "authSecretRef": {"name": "rabbit"},
                "exchange": {"name": exchange},
                "queues": [{"name": queue, "bindings": ["order.#"], "messageTtl": ttl, "deliveryLimit": 5,
                            "deadLetterExchange": format!("{exchange}.dlx"), "deadLetterQueue": format!("{queue}.dead"),
                            "ignore": ignore}]
            },
            "routing": {"topic": "{aggregatetype}.{type}"},
            "relay": {"replicas": 0}
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn a_rabbitmq_relay_gets_its_topology_to_the_spec_and_an_inbox_its_coverage_and_lag() {
    common::operator();
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::TestNamespace::new(&client, "obr-rabbit").await;
    common::create_secret(&client, &ns.name, "db", &common::env("DATABASE_URL")).await;
    common::rabbitmq::create_secret(&client, &ns.name).await;
    let schema = ns.name.replace('-', "_");
    let (exchange, queue) = (common::unique("outbox"), common::unique("billing"));
    let api: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns.name);
    api.create(&PostParams::default(), &relay(&schema, &exchange, &queue, "1d", &[]))
        .await
        .unwrap();
    let got = common::wait_condition(&api, "orders", "Ready", "True", None, T).await;
    let st = got.status.unwrap();
    assert_eq!(common::condition(&st.conditions, "TopicsReady").reason, "TopicsConfigured");
    let names: Vec<(&str, bool)> = st.topics.iter().map(|t| (t.name.as_str(), t.ready)).collect();
    assert_eq!(
        names,
        [
            (format!("exchange/{exchange}").as_str(), true),
            (format!("queue/{queue}").as_str(), true)
        ]
    );
    assert!(st.guarantees[1].guarantee.contains("publisher confirm"), "{:?}", st.guarantees);
    assert!(st.guarantees[2].guarantee.contains("at most 5 deliveries"), "{:?}", st.guarantees);

    // Declared as asked: a durable topic exchange, a quorum queue with its arguments, bound; the
    // dead-letter exchange with its queue.
    let a = admin();
    let x = a.exchange(&exchange).await.unwrap().expect("the exchange was declared");
    assert_eq!((x.type_.as_str(), x.durable), ("topic", true));
    let q = a.queue(&queue).await.unwrap().expect("the queue was declared");
    assert_eq!((q.type_.as_str(), q.durable), ("quorum", true));
    assert_eq!(q.arguments["x-message-ttl"], json!(86_400_000));
    assert_eq!(q.arguments["x-delivery-limit"], json!(5));
    assert_eq!(q.arguments["x-dead-letter-exchange"], json!(format!("{exchange}.dlx")));
    assert_eq!(a.bindings(&exchange, &queue).await.unwrap(), ["order.#"]);
    assert_eq!(
        a.bindings(&format!("{exchange}.dlx"), &format!("{queue}.dead")).await.unwrap(),
        [""]
    );

    // The relay pod publishes to RabbitMQ, with the Secret as a directory.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let pod = deployments.get("orders-relay").await.unwrap().spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap();
    for want in [
        "--broker=rabbitmq".to_owned(),
        format!("--amqp-url={}/%2F", amqp_server()),
        format!("--amqp-exchange={exchange}"),
    ] {
        assert!(args.contains(&want), "{want} not in {args:?}");
    }
    assert!(!args.iter().any(|a| a.starts_with("--bootstrap-servers")), "{args:?}");
    assert!(c.env.iter().flatten().any(|e| e.name == "AMQP_SECRET_DIR"), "{:?}", c.env);

    // A change of the RabbitMQ Secret rolls the relay (the pod template's Secret hash).
    let hash = |d: Deployment| d.spec.unwrap().template.metadata.unwrap().annotations.unwrap()["lockstep.dev/secret-hash"].clone();
    let before = hash(deployments.get("orders-relay").await.unwrap());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let mut s = secrets.get("rabbit").await.unwrap();
    s.string_data = Some([("password".to_owned(), password())].into());
    s.metadata.annotations = Some([("rotated".to_owned(), "yes".to_owned())].into());
    secrets.replace("rabbit", &PostParams::default(), &s).await.unwrap();
    common::wait_until(T, "a new Secret hash", || {
        let (api, deployments, before) = (api.clone(), deployments.clone(), before.clone());
        async move {
            common::touch(&api, "orders").await;
            (hash(deployments.get("orders-relay").await.unwrap()) != before).then_some(())
        }
    })
    .await;

    // Bindings changed outside lockstep: the extra one reported and left, the missing one added
    // back. One change at a time: reconciles still running from the rotation may see either
    // first, and "missing -> added" lasts in the condition only until the next reconcile (the
    // Event stays).
    a.bind(&exchange, &queue, "invoice.*").await.unwrap();
    common::touch(&api, "orders").await;
    let extra = "binding \"invoice.*\": not in the spec, left in place";
    let drift_says = |api: Api<OutboxRelay>, want: &'static str| async move {
        let got = api.get("orders").await.unwrap();
        let c = common::condition(&got.status.unwrap().conditions, "TopicsReady").clone();
        (c.reason == "TopicConfigDrift" && c.message.contains(want)).then_some(())
    };
    common::wait_until(T, "the extra binding reported", || drift_says(api.clone(), extra)).await;
    a.unbind(&exchange, &queue, "order.#").await.unwrap();
    common::touch(&api, "orders").await;
    common::wait_until(T, "the missing binding added back", || {
        let (a, exchange, queue) = (admin(), exchange.clone(), queue.clone());
        async move {
            let mut keys = a.bindings(&exchange, &queue).await.unwrap();
            keys.sort();
            (keys == ["invoice.*", "order.#"]).then_some(())
        }
    })
    .await;
    let added = "binding \"order.#\": missing -> added";
    let e = common::wait_event(&client, &ns.name, "TopicConfigDrift", added, T).await;
    assert!(
        e.message.unwrap_or_default().contains(extra),
        "the extra one in the same reconcile's Event"
    );
    drift_says(api.clone(), extra).await.expect("the extra binding still reported");
    a.unbind(&exchange, &queue, "invoice.*").await.unwrap();

    // A longer TTL on the existing queue: refused with what to do, the queue untouched; ignoring
    // the setting (a policy's to give) makes it ready again.
    let mut longer = api.get("orders").await.unwrap();
    longer.spec = relay(&schema, &exchange, &queue, "2d", &[]).spec;
    api.replace("orders", &PostParams::default(), &longer).await.unwrap();
    let got = common::wait_condition(&api, "orders", "TopicsReady", "False", Some("QueueChangeRefused"), T).await;
    let msg = common::condition(&got.status.unwrap().conditions, "TopicsReady").message.clone();
    assert!(
        msg.contains(&format!("queue {queue} messageTtl (x-message-ttl): 86400000 -> 172800000")),
        "{msg}"
    );
    assert!(msg.contains("cannot change a queue's arguments") && msg.contains("ignore"), "{msg}");
    assert_eq!(
        a.queue(&queue).await.unwrap().unwrap().arguments["x-message-ttl"],
        json!(86_400_000)
    );
    let mut ignoring = api.get("orders").await.unwrap();
    ignoring.spec = relay(&schema, &exchange, &queue, "2d", &["messageTtl"]).spec;
    api.replace("orders", &PostParams::default(), &ignoring).await.unwrap();
    common::wait_condition(&api, "orders", "TopicsReady", "True", Some("TopicsConfigured"), T).await;

    inbox_of_the_queue(&client, &ns.name, &schema, &exchange, &queue).await;
    for (kind, name) in [
        ("queues", queue.clone()),
        ("queues", format!("{queue}.dead")),
        ("exchanges", exchange.clone()),
        ("exchanges", format!("{exchange}.dlx")),
    ] {
        a.delete(kind, &name).await.unwrap();
    }
    ns.delete().await;
}

/// An inbox of the queue: 12h does not outlive the queue's day of TTL, 2d does; three messages
/// waiting are its lag.
async fn inbox_of_the_queue(client: &kube::Client, ns: &str, schema: &str, exchange: &str, queue: &str) {
    publish(exchange, "order.created", 3).await;
    let inboxes: Api<InboxTable> = Api::namespaced(client.clone(), ns);
    let inbox: InboxTable = serde_json::from_value(json!({
        "apiVersion": "lockstep.dev/v1alpha1", "kind": "InboxTable", "metadata": {"name": "billing"},
        "spec": {
            "database": {"urlSecretRef": {"name": "db"}, "schema": schema, "table": "inbox"},
            "retention": "12h",
            "sources": {"rabbitmq": {"managementUrl": common::env("RABBITMQ_MANAGEMENT_URL"), "authSecretRef": {"name": "rabbit"}, "queues": [queue]}}
        }
    }))
    .unwrap();
    inboxes.create(&PostParams::default(), &inbox).await.unwrap();
    let got = common::wait_condition(
        &inboxes,
        "billing",
        "DedupCovered",
        "False",
        Some("RetentionBelowTopicRetention"),
        T,
    )
    .await;
    let st = got.status.unwrap();
    let msg = &common::condition(&st.conditions, "DedupCovered").message;
    assert!(msg.contains(&format!("queue {queue} x-message-ttl=1d")), "{msg}");
    assert!(st.guarantees[0].guarantee.contains("x-delivery-limit"), "{:?}", st.guarantees);
    let lag = common::wait_until(T, "the queue's 3 messages as lag", || {
        let inboxes = inboxes.clone();
        async move {
            common::touch(&inboxes, "billing").await;
            let l = inboxes.get("billing").await.unwrap().status?.consumer_lag?;
            (l.messages == 3).then_some(l)
        }
    })
    .await;
    assert_eq!((lag.group.as_str(), lag.topics[0].topic.as_str()), (queue, queue));
    let mut bigger = inboxes.get("billing").await.unwrap();
    bigger.spec.retention = Some(lockstep::core::duration::Duration::new("2d"));
    inboxes.replace("billing", &PostParams::default(), &bigger).await.unwrap();
    common::wait_condition(&inboxes, "billing", "DedupCovered", "True", Some("RetentionCoversRedelivery"), T).await;
}

fn sharing_relay(schema: &str, host: &str, exchange: &str, queue: &str, stream: &str, ttl: &str) -> OutboxRelay {
    let url = amqp_server().replace("127.0.0.1", host);
    let management = common::env("RABBITMQ_MANAGEMENT_URL").replace("127.0.0.1", host);
    serde_json::from_value(json!({
        "apiVersion": "lockstep.dev/v1alpha1", "kind": "OutboxRelay", "metadata": {"name": "orders"},
        "spec": {
            "database": {"urlSecretRef": {"name": "db"}, "schema": schema, "table": "outbox"},
            "broker": "Rabbitmq",
            "rabbitmq": {
                "url": url, "managementUrl": management, "authSecretRef": {"name": "rabbit"},
                "exchange": {"name": exchange, "type": "Direct"},
                "queues": [{"name": queue, "bindings": ["created"], "messageTtl": ttl},
                           {"name": stream, "type": "Stream", "bindings": ["created"], "maxAge": "7d"}]
            },
            "relay": {"replicas": 0},
            "deletionPolicy": "Delete"
        }
    }))
    .unwrap()
}

/// Two OutboxRelays naming one exchange and queues, the second through another address of the
/// same server (`localhost`: the management API's cluster name tells): the second reports
/// ResourceConflict naming the first and changes nothing; its Delete cleanup keeps them with their
/// messages; the first's, alone in naming them, deletes them. A Stream queue is declared with its
/// x-max-age on the way.
#[tokio::test]
async fn a_second_relay_naming_managed_queues_conflicts_and_never_alters_nor_deletes_them() {
    common::operator();
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let mut spaces = Vec::new();
    let mut apis = Vec::new();
    for prefix in ["obr-rabbit-a", "obr-rabbit-b"] {
        let ns = common::TestNamespace::new(&client, prefix).await;
        common::create_secret(&client, &ns.name, "db", &common::env("DATABASE_URL")).await;
        common::rabbitmq::create_secret(&client, &ns.name).await;
        apis.push(Api::<OutboxRelay>::namespaced(client.clone(), &ns.name));
        spaces.push(ns);
    }
    let (a, b) = (&apis[0], &apis[1]);
    let (exchange, queue, stream) = (common::unique("shared"), common::unique("orders"), common::unique("audit"));
    let schema = |i: usize| spaces[i].name.replace('-', "_");
    a.create(
        &PostParams::default(),
        &sharing_relay(&schema(0), "127.0.0.1", &exchange, &queue, &stream, "7d"),
    )
    .await
    .unwrap();
    common::wait_condition(a, "orders", "TopicsReady", "True", Some("TopicsConfigured"), T).await;
    let admin = admin();
    let s = admin.queue(&stream).await.unwrap().expect("the stream queue was declared");
    assert_eq!((s.type_.as_str(), &s.arguments["x-max-age"]), ("stream", &json!("7D")));
    b.create(
        &PostParams::default(),
        &sharing_relay(&schema(1), "localhost", &exchange, &queue, &stream, "1h"),
    )
    .await
    .unwrap();
    let got = common::wait_condition(b, "orders", "TopicsReady", "False", Some("ResourceConflict"), T).await;
    let st = got.status.unwrap();
    let holder = format!("OutboxRelay {}/orders", spaces[0].name);
    let msg = &common::condition(&st.conditions, "TopicsReady").message;
    assert!(msg.contains(&format!("queue/{queue} is managed by {holder}")), "{msg}");
    assert!(
        st.topics.iter().all(|t| t.managed_by.as_deref() == Some(holder.as_str())),
        "{:?}",
        st.topics
    );
    common::touch(a, "orders").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ready = a.get("orders").await.unwrap().status.unwrap();
    assert_eq!(common::condition(&ready.conditions, "TopicsReady").status, "True", "A keeps them");
    publish(&exchange, "created", 1).await;

    let gone = |api: Api<OutboxRelay>| async move {
        api.delete("orders", &Default::default()).await.unwrap();
        common::wait_until(T, "deleted", || {
            let api = api.clone();
            async move { api.get_opt("orders").await.unwrap().is_none().then_some(()) }
        })
        .await;
    };
    // A's Secret gone, A's server cannot say who it is: B's cleanup must not take it for another
    // server (their addresses differ) and delete what A manages.
    let a_secrets: Api<Secret> = Api::namespaced(client.clone(), &spaces[0].name);
    a_secrets.delete("rabbit", &Default::default()).await.unwrap();
    gone(b.clone()).await;
    common::rabbitmq::create_secret(&client, &spaces[0].name).await;
    let kept = admin.queue(&queue).await.unwrap().expect("the queue survives B's cleanup");
    assert_eq!(kept.arguments["x-message-ttl"], json!(604_800_000u64), "as A declared it");
    common::wait_until(T, "the message counted", || async {
        (admin.queue(&queue).await.unwrap()?.ready == 1).then_some(())
    })
    .await;
    gone(a.clone()).await;
    assert!(admin.queue(&queue).await.unwrap().is_none(), "A, alone in naming it, deletes it");
    assert!(admin.queue(&stream).await.unwrap().is_none());
    assert!(admin.exchange(&exchange).await.unwrap().is_none());
    for ns in spaces {
        ns.delete().await;
    }
}

/// The relay run as its pod would (the Deployment's args, the Secrets as files) publishes the
/// outbox to the exchange the operator declared, and the bound queue receives every event.
#[tokio::test]
async fn the_relay_as_its_pod_runs_it_fills_the_declared_queue() {
    common::operator();
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::TestNamespace::new(&client, "obr-rabbit-run").await;
    let url = common::env("DATABASE_URL");
    common::create_secret(&client, &ns.name, "db", &url).await;
    common::rabbitmq::create_secret(&client, &ns.name).await;
    let schema = ns.name.replace('-', "_");
    let (exchange, queue) = (common::unique("outbox"), common::unique("billing"));
    let api: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns.name);
    let mut obr = relay(&schema, &exchange, &queue, "1d", &[]);
    obr.spec.relay.replicas = 1;
    api.create(&PostParams::default(), &obr).await.unwrap();
    common::wait_condition(&api, "orders", "TopicsReady", "True", None, T).await;
    common::wait_condition(&api, "orders", "SchemaReady", "True", None, T).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let pod = deployments.get("orders-relay").await.unwrap().spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];

    // The Secrets as the kubelet would mount them, the environment pointed at them.
    let dir = std::path::PathBuf::from(common::env("LOCKSTEP_TESTENV_DIR")).join(format!("{}-secret", ns.name));
    std::fs::create_dir_all(dir.join("rabbitmq")).unwrap();
    std::fs::write(dir.join("url"), &url).unwrap();
    std::fs::write(dir.join("rabbitmq/user"), common::env("AMQP_USER")).unwrap();
    std::fs::write(dir.join("rabbitmq/password"), password()).unwrap();
    let args: Vec<String> = c
        .args
        .clone()
        .unwrap()
        .into_iter()
        .map(|a| {
            if a.starts_with("--metrics-addr=") {
                "--metrics-addr=127.0.0.1:0".into()
            } else {
                a
            }
        })
        .collect();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_lockstep"));
    cmd.args(&args)
        .env_clear()
        .stderr(std::fs::File::create(dir.join("relay.log")).unwrap());
    for e in c.env.iter().flatten() {
        let value = match e.name.as_str() {
            "DATABASE_URL_FILE" => dir.join("url"),
            "AMQP_SECRET_DIR" => dir.join("rabbitmq"),
            other => panic!("unexpected variable {other}"),
        };
        cmd.env(&e.name, value);
    }
    let mut relay = cmd.spawn().unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(&format!(
        "insert into \"{schema}\".outbox (id, aggregatetype, aggregateid, type, payload)
         select gen_random_uuid(), 'order', 'k-' || (g % 5), 'created', '{{}}' from generate_series(1, 20) g"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let a = admin();
    let arrived = common::wait_until(T, "20 events in the queue", || {
        let (a, queue) = (&a, &queue);
        async move { a.queue(queue).await.unwrap().filter(|q| q.ready == 20) }
    })
    .await;
    let _ = relay.kill();
    let _ = relay.wait();
    let left: i64 = sqlx::query_scalar(&format!("select count(*) from \"{schema}\".outbox"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        (left, arrived.unacked),
        (0, 0),
        "every row published and removed; log in {}",
        dir.display()
    );
    for (kind, name) in [
        ("queues", queue.clone()),
        ("queues", format!("{queue}.dead")),
        ("exchanges", exchange.clone()),
        ("exchanges", format!("{exchange}.dlx")),
    ] {
        a.delete(kind, &name).await.unwrap();
    }
    ns.delete().await;
}
