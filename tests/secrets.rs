//! Secrets never leak (issue 12 item 1): a sentinel value in every Secret the operator reads,
//! driven through the error paths a user can reach (a database URL key holding a bare password, a
//! key=value DSN, a user:password@host without scheme, a refused password, a password in the
//! query; Kafka auth settings librdkafka refuses and would echo), each object reconciled several
//! times (the failing setting can change between attempts). Then the sentinel must appear in no
//! status, no Event, no line of the operator's log and nothing on /metrics.

mod common;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{Api, ListParams, PostParams};
use lockstep::crd::{InboxTable, OutboxRelay};
use serde_json::json;

const SENTINEL: &str = "S3ntinelLockstepNeverPrint";

async fn secret(client: &kube::Client, ns: &str, name: &str, data: serde_json::Value) {
    let s: Secret = serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data})).unwrap();
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &s)
        .await
        .unwrap();
}

async fn metrics(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn no_secret_value_reaches_a_status_an_event_a_log_line_or_a_metric() {
    let addr = common::operator();
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::TestNamespace::new(&client, "secrets").await;
    let url = common::env("DATABASE_URL");
    let host = url.split_once("://").unwrap().1.rsplit_once('@').map_or(url.as_str(), |(_, h)| h);
    let host = host.split('/').next().unwrap();
    let database_urls = [
        SENTINEL.to_string(),
        format!("host=127.0.0.1 user=postgres password={SENTINEL}"),
        format!("postgres:{SENTINEL}@{host}/postgres"),
        format!("postgres://no_such_role_x:{SENTINEL}@{host}/postgres"),
        format!("postgres://no_such_role_x@{host}/postgres?password={SENTINEL}&sslmode=disable"),
    ];
    // Settings librdkafka refuses, echoing the value (config, creation and key material errors).
    let kafka_settings = [
        json!({"security.protocol": SENTINEL, "sasl.password": SENTINEL}),
        json!({"security.protocol": "SASL_SSL", "sasl.mechanism": SENTINEL, "sasl.password": SENTINEL}),
        json!({"security.protocol": "SSL", "ssl.key.pem": SENTINEL, "ssl.key.password": SENTINEL}),
    ];
    for (i, s) in kafka_settings.iter().enumerate() {
        secret(&client, &ns.name, &format!("kafka-{i}"), s.clone()).await;
    }
    let schema = ns.name.replace('-', "_");
    let bootstrap = common::kafka_bootstrap();
    let inboxes: Api<InboxTable> = Api::namespaced(client.clone(), &ns.name);
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns.name);
    let mut names = Vec::new();
    for (i, u) in database_urls.iter().enumerate() {
        secret(&client, &ns.name, &format!("db-{i}"), json!({"url": u})).await;
        let kafka = format!("kafka-{}", i % kafka_settings.len());
        let ibt: InboxTable = serde_json::from_value(json!({
            "apiVersion": "lockstep.dev/v1alpha1", "kind": "InboxTable", "metadata": {"name": format!("in-{i}")},
            "spec": {"database": {"urlSecretRef": {"name": format!("db-{i}")}, "schema": schema, "table": format!("inbox{i}")},
                     "sources": {"kafka": {"bootstrapServers": bootstrap, "topics": ["secrets.t"],
                                           "consumerGroup": "g", "authSecretRef": {"name": kafka}}}}
        }))
        .unwrap();
        inboxes.create(&PostParams::default(), &ibt).await.unwrap();
        let obr: OutboxRelay = serde_json::from_value(json!({
            "apiVersion": "lockstep.dev/v1alpha1", "kind": "OutboxRelay", "metadata": {"name": format!("out-{i}")},
            "spec": {"database": {"urlSecretRef": {"name": format!("db-{i}")}, "schema": schema, "table": format!("outbox{i}")},
                     "kafka": {"bootstrapServers": bootstrap, "authSecretRef": {"name": kafka}},
                     "topics": [{"name": format!("secrets.{i}"), "partitions": 1, "replicationFactor": 1}],
                     "relay": {"replicas": 0}}
        }))
        .unwrap();
        relays.create(&PostParams::default(), &obr).await.unwrap();
        names.push(i);
    }
    // Every object reconciled (a status with conditions), then touched so it runs its error
    // paths again.
    for i in &names {
        common::wait_until(Duration::from_secs(60), "reconciled", || {
            let (inboxes, relays) = (inboxes.clone(), relays.clone());
            async move {
                let a = inboxes.get(&format!("in-{i}")).await.ok()?.status?.conditions.len();
                let b = relays.get(&format!("out-{i}")).await.ok()?.status?.conditions.len();
                (a > 0 && b > 0).then_some(())
            }
        })
        .await;
    }
    for _ in 0..3 {
        for i in &names {
            common::touch(&inboxes, &format!("in-{i}")).await;
            common::touch(&relays, &format!("out-{i}")).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }

    let mut seen = Vec::new();
    let mut look = |what: String, text: String| {
        if text.contains(SENTINEL) || text.contains(&SENTINEL[..12]) {
            seen.push(what);
        }
    };
    let mut messages = 0;
    for i in &names {
        for obj in [
            serde_json::to_string(&inboxes.get(&format!("in-{i}")).await.unwrap()).unwrap(),
            serde_json::to_string(&relays.get(&format!("out-{i}")).await.unwrap()).unwrap(),
        ] {
            messages += obj.matches("\"message\"").count();
            look(format!("object {i}: {obj}"), obj);
        }
    }
    let events = Api::<Event>::namespaced(client.clone(), &ns.name)
        .list(&ListParams::default())
        .await
        .unwrap();
    for e in &events.items {
        look(format!("event {:?}", e.message), serde_json::to_string(e).unwrap());
    }
    let log_path = std::path::PathBuf::from(common::env("LOCKSTEP_TESTENV_DIR")).join(format!(
        "{}-operator.log",
        std::env::current_exe().unwrap().file_stem().unwrap().to_string_lossy()
    ));
    let log = std::fs::read_to_string(&log_path).unwrap();
    for line in log.lines() {
        look(format!("log: {line}"), line.to_owned());
    }
    look("metrics".into(), metrics(addr).await);
    println!(
        "{} objects, {messages} condition messages, {} events, {} log lines, /metrics: sentinel seen {} times",
        names.len() * 2,
        events.items.len(),
        log.lines().count(),
        seen.len()
    );
    assert!(messages >= names.len() * 4, "the objects said something about their failures");
    assert!(!events.items.is_empty(), "condition flips produced Events to search");
    assert!(seen.is_empty(), "a Secret value leaked:\n{}", seen.join("\n"));
    ns.delete().await;
}

/// The digest the pod template carried before (SHA-256 over the Secrets' data, length-prefixed):
/// anyone reading the Deployment could test password guesses against it.
fn data_digest(secrets: &[&std::collections::BTreeMap<String, String>]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for data in secrets {
        h.update((data.len() as u64).to_be_bytes());
        for (k, v) in data.iter() {
            for part in [k.as_bytes(), v.as_bytes()] {
                h.update((part.len() as u64).to_be_bytes());
                h.update(part);
            }
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The relay pod template's Secret hash: nothing computed from the Secrets' data (the same data
/// in a Secret made anew gives a new hash, so no guess can be tested against it), and still
/// changed by every change to either Secret, which rolls the relays.
#[tokio::test]
async fn the_secret_hash_reveals_nothing_and_follows_every_secret_change() {
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::api::{Patch, PatchParams};
    common::operator();
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::TestNamespace::new(&client, "secret-hash").await;
    let url = common::env("DATABASE_URL");
    let db = std::collections::BTreeMap::from([("url".to_string(), url.clone())]);
    let auth = std::collections::BTreeMap::from([("client.id".to_string(), "hash-test".to_string())]);
    secret(&client, &ns.name, "db", json!(db)).await;
    secret(&client, &ns.name, "kafka", json!(auth)).await;
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns.name);
    let obr: OutboxRelay = serde_json::from_value(json!({
        "apiVersion": "lockstep.dev/v1alpha1", "kind": "OutboxRelay", "metadata": {"name": "hashed"},
        "spec": {"database": {"urlSecretRef": {"name": "db"}, "schema": ns.name.replace('-', "_"), "table": "outbox"},
                 "kafka": {"bootstrapServers": common::kafka_bootstrap(), "authSecretRef": {"name": "kafka"}},
                 "relay": {"replicas": 1}}
    }))
    .unwrap();
    relays.create(&PostParams::default(), &obr).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let hash_now = || {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get_opt("hashed-relay").await.unwrap()?;
            d.spec?.template.metadata?.annotations?.get("lockstep.dev/secret-hash").cloned()
        }
    };
    let first = common::wait_until(Duration::from_secs(60), "the relay Deployment", hash_now).await;
    let sha = |s: &str| {
        use sha2::{Digest, Sha256};
        Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    for guessable in [data_digest(&[&db, &auth]), data_digest(&[&db]), sha(&url)] {
        assert_ne!(first, guessable, "the hash is a digest of the Secrets' data");
    }
    let changed = |from: String, what: &'static str| {
        let relays = relays.clone();
        async move {
            common::touch(&relays, "hashed").await;
            common::wait_until(Duration::from_secs(60), what, || {
                let from = from.clone();
                async move { hash_now().await.filter(|h| *h != from) }
            })
            .await
        }
    };
    // The same data in a Secret made anew: a digest of the data could not tell them apart.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    secrets.delete("db", &Default::default()).await.unwrap();
    secret(&client, &ns.name, "db", json!(db)).await;
    let second = changed(first, "a new hash for the Secret made anew").await;
    // A rotated auth Secret rolls the relays too.
    let rotated = json!({"stringData": {"client.id": "hash-test-2"}});
    secrets
        .patch("kafka", &PatchParams::default(), &Patch::Merge(&rotated))
        .await
        .unwrap();
    changed(second, "a new hash for the rotated auth Secret").await;
    ns.delete().await;
}

/// Keys in an authSecretRef Secret that load code, run a command or read a file of the
/// operator's own filesystem never reach the operator's librdkafka: a condition names the Secret
/// and the key, never the value.
#[tokio::test]
async fn auth_secret_keys_that_load_code_or_read_files_are_refused() {
    common::operator();
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::TestNamespace::new(&client, "secret-keys").await;
    secret(&client, &ns.name, "db", json!({"url": common::env("DATABASE_URL")})).await;
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns.name);
    let schema = ns.name.replace('-', "_");
    let value = format!("/tmp/{SENTINEL}.so");
    for (i, key) in [
        "plugin.library.paths",
        "ssl.engine.location",
        "sasl.kerberos.kinit.cmd",
        "ssl.key.location",
    ]
    .iter()
    .enumerate()
    {
        let name = format!("kafka-{i}");
        secret(&client, &ns.name, &name, json!({ *key: value, "client.id": "x" })).await;
        let obr: OutboxRelay = serde_json::from_value(json!({
            "apiVersion": "lockstep.dev/v1alpha1", "kind": "OutboxRelay", "metadata": {"name": format!("keys-{i}")},
            "spec": {"database": {"urlSecretRef": {"name": "db"}, "schema": schema, "table": format!("outbox{i}")},
                     "kafka": {"bootstrapServers": common::kafka_bootstrap(), "authSecretRef": {"name": name}},
                     "topics": [{"name": common::unique("keys.t"), "partitions": 1, "replicationFactor": 1}],
                     "relay": {"replicas": 0}}
        }))
        .unwrap();
        relays.create(&PostParams::default(), &obr).await.unwrap();
        let o = common::wait_condition(
            &relays,
            &format!("keys-{i}"),
            "TopicsReady",
            "False",
            Some("SecretKeyRefused"),
            Duration::from_secs(60),
        )
        .await;
        let st = o.status.unwrap();
        let m = &common::condition(&st.conditions, "TopicsReady").message;
        assert!(
            m.contains(&format!("Secret {}/{name} (kafka.authSecretRef) has key {key:?}", ns.name)),
            "{m}"
        );
        assert!(!m.contains(SENTINEL), "{m}");
    }
    ns.delete().await;
}
