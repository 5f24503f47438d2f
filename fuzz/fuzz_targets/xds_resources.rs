//! WDS resources as istiod sends them: a sequence of upserts and removals of
//! both types, then the mesh they build. Bad resources must be refused by
//! name; nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xds::wds::{Resources, ADDRESS_TYPE, AUTHORIZATION_TYPE};

fuzz_target!(|data: &[u8]| {
    let mut res = Resources::default();
    // Records: [op][name byte][len][body...]
    let mut rest = data;
    while rest.len() >= 3 {
        let (op, name, len) = (rest[0], rest[1], rest[2] as usize);
        let body = &rest[3..(3 + len).min(rest.len())];
        rest = &rest[(3 + len).min(rest.len())..];
        let ty = if op & 1 == 0 {
            ADDRESS_TYPE
        } else {
            AUTHORIZATION_TYPE
        };
        let name = format!("r{}", name % 8);
        if op & 2 == 0 {
            let _ = res.upsert(ty, &name, "v", body);
        } else {
            res.remove(ty, &name);
        }
    }
    let _ = res.build();
});
