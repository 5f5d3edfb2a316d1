//! The fetch step for NATS: a Secret's credentials and an admin connection, each as a value or
//! as the condition that says why it is not there.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use k8s_openapi::api::core::v1::Secret;
use kube::{api::Api, Client};

use super::deps::Reporting;
use crate::{
    clients::nats_admin::{NatsAdmin, ObservedStream},
    core::nats_settings::NatsSettings,
    operator::conditions::{Cond, Reason},
};

/// How to reach `servers` with the credentials of Secret `ns/secret` (keys as `core::nats_settings::SECRET_KEYS`); TLS
/// files are written to a private folder, as the relay has them mounted.
pub async fn nats_settings(
    client: &Client,
    ns: &str,
    servers: &[String],
    secret: Option<&str>,
    on: Reporting,
) -> Result<NatsSettings, Cond> {
    let mut s = NatsSettings {
        servers: servers.to_vec(),
        ack_timeout: Duration::from_secs(10),
        name: Some("lockstep-operator".into()),
        ..Default::default()
    };
    let Some(name) = secret else {
        return Ok(s);
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let data: BTreeMap<String, String> = match secrets.get_opt(name).await {
        Ok(Some(found)) => found
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).trim_end().to_owned()))
            .collect(),
        Ok(None) => {
            return Err(Cond::new(
                on.type_,
                on.status,
                Reason::SecretNotFound,
                format!("Secret {ns}/{name} (nats.authSecretRef) not found"),
            ))
        }
        Err(e) => {
            return Err(Cond::new(
                on.type_,
                on.status,
                Reason::SecretNotFound,
                format!("cannot read Secret {ns}/{name}: {e}"),
            ))
        }
    };
    s.auth = crate::core::nats_settings::auth_from(&data).map_err(|m| {
        Cond::new(
            on.type_,
            on.status,
            Reason::SecretKeyRefused,
            format!("Secret {ns}/{name} (nats.authSecretRef): {m}"),
        )
    })?;
    if data.contains_key("ca.crt") || data.contains_key("tls.crt") {
        let dir = tls_dir(ns, name, &data).map_err(|e| {
            Cond::new(
                on.type_,
                on.status,
                Reason::SecretKeyRefused,
                format!("cannot keep the TLS files of Secret {ns}/{name}: {e}"),
            )
        })?;
        s.tls_ca = data.contains_key("ca.crt").then(|| dir.join("ca.crt"));
        s.tls_client = (data.contains_key("tls.crt") && data.contains_key("tls.key")).then(|| (dir.join("tls.crt"), dir.join("tls.key")));
    }
    Ok(s)
}

/// The Secret's TLS files in a folder only this process reads.
fn tls_dir(ns: &str, name: &str, data: &BTreeMap<String, String>) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = std::env::temp_dir().join("lockstep-nats").join(format!("{ns}.{name}"));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
    for key in ["ca.crt", "tls.crt", "tls.key"] {
        if let Some(v) = data.get(key) {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(dir.join(key))?;
            std::io::Write::write_all(&mut f, v.as_bytes())?;
        }
    }
    Ok(dir)
}

/// Secret -> admin connection -> the named streams as the server describes them (absent: not
/// found).
pub async fn describe_streams(
    client: &Client,
    ns: &str,
    servers: &[String],
    secret: Option<&str>,
    names: &[String],
    on: Reporting,
) -> Result<(NatsAdmin, BTreeMap<String, ObservedStream>), Cond> {
    let settings = nats_settings(client, ns, servers, secret, on).await?;
    let failed = |r: Reason, m: String| Cond::new(on.type_, on.status, r, m);
    let admin = NatsAdmin::connect(&settings)
        .await
        .map_err(|m| failed(Reason::BrokerUnreachable, m))?;
    let mut observed = BTreeMap::new();
    for n in names {
        if let Some(o) = admin.describe(n).await.map_err(|m| failed(Reason::TopicOperationFailed, m))? {
            observed.insert(n.clone(), o);
        }
    }
    Ok((admin, observed))
}
