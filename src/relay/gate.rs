//! Which keys the next read must leave out, so each key's messages reach the broker in seq order:
//! keys with a row in a batch still in flight (a later row of the key must not overtake it,
//! whatever becomes of it), and keys whose oldest row waits for a retry. Pure; the time type is a
//! parameter so the model test below can drive it with plain numbers.

use std::collections::HashMap;

#[derive(Debug)]
pub(super) struct KeyGate<T> {
    /// Key -> batches in flight holding a row of it.
    in_flight: HashMap<String, usize>,
    /// Key -> until when its oldest row waits for a retry.
    blocked: HashMap<String, T>,
}

impl<T> Default for KeyGate<T> {
    fn default() -> Self {
        KeyGate {
            in_flight: HashMap::new(),
            blocked: HashMap::new(),
        }
    }
}

impl<T: Ord + Copy> KeyGate<T> {
    /// The keys a read at `now` must skip.
    pub fn excluded(&mut self, now: T) -> Vec<String> {
        self.blocked.retain(|_, until| *until > now);
        let mut keys: Vec<String> = self.in_flight.keys().chain(self.blocked.keys()).cloned().collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// A batch with rows of these keys was read: they stay out of reads until it completes,
    /// including the keys of rows the batch did not manage to send.
    pub fn dispatch<'a>(&mut self, keys: impl IntoIterator<Item = &'a str>) {
        let mut seen: Vec<&str> = keys.into_iter().collect();
        seen.sort_unstable();
        seen.dedup();
        for k in seen {
            *self.in_flight.entry(k.to_owned()).or_default() += 1;
        }
    }

    /// The batch holding rows of `keys` completed; `failed` keys wait until the given time.
    pub fn complete<'a>(&mut self, keys: impl IntoIterator<Item = &'a str>, failed: impl IntoIterator<Item = (&'a str, T)>) {
        let mut seen: Vec<&str> = keys.into_iter().collect();
        seen.sort_unstable();
        seen.dedup();
        for k in seen {
            if let Some(n) = self.in_flight.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.in_flight.remove(k);
                }
            }
        }
        for (k, until) in failed {
            let e = self.blocked.entry(k.to_owned()).or_insert(until);
            *e = (*e).max(until);
        }
    }

    /// Keys waiting for a retry (for the metric).
    pub fn blocked(&self) -> usize {
        self.blocked.len()
    }

    /// Forget everything in flight (the producer was rebuilt; those rows will be read again).
    pub fn abandon_in_flight(&mut self) {
        self.in_flight.clear();
    }
}

#[cfg(test)]
mod tests {
    //! A model of the relay over a pure outbox: rows become visible at chosen times (per key in
    //! seq order, which is what reading below the snapshot's xmin gives), batches are read in seq
    //! order leaving out the gate's keys, messages are acknowledged or fail at random, batches
    //! complete oldest first (as `Relay::drain` awaits them). The producer is modelled as an
    //! idempotent producer is specified: within a batch, once a message of a key fails, the later
    //! messages of that key fail too. Property: each key's acknowledged seqs only grow.

    use std::collections::{BTreeMap, VecDeque};

    use proptest::prelude::*;

    use super::KeyGate;

    #[derive(Debug, Clone)]
    struct Row {
        seq: i64,
        key: String,
        visible_at: u32,
    }

    /// How the next read chooses rows.
    #[derive(Clone, Copy, PartialEq)]
    enum Rule {
        /// Today's: skip keys in flight or blocked.
        Gate,
        /// The rule this replaced: skip the seq range from the lowest to the highest seq in
        /// flight, and blocked keys (known only once a batch completed).
        SeqRange,
    }

    struct Batch {
        rows: Vec<Row>,
        /// Per row: acknowledged?
        outcome: Vec<bool>,
    }

    fn outbox(keys_of_rows: &[(u8, u8)]) -> Vec<Row> {
        // Per key, visibility never goes back in seq order.
        let mut last: BTreeMap<u8, u32> = BTreeMap::new();
        keys_of_rows
            .iter()
            .enumerate()
            .map(|(i, (k, delay))| {
                let v = last.entry(*k).or_default();
                *v = (*v).max(u32::from(*delay));
                Row {
                    seq: i as i64 + 1,
                    key: format!("k{k}"),
                    visible_at: *v,
                }
            })
            .collect()
    }

    /// Run the model; returns each key's acknowledged seqs in acknowledgement order.
    fn run(rows: Vec<Row>, acks: &[bool], rule: Rule, limit: usize, depth: usize) -> BTreeMap<String, Vec<i64>> {
        let mut pending = rows;
        let mut gate = KeyGate::<u32>::default();
        let mut in_flight: VecDeque<Batch> = VecDeque::new();
        let mut acked: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        let mut dice = acks.iter().cycle();
        // A row fails at most three times (the broker comes back).
        let mut failures: BTreeMap<i64, u32> = BTreeMap::new();
        // Each tick: read until `depth` batches are in flight or a read finds nothing, then wait
        // for the oldest, as `Relay::drain` does; rows become visible as ticks pass.
        for now in 0..5000u32 {
            if pending.is_empty() && in_flight.is_empty() {
                break;
            }
            // Read while there is room.
            while in_flight.len() < depth {
                let excluded = gate.excluded(now);
                let range = in_flight
                    .iter()
                    .flat_map(|b| b.rows.iter().map(|r| r.seq))
                    .fold(None, |acc: Option<(i64, i64)>, s| {
                        Some(acc.map_or((s, s), |(lo, hi)| (lo.min(s), hi.max(s))))
                    });
                let in_flight_seqs: Vec<i64> = in_flight.iter().flat_map(|b| b.rows.iter().map(|r| r.seq)).collect();
                let batch: Vec<Row> = pending
                    .iter()
                    .filter(|r| r.visible_at <= now && !in_flight_seqs.contains(&r.seq))
                    .filter(|r| match rule {
                        Rule::Gate => !excluded.contains(&r.key),
                        Rule::SeqRange => !excluded.contains(&r.key) && range.is_none_or(|(lo, hi)| r.seq < lo || r.seq > hi),
                    })
                    .take(limit)
                    .cloned()
                    .collect();
                if batch.is_empty() {
                    break;
                }
                if rule == Rule::Gate {
                    gate.dispatch(batch.iter().map(|r| r.key.as_str()));
                }
                // The producer: a failed message fails the later ones of its key in the batch.
                let mut failed_keys: Vec<&str> = Vec::new();
                let outcome = batch
                    .iter()
                    .map(|r| {
                        let lucky = *dice.next().unwrap() || failures.get(&r.seq).is_some_and(|n| *n >= 3);
                        let ok = !failed_keys.contains(&r.key.as_str()) && lucky;
                        if !ok {
                            failed_keys.push(&r.key);
                            *failures.entry(r.seq).or_default() += 1;
                        }
                        ok
                    })
                    .collect();
                in_flight.push_back(Batch { rows: batch, outcome });
            }
            if let Some(b) = in_flight.pop_front() {
                let mut failed = Vec::new();
                for (r, ok) in b.rows.iter().zip(&b.outcome) {
                    if *ok {
                        acked.entry(r.key.clone()).or_default().push(r.seq);
                        pending.retain(|p| p.seq != r.seq);
                    } else {
                        failed.push((r.key.as_str(), now + 2));
                    }
                }
                let keys: Vec<&str> = if rule == Rule::Gate {
                    b.rows.iter().map(|r| r.key.as_str()).collect()
                } else {
                    vec![]
                };
                gate.complete(keys, failed);
            }
        }
        assert!(pending.is_empty(), "the model ran out of time with rows left: {pending:?}");
        acked
    }

    fn in_order(acked: &BTreeMap<String, Vec<i64>>) -> bool {
        acked.values().all(|seqs| seqs.windows(2).all(|w| w[0] < w[1]))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn every_keys_acknowledged_messages_are_in_seq_order(
            rows in prop::collection::vec((0u8..4, 0u8..12), 1..60),
            acks in prop::collection::vec(prop::bool::weighted(0.8), 1..50),
            limit in 1usize..8,
            depth in 1usize..5,
        ) {
            let acked = run(outbox(&rows), &acks, Rule::Gate, limit, depth);
            prop_assert!(in_order(&acked), "{acked:?}");
            prop_assert_eq!(acked.values().map(Vec::len).sum::<usize>(), rows.len());
        }
    }

    /// The rule it replaced loses order when a row inside the skipped range becomes visible while
    /// the batch around it is in flight: k1's seq 4 and 6 commit after batch [3, 5] went out.
    #[test]
    fn the_seq_range_rule_loses_order_the_gate_keeps_it() {
        let rows = outbox(&[(0, 0), (0, 0), (0, 0), (1, 1), (0, 0), (1, 1)]);
        let all_ack = [true];
        let old = run(rows.clone(), &all_ack, Rule::SeqRange, 2, 3);
        assert_eq!(old["k1"], vec![6, 4], "the old rule should reorder k1");
        let new = run(rows, &all_ack, Rule::Gate, 2, 3);
        assert!(in_order(&new), "{new:?}");
    }

    /// A retriable failure must hold back the key's later rows in the batches read before the
    /// failed batch completes.
    #[test]
    fn a_failure_holds_back_the_key_in_later_batches() {
        let rows = outbox(&[(0, 0), (0, 0), (1, 0), (0, 0)]);
        // Limit 2: batch [1, 2] (k0 fails at seq 1, so seq 2 fails too), batch [3, 4] read before
        // it completes must not carry k0's seq 4.
        let acked = run(rows, &[false, true, true, true, true, true], Rule::Gate, 2, 3);
        assert_eq!(acked["k0"], vec![1, 2, 4]);
    }

    #[test]
    fn gate_releases_keys_and_expires_blocks() {
        let mut g = KeyGate::<u32>::default();
        g.dispatch(["a", "b", "a"]);
        g.dispatch(["a"]);
        assert_eq!(g.excluded(0), ["a", "b"]);
        g.complete(["a", "b", "a"], [("b", 5)]);
        assert_eq!(g.excluded(1), ["a", "b"], "a is still in a second batch; b waits until 5");
        g.complete(["a"], []);
        assert_eq!(g.excluded(5), Vec::<String>::new());
        assert_eq!(g.blocked(), 0);
    }
}
