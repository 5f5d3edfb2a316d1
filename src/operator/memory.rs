//! Returning freed memory to the system. The operator's first reconcile of every object, and a
//! refresh wave, allocate a burst that glibc keeps as free chunks in its arenas: the resident
//! size then stays at the burst's peak, not at what the operator holds. A trim now and then gives
//! those pages back (measured in docs/benchmarks.md, "Operator at 100, 400 and 1,000 objects").

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the free pages go back: rare enough to cost nothing (a trim walks the arenas in a
/// few ms), often enough that a burst's peak does not last.
pub const TRIM_EVERY: Duration = Duration::from_secs(30);

/// Trim every [`TRIM_EVERY`] until `stop`, off the runtime's workers.
pub fn spawn_trim(stop: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TRIM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    });
}

/// Give the arenas' free pages back (glibc); nothing elsewhere.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
