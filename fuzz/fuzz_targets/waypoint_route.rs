//! The waypoint's route choice (HTTPRoute/VirtualService matching on method,
//! path, query, headers) on arbitrary requests against
//! fuzz/waypoint-mesh.yaml, which holds every match kind.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static MESH: OnceLock<mesh::MeshState> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let state = MESH.get_or_init(|| {
        mesh::standalone::parse(include_str!("../waypoint-mesh.yaml"), "cluster.local")
            .expect("example mesh")
    });
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let method = lines.next().unwrap_or("GET");
    let uri = lines.next().unwrap_or("/");
    let host = lines.next().unwrap_or("a.app.svc.cluster.local");
    let mut b = http::Request::builder().method(method).uri(uri);
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            b = b.header(k.trim(), v.trim());
        }
    }
    let Ok(req) = b.body(()) else { return };
    let (parts, _) = req.into_parts();
    for h in [host, "a.app.svc.cluster.local", "b.app.svc.cluster.local"] {
        let _ = waypoint::route::choose(state, h, 80, &parts);
    }
});
