//! The Kafka cluster and client settings, as `lockstep relay` and `lockstep doctor` take them.

use std::{collections::BTreeMap, path::PathBuf};

use clap::Args;

use super::{read_trimmed, RelayConfigError};
use crate::core::redacted::Redacted;

#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, host:port[,host:port...].
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: Option<String>,
    /// Extra librdkafka setting KEY=VALUE (repeatable); SASL/TLS settings go here.
    #[arg(long = "kafka-config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub kafka_config: Vec<(String, String)>,
    /// Directory whose files are librdkafka settings: file name = key, content = value (a mounted Secret).
    #[arg(long, env = "LOCKSTEP_KAFKA_CONFIG_DIR")]
    pub kafka_config_dir: Option<PathBuf>,
}

impl KafkaArgs {
    /// The settings of --kafka-config-dir, then --kafka-config (which wins).
    pub fn settings(&self) -> Result<BTreeMap<String, Redacted>, RelayConfigError> {
        kafka_settings(self.kafka_config_dir.as_deref(), &self.kafka_config)
    }
}

/// librdkafka settings: the files of `dir` (file name = key, content = value; a mounted Secret),
/// then `pairs` (which win). Shared by `lockstep relay` and `lockstep doctor`.
pub fn kafka_settings(dir: Option<&std::path::Path>, pairs: &[(String, String)]) -> Result<BTreeMap<String, Redacted>, RelayConfigError> {
    let mut kafka_config = BTreeMap::new();
    if let Some(dir) = dir {
        let entries = std::fs::read_dir(dir).map_err(|source| RelayConfigError::Read {
            path: dir.to_owned(),
            source,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Secret volumes hold ..data and friends: links that are not keys.
            if name.starts_with('.') || !entry.path().is_file() {
                continue;
            }
            kafka_config.insert(name, Redacted::new(read_trimmed(&entry.path())?));
        }
    }
    for (k, v) in pairs {
        kafka_config.insert(k.clone(), Redacted::new(v.clone()));
    }
    Ok(kafka_config)
}

pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.trim().is_empty())
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}
