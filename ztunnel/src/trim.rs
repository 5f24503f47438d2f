//! Gives freed memory back to the system after connections close. glibc's
//! malloc keeps what a burst of connections freed in its arenas (scattered
//! among live blocks, so trimming the heap's top does not return it); after
//! thousands of connections close, `malloc_trim` hands those pages back.
//! Only with the system allocator on glibc: jemalloc returns
//! memory on their own.

use std::time::Duration;

/// How often the count of live connections is looked at: one atomic load.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Fewer closed connections than this free too little to be worth a trim.
const MIN_CLOSED: usize = 256;

/// Whether to trim now, given the most connections live since the last
/// trim and how many are live now: when at least MIN_CLOSED have closed
/// and no more than half of the peak remain.
fn should_trim(peak: usize, live: usize) -> bool {
    peak.saturating_sub(live) >= MIN_CLOSED && live <= peak / 2
}

/// Runs for the process's life, trimming after a large drop in live
/// connections (`live` reads their count).
pub fn spawn(live: fn() -> usize) {
    tokio::spawn(async move {
        let mut peak = live();
        let mut tick = tokio::time::interval(CHECK_EVERY);
        loop {
            tick.tick().await;
            let now = live();
            peak = peak.max(now);
            if should_trim(peak, now) {
                let closed = peak - now;
                // Walks the arenas under their locks: off the runtime's
                // workers. Rare: only after a large drop.
                let _ = tokio::task::spawn_blocking(trim).await;
                tracing::debug!(closed, live = now, "returned freed memory to the system");
                peak = now;
            }
        }
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only releases free memory inside glibc's arenas;
    // it takes their locks itself and touches no live allocation.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_after_a_large_drop_only() {
        // (peak, live) -> trim
        let cases = [
            (0, 0, false),        // nothing ever held
            (4000, 4000, false),  // all still open
            (4000, 2001, false),  // more than half remain
            (4000, 2000, true),   // half closed
            (4000, 0, true),      // all closed
            (300, 0, true),       // just enough closed
            (200, 0, false),      // too few to matter
            (10000, 9000, false), // many closed, most remain
        ];
        for (peak, live, want) in cases {
            assert_eq!(should_trim(peak, live), want, "peak {peak} live {live}");
        }
    }
}
