//! The operator at scale: its memory with 100 OutboxRelays (each with its relay Deployment) and
//! 100 InboxTables, and how long a spec change takes to show in status, operator-side, with
//! reconciles per second and CPU per reconcile. Runs the release `lockstep operator` as its own
//! process against the local test API server and PostgreSQL (tansu for the topics it describes).
//!
//!   scripts/bench operator   (BENCH_OBJECTS, default 100 of each kind; BENCH_CHANGES, default 50;
//!   BENCH_QUIET, seconds of steady state measured first, default 15; BENCH_OPERATOR_ARGS,
//!   BENCH_OPERATOR_LOG, BENCH_RUST_LOG, LOCKSTEP_BIN: what runs and where its log goes)

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use futures::StreamExt;
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

/// `lockstep_db_acquire_seconds`: (count, sum, count at or under 10 ms).
async fn acquires(addr: &str) -> (f64, f64, f64) {
    let body = reqwest_lite(addr).await;
    let value = |prefix: &str| {
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("lockstep_db_acquire_seconds_count"),
        value("lockstep_db_acquire_seconds_sum"),
        value("lockstep_db_acquire_seconds_bucket{le=\"0.01\"}"),
    )
}

/// (busy, total) jiffies of every CPU of the machine, from /proc/stat.
fn machine_busy() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    let total: f64 = f.iter().take(8).sum();
    (total - idle, total)
}

fn busy_share(a: (f64, f64), b: (f64, f64)) -> f64 {
    if b.1 > a.1 {
        (b.0 - a.0) * 100.0 / (b.1 - a.1)
    } else {
        0.0
    }
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
    lockstep::crd::crdgen::apply(&client).await.expect("CRDs");
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
    // BENCH_OPERATOR_ARGS: more flags (e.g. "--db-pool-size=8"); BENCH_OPERATOR_LOG: a file for
    // the operator's log, at RUST_LOG=BENCH_RUST_LOG (default warn).
    let extra = std::env::var("BENCH_OPERATOR_ARGS").unwrap_or_default();
    let log = std::env::var("BENCH_OPERATOR_LOG").ok();
    let mut operator = Command::new(exe)
        .args([
            "operator",
            "--metrics-addr",
            &addr,
            "--leader-election=false",
            "--watch-namespace",
            &ns,
        ])
        .args(extra.split_whitespace())
        .env("RUST_LOG", std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stderr(log.map_or_else(Stdio::null, |f| std::fs::File::create(f).expect("BENCH_OPERATOR_LOG").into()))
        .spawn()
        .expect("run target/release/lockstep (cargo build --release)");
    let pid = operator.id();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle_rss, _) = rss_and_cpu(pid);

    let schema = ns.replace('-', "_");
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns);
    let inboxes: Api<InboxTable> = Api::namespaced(client.clone(), &ns);
    let started = Instant::now();
    // Created 16 at a time: one by one, 1,000 of each took longer than reconciling them.
    let creates = futures::stream::iter(0..n).map(|i| {
        let (relays, inboxes, schema, bootstrap) = (&relays, &inboxes, &schema, &bootstrap);
        async move {
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
    });
    creates.buffer_unordered(16).collect::<Vec<()>>().await;
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
    // The steady state, before any change: refreshes and purges only (one refresh period).
    let quiet = Duration::from_secs(env_num("BENCH_QUIET", 15));
    let (q_rec0, (_, q_cpu0), q_busy0) = (reconciles(&addr).await, rss_and_cpu(pid), machine_busy());
    tokio::time::sleep(quiet).await;
    let (q_rec, (_, q_cpu1), q_busy1) = (reconciles(&addr).await - q_rec0, rss_and_cpu(pid), machine_busy());
    let (rss, cpu0) = rss_and_cpu(pid);
    let (rec0, acq0, busy0) = (reconciles(&addr).await, acquires(&addr).await, machine_busy());
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
    let (acq, busy) = (acquires(&addr).await, machine_busy());
    println!("operator with {n} OutboxRelays (each with its relay Deployment, 1 replica) and {n} InboxTables:");
    println!("  all reconciled in {:.1}s", settle.as_secs_f64());
    println!("  RSS: idle {idle_rss:.1} MiB, with the objects {rss:.1} MiB, after the changes {rss_after:.1} MiB (goal < 100 MiB at 1,000 of each)");
    println!(
        "  spec change -> status (observedGeneration), {changes} changes: p50 {:.0} ms, p99 {:.0} ms (goal p99 < 100 ms; includes the API server round trips and 2 ms polling)",
        pct(latencies.clone(), 0.5),
        pct(latencies.clone(), 0.99)
    );
    let mut worst = latencies.clone();
    worst.sort_by(|a, b| b.total_cmp(a));
    println!(
        "  p90 {:.0} ms, slowest 5: {:.0?} ms",
        pct(latencies, 0.9),
        &worst[..worst.len().min(5)]
    );
    let q = quiet.as_secs_f64();
    println!(
        "  steady state before the changes ({q:.0}s): {:.1} reconciles/s, {:.1} ms CPU per reconcile, operator {:.0}% of a core, machine {:.0}% busy",
        q_rec / q,
        if q_rec > 0.0 { (q_cpu1 - q_cpu0) * 1e3 / q_rec } else { 0.0 },
        (q_cpu1 - q_cpu0) * 100.0 / q,
        busy_share(q_busy0, q_busy1)
    );
    let waits = acq.0 - acq0.0;
    println!(
        "  connection waits during the changes: {waits:.0}, mean {:.1} ms, {:.0} over 10 ms; machine {:.0}% busy",
        if waits > 0.0 { (acq.1 - acq0.1) * 1e3 / waits } else { 0.0 },
        waits - (acq.2 - acq0.2),
        busy_share(busy0, busy)
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
