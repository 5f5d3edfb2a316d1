//! The relay's pod, pure: `lockstep relay` with every setting as a flag of `config::RelayArgs`,
//! Secrets mounted as files (never copied into the object), locked down, probed on /healthz.

use k8s_openapi::{
    api::core::v1::{
        Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, KeyToPath, PodSecurityContext, PodSpec, Probe, ResourceRequirements,
        SeccompProfile, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};

use crate::{
    core::duration,
    crd::{Cleanup, ValidOutboxRelay},
};

/// The port of /metrics, /healthz and /readyz (`--metrics-addr`).
pub const METRICS_PORT: i32 = 9090;
/// Where the database URL Secret key is mounted; the file inside is always `url`.
pub const DATABASE_URL_DIR: &str = "/etc/lockstep/database";
pub const DATABASE_URL_FILE: &str = "/etc/lockstep/database/url";
/// Where `spec.kafka.authSecretRef` is mounted: one file per librdkafka setting.
pub const KAFKA_CONFIG_DIR: &str = "/etc/lockstep/kafka";
/// The image's nonroot user and group (distroless `nonroot`, `USER 65532:65532` in the Dockerfile).
const RUN_AS: i64 = 65532;
/// Owner read only: the kubelet adds group read for `fsGroup`, nobody else reads the Secrets.
const SECRET_FILE_MODE: i32 = 0o400;
/// Time for the SIGTERM drain: stop reading, wait for the batches in flight, release the lock.
/// A healthy broker acknowledges in well under a second; a batch still unacknowledged when the
/// kubelet kills the pod is only republished by the next active relay (at least once).
pub const TERMINATION_GRACE_SECONDS: i64 = 60;

const DATABASE_VOLUME: &str = "database-url";
const KAFKA_VOLUME: &str = "kafka-auth";

/// `relay` and its flags, in `--flag=value` form so a value starting with '-' stays a value.
/// Settings the spec has no field for (`--listen`, `--max-batches-in-flight`) keep the relay's defaults.
pub fn relay_args(v: &ValidOutboxRelay) -> Vec<String> {
    let p = &v.producer;
    let cleanup = match v.cleanup {
        Cleanup::Delete => "delete",
        Cleanup::MarkPublished => "mark-published",
    };
    let mut flags = vec![
        ("schema", v.table.schema.as_str().to_owned()),
        ("table", v.table.table.as_str().to_owned()),
        ("bootstrap-servers", v.bootstrap_servers.clone()),
        ("topic", v.topic_template.text()),
        ("key", v.key.name().to_owned()),
        ("batch-size", v.batch_size.to_string()),
        ("poll-interval", duration::format(v.poll_interval)),
        ("max-gather", duration::format(v.max_gather)),
        ("max-attempts", v.max_attempts.to_string()),
        ("linger-ms", p.linger_ms.to_string()),
        ("compression", p.compression.as_str().to_owned()),
        ("cleanup", cleanup.to_owned()),
        ("manage-schema", v.manage_schema.to_string()),
        ("headers", v.headers.as_str().to_owned()),
        ("metrics-addr", format!("0.0.0.0:{METRICS_PORT}")),
    ];
    // Only above 1, so Deployments made before buckets existed do not roll on upgrade.
    flags.extend((v.buckets > 1).then(|| ("buckets", v.buckets.to_string())));
    flags.extend(v.published_retention.map(|r| ("published-retention", duration::format(r))));
    flags.extend(v.cloud_events_source.clone().map(|s| ("cloudevents-source", s)));
    // The spec's producer settings are not secret (they are in the object); credentials come
    // from the auth Secret's directory, which these override, as they do in `lockstep relay`.
    flags.extend(p.config.iter().map(|(k, val)| ("kafka-config", format!("{k}={val}"))));
    let mut args = vec!["relay".to_owned()];
    args.extend(flags.into_iter().map(|(f, val)| format!("--{f}={val}")));
    args
}

/// Only paths to the mounted Secrets: no secret value is ever in the object.
fn env(v: &ValidOutboxRelay) -> Vec<EnvVar> {
    let var = |name: &str, value: &str| EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    };
    let mut env = vec![var("DATABASE_URL_FILE", DATABASE_URL_FILE)];
    if v.auth_secret.is_some() {
        env.push(var("LOCKSTEP_KAFKA_CONFIG_DIR", KAFKA_CONFIG_DIR));
    }
    env
}

/// The database URL key as the file `url`; the whole auth Secret as a directory.
fn volumes(v: &ValidOutboxRelay) -> (Vec<Volume>, Vec<VolumeMount>) {
    let secret = |volume: &str, name: &str, items: Option<Vec<KeyToPath>>| Volume {
        name: volume.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(name.into()),
            items,
            default_mode: Some(SECRET_FILE_MODE),
            optional: Some(false),
        }),
        ..Volume::default()
    };
    let mount = |volume: &str, path: &str| VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    let url_item = KeyToPath {
        key: v.url_secret.key.clone(),
        path: "url".into(),
        mode: None,
    };
    let mut volumes = vec![secret(DATABASE_VOLUME, &v.url_secret.name, Some(vec![url_item]))];
    let mut mounts = vec![mount(DATABASE_VOLUME, DATABASE_URL_DIR)];
    if let Some(auth) = &v.auth_secret {
        volumes.push(secret(KAFKA_VOLUME, auth, None));
        mounts.push(mount(KAFKA_VOLUME, KAFKA_CONFIG_DIR));
    }
    (volumes, mounts)
}

/// Requests enough to schedule, a memory limit against leaks; no CPU limit, whose throttling
/// would add latency to every batch.
pub fn default_resources() -> ResourceRequirements {
    let q = |s: &str| Quantity(s.into());
    ResourceRequirements {
        requests: Some([("cpu".to_string(), q("100m")), ("memory".to_string(), q("64Mi"))].into()),
        limits: Some([("memory".to_string(), q("256Mi"))].into()),
        ..ResourceRequirements::default()
    }
}

/// /healthz answers as soon as the relay's HTTP server is up, before it touches the database,
/// and on standbys too. /readyz is true only on the active relay that reaches the broker, so it
/// cannot be the readiness probe: standbys would never be ready, a rolling update (maxUnavailable
/// 0) would wait for them forever and a metrics Service would not scrape them. Who is active is
/// reported by `lockstep_relay_active`, not by readiness.
fn probe(period_seconds: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/healthz".into()),
            port: IntOrString::String("metrics".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

/// The relay container: `image`'s entrypoint (`lockstep`) with `relay` and its flags.
pub fn container(v: &ValidOutboxRelay, image: &str) -> Container {
    let (_, mounts) = volumes(v);
    Container {
        name: "relay".into(),
        image: Some(image.into()),
        args: Some(relay_args(v)),
        env: Some(env(v)),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: METRICS_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        resources: Some(v.resources.clone().unwrap_or_else(default_resources)),
        liveness_probe: Some(probe(10)),
        readiness_probe: Some(probe(5)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    }
}

/// The pod spec: the container, its Secret volumes, the restricted security profile.
pub fn pod_spec(v: &ValidOutboxRelay, image: &str) -> PodSpec {
    let (volumes, _) = volumes(v);
    PodSpec {
        containers: vec![container(v, image)],
        volumes: Some(volumes),
        // The relay never calls the Kubernetes API.
        automount_service_account_token: Some(false),
        // The relay finds nothing through Service variables: its environment stays what is set here.
        enable_service_links: Some(false),
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            // Secret files belong to root: fsGroup gives the relay's group read access to them.
            fs_group: Some(RUN_AS),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..PodSecurityContext::default()
        }),
        ..PodSpec::default()
    }
}

#[cfg(test)]
mod tests {
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
}
