//! The broker checks' gathering: the operations lockstep runs, tried with the client settings it
//! would use (TLS/SASL included), each answer judged in `broker_verdicts`. Nothing is written:
//! topic creation and config changes are sent validate-only, and the idempotent producer only
//! asks for its producer id.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::executor::block_on;
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication},
    client::{ClientContext, DefaultClientContext},
    config::ClientConfig,
    config::RDKafkaLogLevel,
    consumer::{BaseConsumer, Consumer, ConsumerContext},
    error::{KafkaError, RDKafkaErrorCode},
    producer::{BaseProducer, Producer, ProducerContext},
    Statistics, TopicPartitionList,
};

use super::{
    args::BrokerTarget,
    broker_verdicts::{self as v, Op, Refusal},
    database::TargetKind,
    Check,
};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Every broker check of `lockstep doctor`; None: no bootstrap servers were given.
pub async fn checks(target: Option<&BrokerTarget>) -> Vec<Check> {
    let Some(t) = target.cloned() else {
        return vec![Check::warn(
            "broker",
            "not checked: no --bootstrap-servers",
            "pass the bootstrap servers and the --kafka-config settings lockstep uses to check the broker too",
        )];
    };
    tokio::task::spawn_blocking(move || gather(&t)).await.unwrap_or_else(|e| {
        vec![Check::fail(
            "broker",
            format!("the broker checks stopped: {e}"),
            "report this as a bug",
        )]
    })
}

fn config(t: &BrokerTarget) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, val) in &t.settings {
        c.set(k, val);
    }
    c.set("bootstrap.servers", &t.bootstrap)
        .set("socket.timeout.ms", TIMEOUT.as_millis().to_string());
    c
}

/// A client error as a refusal, with no setting's value in its text (they may be secrets).
fn refusal(e: &KafkaError, t: &BrokerTarget) -> Refusal {
    Refusal {
        code: e.rdkafka_error_code(),
        message: crate::clients::kafka::config_error_text(e, t.settings.values().map(String::as_str)),
    }
}

fn code_refusal(code: RDKafkaErrorCode) -> Refusal {
    Refusal {
        code: Some(code),
        message: code.to_string(),
    }
}

/// A topic as the metadata shows it: replicas of partition 0 and the partition count.
struct Topic {
    replicas: i32,
    partitions: i32,
}

/// Settings the operator refuses in a Secret: a warning each (the relay and this check may read
/// files); Err when one loads code, which nothing here loads either.
fn settings_checks(t: &BrokerTarget) -> Result<Vec<Check>, Check> {
    let mut out = Vec::new();
    for (k, val) in &t.settings {
        let Some(why) = crate::core::kafka_settings::operator_refuses(k, val) else {
            continue;
        };
        let name = format!("kafka setting {k}");
        if crate::core::kafka_settings::CODE_LOADING_SETTINGS.contains(&k.trim().to_ascii_lowercase().as_str()) {
            return Err(Check::fail(
                name,
                format!("{why}: refused by lockstep"),
                "leave it out of the settings",
            ));
        }
        out.push(Check::warn(
            name,
            format!("{why}: the operator refuses it in kafka.authSecretRef (the relay and this check may use it)"),
            "in the Secret the operator reads, give the PEM itself (ssl.ca.pem, ssl.certificate.pem, ssl.key.pem)",
        ));
    }
    Ok(out)
}

fn gather(t: &BrokerTarget) -> Vec<Check> {
    let mut out = match settings_checks(t) {
        Ok(warnings) => warnings,
        Err(refused) => return vec![refused],
    };
    let mut cfg = config(t);
    cfg.set("group.id", t.group.as_deref().unwrap_or("lockstep-doctor"));
    let quiet = Quiet::default();
    let consumer: BaseConsumer<Quiet> = match cfg.create_with_context(quiet.clone()) {
        Ok(c) => c,
        Err(e) => {
            out.push(v::unreachable(&t.bootstrap, &refusal(&e, t).message));
            return out;
        }
    };
    let md = match consumer.fetch_metadata(None, TIMEOUT) {
        Ok(md) => md,
        Err(e) => {
            // librdkafka's own account (a failed TLS handshake, a refused SASL login) says more;
            // it is queued as an event until the client is polled.
            let _ = consumer.poll(Duration::from_millis(200));
            let said = quiet
                .last()
                .map(|r| crate::core::kafka_settings::scrub(&r, t.settings.values().map(String::as_str)));
            out.push(v::unreachable(&t.bootstrap, &said.unwrap_or_else(|| refusal(&e, t).message)));
            return out;
        }
    };
    let protocol = t.settings.get("security.protocol").map_or("PLAINTEXT", String::as_str);
    let mut out = vec![Check::pass(
        "broker connection",
        format!(
            "reached {} ({} broker{}, security.protocol {protocol})",
            t.bootstrap,
            md.brokers().len(),
            if md.brokers().len() == 1 { "" } else { "s" }
        ),
    )];
    let mut topics = BTreeMap::new();
    for name in &t.topics {
        match md.topics().iter().find(|m| m.name() == name.as_str() && m.error().is_none()) {
            Some(m) => {
                let replicas = m.partitions().first().map_or(0, |p| p.replicas().len() as i32);
                topics.insert(
                    name.clone(),
                    Topic {
                        replicas,
                        partitions: m.partitions().len() as i32,
                    },
                );
            }
            None => out.push(Check::pass(format!("topic {name}"), "does not exist yet")),
        }
    }
    out.extend(topic_checks(t, &topics, &consumer));
    if t.kind == TargetKind::OutboxRelay {
        out.push(v::operation(Op::IdempotentProduce, "cluster", &idempotent_produce(t)));
    }
    if let Some(group) = &t.group {
        out.push(match describe_group(&consumer, &topics) {
            Some(r) => v::operation(Op::DescribeGroup, group, &r),
            None => Check::warn(
                format!("{} {group}", Op::DescribeGroup.check_name()),
                "not checked: none of the --topic topics exists",
                "name the topics the group consumes (spec.sources.topics) with --topic",
            ),
        });
    }
    out
}

/// DescribeConfigs, min.insync.replicas, CreateTopics and IncrementalAlterConfigs (validate-only).
fn topic_checks(t: &BrokerTarget, topics: &BTreeMap<String, Topic>, consumer: &BaseConsumer<Quiet>) -> Vec<Check> {
    let admin: AdminClient<DefaultClientContext> = match config(t).create() {
        Ok(a) => a,
        Err(e) => return vec![v::unreachable(&t.bootstrap, &refusal(&e, t).message)],
    };
    let options = || AdminOptions::new().request_timeout(Some(TIMEOUT)).operation_timeout(Some(TIMEOUT));
    let (opts, validate) = (options(), options().validate_only(true));
    let honoured = t.topics.iter().any(|n| !topics.contains_key(n)) && validate_only_honoured(&admin, &validate, consumer, t);
    let mut out = Vec::new();
    for name in &t.topics {
        if topics.contains_key(name) || honoured {
            out.push(v::operation(Op::CreateTopics, name, &create(&admin, &validate, name, t)));
        } else {
            out.push(Check::warn(
                format!("{} {name}", Op::CreateTopics.check_name()),
                "not tried: this broker ignores validate-only requests (it would create the topic)",
                "make sure the client's principal may create it (Create on the topic or the cluster)",
            ));
        }
        let Some(topic) = topics.get(name) else { continue };
        let described = block_on(admin.describe_configs([&ResourceSpecifier::Topic(name)], &opts));
        let entries = match described.map(|mut r| r.pop()) {
            Ok(Some(Ok(res))) => Ok(res
                .entries
                .into_iter()
                .filter_map(|e| e.value.map(|val| (e.name, val)))
                .collect::<BTreeMap<_, _>>()),
            Ok(Some(Err(code))) => Err(code_refusal(code)),
            Ok(None) => Err(code_refusal(RDKafkaErrorCode::InvalidRequest)),
            Err(e) => Err(refusal(&e, t)),
        };
        out.push(v::operation(
            Op::DescribeConfigs,
            name,
            &entries.as_ref().map(|_| ()).map_err(Clone::clone),
        ));
        let Ok(entries) = entries else { continue };
        let isr = entries.get("min.insync.replicas").and_then(|s| s.parse().ok());
        out.push(v::min_insync(name, (topic.partitions > 0).then_some(topic.replicas), isr));
        out.push(alter_configs(&admin, name, &entries));
    }
    out
}

/// CreateTopics with `opts` (validate-only); a topic that exists answers TopicAlreadyExists,
/// which means the request was allowed.
fn create(admin: &AdminClient<DefaultClientContext>, opts: &AdminOptions, name: &str, t: &BrokerTarget) -> Result<(), Refusal> {
    let new = NewTopic::new(name, 1, TopicReplication::Fixed(1));
    match block_on(admin.create_topics([&new], opts)) {
        Err(e) => Err(refusal(&e, t)),
        Ok(r) => match r.into_iter().next() {
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) | Some(Ok(_)) | None => Ok(()),
            Some(Err((_, code))) => Err(code_refusal(code)),
        },
    }
}

/// Whether the broker honours validate-only CreateTopics (tansu does not: it creates the topic),
/// tried with a topic of lockstep-doctor's own, deleted again if it was made. A refusal counts as
/// honoured: brokers that authorize are Kafka's, which honour it.
fn validate_only_honoured(
    admin: &AdminClient<DefaultClientContext>,
    validate: &AdminOptions,
    consumer: &BaseConsumer<Quiet>,
    t: &BrokerTarget,
) -> bool {
    let probe = format!("lockstep-doctor-probe-{}", uuid::Uuid::new_v4().simple());
    if create(admin, validate, &probe, t).is_err() {
        return true;
    }
    let made = consumer
        .fetch_metadata(Some(&probe), TIMEOUT)
        .is_ok_and(|md| md.topics().iter().any(|m| m.name() == probe && m.error().is_none()));
    if made {
        let opts = AdminOptions::new().request_timeout(Some(TIMEOUT)).operation_timeout(Some(TIMEOUT));
        let _ = block_on(admin.delete_topics(&[probe.as_str()], &opts));
    }
    !made
}

/// IncrementalAlterConfigs, validate-only, writing back a value the topic has (so that a broker
/// that ignored validate-only would still change nothing).
fn alter_configs(admin: &AdminClient<DefaultClientContext>, topic: &str, entries: &BTreeMap<String, String>) -> Check {
    let key = ["retention.ms", "cleanup.policy", "min.insync.replicas"]
        .into_iter()
        .find(|k| entries.contains_key(*k));
    let Some(key) = key else {
        return Check::warn(
            format!("{} {topic}", Op::AlterConfigs.check_name()),
            "not tried: the broker reported no config value to send back unchanged",
            "make sure the client's principal has AlterConfigs on the topic",
        );
    };
    let set = [(key.to_owned(), entries[key].clone())];
    let r = crate::clients::kafka::incremental_alter_configs(admin, topic, &set, TIMEOUT, true).map_err(|e| Refusal {
        code: error_code_in(&e.to_string()),
        message: e.to_string(),
    });
    v::operation(Op::AlterConfigs, topic, &r)
}

/// The error code librdkafka names in a message (`Broker: Topic authorization failed`).
fn error_code_in(message: &str) -> Option<RDKafkaErrorCode> {
    use RDKafkaErrorCode::*;
    [
        TopicAuthorizationFailed,
        ClusterAuthorizationFailed,
        UnsupportedVersion,
        InvalidRequest,
    ]
    .into_iter()
    .find(|c| message.contains(&c.to_string()))
}

/// The main client's context: librdkafka's logs are not printed (the report says what failed),
/// its last error is kept for the report.
#[derive(Default, Clone)]
struct Quiet(Arc<Mutex<Option<String>>>);

impl Quiet {
    fn last(&self) -> Option<String> {
        self.0.lock().ok().and_then(|l| l.clone())
    }
}

impl ClientContext for Quiet {
    fn log(&self, _: RDKafkaLogLevel, _: &str, _: &str) {}
    fn error(&self, _: KafkaError, reason: &str) {
        if let Ok(mut last) = self.0.lock() {
            *last = Some(reason.to_owned());
        }
    }
}

impl ConsumerContext for Quiet {}

/// Keeps the idempotent producer's state from its statistics.
#[derive(Default, Clone)]
struct IdempState(Arc<Mutex<Option<String>>>);

impl ClientContext for IdempState {
    /// A fatal error is read with `fatal_error`: its log lines would only repeat it.
    fn log(&self, _: RDKafkaLogLevel, _: &str, _: &str) {}
    fn stats(&self, s: Statistics) {
        if let (Some(eos), Ok(mut state)) = (s.eos, self.0.lock()) {
            *state = Some(eos.idemp_state);
        }
    }
}

impl ProducerContext for IdempState {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// The relay's producer settings; its producer id assigned (InitProducerId) within the timeout.
fn idempotent_produce(t: &BrokerTarget) -> Result<(), Refusal> {
    let state = IdempState::default();
    let mut cfg = config(t);
    cfg.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("statistics.interval.ms", "100");
    let producer: BaseProducer<IdempState> = cfg.create_with_context(state.clone()).map_err(|e| refusal(&e, t))?;
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        producer.poll(Duration::from_millis(100));
        if let Some((code, message)) = producer.client().fatal_error() {
            return Err(Refusal { code: Some(code), message });
        }
        if state.0.lock().ok().and_then(|s| s.clone()).as_deref() == Some("Assigned") {
            return Ok(());
        }
    }
    let last = state.0.lock().ok().and_then(|s| s.clone()).unwrap_or_else(|| "unknown".into());
    Err(Refusal {
        code: None,
        message: format!("no producer id within {TIMEOUT:?} (idempotence state {last})"),
    })
}

/// OffsetFetch of the group on the topics' partitions: what the operator reads for an
/// InboxTable's lag (`consumer_lag`); it needs Describe on the group and on the topics.
fn describe_group(consumer: &BaseConsumer<Quiet>, topics: &BTreeMap<String, Topic>) -> Option<Result<(), Refusal>> {
    let mut tpl = TopicPartitionList::new();
    for (name, t) in topics {
        for p in 0..t.partitions {
            tpl.add_partition(name, p);
        }
    }
    if tpl.count() == 0 {
        return None;
    }
    Some(consumer.committed_offsets(tpl, TIMEOUT).map(drop).map_err(|e| Refusal {
        code: e.rdkafka_error_code(),
        message: e.to_string(),
    }))
}
