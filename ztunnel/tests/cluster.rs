//! ztunnel fed only by a real istiod (built from its Go module by
//! scripts/peers.sh) against a real kube-apiserver: xDS, istiod's CA, policy
//! changed through the Kubernetes API, and istiod going away and coming back.

use std::collections::BTreeMap;
use std::time::Duration;

use testbed::cluster::allow_only;
use testbed::*;

const ZT: &str = env!("CARGO_BIN_EXE_ztunnel");

/// The log without terminal colours.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut it = log.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for c in it.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_feeds_ztunnel_policy_changes_and_outage() {
    let mut m = Mesh::new("clu", ZT);
    for (name, ip) in cluster::DEMO_PODS {
        m.pod(name, "demo", name, ip, "node1", true);
    }
    let c = Cluster::start(&m).await;
    c.start_istiod().await;
    let target = c.demo_app().await;

    c.attach_node(&mut m, "node1", "10.244.250.1").await;
    // Short-lived certificates, so the last phase can outlive them.
    m.extra_args = vec!["--cert-ttl".into(), "20s".into()];
    m.start_node("node1", &m.dir.clone()).await;
    // Service VIP -> the pod istiod says backs it, over HBONE, with the
    // client's own address kept.
    cluster::demo_serves_over_hbone(&m, &target).await;
    // Every workload certificate came from istiod's CA (the root we plugged in).
    let root = std::fs::read_to_string(&c.root_cert).unwrap();
    let dump = m.config_dump("node1");
    let certs = dump["certificates"].as_array().unwrap();
    assert!(certs.len() >= 3, "{certs:?}");
    for cert in certs {
        assert_eq!(cert["state"], "Available", "{cert}");
        assert_eq!(
            cert["rootCerts"][0]["pem"].as_str().unwrap().trim(),
            root.trim(),
            "{cert}"
        );
    }

    // Admin (config dump) only on the node's loopback; metrics on the node
    // address; neither carries key material.
    assert!(
        m.whoami("intruder", "10.244.250.1:15000").is_err(),
        "admin port reachable off-node"
    );
    let (ok, scraped) = sh_out(&format!(
        "ip netns exec {} curl -s -m 5 http://10.244.250.1:15020/metrics",
        m.pod_ns("intruder")
    ));
    assert!(
        ok && scraped.contains("istio_tcp_connections_opened_total"),
        "{scraped}"
    );
    let dump = m.config_dump("node1").to_string();
    for text in [&scraped, &dump] {
        assert!(
            !text.contains("PRIVATE KEY")
                && !text.contains(
                    std::fs::read_to_string(c.dir.join("cacerts/ca-key.pem"))
                        .unwrap()
                        .lines()
                        .nth(1)
                        .unwrap()
                )
        );
    }

    // A policy applied through the API takes effect within seconds.
    c.apply(&allow_only("client")).await;
    let took = eventually(
        "ALLOW policy shuts the intruder out",
        Duration::from_secs(20),
        || m.whoami("intruder", &target).is_err(),
    )
    .await;
    eprintln!("policy applied through the API enforced after {took:?}");
    assert_eq!(m.whoami("client", &target).unwrap(), "server 10.244.1.10");
    c.apply(&allow_only("intruder")).await;
    eventually(
        "changed policy swaps who is admitted",
        Duration::from_secs(20),
        || m.whoami("client", &target).is_err() && m.whoami("intruder", &target).is_ok(),
    )
    .await;

    // istiod goes away: the last known state keeps serving and enforcing.
    c.stop_istiod();
    c.delete(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "demo",
        "server-allow",
    )
    .await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(m.whoami("intruder", &target).unwrap(), "server 10.244.1.12");
        assert!(
            m.whoami("client", &target).is_err(),
            "policy must stay enforced while istiod is down"
        );
    }
    assert!(
        m.log("node1").contains("xDS disconnected"),
        "{}",
        m.log("node1")
    );
    assert!(m.metrics("node1").contains("ztunnel_xds_connected 0"));
    let ready = m.http("node1", 15021, "/healthz/ready");
    assert_eq!(
        ready.map(|r| r.0),
        Some(200),
        "ztunnel stays ready on last known state"
    );

    // istiod returns: the stream resumes and the deletion made meanwhile applies.
    c.start_istiod().await;
    eventually(
        "resync after istiod restart removes the deleted policy",
        Duration::from_secs(60),
        || m.whoami("client", &target).is_ok(),
    )
    .await;
    assert!(m.log("node1").matches("xDS stream open").count() >= 2);
    assert!(m.metrics("node1").contains("ztunnel_xds_connected 1"));

    // The CA goes away for longer than a certificate lives: once they expire,
    // new connections fail closed with the reason logged, and nothing goes
    // out in plaintext instead.
    c.stop_istiod();
    // The dump gives RFC 3339 times; the metric gives seconds.
    let expiry = m
        .metrics("node1")
        .lines()
        .filter(|l| l.starts_with("ztunnel_certificate_expiration_timestamp_seconds"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0f64, f64::max) as u64;
    assert!(expiry > 0, "no certificate expiry in the metrics");
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    assert!(expiry <= now() + 21, "certificates outlive --cert-ttl");
    eventually(
        "certificates expire with the CA down",
        Duration::from_secs(30),
        || now() > expiry + 1,
    )
    .await;
    let cap = Capture::start(&m.net, "br0", m.dir.join("expired.pcap"));
    let mut s = m.connect("client", &target).unwrap();
    use std::io::{Read, Write};
    let _ = s.write_all(b"SECRET-AFTER-EXPIRY");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert_eq!(
        out, "",
        "a connection went through with expired certificates"
    );
    // Control: plaintext the capture must see (host leg -> pod).
    if let Ok(mut p) = std::net::TcpStream::connect_timeout(
        &"10.244.1.11:8080".parse().unwrap(),
        Duration::from_secs(2),
    ) {
        let _ = p.write_all(b"CONTROL-PLAINTEXT-FLOW");
        std::thread::sleep(Duration::from_millis(200));
    }
    let pcap = cap.stop();
    assert!(
        contains(&pcap, b"CONTROL-PLAINTEXT-FLOW"),
        "the capture saw nothing"
    );
    assert!(
        !contains(&pcap, b"SECRET-AFTER-EXPIRY"),
        "plaintext left the pod after certificate expiry"
    );
    let log = plain(&m.log("node1"));
    assert!(log.contains("certificate request failed"), "{log}");
    // Either the renewal already failed past expiry, or the held
    // certificate is found expired at use: both name identity and cause.
    assert!(
        log.contains("error=no certificate for spiffe://cluster.local/ns/demo/sa/client: CA unavailable")
            || log.contains("error=certificate for spiffe://cluster.local/ns/demo/sa/client expired and could not be renewed"),
        "the refused connection does not say why:\n{log}"
    );

    // The CA returns: certificates are renewed and traffic flows again.
    c.start_istiod().await;
    eventually(
        "renewal after the CA returns",
        Duration::from_secs(60),
        || m.whoami("client", &target).is_ok(),
    )
    .await;
}

/// The server pod (node2) and the port of its echo server.
const ECHO: &str = "10.244.2.11:7000";

/// Whether `pod` gets an echo from the server over HBONE: the exchange works
/// and node2's ztunnel reports an mTLS connection from `pod`'s identity (a
/// plaintext fallback would carry no principal for the DENY to match).
fn echoes_over_hbone(m: &Mesh, pod: &str) -> bool {
    let Ok(mut s) = m.connect(pod, ECHO) else {
        return false;
    };
    // Short: this is polled, and a connection not yet routed may hang.
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    if exchange(&mut s, b"probe").is_err() {
        return false;
    }
    let principal = format!("source_principal=\"spiffe://cluster.local/ns/demo/sa/{pod}\"");
    m.metrics("node2").lines().any(|l| {
        l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("connection_security_policy=\"mutual_tls\"")
            && l.contains(&principal)
    })
}

/// The same live-connection check as the standalone policy test, with the
/// policy coming through the Kubernetes API and istiod's WDS push: a DENY by
/// principal closes the client's open HBONE connection (logged with the
/// policy, counted), refuses its new ones, and leaves another identity's
/// live connection to the same server flowing byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_policy_change_closes_live_connections_it_denies() {
    let mut m = Mesh::new("cut", ZT);
    m.pod("client", "demo", "client", "10.244.1.10", "node1", true);
    m.pod("other", "demo", "other", "10.244.1.12", "node1", true);
    m.pod("server", "demo", "server", "10.244.2.11", "node2", true);
    let c = Cluster::start(&m).await;
    c.start_istiod().await;

    c.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n").await;
    for (name, ip, node) in [
        ("client", "10.244.1.10", "node1"),
        ("other", "10.244.1.12", "node1"),
        ("server", "10.244.2.11", "node2"),
    ] {
        let labels = BTreeMap::from([("app".to_string(), name.to_string())]);
        c.pod("demo", name, name, node, Some(ip), &labels).await;
        c.mark_captured("demo", name).await;
    }
    // Clients and server on different nodes: the connections cross between
    // two ztunnels, and the server's (node2) is the one that must cut.
    c.attach_node(&mut m, "node1", "10.244.250.1").await;
    c.attach_node(&mut m, "node2", "10.244.250.2").await;
    let dir = m.dir.clone();
    m.start_node("node1", &dir).await;
    m.start_node("node2", &dir).await;
    m.echo_server("server", 7000);

    for pod in ["client", "other"] {
        eventually(
            &format!("{pod} reaches the server over HBONE with istiod's config"),
            Duration::from_secs(30),
            || echoes_over_hbone(&m, pod),
        )
        .await;
    }
    let mut denied = m.connect("client", ECHO).unwrap();
    let mut kept = m.connect("other", ECHO).unwrap();
    for s in [&mut denied, &mut kept] {
        exchange(s, b"before the change").unwrap();
    }

    c.apply(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cut-client, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from:
    - source: {principals: [cluster.local/ns/demo/sa/client]}
",
    )
    .await;
    let applied = std::time::Instant::now();
    // Generous: istiod's debounce and push are part of it, not only
    // ztunnel's re-check. A read timeout (still open) fails this; EOF or a
    // reset passes.
    let closed =
        tokio::task::block_in_place(|| closed_within(&mut denied, Duration::from_secs(20)));
    let took = applied.elapsed();
    assert!(
        closed,
        "the live connection the new DENY forbids is still open after {took:?}; node2 log:\n{}",
        plain(&m.log("node2"))
    );
    eprintln!("DENY applied through the API closed the live connection after {took:?}");

    // A new connection from the client is refused: the outbound side
    // accepts it locally, then the server's ztunnel refuses the CONNECT, so
    // the exchange ends in EOF or a reset, not a read timeout.
    let mut fresh = m.connect("client", ECHO).unwrap();
    fresh
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    match exchange(&mut fresh, b"after the change") {
        Ok(()) => panic!("a new connection from the denied client went through"),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the new connection hung instead of being refused: {e}"
        ),
    }

    // The other identity's live connection was not disturbed, and it can
    // still open new ones.
    let payload = pattern(256 * 1024, 7);
    tokio::task::block_in_place(|| exchange(&mut kept, &payload))
        .expect("the other identity's live connection was disturbed");
    assert!(echoes_over_hbone(&m, "other"), "other is refused too");

    let log = plain(&m.log("node2"));
    assert!(
        log.lines()
            .any(|l| l.contains("live connection closed by a policy change")
                && l.contains("denied by DENY policy demo/cut-client")
                && l.contains("spiffe://cluster.local/ns/demo/sa/client")),
        "no log line naming the policy and the source:\n{log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("live connection closed by a policy change")
                && l.contains("spiffe://cluster.local/ns/demo/sa/other")),
        "the other identity's connection was logged as revoked:\n{log}"
    );
    let metrics = m.metrics("node2");
    let revoked: u64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("mesh_connections_revoked_total") && l.contains("component=\"ztunnel\"")
        })
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or_else(|| panic!("revocation not counted:\n{metrics}"));
    assert!(revoked >= 1, "{metrics}");
}

/// A DNS ServiceEntry applied through the Kubernetes API, bound to no
/// waypoint: istiod sends its endpoint as a workload carrying a hostname
/// instead of an address, ztunnel takes it (no NACK) and routes the entry's
/// VIP at L4 to what it resolves the host to itself (a test resolver beside
/// the node), shown in its dump.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_dns_service_entry_is_resolved_and_routed_by_ztunnel() {
    let mut m = Mesh::new("cdn", ZT);
    m.pod("client", "demo", "client", "10.244.1.10", "node1", true);
    // Outside the mesh and the cluster: the origin (also the test
    // resolver's `outside.test`, 192.0.2.1) and the resolver.
    m.pod("origin", "ext", "none", "10.244.3.5", "node1", false);
    m.pod("resolver", "ext", "none", "10.244.3.53", "node1", false);
    sh(&format!(
        "ip -n {o} addr add 192.0.2.1/32 dev eth0 && ip -n {c} route add 192.0.2.0/30 via 10.244.3.5",
        o = m.pod_ns("origin"),
        c = m.pod_ns("client")
    ));
    let c = Cluster::start(&m).await;
    c.start_istiod().await;
    c.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n").await;
    let labels = BTreeMap::from([("app".to_string(), "client".to_string())]);
    c.pod(
        "demo",
        "client",
        "client",
        "node1",
        Some("10.244.1.10"),
        &labels,
    )
    .await;
    c.mark_captured("demo", "client").await;
    c.apply(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: outside, namespace: demo}
spec:
  hosts: [outside.test]
  addresses: [240.240.0.12]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 7000, name: tcp, protocol: TCP, targetPort: 9000}]
",
    )
    .await;
    c.attach_node(&mut m, "node1", "10.244.250.1").await;
    // ztunnel's own resolver (`ip netns exec` shows it this file).
    m.resolv_conf("node1", "nameserver 10.244.3.53\n");
    let counts = m.dns_server("resolver");
    m.echo_server("origin", 9000);
    let dir = m.dir.clone();
    m.start_node("node1", &dir).await;

    eventually(
        "the client reaches the DNS entry's endpoint through ztunnel",
        Duration::from_secs(40),
        || {
            m.connect("client", "240.240.0.12:7000").is_ok_and(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                exchange(&mut s, b"probe").is_ok()
            })
        },
    )
    .await;
    assert!(counts.udp.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    let dump = m.config_dump("node1");
    let workloads = dump["workloads"].as_array().unwrap();
    assert!(
        workloads
            .iter()
            .any(|w| w["hostname"] == "outside.test" && w["workloadIps"] == serde_json::json!([])),
        "{workloads:?}"
    );
    let log = plain(&m.log("node1"));
    assert!(!log.contains("xDS NACK"), "{log}");
    assert!(
        m.metrics("node1")
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_closed_total")
                && l.contains("destination_service=\"outside.test\"")
                && l.contains("response_flags=\"-\"")),
        "{}",
        m.metrics("node1")
    );
}
