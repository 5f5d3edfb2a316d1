//! One watch per kind, shared by every controller that needs it: the API server sees one watch
//! per kind, and every controller reads the same cache. Each subscriber gets every event
//! (deletions too) and applies its own filter.

use std::{fmt::Debug, hash::Hash};

use futures::{channel::mpsc, stream::BoxStream, SinkExt, Stream, StreamExt};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Namespace};
use kube::{
    api::Api,
    core::{DeserializeGuard, PartialObjectMeta},
    runtime::{
        predicates,
        reflector::{self, Lookup, ObjectRef, Store},
        utils::Predicate,
        watcher, WatchStreamExt,
    },
    Client, Resource,
};
use serde::de::DeserializeOwned;

use crate::crd::{DedupPolicy, InboxTable, OutboxRelay};

/// Events a subscriber has not taken yet; a full buffer holds the watch back (backpressure).
const BUFFER: usize = 256;

/// What subscribers receive: the watcher's events (errors are retried by the watch itself).
pub type Events<K> = BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// A watch and its cache, with the subscribers that share it.
pub struct SharedWatch<K: Resource + Clone + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    /// One Api over every namespace, or one per watched namespace (merged into one cache).
    apis: Vec<Api<K>>,
    store: Store<K>,
    writer: reflector::store::Writer<K>,
    subscribers: Vec<mpsc::Sender<watcher::Event<K>>>,
}

impl<K> SharedWatch<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    pub fn new(apis: Vec<Api<K>>) -> Self {
        let (store, writer) = reflector::store();
        SharedWatch {
            apis,
            store,
            writer,
            subscribers: Vec::new(),
        }
    }

    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// A stream of every event of this watch, from its start.
    pub fn subscribe(&mut self) -> Events<K> {
        let (tx, rx) = mpsc::channel(BUFFER);
        self.subscribers.push(tx);
        rx.map(Ok).boxed()
    }

    /// Run the watch: fill the cache, then hand each event to every subscriber.
    pub async fn run(self) {
        let SharedWatch {
            mut apis,
            writer,
            mut subscribers,
            ..
        } = self;
        let events = match apis.len() {
            1 => watcher(apis.remove(0), watcher::Config::default()).default_backoff().boxed(),
            _ => {
                let cache = writer.as_reader();
                let cached = move |r: &ObjectRef<K>| cache.get(r).map(|o| (*o).clone());
                super::merged_watch::merged(apis, watcher::Config::default(), cached).boxed()
            }
        };
        // managedFields are never read here and are a good part of each cached object.
        let mut events = events.modify(|o| o.meta_mut().managed_fields = None).reflect(writer).boxed();
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(kind = %K::kind(&Default::default()), error = %e, "watch failed; retrying");
                    continue;
                }
            };
            // A subscriber that is gone (its controller stopped) is dropped.
            let mut live = Vec::with_capacity(subscribers.len());
            for mut s in subscribers {
                if s.send(event.clone()).await.is_ok() {
                    live.push(s);
                }
            }
            subscribers = live;
        }
    }
}

/// The watches the operator opens, one per kind.
pub struct Watches {
    pub inboxes: SharedWatch<DeserializeGuard<InboxTable>>,
    pub policies: SharedWatch<DeserializeGuard<DedupPolicy>>,
    pub relays: SharedWatch<DeserializeGuard<OutboxRelay>>,
    pub namespaces: SharedWatch<PartialObjectMeta<Namespace>>,
    /// Relay Deployments, watched by metadata (their availability is read on reconcile).
    pub relay_deployments: Vec<Api<PartialObjectMeta<Deployment>>>,
}

impl Watches {
    /// `namespaces`: watch namespaced kinds in these namespaces only, or everywhere when empty
    /// (policies and namespaces are cluster-wide).
    pub fn new(client: &Client, namespaces: &[String]) -> Self {
        Watches {
            inboxes: SharedWatch::new(scoped(client, namespaces)),
            policies: SharedWatch::new(vec![Api::all(client.clone())]),
            relays: SharedWatch::new(scoped(client, namespaces)),
            namespaces: SharedWatch::new(vec![Api::all(client.clone())]),
            relay_deployments: scoped(client, namespaces),
        }
    }

    /// Run every watch until the process ends.
    pub async fn run(self) {
        futures::future::join4(self.inboxes.run(), self.policies.run(), self.relays.run(), self.namespaces.run()).await;
    }
}

/// An Api per namespace, or one over all of them when `namespaces` is empty.
pub fn scoped<K>(client: &Client, namespaces: &[String]) -> Vec<Api<K>>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    if namespaces.is_empty() {
        return vec![Api::all(client.clone())];
    }
    namespaces.iter().map(|ns| Api::namespaced(client.clone(), ns)).collect()
}

/// Spec changes and deletions only: status writes (ours or anyone's) start nothing.
pub fn spec_changes<K>(events: Events<K>) -> impl Stream<Item = Result<K, watcher::Error>> + Send
where
    K: Resource + Send + 'static,
{
    events
        .touched_objects()
        .predicate_filter(predicates::generation, Default::default())
}

/// A controller's own objects: spec, annotation (pause, replay), finalizer and deletion changes
/// only, so status writes start nothing.
pub fn own_changes<K>(events: Events<K>) -> impl Stream<Item = Result<K, watcher::Error>> + Send
where
    K: Resource + Send + 'static,
{
    let deleting = |k: &K| Some(k.meta().deletion_timestamp.is_some() as u64);
    let changes = predicates::generation
        .combine(predicates::annotations)
        .combine(predicates::finalizers)
        .combine(deleting);
    events.applied_objects().predicate_filter(changes, Default::default())
}

/// Every change (status included) of the relay Deployments, by metadata only: a Deployment
/// becoming available, or deleted by someone, starts its OutboxRelay's reconcile.
pub fn relay_deployment_changes(
    apis: Vec<Api<PartialObjectMeta<Deployment>>>,
) -> impl Stream<Item = Result<PartialObjectMeta<Deployment>, watcher::Error>> + Send {
    let relays = watcher::Config::default().labels("app.kubernetes.io/name=lockstep,app.kubernetes.io/component=relay");
    let each = apis
        .into_iter()
        .map(move |api| watcher(api, relays.clone()).default_backoff().touched_objects().boxed());
    futures::stream::select_all(each)
}

/// Label changes (they decide which policies select a namespace's tables).
pub fn label_changes<K>(events: Events<K>) -> impl Stream<Item = Result<K, watcher::Error>> + Send
where
    K: Resource + Send + 'static,
{
    events.touched_objects().predicate_filter(predicates::labels, Default::default())
}

/// Every object in a cache, to reconcile them all.
pub fn every<K>(store: &Store<K>) -> Vec<ObjectRef<K>>
where
    K: Lookup + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    store.state().iter().map(|o| o.to_object_ref(Default::default())).collect()
}
