//! When the next read starts under a steady flow. Reading as soon as there may be rows reads a
//! row or two per statement under a flow of small transactions: a select and a delete per writer
//! transaction on the database the writers use, and a produce request per row or two at the
//! broker. So after a read that caught up (fewer rows than a batch) the next one waits: long
//! enough to take about GATHER_ROWS rows at the flow's rate, within GATHER_MIN and
//! `--max-gather`. A row after a quiet spell is still read at once, and a backlog back to back.

use std::time::Duration;

const GATHER_ROWS: f64 = 50.0;
const GATHER_MIN: Duration = Duration::from_millis(1);
/// Weight of the latest read in the rate. Writers commit in bursts, so one read may find
/// nothing and the next twice as much: a single read's rate would swing the wait between its
/// bounds.
const WEIGHT: f64 = 0.25;

/// The flow's rate as reads see it: rows per second, a moving average over reads.
#[derive(Debug, Default)]
pub(super) struct Gather {
    rate: f64,
}

impl Gather {
    /// A read found `rows` rows, `since` after the previous read started (None: the first).
    pub fn read(&mut self, rows: usize, since: Option<Duration>) {
        if let Some(since) = since {
            let sample = rows as f64 / since.as_secs_f64().max(1e-4);
            self.rate = WEIGHT * sample + (1.0 - WEIGHT) * self.rate;
        }
    }

    /// After a read that caught up: how long the next one waits.
    pub fn wait(&self, max: Duration) -> Duration {
        let want = Duration::from_secs_f64((GATHER_ROWS / self.rate.max(1e-3)).min(3600.0));
        want.clamp(GATHER_MIN.min(max), max)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Gather, GATHER_MIN};

    const MAX: Duration = Duration::from_millis(20);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_wait_takes_about_gather_rows_at_a_steady_rate_within_its_bounds() {
        // 10,000 rows/s read every 5 ms: 50 rows take 5 ms.
        let mut g = Gather::default();
        for _ in 0..40 {
            g.read(50, Some(ms(5)));
        }
        assert_eq!(g.wait(MAX).as_micros().div_ceil(10), 500);
        // 1,000 rows/s: 50 ms, capped at the max; a flood: the minimum.
        for _ in 0..40 {
            g.read(5, Some(ms(5)));
        }
        assert_eq!(g.wait(MAX), MAX);
        for _ in 0..40 {
            g.read(400, Some(ms(1)));
        }
        assert_eq!(g.wait(MAX), GATHER_MIN);
        // --max-gather 0s: never wait.
        assert_eq!(g.wait(Duration::ZERO), Duration::ZERO);
        // Nothing read yet: the longest wait (a row after a quiet spell is read at once anyway).
        assert_eq!(Gather::default().wait(MAX), MAX);
    }

    #[test]
    fn bursts_average_out() {
        // Writers commit 100 rows every 10 ms; reads 5 ms apart find 0 and 100 in turn.
        let mut g = Gather::default();
        for i in 0..200 {
            g.read(if i % 2 == 0 { 0 } else { 100 }, Some(ms(5)));
        }
        let wait = g.wait(MAX);
        assert!(wait > ms(3) && wait < ms(8), "{wait:?}");
    }
}
