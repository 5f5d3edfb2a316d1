//! A batch's delivery reports, taken as the producer delivers them and stamped when each arrived.

use crate::clients::broker::{Ack, Acked, Refusal};

pub(super) type Report = Result<Acked, Refusal>;

/// A batch's delivery reports, each stamped when it arrived: a task of its own takes them as the
/// producer delivers them, whatever the relay's task is doing meanwhile (reading, deleting), so
/// the commit-to-acknowledgement latency is the broker's, not the relay's turn to look.
pub(super) struct Reports {
    task: Option<tokio::task::JoinHandle<Vec<(Report, f64)>>>,
    received: Option<Vec<(Report, f64)>>,
}

impl Reports {
    pub(super) fn collect(sent: Vec<Ack>) -> Self {
        // Each stamped as it resolves (a later partition's may come first), kept in send order.
        let task = tokio::spawn(futures::future::join_all(sent.into_iter().map(|f| async move {
            let report = f.await;
            (report, unix_now())
        })));
        Reports {
            task: Some(task),
            received: None,
        }
    }

    /// Wait for every report. Cancel-safe. A task that ended without its reports (the runtime
    /// is shutting down) leaves none: those rows count as reports lost.
    pub(super) async fn delivered(&mut self) {
        if let Some(task) = &mut self.task {
            let reports = task.await.unwrap_or_default();
            self.task = None;
            self.received = Some(reports);
        }
    }

    /// Every report, in send order, once all are in.
    pub(super) async fn all(mut self) -> Vec<(Report, f64)> {
        self.delivered().await;
        self.received.take().unwrap_or_default()
    }
}

impl Drop for Reports {
    fn drop(&mut self) {
        // An abandoned batch (the producer was rebuilt): its rows are read again.
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Seconds since the Unix epoch, as the rows' created_at is read.
pub(super) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
