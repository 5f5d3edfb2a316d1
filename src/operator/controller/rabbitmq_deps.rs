//! The fetch step for RabbitMQ: a Secret's credentials, a management-API client, and the
//! topology the server has, each as a value or as the condition that says why it is not there.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::{api::Api, Client};

use super::deps::Reporting;
use crate::{
    clients::rabbitmq_admin::{ManagementSettings, RabbitAdmin},
    operator::conditions::{Cond, Reason},
    operator::policy::queues::Observed,
};

/// Where a RabbitMQ's management API is and which Secret has its credentials (`field` names
/// the spec's authSecretRef in messages).
#[derive(Debug, Clone, Copy)]
pub struct Management<'a> {
    pub url: &'a str,
    pub vhost: &'a str,
    pub secret: Option<&'a str>,
    pub field: &'a str,
}

/// A management-API client with the credentials of the Secret (`user`, `password`, `ca.crt`).
pub async fn admin(client: &Client, ns: &str, m: Management<'_>, on: Reporting) -> Result<RabbitAdmin, Cond> {
    let failed = |r: Reason, msg: String| Cond::new(on.type_, on.status, r, msg);
    let mut s = ManagementSettings {
        url: m.url.to_owned(),
        vhost: m.vhost.to_owned(),
        ..Default::default()
    };
    if let Some(name) = m.secret {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        let data: BTreeMap<String, String> = match secrets.get_opt(name).await {
            Ok(Some(found)) => found
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).trim_end().to_owned()))
                .collect(),
            Ok(None) => {
                return Err(failed(
                    Reason::SecretNotFound,
                    format!("Secret {ns}/{name} ({}) not found", m.field),
                ))
            }
            Err(e) => return Err(failed(Reason::SecretNotFound, format!("cannot read Secret {ns}/{name}: {e}"))),
        };
        s.auth = crate::core::amqp_settings::auth_from(&data)
            .map_err(|e| failed(Reason::SecretKeyRefused, format!("Secret {ns}/{name} ({}): {e}", m.field)))?;
        s.tls_ca = data.get("ca.crt").cloned();
    }
    RabbitAdmin::new(&s).map_err(|e| failed(Reason::BrokerUnreachable, e))
}

/// The exchanges, queues and bindings named, as the server has them.
pub async fn observe(
    admin: &RabbitAdmin,
    exchanges: &[&str],
    queues: &[&str],
    bindings: &[(&str, &str)],
    on: Reporting,
) -> Result<Observed, Cond> {
    let failed = |m: String| failed(on, m);
    let mut o = Observed::default();
    for e in exchanges {
        if let Some(x) = admin.exchange(e).await.map_err(failed)? {
            o.exchanges.insert((*e).to_owned(), x);
        }
    }
    for q in queues {
        if let Some(x) = admin.queue(q).await.map_err(failed)? {
            o.queues.insert((*q).to_owned(), x);
        }
    }
    for (e, q) in bindings {
        if o.exchanges.contains_key(*e) && o.queues.contains_key(*q) {
            let keys = admin.bindings(e, q).await.map_err(failed)?;
            o.bindings.insert(((*e).to_owned(), (*q).to_owned()), keys);
        }
    }
    Ok(o)
}

/// A management API error as the condition `on` reports it: unreachable, or an operation failed.
pub fn failed(on: Reporting, m: String) -> Cond {
    let reason = if m.contains("cannot reach") || m.contains("no answer") {
        Reason::BrokerUnreachable
    } else {
        Reason::TopicOperationFailed
    };
    Cond::new(on.type_, on.status, reason, m)
}
