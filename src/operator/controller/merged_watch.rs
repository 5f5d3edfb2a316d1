//! Several namespaces' watches as one, for an operator told to watch a list of namespaces: one
//! cache and one event stream, as a cluster-wide watch would give, with RBAC only in those
//! namespaces.
//!
//! A watch (re)lists with Init, InitApply..., InitDone. Passed through as they are, one namespace's
//! relist would replace the whole cache. So the first lists of all namespaces are joined into one
//! Init..InitDone, and a later relist of one namespace becomes Apply for what it lists and Delete
//! for what it no longer holds.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
};

use futures::{stream, Stream, StreamExt};
use kube::{
    api::Api,
    runtime::{reflector::ObjectRef, watcher, watcher::Event, WatchStreamExt},
    Resource,
};
use serde::de::DeserializeOwned;

/// One namespace's part of the merged watch.
struct Part<K: Resource>
where
    K::DynamicType: Eq + Hash,
{
    /// Its first list ended.
    listed: bool,
    /// Objects of a list in progress (Init..InitDone).
    listing: Option<HashMap<ObjectRef<K>, K>>,
    /// Before every part's first list ended: what this part holds (handed out in the joined Init).
    pending: HashMap<ObjectRef<K>, K>,
    /// After that: the refs this part holds (the objects themselves are in the shared cache).
    known: HashSet<ObjectRef<K>>,
}

/// The merging state machine: events of part `i` in, events of the merged watch out.
pub struct Merge<K: Resource>
where
    K::DynamicType: Eq + Hash,
{
    parts: Vec<Part<K>>,
    started: bool,
}

impl<K> Merge<K>
where
    K: Resource + Clone,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    pub fn new(parts: usize) -> Self {
        let part = || Part {
            listed: false,
            listing: None,
            pending: HashMap::new(),
            known: HashSet::new(),
        };
        Merge {
            parts: (0..parts).map(|_| part()).collect(),
            started: false,
        }
    }

    /// The merged events for part `i`'s `event`; `cached` reads an object from the shared cache
    /// (for the Delete of an object a relist no longer shows).
    pub fn on(&mut self, i: usize, event: Event<K>, cached: impl Fn(&ObjectRef<K>) -> Option<K>) -> Vec<Event<K>> {
        let started = self.started;
        let part = &mut self.parts[i];
        match event {
            Event::Init => {
                part.listing = Some(HashMap::new());
                vec![]
            }
            Event::InitApply(o) => {
                part.listing.get_or_insert_with(HashMap::new).insert(ObjectRef::from_obj(&o), o);
                vec![]
            }
            Event::InitDone => {
                let listed = part.listing.take().unwrap_or_default();
                if started {
                    let gone = part.known.iter().filter(|r| !listed.contains_key(*r));
                    let mut out: Vec<Event<K>> = gone.filter_map(&cached).map(Event::Delete).collect();
                    part.known = listed.keys().cloned().collect();
                    out.extend(listed.into_values().map(Event::Apply));
                    return out;
                }
                part.listed = true;
                part.pending = listed;
                self.start_when_all_listed()
            }
            Event::Apply(o) if started => {
                part.known.insert(ObjectRef::from_obj(&o));
                vec![Event::Apply(o)]
            }
            Event::Apply(o) => {
                part.pending.insert(ObjectRef::from_obj(&o), o);
                vec![]
            }
            Event::Delete(o) if started => {
                part.known.remove(&ObjectRef::from_obj(&o));
                vec![Event::Delete(o)]
            }
            Event::Delete(o) => {
                part.pending.remove(&ObjectRef::from_obj(&o));
                vec![]
            }
        }
    }

    /// Once every part has listed: one Init with all of them, and from then on events pass.
    fn start_when_all_listed(&mut self) -> Vec<Event<K>> {
        if !self.parts.iter().all(|p| p.listed) {
            return vec![];
        }
        self.started = true;
        let mut out = vec![Event::Init];
        for p in &mut self.parts {
            let pending = std::mem::take(&mut p.pending);
            p.known = pending.keys().cloned().collect();
            out.extend(pending.into_values().map(Event::InitApply));
        }
        out.push(Event::InitDone);
        out
    }
}

/// The watches of `apis` (one per namespace) as one stream; `cached` reads the shared cache.
pub fn merged<K>(
    apis: Vec<Api<K>>,
    config: watcher::Config,
    cached: impl Fn(&ObjectRef<K>) -> Option<K> + Send + 'static,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    let mut merge = Merge::new(apis.len());
    let parts = apis
        .into_iter()
        .enumerate()
        .map(|(i, api)| watcher(api, config.clone()).default_backoff().map(move |e| (i, e)).boxed());
    stream::select_all(parts).flat_map(move |(i, e)| {
        let out: Vec<_> = match e {
            Ok(e) => merge.on(i, e, &cached).into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e)],
        };
        stream::iter(out)
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;

    use super::*;

    fn cm(ns: &str, name: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn names(events: &[Event<ConfigMap>]) -> Vec<String> {
        let n = |o: &ConfigMap| {
            format!(
                "{}/{}",
                o.metadata.namespace.as_deref().unwrap(),
                o.metadata.name.as_deref().unwrap()
            )
        };
        let mut out: Vec<String> = events
            .iter()
            .map(|e| match e {
                Event::Init => "Init".into(),
                Event::InitApply(o) => format!("InitApply {}", n(o)),
                Event::InitDone => "InitDone".into(),
                Event::Apply(o) => format!("Apply {}", n(o)),
                Event::Delete(o) => format!("Delete {}", n(o)),
            })
            .collect();
        out.sort();
        out
    }

    fn none(_: &ObjectRef<ConfigMap>) -> Option<ConfigMap> {
        None
    }

    #[test]
    fn first_lists_join_into_one_init_and_changes_before_it_are_kept() {
        let mut m = Merge::<ConfigMap>::new(2);
        assert!(m.on(0, Event::Init, none).is_empty());
        assert!(m.on(0, Event::InitApply(cm("a", "x")), none).is_empty());
        assert!(m.on(0, Event::InitDone, none).is_empty());
        // a changes while b still lists: held for the joined list.
        assert!(m.on(0, Event::Apply(cm("a", "y")), none).is_empty());
        assert!(m.on(0, Event::Delete(cm("a", "x")), none).is_empty());
        m.on(1, Event::Init, none);
        m.on(1, Event::InitApply(cm("b", "z")), none);
        let out = m.on(1, Event::InitDone, none);
        assert_eq!(names(&out), ["Init", "InitApply a/y", "InitApply b/z", "InitDone"]);
        assert!(matches!(out.first(), Some(Event::Init)) && matches!(out.last(), Some(Event::InitDone)));
        assert_eq!(names(&m.on(1, Event::Apply(cm("b", "w")), none)), ["Apply b/w"]);
    }

    #[test]
    fn a_relist_of_one_namespace_touches_only_its_objects() {
        let mut m = Merge::<ConfigMap>::new(2);
        for (i, ns) in [(0, "a"), (1, "b")] {
            m.on(i, Event::Init, none);
            m.on(i, Event::InitApply(cm(ns, "x")), none);
            m.on(i, Event::InitApply(cm(ns, "gone")), none);
            m.on(i, Event::InitDone, none);
        }
        // b's watch expired: it lists again; "gone" was deleted meanwhile.
        let cached = |r: &ObjectRef<ConfigMap>| Some(cm(r.namespace.as_deref().unwrap(), &r.name));
        assert!(m.on(1, Event::Init, cached).is_empty());
        m.on(1, Event::InitApply(cm("b", "x")), cached);
        m.on(1, Event::InitApply(cm("b", "new")), cached);
        let out = m.on(1, Event::InitDone, cached);
        assert_eq!(names(&out), ["Apply b/new", "Apply b/x", "Delete b/gone"]);
        // a's objects are untouched, and a's deletions still pass.
        assert_eq!(names(&m.on(0, Event::Delete(cm("a", "gone")), none)), ["Delete a/gone"]);
    }
}
