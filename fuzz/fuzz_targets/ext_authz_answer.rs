//! An external authorizer's gRPC Check answer (the bytes of its one
//! message, and the grpc-status of its trailers) as the waypoint judges it:
//! never a panic, whatever the authorizer sends.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&status, body)) = data.split_first() else {
        return;
    };
    let mut trailers = http::HeaderMap::new();
    trailers.insert(
        "grpc-status",
        http::HeaderValue::from(i32::from(status % 20)),
    );
    let _ = waypoint::ext_authz::grpc_verdict(
        http::StatusCode::OK,
        &http::HeaderMap::new(),
        body,
        Some(&trailers),
    );
});
