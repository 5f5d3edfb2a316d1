//! Leader election on a real Lease: one holder at a time; a released lease is taken at once, an
//! abandoned one after its duration.

mod common;

use std::time::Duration;

use lockstep::clients::leader::LeaderElector;

#[tokio::test]
async fn one_leader_then_handover() {
    let client = common::kube_client().await;
    let ns = common::TestNamespace::new(&client, "lease").await;
    let lease = "lockstep-operator";
    let a = LeaderElector::new(client.clone(), &ns.name, lease, "replica-a", Duration::from_secs(3));
    let b = LeaderElector::new(client.clone(), &ns.name, lease, "replica-b", Duration::from_secs(3));

    assert!(a.try_acquire().await.unwrap(), "the first replica takes the free lease");
    assert!(!b.try_acquire().await.unwrap(), "the second stands by");
    assert!(a.try_acquire().await.unwrap(), "the holder renews");
    assert!(!b.try_acquire().await.unwrap());

    // Released on shutdown: taken over at once.
    a.release().await.unwrap();
    assert!(b.try_acquire().await.unwrap(), "a released lease is taken at once");
    assert!(!a.try_acquire().await.unwrap());

    // Abandoned (holder died without releasing): taken over after the lease duration, not before.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!a.try_acquire().await.unwrap(), "still held within its duration");
    common::wait_until(Duration::from_secs(10), "takeover after expiry", || async {
        a.try_acquire().await.unwrap().then_some(())
    })
    .await;
    assert!(!b.try_acquire().await.unwrap(), "the old holder does not get it back");
    ns.delete().await;
}

#[tokio::test]
async fn run_reports_leadership_and_releases_on_stop() {
    let client = common::kube_client().await;
    let ns = common::TestNamespace::new(&client, "lease-run").await;
    let a = LeaderElector::new(client.clone(), &ns.name, "op", "a", Duration::from_secs(3));
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(a.run(tx, stop.clone()));
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|l| *l))
        .await
        .expect("becomes leader")
        .unwrap();
    stop.cancel();
    task.await.unwrap();
    assert!(!*rx.borrow(), "not leading after stop");
    let b = LeaderElector::new(client.clone(), &ns.name, "op", "b", Duration::from_secs(3));
    assert!(b.try_acquire().await.unwrap(), "released on stop");
    ns.delete().await;
}

/// `--leader-election=false` runs the controllers until stopped (it used to exit at once, reading
/// the absent elector as a lost Lease).
#[tokio::test]
async fn without_leader_election_the_operator_runs_until_stopped() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::TestNamespace::new(&client, "no-election").await;
    let args = lockstep::config::OperatorArgs {
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        watch_namespaces: vec![ns.name.clone()],
        leader_election: false,
        lease_name: "unused".into(),
        lease_namespace: ns.name.clone(),
        identity: None,
        relay_image: "lockstep:test".into(),
        relay_image_prefixes: vec![],
        db_pool_size: 4,
        refresh_concurrency: 4,
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(lockstep::operator::run(client, args, stop.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!run.is_finished(), "the operator stopped by itself: {:?}", run.await);
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("stops when asked")
        .unwrap()
        .expect("a clean stop");
    ns.delete().await;
}

/// Issue 12 item 7: a holder cut off from the API server (its renewals hang) must stop leading
/// before a standby can take over by its own clock, not a whole lease duration after its last
/// renewal, and not only once the hanging request gives up.
#[tokio::test]
async fn a_partitioned_holder_steps_down_before_the_standby_takes_over() {
    let client = common::kube_client().await;
    let ns = common::TestNamespace::new(&client, "lease-cut").await;
    let mut cfg = kube::Config::infer().await.expect("kubeconfig");
    let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], cfg.cluster_url.port_u16().expect("API server port")));
    let proxy = common::proxy::Proxy::start_raw(upstream).await;
    cfg.cluster_url = format!("https://{}", proxy.addr).parse().unwrap();
    let cut_off = kube::Client::try_from(cfg).expect("client through the proxy");
    let lease_duration = Duration::from_secs(6);

    let (a_tx, mut a_rx) = tokio::sync::watch::channel(false);
    let (b_tx, mut b_rx) = tokio::sync::watch::channel(false);
    let stop = tokio_util::sync::CancellationToken::new();
    let a = LeaderElector::new(cut_off, &ns.name, "op", "a", lease_duration);
    let b = LeaderElector::new(client.clone(), &ns.name, "op", "b", lease_duration);
    let a_task = tokio::spawn(a.run(a_tx, stop.clone()));
    tokio::time::timeout(Duration::from_secs(10), a_rx.wait_for(|l| *l))
        .await
        .expect("a leads")
        .unwrap();
    let b_task = tokio::spawn(b.run(b_tx, stop.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(*a_rx.borrow() && !*b_rx.borrow(), "a leads, b stands by");

    proxy.blackhole().await;
    let cut = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(30), a_rx.wait_for(|l| !*l))
        .await
        .expect("a steps down")
        .unwrap();
    let a_stopped = cut.elapsed();
    assert!(!*b_rx.borrow(), "b took over while a still led");
    tokio::time::timeout(Duration::from_secs(30), b_rx.wait_for(|l| *l))
        .await
        .expect("b takes over")
        .unwrap();
    let b_started = cut.elapsed();
    println!("cut at 0 s: a stepped down at {a_stopped:?}, b took over at {b_started:?}");
    assert!(a_stopped <= lease_duration * 2 / 3, "a stepped down {a_stopped:?} after the cut");
    assert!(b_started > a_stopped);
    stop.cancel();
    b_task.await.unwrap();
    a_task.abort();
    ns.delete().await;
}

/// Issue "Step 12": an operator given several namespaces (`--watch-namespace=a,b`) reconciles the
/// objects of those and leaves every other namespace alone, from one merged cache.
#[tokio::test]
async fn an_operator_watching_two_namespaces_reconciles_only_those() {
    use kube::api::{Api, PostParams};
    use lockstep::crd::InboxTable;
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let a = common::TestNamespace::new(&client, "watch-a").await;
    let b = common::TestNamespace::new(&client, "watch-b").await;
    let other = common::TestNamespace::new(&client, "watch-other").await;
    let inbox = |secret: &str| -> InboxTable {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "lockstep.dev/v1alpha1", "kind": "InboxTable", "metadata": {"name": "orders"},
            "spec": {"database": {"urlSecretRef": {"name": secret}, "schema": "s", "table": "inbox"}}
        }))
        .unwrap()
    };
    // One object before the operator starts (its first list), the others after (its watch).
    let api = |ns: &common::TestNamespace| Api::<InboxTable>::namespaced(client.clone(), &ns.name);
    api(&a).create(&PostParams::default(), &inbox("missing")).await.unwrap();
    let args = lockstep::config::OperatorArgs {
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        watch_namespaces: vec![a.name.clone(), b.name.clone()],
        leader_election: false,
        lease_name: "unused".into(),
        lease_namespace: a.name.clone(),
        identity: None,
        relay_image: "lockstep:test".into(),
        relay_image_prefixes: vec![],
        db_pool_size: 4,
        refresh_concurrency: 4,
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(lockstep::operator::run(client.clone(), args, stop.clone()));
    api(&b).create(&PostParams::default(), &inbox("missing")).await.unwrap();
    api(&other).create(&PostParams::default(), &inbox("missing")).await.unwrap();
    let t = Duration::from_secs(60);
    for ns in [&a, &b] {
        common::wait_condition(&api(ns), "orders", "Ready", "False", Some("SecretNotFound"), t).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let untouched = api(&other).get("orders").await.unwrap();
    assert!(
        untouched.status.is_none(),
        "a namespace not watched was reconciled: {:?}",
        untouched.status
    );
    // Deleted while the operator runs: it removes its finalizer, so the namespaces can go.
    for ns in [&a, &b] {
        api(ns).delete("orders", &Default::default()).await.unwrap();
        let objects = api(ns);
        common::wait_until(t, "the InboxTable's finalizer removed", || {
            let objects = objects.clone();
            async move { objects.get_opt("orders").await.unwrap().is_none().then_some(()) }
        })
        .await;
    }
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), run).await.unwrap().unwrap().unwrap();
    for ns in [a, b, other] {
        ns.delete().await;
    }
}
