//! RabbitMQ as `lockstep relay --broker rabbitmq` takes it: the server URL, the exchange,
//! credentials from files (a mounted Secret), TLS.

use std::path::PathBuf;

use clap::Args;

use super::{read_trimmed, RelayConfigError};
use crate::core::{
    amqp_settings::{self, AmqpSettings},
    redacted::Redacted,
};

#[derive(Debug, Clone, Args)]
pub struct AmqpArgs {
    /// RabbitMQ server, amqp://host:port/vhost (amqps:// for TLS; the vhost URL-encoded, %2f for
    /// "/"), without credentials; with --broker rabbitmq.
    #[arg(long, env = "AMQP_URL")]
    pub amqp_url: Option<String>,
    /// The exchange to publish to; the routing key is --topic's result. Empty: the default
    /// exchange, where the routing key names a queue.
    #[arg(long, env = "LOCKSTEP_AMQP_EXCHANGE", default_value = "")]
    pub amqp_exchange: String,
    /// RabbitMQ user, with --amqp-password-file.
    #[arg(long, env = "AMQP_USER", requires = "amqp_password_file")]
    pub amqp_user: Option<String>,
    /// File holding the RabbitMQ user's password.
    #[arg(long, env = "AMQP_PASSWORD_FILE", requires = "amqp_user")]
    pub amqp_password_file: Option<PathBuf>,
    /// PEM file of the CAs to trust for amqps:// (default: the system's).
    #[arg(long, env = "AMQP_TLS_CA_FILE")]
    pub amqp_tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM), with --amqp-tls-key-file.
    #[arg(long, env = "AMQP_TLS_CERT_FILE", requires = "amqp_tls_key_file")]
    pub amqp_tls_cert_file: Option<PathBuf>,
    /// Client key (PEM, PKCS#8), with --amqp-tls-cert-file.
    #[arg(long, env = "AMQP_TLS_KEY_FILE", requires = "amqp_tls_cert_file")]
    pub amqp_tls_key_file: Option<PathBuf>,
    /// A directory holding the files of a RabbitMQ Secret (a mounted Secret): `user` and
    /// `password`, and `ca.crt`, `tls.crt`, `tls.key`.
    #[arg(long, env = "AMQP_SECRET_DIR")]
    pub amqp_secret_dir: Option<PathBuf>,
    /// How long a publisher confirm may take before the message counts as failed and is sent
    /// again on a new connection (a lost connection fails it at once; this bounds a server that
    /// stays connected and silent, or blocks the connection for its resource alarms).
    #[arg(long, env = "LOCKSTEP_AMQP_CONFIRM_TIMEOUT", default_value = "30s", value_parser = crate::core::duration::parse)]
    pub amqp_confirm_timeout: std::time::Duration,
    /// Messages larger than this (payload and headers) are dead-lettered without being sent; keep
    /// it at or under the server's max_message_size (a larger message closes the channel).
    #[arg(long, env = "LOCKSTEP_AMQP_MAX_MESSAGE_BYTES", default_value_t = amqp_settings::DEFAULT_MAX_MESSAGE_BYTES)]
    pub amqp_max_message_bytes: usize,
}

impl AmqpArgs {
    /// The settings, the password read from its file.
    pub fn settings(&self) -> Result<AmqpSettings, RelayConfigError> {
        let invalid = |m: String| RelayConfigError::Amqp(m);
        let url = self.amqp_url.as_deref().map(str::trim).unwrap_or_default().to_owned();
        if url.is_empty() {
            return Err(invalid("no RabbitMQ server: set AMQP_URL or --amqp-url".into()));
        }
        amqp_settings::server_host_port(&url).map_err(invalid)?;
        if let Some(p) = amqp_settings::exchange_problem(&self.amqp_exchange) {
            return Err(invalid(format!("--amqp-exchange: {p}")));
        }
        let mut auth = match (&self.amqp_user, &self.amqp_password_file) {
            (Some(u), Some(f)) => Some((u.clone(), Redacted::new(read_trimmed(f)?))),
            _ => None,
        };
        let (mut tls_ca, mut tls_client) = (
            self.amqp_tls_ca_file.clone(),
            self.amqp_tls_cert_file.clone().zip(self.amqp_tls_key_file.clone()),
        );
        if let Some(dir) = &self.amqp_secret_dir {
            let mut files = std::collections::BTreeMap::new();
            for key in amqp_settings::SECRET_KEYS {
                let path = dir.join(key);
                if path.exists() {
                    files.insert(key.to_owned(), read_trimmed(&path)?);
                }
            }
            let from_secret = amqp_settings::auth_from(&files).map_err(|m| invalid(format!("{}: {m}", dir.display())))?;
            if from_secret.is_some() && auth.is_some() {
                return Err(invalid(
                    "give the RabbitMQ user once: by --amqp-user or by the Secret directory".into(),
                ));
            }
            auth = auth.or(from_secret);
            tls_ca = tls_ca.or_else(|| files.contains_key("ca.crt").then(|| dir.join("ca.crt")));
            if files.contains_key("tls.crt") && files.contains_key("tls.key") {
                tls_client = tls_client.or_else(|| Some((dir.join("tls.crt"), dir.join("tls.key"))));
            }
        }
        if self.amqp_max_message_bytes == 0 {
            return Err(invalid("--amqp-max-message-bytes must be above 0".into()));
        }
        Ok(AmqpSettings {
            url,
            auth,
            exchange: self.amqp_exchange.clone(),
            tls_ca,
            tls_client,
            name: None,
            confirm_timeout: self.amqp_confirm_timeout,
            max_message_bytes: self.amqp_max_message_bytes,
        })
    }
}
