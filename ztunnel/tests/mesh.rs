//! End-to-end: real ztunnel processes, pods as network namespaces.

use std::io::Read;

use testbed::*;

const ZT: &str = env!("CARGO_BIN_EXE_ztunnel");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_to_pod_across_nodes_through_hbone() {
    let m = two_nodes("p2p", ZT, "").await;
    m.echo_server("server-2", 8080);
    m.whoami_server("server-2", 9090);

    // The application sees the real client IP (IP_TRANSPARENT on the far side).
    assert_eq!(
        m.whoami("client", "10.244.2.11:9090").unwrap(),
        "server-2 10.244.1.10"
    );

    // Large transfer, byte-exact both ways.
    let data = pattern(16 << 20, 7);
    echo_roundtrip(m.connect("client", "10.244.2.11:8080").unwrap(), &data);

    // Many concurrent connections, each with its own bytes.
    let mut handles = Vec::new();
    for i in 0..64u64 {
        let s = m.connect("client", "10.244.2.11:8080").unwrap();
        handles.push(std::thread::spawn(move || {
            echo_roundtrip(s, &pattern(64 * 1024 + i as usize, i))
        }));
    }
    for h in handles {
        h.join().unwrap();
    }

    // It went over HBONE: both sides counted mTLS connections, and the pool
    // multiplexed all 64 over one TLS connection (one dial per peer).
    let src = m.metrics("node1");
    assert!(
        src.lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"source\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
                && l.contains("destination_workload=\"server-2\"")),
        "{src}"
    );
    let dst = m.metrics("node2");
    let line = dst
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_received_bytes_total")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/app/sa/client\"")
        })
        .unwrap_or_else(|| panic!("no destination byte counter:\n{dst}"));
    let received: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(received >= (16 << 20) as f64, "{line}");
    let dump = m.config_dump("node1");
    let pool = dump["hbone_pool"].as_array().unwrap();
    assert!(
        !pool.is_empty() && pool.iter().all(|p| p["connections"].as_u64().unwrap() == 1),
        "{pool:?}"
    );
    assert_eq!(
        dump["pods"].as_array().unwrap().len(),
        2,
        "node1 serves client and server-1"
    );
    assert!(dump["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .any(
            |c| c["identity"] == "spiffe://cluster.local/ns/app/sa/client"
                && c["state"] == "Available"
        ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_vip_reaches_endpoints_on_both_nodes() {
    let m = two_nodes("vip", ZT, "").await;
    m.whoami_server("server-1", 8080);
    m.whoami_server("server-2", 8080);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let line = m.whoami("client", "10.96.0.10:80").unwrap();
        let mut it = line.split(' ');
        seen.insert(it.next().unwrap().to_string());
        assert_eq!(
            it.next(),
            Some("10.244.1.10"),
            "client IP preserved via the VIP"
        );
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec!["server-1", "server-2"]
    );
    // A service port that does not exist is refused, not sent somewhere.
    let mut s = m.connect("client", "10.96.0.10:81").unwrap();
    let mut buf = [0u8; 1];
    assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    assert!(m
        .metrics("node1")
        .contains("destination_service=\"server.app.svc.cluster.local\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_outside_the_mesh_get_plain_tcp() {
    let m = two_nodes("out", ZT, "").await;
    // outsider is labelled dataplane-mode=none: known to the model, not in the mesh.
    m.whoami_server("outsider", 7070);
    assert_eq!(
        m.whoami("client", "10.244.3.10:7070").unwrap(),
        "outsider 10.244.1.10"
    );
    // The close is recorded when ztunnel sees both ends finish, a moment
    // after the client has its answer.
    let closed = |m: &Mesh| {
        m.metrics("node1").lines().any(|l| {
            l.starts_with("istio_tcp_connections_closed_total")
                && l.contains("destination_workload=\"outsider\"")
                && l.contains("connection_security_policy=\"none\"")
                && l.contains("response_flags=\"-\"")
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !closed(&m) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            m.metrics("node1")
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // An address nobody listens on fails as a connect failure, visibly.
    assert!(m.whoami("client", "10.244.3.10:7071").is_err());
    assert!(m
        .metrics("node1")
        .lines()
        .any(|l| l.starts_with("istio_tcp_connections_closed_total")
            && l.contains("response_flags=\"CONNECT\"")));
}
