//! Effectively-once across every hop, as a test: `scripts/chaos` (a private PostgreSQL and tansu)
//! with this build of lockstep: orders committed (and some rolled back) with outbox rows, two
//! relays and two inbox consumers SIGKILLed, the broker paused and restarted, the database
//! restarted once. The run checks the outcome in the database and exits non-zero on any miss;
//! here the fault counts are checked too. Through Kafka (tansu), NATS JetStream and RabbitMQ;
//! CHAOS_EVENTS overrides the 100k events through Kafka, CHAOS_NATS_EVENTS and
//! CHAOS_RABBITMQ_EVENTS the 20k through NATS and RabbitMQ (their runs' consumers take one message
//! at a time, to keep each key's order across consumer processes).

use std::process::Command;

#[test]
fn every_committed_order_is_applied_once_through_faults_on_every_hop() {
    chaos("kafka", &std::env::var("CHAOS_EVENTS").unwrap_or_else(|_| "100000".into()));
}

#[test]
fn every_committed_order_is_applied_once_through_faults_on_every_hop_with_nats() {
    chaos("nats", &std::env::var("CHAOS_NATS_EVENTS").unwrap_or_else(|_| "20000".into()));
}

#[test]
fn every_committed_order_is_applied_once_through_faults_on_every_hop_with_rabbitmq() {
    chaos(
        "rabbitmq",
        &std::env::var("CHAOS_RABBITMQ_EVENTS").unwrap_or_else(|_| "20000".into()),
    );
}

fn chaos(broker: &str, events: &str) {
    let events = events.to_owned();
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/chaos"))
        .env("LOCKSTEP_BIN", env!("CARGO_BIN_EXE_lockstep"))
        .env("CHAOS_BROKER", broker)
        .args(["--events", &events, "--faults", "20"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run scripts/chaos");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "chaos run failed ({}):\n{stdout}", out.status);
    let faults = stdout.lines().find_map(|l| l.split_once("faults: ")).expect("fault summary").1;
    // "relay SIGKILLs 20, consumer SIGKILLs 20, broker pauses 10 and restarts 10, database restarts 1; ..."
    let count = |what: &str| -> u32 {
        faults
            .split([',', ';'])
            .flat_map(|part| part.split(" and "))
            .find_map(|p| p.trim().strip_prefix(what).map(|n| n.trim().parse().unwrap()))
            .unwrap_or_else(|| panic!("{what} not in {faults}"))
    };
    assert!(count("relay SIGKILLs ") >= 20, "{faults}");
    assert!(count("consumer SIGKILLs ") >= 20, "{faults}");
    assert!(count("broker pauses ") + count("restarts ") >= 20, "{faults}");
    assert!(count("restarts ") >= 1 && count("broker pauses ") >= 1, "{faults}");
    assert!(count("database restarts ") >= 1, "{faults}");
    let committed: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("committed orders: "))
        .and_then(|l| l.split(';').next())
        .expect("committed orders")
        .parse()
        .unwrap();
    assert!(committed >= events.parse().unwrap());
    assert!(stdout.contains("PASS: every committed order's effect applied exactly once"));
}
