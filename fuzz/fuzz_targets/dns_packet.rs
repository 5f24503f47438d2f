//! ztunnel's DNS packet path (parse, plan against a mesh, encode) on
//! arbitrary bytes: must never panic or hang.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static MESH: OnceLock<mesh::MeshState> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let state = MESH.get_or_init(|| {
        mesh::standalone::parse(include_str!("../../examples/mesh.yaml"), "cluster.local")
            .expect("example mesh")
    });
    let _ = ztunnel::dns::answer::packet_path(data, state);
});
