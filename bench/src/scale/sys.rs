//! What the bench reads from the kernel: this process's CPU time, its RSS,
//! and a clock two processes agree on.

use std::time::Duration;

/// User plus system CPU time of the whole process (every thread).
pub fn cpu() -> Duration {
    let ru = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(ru.user_time()) + tv(ru.system_time())
}

pub fn rss_kb() -> u64 {
    testbed::proc_status_kb(std::process::id(), "VmRSS").unwrap_or(0)
}

/// The high-water mark of RSS (VmHWM).
pub fn peak_rss_kb() -> u64 {
    testbed::proc_status_kb(std::process::id(), "VmHWM").unwrap_or(0)
}

pub fn rss_mb() -> f64 {
    rss_kb() as f64 / 1024.0
}

/// CLOCK_MONOTONIC in ns: one clock for the whole machine, so a time taken
/// by the server process and one taken by the client process subtract.
/// (`Instant` is the same clock but cannot cross a process boundary.)
pub fn mono_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// Which allocator this build of the bench uses (the cargo feature).
pub fn allocator() -> &'static str {
    if cfg!(feature = "jemalloc") {
        "jemalloc"
    } else if cfg!(feature = "mimalloc") {
        "mimalloc"
    } else {
        "system"
    }
}
