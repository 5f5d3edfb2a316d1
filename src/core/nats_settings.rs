//! How to reach a NATS server with JetStream: servers, credentials, TLS. Plain data, shared by
//! the configuration that reads it and the client that uses it.

use std::time::Duration;

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
