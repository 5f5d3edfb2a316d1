//! The cluster id the brokers report.

use rdkafka::consumer::Consumer;

use super::Admin;

impl Admin {
    /// The cluster id the brokers report (None when they report none or cannot be reached): tells
    /// Kafka clusters apart whatever address reaches them.
    pub async fn cluster_id(&self) -> Option<String> {
        let consumer = self.metadata.clone();
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || consumer.client().fetch_cluster_id(timeout))
            .await
            .ok()
            .flatten()
            .filter(|id| !id.is_empty())
    }
}
