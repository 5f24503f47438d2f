//! Handing free memory back to the OS after a large transient load.
//!
//! A big config change (a whole file re-read, an initial xDS push) holds
//! megabytes for a moment between long-lived entries; glibc keeps those
//! pages for reuse unless asked, so RSS stays at the peak of the largest
//! change ever seen. The callers ask once the replaced state is freed.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free() {
    // SAFETY: malloc_trim only returns free pages to the kernel; it takes
    // the allocator's own locks and touches no memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free() {}
