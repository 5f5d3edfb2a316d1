//! Tests of the relay pod (a child of `relay_pod`, in a file of its own for length).

use std::{path::PathBuf, time::Duration};

use clap::CommandFactory;

use super::*;
use crate::{
    config::RelayArgs,
    crd::{OutboxRelay, SecretKeyRef, ValidProducer},
    operator::controller::fixtures::{outbox_relay, outbox_relay_minimal},
};

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    args: RelayArgs,
}

fn valid(o: &OutboxRelay) -> ValidOutboxRelay {
    o.spec.validate().unwrap()
}

/// The container's command line with its environment turned into the flags that read those
/// variables (clap's own `env` names), so no process environment is touched.
fn command_line(c: &Container) -> Vec<String> {
    let args = c.args.clone().unwrap();
    assert_eq!(args[0], "relay", "{args:?}");
    let mut argv = vec!["lockstep".to_owned()];
    argv.extend(args[1..].iter().cloned());
    let cli = Cli::command();
    for e in c.env.iter().flatten() {
        assert!(e.value_from.is_none(), "{} is read from elsewhere", e.name);
        let arg = cli
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|v| v == e.name.as_str()))
            .unwrap_or_else(|| panic!("no relay flag reads {}", e.name));
        argv.push(format!("--{}={}", arg.get_long().unwrap(), e.value.as_deref().unwrap()));
    }
    argv
}

/// A fresh directory for one test's stand-ins of the mounted Secrets.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lockstep-relay-pod-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Parse the container's command line as `lockstep relay` does, resolve it with stand-in
/// Secret files, and compare with the spec's own resolved config.
fn parses_back(o: &OutboxRelay, tag: &str) {
    let v = valid(o);
    // Only the container's own args and env count: the test process's environment (DATABASE_URL
    // is set where the integration tests run) must not fill in flags.
    let command = Cli::command().mut_args(|a| a.env(None::<&str>));
    let matches = command.try_get_matches_from(command_line(&container(&v, "img"))).unwrap();
    let mut args = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap().args;
    assert_eq!(args.outbox.database_url_file, Some(PathBuf::from(DATABASE_URL_FILE)));
    let expected_dir = v.auth_secret.as_ref().map(|_| PathBuf::from(KAFKA_CONFIG_DIR));
    assert_eq!(args.kafka.kafka_config_dir, expected_dir);

    let dir = scratch(tag);
    std::fs::write(dir.join("url"), "postgres://u:p@db/x\n").unwrap();
    args.outbox.database_url_file = Some(dir.join("url"));
    let mut config = v.producer.config.clone();
    if args.kafka.kafka_config_dir.is_some() {
        std::fs::create_dir_all(dir.join("kafka")).unwrap();
        std::fs::write(dir.join("kafka/sasl.username"), "relay").unwrap();
        args.kafka.kafka_config_dir = Some(dir.join("kafka"));
        config.insert("sasl.username".into(), "relay".into());
    }
    let cfg = args.resolve().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    // What the CLI cannot know (Secret names, topics, replicas, lag, the pod) is not compared.
    let expected = ValidOutboxRelay {
        url_secret: SecretKeyRef {
            name: "cli".into(),
            key: "url".into(),
        },
        auth_secret: None,
        producer: ValidProducer {
            config,
            ..v.producer.clone()
        },
        topics: vec![],
        replicas: 1,
        max_oldest_age: Duration::from_secs(30),
        image: None,
        resources: None,
        paused: false,
        ..v.clone()
    };
    assert_eq!(cfg.resolved, expected);
    assert_eq!(cfg.bootstrap_servers, v.bootstrap_servers);
    assert_eq!(cfg.metrics_addr.to_string(), "0.0.0.0:9090");
    assert!(cfg.listen);
    assert_eq!(cfg.database_url.expose(), "postgres://u:p@db/x");
}

#[test]
fn every_setting_parses_back_into_the_spec_config() {
    let o = outbox_relay("orders");
    let v = valid(&o);
    // The fixture is away from every default, so a dropped flag cannot pass unnoticed.
    assert_eq!((v.key.name(), v.batch_size, v.max_attempts, v.manage_schema), ("id", 200, 3, false));
    assert_eq!((v.buckets, v.published_retention), (64, Some(Duration::from_secs(86_400))));
    assert_eq!(v.poll_interval, Duration::from_secs(90));
    assert_eq!(v.max_gather, Duration::from_millis(50));
    parses_back(&o, "every-setting");
}

#[test]
fn a_default_spec_parses_back() {
    parses_back(&outbox_relay_minimal("plain"), "default");
}

#[test]
fn args_name_every_setting_as_a_flag() {
    let args = relay_args(&valid(&outbox_relay("orders")));
    for a in [
        "--schema=billing",
        "--table=orders_outbox",
        "--bootstrap-servers=k1:9092,k2:9093",
        "--topic=orders.{type}.v1",
        "--key=id",
        "--batch-size=200",
        "--poll-interval=1m30s",
        "--max-gather=50ms",
        "--max-attempts=3",
        "--linger-ms=20",
        "--compression=zstd",
        "--cleanup=mark-published",
        "--published-retention=1d",
        "--manage-schema=false",
        "--headers=cloudevents",
        "--buckets=64",
        "--cloudevents-source=https://orders.example/-",
        "--metrics-addr=0.0.0.0:9090",
        "--kafka-config=client.id=-orders",
    ] {
        assert!(args.iter().any(|x| x == a), "{a} missing from {args:?}");
    }
    let minimal = relay_args(&valid(&outbox_relay_minimal("plain")));
    let absent = ["--published-retention", "--kafka-config", "--cloudevents-source", "--buckets"];
    assert!(!minimal.iter().any(|a| absent.iter().any(|x| a.starts_with(x))), "{minimal:?}");
    assert!(minimal.iter().any(|a| a == "--headers=lockstep"));
}

#[test]
fn secrets_are_mounted_never_copied() {
    let v = valid(&outbox_relay("orders"));
    let (vols, mounts) = volumes(&v);
    let db = vols[0].secret.as_ref().unwrap();
    assert_eq!(db.secret_name.as_deref(), Some("orders-db"));
    let item = &db.items.as_ref().unwrap()[0];
    assert_eq!((item.key.as_str(), item.path.as_str()), ("dsn", "url"));
    let kafka = vols[1].secret.as_ref().unwrap();
    assert_eq!((kafka.secret_name.as_deref(), kafka.items.as_ref()), (Some("kafka-auth"), None));
    assert!(vols.iter().all(|vol| vol.secret.as_ref().unwrap().default_mode == Some(0o400)));
    let at: Vec<_> = mounts
        .iter()
        .map(|m| (m.name.as_str(), m.mount_path.as_str(), m.read_only))
        .collect();
    assert_eq!(
        at,
        [
            ("database-url", DATABASE_URL_DIR, Some(true)),
            ("kafka-auth", KAFKA_CONFIG_DIR, Some(true))
        ]
    );
    assert_eq!(format!("{DATABASE_URL_DIR}/url"), DATABASE_URL_FILE);
    let vars: Vec<_> = env(&v).into_iter().map(|e| (e.name, e.value.unwrap())).collect();
    assert_eq!(
        vars,
        [
            ("DATABASE_URL_FILE".to_string(), DATABASE_URL_FILE.to_string()),
            ("LOCKSTEP_KAFKA_CONFIG_DIR".to_string(), KAFKA_CONFIG_DIR.to_string())
        ]
    );

    let plain = valid(&outbox_relay_minimal("plain"));
    let (vols, mounts) = volumes(&plain);
    assert_eq!((vols.len(), mounts.len(), env(&plain).len()), (1, 1, 1));
    assert_eq!(vols[0].secret.as_ref().unwrap().items.as_ref().unwrap()[0].key, "url");
}

#[test]
fn the_pod_is_locked_down() {
    let pod = pod_spec(&valid(&outbox_relay_minimal("plain")), "img");
    assert_eq!(
        (pod.automount_service_account_token, pod.enable_service_links),
        (Some(false), Some(false))
    );
    assert_eq!(pod.termination_grace_period_seconds, Some(60));
    let psc = pod.security_context.unwrap();
    assert_eq!(
        (psc.run_as_non_root, psc.run_as_user, psc.run_as_group),
        (Some(true), Some(65532), Some(65532))
    );
    assert_eq!(psc.fs_group, Some(65532));
    assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    let sc = pod.containers[0].security_context.clone().unwrap();
    assert_eq!(
        (sc.allow_privilege_escalation, sc.read_only_root_filesystem),
        (Some(false), Some(true))
    );
    assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
}

#[test]
fn probes_ask_healthz_on_the_metrics_port() {
    let c = container(&valid(&outbox_relay_minimal("plain")), "img");
    let port = &c.ports.as_ref().unwrap()[0];
    assert_eq!((port.name.as_deref(), port.container_port), (Some("metrics"), 9090));
    for p in [c.liveness_probe.unwrap(), c.readiness_probe.unwrap()] {
        let get = p.http_get.unwrap();
        // Not /readyz: a standby must be ready too (see `probe`).
        assert_eq!(get.path.as_deref(), Some("/healthz"));
        assert_eq!(get.port, IntOrString::String("metrics".into()));
    }
}

#[test]
fn resources_come_from_the_spec_or_defaults() {
    let c = container(&valid(&outbox_relay_minimal("plain")), "img");
    let r = c.resources.unwrap();
    let requests = r.requests.unwrap();
    assert_eq!((requests["cpu"].0.as_str(), requests["memory"].0.as_str()), ("100m", "64Mi"));
    let limits = r.limits.unwrap();
    assert_eq!((limits["memory"].0.as_str(), limits.get("cpu")), ("256Mi", None));

    let mut o = outbox_relay("orders");
    let asked = ResourceRequirements {
        requests: Some([("cpu".to_string(), Quantity("1".into()))].into()),
        ..ResourceRequirements::default()
    };
    o.spec.relay.resources = Some(asked.clone());
    assert_eq!(container(&valid(&o), "img").resources, Some(asked));
}

/// A NATS relay's pod: told the broker, servers and ack timeout by flags, its credentials by the
/// mounted Secret's directory; parsed back as `lockstep relay` does.
#[test]
fn a_nats_relay_parses_back_with_its_secret_directory() {
    let mut o = outbox_relay_minimal("nats");
    o.spec.broker = crate::crd::Broker::Nats;
    o.spec.kafka = None;
    o.spec.nats = Some(
        serde_json::from_value(serde_json::json!({
            "servers": "nats://n1:4222,tls://n2:4223", "authSecretRef": {"name": "nats-creds"}, "ackTimeout": "10s"
        }))
        .unwrap(),
    );
    let v = valid(&o);
    let c = container(&v, "img");
    let mounts = c.volume_mounts.clone().unwrap();
    assert!(mounts.iter().any(|m| m.mount_path == NATS_SECRET_DIR), "{mounts:?}");
    let command = Cli::command().mut_args(|a| a.env(None::<&str>));
    let matches = command.try_get_matches_from(command_line(&c)).unwrap();
    let mut args = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap().args;
    assert_eq!(args.nats.nats_secret_dir, Some(PathBuf::from(NATS_SECRET_DIR)));
    let dir = scratch("nats");
    std::fs::write(dir.join("url"), "postgres://u:p@db/x\n").unwrap();
    std::fs::write(dir.join("user"), "relay\n").unwrap();
    std::fs::write(dir.join("password"), "hunter2\n").unwrap();
    args.outbox.database_url_file = Some(dir.join("url"));
    args.nats.nats_secret_dir = Some(dir.clone());
    let cfg = args.resolve().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let n = cfg.nats.expect("a NATS relay");
    assert_eq!(n.servers, ["nats://n1:4222", "tls://n2:4223"]);
    assert_eq!(n.ack_timeout, Duration::from_secs(10));
    assert!(matches!(&n.auth, crate::core::nats_settings::NatsAuth::UserPassword { user, .. } if user == "relay"));
    assert!(!format!("{n:?}").contains("hunter2"), "no credential in a debug print");
}

/// A RabbitMQ relay's pod: told the broker, URL (with the vhost), exchange and confirm timeout by
/// flags, its credentials by the mounted Secret's directory; parsed back as `lockstep relay` does.
#[test]
fn a_rabbitmq_relay_parses_back_with_its_secret_directory() {
    let mut o = outbox_relay_minimal("rabbitmq");
    o.spec.broker = crate::crd::Broker::Rabbitmq;
    o.spec.kafka = None;
    o.spec.rabbitmq = Some(
        serde_json::from_value(serde_json::json!({
            "url": "amqps://rabbit:5671", "vhost": "orders", "managementUrl": "https://rabbit:15671",
            "authSecretRef": {"name": "rabbit-creds"}, "confirmTimeout": "10s", "exchange": {"name": "outbox"}
        }))
        .unwrap(),
    );
    let v = valid(&o);
    let c = container(&v, "img");
    let mounts = c.volume_mounts.clone().unwrap();
    assert!(mounts.iter().any(|m| m.mount_path == AMQP_SECRET_DIR), "{mounts:?}");
    let line = command_line(&c);
    assert!(
        line.contains(&"--broker=rabbitmq".to_owned()) && !line.iter().any(|a| a.starts_with("--linger-ms")),
        "{line:?}"
    );
    let command = Cli::command().mut_args(|a| a.env(None::<&str>));
    let matches = command.try_get_matches_from(line).unwrap();
    let mut args = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap().args;
    assert_eq!(args.amqp.amqp_secret_dir, Some(PathBuf::from(AMQP_SECRET_DIR)));
    let dir = scratch("rabbitmq");
    std::fs::write(dir.join("url"), "postgres://u:p@db/x\n").unwrap();
    std::fs::write(dir.join("user"), "relay\n").unwrap();
    std::fs::write(dir.join("password"), "hunter2\n").unwrap();
    args.outbox.database_url_file = Some(dir.join("url"));
    args.amqp.amqp_secret_dir = Some(dir.clone());
    let cfg = args.resolve().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let a = cfg.amqp.expect("a RabbitMQ relay");
    assert_eq!((a.url.as_str(), a.exchange.as_str()), ("amqps://rabbit:5671/orders", "outbox"));
    assert_eq!(a.confirm_timeout, Duration::from_secs(10));
    assert_eq!(a.auth.as_ref().map(|(u, _)| u.as_str()), Some("relay"));
    assert!(!format!("{a:?}").contains("hunter2"), "no credential in a debug print");
}
