//! What the next read must leave out: the rows already in flight (they are still in the outbox
//! until their batch completes), and every row of a key whose oldest row waits for a retry. Pure;
//! the time type is a parameter so the model test below can drive it with plain numbers.
//!
//! Later rows of a key in flight may be read into later batches: the idempotent producer keeps a
//! partition's messages in the order they were handed to it, across batches as within one (the
//! broker refuses a sequence gap), so pipelining batches does not reorder a key while messages
//! are acknowledged. When one fails, no later message of its partition may be written before it:
//! - A retriable error (leader moved, not enough replicas) the producer retries itself, in order.
//! - A message the broker rejects (an invalid record, over the topic's size limit, a refused
//!   timestamp) would, by librdkafka's default, bump the epoch, renumber the partition's later
//!   messages and write them ahead of the rejected row's retry. The relay's producer runs with
//!   `enable.gapless.guarantee`: the rejection makes it fatal instead, the later messages are
//!   refused for the gap or purged, and `Relay::drain` completes every batch in flight from its
//!   reports before it rebuilds the producer and reads again (behind the rejected row's wait).
//! - A row refused at send never reached the producer: `hold` keeps its key out of reads.
//! - Not covered: a message that timed out in the producer's queue (message.timeout.ms). The
//!   epoch is bumped and later messages, not yet timed out, may be sent if the broker answers
//!   before the relay completed the timed-out row's batch and purged the producer.
//!
//! Leaving out every key in flight instead would cap the rows in flight at one batch per key:
//! with 1,000 keys and 500-row batches, two batches, and every read that found nothing scanned
//! the whole outbox.

use std::collections::{BTreeMap, HashMap};

#[derive(Debug)]
pub(super) struct KeyGate<T> {
    /// Batches in flight, by dispatch number: the seqs of their rows.
    in_flight: BTreeMap<u64, Vec<i64>>,
    next: u64,
    /// Key -> until when its oldest row waits for a retry, and the last batch dispatched when it
    /// failed: batches up to that one may carry later rows of the key that the producer fails
    /// with it, so the key stays out until they completed too (else each of them would block it
    /// again, and a key could keep failing behind its own earlier failures).
    blocked: HashMap<String, (T, u64)>,
    /// Key -> the batch whose send refused one of its rows. The producer never had that row, so
    /// it fails none of the key's later rows: the key stays out of reads until that batch
    /// completes and `complete` blocks it with its wait.
    held: HashMap<String, u64>,
}

impl<T> Default for KeyGate<T> {
    fn default() -> Self {
        KeyGate {
            in_flight: BTreeMap::new(),
            next: 0,
            blocked: HashMap::new(),
            held: HashMap::new(),
        }
    }
}

impl<T: Ord + Copy> KeyGate<T> {
    /// The keys a read at `now` must skip.
    pub fn excluded_keys(&mut self, now: T) -> Vec<String> {
        let oldest = self.in_flight.keys().next().copied();
        self.blocked
            .retain(|_, (until, last)| *until > now || oldest.is_some_and(|o| o <= *last));
        let mut keys: Vec<String> = self.blocked.keys().chain(self.held.keys()).cloned().collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// The rows a read must skip: those in flight.
    pub fn excluded_seqs(&self) -> Vec<i64> {
        let mut seqs: Vec<i64> = self.in_flight.values().flatten().copied().collect();
        seqs.sort_unstable();
        seqs
    }

    /// A batch of these rows was read: they stay out of reads until it completes. Its number.
    pub fn dispatch(&mut self, seqs: impl IntoIterator<Item = i64>) -> u64 {
        let n = self.next;
        self.next += 1;
        self.in_flight.insert(n, seqs.into_iter().collect());
        n
    }

    /// The send of batch `n` refused a row of `key`: no later row of the key may be read before
    /// the batch completes.
    pub fn hold(&mut self, n: u64, key: &str) {
        self.held.entry(key.to_owned()).or_insert(n);
    }

    /// Batch `n` completed; `failed` keys wait until the given time.
    pub fn complete<'a>(&mut self, n: u64, failed: impl IntoIterator<Item = (&'a str, T)>) {
        self.in_flight.remove(&n);
        self.held.retain(|_, b| *b != n);
        let last = self.next.saturating_sub(1);
        for (k, until) in failed {
            let e = self.blocked.entry(k.to_owned()).or_insert((until, last));
            *e = (e.0.max(until), e.1.max(last));
        }
    }

    /// Keys left out of reads (for the metric): waiting for a retry, or behind a row refused at
    /// send whose batch has not completed.
    pub fn blocked(&self) -> usize {
        self.blocked
            .keys()
            .chain(self.held.keys().filter(|k| !self.blocked.contains_key(*k)))
            .count()
    }

    /// Forget everything in flight (the producer was rebuilt; those rows will be read again).
    pub fn abandon_in_flight(&mut self) {
        self.in_flight.clear();
        self.held.clear();
    }
}

#[cfg(test)]
mod tests {
    //! A model of the relay over a pure outbox: rows become visible at chosen times (per key in
    //! seq order, which is what reading below the snapshot's xmin gives), batches are read in seq
    //! order leaving out the gate's keys, messages are acknowledged, rejected by the broker or
    //! refused at send, at random; batches complete oldest first (as `Relay::drain` awaits them).
    //! The producer is modelled as librdkafka 2.12 behaves (rdkafka_request.c,
    //! `rd_kafka_handle_Produce_error`), with or without `enable.gapless.guarantee`:
    //! - gapless: a rejection makes it fatal. Every later message of the rejected key handed to it
    //!   fails (refused for the sequence gap, purged, or refused at send), released for another's
    //!   sake; other keys' later messages are acknowledged (another partition's request) or fail
    //!   likewise, a key's once one did. The relay sees the fatal error once the rejected
    //!   message's batch completed (or earlier, at random: the broker's answer came sooner), then
    //!   completes every batch in flight and rebuilds the producer before it reads again.
    //! - renumbering (the default): the rejected message fails alone; the later ones are
    //!   renumbered under a bumped epoch and acknowledged.
    //!
    //! A message refused at send never reached it and fails nothing.
    //! Property: each key's acknowledged seqs only grow.

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
        /// Today's: skip the rows in flight, the blocked keys and the keys a send refused.
        Gate,
        /// Without `KeyGate::hold`: a key a send refused is left out only once its batch completed.
        GateWithoutHold,
        /// The rule this replaced: skip the seq range from the lowest to the highest seq in
        /// flight, and blocked keys (known only once a batch completed).
        SeqRange,
    }

    /// What became of a row handed to the producer.
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Outcome {
        Acked,
        /// Rejected by the broker (its delivery report is the broker's error): counted.
        Rejected,
        /// Failed for another message's sake (gap, purge, fatal producer): read again.
        Released,
        /// Refused at send: the producer never had it.
        Refused,
        /// Not sent: an earlier row of its key in the same batch failed at send.
        Skipped,
    }

    /// The producer's state between batches.
    #[derive(Default)]
    struct Producer {
        /// Renumber after a rejection (librdkafka's default) instead of going fatal.
        renumbering: bool,
        /// Fatal since a rejection in batch `fatal_at`, until the relay rebuilds it.
        fatal: bool,
        fatal_at: u64,
        /// Keys whose messages fail until the rebuild.
        dead: Vec<String>,
    }

    struct Batch {
        n: u64,
        rows: Vec<Row>,
        outcome: Vec<Outcome>,
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

    /// The send and the producer's outcome for each row of batch `n`. The dice: 0 a refusal at
    /// send, 1 a rejection, else an acknowledgement; a fatal producer fails a dead key's messages
    /// and makes a key dead on 0 or 1. As `Relay::send` does, a refusal skips the key's later rows
    /// of the batch and (under `hold`) holds the key in the gate.
    fn hand_over<'a>(
        batch: &[Row],
        n: u64,
        producer: &mut Producer,
        dice: &mut impl Iterator<Item = &'a u8>,
        failures: &mut BTreeMap<i64, u32>,
        mut hold: Option<&mut KeyGate<u32>>,
    ) -> Vec<Outcome> {
        let mut refused: Vec<String> = Vec::new();
        batch
            .iter()
            .map(|r| {
                if refused.contains(&r.key) {
                    return Outcome::Skipped;
                }
                let die = *dice.next().unwrap();
                let o = if producer.dead.contains(&r.key) {
                    Outcome::Released
                } else if producer.fatal && die <= 1 {
                    producer.dead.push(r.key.clone());
                    Outcome::Released
                } else if producer.fatal {
                    Outcome::Acked
                } else if failures.get(&r.seq).is_some_and(|n| *n >= 3) {
                    // A row fails at most three times (the broker comes back).
                    Outcome::Acked
                } else {
                    match die {
                        0 => Outcome::Refused,
                        1 => Outcome::Rejected,
                        _ => Outcome::Acked,
                    }
                };
                match o {
                    Outcome::Rejected if !producer.renumbering => {
                        producer.fatal_at = if producer.fatal { producer.fatal_at } else { n };
                        producer.fatal = true;
                        producer.dead.push(r.key.clone());
                    }
                    Outcome::Refused => {
                        refused.push(r.key.clone());
                        if let Some(g) = hold.as_deref_mut() {
                            g.hold(n, &r.key);
                        }
                    }
                    _ => {}
                }
                if matches!(o, Outcome::Rejected | Outcome::Refused) {
                    *failures.entry(r.seq).or_default() += 1;
                }
                o
            })
            .collect()
    }

    /// Complete a batch: acknowledged rows leave the outbox; a rejected or refused row's key
    /// waits, a released row's key only until the batches read before it completed.
    fn complete(b: Batch, now: u32, gate: &mut KeyGate<u32>, pending: &mut Vec<Row>, acked: &mut BTreeMap<String, Vec<i64>>) {
        let mut failed = Vec::new();
        for (r, o) in b.rows.iter().zip(&b.outcome) {
            match o {
                Outcome::Acked => {
                    acked.entry(r.key.clone()).or_default().push(r.seq);
                    pending.retain(|p| p.seq != r.seq);
                }
                Outcome::Rejected | Outcome::Refused => failed.push((r.key.as_str(), now + 2)),
                Outcome::Released => failed.push((r.key.as_str(), now)),
                Outcome::Skipped => {}
            }
        }
        gate.complete(b.n, failed);
    }

    /// Run the model; returns each key's acknowledged seqs in acknowledgement order.
    fn run(rows: Vec<Row>, dice: &[u8], rule: Rule, renumbering: bool, limit: usize, depth: usize) -> BTreeMap<String, Vec<i64>> {
        let mut pending = rows;
        let mut gate = KeyGate::<u32>::default();
        let mut producer = Producer {
            renumbering,
            ..Producer::default()
        };
        let mut in_flight: VecDeque<Batch> = VecDeque::new();
        let mut acked: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        let mut dice = dice.iter().cycle();
        let mut failures: BTreeMap<i64, u32> = BTreeMap::new();
        // Each tick: rebuild a fatal producer once every batch in flight completed; read until
        // `depth` batches are in flight or a read finds nothing, then wait for the oldest, as
        // `Relay::drain` does; rows become visible as ticks pass.
        for now in 0..5000u32 {
            if pending.is_empty() && in_flight.is_empty() {
                break;
            }
            let seen = || !in_flight.iter().any(|b| b.n == producer.fatal_at);
            if producer.fatal && (seen() || dice.next().unwrap().is_multiple_of(2)) {
                while let Some(b) = in_flight.pop_front() {
                    complete(b, now, &mut gate, &mut pending, &mut acked);
                }
                producer.fatal = false;
                producer.dead.clear();
            }
            // Read while there is room.
            while in_flight.len() < depth {
                let keys = gate.excluded_keys(now);
                let seqs = gate.excluded_seqs();
                let range = in_flight
                    .iter()
                    .flat_map(|b| b.rows.iter().map(|r| r.seq))
                    .fold(None, |acc: Option<(i64, i64)>, s| {
                        Some(acc.map_or((s, s), |(lo, hi)| (lo.min(s), hi.max(s))))
                    });
                let batch: Vec<Row> = pending
                    .iter()
                    .filter(|r| r.visible_at <= now && !keys.contains(&r.key))
                    .filter(|r| match rule {
                        Rule::Gate | Rule::GateWithoutHold => !seqs.contains(&r.seq),
                        Rule::SeqRange => range.is_none_or(|(lo, hi)| r.seq < lo || r.seq > hi),
                    })
                    .take(limit)
                    .cloned()
                    .collect();
                if batch.is_empty() {
                    break;
                }
                let n = gate.dispatch(batch.iter().map(|r| r.seq));
                let hold = (rule == Rule::Gate).then_some(&mut gate);
                let outcome = hand_over(&batch, n, &mut producer, &mut dice, &mut failures, hold);
                in_flight.push_back(Batch { n, rows: batch, outcome });
            }
            if let Some(b) = in_flight.pop_front() {
                complete(b, now, &mut gate, &mut pending, &mut acked);
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
            dice in prop::collection::vec(0u8..10, 1..50),
            limit in 1usize..8,
            depth in 1usize..5,
        ) {
            let acked = run(outbox(&rows), &dice, Rule::Gate, false, limit, depth);
            prop_assert!(in_order(&acked), "{acked:?}");
            prop_assert_eq!(acked.values().map(Vec::len).sum::<usize>(), rows.len());
        }
    }

    /// The rule it replaced loses order when a row inside the skipped range becomes visible while
    /// the batch around it is in flight: k1's seq 4 and 6 commit after batch [3, 5] went out.
    #[test]
    fn the_seq_range_rule_loses_order_the_gate_keeps_it() {
        let rows = outbox(&[(0, 0), (0, 0), (0, 0), (1, 1), (0, 0), (1, 1)]);
        let all_ack = [9];
        let old = run(rows.clone(), &all_ack, Rule::SeqRange, false, 2, 3);
        assert_eq!(old["k1"], vec![6, 4], "the old rule should reorder k1");
        let new = run(rows, &all_ack, Rule::Gate, false, 2, 3);
        assert!(in_order(&new), "{new:?}");
    }

    /// The gate alone does not keep a key in order when the broker rejects a message: librdkafka
    /// by default renumbers the key's later message, handed over in a later batch, and writes it
    /// before the rejected row's retry. With the gapless producer (fatal, and the relay completes
    /// every batch in flight before it rebuilds) the later message fails and waits its turn.
    #[test]
    fn a_rejection_in_a_pipelined_key_reorders_it_unless_the_producer_is_gapless() {
        let rows = outbox(&[(0, 0), (0, 0)]);
        // Limit 1, depth 2: k0's seq 1 and 2 in two batches in flight; the broker rejects seq 1.
        let dice = [1, 9, 9, 9, 9, 9, 9, 9];
        let renumbered = run(rows.clone(), &dice, Rule::Gate, true, 1, 2);
        assert_eq!(renumbered["k0"], vec![2, 1], "a renumbering producer should reorder k0");
        let gapless = run(rows, &dice, Rule::Gate, false, 1, 2);
        assert_eq!(gapless["k0"], vec![1, 2]);
    }

    /// A retriable failure must hold back the key's later rows in the batches read before the
    /// failed batch completes.
    #[test]
    fn a_failure_holds_back_the_key_in_later_batches() {
        let rows = outbox(&[(0, 0), (0, 0), (1, 0), (0, 0)]);
        // Limit 2: batch [1, 2] (k0 fails at seq 1, so seq 2 fails too); batch [3, 4], read before
        // it completes, carries k0's seq 4, which the producer fails with them; all three are read
        // again once k0's wait is over, in order.
        let acked = run(rows, &[1, 9, 9, 9, 9, 9], Rule::Gate, false, 2, 3);
        assert_eq!(acked["k0"], vec![1, 2, 4]);
    }

    /// A row the send refused (the producer never had it) must hold back its key's later rows
    /// from the batches read before its own batch completes: the producer fails none of them.
    #[test]
    fn a_refused_send_holds_back_the_key_at_once() {
        let rows = outbox(&[(0, 0), (1, 0), (0, 0), (1, 0)]);
        // Limit 2, depth 2: batch [1, 2], k0's seq 1 refused at send; batch [3, 4] is read before
        // it completes. Without the hold it carries k0's seq 3, which is acknowledged before 1.
        let dice = [0, 9, 9, 9, 9, 9];
        let without = run(rows.clone(), &dice, Rule::GateWithoutHold, false, 2, 2);
        assert_eq!(without["k0"], vec![3, 1], "without the hold k0 should be reordered");
        let with = run(rows, &dice, Rule::Gate, false, 2, 2);
        assert_eq!(with["k0"], vec![1, 3]);
    }

    #[test]
    fn gate_releases_rows_and_expires_blocks() {
        let mut g = KeyGate::<u32>::default();
        let a = g.dispatch([1, 2]);
        let b = g.dispatch([3]);
        assert_eq!(g.excluded_seqs(), [1, 2, 3]);
        assert_eq!(g.excluded_keys(0), Vec::<String>::new(), "keys in flight may be read again");
        g.complete(a, [("k", 5)]);
        assert_eq!(g.excluded_seqs(), [3]);
        assert_eq!(g.excluded_keys(1), ["k"], "k waits until 5");
        assert_eq!(
            g.excluded_keys(6),
            ["k"],
            "and until batch b, which may carry k's later rows, completed"
        );
        let c = g.dispatch([4]);
        g.complete(b, []);
        assert_eq!(
            g.excluded_keys(6),
            Vec::<String>::new(),
            "c was read while k was out: it has no row of k"
        );
        assert_eq!(g.blocked(), 0);
        g.complete(c, []);
        g.dispatch([5]);
        g.abandon_in_flight();
        assert_eq!(g.excluded_seqs(), Vec::<i64>::new());
    }
}
