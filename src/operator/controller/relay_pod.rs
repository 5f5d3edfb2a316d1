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
/// Where `spec.nats.authSecretRef` is mounted: its keys as files (`core::nats_settings::SECRET_KEYS`).
pub const NATS_SECRET_DIR: &str = "/etc/lockstep/nats";
/// Where `spec.rabbitmq.authSecretRef` is mounted: its keys as files (`core::amqp_settings::SECRET_KEYS`).
pub const AMQP_SECRET_DIR: &str = "/etc/lockstep/rabbitmq";
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
const NATS_VOLUME: &str = "nats-auth";
const AMQP_VOLUME: &str = "rabbitmq-auth";

/// `relay` and its flags, in `--flag=value` form so a value starting with '-' stays a value.
/// Settings the spec has no field for (`--listen`, `--max-batches-in-flight`) keep the relay's defaults.
pub fn relay_args(v: &ValidOutboxRelay) -> Vec<String> {
    let p = &v.producer;
    let cleanup = match v.cleanup {
        Cleanup::Delete => "delete",
        Cleanup::MarkPublished => "mark-published",
    };
    let kafka = v.nats.is_none() && v.rabbitmq.is_none();
    let mut flags = vec![
        ("schema", v.table.schema.as_str().to_owned()),
        ("table", v.table.table.as_str().to_owned()),
    ];
    // Kafka's flags keep their place: a changed list would roll every Deployment on upgrade.
    match (&v.nats, &v.rabbitmq) {
        (_, Some(r)) => flags.extend([
            ("broker", "rabbitmq".to_owned()),
            ("amqp-url", r.url.clone()),
            ("amqp-exchange", r.exchange_name().to_owned()),
            ("amqp-confirm-timeout", duration::format(r.confirm_timeout)),
        ]),
        (None, None) => flags.push(("bootstrap-servers", v.bootstrap_servers.clone())),
        (Some(n), None) => flags.extend([
            ("broker", "nats".to_owned()),
            ("nats-url", n.servers.join(",")),
            ("nats-ack-timeout", duration::format(n.ack_timeout)),
        ]),
    }
    flags.extend([
        ("topic", v.topic_template.text()),
        ("key", v.key.name().to_owned()),
        ("batch-size", v.batch_size.to_string()),
        ("poll-interval", duration::format(v.poll_interval)),
        ("max-gather", duration::format(v.max_gather)),
        ("max-attempts", v.max_attempts.to_string()),
    ]);
    if kafka {
        flags.extend([
            ("linger-ms", p.linger_ms.to_string()),
            ("compression", p.compression.as_str().to_owned()),
        ]);
    }
    flags.extend([
        ("cleanup", cleanup.to_owned()),
        ("manage-schema", v.manage_schema.to_string()),
        ("headers", v.headers.as_str().to_owned()),
        ("metrics-addr", format!("0.0.0.0:{METRICS_PORT}")),
    ]);
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
    match (&v.nats, &v.rabbitmq) {
        (_, Some(r)) if r.auth_secret.is_some() => env.push(var("AMQP_SECRET_DIR", AMQP_SECRET_DIR)),
        (_, Some(_)) => {}
        (None, None) if v.auth_secret.is_some() => env.push(var("LOCKSTEP_KAFKA_CONFIG_DIR", KAFKA_CONFIG_DIR)),
        (Some(n), None) if n.auth_secret.is_some() => env.push(var("NATS_SECRET_DIR", NATS_SECRET_DIR)),
        _ => {}
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
    let (volume, dir, auth) = match (&v.nats, &v.rabbitmq) {
        (_, Some(r)) => (AMQP_VOLUME, AMQP_SECRET_DIR, r.auth_secret.as_ref()),
        (Some(n), None) => (NATS_VOLUME, NATS_SECRET_DIR, n.auth_secret.as_ref()),
        (None, None) => (KAFKA_VOLUME, KAFKA_CONFIG_DIR, v.auth_secret.as_ref()),
    };
    if let Some(auth) = auth {
        volumes.push(secret(volume, auth, None));
        mounts.push(mount(volume, dir));
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
#[path = "relay_pod_tests.rs"]
mod tests;
