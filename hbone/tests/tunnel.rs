//! HBONE client and server against each other over loopback mTLS.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use identity::{BuiltinCa, Identity, SecretManager, WorkloadCert};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

async fn certs(tag: &str) -> (Arc<WorkloadCert>, Arc<WorkloadCert>, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("hbone-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ca = Arc::new(BuiltinCa::load_or_create(&dir, "cluster.local").unwrap());
    let m = SecretManager::new(ca, Duration::from_secs(600));
    let (s, c) = (
        Identity::new("cluster.local", "ns", "server"),
        Identity::new("cluster.local", "ns", "client"),
    );
    m.retain(&s);
    m.retain(&c);
    (m.fetch(&s).await.unwrap(), m.fetch(&c).await.unwrap(), dir)
}

/// Tunnels from one source pod to the server at `addr`, which must prove `sa`.
fn key(addr: std::net::SocketAddr, sa: &str) -> hbone::PoolKey {
    hbone::PoolKey {
        source: "pod".into(),
        dst_identity: Identity::new("cluster.local", "ns", sa),
        dst: addr,
    }
}

/// An HBONE server whose "application" echoes every byte.
async fn echo_server(server: Arc<WorkloadCert>) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (_tx, drain) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _keep = _tx;
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            let tls = tokio_rustls::TlsAcceptor::from(server.server.clone())
                .accept(tcp)
                .await
                .unwrap();
            let drain = drain.clone();
            tokio::spawn(hbone::serve(tls, drain, |inb: hbone::Inbound| async move {
                let (send, recv) = inb.accept().unwrap();
                let (app, mut peer) = tokio::io::duplex(64 * 1024);
                tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(&mut peer);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
                let (rd, wr) = tokio::io::split(app);
                let _ = hbone::pump(rd, wr, send, recv, &|_| {}).await;
            }));
        }
    });
    addr
}

#[tokio::test]
async fn tunnel_is_byte_exact_and_pooled() {
    let (server, client, dir) = certs("exact").await;
    let addr = echo_server(server).await;
    let pool = hbone::Pool::new();
    let key = key(addr, "server");
    for round in 0..3u8 {
        let (mut send, mut recv, _g) = pool
            .connect(
                key.clone(),
                client.client.clone(),
                || TcpStream::connect(addr),
                "10.0.0.1:80",
                HeaderMap::new(),
            )
            .await
            .unwrap();
        let data: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8 ^ round).collect();
        let payload = Bytes::from(data.clone());
        let writer = tokio::spawn(async move {
            send.reserve_capacity(payload.len());
            let mut rest = payload;
            while !rest.is_empty() {
                let cap = std::future::poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .unwrap()
                    .unwrap();
                send.send_data(rest.split_to(cap.min(rest.len())), false)
                    .unwrap();
            }
            send.send_data(Bytes::new(), true).unwrap();
        });
        let mut got = Vec::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.unwrap();
            let _ = recv.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
        }
        writer.await.unwrap();
        assert!(got == data, "round {round}: echoed bytes differ");
    }
    let stats = pool.stats();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].1, 1, "three tunnels share one pooled connection");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn client_refuses_server_with_other_identity() {
    let (server, client, dir) = certs("wrongid").await;
    let addr = echo_server(server).await;
    let key = key(addr, "someone-else");
    let err = hbone::Pool::new()
        .connect(
            key,
            client.client.clone(),
            || TcpStream::connect(addr),
            "10.0.0.1:80",
            HeaderMap::new(),
        )
        .await
        .err()
        .expect("must refuse");
    assert!(matches!(err, hbone::Error::WrongPeer { .. }), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn server_refuses_what_is_not_connect_to_ip_port() {
    let (server, client, dir) = certs("badreq").await;
    let addr = echo_server(server).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client.client.clone())
        .connect(
            rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
            tcp,
        )
        .await
        .unwrap();
    let (h2, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let cases = [
        (
            Request::builder()
                .method(Method::GET)
                .uri("https://10.0.0.1/")
                .body(())
                .unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Request::builder()
                .method(Method::CONNECT)
                .uri("service.example:80")
                .body(())
                .unwrap(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Request::builder()
                .method(Method::CONNECT)
                .uri("10.0.0.1:80")
                .body(())
                .unwrap(),
            StatusCode::OK,
        ),
    ];
    for (req, want) in cases {
        let mut h2 = h2.clone().ready().await.unwrap();
        let (resp, _stream) = h2.send_request(req, false).unwrap();
        assert_eq!(resp.await.unwrap().status(), want);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// 50 tunnels asked for at once share one dial; when the peer accepts TCP
/// and never answers TLS, the callers that waited on that dial fail with it
/// (one handshake timeout in all, not one each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_tunnels_share_one_dial_and_its_failure() {
    let (server, client, dir) = certs("burst").await;
    let addr = echo_server(server).await;
    let pool = hbone::Pool::new();
    let key = key(addr, "server");
    let burst = |key: hbone::PoolKey, n: usize| {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (pool, key, tls) = (pool.clone(), key.clone(), client.client.clone());
            set.spawn(async move {
                pool.connect(
                    key.clone(),
                    tls,
                    || TcpStream::connect(key.dst),
                    "10.0.0.1:80",
                    HeaderMap::new(),
                )
                .await
            });
        }
        set
    };
    let mut set = burst(key.clone(), 50);
    let mut held = Vec::new();
    while let Some(r) = set.join_next().await {
        held.push(r.unwrap().unwrap());
    }
    let stats = pool.stats();
    assert_eq!(
        (stats[0].1, stats[0].2),
        (1, 50),
        "50 concurrent first tunnels: (connections, streams)"
    );
    drop(held);

    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut accepted = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            accepted.push(s);
        }
    });
    let start = std::time::Instant::now();
    let mut set = burst(
        hbone::PoolKey {
            dst: silent_addr,
            ..key
        },
        5,
    );
    let mut errors = Vec::new();
    while let Some(r) = set.join_next().await {
        errors.push(r.unwrap().err().expect("a silent peer gave a tunnel"));
    }
    let took = start.elapsed();
    assert!(
        took < hbone::HANDSHAKE_TIMEOUT * 2,
        "waiters paid a timeout each: {took:?}"
    );
    let timed_out = errors
        .iter()
        .filter(|e| matches!(e, hbone::Error::HandshakeTimeout { .. }))
        .count();
    let shared = errors
        .iter()
        .filter(|e| matches!(e, hbone::Error::DialFailed { .. }))
        .count();
    assert_eq!((timed_out, shared), (1, 4), "{errors:?}");
    assert!(
        errors
            .iter()
            .all(|e| e.to_string().contains(&silent_addr.to_string())),
        "{errors:?}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
