//! `lockstep operator`: /metrics, /healthz and /readyz; the leader Lease; and, while leading, the
//! controllers on shared watches with the sweep that ends purge loops of deleted InboxTables.

pub mod conditions;
pub mod controller;
pub mod metrics;
pub mod policy;
pub mod purges;

use std::{collections::HashSet, sync::Arc, time::Duration};

use kube::{runtime::events::Reporter, Client, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    clients::cache::IDLE_EVICTION,
    clients::db::Pools,
    clients::http::Health,
    clients::leader::LeaderElector,
    config::OperatorArgs,
    operator::controller::{dedup_policy, inbox_table, outbox_relay, watches::Watches, Caches, Context, Timing},
    operator::metrics::Metrics,
    operator::purges::Purges,
};

/// How long a Lease holds without renewal.
const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often purge loops of deleted InboxTables are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Run the operator until `stop` is cancelled. With leader election, controllers run only while
/// this replica holds the Lease; losing it ends the run with an error (the Pod restarts).
pub async fn run(client: Client, args: OperatorArgs, stop: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let render = {
        let m = metrics.clone();
        Arc::new(move || m.render())
    };
    let addr = crate::clients::http::serve(args.metrics_addr, render, health.clone(), stop.clone().cancelled_owned()).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");

    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("lockstep-{}", uuid::Uuid::new_v4().simple()));
    let (lead_tx, mut leading) = watch::channel(!args.leader_election);
    // Without leader election the sender is kept here: dropped, it would read as leadership lost.
    let mut lead_tx = Some(lead_tx);
    let elector_stop = CancellationToken::new();
    let elector = args.leader_election.then(|| {
        let e = LeaderElector::new(client.clone(), &args.lease_namespace, &args.lease_name, &identity, LEASE_DURATION);
        tokio::spawn(e.run(lead_tx.take().expect("the sender"), elector_stop.clone()))
    });
    health.ready.store(true, std::sync::atomic::Ordering::Relaxed);

    tracing::info!(%identity, "waiting for leadership");
    tokio::select! {
        _ = stop.cancelled() => { elector_stop.cancel(); return Ok(()); }
        r = leading.wait_for(|l| *l) => { r?; }
    }
    metrics.leader.set(1);
    tracing::info!(%identity, "leading: starting controllers");

    let ctl_stop = CancellationToken::new();
    let controllers = tokio::spawn(run_controllers(
        client,
        args,
        metrics.clone(),
        identity,
        leading.clone(),
        ctl_stop.clone(),
    ));
    let lost = tokio::select! {
        _ = stop.cancelled() => false,
        _ = leading.wait_for(|l| !*l) => true,
    };
    // Said at once: draining the controllers may take a while.
    metrics.leader.set(0);
    ctl_stop.cancel();
    let _ = controllers.await;
    elector_stop.cancel();
    if let Some(e) = elector {
        let _ = e.await;
    }
    drop(lead_tx);
    if lost {
        anyhow::bail!("lost the leader Lease; exiting so a fresh replica can take over");
    }
    Ok(())
}

async fn run_controllers(
    client: Client,
    args: OperatorArgs,
    metrics: Arc<Metrics>,
    identity: String,
    leading: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let reporter = Reporter {
        controller: "lockstep-operator".into(),
        instance: Some(identity),
    };
    let mut watches = Watches::new(&client, &args.watch_namespaces);
    let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
    let ctx = Arc::new(Context {
        recorder: controller::events::Events::new(client.clone(), reporter),
        client,
        pools: Pools::new(args.db_pool_size),
        metrics: metrics.clone(),
        // Purge loops read the Lease themselves: reconciles still draining after it was lost
        // cannot start one, and running ones stop before their next batch.
        purges: Purges::new(done_tx, metrics, leading),
        admins: Default::default(),
        poolers: Default::default(),
        relay_applies: Default::default(),
        unowned: Default::default(),
        lag_clients: Default::default(),
        caches: Caches {
            inboxes: watches.inboxes.store(),
            policies: watches.policies.store(),
            namespaces: watches.namespaces.store(),
            relays: watches.relays.store(),
        },
        timing: Timing::default(),
        refreshes: (args.refresh_concurrency > 0).then(|| Arc::new(tokio::sync::Semaphore::new(args.refresh_concurrency as usize))),
        relay_image: args.relay_image.clone(),
        relay_image_prefixes: crate::operator::controller::relay_image::prefixes(&args.relay_image, &args.relay_image_prefixes),
    });
    let shutdown = || stop.clone().cancelled_owned();
    let inbox = inbox_table::controller(&mut watches, done_rx, ctx.clone(), shutdown());
    let policy = dedup_policy::controller(&mut watches, ctx.clone(), shutdown());
    let relay = outbox_relay::controller(&mut watches, ctx.clone(), shutdown());
    let watching = async {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = watches.run() => {}
        }
    };
    futures::future::join5(inbox, policy, relay, sweep(&ctx, &stop), watching).await;
    ctx.purges.retain(|_| false);
}

/// End the purge loops of InboxTables that are gone; forget clients no resource uses any more.
async fn sweep(ctx: &Context, stop: &CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                // Leadership lost (or shutdown): no purge may run on while controllers drain.
                ctx.purges.retain(|_| false);
                break;
            }
            _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
        }
        let live: HashSet<String> = ctx.caches.inboxes.state().iter().filter_map(|o| o.uid()).collect();
        ctx.purges.retain(|uid| live.contains(uid));
        let relays: HashSet<String> = ctx.caches.relays.state().iter().filter_map(|o| o.uid()).collect();
        ctx.relay_applies.retain(|uid| relays.contains(uid));
        let (pools, admins) = (ctx.pools.evict_idle(IDLE_EVICTION), ctx.admins.evict_idle(IDLE_EVICTION));
        let consumers = ctx.lag_clients.evict_idle(IDLE_EVICTION);
        if pools + admins + consumers > 0 {
            tracing::info!(pools, admins, consumers, "dropped clients no resource used for {IDLE_EVICTION:?}");
        }
        let trim = std::time::Instant::now();
        release_free_memory();
        tracing::debug!(elapsed_us = trim.elapsed().as_micros() as u64, "returned free memory to the OS");
    }
}

/// Hand memory freed after a burst of reconciles back to the OS: glibc keeps freed pages in its
/// arenas, so the resident size would stay at the burst's peak.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
