//! The global allocator our proxies share: jemalloc, with the options they
//! were measured with. A macro, so that the allocator and the options
//! symbol jemalloc looks up are items of the binary itself.

/// jemalloc's options, read at its first allocation (`_RJEM_MALLOC_CONF`
/// in the environment overrides them). One arena instead of four per CPU,
/// and freed pages purged after 1 s instead of 10 s: on the benches this
/// kept ztunnel's peak RSS under load 6 MB below jemalloc's defaults at the
/// same throughput, and the waypoint's ~1 MiB above glibc's.
pub const MALLOC_CONF: &std::ffi::CStr = c"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0";

/// The `const char *` jemalloc looks for.
#[repr(transparent)]
pub struct MallocConf(pub *const std::ffi::c_char);
// SAFETY: it points at a static, immutable C string.
unsafe impl Sync for MallocConf {}

pub use tikv_jemallocator::Jemalloc;

/// Makes jemalloc, with `MALLOC_CONF`, the binary's global allocator.
#[macro_export]
macro_rules! jemalloc_global_allocator {
    () => {
        #[global_allocator]
        static GLOBAL: $crate::allocator::Jemalloc = $crate::allocator::Jemalloc;

        #[export_name = "_rjem_malloc_conf"]
        pub static MALLOC_CONF: $crate::allocator::MallocConf =
            $crate::allocator::MallocConf($crate::allocator::MALLOC_CONF.as_ptr());
    };
}
