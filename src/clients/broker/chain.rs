//! Per-key order across the batches in flight, for brokers that store a failed message's
//! successors anyway (NATS, RabbitMQ): each key's last message handed over, so the key's next one
//! is published only once that one was acknowledged. An entry lasts until the relay completed the
//! batch of the key's last message (`completed`): from then on the relay's own gate holds the key.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use tokio::sync::oneshot;

/// Batch numbers, unique in the process: a batch of a replaced publisher never names another's.
static NEXT_BATCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub fn next_batch() -> u64 {
    NEXT_BATCH.fetch_add(1, Ordering::Relaxed)
}

/// Each key's last message: its batch, and where it will say whether it was stored.
#[derive(Default)]
pub struct KeyChain {
    last: Mutex<HashMap<String, (u64, oneshot::Receiver<bool>)>>,
}

impl KeyChain {
    /// Make a message of `key` in batch `batch` the key's last. It tells through the sender
    /// whether it was stored (dropped unsent, it fails the next one too); the receiver, if any, is
    /// the previous message's.
    pub fn link(&self, key: &str, batch: u64) -> (oneshot::Sender<bool>, Option<oneshot::Receiver<bool>>) {
        let (stored, told) = oneshot::channel();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = last.get_mut(key) {
            return (stored, Some(std::mem::replace(entry, (batch, told)).1));
        }
        last.insert(key.to_owned(), (batch, told));
        (stored, None)
    }

    /// The relay completed batch `id`: the keys whose last message it held leave the chain.
    pub fn completed<'k>(&self, id: u64, keys: impl IntoIterator<Item = &'k str>) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        for k in keys {
            if last.get(k).is_some_and(|(b, _)| *b == id) {
                last.remove(k);
            }
        }
    }

    /// The relay gave up the batches in flight (it reads their rows again): no chain is left.
    pub fn forget(&self) {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Whether the previous message of the key was stored (none: nothing to wait for).
pub async fn previous_stored(previous: Option<oneshot::Receiver<bool>>) -> bool {
    match previous {
        Some(p) => p.await.unwrap_or(false),
        None => true,
    }
}

/// One message in flight, counted until its future ends or is dropped.
pub struct Counted(Arc<AtomicUsize>);

impl Counted {
    pub fn new(n: &Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Counted(n.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_waits_for_its_previous_message_until_its_batch_completed() {
        let c = KeyChain::default();
        let (first, none) = c.link("k", 1);
        assert!(none.is_none());
        let (second, previous) = c.link("k", 2);
        first.send(false).unwrap();
        assert!(!previous_stored(previous).await, "the first failed: the second must not go");
        c.completed(1, ["k"]);
        let (_, previous) = c.link("k", 3);
        assert!(previous.is_some(), "batch 2 holds the key's last message still");
        drop(second);
        assert!(!previous_stored(previous).await, "dropped unsent fails the next one too");
        c.completed(3, ["k"]);
        assert!(c.link("k", 4).1.is_none(), "completed: the gate holds the key from now on");
        c.forget();
        assert!(c.link("k", 5).1.is_none());
    }
}
