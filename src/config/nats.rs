//! NATS JetStream as `lockstep relay --broker nats` takes it: servers, credentials from files (a
//! mounted Secret), TLS.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::{read_trimmed, RelayConfigError};
pub use crate::core::nats_settings::server_host_port;
use crate::core::{
    nats_settings::{NatsAuth, NatsSettings},
    redacted::Redacted,
};

/// The broker the relay publishes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum BrokerArg {
    #[default]
    Kafka,
    Nats,
    Rabbitmq,
}

#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS servers, nats://host:port[,...] (tls://host:port for TLS); with --broker nats.
    #[arg(long, env = "NATS_URL", value_delimiter = ',')]
    pub nats_url: Vec<String>,
    /// NATS user, with --nats-password-file.
    #[arg(long, env = "NATS_USER", requires = "nats_password_file")]
    pub nats_user: Option<String>,
    /// File holding the NATS user's password.
    #[arg(long, env = "NATS_PASSWORD_FILE", requires = "nats_user")]
    pub nats_password_file: Option<PathBuf>,
    /// File holding a NATS token.
    #[arg(long, env = "NATS_TOKEN_FILE")]
    pub nats_token_file: Option<PathBuf>,
    /// File holding an NKey seed.
    #[arg(long, env = "NATS_NKEY_FILE")]
    pub nats_nkey_file: Option<PathBuf>,
    /// A `.creds` file (user JWT and NKey seed).
    #[arg(long, env = "NATS_CREDENTIALS_FILE")]
    pub nats_credentials_file: Option<PathBuf>,
    /// PEM file of the CAs to trust (TLS is then required).
    #[arg(long, env = "NATS_TLS_CA_FILE")]
    pub nats_tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM), with --nats-tls-key-file.
    #[arg(long, env = "NATS_TLS_CERT_FILE", requires = "nats_tls_key_file")]
    pub nats_tls_cert_file: Option<PathBuf>,
    /// Client key (PEM), with --nats-tls-cert-file.
    #[arg(long, env = "NATS_TLS_KEY_FILE", requires = "nats_tls_cert_file")]
    pub nats_tls_key_file: Option<PathBuf>,
    /// A directory holding the files of a NATS Secret (a mounted Secret): `user` and `password`,
    /// `token`, `nkey` or `creds`, and `ca.crt`, `tls.crt`, `tls.key`.
    #[arg(long, env = "NATS_SECRET_DIR")]
    pub nats_secret_dir: Option<PathBuf>,
    /// How long a PubAck may take before the message counts as failed and is sent again (a lost
    /// connection fails it at once; this bounds a server that stays connected and silent).
    #[arg(long, env = "LOCKSTEP_NATS_ACK_TIMEOUT", default_value = "30s", value_parser = crate::core::duration::parse)]
    pub nats_ack_timeout: std::time::Duration,
}

impl NatsArgs {
    /// The settings, credentials read from their files. At most one way to authenticate.
    pub fn settings(&self) -> Result<NatsSettings, RelayConfigError> {
        let invalid = |m: String| RelayConfigError::Nats(m);
        let servers: Vec<String> = self
            .nats_url
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if servers.is_empty() {
            return Err(invalid("no NATS servers: set NATS_URL or --nats-url".into()));
        }
        for s in &servers {
            server_host_port(s).map_err(invalid)?;
        }
        let read = |p: &PathBuf| read_trimmed(p).map(Redacted::new);
        let mut ways = Vec::new();
        if let (Some(user), Some(file)) = (&self.nats_user, &self.nats_password_file) {
            ways.push(NatsAuth::UserPassword {
                user: user.clone(),
                password: read(file)?,
            });
        }
        if let Some(f) = &self.nats_token_file {
            ways.push(NatsAuth::Token(read(f)?));
        }
        if let Some(f) = &self.nats_nkey_file {
            ways.push(NatsAuth::NKey(read(f)?));
        }
        if let Some(f) = &self.nats_credentials_file {
            ways.push(NatsAuth::Credentials(Redacted::new(
                std::fs::read_to_string(f).map_err(|source| RelayConfigError::Read { path: f.clone(), source })?,
            )));
        }
        let (mut tls_ca, mut tls_client) = (
            self.nats_tls_ca_file.clone(),
            self.nats_tls_cert_file.clone().zip(self.nats_tls_key_file.clone()),
        );
        if let Some(dir) = &self.nats_secret_dir {
            let mut files = std::collections::BTreeMap::new();
            for key in crate::core::nats_settings::SECRET_KEYS {
                let path = dir.join(key);
                if path.exists() {
                    files.insert(key.to_owned(), read_trimmed(&path)?);
                }
            }
            let auth = crate::core::nats_settings::auth_from(&files).map_err(|m| invalid(format!("{}: {m}", dir.display())))?;
            if !matches!(auth, NatsAuth::None) {
                ways.push(auth);
            }
            tls_ca = tls_ca.or_else(|| files.contains_key("ca.crt").then(|| dir.join("ca.crt")));
            if files.contains_key("tls.crt") && files.contains_key("tls.key") {
                tls_client = tls_client.or_else(|| Some((dir.join("tls.crt"), dir.join("tls.key"))));
            }
        }
        if ways.len() > 1 {
            return Err(invalid(
                "give one NATS authentication: user and password, a token, an NKey or a credentials file".into(),
            ));
        }
        Ok(NatsSettings {
            servers,
            auth: ways.pop().unwrap_or_default(),
            tls_ca,
            tls_client,
            name: None,
            ack_timeout: self.nats_ack_timeout,
        })
    }
}
