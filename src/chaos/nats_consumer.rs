//! The chaos run's consumer on NATS JetStream: one durable consumer the run's consumer processes
//! share, with one message unacknowledged at a time (so each key's first applications stay in
//! order whichever process gets the next message), acknowledged only after its effect committed.
//! A process killed before its ack leaves the message to be delivered again after `ack_wait`.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;

use super::consumer::{Applier, ConsumeArgs};
use crate::inbox::Delivery;

/// The durable consumer's name.
pub const CONSUMER: &str = "chaos";

pub(super) async fn run(args: &ConsumeArgs, applier: &Applier) -> anyhow::Result<()> {
    let client = async_nats::connect(args.nats_url.as_str()).await?;
    let js = jetstream::new(client);
    loop {
        let messages = async {
            let stream = js.get_stream(super::stream_name(&args.topic)).await?;
            let c = stream
                .get_or_create_consumer(
                    CONSUMER,
                    pull::Config {
                        durable_name: Some(CONSUMER.into()),
                        ack_policy: jetstream::consumer::AckPolicy::Explicit,
                        ack_wait: Duration::from_secs(2),
                        max_ack_pending: 1,
                        ..Default::default()
                    },
                )
                .await?;
            anyhow::Ok(c.messages().await?)
        };
        let mut messages = match messages.await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot pull from the stream; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(m) = messages.next().await {
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "pull");
                    break;
                }
            };
            let Some(d) = Delivery::from_nats(&m) else {
                anyhow::bail!("message on {} has no id header", m.subject);
            };
            applier.apply(&d, &m.payload).await?;
            // A lost ack is a redelivery the inbox drops.
            if let Err(e) = m.ack().await {
                tracing::warn!(error = %e, "ack");
            }
        }
    }
}
