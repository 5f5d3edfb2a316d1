//! JetStream administration behind a small typed API: describe, create and update a stream, and
//! read a consumer's pending counts. Errors never carry credentials (the client is given none in
//! its messages).

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::{
    core::nats_settings::NatsSettings,
    crd::{DesiredStream, Discard, StreamStorage},
};

/// A stream as the server reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedStream {
    pub subjects: Vec<String>,
    pub storage: StreamStorage,
    pub replicas: i32,
    /// Zero: unlimited.
    pub max_age: Duration,
    pub duplicate_window: Duration,
    pub discard: Discard,
    /// None: unlimited.
    pub max_bytes: Option<i64>,
    /// `limits`, `interest` or `workqueue`.
    pub retention: &'static str,
    pub messages: u64,
}

/// A consumer's backlog: messages not yet delivered, and delivered but not acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerBacklog {
    pub pending: u64,
    pub ack_pending: u64,
}

/// What the server said of itself when the connection opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFacts {
    pub version: String,
    /// JetStream enabled on the server.
    pub jetstream: bool,
    pub max_payload: usize,
}

/// The account's JetStream use and limits (None: unlimited).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccountFacts {
    pub streams: usize,
    pub max_streams: Option<i64>,
    /// File storage used and allowed, in bytes.
    pub storage: u64,
    pub max_storage: Option<i64>,
    /// Every stream must be created with max_bytes.
    pub max_bytes_required: bool,
}

pub struct NatsAdmin {
    client: async_nats::Client,
    js: jetstream::Context,
}

impl NatsAdmin {
    /// Connect to the first server that answers.
    pub async fn connect(s: &NatsSettings) -> Result<Self, String> {
        let mut last = String::from("no NATS servers");
        for server in &s.servers {
            let options = crate::clients::broker::nats::options(s).await.map_err(|r| r.error)?;
            match options.connect(server.as_str()).await {
                Ok(client) => {
                    let js = jetstream::ContextBuilder::new()
                        .timeout(Duration::from_secs(10))
                        .build(client.clone());
                    return Ok(NatsAdmin { client, js });
                }
                Err(e) => last = format!("cannot connect to NATS at {server}: {e}"),
            }
        }
        Err(last)
    }

    /// Which NATS this is: the cluster's name, else the server's id (one JetStream for both).
    pub fn identity(&self) -> String {
        let info = self.client.server_info();
        info.cluster
            .filter(|c| !c.is_empty())
            .map_or(info.server_id, |c| format!("cluster {c}"))
    }

    pub fn server(&self) -> ServerFacts {
        let info = self.client.server_info();
        ServerFacts {
            version: info.version,
            jetstream: info.jetstream,
            max_payload: info.max_payload,
        }
    }

    /// The account's JetStream limits; Err when JetStream is not enabled for it. Read as plain
    /// JSON: the client's own type expects fields servers before 2.10 do not send.
    pub async fn account(&self) -> Result<AccountFacts, String> {
        let reply = self
            .client
            .request("$JS.API.INFO", bytes::Bytes::new())
            .await
            .map_err(|e| format!("$JS.API.INFO: {e}"))?;
        account_facts(&reply.payload)
    }

    pub async fn describe(&self, name: &str) -> Result<Option<ObservedStream>, String> {
        match self.js.get_stream(name).await {
            Ok(mut s) => {
                let info = s.info().await.map_err(|e| format!("stream {name}: {e}"))?;
                Ok(Some(observed(&info.config, info.state.messages)))
            }
            Err(e) => match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(j) if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND => {
                    Ok(None)
                }
                _ => Err(format!("stream {name}: {e}")),
            },
        }
    }

    pub async fn create(&self, d: &DesiredStream) -> Result<(), String> {
        self.js
            .create_stream(config(d))
            .await
            .map(drop)
            .map_err(|e| format!("cannot create stream {}: {e}", d.name))
    }

    /// Set the stream's configuration to `d` (whose ignored settings hold what the server has).
    pub async fn update(&self, d: &DesiredStream) -> Result<(), String> {
        self.js
            .update_stream(config(d))
            .await
            .map(drop)
            .map_err(|e| format!("cannot update stream {}: {e}", d.name))
    }

    /// Delete a stream; one already gone is fine.
    pub async fn delete(&self, name: &str) -> Result<(), String> {
        if self.describe(name).await?.is_none() {
            return Ok(());
        }
        self.js
            .delete_stream(name)
            .await
            .map(drop)
            .map_err(|e| format!("cannot delete stream {name}: {e}"))
    }

    pub async fn consumer_backlog(&self, stream: &str, consumer: &str) -> Result<ConsumerBacklog, String> {
        let s = self.js.get_stream(stream).await.map_err(|e| format!("stream {stream}: {e}"))?;
        let info = s
            .consumer_info(consumer)
            .await
            .map_err(|e| format!("consumer {consumer} of stream {stream}: {e}"))?;
        Ok(ConsumerBacklog {
            pending: info.num_pending,
            ack_pending: info.num_ack_pending as u64,
        })
    }
}

/// `$JS.API.INFO`'s answer: the account's use and limits (negative limits: none), or its error. Pure.
pub fn account_facts(reply: &[u8]) -> Result<AccountFacts, String> {
    let v: serde_json::Value = serde_json::from_slice(reply).map_err(|e| format!("$JS.API.INFO: {e}"))?;
    if let Some(e) = v.get("error") {
        let text = e.get("description").and_then(|d| d.as_str()).unwrap_or("an error");
        return Err(format!("JetStream: {text}"));
    }
    let limit = |k: &str| v["limits"][k].as_i64().filter(|n| *n >= 0);
    Ok(AccountFacts {
        streams: v["streams"].as_u64().unwrap_or(0) as usize,
        max_streams: limit("max_streams"),
        storage: v["storage"].as_u64().unwrap_or(0),
        max_storage: limit("max_storage"),
        max_bytes_required: v["limits"]["max_bytes_required"].as_bool().unwrap_or(false),
    })
}

/// The server's configuration for a desired stream: limits retention (messages stay until a
/// limit removes them, so a consumer's redelivery finds them), the rest from the spec.
pub fn config(d: &DesiredStream) -> stream::Config {
    stream::Config {
        name: d.name.clone(),
        subjects: d.subjects.clone(),
        retention: stream::RetentionPolicy::Limits,
        storage: match d.storage {
            StreamStorage::File => stream::StorageType::File,
            StreamStorage::Memory => stream::StorageType::Memory,
        },
        num_replicas: d.replicas.max(1) as usize,
        max_age: d.max_age,
        duplicate_window: d.duplicate_window,
        discard: match d.discard {
            Discard::Old => stream::DiscardPolicy::Old,
            Discard::New => stream::DiscardPolicy::New,
        },
        max_bytes: d.max_bytes.unwrap_or(-1),
        ..Default::default()
    }
}

fn observed(c: &stream::Config, messages: u64) -> ObservedStream {
    ObservedStream {
        subjects: c.subjects.clone(),
        storage: match c.storage {
            stream::StorageType::Memory => StreamStorage::Memory,
            _ => StreamStorage::File,
        },
        replicas: c.num_replicas as i32,
        max_age: c.max_age,
        duplicate_window: c.duplicate_window,
        discard: match c.discard {
            stream::DiscardPolicy::New => Discard::New,
            _ => Discard::Old,
        },
        max_bytes: (c.max_bytes > 0).then_some(c.max_bytes),
        retention: match c.retention {
            stream::RetentionPolicy::Limits => "limits",
            stream::RetentionPolicy::Interest => "interest",
            stream::RetentionPolicy::WorkQueue => "workqueue",
        },
        messages,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_account_reply_of_a_2_9_server_and_an_error_read_as_facts() {
        let ok = br#"{"type":"io.nats.jetstream.api.v1.account_info_response","memory":0,"storage":2048,
            "streams":3,"consumers":1,"limits":{"max_memory":-1,"max_storage":-1,"max_streams":5,
            "max_consumers":-1,"max_ack_pending":-1,"memory_max_stream_bytes":-1,"storage_max_stream_bytes":-1,
            "max_bytes_required":true},"api":{"total":9,"errors":0}}"#;
        let f = account_facts(ok).unwrap();
        assert_eq!(
            f,
            AccountFacts {
                streams: 3,
                max_streams: Some(5),
                storage: 2048,
                max_storage: None,
                max_bytes_required: true,
            }
        );
        let err = br#"{"type":"io.nats.jetstream.api.v1.account_info_response","error":{"code":503,"err_code":10039,"description":"jetstream not enabled for account"}}"#;
        assert_eq!(account_facts(err).unwrap_err(), "JetStream: jetstream not enabled for account");
    }
}
