//! RabbitMQ administration over the management plugin's HTTP API: read an exchange, a queue (its
//! type, arguments, effective policy and counts) and its bindings; declare exchanges, queues and
//! bindings; delete them. AMQP's passive declare cannot read a queue's arguments or its unacked
//! count, the management API reads both. Errors never carry the password (only the user is in
//! the Authorization header, and no header is ever printed).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use serde_json::{json, Value};

use crate::{core::redacted::Redacted, crd::url_encode};

/// How to reach the management API.
#[derive(Clone, Debug, Default)]
pub struct ManagementSettings {
    /// http://host:15672 or https://..., no trailing slash.
    pub url: String,
    pub vhost: String,
    /// The user and password (basic auth); none: guest (loopback only).
    pub auth: Option<(String, Redacted)>,
    /// PEM of the CAs to trust for https:// (the system's roots otherwise).
    pub tls_ca: Option<String>,
}

/// A queue as the server reports it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ObservedQueue {
    /// `quorum`, `stream` or `classic`.
    pub type_: String,
    pub durable: bool,
    /// The `x-` arguments it was declared with.
    pub arguments: BTreeMap<String, Value>,
    /// The effective policy's definition (`message-ttl`, `delivery-limit`, ...), if a policy applies.
    pub policy: BTreeMap<String, Value>,
    /// The name of the policy that applies, if one does.
    pub policy_name: Option<String>,
    pub ready: u64,
    pub unacked: u64,
}

/// A policy as the server has it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ObservedPolicy {
    pub pattern: String,
    pub priority: i64,
    /// `queues`, `exchanges` or `all`.
    pub apply_to: String,
    pub definition: BTreeMap<String, Value>,
}

/// The server, as the management API describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Overview {
    pub version: String,
    pub erlang: String,
    pub cluster: String,
}

/// An exchange as the server reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedExchange {
    pub type_: String,
    pub durable: bool,
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

pub struct RabbitAdmin {
    base: String,
    vhost: String,
    authorization: Option<String>,
    client: Client<Https, Full<Bytes>>,
}

impl RabbitAdmin {
    pub fn new(s: &ManagementSettings) -> Result<Self, String> {
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match &s.tls_ca {
            None => builder
                .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
                .map_err(|e| format!("cannot load the system's CA roots: {e}"))?,
            Some(pem) => builder.with_tls_config(tls_config(pem)?),
        };
        let https = builder.https_or_http().enable_http1().build();
        let authorization = s.auth.as_ref().map(|(u, p)| {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{}", p.expose()));
            format!("Basic {token}")
        });
        Ok(RabbitAdmin {
            base: s.url.trim_end_matches('/').to_owned(),
            vhost: url_encode(&s.vhost),
            authorization,
            client: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    /// `GET /api/overview`'s cluster name: who this server is, for telling two addresses apart.
    pub async fn cluster_name(&self) -> Result<String, String> {
        Ok(self.overview().await?.cluster)
    }

    /// What `GET /api/overview` says of the server.
    pub async fn overview(&self) -> Result<Overview, String> {
        let v = self.call(Method::GET, "/api/overview".into(), None).await?.unwrap_or_default();
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        Ok(Overview {
            version: s("rabbitmq_version"),
            erlang: s("erlang_version"),
            cluster: s("cluster_name"),
        })
    }

    /// The resource alarms in effect (`GET /api/health/checks/alarms`), as "memory on rabbit@a";
    /// empty when none is. While one is, the server blocks every publishing connection.
    pub async fn alarms(&self) -> Result<Vec<String>, String> {
        let path = "/api/health/checks/alarms".to_owned();
        let what = format!("GET {}{path}", self.base);
        let (status, v, _) = self.request(Method::GET, path, None).await?;
        match status {
            s if s.is_success() => Ok(vec![]),
            StatusCode::SERVICE_UNAVAILABLE => Ok(v["alarms"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| {
                    let f = |k: &str| a[k].as_str().unwrap_or("?").to_owned();
                    format!("{} on {}", f("resource"), f("node"))
                })
                .collect()),
            s => Err(format!("{what}: {s}: {}", v["reason"].as_str().unwrap_or_default())),
        }
    }

    pub async fn exchange(&self, name: &str) -> Result<Option<ObservedExchange>, String> {
        let path = format!("/api/exchanges/{}/{}", self.vhost, url_encode(name));
        Ok(self.call(Method::GET, path, None).await?.map(|v| ObservedExchange {
            type_: v["type"].as_str().unwrap_or_default().to_owned(),
            durable: v["durable"].as_bool().unwrap_or(false),
        }))
    }

    pub async fn queue(&self, name: &str) -> Result<Option<ObservedQueue>, String> {
        let path = format!("/api/queues/{}/{}", self.vhost, url_encode(name));
        let map = |v: &Value| -> BTreeMap<String, Value> {
            v.as_object()
                .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default()
        };
        Ok(self.call(Method::GET, path, None).await?.map(|v| ObservedQueue {
            type_: v["type"].as_str().unwrap_or("classic").to_owned(),
            durable: v["durable"].as_bool().unwrap_or(false),
            arguments: map(&v["arguments"]),
            policy: map(&v["effective_policy_definition"]),
            policy_name: v["policy"].as_str().filter(|p| !p.is_empty()).map(str::to_owned),
            ready: v["messages_ready"].as_u64().unwrap_or(0),
            unacked: v["messages_unacknowledged"].as_u64().unwrap_or(0),
        }))
    }

    pub async fn policy(&self, name: &str) -> Result<Option<ObservedPolicy>, String> {
        let path = format!("/api/policies/{}/{}", self.vhost, url_encode(name));
        Ok(self.call(Method::GET, path, None).await?.map(|v| ObservedPolicy {
            pattern: v["pattern"].as_str().unwrap_or_default().to_owned(),
            priority: v["priority"].as_i64().unwrap_or(0),
            apply_to: v["apply-to"].as_str().unwrap_or_default().to_owned(),
            definition: v["definition"]
                .as_object()
                .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default(),
        }))
    }

    /// Create or replace a policy applied to queues.
    pub async fn set_policy(&self, name: &str, pattern: &str, priority: i64, definition: &BTreeMap<String, Value>) -> Result<(), String> {
        let path = format!("/api/policies/{}/{}", self.vhost, url_encode(name));
        let body = json!({"pattern": pattern, "priority": priority, "apply-to": "queues", "definition": definition});
        self.call(Method::PUT, path, Some(body)).await.map(drop)
    }

    /// The routing keys binding `queue` to `exchange`.
    pub async fn bindings(&self, exchange: &str, queue: &str) -> Result<Vec<String>, String> {
        let path = format!("/api/bindings/{}/e/{}/q/{}", self.vhost, url_encode(exchange), url_encode(queue));
        let v = self.call(Method::GET, path, None).await?.unwrap_or_default();
        let keys = v.as_array().into_iter().flatten();
        Ok(keys.filter_map(|b| b["routing_key"].as_str().map(str::to_owned)).collect())
    }

    pub async fn declare_exchange(&self, name: &str, type_: &str, durable: bool) -> Result<(), String> {
        let path = format!("/api/exchanges/{}/{}", self.vhost, url_encode(name));
        let body = json!({"type": type_, "durable": durable, "auto_delete": false, "internal": false, "arguments": {}});
        self.call(Method::PUT, path, Some(body)).await.map(drop)
    }

    pub async fn declare_queue(&self, name: &str, arguments: &BTreeMap<String, Value>) -> Result<(), String> {
        let path = format!("/api/queues/{}/{}", self.vhost, url_encode(name));
        let body = json!({"durable": true, "auto_delete": false, "arguments": arguments});
        self.call(Method::PUT, path, Some(body)).await.map(drop)
    }

    pub async fn bind(&self, exchange: &str, queue: &str, key: &str) -> Result<(), String> {
        let path = format!("/api/bindings/{}/e/{}/q/{}", self.vhost, url_encode(exchange), url_encode(queue));
        self.call(Method::POST, path, Some(json!({"routing_key": key, "arguments": {}})))
            .await
            .map(drop)
    }

    /// Remove the binding of `queue` to `exchange` by `key` (one without arguments).
    pub async fn unbind(&self, exchange: &str, queue: &str, key: &str) -> Result<(), String> {
        let props = if key.is_empty() { "~".to_owned() } else { url_encode(key) };
        let path = format!(
            "/api/bindings/{}/e/{}/q/{}/{props}",
            self.vhost,
            url_encode(exchange),
            url_encode(queue)
        );
        self.call(Method::DELETE, path, None).await.map(drop)
    }

    /// Delete a queue (with its messages), an exchange or a policy (`kind`: `queues`,
    /// `exchanges`, `policies`); absent already is done.
    pub async fn delete(&self, kind: &str, name: &str) -> Result<(), String> {
        let path = format!("/api/{kind}/{}/{}", self.vhost, url_encode(name));
        self.call(Method::DELETE, path, None).await.map(drop)
    }

    /// One request: Some(body) on success (Null when empty), None on 404, Err with the server's
    /// reason otherwise.
    async fn call(&self, method: Method, path: String, body: Option<Value>) -> Result<Option<Value>, String> {
        let what = format!("{method} {}{path}", self.base);
        let (status, v, bytes) = self.request(method, path, body).await?;
        match status {
            s if s.is_success() => Ok(Some(v)),
            StatusCode::NOT_FOUND => Ok(None),
            s => {
                let reason = v["reason"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
                let hint = match s {
                    StatusCode::UNAUTHORIZED => {
                        " (the user, password, or the user's tags: `management` to read and declare, `policymaker` for policies)"
                    }
                    _ => "",
                };
                Err(format!("{what}: {s}{hint}: {}", reason.trim()))
            }
        }
    }

    /// One request: the status and the body (as JSON, Null when it is not).
    async fn request(&self, method: Method, path: String, body: Option<Value>) -> Result<(StatusCode, Value, Bytes), String> {
        let what = format!("{method} {}{path}", self.base);
        let mut req = Request::builder().method(method).uri(format!("{}{path}", self.base));
        if let Some(a) = &self.authorization {
            req = req.header("authorization", a);
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = req
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("{what}: {e}"))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .map_err(|_| format!("{what}: no answer in 10s"))?
            .map_err(|e| format!("cannot reach the RabbitMQ management API ({what}): {}", chain(&e)))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| format!("{what}: {e}"))?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, v, bytes))
    }
}

/// An error with its causes (hyper's own says only "client error (Connect)"; the TLS or socket
/// error that made it is a source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(&format!(": {c}"));
        cause = c.source();
    }
    out
}

/// A rustls client configuration trusting the CAs in `pem`.
fn tls_config(pem: &str) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let c = c.map_err(|e| format!("ca.crt: {e}"))?;
        roots.add(c).map_err(|e| format!("ca.crt: {e}"))?;
    }
    if roots.is_empty() {
        return Err("ca.crt holds no PEM certificate".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_made_with_the_system_roots_or_a_given_ca_and_never_shows_the_password() {
        let mut s = ManagementSettings {
            url: "https://rabbit:15671/".into(),
            vhost: "/".into(),
            auth: Some(("ops".into(), Redacted::new("hunter2"))),
            tls_ca: None,
        };
        let a = RabbitAdmin::new(&s).unwrap();
        assert_eq!((a.base.as_str(), a.vhost.as_str()), ("https://rabbit:15671", "%2F"));
        assert!(
            !a.authorization.as_deref().unwrap().contains("hunter2"),
            "base64, and never printed"
        );
        s.tls_ca = Some("not a certificate".into());
        let e = RabbitAdmin::new(&s).err().unwrap();
        assert!(e.contains("ca.crt") && !e.contains("hunter2"), "{e}");
    }
}
