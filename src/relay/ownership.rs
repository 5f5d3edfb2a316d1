//! A relay's buckets (`crate::tables::buckets`), held as session advisory locks on its lock session, so
//! the session's fence covers them all: a relay that lost its session stops sending every bucket.
//!
//! Every [`CHECK`] the relay looks at pg_locks and plans its share. Taking is serialized among the
//! outbox's relays (a transaction advisory lock around the look and the take), so two relays
//! never plan from views the other is changing. Giving back is in two steps: the bucket leaves
//! the reads at once, and its lock is released only when nothing the relay sent is still
//! unsettled (every batch acknowledged, failed, or purged), so whoever takes it next cannot
//! overtake a message of a key in it.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use sqlx::{Connection, Executor, PgConnection};

use super::{metrics::MoveLabel, RelayMetrics};
use crate::core::sql::QualifiedName;
use crate::tables::buckets::{bucket_code, class_key, member_code, plan, Holdings};

/// How often a relay plans its share.
pub const CHECK: Duration = Duration::from_secs(1);

/// The lock session's planner settings with buckets. Each statement is planned once per session
/// (`session::configure`), possibly while the outbox is empty, when a sort of a whole bucket or a
/// bitmap scan looks as cheap as an ordered index scan; with a backlog they are not. Every
/// statement on the session has an index path, so these only rule out plans for small tables; no
/// JIT for statements this short.
pub const PLANNER_SETTINGS: &str = "set enable_seqscan = off; set enable_bitmapscan = off; set jit = off";

/// The granted two-int advisory locks of an outbox's class, as (objid, pid).
const LOCKS_SQL: &str = "select objid::int8, pid from pg_locks where locktype = 'advisory' and granted and objsubid = 2
     and classid::int8 = ($1::int8 & 4294967295) and database = (select oid from pg_database where datname = current_database())";

pub(super) struct Ownership {
    class: i32,
    buckets: u16,
    /// The lock session's backend pid.
    me: i32,
    mine: BTreeSet<u16>,
    leaving: BTreeSet<u16>,
    next_check: Instant,
    waiting: bool,
    /// At most this many rows from each bucket per read (see [`Ownership::read`]).
    each: i64,
    metrics: Arc<RelayMetrics>,
}

impl Ownership {
    /// Join the outbox's relays on the lock session (a shared lock; it never waits).
    pub(super) async fn join(
        conn: &mut PgConnection,
        t: &QualifiedName,
        buckets: u16,
        me: i32,
        metrics: Arc<RelayMetrics>,
    ) -> Result<Self, sqlx::Error> {
        let class = class_key(t);
        conn.execute(PLANNER_SETTINGS).await?;
        sqlx::query("select pg_advisory_lock_shared($1, $2)")
            .bind(class)
            .bind(member_code(buckets))
            .persistent(false)
            .execute(&mut *conn)
            .await?;
        metrics.buckets_owned.set(0);
        Ok(Ownership {
            class,
            buckets,
            me,
            mine: BTreeSet::new(),
            leaving: BTreeSet::new(),
            next_check: Instant::now(),
            waiting: false,
            each: 1,
            metrics,
        })
    }

    /// The buckets to read now: none while some are being given back (reads pause until what is
    /// in flight settled; a short pause, and only when shares change).
    pub(super) fn readable(&self) -> Vec<i32> {
        if self.leaving.is_empty() {
            self.mine.iter().map(|b| i32::from(*b)).collect()
        } else {
            Vec::new()
        }
    }

    /// Rows a read takes from each bucket at most, for a batch of `batch`.
    pub(super) fn each(&self, batch: i64) -> i64 {
        self.each.clamp(1, batch.max(1))
    }

    /// After a read of at most `batch` rows from `buckets` (each row's): whether there may be more
    /// to read now (a bucket gave all it was asked for, or the batch is full), and the share each
    /// bucket gets next (`buckets::next_share`).
    pub(super) fn read(&mut self, buckets: &[u16], batch: i64) -> bool {
        let each = self.each(batch);
        let mut per: std::collections::HashMap<u16, i64> = std::collections::HashMap::new();
        for b in buckets {
            *per.entry(*b).or_default() += 1;
        }
        let (more, each) = crate::tables::buckets::next_share(per.values().copied(), each, self.mine.len(), batch);
        self.each = each;
        more || buckets.len() as i64 >= batch
    }

    pub(super) fn giving_back(&self) -> bool {
        !self.leaving.is_empty()
    }

    /// Plan when due, and give back what is leaving once `settled` (nothing in flight). True when
    /// the buckets to read changed (read again).
    pub(super) async fn tick(&mut self, conn: &mut PgConnection, settled: bool) -> Result<bool, sqlx::Error> {
        let mut changed = false;
        if Instant::now() >= self.next_check {
            self.next_check = Instant::now() + CHECK;
            let h = self.look(&mut *conn).await?;
            let p = plan(self.me, self.buckets, &h, &self.mine);
            if p.waiting_for_others != self.waiting {
                self.waiting = p.waiting_for_others;
                if self.waiting {
                    tracing::info!(others = ?h.others, "relays with another bucket count are running; waiting until they stopped");
                }
            }
            if !p.give.is_empty() {
                self.leaving.extend(p.give);
            } else if !p.take.is_empty() {
                changed |= self.take(conn).await?;
            }
        }
        if settled && !self.leaving.is_empty() {
            self.give_back(conn).await?;
            changed = true;
        }
        Ok(changed)
    }

    async fn give_back(&mut self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        let codes: Vec<i32> = self.leaving.iter().map(|b| bucket_code(self.buckets, *b)).collect();
        sqlx::query("select pg_advisory_unlock($1, c) from unnest($2::int4[]) c")
            .bind(self.class)
            .bind(&codes)
            .execute(&mut *conn)
            .await?;
        tracing::info!(given = ?self.leaving, owned = self.mine.len() - self.leaving.len(), "gave back buckets");
        let given = MoveLabel { direction: "given" };
        self.metrics.bucket_moves.get_or_create(&given).inc_by(codes.len() as u64);
        self.mine.retain(|b| !self.leaving.contains(b));
        self.leaving.clear();
        self.metrics.buckets_owned.set(self.mine.len() as i64);
        Ok(())
    }

    async fn look(&self, conn: &mut PgConnection) -> Result<Holdings, sqlx::Error> {
        let rows: Vec<(i64, i32)> = sqlx::query_as(LOCKS_SQL).bind(i64::from(self.class)).fetch_all(conn).await?;
        Ok(Holdings::from_locks(self.buckets, rows))
    }

    /// Plan again and take free buckets, in one transaction that holds the outbox's rebalance
    /// lock: no relay takes anything between this look and this take.
    async fn take(&mut self, conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
        let mut tx = conn.begin().await?;
        sqlx::query("select pg_advisory_xact_lock($1, 0)")
            .bind(self.class)
            .execute(&mut *tx)
            .await?;
        let h = self.look(&mut tx).await?;
        let p = plan(self.me, self.buckets, &h, &self.mine);
        let codes: Vec<i32> = p.take.iter().map(|b| bucket_code(self.buckets, *b)).collect();
        let got: Vec<i32> = if codes.is_empty() {
            Vec::new()
        } else {
            sqlx::query_scalar("select c from unnest($2::int4[]) c where pg_try_advisory_lock($1, c)")
                .bind(self.class)
                .bind(&codes)
                .fetch_all(&mut *tx)
                .await?
        };
        tx.commit().await?;
        if got.is_empty() {
            return Ok(false);
        }
        let taken: Vec<u16> = got.iter().map(|c| (*c & 0xFFFF) as u16).collect();
        tracing::info!(taken = ?taken, owned = self.mine.len() + taken.len(), "took buckets");
        let taken_label = MoveLabel { direction: "taken" };
        self.metrics.bucket_moves.get_or_create(&taken_label).inc_by(taken.len() as u64);
        self.mine.extend(taken);
        self.metrics.buckets_owned.set(self.mine.len() as i64);
        Ok(true)
    }
}
