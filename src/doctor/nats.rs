//! The NATS checks of `lockstep doctor --broker nats`: connect with the settings the relay would
//! use (credentials and TLS included), ask JetStream for the account's limits, describe the
//! streams and the InboxTable's consumer. Nothing is written. Gathering is thin I/O; `verdicts`
//! is pure.

use crate::{
    clients::nats_admin::{AccountFacts, ConsumerBacklog, NatsAdmin, ObservedStream, ServerFacts},
    core::nats_settings::NatsSettings,
    crd::StreamStorage,
};

use super::{database::TargetKind, Check};

/// What to check on NATS, resolved from the flags.
#[derive(Debug, Clone)]
pub struct NatsTarget {
    /// May hold credentials: never printed.
    pub settings: NatsSettings,
    pub streams: Vec<String>,
    /// An InboxTable's durable consumer.
    pub consumer: Option<String>,
    pub kind: TargetKind,
}

/// What the server answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    pub servers: String,
    pub connected: Result<ServerFacts, String>,
    /// None: not asked (no connection).
    pub account: Option<Result<AccountFacts, String>>,
    pub streams: Vec<(String, Result<Option<ObservedStream>, String>)>,
    /// Per stream: the consumer's backlog.
    pub consumers: Vec<(String, Result<ConsumerBacklog, String>)>,
}

pub async fn checks(t: &NatsTarget) -> Vec<Check> {
    verdicts(&gather(t).await, t)
}

async fn gather(t: &NatsTarget) -> Facts {
    let mut f = Facts {
        servers: t.settings.servers.join(","),
        connected: Err(String::new()),
        account: None,
        streams: vec![],
        consumers: vec![],
    };
    let admin = match NatsAdmin::connect(&t.settings).await {
        Ok(a) => a,
        Err(e) => {
            f.connected = Err(e);
            return f;
        }
    };
    f.connected = Ok(admin.server());
    f.account = Some(admin.account().await);
    if !matches!(f.account, Some(Ok(_))) {
        return f;
    }
    for s in &t.streams {
        f.streams.push((s.clone(), admin.describe(s).await));
        if let Some(c) = &t.consumer {
            f.consumers.push((s.clone(), admin.consumer_backlog(s, c).await));
        }
    }
    f
}

fn limit(v: Option<i64>) -> String {
    v.map_or("unlimited".into(), |n| n.to_string())
}

/// Each check's verdict from the answers. Pure.
pub fn verdicts(f: &Facts, t: &NatsTarget) -> Vec<Check> {
    let server = match &f.connected {
        Ok(s) => s,
        Err(e) => {
            return vec![Check::fail(
                "nats server",
                e.clone(),
                "check the server URLs, the credentials (--nats-user/--nats-password-file, a token, an NKey or a \
                 credentials file, or --nats-secret-dir) and the TLS files",
            )]
        }
    };
    let mut out = vec![Check::pass(
        "nats server",
        format!(
            "connected to {} (nats-server {}, max payload {} bytes)",
            f.servers, server.version, server.max_payload
        ),
    )];
    let account = match &f.account {
        Some(Ok(a)) => a,
        Some(Err(e)) => {
            out.push(Check::fail(
                "jetstream",
                format!("the account's JetStream does not answer: {e}"),
                "enable JetStream on the server (-js, or `jetstream {}` in its config) and for this account",
            ));
            return out;
        }
        None => return out,
    };
    out.push(account_check(account));
    for (name, r) in &f.streams {
        out.push(stream_check(name, r, t.kind, account));
    }
    for (stream, r) in &f.consumers {
        let consumer = t.consumer.as_deref().unwrap_or_default();
        let name = format!("consumer {consumer} of stream {stream}");
        out.push(match r {
            Ok(b) => Check::pass(name, format!("readable: {} pending, {} awaiting ack", b.pending, b.ack_pending)),
            Err(e) => Check::warn(
                name,
                format!("cannot read it: {e}"),
                "the InboxTable reports its lag once the consumer exists and the credentials may read it \
                 ($JS.API.CONSUMER.INFO.<stream>.<consumer>)",
            ),
        });
    }
    out
}

fn account_check(a: &AccountFacts) -> Check {
    let detail = format!(
        "enabled: {} stream(s) of {}, {} bytes stored of {}",
        a.streams,
        limit(a.max_streams),
        a.storage,
        limit(a.max_storage)
    );
    if a.max_streams.is_some_and(|m| a.streams as i64 >= m) {
        return Check::warn(
            "jetstream",
            detail,
            "the account may create no more streams: raise its max_streams, or declare only streams that exist",
        );
    }
    Check::pass("jetstream", detail)
}

fn stream_check(name: &str, r: &Result<Option<ObservedStream>, String>, kind: TargetKind, a: &AccountFacts) -> Check {
    let check = format!("stream {name}");
    match (r, kind) {
        (Err(e), _) => Check::fail(
            check,
            format!("cannot describe it: {e}"),
            format!("let the credentials use $JS.API.STREAM.INFO.{name} (and, for an OutboxRelay, STREAM.CREATE and STREAM.UPDATE)"),
        ),
        (Ok(None), TargetKind::OutboxRelay) if a.max_bytes_required => Check::warn(
            check,
            "absent; the account requires max_bytes on every stream",
            "set spec.nats.streams[].maxBytes, or the operator's create is refused",
        ),
        (Ok(None), TargetKind::OutboxRelay) => Check::pass(check, "absent: the operator creates it from spec.nats.streams"),
        (Ok(None), TargetKind::InboxTable) => Check::fail(
            check,
            "absent",
            "an InboxTable reads a stream an OutboxRelay (or someone) declares: create it first, or fix the name",
        ),
        (Ok(Some(s)), _) => {
            let detail = format!(
                "exists: {} storage, {} replica(s), max_age {}, duplicate_window {}, {} message(s)",
                if s.storage == StreamStorage::Memory { "memory" } else { "file" },
                s.replicas,
                crate::core::duration::format(s.max_age),
                crate::core::duration::format(s.duplicate_window),
                s.messages
            );
            if s.storage == StreamStorage::Memory {
                Check::warn(
                    check,
                    detail,
                    "memory storage loses every message when the server restarts: use file storage",
                )
            } else if s.retention != "limits" {
                Check::warn(
                    check,
                    format!("{detail}; retention {}", s.retention),
                    "lockstep declares limits retention: a consumer's redelivery may not find a message under interest or workqueue retention",
                )
            } else {
                Check::pass(check, detail)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::verdict_of;

    fn target(kind: TargetKind) -> NatsTarget {
        NatsTarget {
            settings: NatsSettings::default(),
            streams: vec!["orders".into()],
            consumer: (kind == TargetKind::InboxTable).then(|| "payments".into()),
            kind,
        }
    }

    fn facts(stream: Result<Option<ObservedStream>, String>) -> Facts {
        Facts {
            servers: "nats://n1:4222".into(),
            connected: Ok(ServerFacts {
                version: "2.9.10".into(),
                jetstream: true,
                max_payload: 1 << 20,
            }),
            account: Some(Ok(AccountFacts::default())),
            streams: vec![("orders".into(), stream)],
            consumers: vec![],
        }
    }

    #[test]
    fn no_connection_is_one_failure_naming_the_servers() {
        let mut f = facts(Ok(None));
        f.connected = Err("cannot connect to NATS at nats://n1:4222: authorization violation".into());
        let c = verdicts(&f, &target(TargetKind::OutboxRelay));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].verdict, super::super::Verdict::Fail);
        assert!(
            c[0].detail.contains("at nats://n1:4222: authorization violation"),
            "{}",
            c[0].detail
        );
    }

    #[test]
    fn no_jetstream_fails() {
        let mut f = facts(Ok(None));
        f.account = Some(Err("jetstream not enabled".into()));
        let c = verdicts(&f, &target(TargetKind::OutboxRelay));
        assert_eq!(verdict_of(&c, "jetstream").0, super::super::Verdict::Fail);
    }

    #[test]
    fn an_absent_stream_is_created_for_a_relay_and_missing_for_an_inbox() {
        use super::super::Verdict::*;
        let f = facts(Ok(None));
        assert_eq!(verdict_of(&verdicts(&f, &target(TargetKind::OutboxRelay)), "stream orders").0, Pass);
        assert_eq!(verdict_of(&verdicts(&f, &target(TargetKind::InboxTable)), "stream orders").0, Fail);
        let mut f = facts(Ok(None));
        f.account = Some(Ok(AccountFacts {
            max_bytes_required: true,
            ..AccountFacts::default()
        }));
        assert_eq!(verdict_of(&verdicts(&f, &target(TargetKind::OutboxRelay)), "stream orders").0, Warn);
    }

    #[test]
    fn a_memory_stream_warns_and_a_denied_describe_fails() {
        use super::super::Verdict::*;
        let s = ObservedStream {
            subjects: vec!["orders.>".into()],
            storage: StreamStorage::Memory,
            replicas: 1,
            max_age: std::time::Duration::from_secs(86400),
            duplicate_window: std::time::Duration::from_secs(120),
            discard: crate::crd::Discard::Old,
            max_bytes: None,
            retention: "limits",
            messages: 0,
        };
        let c = verdicts(&facts(Ok(Some(s))), &target(TargetKind::OutboxRelay));
        assert_eq!(verdict_of(&c, "stream orders").0, Warn);
        let c = verdicts(&facts(Err("permissions violation".into())), &target(TargetKind::OutboxRelay));
        assert_eq!(
            verdict_of(&c, "stream orders"),
            (Fail, "cannot describe it: permissions violation".into())
        );
    }
}
