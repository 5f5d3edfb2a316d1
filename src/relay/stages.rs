//! Where a row's time goes between its commit and the broker's acknowledgement, and what its batch
//! does after: each step stamped, for benchmarks that look for the relay's tail (kept only by
//! `RelayMetrics::with_latency_samples`, so a production relay pays nothing for it).

/// The stages of one acknowledged row, in seconds, in the order of [`STAGES`].
pub type Stages = [f64; 6];

/// to_read: created_at to the read that took it; read: the read statement; send: from the read's
/// end until the producer took the row; ack: from then to the delivery report; collect: from the
/// batch's last report until the relay took the reports; delete: the statement that removed the
/// batch's acknowledged rows.
pub const STAGES: [&str; 6] = ["to_read", "read", "send", "ack", "collect", "delete"];

/// Unix times (seconds) of a batch's steps up to sending.
#[derive(Debug, Clone, Default)]
pub struct Stamps {
    /// The read started and ended.
    pub read: (f64, f64),
    /// When the producer took each row, by row index (NaN: not sent).
    pub handed: Vec<f64>,
}

/// What happened after the reports: when the relay took them and how long the delete took.
#[derive(Debug, Clone, Copy)]
pub struct After {
    pub collected: f64,
    pub delete: f64,
}

impl Stamps {
    /// The stages of row `i`, created at `created` and acknowledged at `acked`; `last` is the
    /// batch's last report. Pure.
    pub fn of(&self, i: usize, created: f64, acked: f64, last: f64, after: After) -> Stages {
        let handed = self.handed.get(i).copied().unwrap_or(self.read.1);
        [
            (self.read.0 - created).max(0.0),
            self.read.1 - self.read.0,
            handed - self.read.1,
            acked - handed,
            (after.collected - last).max(0.0),
            after.delete,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stages_add_up_to_commit_to_ack() {
        let s = Stamps {
            read: (10.0, 10.002),
            handed: vec![10.003, 10.005],
        };
        let after = After {
            collected: 10.2,
            delete: 0.004,
        };
        let st = s.of(1, 9.99, 10.105, 10.11, after);
        let want = [0.01, 0.002, 0.003, 0.1, 0.09, 0.004];
        for (got, want) in st.iter().zip(want) {
            assert!((got - want).abs() < 1e-9, "{st:?}");
        }
        // created_at to ack is the sum of the first four.
        assert!((st[..4].iter().sum::<f64>() - (10.105 - 9.99)).abs() < 1e-9);
    }
}
