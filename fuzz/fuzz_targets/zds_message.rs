//! ZDS requests as ztunnel decodes them from the node agent's socket.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = zds::WorkloadRequest::decode(data) {
        // Re-encoding what we accepted must round-trip.
        let again =
            zds::WorkloadRequest::decode(req.encode_to_vec().as_slice()).expect("round trip");
        assert_eq!(again, req);
    }
    let _ = zds::Ack::decode(data);
});
