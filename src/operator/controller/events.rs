//! Events (events.k8s.io/v1) about the objects, a repeat of one within a few minutes counted on
//! the first (its series) rather than written again. kube-runtime's Recorder does the same but
//! keys its cache by reason without the note, so a second Event of one reason (TopicConfigDrift
//! naming another key, a condition False for another cause) within its cache's lifetime was
//! shown with the first one's note. Here the note is part of the key.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        core::v1::ObjectReference,
        events::v1::{Event as K8sEvent, EventSeries},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    api::{Patch, PatchParams, PostParams},
    runtime::events::{Event, EventType, Reporter},
    Api, Client,
};
use tokio::sync::Mutex;

/// How long a published Event takes repeats into its series.
const SERIES_FOR: Duration = Duration::from_secs(6 * 60);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    regarding: (Option<String>, Option<String>, Option<String>),
    warning: bool,
    reason: String,
    action: String,
    note: Option<String>,
}

/// An Event published: its name, how many times it happened, when first.
struct Published {
    name: String,
    namespace: String,
    count: i32,
    at: Instant,
}

pub struct Events {
    client: Client,
    reporter: Reporter,
    published: Mutex<HashMap<Key, Published>>,
}

impl Events {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Events {
            client,
            reporter,
            published: Mutex::new(HashMap::new()),
        }
    }

    /// Create the Event, or count a repeat of one published within `SERIES_FOR` with the same
    /// type, reason, action and note about the same object.
    pub async fn publish(&self, ev: &Event, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let key = Key {
            regarding: (regarding.namespace.clone(), regarding.name.clone(), regarding.uid.clone()),
            warning: ev.type_ == EventType::Warning,
            reason: ev.reason.clone(),
            action: ev.action.clone(),
            note: ev.note.clone(),
        };
        let mut published = self.published.lock().await;
        published.retain(|_, p| p.at.elapsed() < SERIES_FOR);
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".into());
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        if let Some(p) = published.get_mut(&key) {
            let series = EventSeries {
                count: p.count + 1,
                last_observed_time: MicroTime(Timestamp::now()),
            };
            let patch = serde_json::json!({ "series": series });
            let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &p.namespace);
            // An Event gone meanwhile (deleted, or expired) is written anew.
            if api.patch(&p.name, &PatchParams::default(), &Patch::Merge(&patch)).await.is_ok() {
                p.count += 1;
                return Ok(());
            }
            published.remove(&key);
        }
        let created = api.create(&PostParams::default(), &self.event(ev, regarding)).await?;
        let name = created.metadata.name.unwrap_or_default();
        let at = Instant::now();
        published.insert(
            key,
            Published {
                name,
                namespace,
                count: 1,
                at,
            },
        );
        Ok(())
    }

    fn event(&self, ev: &Event, regarding: &ObjectReference) -> K8sEvent {
        let now = Timestamp::now();
        let instance = self.reporter.instance.clone();
        K8sEvent {
            metadata: ObjectMeta {
                namespace: regarding.namespace.clone(),
                // As kubectl and kube-runtime name them: the object's name and the time.
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(&self.reporter.controller),
                    now.as_nanosecond()
                )),
                ..Default::default()
            },
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            note: ev.note.clone(),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: ev.secondary.clone(),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(instance.unwrap_or_else(|| self.reporter.controller.clone())),
            type_: Some(if ev.type_ == EventType::Warning { "Warning" } else { "Normal" }.into()),
            ..Default::default()
        }
    }
}
