//! A map of shared clients (database pools, Kafka admin clients) keyed by a digest of their
//! secret-bearing settings, that forgets entries nobody asked for in a while: every rotated
//! password or mistyped address would otherwise leave a client behind for the life of the operator.
//!
//! Every live resource asks for its client on each refresh, so an entry that goes unasked for
//! longer than many refreshes belongs to settings no resource uses any more. A holder that kept a
//! clone (a purge loop) keeps a working client; the cache only stops handing it out.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// The key of a client built from `parts` (addresses, names) and secret-bearing `settings`: a
/// SHA-256 over all of them, each delimited, so no value is kept or shown in the clear.
pub fn digest<'a>(parts: impl IntoIterator<Item = &'a str>, settings: &std::collections::BTreeMap<String, String>) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    for (k, v) in settings {
        for s in [k, v] {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
    }
    h.finalize().into()
}

/// How long an unused client stays cached: many refresh intervals (15 s by default).
pub const IDLE_EVICTION: Duration = Duration::from_secs(600);

pub struct IdleCache<V> {
    entries: Mutex<HashMap<[u8; 32], (V, Instant)>>,
}

impl<V> Default for IdleCache<V> {
    fn default() -> Self {
        IdleCache {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl<V: Clone> IdleCache<V> {
    /// The cached value for `key`, or the one `make` builds (cached only when it succeeds).
    /// Either way the entry counts as used now.
    pub fn get_or_try_insert<E>(&self, key: [u8; 32], make: impl FnOnce() -> Result<V, E>) -> Result<V, E> {
        self.get_or_try_insert_at(key, Instant::now(), make)
    }

    fn get_or_try_insert_at<E>(&self, key: [u8; 32], now: Instant, make: impl FnOnce() -> Result<V, E>) -> Result<V, E> {
        let mut entries = self.entries.lock().expect("cache lock");
        if let Some((v, used)) = entries.get_mut(&key) {
            *used = now;
            return Ok(v.clone());
        }
        let v = make()?;
        entries.insert(key, (v.clone(), now));
        Ok(v)
    }

    /// Forget entries not used for `idle`; returns how many were dropped.
    pub fn evict_idle(&self, idle: Duration) -> usize {
        self.evict_idle_at(Instant::now(), idle)
    }

    fn evict_idle_at(&self, now: Instant, idle: Duration) -> usize {
        let mut entries = self.entries.lock().expect("cache lock");
        let before = entries.len();
        entries.retain(|_, (_, used)| now.saturating_duration_since(*used) < idle);
        before - entries.len()
    }

    pub fn len(&self) -> usize {
        self.entries.lock().expect("cache lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> [u8; 32] {
        [b; 32]
    }

    #[test]
    fn a_used_entry_stays_and_an_unused_one_goes() {
        let c: IdleCache<u32> = IdleCache::default();
        let t0 = Instant::now();
        for i in 1..=3 {
            c.get_or_try_insert_at(k(i), t0, || Ok::<_, ()>(u32::from(i))).unwrap();
        }
        // Entry 2 is asked for again later; the others are not.
        let t1 = t0 + Duration::from_secs(500);
        assert_eq!(c.get_or_try_insert_at(k(2), t1, || Err("must not rebuild")), Ok(2));
        assert_eq!(c.evict_idle_at(t0 + Duration::from_secs(700), Duration::from_secs(600)), 2);
        assert_eq!(c.len(), 1);
        assert_eq!(c.get_or_try_insert_at(k(2), t1, || Err("must not rebuild")), Ok(2));
        // An evicted key is built anew.
        assert_eq!(c.get_or_try_insert_at(k(1), t1, || Ok::<_, &str>(10)), Ok(10));
    }

    #[test]
    fn the_digest_tells_every_part_and_setting_apart() {
        let s = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let base = digest(["b:9092", "g"], &s(&[("sasl.password", "x")]));
        assert_eq!(base, digest(["b:9092", "g"], &s(&[("sasl.password", "x")])));
        assert_ne!(base, digest(["b:9092", "h"], &s(&[("sasl.password", "x")])), "another group");
        assert_ne!(base, digest(["b:9092", "g"], &s(&[("sasl.password", "y")])), "another password");
        assert_ne!(digest(["ab", "c"], &s(&[])), digest(["a", "bc"], &s(&[])), "delimited");
    }

    #[test]
    fn a_failed_build_caches_nothing() {
        let c: IdleCache<u32> = IdleCache::default();
        assert_eq!(c.get_or_try_insert(k(1), || Err::<u32, _>("typo")), Err("typo"));
        assert!(c.is_empty());
    }
}
