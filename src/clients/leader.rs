//! Leader election with a coordination.k8s.io Lease, so several operator replicas are safe: only the
//! holder reconciles. The holder renews every third of the lease duration; a standby takes over
//! once the lease has not been renewed for a whole duration, or at once when the holder releases it.
//!
//! Two clocks are involved: the standby takes over at `renewTime + duration` by its own, so the
//! holder must stop leading earlier by its own. It steps down at two thirds of the duration after
//! the start of its last successful renewal (client-go's renew deadline), even while a renewal is
//! still hanging on a partitioned network; the last third is the margin for clock skew.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    api::{Api, PostParams},
    Client,
};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaderElector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> Self {
        LeaderElector {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    fn spec(&self, now: Timestamp, acquire: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: Some(acquire.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One attempt to acquire or renew. Ok(true): we hold the lease now.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now, None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);
        let new_spec = if holder == self.identity {
            self.spec(now, spec.acquire_time.clone(), transitions)
        } else {
            let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
                (Some(r), Some(d)) => r.0 + SignedDuration::from_secs(i64::from(d)) < now,
                _ => true,
            };
            if !holder.is_empty() && !expired {
                return Ok(false);
            }
            self.spec(now, None, transitions + 1)
        };
        lease.spec = Some(new_spec);
        // replace carries the resourceVersion we read: a concurrent change makes this a 409.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the lease up so a standby takes over at once.
    pub async fn release(&self) -> Result<(), kube::Error> {
        if let Some(mut lease) = self.api.get_opt(&self.name).await? {
            let mut spec = lease.spec.clone().unwrap_or_default();
            if spec.holder_identity.as_deref() == Some(self.identity.as_str()) {
                spec.holder_identity = None;
                spec.renew_time = None;
                lease.spec = Some(spec);
                self.api.replace(&self.name, &PostParams::default(), &lease).await?;
            }
        }
        Ok(())
    }

    /// Keep trying to acquire and renew until `stop`; `leading` says whether we hold the lease.
    /// A holder that cannot renew within the renew deadline reports that it lost the lease, at the
    /// deadline, whether or not its renewal has answered.
    pub async fn run(self, leading: watch::Sender<bool>, stop: CancellationToken) {
        let renew_deadline = self.duration * 2 / 3;
        let renew_every = self.duration / 3;
        let retry = (self.duration / 7).max(Duration::from_millis(200));
        let set = |holding: bool| {
            leading.send_if_modified(|l| std::mem::replace(l, holding) != holding);
        };
        let mut valid_until: Option<Instant> = None;
        loop {
            let started = Instant::now();
            let attempt = tokio::time::timeout(renew_deadline, self.try_acquire());
            tokio::pin!(attempt);
            let outcome = loop {
                let expiry = valid_until.filter(|u| *u > Instant::now());
                tokio::select! {
                    r = &mut attempt => break r,
                    _ = tokio::time::sleep_until(expiry.unwrap_or_else(Instant::now)), if expiry.is_some() => {
                        set(false);
                        valid_until = None;
                    }
                }
            };
            let renewed = matches!(outcome, Ok(Ok(true)));
            match outcome {
                Ok(Ok(true)) => valid_until = Some(started + renew_deadline),
                Ok(Ok(false)) => valid_until = None,
                Ok(Err(e)) => tracing::warn!(error = %e, lease = %self.name, "leader election: cannot reach the Lease"),
                Err(_) => tracing::warn!(lease = %self.name, "leader election: no answer from the API server"),
            }
            let holding = valid_until.is_some_and(|u| u > Instant::now());
            set(holding);
            // Renewed: again in a third of the duration. Failed or standing by: retry soon.
            let next = started + if renewed { renew_every } else { retry };
            let expiry = valid_until.filter(|_| holding);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(next) => {}
                _ = tokio::time::sleep_until(expiry.unwrap_or(next)), if expiry.is_some_and(|u| u < next) => {
                    set(false);
                    valid_until = None;
                }
            }
        }
        if *leading.borrow() {
            if let Err(e) = self.release().await {
                tracing::warn!(error = %e, "leader election: could not release the Lease");
            }
            let _ = leading.send(false);
        }
    }
}
