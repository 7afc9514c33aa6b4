//! Giving the host heap that a burst of connections used back to the kernel
//! once the burst is over.
//!
//! Each open connection holds about 17 KiB of host heap (its Store, WASI
//! context, wasmtime's instances, the socket and the task). glibc returns
//! freed memory only from the top of its heap, so after 5000 connections
//! closed the server still held all 88 MB of it, for good. `malloc_trim(0)`
//! also releases the free pages in the middle of the heap. It costs a walk
//! of the heap and a page fault for each released page that is used again,
//! so it runs only when many fewer connections are open than at the recent
//! high-water mark, not under steady load.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::stats::Stats;

/// How often the open-connection count is compared with its high-water mark.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// Trim once this many fewer connections are open than at the high-water
/// mark since the last trim: a quarter of `--max-connections`, between 16
/// and 1000 (about 17 MB of freed host heap). A fixed 1000 meant a server
/// capped below 1000 connections never trimmed; 16 connections' worth
/// (about 270 KB) is the least worth a heap walk.
pub fn receded_by(max_connections: usize) -> u64 {
    (max_connections as u64 / 4).clamp(16, 1000)
}

/// Trim the heap after every burst of connections that has receded by
/// [`receded_by`]. Never returns; drop it to stop.
pub async fn after_bursts(stats: Arc<Stats>, max_connections: usize) {
    let threshold = receded_by(max_connections);
    let mut ticks = tokio::time::interval(CHECK_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let open = stats.open_connections();
        let high = stats.high_water_since_trim();
        if high < open + threshold {
            continue;
        }
        stats.reset_high_water(open);
        let started = Instant::now();
        // On a blocking thread: the walk takes milliseconds on a large heap
        // and must not stall the connections on this runtime thread.
        let released = tokio::task::spawn_blocking(release_free_heap)
            .await
            .unwrap_or(false);
        tracing::info!(
            open,
            high_water = high,
            released,
            took_ms = started.elapsed().as_millis() as u64,
            "connections receded: returned free heap to the kernel"
        );
    }
}

/// `malloc_trim(0)`: release every free page of every glibc arena.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_heap() -> bool {
    // SAFETY: malloc_trim only inspects and madvises glibc's own free
    // chunks, under each arena's lock.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other allocators return memory on their own terms.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_heap() -> bool {
    false
}
