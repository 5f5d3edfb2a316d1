//! How to reach a NATS server with JetStream: servers, credentials, TLS. Plain data, shared by
//! the configuration that reads it and the client that uses it.

use std::time::Duration;

use std::collections::BTreeMap;

use super::redacted::Redacted;

/// How the relay authenticates to NATS. Values never reach a log or an error.
#[derive(Clone, Debug, Default)]
pub enum NatsAuth {
    #[default]
    None,
    UserPassword {
        user: String,
        password: Redacted,
    },
    Token(Redacted),
    /// An NKey seed.
    NKey(Redacted),
    /// A `.creds` file's contents (a user JWT and its NKey seed).
    Credentials(Redacted),
}

/// The keys of a NATS Secret (and files of its mounted directory): credentials, one way, and
/// TLS files.
pub const SECRET_KEYS: [&str; 8] = ["user", "password", "token", "nkey", "creds", "ca.crt", "tls.crt", "tls.key"];

#[derive(Clone, Debug, Default)]
pub struct NatsSettings {
    /// `nats://host:port` or `tls://host:port`, tried in turn.
    pub servers: Vec<String>,
    pub auth: NatsAuth,
    /// PEM file of the CAs to trust; set, TLS is required.
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM files), for servers that verify clients.
    pub tls_client: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// The connection's name, as the server's monitoring shows it.
    pub name: Option<String>,
    /// How long a PubAck may take before the message counts as failed (and is sent again).
    pub ack_timeout: Duration,
}

/// The one way to authenticate a Secret holds. Pure; never names a value.
pub fn auth_from(data: &BTreeMap<String, String>) -> Result<NatsAuth, String> {
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

/// `host:port` of a server URL (`nats://`, `tls://` or none; port 4222 when none is given).
/// Credentials in it are refused: they belong in a file or a Secret (a URL reaches logs).
pub fn server_host_port(url: &str) -> Result<String, String> {
    let rest = ["nats://", "tls://"].iter().find_map(|p| url.strip_prefix(p)).unwrap_or(url);
    if rest.contains('@') {
        return Err("a NATS URL must not hold credentials: give them in a file or Secret (user and password, a token, an NKey or a credentials file)".into());
    }
    let host_port = rest.trim_end_matches('/');
    match host_port.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(host_port.to_owned()),
        None if !host_port.is_empty() && !host_port.contains('/') => Ok(format!("{host_port}:4222")),
        _ => Err(format!("{url:?} is not a NATS server URL (nats://host:port)")),
    }
}

/// A subject a message can be published to: dot-separated non-empty tokens, no whitespace, no
/// wildcard.
pub fn valid_subject(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|t| !t.is_empty() && !t.contains(['*', '>']) && !t.contains(char::is_whitespace))
}

/// A subject a stream may store: as `valid_subject`, where a token may be `*` and the last `>`.
pub fn valid_filter_subject(s: &str) -> bool {
    let tokens: Vec<&str> = s.split('.').collect();
    !s.is_empty()
        && tokens.iter().enumerate().all(|(i, t)| {
            *t == "*"
                || (*t == ">" && i + 1 == tokens.len())
                || (!t.is_empty() && !t.contains(['*', '>']) && !t.contains(char::is_whitespace))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn one_way_to_authenticate_and_no_value_in_messages() {
        assert!(matches!(auth_from(&data(&[])), Ok(NatsAuth::None)));
        assert!(matches!(
            auth_from(&data(&[("user", "u"), ("password", "hunter2")])),
            Ok(NatsAuth::UserPassword { .. })
        ));
        assert!(matches!(
            auth_from(&data(&[("creds", "x"), ("ca.crt", "pem")])),
            Ok(NatsAuth::Credentials(_))
        ));
        let e = auth_from(&data(&[("user", "u")])).unwrap_err();
        assert!(e.contains("together"), "{e}");
        let e = auth_from(&data(&[("token", "hunter2"), ("nkey", "SUAB")])).unwrap_err();
        assert!(e.contains("more than one") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn server_urls() {
        assert_eq!(server_host_port("nats://127.0.0.1:4223").unwrap(), "127.0.0.1:4223");
        assert_eq!(server_host_port("tls://nats.example:4222").unwrap(), "nats.example:4222");
        assert_eq!(server_host_port("nats").unwrap(), "nats:4222");
        let e = server_host_port("nats://u:secret@h:4222").unwrap_err();
        assert!(!e.contains("secret") && e.contains("credentials"), "{e}");
        assert!(server_host_port("nats://:4222").is_err());
        assert!(server_host_port("nats://h:port").is_err());
    }

    #[test]
    fn subjects() {
        for ok in ["orders", "orders.created.v1", "a-b_c.D9"] {
            assert!(valid_subject(ok) && valid_filter_subject(ok), "{ok}");
        }
        for bad in ["", "orders.", ".orders", "a..b", "a b", "a.*", "a.>", "a\tb", "x*"] {
            assert!(!valid_subject(bad), "{bad:?}");
        }
        for filter in ["orders.*", "orders.>", "*.created", ">"] {
            assert!(valid_filter_subject(filter) && !valid_subject(filter), "{filter}");
        }
        for bad in ["orders.>.x", "a..b", "or*ders", "a b.*", ""] {
            assert!(!valid_filter_subject(bad), "{bad:?}");
        }
    }
}
