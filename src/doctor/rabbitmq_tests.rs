use serde_json::json;

use super::*;
use crate::doctor::{verdict_of, Verdict::*};

fn facts(queue: Found) -> Facts {
    Facts {
        server: "r1:5672".into(),
        connected: Ok(Negotiated {
            vhost: "/".into(),
            frame_max: 131072,
            channel_max: 2047,
            heartbeat: 10,
        }),
        exchange: Some(("outbox".into(), Found::Absent)),
        queues: vec![("billing".into(), queue)],
        management: None,
    }
}

fn managed(queue: ObservedQueue, alarms: Result<Vec<String>, String>) -> Management {
    Management {
        url: "http://r1:15672".into(),
        overview: Ok(Overview {
            version: "3.10.8".into(),
            erlang: "25.2".into(),
            cluster: "rabbit@r1".into(),
        }),
        alarms,
        queues: vec![("billing".into(), Ok(Some(queue)))],
    }
}

fn quorum(arguments: serde_json::Value) -> ObservedQueue {
    ObservedQueue {
        type_: "quorum".into(),
        durable: true,
        arguments: serde_json::from_value(arguments).unwrap(),
        ..Default::default()
    }
}

#[test]
fn no_connection_is_one_failure_with_the_servers_words() {
    let mut f = facts(Found::Absent);
    f.connected = Err("cannot connect to RabbitMQ at r1:5672: ACCESS_REFUSED - Login was refused".into());
    let c = verdicts(&f, TargetKind::OutboxRelay);
    assert_eq!(c.len(), 1);
    assert_eq!((c[0].verdict, c[0].name.as_str()), (Fail, "rabbitmq server"));
    assert!(c[0].detail.contains("ACCESS_REFUSED"), "{}", c[0].detail);
}

#[test]
fn an_absent_queue_is_declared_for_a_relay_and_missing_for_an_inbox() {
    let f = facts(Found::Absent);
    let relay = verdicts(&f, TargetKind::OutboxRelay);
    assert_eq!(verdict_of(&relay, "queue billing").0, Pass);
    assert_eq!(verdict_of(&relay, "exchange outbox").0, Pass);
    assert_eq!(verdict_of(&relay, "management api").0, Warn, "not given: said so");
    assert_eq!(verdict_of(&verdicts(&f, TargetKind::InboxTable), "queue billing").0, Fail);
    let failed = facts(Found::Failed("RESOURCE_LOCKED - cannot obtain exclusive access".into()));
    let c = verdicts(&failed, TargetKind::InboxTable);
    assert_eq!(verdict_of(&c, "queue billing").0, Fail);
}

#[test]
fn an_alarm_fails_and_an_unreadable_one_warns() {
    let mut f = facts(Found::Present { messages: 3, consumers: 1 });
    f.management = Some(managed(
        quorum(json!({"x-message-ttl": 86_400_000})),
        Ok(vec!["memory on rabbit@r1".into()]),
    ));
    let c = verdicts(&f, TargetKind::OutboxRelay);
    let (v, detail) = verdict_of(&c, "resource alarms");
    assert_eq!(v, Fail);
    assert!(detail.contains("memory on rabbit@r1"), "{detail}");
    assert!(verdict_of(&c, "management api").1.contains("RabbitMQ 3.10.8"));
    f.management = Some(managed(quorum(json!({})), Err("403 Forbidden".into())));
    assert_eq!(verdict_of(&verdicts(&f, TargetKind::OutboxRelay), "resource alarms").0, Warn);
    f.management = Some(managed(quorum(json!({})), Ok(vec!["file_descriptor_limit on rabbit@r1".into()])));
    assert_eq!(
        verdict_of(&verdicts(&f, TargetKind::OutboxRelay), "resource alarms").0,
        Warn,
        "blocks no publisher"
    );
}

#[test]
fn an_inbox_queue_without_a_time_bound_warns_and_a_transient_one_fails() {
    let mut f = facts(Found::Present { messages: 0, consumers: 0 });
    f.management = Some(managed(quorum(json!({"x-delivery-limit": 5})), Ok(vec![])));
    let (v, detail) = verdict_of(&verdicts(&f, TargetKind::InboxTable), "queue billing settings");
    assert_eq!(v, Warn);
    assert!(detail.contains("delivery limit 5") && detail.contains("nothing bounds"), "{detail}");
    assert_eq!(
        verdict_of(&verdicts(&f, TargetKind::OutboxRelay), "queue billing settings").0,
        Pass,
        "a relay's queue needs no bound"
    );

    let mut ttl = quorum(json!({"x-message-ttl": 86_400_000}));
    ttl.policy = serde_json::from_value(json!({"message-ttl": 3_600_000})).unwrap();
    f.management = Some(managed(ttl, Ok(vec![])));
    let (v, detail) = verdict_of(&verdicts(&f, TargetKind::InboxTable), "queue billing settings");
    assert_eq!((v, detail.as_str()), (Pass, "durable quorum, message TTL 1h"));

    let transient = ObservedQueue {
        type_: "classic".into(),
        durable: false,
        ..Default::default()
    };
    f.management = Some(managed(transient, Ok(vec![])));
    assert_eq!(verdict_of(&verdicts(&f, TargetKind::OutboxRelay), "queue billing settings").0, Fail);
}
