//! The OutboxRelay controller (tables and topics) and DedupCovered, against the real API server,
//! PostgreSQL and Kafka-protocol broker.

mod common;

use std::time::Duration;

use kube::{
    api::{Api, Patch, PatchParams, PostParams},
    Client,
};
use lockstep::{
    clients::kafka::Admin,
    crd::{InboxTable, OutboxRelay},
};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

fn relay(name: &str, schema: &str, bootstrap: &str, topics: serde_json::Value) -> OutboxRelay {
    serde_json::from_value(json!({
        "apiVersion": "lockstep.dev/v1alpha1", "kind": "OutboxRelay", "metadata": {"name": name},
        "spec": {
            "database": {"urlSecretRef": {"name": "db"}, "schema": schema, "table": "outbox"},
            "kafka": {"bootstrapServers": bootstrap},
            "topics": topics,
            // No relay pods unless a test asks (the test cluster has no node to run them).
            "relay": {"replicas": 0}
        }
    }))
    .unwrap()
}

async fn setup(prefix: &str) -> (Client, common::TestNamespace, Api<OutboxRelay>, String) {
    common::operator();
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::TestNamespace::new(&client, prefix).await;
    common::create_secret(&client, &ns.name, "db", &common::env("DATABASE_URL")).await;
    let api = Api::namespaced(client.clone(), &ns.name);
    let schema = ns.name.replace('-', "_");
    (client, ns, api, schema)
}

fn admin(bootstrap: &str) -> Admin {
    Admin::new(bootstrap, &Default::default(), Duration::from_secs(10)).unwrap()
}

#[tokio::test]
async fn creates_tables_and_topics_then_restores_drift_but_not_ignored_keys() {
    let (client, ns, api, schema) = setup("obr-topics").await;
    let bootstrap = common::kafka_bootstrap();
    let topic = common::unique("orders.events");
    let spec_topics = json!([{"name": topic, "partitions": 3, "replicationFactor": 1,
        "config": {"retention.ms": "604800000", "cleanup.policy": "delete"}, "ignoreConfig": ["segment.bytes"]}]);
    api.create(&PostParams::default(), &relay("orders", &schema, &bootstrap, spec_topics))
        .await
        .unwrap();
    let obj = common::wait_condition(&api, "orders", "Ready", "True", None, T).await;
    let st = obj.status.unwrap();
    assert_eq!(st.topics[0].partitions, Some(3));
    assert!(st.topics[0].ready);
    assert_eq!(st.guarantees.len(), 3);
    assert_eq!(common::condition(&st.conditions, "PrerequisitesMet").reason, "PrerequisitesMet");

    // The tables exist.
    let pool = sqlx::PgPool::connect(&common::env("DATABASE_URL")).await.unwrap();
    let tables: Vec<String> =
        sqlx::query_scalar("select table_name::text from information_schema.tables where table_schema = $1 order by 1")
            .bind(&schema)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        tables,
        ["lockstep_owners", "lockstep_schema_history", "outbox", "outbox_dead_letter"]
    );

    // The topic, as asked.
    let a = admin(&bootstrap);
    let d = a.describe(std::slice::from_ref(&topic)).await.unwrap();
    assert_eq!(d[&topic].partitions, 3);
    assert_eq!(d[&topic].config.get("retention.ms").map(String::as_str), Some("604800000"));
    assert_eq!(d[&topic].config.get("cleanup.policy").map(String::as_str), Some("delete"));

    // Someone changes a managed key and an ignored one behind lockstep's back.
    a.alter_configs(
        &topic,
        &[("retention.ms".into(), "1000".into()), ("segment.bytes".into(), "2097152".into())],
    )
    .await
    .unwrap();
    common::touch(&api, "orders").await;
    // The reconcile that restores it says so in TopicsReady and status.topics[].drift until the
    // next one, and in an Event that stays (a poll may miss the first).
    common::wait_event(&client, &ns.name, "TopicConfigDrift", "retention.ms: 1000 -> 604800000", T).await;
    let d = a.describe(std::slice::from_ref(&topic)).await.unwrap();
    assert_eq!(
        d[&topic].config.get("retention.ms").map(String::as_str),
        Some("604800000"),
        "restored"
    );
    assert_eq!(
        d[&topic].config.get("segment.bytes").map(String::as_str),
        Some("2097152"),
        "an ignored key is left as set"
    );
    common::touch(&api, "orders").await;
    let obj = common::wait_condition(&api, "orders", "TopicsReady", "True", Some("TopicsConfigured"), T).await;
    assert!(obj.status.unwrap().topics[0].drift.is_empty(), "drift cleared");
    ns.delete().await;
}

#[tokio::test]
async fn a_partition_decrease_is_refused_and_nothing_changes() {
    let (_c, ns, api, schema) = setup("obr-partitions").await;
    let bootstrap = common::kafka_bootstrap();
    let topic = common::unique("orders.p");
    api.create(
        &PostParams::default(),
        &relay(
            "r",
            &schema,
            &bootstrap,
            json!([{"name": topic, "partitions": 4, "replicationFactor": 1}]),
        ),
    )
    .await
    .unwrap();
    common::wait_condition(&api, "r", "Ready", "True", None, T).await;
    let patch = json!({"spec": {"topics": [{"name": topic, "partitions": 2, "replicationFactor": 1}]}});
    api.patch("r", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let obj = common::wait_condition(&api, "r", "TopicsReady", "False", Some("PartitionChangeRefused"), T).await;
    let st = obj.status.unwrap();
    let msg = &common::condition(&st.conditions, "TopicsReady").message;
    assert!(msg.contains("has 4 partitions, spec asks for 2"), "{msg}");
    assert!(!st.topics[0].ready);
    assert_eq!(common::condition(&st.conditions, "Ready").reason, "PartitionChangeRefused");
    assert_eq!(
        admin(&bootstrap).describe(std::slice::from_ref(&topic)).await.unwrap()[&topic].partitions,
        4
    );
    // An increase on a keyed topic is refused too, unless allowed.
    let patch = json!({"spec": {"topics": [{"name": topic, "partitions": 6, "replicationFactor": 1}]}});
    api.patch("r", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    common::wait_until(T, "increase refused", || {
        let api = api.clone();
        async move {
            let st = api.get("r").await.ok()?.status?;
            let c = common::condition(&st.conditions, "TopicsReady");
            (c.status == "False" && c.reason == "PartitionChangeRefused" && c.message.contains("allowPartitionIncrease")).then_some(())
        }
    })
    .await;
    assert_eq!(
        admin(&bootstrap).describe(std::slice::from_ref(&topic)).await.unwrap()[&topic].partitions,
        4
    );
    ns.delete().await;
}

#[tokio::test]
async fn a_broker_outage_is_reported_and_heals() {
    let (_c, ns, api, schema) = setup("obr-broker").await;
    let mut broker = common::PrivateBroker::start();
    let topic = common::unique("orders.b");
    api.create(
        &PostParams::default(),
        &relay(
            "r",
            &schema,
            &broker.bootstrap(),
            json!([{"name": topic, "partitions": 1, "replicationFactor": 1}]),
        ),
    )
    .await
    .unwrap();
    common::wait_condition(&api, "r", "Ready", "True", None, T).await;
    broker.stop();
    common::touch(&api, "r").await;
    let obj = common::wait_condition(&api, "r", "TopicsReady", "False", Some("BrokerUnreachable"), T).await;
    assert!(common::condition(&obj.status.unwrap().conditions, "TopicsReady")
        .message
        .contains(&broker.bootstrap()));
    broker.start_again();
    common::wait_condition(&api, "r", "Ready", "True", None, T).await;
    ns.delete().await;
}

#[tokio::test]
async fn weakening_producer_settings_are_rejected() {
    let (_c, ns, api, schema) = setup("obr-producer").await;
    let mut r = relay("weak", &schema, &common::kafka_bootstrap(), json!([]));
    r.spec.kafka.as_mut().unwrap().producer.config.insert("acks".into(), "1".into());
    api.create(&PostParams::default(), &r).await.unwrap();
    let obj = common::wait_condition(&api, "weak", "Ready", "False", Some("InvalidSpec"), T).await;
    let msg = common::condition(&obj.status.unwrap().conditions, "Ready").message.clone();
    assert!(
        msg.contains("spec.kafka.producer.config[acks]") && msg.contains("acks=1 would weaken delivery"),
        "{msg}"
    );
    ns.delete().await;
}

#[tokio::test]
async fn dedup_covered_compares_inbox_retention_with_topic_retention() {
    let (client, ns, _api, schema) = setup("ibt-covered").await;
    let bootstrap = common::kafka_bootstrap();
    let topic = common::unique("orders.c");
    let config = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    admin(&bootstrap)
        .create_topic(&topic, 1, 1, &config(&[("retention.ms", "604800000"), ("segment.ms", "86400000")]))
        .await
        .unwrap();
    let inboxes: Api<InboxTable> = Api::namespaced(client.clone(), &ns.name);
    let ibt: InboxTable = serde_json::from_value(json!({
        "apiVersion": "lockstep.dev/v1alpha1", "kind": "InboxTable", "metadata": {"name": "billing"},
        "spec": {"database": {"urlSecretRef": {"name": "db"}, "schema": schema, "table": "inbox"}, "retention": "1d",
                 "sources": {"kafka": {"bootstrapServers": bootstrap, "topics": [topic]}}}
    }))
    .unwrap();
    inboxes.create(&PostParams::default(), &ibt).await.unwrap();
    let obj = common::wait_condition(
        &inboxes,
        "billing",
        "DedupCovered",
        "False",
        Some("RetentionBelowTopicRetention"),
        T,
    )
    .await;
    let msg = common::condition(&obj.status.unwrap().conditions, "DedupCovered").message.clone();
    assert!(
        msg.contains("86400000 ms") && msg.contains("retention.ms=604800000"),
        "both numbers: {msg}"
    );
    let ready = common::condition(&inboxes.get("billing").await.unwrap().status.unwrap().conditions, "Ready")
        .status
        .clone();
    assert_eq!(ready, "True", "no policy requires coverage yet");

    // A DedupPolicy with requireCoverage makes DedupCovered part of Ready.
    let label = json!({"metadata": {"labels": {"lockstep.dev/test": ns.name}}});
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .patch(&ns.name, &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();
    let pname = common::unique("coverage");
    let policies: Api<lockstep::crd::DedupPolicy> = Api::all(client.clone());
    let p: lockstep::crd::DedupPolicy = serde_json::from_value(json!({"apiVersion": "lockstep.dev/v1alpha1", "kind": "DedupPolicy",
        "metadata": {"name": pname}, "spec": {"namespaceSelector": {"matchLabels": {"lockstep.dev/test": ns.name}}, "requireCoverage": true}}))
    .unwrap();
    policies.create(&PostParams::default(), &p).await.unwrap();
    common::wait_condition(&inboxes, "billing", "Ready", "False", Some("RetentionBelowTopicRetention"), T).await;

    // Issue 12 item 6: Kafka deletes whole segments, so a record lives up to retention.ms +
    // segment.ms + the 5 min retention check: 8d does not cover 7d + 1d segments, 9d does.
    let patch = json!({"spec": {"retention": "8d"}});
    inboxes
        .patch("billing", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let obj = common::wait_until(T, "8d judged", || {
        let inboxes = inboxes.clone();
        async move {
            let st = inboxes.get("billing").await.ok()?.status?;
            (st.effective_retention.as_deref() == Some("8d")).then_some(st)
        }
    })
    .await;
    let c = common::condition(&obj.conditions, "DedupCovered");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "RetentionBelowTopicRetention"),
        "{}",
        c.message
    );
    assert!(
        c.message.contains("segment.ms=86400000") && c.message.contains("= 8d5m"),
        "{}",
        c.message
    );
    let patch = json!({"spec": {"retention": "9d"}});
    inboxes
        .patch("billing", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    common::wait_condition(&inboxes, "billing", "Ready", "True", None, T).await;
    let obj = common::wait_condition(&inboxes, "billing", "DedupCovered", "True", Some("RetentionCoversRedelivery"), T).await;
    let st = obj.status.unwrap();
    let msg = common::condition(&st.conditions, "DedupCovered").message.clone();
    assert!(msg.contains("777600000 ms") && msg.contains("604800000"), "{msg}");
    // The guarantee map states the consumer's hops from that verdict.
    let db_hop = st
        .guarantees
        .iter()
        .find(|g| g.hop == "consumer -> database")
        .expect("consumer -> database");
    assert!(
        db_hop
            .guarantee
            .starts_with("effect applied once per message id while the id is retained: retention 9d"),
        "{}",
        db_hop.guarantee
    );
    assert!(st.guarantees.iter().any(|g| g.hop == "consumer -> external APIs"));

    // A compacted topic replays each key's latest record however old: no retention covers it.
    let compacted = common::unique("orders.k");
    admin(&bootstrap)
        .create_topic(&compacted, 1, 1, &config(&[("cleanup.policy", "compact")]))
        .await
        .unwrap();
    let patch = json!({"spec": {"sources": {"kafka": {"topics": [topic, compacted]}}}});
    inboxes
        .patch("billing", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let obj = common::wait_condition(
        &inboxes,
        "billing",
        "DedupCovered",
        "False",
        Some("RetentionBelowTopicRetention"),
        T,
    )
    .await;
    let msg = common::condition(&obj.status.unwrap().conditions, "DedupCovered").message.clone();
    assert!(msg.contains(&format!("topic {compacted} is compacted")), "{msg}");
    policies.delete(&pname, &Default::default()).await.unwrap();
    ns.delete().await;
}

/// LagHealthy from the operator's own measurements: False while nothing relays and the oldest
/// event passes `lag.maxOldestAge`, True again once a relay drained the outbox, and its own
/// reason when an open transaction holds the rows back.
#[tokio::test]
async fn lag_healthy_follows_the_oldest_event_and_names_a_blocking_transaction() {
    let (_c, ns, api, schema) = setup("obr-lag").await;
    let bootstrap = common::kafka_bootstrap();
    let topic = common::unique("lag.events");
    admin(&bootstrap).create_topic(&topic, 1, 1, &Default::default()).await.unwrap();
    let mut obr = relay("lagged", &schema, &bootstrap, json!([]));
    obr.spec.routing.topic = topic.clone();
    obr.spec.lag.max_oldest_age = lockstep::core::duration::Duration::new("4s");
    api.create(&PostParams::default(), &obr).await.unwrap();
    let slow = Duration::from_secs(60);
    common::wait_condition(&api, "lagged", "LagHealthy", "True", Some("LagWithinThreshold"), slow).await;

    let pool = sqlx::PgPool::connect(&common::env("DATABASE_URL")).await.unwrap();
    let insert = format!(
        "insert into \"{schema}\".outbox (id, aggregatetype, aggregateid, type, payload)
         select gen_random_uuid(), 'order', 'k-' || g, 'created', '{{}}' from generate_series(1, 10) g"
    );
    // Events keep arriving, five a second, while a relay runs, is killed, and runs again.
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let (pool, writing) = (pool.clone(), writing.clone());
        let one = insert.replace("generate_series(1, 10)", "generate_series(1, 1)");
        tokio::spawn(async move {
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                sqlx::query(&one).execute(&pool).await.unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let dir = std::path::PathBuf::from(common::env("LOCKSTEP_TESTENV_DIR"));
    let start_relay = |n: usize| {
        let log = std::fs::File::create(dir.join(format!("obr-lag-relay-{n}.log"))).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .args(["relay", "--schema", &schema, "--table", "outbox", "--topic", &topic])
            .args(["--metrics-addr", "127.0.0.1:0", "--poll-interval", "200ms"])
            .env("DATABASE_URL", common::env("DATABASE_URL"))
            .env("KAFKA_BOOTSTRAP_SERVERS", &bootstrap)
            .stderr(log)
            .spawn()
            .unwrap()
    };
    let mut relay = start_relay(1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    common::wait_condition(&api, "lagged", "LagHealthy", "True", Some("LagWithinThreshold"), slow).await;

    // The relay stops: within the threshold (4 s) plus one refresh (15 s, +10% spread), and slack
    // for a loaded machine.
    let _ = relay.kill();
    let _ = relay.wait();
    let within = Duration::from_secs(4 + 17 + 7);
    let obj = common::wait_condition(&api, "lagged", "LagHealthy", "False", Some("LagAboveThreshold"), within).await;
    let lag = obj.status.unwrap().lag.unwrap();
    assert!(lag.pending_events >= 1 && lag.oldest_pending_age_seconds > 4.0, "{lag:?}");

    // It runs again: True again, once; events still arriving do not make it flap.
    let mut relay = start_relay(2);
    let obj = common::wait_condition(&api, "lagged", "LagHealthy", "True", Some("LagWithinThreshold"), slow).await;
    let since = common::condition(&obj.status.unwrap().conditions, "LagHealthy")
        .last_transition_time
        .clone();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let obj = api.get("lagged").await.unwrap();
    let c = common::condition(&obj.status.as_ref().unwrap().conditions, "LagHealthy").clone();
    assert_eq!(
        (c.status.as_str(), &c.last_transition_time),
        ("True", &since),
        "no flip since: {c:?}"
    );
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();

    // An open transaction that wrote to the outbox holds back every row committed after it began.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(&insert).execute(&mut *tx).await.unwrap();
    sqlx::query(&insert).execute(&pool).await.unwrap();
    let obj = common::wait_condition(&api, "lagged", "LagHealthy", "False", Some("LongTransaction"), slow).await;
    let lag = obj.status.unwrap().lag.unwrap();
    assert!(lag.blocking_transaction_age_seconds.unwrap_or(0.0) > 4.0, "{lag:?}");
    tx.commit().await.unwrap();
    common::wait_condition(&api, "lagged", "LagHealthy", "True", Some("LagWithinThreshold"), slow).await;
    let _ = relay.kill();
    let _ = relay.wait();
    ns.delete().await;
}

/// The relay Deployment: built as the spec says, owned by the OutboxRelay, Secrets mounted and
/// hashed, never copied; a relay run with exactly its container's args and env (the mounted
/// Secret stood in by a file, the metrics port made local) relays, and RelayAvailable sees it in
/// pg_locks. A rotated Secret changes the pod template's hash.
#[tokio::test]
async fn the_relay_deployment_is_what_the_spec_says_and_its_relay_becomes_available() {
    use k8s_openapi::api::{apps::v1::Deployment, core::v1::Secret};
    let (client, ns, api, schema) = setup("obr-deploy").await;
    let bootstrap = common::kafka_bootstrap();
    let topic = common::unique("deploy.events");
    admin(&bootstrap).create_topic(&topic, 1, 1, &Default::default()).await.unwrap();
    let mut obr = relay("orders", &schema, &bootstrap, json!([]));
    obr.spec.routing.topic = topic.clone();
    obr.spec.relay.replicas = 1;
    api.create(&PostParams::default(), &obr).await.unwrap();
    // No node runs the pods here: the Deployment exists but is not available.
    common::wait_condition(&api, "orders", "RelayAvailable", "False", Some("DeploymentUnavailable"), T).await;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let d = deployments.get("orders-relay").await.unwrap();
    let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("OutboxRelay", "orders", Some(true))
    );
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1));
    let template = spec.template.clone();
    let hash = |t: &k8s_openapi::api::core::v1::PodTemplateSpec| {
        t.metadata.as_ref().unwrap().annotations.as_ref().unwrap()["lockstep.dev/secret-hash"].clone()
    };
    let first_hash = hash(&template);
    let pod = template.spec.unwrap();
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("lockstep:test"), "the operator's --relay-image");
    let args = c.args.clone().unwrap();
    for want in [
        format!("--schema={schema}"),
        format!("--topic={topic}"),
        format!("--bootstrap-servers={bootstrap}"),
    ] {
        assert!(args.contains(&want), "{want} in {args:?}");
    }
    let url = common::env("DATABASE_URL");
    let object = serde_json::to_string(&d).unwrap();
    assert!(
        !object.contains(&url),
        "the database URL is mounted, never copied into the Deployment"
    );
    let env: Vec<(String, String)> = c
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.name, e.value.unwrap_or_default()))
        .collect();
    assert_eq!(env, [("DATABASE_URL_FILE".to_string(), "/etc/lockstep/database/url".to_string())]);

    // The relay, as the pod would run it.
    let dir = std::path::PathBuf::from(common::env("LOCKSTEP_TESTENV_DIR")).join(format!("{}-secret", ns.name));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("url"), &url).unwrap();
    let args: Vec<String> = args
        .into_iter()
        .map(|a| {
            if a.starts_with("--metrics-addr=") {
                "--metrics-addr=127.0.0.1:0".into()
            } else {
                a
            }
        })
        .collect();
    let log = std::fs::File::create(dir.join("relay.log")).unwrap();
    let mut relay = std::process::Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(&args)
        .env_clear()
        .env("DATABASE_URL_FILE", dir.join("url"))
        .stderr(log)
        .spawn()
        .unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(&format!(
        "insert into \"{schema}\".outbox (id, aggregatetype, aggregateid, type, payload)
         select gen_random_uuid(), 'order', 'k-' || g, 'created', '{{}}' from generate_series(1, 100) g"
    ))
    .execute(&pool)
    .await
    .unwrap();
    common::wait_condition(&api, "orders", "RelayAvailable", "True", Some("Available"), T).await;
    let deadline = std::time::Instant::now() + T;
    loop {
        let left: i64 = sqlx::query_scalar(&format!("select count(*) from \"{schema}\".outbox"))
            .fetch_one(&pool)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{left} events not relayed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = relay.kill();
    let _ = relay.wait();

    // A rotated password rolls the pods: the template's hash changes.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let rotated = json!({"stringData": {"url": format!("{url}?application_name=rotated")}});
    secrets.patch("db", &PatchParams::default(), &Patch::Merge(&rotated)).await.unwrap();
    common::touch(&api, "orders").await;
    let deadline = std::time::Instant::now() + T;
    loop {
        let d = deployments.get("orders-relay").await.unwrap();
        if hash(&d.spec.unwrap().template) != first_hash {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the secret hash did not change");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    ns.delete().await;
}

/// Dead-lettered rows: a Warning Event when more arrive, and `lockstep.dev/replay` moves them back
/// into the outbox once per new value, recorded in `status.lastReplay`.
#[tokio::test]
async fn dead_lettered_rows_raise_an_event_and_the_replay_annotation_moves_them_back() {
    use k8s_openapi::api::core::v1::Event;
    let (client, ns, api, schema) = setup("obr-replay").await;
    api.create(
        &PostParams::default(),
        &relay("orders", &schema, &common::kafka_bootstrap(), json!([])),
    )
    .await
    .unwrap();
    let obj = common::wait_condition(&api, "orders", "LagHealthy", "True", None, T).await;
    assert_eq!(obj.status.unwrap().lag.unwrap().quarantined, 0);

    // A row the relay dead-lettered (written here as the relay would).
    let pool = sqlx::PgPool::connect(&common::env("DATABASE_URL")).await.unwrap();
    let id: uuid::Uuid = sqlx::query_scalar(&format!(
        "insert into \"{schema}\".outbox_dead_letter (id, aggregatetype, aggregateid, type, payload, created_at, seq, attempts, last_error)
         values (gen_random_uuid(), 'order', 'k-1', 'created', '{{\"n\": 1}}', now(), 7, 10, 'Message size too large') returning id"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    common::touch(&api, "orders").await;
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let deadline = std::time::Instant::now() + T;
    loop {
        let list = events.list(&Default::default()).await.unwrap();
        if list
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("DeadLettered") && e.type_.as_deref() == Some("Warning"))
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no DeadLettered Warning Event");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Replay by annotation: once per value.
    api.patch(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"annotations": {"lockstep.dev/replay": "2026-11-25T1"}}})),
    )
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + T;
    let replayed = loop {
        let st = api.get("orders").await.unwrap().status.unwrap_or_default();
        if let Some(r) = st.last_replay {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "no replay recorded");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!((replayed.token.as_str(), replayed.rows), ("2026-11-25T1", 1));
    let back: Vec<uuid::Uuid> = sqlx::query_scalar(&format!("select id from \"{schema}\".outbox"))
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(back, [id], "the row is back in the outbox");
    let left: i64 = sqlx::query_scalar(&format!("select count(*) from \"{schema}\".outbox_dead_letter"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    // The same value again replays nothing: a row dead-lettered since stays put.
    sqlx::query(&format!(
        "insert into \"{schema}\".outbox_dead_letter (id, aggregatetype, aggregateid, type, payload, created_at, seq, attempts, last_error)
         values (gen_random_uuid(), 'order', 'k-2', 'created', '{{}}', now(), 8, 10, 'x')"
    ))
    .execute(&pool)
    .await
    .unwrap();
    common::touch(&api, "orders").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let left: i64 = sqlx::query_scalar(&format!("select count(*) from \"{schema}\".outbox_dead_letter"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 1, "a value already replayed does not replay again");
    ns.delete().await;
}

/// More than one relay: a PodDisruptionBudget (policy/v1, or v1beta1 on servers before 1.21)
/// lets a drain evict one at a time; back to one relay, it goes. A relay Deployment someone
/// deletes comes back without waiting for the next refresh (the operator watches them).
#[tokio::test]
async fn a_budget_guards_several_relays_and_a_deleted_deployment_comes_back() {
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::{
        api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind},
        discovery,
    };
    let (client, ns, api, schema) = setup("obr-pdb").await;
    let mut obr = relay("orders", &schema, &common::kafka_bootstrap(), json!([]));
    obr.spec.relay.replicas = 2;
    api.create(&PostParams::default(), &obr).await.unwrap();
    let version = match discovery::group(&client, "policy")
        .await
        .unwrap()
        .recommended_kind("PodDisruptionBudget")
    {
        Some((ar, _)) => ar.version,
        None => panic!("the API server serves no PodDisruptionBudget"),
    };
    let gvk = GroupVersionKind::gvk("policy", &version, "PodDisruptionBudget");
    let budgets: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns.name,
        &ApiResource::from_gvk_with_plural(&gvk, "poddisruptionbudgets"),
    );
    let pdb = common::wait_until(T, "the PodDisruptionBudget", || async {
        budgets.get_opt("orders-relay").await.unwrap()
    })
    .await;
    assert_eq!(pdb.data["spec"]["maxUnavailable"], 1);
    assert_eq!(pdb.data["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"], "orders");
    assert_eq!(pdb.metadata.owner_references.unwrap()[0].kind, "OutboxRelay");

    api.patch(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"relay": {"replicas": 1}}})),
    )
    .await
    .unwrap();
    common::wait_until(T, "the budget deleted", || async {
        budgets.get_opt("orders-relay").await.unwrap().is_none().then_some(())
    })
    .await;

    // Scaled to zero, every condition settles and the next refresh is 15 s away: just after a
    // reconcile (its lag measurement is new), a deleted Deployment comes back well before the
    // timer would bring it, because the operator watches the Deployments.
    api.patch(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"relay": {"replicas": 0}}})),
    )
    .await
    .unwrap();
    common::wait_condition(&api, "orders", "RelayAvailable", "False", Some("ScaledToZero"), T).await;
    let measured = || async {
        api.get("orders")
            .await
            .unwrap()
            .status
            .and_then(|s| s.lag)
            .and_then(|l| l.measured_at)
    };
    let before = measured().await;
    common::wait_until(T, "a fresh reconcile", || async { (measured().await != before).then_some(()) }).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let first = deployments.get("orders-relay").await.unwrap().metadata.uid;
    deployments.delete("orders-relay", &DeleteParams::default()).await.unwrap();
    // Under the timer's 13.5 s (15 s - 10%), with room for a loaded machine.
    common::wait_until(Duration::from_secs(8), "the Deployment recreated", || async {
        let d = deployments.get_opt("orders-relay").await.unwrap()?;
        (d.metadata.uid != first && d.metadata.deletion_timestamp.is_none()).then_some(())
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
async fn a_second_relay_on_one_outbox_conflicts_and_runs_nothing() {
    use k8s_openapi::api::apps::v1::Deployment;
    let (_c, a_ns, a, schema) = setup("obr-own-a").await;
    let (client, b_ns, b, _) = setup("obr-own-b").await;
    let bootstrap = common::kafka_bootstrap();
    a.create(&PostParams::default(), &relay("orders", &schema, &bootstrap, json!([])))
        .await
        .unwrap();
    common::wait_condition(&a, "orders", "SchemaReady", "True", None, T).await;
    // Another namespace, the same outbox, its own topic, a relay and deletionPolicy Delete.
    let topic = common::unique("conflict.events");
    let mut second = relay(
        "orders",
        &schema,
        &bootstrap,
        json!([{"name": topic, "partitions": 1, "replicationFactor": 1}]),
    );
    second.spec.relay.replicas = 1;
    second.spec.deletion_policy = lockstep::crd::DeletionPolicy::Delete;
    b.create(&PostParams::default(), &second).await.unwrap();
    let obj = common::wait_condition(&b, "orders", "Ready", "False", Some("ResourceConflict"), T).await;
    let st = obj.status.unwrap();
    let msg = &common::condition(&st.conditions, "SchemaReady").message;
    assert!(msg.contains(&format!("OutboxRelay {}/orders", a_ns.name)), "{msg}");
    for t in ["TopicsReady", "RelayAvailable"] {
        assert_eq!(common::condition(&st.conditions, t).reason, "ResourceConflict", "{t}");
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &b_ns.name);
    assert!(
        deployments.get_opt("orders-relay").await.unwrap().is_none(),
        "no relay for the second"
    );
    let seen = admin(&bootstrap).describe(std::slice::from_ref(&topic)).await.unwrap();
    assert!(!seen.contains_key(&topic), "the second's topic was not created");

    // Its database out of reach, it cannot claim (nor learn it lost): still no relay, no topic.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &b_ns.name);
    secrets.delete("db", &Default::default()).await.unwrap();
    common::create_secret(&client, &b_ns.name, "db", "postgres://postgres@127.0.0.1:1/postgres").await;
    common::touch(&b, "orders").await;
    common::wait_until(T, "the conflict kept, with why it cannot claim again", || {
        let b = b.clone();
        async move {
            let st = b.get("orders").await.ok()?.status?;
            let c = common::condition(&st.conditions, "SchemaReady");
            (c.reason == "ResourceConflict" && c.message.contains("(cannot claim again now: ")).then_some(())
        }
    })
    .await;
    common::touch(&b, "orders").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        deployments.get_opt("orders-relay").await.unwrap().is_none(),
        "no relay while unsure"
    );
    let seen = admin(&bootstrap).describe(std::slice::from_ref(&topic)).await.unwrap();
    assert!(!seen.contains_key(&topic), "nor its topic");

    // Its Delete cleanup leaves the first's tables alone.
    b.delete("orders", &Default::default()).await.unwrap();
    common::wait_until(T, "second deleted", || {
        let b = b.clone();
        async move { b.get_opt("orders").await.unwrap().is_none().then_some(()) }
    })
    .await;
    let pool = sqlx::PgPool::connect(&common::env("DATABASE_URL")).await.unwrap();
    let kept: Option<String> = sqlx::query_scalar("select to_regclass($1)::text")
        .bind(format!("\"{schema}\".outbox"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(kept.is_some(), "the outbox survives the conflicting object's cleanup");
    common::wait_condition(&a, "orders", "SchemaReady", "True", None, T).await;
    b_ns.delete().await;
    a_ns.delete().await;
}

/// A Deployment named `<name>-relay` that is not the OutboxRelay's (made by hand) is neither
/// taken over nor deleted: RelayAvailable says ResourceConflict and names it.
#[tokio::test]
async fn a_deployment_made_by_hand_is_never_taken_over_nor_deleted() {
    use k8s_openapi::api::apps::v1::Deployment;
    let (client, ns, api, schema) = setup("obr-squat").await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let squat: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "squat-relay"},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "squat"}},
                 "template": {"metadata": {"labels": {"app": "squat"}},
                              "spec": {"containers": [{"name": "c", "image": "example.org/squat:1"}]}}}
    }))
    .unwrap();
    let made = deployments.create(&PostParams::default(), &squat).await.unwrap();
    let mut obr = relay("squat", &schema, &common::kafka_bootstrap(), json!([]));
    obr.spec.relay.replicas = 1;
    obr.spec.deletion_policy = lockstep::crd::DeletionPolicy::Delete;
    api.create(&PostParams::default(), &obr).await.unwrap();
    let o = common::wait_condition(&api, "squat", "RelayAvailable", "False", Some("ResourceConflict"), T).await;
    let st = o.status.unwrap();
    let msg = &common::condition(&st.conditions, "RelayAvailable").message;
    assert!(
        msg.contains(&format!("Deployment {}/squat-relay", ns.name)) && msg.contains("created outside lockstep"),
        "{msg}"
    );
    // Reconciled again (and the Deployment watch fired): still untouched.
    common::touch(&api, "squat").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = deployments.get("squat-relay").await.unwrap();
    // Its status moves (the Deployment controller); its spec and owners do not.
    assert_eq!(now.metadata.generation, made.metadata.generation, "not changed");
    assert!(now.metadata.owner_references.is_none());
    let managers: Vec<_> = now
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(!managers.iter().any(|m| m == "lockstep-relay-deployment"), "{managers:?}");
    // The Delete cleanup stops only its own relay.
    api.delete("squat", &Default::default()).await.unwrap();
    common::wait_until(T, "the OutboxRelay gone", || {
        let api = api.clone();
        async move { api.get_opt("squat").await.unwrap().is_none().then_some(()) }
    })
    .await;
    let after = deployments
        .get_opt("squat-relay")
        .await
        .unwrap()
        .expect("the hand-made Deployment survives");
    assert_eq!(after.metadata.uid, made.metadata.uid);
    assert!(after.metadata.deletion_timestamp.is_none());
    ns.delete().await;
}

/// spec.relay.image must be under the operator's --relay-image-prefixes (by default the
/// repository of its --relay-image, `lockstep` here): anything else is InvalidSpec, no Deployment.
#[tokio::test]
async fn a_relay_image_outside_the_allow_list_is_invalid_spec() {
    use k8s_openapi::api::apps::v1::Deployment;
    let (client, ns, api, schema) = setup("obr-image").await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let mut evil = relay("evil", &schema, &common::kafka_bootstrap(), json!([]));
    evil.spec.relay.replicas = 1;
    evil.spec.relay.image = Some("lockstep-evil:1".into());
    api.create(&PostParams::default(), &evil).await.unwrap();
    let o = common::wait_condition(&api, "evil", "Ready", "False", Some("InvalidSpec"), T).await;
    let st = o.status.unwrap();
    let msg = &common::condition(&st.conditions, "Ready").message;
    assert!(msg.starts_with("spec.relay.image: \"lockstep-evil:1\""), "{msg}");
    assert!(deployments.get_opt("evil-relay").await.unwrap().is_none(), "no relay runs it");

    let mut tagged = relay("tagged", &format!("{schema}_t"), &common::kafka_bootstrap(), json!([]));
    tagged.spec.relay.replicas = 1;
    tagged.spec.relay.image = Some("lockstep:other-tag".into());
    api.create(&PostParams::default(), &tagged).await.unwrap();
    common::wait_condition(&api, "tagged", "SchemaReady", "True", None, T).await;
    let d = common::wait_until(T, "the relay Deployment", || {
        let deployments = deployments.clone();
        async move { deployments.get_opt("tagged-relay").await.unwrap() }
    })
    .await;
    let image = d.spec.unwrap().template.spec.unwrap().containers[0].image.clone();
    assert_eq!(
        image.as_deref(),
        Some("lockstep:other-tag"),
        "another tag of the allowed repository"
    );
    ns.delete().await;
}

/// The high watermark of partition 0: records the topic holds (a deleted topic holds none).
fn records(bootstrap: &str, topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    c.fetch_watermarks(topic, 0, Duration::from_secs(10))
        .map(|(_, high)| high)
        .unwrap_or(0)
}

/// Step 11 item 5, as a new user tried it: A (namespace A) manages a topic with retention.ms of
/// 7 days; B (namespace B, another table) names the same topic with retention.ms 60000 and
/// deletionPolicy Delete. B reports ResourceConflict naming A, the topic keeps A's retention over
/// repeated reconciles of both, and deleting B leaves the topic and a record no one consumed.
#[tokio::test]
async fn a_second_relay_naming_a_managed_topic_conflicts_and_never_alters_nor_deletes_it() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let (_c, a_ns, a, a_schema) = setup("obr-topic-a").await;
    let (_c, b_ns, b, b_schema) = setup("obr-topic-b").await;
    let bootstrap = common::kafka_bootstrap();
    let topic = common::unique("shared.events");
    let spec = |retention: &str| json!([{"name": topic, "partitions": 1, "replicationFactor": 1, "config": {"retention.ms": retention}}]);
    a.create(&PostParams::default(), &relay("orders", &a_schema, &bootstrap, spec("604800000")))
        .await
        .unwrap();
    common::wait_condition(&a, "orders", "TopicsReady", "True", None, T).await;
    let mut second = relay("orders", &b_schema, &bootstrap, spec("60000"));
    second.spec.deletion_policy = lockstep::crd::DeletionPolicy::Delete;
    b.create(&PostParams::default(), &second).await.unwrap();
    let obj = common::wait_condition(&b, "orders", "TopicsReady", "False", Some("ResourceConflict"), T).await;
    let st = obj.status.unwrap();
    let msg = &common::condition(&st.conditions, "TopicsReady").message;
    assert!(
        msg.contains(&format!("topic {topic} is managed by OutboxRelay {}/orders", a_ns.name)),
        "{msg}"
    );
    let holder = format!("OutboxRelay {}/orders", a_ns.name);
    assert_eq!(st.topics[0].managed_by.as_deref(), Some(holder.as_str()));
    assert_eq!(
        common::condition(&st.conditions, "SchemaReady").status,
        "True",
        "its own table is fine"
    );

    let producer: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    producer
        .send(FutureRecord::to(&topic).key("k").payload("unconsumed"), Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    assert_eq!(records(&bootstrap, &topic), 1);

    // Both reconciled again and again: the retention stays A's (before, it flipped every reconcile).
    let retention = || async {
        let d = admin(&bootstrap).describe(std::slice::from_ref(&topic)).await.unwrap();
        d[&topic].config.get("retention.ms").cloned()
    };
    for _ in 0..6 {
        common::touch(&b, "orders").await;
        common::touch(&a, "orders").await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(retention().await.as_deref(), Some("604800000"), "B changed A's topic");
    }
    common::wait_condition(&a, "orders", "TopicsReady", "True", Some("TopicsConfigured"), T).await;

    // B's Delete cleanup drops B's tables and keeps the topic with its record.
    b.delete("orders", &Default::default()).await.unwrap();
    common::wait_until(T, "B deleted", || {
        let b = b.clone();
        async move { b.get_opt("orders").await.unwrap().is_none().then_some(()) }
    })
    .await;
    let seen = admin(&bootstrap).describe(std::slice::from_ref(&topic)).await.unwrap();
    assert!(seen.contains_key(&topic), "the topic survives B's cleanup");
    assert_eq!(records(&bootstrap, &topic), 1, "with its unconsumed record");
    assert_eq!(retention().await.as_deref(), Some("604800000"));
    b_ns.delete().await;
    a_ns.delete().await;
}

/// The same Kafka cluster through another address (`localhost` for `127.0.0.1`): no bootstrap
/// address in common, so the cluster id the brokers report tells that it is one cluster.
#[tokio::test]
async fn a_topic_named_through_another_address_of_the_same_cluster_conflicts_too() {
    let (_c, a_ns, a, a_schema) = setup("obr-alias-a").await;
    let (_c, b_ns, b, b_schema) = setup("obr-alias-b").await;
    let bootstrap = common::kafka_bootstrap();
    let alias = bootstrap.replace("127.0.0.1", "localhost");
    assert_ne!(alias, bootstrap, "the test broker listens on 127.0.0.1");
    let topic = common::unique("alias.events");
    let spec = json!([{"name": topic, "partitions": 1, "replicationFactor": 1}]);
    a.create(&PostParams::default(), &relay("orders", &a_schema, &bootstrap, spec.clone()))
        .await
        .unwrap();
    common::wait_condition(&a, "orders", "TopicsReady", "True", None, T).await;
    b.create(&PostParams::default(), &relay("orders", &b_schema, &alias, spec))
        .await
        .unwrap();
    let obj = common::wait_condition(&b, "orders", "TopicsReady", "False", Some("ResourceConflict"), T).await;
    let st = obj.status.unwrap();
    let msg = &common::condition(&st.conditions, "TopicsReady").message;
    assert!(msg.contains(&format!("managed by OutboxRelay {}/orders", a_ns.name)), "{msg}");
    b_ns.delete().await;
    a_ns.delete().await;
}

/// A relay's lock session with buckets, stood in by the test: application_name as the relay sets
/// it, the shared member lock of `buckets`, and the exclusive locks of `owned`.
async fn bucket_session(table: &lockstep::core::sql::QualifiedName, buckets: u16, owned: &[u16], pod: &str) -> (sqlx::PgConnection, i32) {
    use lockstep::tables::buckets::{bucket_code, class_key, member_code};
    use sqlx::Connection;
    let opts: sqlx::postgres::PgConnectOptions = common::env("DATABASE_URL").parse().unwrap();
    let name = lockstep::tables::identity::application_name(Some(pod));
    let mut c = sqlx::PgConnection::connect_with(&opts.application_name(&name)).await.unwrap();
    let pid: i32 = sqlx::query_scalar("select pg_backend_pid()").fetch_one(&mut c).await.unwrap();
    let class = class_key(table);
    let codes = std::iter::once(("pg_advisory_lock_shared", member_code(buckets)))
        .chain(owned.iter().map(|b| ("pg_advisory_lock", bucket_code(buckets, *b))));
    for (f, code) in codes {
        sqlx::query(&format!("select {f}($1, $2)"))
            .bind(class)
            .bind(code)
            .execute(&mut c)
            .await
            .unwrap();
    }
    (c, pid)
}

/// With buckets, RelayAvailable and `status.relays` come from pg_locks: relays stood in by
/// sessions holding the locks a relay takes; a relay of another bucket count is a change rolling
/// out; and, once the bucket function and index of docs/relay.md exist, each relay's oldest event.
#[tokio::test]
async fn relays_with_buckets_are_seen_in_pg_locks() {
    let (_client, ns, api, schema) = setup("obr-buckets").await;
    let mut obr = relay("orders", &schema, &common::kafka_bootstrap(), json!([]));
    obr.spec.relay.replicas = 2;
    obr.spec.relay.buckets = 4;
    api.create(&PostParams::default(), &obr).await.unwrap();
    common::wait_condition(&api, "orders", "SchemaReady", "True", None, T).await;
    let table = lockstep::core::sql::QualifiedName {
        schema: lockstep::core::sql::Ident::parse(&schema).unwrap(),
        table: lockstep::core::sql::Ident::parse("outbox").unwrap(),
    };
    let (_a, pid_a) = bucket_session(&table, 4, &[0, 1], "pod-a").await;
    let (mut b, pid_b) = bucket_session(&table, 4, &[2], "pod-b").await;
    common::touch(&api, "orders").await;
    let o = common::wait_condition(&api, "orders", "RelayAvailable", "False", Some("BucketsUnowned"), T).await;
    let st = o.status.unwrap();
    let msg = &common::condition(&st.conditions, "RelayAvailable").message;
    assert!(msg.starts_with("1 of 4 buckets have no owner"), "{msg}");
    assert_eq!((st.buckets, st.buckets_owned), (Some(4), Some(3)));
    let shares: Vec<(i32, Option<&str>, Option<&str>, i32)> = st
        .relays
        .iter()
        .map(|r| (r.pid, r.application_name.as_deref(), r.pod.as_deref(), r.buckets))
        .collect();
    let mut want = vec![
        (pid_a, Some("lockstep-relay/pod-a"), Some("pod-a"), 2),
        (pid_b, Some("lockstep-relay/pod-b"), Some("pod-b"), 1),
    ];
    want.sort();
    assert_eq!(shares, want);

    sqlx::query("select pg_advisory_lock($1, $2)")
        .bind(lockstep::tables::buckets::class_key(&table))
        .bind(lockstep::tables::buckets::bucket_code(4, 3))
        .execute(&mut b)
        .await
        .unwrap();
    common::touch(&api, "orders").await;
    let o = common::wait_condition(&api, "orders", "RelayAvailable", "True", Some("Available"), T).await;
    let msg = common::condition(&o.status.as_ref().unwrap().conditions, "RelayAvailable")
        .message
        .clone();
    assert!(msg.starts_with("2 relays own 4/4 buckets (2, 2)"), "{msg}");

    // A bucket changing hands: True for a grace (BucketsMoving, looked at again within 5 s), then
    // BucketsUnowned once it lasted 10 s.
    let bucket3 = |sql: &'static str| {
        sqlx::query(sql)
            .bind(lockstep::tables::buckets::class_key(&table))
            .bind(lockstep::tables::buckets::bucket_code(4, 3))
    };
    bucket3("select pg_advisory_unlock($1, $2)").execute(&mut b).await.unwrap();
    common::touch(&api, "orders").await;
    let o = common::wait_condition(&api, "orders", "RelayAvailable", "True", Some("BucketsMoving"), T).await;
    let msg = common::condition(&o.status.as_ref().unwrap().conditions, "RelayAvailable")
        .message
        .clone();
    assert!(msg.starts_with("1 of 4 buckets are changing hands"), "{msg}");
    let moving = std::time::Instant::now();
    // No touch: the operator looks again by itself.
    common::wait_condition(&api, "orders", "RelayAvailable", "False", Some("BucketsUnowned"), T).await;
    assert!(moving.elapsed() >= std::time::Duration::from_secs(4), "{:?}", moving.elapsed());
    bucket3("select pg_advisory_lock($1, $2)").execute(&mut b).await.unwrap();
    common::touch(&api, "orders").await;
    common::wait_condition(&api, "orders", "RelayAvailable", "True", Some("Available"), T).await;

    // The documented function gives the Rust hash; with its index, each relay's oldest event.
    let pool = sqlx::PgPool::connect(&common::env("DATABASE_URL")).await.unwrap();
    let q = format!("\"{schema}\"");
    for ddl in [
        format!(
            "create function {q}.lockstep_bucket(key text, buckets integer) returns integer language sql immutable parallel safe as \
             $$ select (('x' || left(encode(sha256(convert_to(coalesce(key, ''), 'UTF8')), 'hex'), 8))::bit(32)::bigint % buckets)::int $$"
        ),
        // Not concurrently: that would wait for other tests' open transactions in this database.
        format!("create index outbox_bucket4_idx on {q}.outbox ({q}.lockstep_bucket(aggregateid::text, 4), seq)"),
        // order-1 is in bucket 1 of 4 (relay a's), an hour old.
        format!(
            "insert into {q}.outbox (id, aggregatetype, aggregateid, type, payload, created_at)
             values (gen_random_uuid(), 'order', 'order-1', 'created', '{{}}', now() - interval '1 hour')"
        ),
    ] {
        sqlx::query(&ddl).execute(&pool).await.unwrap();
    }
    let vectors: Vec<i32> = sqlx::query_scalar(&format!(
        "select {q}.lockstep_bucket(k, 64) from unnest(array['order-1', 'order-2', 'customer-42', 'ünïcode', '']) with ordinality u(k, i) order by i"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    let rust: Vec<i32> = ["order-1", "order-2", "customer-42", "ünïcode", ""]
        .iter()
        .map(|k| i32::from(lockstep::tables::buckets::bucket_of(k, 64)))
        .collect();
    assert_eq!(vectors, rust);
    assert_eq!(lockstep::tables::buckets::bucket_of("order-1", 4), 1);
    common::touch(&api, "orders").await;
    let ages = common::wait_until(T, "each relay's oldest event", || async {
        let st = api.get("orders").await.unwrap().status?;
        let age = |pid| st.relays.iter().find(|r| r.pid == pid)?.oldest_pending_age_seconds;
        Some((age(pid_a)?, age(pid_b)?))
    })
    .await;
    assert!(ages.0 >= 3600.0 && ages.1 == 0.0, "{ages:?}");
    // LagHealthy names the bucket group behind: relay pod-a's.
    let o = common::wait_condition(&api, "orders", "LagHealthy", "False", Some("LagAboveThreshold"), T).await;
    let msg = common::condition(&o.status.as_ref().unwrap().conditions, "LagHealthy")
        .message
        .clone();
    assert!(msg.contains("; behind: relay pod-a (2 buckets) 36"), "{msg}");
    assert!(!msg.contains("pod-b"), "{msg}");

    // The spec moves to 8: the relays with 4 are now the old count. True while they own all 4 of
    // theirs, False once one stopped (its buckets wait for the change to complete).
    let eight = json!({"spec": {"relay": {"buckets": 8}}});
    api.patch("orders", &PatchParams::default(), &Patch::Merge(&eight)).await.unwrap();
    let o = common::wait_condition(&api, "orders", "RelayAvailable", "True", Some("BucketsChanging"), T).await;
    let msg = common::condition(&o.status.as_ref().unwrap().conditions, "RelayAvailable")
        .message
        .clone();
    assert!(
        msg.starts_with("2 relays with 4 buckets still publish, owning 4/4 buckets"),
        "{msg}"
    );
    drop(b);
    common::touch(&api, "orders").await;
    let o = common::wait_condition(&api, "orders", "RelayAvailable", "False", Some("BucketsChanging"), T).await;
    assert_eq!(o.status.unwrap().buckets, Some(8));
    pool.close().await;
    ns.delete().await;
}
