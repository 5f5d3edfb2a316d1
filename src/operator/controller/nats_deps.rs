//! The fetch step for NATS: a Secret's credentials and an admin connection, each as a value or
//! as the condition that says why it is not there.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use k8s_openapi::api::core::v1::Secret;
use kube::{api::Api, Client};

use super::deps::Reporting;
use crate::{
    clients::nats_admin::{NatsAdmin, ObservedStream},
    core::{
        nats_settings::{NatsAuth, NatsSettings},
        redacted::Redacted,
    },
    operator::conditions::{Cond, Reason},
};

/// Secret keys the relay and the operator read: credentials (one way) and TLS files.
pub const SECRET_KEYS: [&str; 8] = ["user", "password", "token", "nkey", "creds", "ca.crt", "tls.crt", "tls.key"];

/// How to reach `servers` with the credentials of Secret `ns/secret` (keys as `SECRET_KEYS`); TLS
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
    s.auth = auth(&data).map_err(|m| {
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

/// The one way to authenticate a Secret holds. Pure; never names a value.
pub fn auth(data: &BTreeMap<String, String>) -> Result<NatsAuth, String> {
    let get = |k: &str| data.get(k).filter(|v| !v.is_empty()).map(|v| Redacted::new(v.clone()));
    let mut ways = Vec::new();
    match (data.get("user"), get("password")) {
        (Some(u), Some(p)) => ways.push(NatsAuth::UserPassword {
            user: u.clone(),
            password: p,
        }),
        (Some(_), None) | (None, Some(_)) => return Err("keys user and password go together".into()),
        (None, None) => {}
    }
    if let Some(t) = get("token") {
        ways.push(NatsAuth::Token(t));
    }
    if let Some(k) = get("nkey") {
        ways.push(NatsAuth::NKey(k));
    }
    if let Some(c) = get("creds") {
        ways.push(NatsAuth::Credentials(c));
    }
    if ways.len() > 1 {
        return Err("holds more than one way to authenticate (user and password, token, nkey, creds): keep one".into());
    }
    Ok(ways.pop().unwrap_or_default())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn one_way_to_authenticate_and_no_value_in_messages() {
        assert!(matches!(auth(&data(&[])), Ok(NatsAuth::None)));
        assert!(matches!(
            auth(&data(&[("user", "u"), ("password", "hunter2")])),
            Ok(NatsAuth::UserPassword { .. })
        ));
        assert!(matches!(
            auth(&data(&[("creds", "x"), ("ca.crt", "pem")])),
            Ok(NatsAuth::Credentials(_))
        ));
        let e = auth(&data(&[("user", "u")])).unwrap_err();
        assert!(e.contains("together"), "{e}");
        let e = auth(&data(&[("token", "hunter2"), ("nkey", "SUAB")])).unwrap_err();
        assert!(e.contains("more than one") && !e.contains("hunter2"), "{e}");
    }
}
