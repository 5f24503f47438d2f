//! Certificates rotating under load, ZDS add/del/snapshot, SIGTERM drain.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use testbed::*;

const ZT: &str = env!("CARGO_BIN_EXE_ztunnel");

fn serial(m: &Mesh, node: &str, id: &str) -> String {
    let dump = m.config_dump(node);
    let c = dump["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["identity"] == id)
        .cloned();
    c.and_then(|c| c["certChain"][0]["serialNumber"].as_str().map(String::from))
        .unwrap_or_default()
}

/// Writes and reads back a chunk on a live echo connection.
fn ping(s: &mut std::net::TcpStream, i: u64) {
    let chunk = pattern(32 * 1024, i);
    s.write_all(&chunk).unwrap();
    let mut back = vec![0u8; chunk.len()];
    s.read_exact(&mut back).unwrap();
    assert!(back == chunk, "echo mismatch on live connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_a_live_connection() {
    let mut m = Mesh::new("rot", ZT);
    m.extra_args = vec!["--cert-ttl".into(), "4s".into()];
    m.pod("client", "app", "client", "10.244.1.10", "node1", true);
    m.pod("server-2", "app", "server", "10.244.2.11", "node2", true);
    m.write_config(&two_node_yaml(""));
    let ca = m.dir.join("ca");
    m.start_node("node1", &ca).await;
    m.start_node("node2", &ca).await;
    m.echo_server("server-2", 8080);

    let id = "spiffe://cluster.local/ns/app/sa/client";
    let first = serial(&m, "node1", id);
    let mut live = m.connect("client", "10.244.2.11:8080").unwrap();
    let mut serials = std::collections::BTreeSet::from([first.clone()]);
    let start = Instant::now();
    let mut i = 0;
    // Well past the first certificate's expiry (4 s), the connection keeps flowing.
    while start.elapsed() < Duration::from_secs(7) {
        ping(&mut live, i);
        serials.insert(serial(&m, "node1", id));
        i += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        serials.len() >= 3,
        "expected renewals every ~2 s, saw serials {serials:?}"
    );
    // New connections work with the current certificates.
    echo_roundtrip(
        m.connect("client", "10.244.2.11:8080").unwrap(),
        &pattern(100_000, 9),
    );
    ping(&mut live, 999);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zds_del_fails_closed_and_readd_restores() {
    let m = two_nodes("zds", ZT, "").await;
    m.whoami_server("server-2", 8080);
    assert!(m.whoami("client", "10.244.2.11:8080").is_ok());

    // The agent removes the client pod: ztunnel closes its listeners. The
    // capture rules are still there, so traffic fails rather than escape.
    m.agent("node1").del("app/client").await.unwrap();
    assert!(m.config_dump("node1")["pods"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["uid"] != "app/client"));
    assert!(
        m.whoami("client", "10.244.2.11:8080").is_err(),
        "a pod without ztunnel must not get out"
    );

    // Re-adding restores service; adding the same netns twice is a no-op.
    let fd = std::fs::File::open(format!("/run/netns/{}", m.pod_ns("client"))).unwrap();
    let info = zds::WorkloadInfo {
        name: "client".into(),
        namespace: "app".into(),
        service_account: "client".into(),
    };
    m.agent("node1")
        .add("app/client", info.clone(), &fd)
        .await
        .unwrap();
    m.agent("node1").add("app/client", info, &fd).await.unwrap();
    assert_eq!(
        m.whoami("client", "10.244.2.11:8080").unwrap(),
        "server-2 10.244.1.10"
    );

    // Protocol errors are refused with a reason, and the session goes on.
    use prost_free::encode_add_without_fd;
    let err = m
        .agent("node1")
        .call_raw(&encode_add_without_fd(), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("carries 0 fds"), "{err}");
    let err = m.agent("node1").snapshot_sent().await.unwrap_err();
    assert!(err.to_string().contains("second snapshot_sent"), "{err}");
    assert_eq!(
        m.whoami("client", "10.244.2.11:8080").unwrap(),
        "server-2 10.244.1.10"
    );
}

/// An `add` datagram built by hand (field 1 = AddWorkload{uid=1 "x"}).
mod prost_free {
    pub fn encode_add_without_fd() -> Vec<u8> {
        vec![0x0a, 0x03, 0x0a, 0x01, b'x']
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_drops_pods_not_replayed() {
    let mut m = two_nodes("snp", ZT, "").await;
    // A new agent session (agent restart) that replays only server-1.
    let node = m.nodes.get_mut("node1").unwrap();
    drop(node.take_agent());
    let conn = tokio::time::timeout(Duration::from_secs(10), node.server().accept())
        .await
        .expect("ztunnel reconnects")
        .unwrap();
    let fd = std::fs::File::open(format!("/run/netns/{}", m.pod_ns("server-1"))).unwrap();
    conn.add(
        "app/server-1",
        zds::WorkloadInfo {
            name: "server-1".into(),
            namespace: "app".into(),
            service_account: "server".into(),
        },
        &fd,
    )
    .await
    .unwrap();
    conn.snapshot_sent().await.unwrap();
    let pods: Vec<String> = m.config_dump("node1")["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["uid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(pods, vec!["app/server-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_live_connections_and_refuses_new_ones() {
    let mut m = two_nodes("drn", ZT, "").await;
    m.echo_server("server-2", 8080);
    let mut live = m.connect("client", "10.244.2.11:8080").unwrap();
    ping(&mut live, 1);
    let pid = m.nodes["node1"].pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        m.http("node1", 15021, "/healthz/ready").map(|r| r.0),
        Some(503),
        "not ready while draining"
    );
    assert!(
        m.whoami("client", "10.244.2.11:8080").is_err(),
        "no new connections while draining"
    );
    ping(&mut live, 2);
    drop(live);
    let status = m.stop_node("node1");
    assert!(status.success(), "ztunnel exit: {status:?}");
    assert!(m.log("node1").contains("drained"), "{}", m.log("node1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_restart_never_leaks_and_resumes_after_snapshot() {
    let mut m = two_nodes("rst", ZT, "").await;
    m.whoami_server("server-2", 8080);
    assert_eq!(
        m.whoami("client", "10.244.2.11:8080").unwrap(),
        "server-2 10.244.1.10"
    );
    assert!(m.stop_node("node1").success());
    // The capture rules stay in the pod: with no ztunnel, traffic fails
    // instead of leaving in plaintext.
    assert!(m.whoami("client", "10.244.2.11:8080").is_err());
    // A new ztunnel receives the snapshot and serves the pod again.
    let ca = m.dir.join("ca");
    m.start_node("node1", &ca).await;
    assert_eq!(
        m.whoami("client", "10.244.2.11:8080").unwrap(),
        "server-2 10.244.1.10"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_ztunnel_restart_replaces_the_pooled_connection() {
    let mut m = two_nodes("prs", ZT, "").await;
    m.whoami_server("server-2", 8080);
    // Warm the pooled HBONE connection node1 -> server-2.
    assert!(m.whoami("client", "10.244.2.11:8080").is_ok());
    assert!(m.stop_node("node2").success());
    let ca = m.dir.join("ca");
    m.start_node("node2", &ca).await;
    // The first connection after the restart goes over a new pooled
    // connection: the old one ended with the old ztunnel.
    assert_eq!(
        m.whoami("client", "10.244.2.11:8080").unwrap(),
        "server-2 10.244.1.10"
    );
}
