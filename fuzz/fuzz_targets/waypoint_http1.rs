//! The waypoint's HTTP/1.1 request handling on arbitrary client bytes:
//! protocol sniffing, hyper's parser with the waypoint's header timeout, then
//! our request logic on whatever it accepts — route choice and L7
//! AuthorizationPolicy evaluation against fuzz/waypoint-mesh.yaml, which
//! holds every match kind. Nothing panics or hangs.
#![no_main]

use std::convert::Infallible;
use std::sync::OnceLock;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use libfuzzer_sys::fuzz_target;
use mesh::authz::{self, Connection, HttpRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
static MESH: OnceLock<mesh::MeshState> = OnceLock::new();
static CLIENT: OnceLock<identity::Identity> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let _ = waypoint::proxy::is_http(data);
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    });
    let state = MESH.get_or_init(|| {
        mesh::standalone::parse(include_str!("../waypoint-mesh.yaml"), "cluster.local")
            .expect("example mesh")
    });
    let client_id =
        CLIENT.get_or_init(|| "spiffe://cluster.local/ns/app/sa/client".parse().unwrap());
    let input = data.to_vec();
    rt.block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let writer = async move {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        };
        let svc = hyper::service::service_fn(
            move |req: hyper::Request<hyper::body::Incoming>| async move {
                let (parts, _) = req.into_parts();
                let host = parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .or(parts.uri.authority().map(|a| a.as_str()))
                    .unwrap_or("")
                    .to_string();
                // The waypoint routes by the Service the stream was addressed to.
                let routed = ["a.app.svc.cluster.local", "b.app.svc.cluster.local"]
                    .map(|svc| waypoint::route::choose(state, svc, 80, &parts).is_some());
                let conn = Connection {
                    src_identity: Some(client_id),
                    src_ip: [10, 244, 1, 10].into(),
                    dst_ip: [10, 96, 0, 1].into(),
                    dst_port: 80,
                    request: Some(HttpRequest {
                        method: parts.method.as_str(),
                        path: parts.uri.path(),
                        host: &host,
                        headers: &parts.headers,
                        auth: None,
                    }),
                };
                let decision = authz::evaluate_selected(
                    state.waypoint_policies.iter().map(|t| &t.policy),
                    &conn,
                );
                Ok::<_, Infallible>(hyper::Response::new(format!("{routed:?} {decision:?}")))
            },
        );
        let serve = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(1))
            .serve_connection(TokioIo::new(server), svc);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            tokio::join!(writer, serve)
        })
        .await;
    });
});
