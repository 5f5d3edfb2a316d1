//! The operator at scale: its memory with 100 OutboxRelays (each with its relay Deployment) and
//! 100 InboxTables, and how long a spec change takes to show in status, operator-side, with
//! reconciles per second and CPU per reconcile. Runs the release `lockstep operator` as its own
//! process against the local test API server and PostgreSQL (tansu for the topics it describes).
//!
//!   scripts/bench operator   (BENCH_OBJECTS, default 100 of each kind; BENCH_CHANGES, default 50)

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use kube::{
    api::{Api, Patch, PatchParams, PostParams},
    Client,
};
use lockstep::crd::{InboxTable, OutboxRelay};
use serde_json::json;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Resident memory (MiB) and CPU seconds of process `pid`, from /proc.
fn rss_and_cpu(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (kb / 1024.0, ticks / 100.0)
}

/// `lockstep_reconciles_total` summed over controllers, from the operator's /metrics.
async fn reconciles(addr: &str) -> f64 {
    let body = reqwest_lite(addr).await;
    body.lines()
        .filter(|l| l.starts_with("lockstep_reconciles_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// GET /metrics over a plain TCP connection (no HTTP client dependency for one request).
async fn reqwest_lite(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let _ = s
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

#[tokio::main]
async fn main() {
    let n = env_num("BENCH_OBJECTS", 100);
    let changes = env_num("BENCH_CHANGES", 50);
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL: run through scripts/bench");
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP_SERVERS").expect("KAFKA_BOOTSTRAP_SERVERS");
    let client = Client::try_default().await.expect("KUBECONFIG");
    lockstep::crdgen::apply(&client).await.expect("CRDs");
    let ns = format!("bench-operator-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "db"}, "stringData": {"url": url}})).unwrap(),
        )
        .await
        .unwrap();

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let exe = std::env::var("LOCKSTEP_BIN").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/lockstep").into());
    let mut operator = Command::new(exe)
        .args([
            "operator",
            "--metrics-addr",
            &addr,
            "--leader-election=false",
            "--watch-namespace",
            &ns,
        ])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("run target/release/lockstep (cargo build --release)");
    let pid = operator.id();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle_rss, _) = rss_and_cpu(pid);

    let schema = ns.replace('-', "_");
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns);
    let inboxes: Api<InboxTable> = Api::namespaced(client.clone(), &ns);
    let started = Instant::now();
    for i in 0..n {
        let r: OutboxRelay = serde_json::from_value(json!({
            "apiVersion": "lockstep.dev/v1alpha1", "kind": "OutboxRelay", "metadata": {"name": format!("r{i}")},
            "spec": {"database": {"urlSecretRef": {"name": "db"}, "schema": schema, "table": format!("outbox_{i}")},
                     "kafka": {"bootstrapServers": bootstrap}, "relay": {"replicas": 1}}
        }))
        .unwrap();
        relays.create(&PostParams::default(), &r).await.unwrap();
        let t: InboxTable = serde_json::from_value(json!({
            "apiVersion": "lockstep.dev/v1alpha1", "kind": "InboxTable", "metadata": {"name": format!("t{i}")},
            "spec": {"database": {"urlSecretRef": {"name": "db"}, "schema": schema, "table": format!("inbox_{i}")},
                     "retention": "7d"}
        }))
        .unwrap();
        inboxes.create(&PostParams::default(), &t).await.unwrap();
    }
    // Every object reconciled (a status with conditions) and every relay Deployment there.
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(client.clone(), &ns);
    loop {
        let r = relays.list(&Default::default()).await.unwrap();
        let t = inboxes.list(&Default::default()).await.unwrap();
        let d = deployments.list(&Default::default()).await.unwrap();
        let done = r
            .items
            .iter()
            .filter(|o| o.status.as_ref().is_some_and(|s| !s.conditions.is_empty()))
            .count()
            + t.items
                .iter()
                .filter(|o| o.status.as_ref().is_some_and(|s| !s.conditions.is_empty()))
                .count();
        if done as u64 == 2 * n && d.items.len() as u64 == n {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "not reconciled: {done} of {}", 2 * n);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let settle = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss, cpu0) = rss_and_cpu(pid);
    let rec0 = reconciles(&addr).await;
    let t0 = Instant::now();

    // Spec change -> status: retention of one InboxTable, then its observedGeneration.
    let mut latencies = Vec::new();
    for c in 0..changes {
        let name = format!("t{}", c % n);
        let retention = format!("{}d", 8 + c % 2);
        let changed = Instant::now();
        let obj = inboxes
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"retention": retention}})),
            )
            .await
            .unwrap();
        let generation = obj.metadata.generation;
        loop {
            let o = inboxes.get(&name).await.unwrap();
            if o.status.as_ref().and_then(|s| s.observed_generation) == generation {
                break;
            }
            assert!(changed.elapsed() < Duration::from_secs(60), "status never showed the change");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        latencies.push(changed.elapsed().as_secs_f64() * 1e3);
    }
    let window = t0.elapsed().as_secs_f64();
    let (rss_after, cpu1) = rss_and_cpu(pid);
    let rec = reconciles(&addr).await - rec0;
    println!("operator with {n} OutboxRelays (each with its relay Deployment, 1 replica) and {n} InboxTables:");
    println!("  all reconciled in {:.1}s", settle.as_secs_f64());
    println!("  RSS: idle {idle_rss:.1} MiB, with the objects {rss:.1} MiB, after the changes {rss_after:.1} MiB (goal < 32 MiB)");
    println!(
        "  spec change -> status (observedGeneration), {changes} changes: p50 {:.0} ms, p99 {:.0} ms (goal p99 < 100 ms; includes the API server round trips and 2 ms polling)",
        pct(latencies.clone(), 0.5),
        pct(latencies, 0.99)
    );
    println!(
        "  during the changes ({window:.1}s): {rec:.0} reconciles, {:.1}/s, {:.1} ms CPU per reconcile",
        rec / window,
        if rec > 0.0 { (cpu1 - cpu0) * 1e3 / rec } else { 0.0 }
    );
    let _ = operator.kill();
    let _ = operator.wait();
    let _ = namespaces.delete(&ns, &Default::default()).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let _ = sqlx::query(&format!("drop schema if exists \"{schema}\" cascade"))
        .execute(&pool)
        .await;
}
