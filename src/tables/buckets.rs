//! Key-hash buckets: several active relays per outbox, each owning a share of B buckets.
//!
//! - **The hash** (stable, the same in every version, computable by any tool):
//!   `bucket = u32_be(sha256(utf8(key))[0..4]) mod B`, where `key` is the routing key column as
//!   text. The outbox's schema carries the same function in SQL (`lockstep_bucket(key, B)`), and
//!   the relay reads its buckets through an expression index on `(lockstep_bucket(key, B), seq)`.
//! - **Ownership**: PostgreSQL session advisory locks on the relay's lock session (two-int form,
//!   `classid` = [`class_key`] of the table): one per bucket, exclusive ([`bucket_code`]), and one
//!   per relay, shared ([`member_code`]) so that every relay sees how many relays share the outbox
//!   (pg_locks). Locks rather than a lease table: they go with the session, so the step-11 fence
//!   (a relay stops sending before the server can drop its session) covers every bucket at once,
//!   and a dead relay's buckets free themselves with no expiry to tune and no writes.
//! - **Shares** ([`plan`]): the relays sorted by backend pid; with N relays each targets B / N
//!   buckets, the first B mod N one more, so shares stay within one bucket of even. A relay takes
//!   free buckets up to its target and gives back those above it; a bucket is given back (unlocked)
//!   only after everything its owner sent of it was acknowledged or purged (`relay::ownership`).
//! - **Generations**: relays of another B must not run at once (bucket 5 of 64 is not bucket 5 of
//!   32). A relay takes no bucket while a relay of another B holds its member lock; a B = 1 relay
//!   holds the table lock exclusively, relays with buckets hold it shared.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use crate::{
    core::sql::{advisory_key, QualifiedName},
    crd::MAX_BUCKETS,
};

/// The bucket of `key` among `buckets` (see the module).
pub fn bucket_of(key: &str, buckets: u16) -> u16 {
    let d = Sha256::digest(key.as_bytes());
    let h = u32::from_be_bytes(d[..4].try_into().expect("4 bytes"));
    (h % u32::from(buckets.max(1))) as u16
}

/// The `classid` of a table's bucket and member locks.
pub fn class_key(t: &QualifiedName) -> i32 {
    advisory_key(&format!("lockstep-relay-buckets:{}.{}", t.schema.as_str(), t.table.as_str())) as i32
}

/// The lock of bucket `b` of `buckets`.
pub fn bucket_code(buckets: u16, b: u16) -> i32 {
    (i32::from(buckets) << 16) | i32::from(b)
}

/// The shared lock every relay with `buckets` buckets holds while it runs.
pub fn member_code(buckets: u16) -> i32 {
    (i32::from(buckets) << 16) | 0xFFFF
}

/// What a lock code names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Bucket { buckets: u16, bucket: u16 },
    Member { buckets: u16 },
}

pub fn decode(code: i64) -> Option<Code> {
    let buckets = u16::try_from(code >> 16).ok().filter(|b| (1..=MAX_BUCKETS).contains(b))?;
    match (code & 0xFFFF) as u16 {
        0xFFFF => Some(Code::Member { buckets }),
        b if b < buckets => Some(Code::Bucket { buckets, bucket: b }),
        _ => None,
    }
}

/// The bucket and member locks of one outbox, as pg_locks shows them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Holdings {
    /// Backend pids of the relays with this B.
    pub members: BTreeSet<i32>,
    /// Relays with another B: (pid, their B).
    pub others: BTreeSet<(i32, u16)>,
    /// Owner pid of each owned bucket of this B.
    pub owners: BTreeMap<u16, i32>,
    /// Buckets of another B still owned.
    pub others_owning: usize,
}

impl Holdings {
    /// From (objid, pid) rows of granted advisory locks of the outbox's class.
    pub fn from_locks(buckets: u16, rows: impl IntoIterator<Item = (i64, i32)>) -> Self {
        let mut h = Holdings::default();
        for (code, pid) in rows {
            match decode(code) {
                Some(Code::Member { buckets: b }) if b == buckets => {
                    h.members.insert(pid);
                }
                Some(Code::Member { buckets: b }) => {
                    h.others.insert((pid, b));
                }
                Some(Code::Bucket { buckets: b, bucket }) if b == buckets => {
                    h.owners.insert(bucket, pid);
                }
                Some(Code::Bucket { .. }) => h.others_owning += 1,
                None => {}
            }
        }
        h
    }

    /// The buckets each member owns.
    pub fn shares(&self) -> BTreeMap<i32, Vec<u16>> {
        let mut s: BTreeMap<i32, Vec<u16>> = self.members.iter().map(|p| (*p, Vec::new())).collect();
        for (b, pid) in &self.owners {
            s.entry(*pid).or_default().push(*b);
        }
        s
    }
}

/// How many buckets relay `me` should own: B / N, one more for the first B mod N by pid.
pub fn target(me: i32, members: &BTreeSet<i32>, buckets: u16) -> usize {
    let n = members.len().max(1);
    let rank = members.iter().position(|p| *p == me).unwrap_or(n - 1);
    let b = usize::from(buckets);
    b / n + usize::from(rank < b % n)
}

/// What a relay does about its buckets this round.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Free buckets to try to lock.
    pub take: Vec<u16>,
    /// Owned buckets to give back once what was sent of them settled.
    pub give: Vec<u16>,
    /// Relays of another B are running: take nothing.
    pub waiting_for_others: bool,
}

/// The round of relay `me` (see the module): `mine` what it owns now. Taking is decided on a view
/// no other relay changes meanwhile (`relay::ownership` serializes it), so relays of two bucket
/// counts never own buckets at once; when neither owns any, the one whose relay has the lowest
/// pid goes first and the other waits until those relays stopped.
pub fn plan(me: i32, buckets: u16, h: &Holdings, mine: &BTreeSet<u16>) -> Plan {
    let ours_first = || {
        let lowest_other = h.others.iter().map(|(pid, _)| *pid).min();
        let lowest_ours = h.members.iter().copied().chain([me]).min();
        lowest_other.is_none_or(|o| lowest_ours.is_some_and(|m| m < o))
    };
    let ours_own = !h.owners.is_empty() || !mine.is_empty();
    if h.others_owning > 0 || !(ours_own || ours_first()) {
        return Plan {
            waiting_for_others: true,
            ..Plan::default()
        };
    }
    let mut members = h.members.clone();
    members.insert(me);
    let want = target(me, &members, buckets);
    let have = mine.len();
    if have > want {
        // The highest first: a joining relay's free buckets are then found in the same places.
        return Plan {
            give: mine.iter().rev().take(have - want).copied().collect(),
            ..Plan::default()
        };
    }
    let take = (0..buckets)
        .filter(|b| !h.owners.contains_key(b) && !mine.contains(b))
        .take(want - have)
        .collect();
    Plan { take, ..Plan::default() }
}

/// After a read that asked each of `owned` buckets for at most `each` rows of a `batch` and got
/// `counts` (rows per bucket that had any): whether a bucket may have more (it gave all it was
/// asked for), and the share to ask each bucket for next: the batch over the buckets that filled
/// theirs (none: the batch over every owned bucket), at most the batch.
pub fn next_share(counts: impl Iterator<Item = i64>, each: i64, owned: usize, batch: i64) -> (bool, i64) {
    let batch = batch.max(1);
    let full = counts.filter(|n| *n >= each).count() as i64;
    let owned = (owned as i64).max(1);
    let least = (batch + owned - 1) / owned;
    // None full: the least, so that a backlog that appears in every bucket at once is not read
    // a batch from each; a bucket that fills it gets more at the next read.
    let share = if full == 0 { least } else { (batch + full - 1) / full };
    (full > 0, share.clamp(least.min(batch), batch))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Documented in docs/relay.md: other tools must compute the same buckets.
    #[test]
    fn test_vectors() {
        assert_eq!(u32::from(bucket_of("", 64)), 0xe3b0c442_u32 % 64);
        assert_eq!(bucket_of("order-1", 64), bucket_of("order-1", 64));
        let v: Vec<u16> = ["order-1", "order-2", "customer-42", "ünïcode", ""]
            .iter()
            .map(|k| bucket_of(k, 64))
            .collect();
        assert_eq!(v, [33, 6, 51, 39, 2], "computed with Python's hashlib");
        assert_eq!(bucket_of("ünïcode", 256), 103);
        assert_eq!(bucket_of("anything", 1), 0);
    }

    #[test]
    fn a_backlog_everywhere_is_read_a_batch_at_a_time_and_one_buckets_backlog_too() {
        // 20 buckets, each gave its full 25: the next read asks each for 25 again (500 in all).
        assert_eq!(next_share([25; 20].into_iter(), 25, 20, 500), (true, 25));
        // Only one bucket has a backlog: it gets the whole batch.
        assert_eq!(next_share([25, 3, 1].into_iter(), 25, 20, 500), (true, 500));
        // Four full buckets: a quarter each.
        assert_eq!(next_share([500, 500, 500, 500].into_iter(), 500, 20, 500), (true, 125));
        // Nothing full: nothing more to read now, and the share goes back to the least.
        assert_eq!(next_share([3, 1].into_iter(), 25, 20, 500), (false, 25));
        assert_eq!(next_share(std::iter::empty(), i64::MAX, 0, 500), (false, 500));
    }

    #[test]
    fn codes_round_trip_and_other_locks_are_ignored() {
        assert_eq!(decode(i64::from(bucket_code(64, 5))), Some(Code::Bucket { buckets: 64, bucket: 5 }));
        assert_eq!(decode(i64::from(member_code(256))), Some(Code::Member { buckets: 256 }));
        assert_eq!(decode(i64::from(bucket_code(64, 64))), None);
        assert_eq!(decode(0), None);
        assert_eq!(decode(i64::from(u32::MAX)), None);
    }

    /// Relays joining, each planning from what the previous plans left, until nothing moves.
    fn settle(buckets: u16, pids: &[i32], owned: &mut BTreeMap<i32, BTreeSet<u16>>) -> usize {
        let mut moves = 0;
        for _round in 0..20 {
            let mut changed = false;
            for &me in pids {
                let rows = pids.iter().map(|p| (i64::from(member_code(buckets)), *p)).chain(
                    owned
                        .iter()
                        .flat_map(|(p, bs)| bs.iter().map(move |b| (i64::from(bucket_code(buckets, *b)), *p))),
                );
                let h = Holdings::from_locks(buckets, rows.collect::<Vec<_>>());
                let mine = owned.entry(me).or_default();
                let p = plan(me, buckets, &h, mine);
                changed |= !p.take.is_empty() || !p.give.is_empty();
                moves += p.take.len();
                mine.extend(p.take);
                for b in p.give {
                    mine.remove(&b);
                }
            }
            if !changed {
                break;
            }
        }
        moves
    }

    fn counts(owned: &BTreeMap<i32, BTreeSet<u16>>, pids: &[i32]) -> Vec<usize> {
        pids.iter().map(|p| owned.get(p).map_or(0, BTreeSet::len)).collect()
    }

    #[test]
    fn shares_stay_within_one_bucket_and_every_bucket_is_owned_once() {
        let mut owned = BTreeMap::new();
        settle(64, &[30, 10, 20], &mut owned);
        assert_eq!(counts(&owned, &[10, 20, 30]), [22, 21, 21]);
        let all: BTreeSet<u16> = owned.values().flatten().copied().collect();
        assert_eq!(all.len(), 64);
        // One leaves: the two left take its buckets and nothing else moves.
        let gone = owned.remove(&20).unwrap();
        let moves = settle(64, &[10, 30], &mut owned);
        assert_eq!(moves, gone.len());
        assert_eq!(counts(&owned, &[10, 30]), [32, 32]);
        // It comes back (a new pid): only what it needs moves.
        let moves = settle(64, &[10, 30, 40], &mut owned);
        assert_eq!(counts(&owned, &[10, 30, 40]), [22, 21, 21]);
        assert_eq!(moves, 21);
    }

    #[test]
    fn more_relays_than_buckets_leave_some_without_any() {
        let mut owned = BTreeMap::new();
        settle(2, &[1, 2, 3], &mut owned);
        assert_eq!(counts(&owned, &[1, 2, 3]), [1, 1, 0]);
    }

    #[test]
    fn relays_of_two_bucket_counts_never_own_buckets_at_once() {
        // Neither owns any: the lowest pid's count goes first.
        let h = Holdings::from_locks(64, [(i64::from(member_code(64)), 1), (i64::from(member_code(32)), 2)]);
        assert_eq!(plan(1, 64, &h, &BTreeSet::new()).take.len(), 64);
        let h32 = Holdings::from_locks(32, [(i64::from(member_code(64)), 1), (i64::from(member_code(32)), 2)]);
        let p = plan(2, 32, &h32, &BTreeSet::new());
        assert!(p.waiting_for_others && p.take.is_empty());
        // The other count owns buckets: wait, whatever the pids.
        let h = Holdings::from_locks(64, [(i64::from(member_code(32)), 9), (i64::from(bucket_code(32, 3)), 9)]);
        assert!(plan(1, 64, &h, &BTreeSet::new()).waiting_for_others);
        // Ours own buckets: ours go on taking (a peer's buckets after it died), the others wait.
        let h = Holdings::from_locks(
            64,
            [
                (i64::from(member_code(64)), 5),
                (i64::from(member_code(32)), 1),
                (i64::from(bucket_code(64, 0)), 5),
            ],
        );
        assert_eq!(plan(5, 64, &h, &[0].into()).take.len(), 63);
    }

    #[test]
    fn a_relay_over_its_share_gives_back_its_highest_buckets() {
        let mine: BTreeSet<u16> = (0..8).collect();
        let rows = [1, 2].map(|p| (i64::from(member_code(8)), p));
        let h = Holdings::from_locks(8, rows.into_iter().chain(mine.iter().map(|b| (i64::from(bucket_code(8, *b)), 1))));
        assert_eq!(plan(1, 8, &h, &mine).give, [7, 6, 5, 4]);
        assert_eq!(plan(2, 8, &h, &BTreeSet::new()).take, Vec::<u16>::new(), "nothing free yet");
    }
}
