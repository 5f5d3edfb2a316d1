//! `status.consumerLag` of an InboxTable that names `sources.kafka.consumerGroup`: outbox age
//! (OutboxRelay `status.lag`) plus this gives the end-to-end picture.

use std::time::Duration;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

use super::{deps, Context};
use crate::{
    clients::consumer_lag,
    crd::{ConsumerLagStatus, TopicLag, ValidInboxTable},
    operator::conditions::{condition, Status},
};

/// Measure the group's (or the JetStream consumer's) lag; on failure keep the last figures and
/// say why. None: no group or consumer named.
pub async fn measure(ctx: &Context, ns: &str, v: &ValidInboxTable, previous: Option<&ConsumerLagStatus>) -> Option<ConsumerLagStatus> {
    let on = deps::Reporting {
        type_: condition::DEDUP_COVERED,
        status: Status::Unknown,
    };
    if let Some(r) = &v.rabbitmq_source {
        let name = r.queues.join(",");
        return Some(or_previous(name, queue_backlog(ctx, ns, r, on).await, previous));
    }
    if let Some(n) = v.nats_source.as_ref().filter(|n| n.consumer.is_some()) {
        let consumer = n.consumer.clone()?;
        let measured = nats_backlog(ctx, ns, n, &consumer, on).await;
        return Some(or_previous(consumer, measured, previous));
    }
    let k = v.sources.as_ref()?;
    let group = k.consumer_group.clone()?;
    let measured = match deps::kafka_settings(&ctx.client, ns, k.auth_secret.as_deref(), on).await {
        Err(c) => Err(c.message),
        Ok(settings) => {
            consumer_lag::measure(
                &ctx.lag_clients,
                &k.bootstrap_servers,
                &settings,
                &group,
                &k.topics,
                Duration::from_secs(5),
            )
            .await
        }
    };
    let now = Timestamp::now();
    Some(or_previous(group.clone(), measured.map(|g| status(&group, &g, now)), previous))
}

/// A JetStream consumer's backlog on the first source stream: messages not yet delivered plus
/// those delivered and not acknowledged.
async fn nats_backlog(
    ctx: &Context,
    ns: &str,
    n: &crate::crd::ValidNatsSource,
    consumer: &str,
    on: deps::Reporting,
) -> Result<ConsumerLagStatus, String> {
    let stream = n.streams.first().ok_or("no source stream")?;
    let settings = super::nats_deps::nats_settings(&ctx.client, ns, &n.servers, n.auth_secret.as_deref(), on)
        .await
        .map_err(|c| c.message)?;
    let admin = crate::clients::nats_admin::NatsAdmin::connect(&settings).await?;
    let b = admin.consumer_backlog(stream, consumer).await?;
    Ok(ConsumerLagStatus {
        group: consumer.to_owned(),
        messages: (b.pending + b.ack_pending) as i64,
        oldest_unconsumed_age_seconds: None,
        topics: vec![TopicLag {
            topic: stream.clone(),
            messages: (b.pending + b.ack_pending) as i64,
        }],
        error: None,
        measured_at: Time(Timestamp::now()),
    })
}

/// RabbitMQ queues' backlog: ready plus unacknowledged messages, per queue (`group` names the
/// queues). Read over the management API, whose counts are a few seconds old.
async fn queue_backlog(
    ctx: &Context,
    ns: &str,
    r: &crate::crd::ValidRabbitmqSource,
    on: deps::Reporting,
) -> Result<ConsumerLagStatus, String> {
    let m = super::rabbitmq_deps::Management {
        url: &r.management_url,
        vhost: &r.vhost,
        secret: r.auth_secret.as_deref(),
        field: "sources.rabbitmq.authSecretRef",
    };
    let admin = super::rabbitmq_deps::admin(&ctx.client, ns, m, on).await.map_err(|c| c.message)?;
    let mut topics = Vec::new();
    for q in &r.queues {
        let found = admin.queue(q).await?.ok_or_else(|| format!("queue {q} not found"))?;
        topics.push(TopicLag {
            topic: q.clone(),
            messages: (found.ready + found.unacked) as i64,
        });
    }
    Ok(ConsumerLagStatus {
        group: r.queues.join(","),
        messages: topics.iter().map(|t| t.messages).sum(),
        oldest_unconsumed_age_seconds: None,
        topics,
        error: None,
        measured_at: Time(Timestamp::now()),
    })
}

/// The measurement, or on failure the last figures of the same group with why.
fn or_previous(group: String, measured: Result<ConsumerLagStatus, String>, previous: Option<&ConsumerLagStatus>) -> ConsumerLagStatus {
    let now = Timestamp::now();
    match measured {
        Ok(s) => s,
        Err(error) => match previous.filter(|p| p.group == group) {
            Some(p) => ConsumerLagStatus {
                error: Some(error),
                ..p.clone()
            },
            None => ConsumerLagStatus {
                group,
                messages: 0,
                oldest_unconsumed_age_seconds: None,
                topics: vec![],
                error: Some(error),
                measured_at: Time(now),
            },
        },
    }
}

/// The status of a measurement taken at `now`. Pure.
pub fn status(group: &str, g: &consumer_lag::GroupLag, now: Timestamp) -> ConsumerLagStatus {
    let age = g.oldest_unconsumed_ms.map(|ms| {
        let secs = (now.as_millisecond() - ms).max(0) as f64 / 1000.0;
        (secs * 1000.0).round() / 1000.0
    });
    ConsumerLagStatus {
        group: group.to_owned(),
        messages: g.total(),
        oldest_unconsumed_age_seconds: age,
        topics: g
            .per_topic()
            .into_iter()
            .map(|(topic, messages)| TopicLag { topic, messages })
            .collect(),
        error: None,
        measured_at: Time(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use consumer_lag::{GroupLag, PartitionLag};

    #[test]
    fn status_sums_partitions_and_ages_the_oldest_message() {
        let part = |partition, committed, high| PartitionLag {
            topic: "orders".into(),
            partition,
            committed,
            low: 0,
            high,
        };
        let g = GroupLag {
            partitions: vec![part(0, Some(3), 10), part(1, None, 2)],
            oldest_unconsumed_ms: Some(1_000),
        };
        let now = Timestamp::from_millisecond(4_500).unwrap();
        let s = status("billing", &g, now);
        assert_eq!((s.messages, s.oldest_unconsumed_age_seconds), (9, Some(3.5)));
        assert_eq!(
            s.topics,
            vec![TopicLag {
                topic: "orders".into(),
                messages: 9
            }]
        );
    }
}
