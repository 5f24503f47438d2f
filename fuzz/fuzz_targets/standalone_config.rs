//! The standalone translator (also what the Kubernetes source feeds) on
//! arbitrary text: an error naming the object, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = mesh::standalone::parse(text, "cluster.local");
    }
});
