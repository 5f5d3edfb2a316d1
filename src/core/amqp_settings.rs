//! How to reach RabbitMQ over AMQP 0-9-1: the server URL, credentials, TLS, the exchange the
//! relay publishes to. Plain data, shared by the configuration that reads it and the client that
//! uses it.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use super::redacted::Redacted;

/// The keys of a RabbitMQ Secret (and files of its mounted directory): a user and password, and
/// TLS files.
pub const SECRET_KEYS: [&str; 5] = ["user", "password", "ca.crt", "tls.crt", "tls.key"];

/// Messages larger than this are refused before they are sent, unless told otherwise (the Kafka
/// and NATS defaults alike). RabbitMQ's own `max_message_size` (128 MiB in 3.x, 16 MiB in 4.x)
/// closes the channel on a larger message, failing every message in flight on it with it.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// A routing key or an exchange name is an AMQP short string: at most 255 bytes.
pub const MAX_SHORT_STRING: usize = 255;

#[derive(Clone, Debug, Default)]
pub struct AmqpSettings {
    /// `amqp://host:port/vhost` or `amqps://...`, without credentials.
    pub url: String,
    /// The user and password (PLAIN); none: the server's default (guest, loopback only).
    pub auth: Option<(String, Redacted)>,
    /// The exchange messages are published to; "" is the default exchange, which routes by
    /// queue name (the routing key names the queue).
    pub exchange: String,
    /// PEM file of the CAs to trust (for amqps://; the system's roots otherwise).
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM files), for servers that verify clients.
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// The connection's name, as the management UI shows it.
    pub name: Option<String>,
    /// How long a publisher confirm may take before the message counts as failed (and the
    /// connection as dead).
    pub confirm_timeout: Duration,
    /// Larger messages (payload and headers) are dead-lettered without being sent.
    pub max_message_bytes: usize,
}

/// The user and password a Secret holds, if any. Pure; never names a value.
pub fn auth_from(data: &BTreeMap<String, String>) -> Result<Option<(String, Redacted)>, String> {
    match (data.get("user"), data.get("password").filter(|p| !p.is_empty())) {
        (Some(u), Some(p)) => Ok(Some((u.clone(), Redacted::new(p.clone())))),
        (Some(_), None) | (None, Some(_)) => Err("keys user and password go together".into()),
        (None, None) => Ok(None),
    }
}

/// `host:port` of an `amqp://` or `amqps://` URL (ports 5672 and 5671 when none is given).
/// Credentials in it are refused: they belong in a file or a Secret (a URL reaches logs).
pub fn server_host_port(url: &str) -> Result<String, String> {
    let (rest, port) = match (url.strip_prefix("amqp://"), url.strip_prefix("amqps://")) {
        (Some(r), _) => (r, 5672),
        (_, Some(r)) => (r, 5671),
        _ => return Err(format!("{url:?} is not an AMQP URL (amqp://host:port/vhost or amqps://...)")),
    };
    let host_port = rest.split(['/', '?']).next().unwrap_or_default();
    if host_port.contains('@') {
        return Err("an AMQP URL must not hold credentials: give the user and password in files or a Secret".into());
    }
    match host_port.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(host_port.to_owned()),
        None if !host_port.is_empty() => Ok(format!("{host_port}:{port}")),
        _ => Err(format!("{url:?} is not an AMQP URL (amqp://host:port/vhost)")),
    }
}

/// Why `name` cannot be an exchange's name, if it cannot: at most 255 bytes of letters, digits,
/// '-', '_', '.' and ':' (RabbitMQ's rule), or "" for the default exchange.
pub fn exchange_problem(name: &str) -> Option<String> {
    if name.len() > MAX_SHORT_STRING {
        return Some(format!("exchange name is {} bytes, over 255", name.len()));
    }
    let bad = name.chars().find(|c| !(c.is_ascii_alphanumeric() || "-_.:".contains(*c)));
    bad.map(|c| format!("exchange name {name:?} holds {c:?}: letters, digits, '-', '_', '.' and ':' only"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_user_and_password_together_and_no_value_in_messages() {
        assert!(auth_from(&data(&[])).unwrap().is_none());
        let (u, p) = auth_from(&data(&[("user", "u"), ("password", "hunter2")])).unwrap().unwrap();
        assert_eq!((u.as_str(), p.expose()), ("u", "hunter2"));
        let e = auth_from(&data(&[("password", "hunter2")])).unwrap_err();
        assert!(e.contains("together") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn server_urls() {
        assert_eq!(server_host_port("amqp://127.0.0.1:5673/%2f").unwrap(), "127.0.0.1:5673");
        assert_eq!(server_host_port("amqps://rabbit.example/vh").unwrap(), "rabbit.example:5671");
        assert_eq!(server_host_port("amqp://rabbit").unwrap(), "rabbit:5672");
        assert_eq!(server_host_port("amqp://rabbit?heartbeat=5").unwrap(), "rabbit:5672");
        let e = server_host_port("amqp://u:secret@h:5672/%2f").unwrap_err();
        assert!(!e.contains("secret") && e.contains("credentials"), "{e}");
        for bad in ["http://h", "amqp://", "amqp://:5672", "amqp://h:port"] {
            assert!(server_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exchange_names() {
        for ok in ["", "outbox", "amq.topic", "a-b_c:d"] {
            assert_eq!(exchange_problem(ok), None, "{ok}");
        }
        for bad in ["with space", "caf\u{e9}", &"x".repeat(256)] {
            assert!(exchange_problem(bad).is_some(), "{bad}");
        }
    }
}
