//! Dual-stack and IPv6-only pods end to end: captured by the ip6tables
//! rules, carried over HBONE to `[v6]:15008`, the server seeing the client's
//! v6 address, Services with a VIP per family, v6 `ipBlocks`, and the DNS
//! proxy answering AAAA with the v6 VIP.

use std::io::Read;

use testbed::*;

const ZT: &str = env!("CARGO_BIN_EXE_ztunnel");

const CLIENT6: &str = "fd00:10:244::1:10";
const SERVER6: &str = "fd00:10:244::2:11";
const OTHER6: &str = "fd00:10:244::2:10";
const VIP6: &str = "fd00:10:96::10";

/// Dual-stack pods (v4 first, as a v4-primary cluster lists them), a
/// dual-stack Service, and a policy denying the v6 range of node2's pods.
const DUAL: &str = "apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app, labels: {app: client}}
spec: {serviceAccountName: client, nodeName: node1}
status: {podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}, {ip: 'fd00:10:244::1:10'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: app, labels: {app: other}}
spec: {serviceAccountName: other, nodeName: node2}
status: {podIP: 10.244.2.10, podIPs: [{ip: 10.244.2.10}, {ip: 'fd00:10:244::2:10'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server-2, namespace: app, labels: {app: server}}
spec: {serviceAccountName: server, nodeName: node2}
status: {podIP: 10.244.2.11, podIPs: [{ip: 10.244.2.11}, {ip: 'fd00:10:244::2:11'}]}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: app}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, 'fd00:10:96::10']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  selector: {app: server}
  ports: [{port: 80, targetPort: 9090}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-node2-v6, namespace: app}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from:
    - source: {ipBlocks: ['fd00:10:244::2:0/112']}
";

async fn dual_stack(tag: &str) -> Mesh {
    let mut m = Mesh::new(tag, ZT);
    m.pod_with_ips(
        "client",
        "app",
        "client",
        &["10.244.1.10", CLIENT6],
        "node1",
        true,
    );
    m.pod_with_ips(
        "other",
        "app",
        "other",
        &["10.244.2.10", OTHER6],
        "node2",
        true,
    );
    m.pod_with_ips(
        "server-2",
        "app",
        "server",
        &["10.244.2.11", SERVER6],
        "node2",
        true,
    );
    m.write_config(DUAL);
    let ca = m.dir.join("ca");
    m.start_node("node1", &ca).await;
    m.start_node("node2", &ca).await;
    m
}

fn v6(ip: &str, port: u16) -> String {
    format!("[{ip}]:{port}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_pods_talk_v6_over_hbone_and_v4_as_before() {
    let m = dual_stack("v6p").await;
    m.whoami_server("server-2", 9090);
    m.echo_server("server-2", 8080);
    // From the first packet: the HBONE connection is pooled, so its
    // handshake happens once.
    let cap = Capture::start(&m.net, "br0", m.dir.join("br0.pcap"));

    // The server sees the client's own v6 address (IPV6_TRANSPARENT), and
    // the same pods still speak v4.
    assert_eq!(
        m.whoami("client", &v6(SERVER6, 9090)).unwrap(),
        format!("server-2 {CLIENT6}")
    );
    assert_eq!(
        m.whoami("client", "10.244.2.11:9090").unwrap(),
        "server-2 10.244.1.10"
    );
    // The v6 VIP goes to the endpoint's v6 address, the v4 VIP to its v4 one.
    assert_eq!(
        m.whoami("client", &v6(VIP6, 80)).unwrap(),
        format!("server-2 {CLIENT6}")
    );
    assert_eq!(
        m.whoami("client", "10.96.0.10:80").unwrap(),
        "server-2 10.244.1.10"
    );

    // On the wire: only HBONE (TLS 1.3 on 15008) between the pods' v6
    // addresses, and never the application's bytes.
    let secret = b"V6-MESH-SECRET-PAYLOAD".repeat(2000);
    echo_roundtrip(m.connect("client", &v6(SERVER6, 8080)).unwrap(), &secret);
    let pcap = cap.pcap.clone();
    let raw = cap.stop();
    assert!(!contains(&raw, b"V6-MESH-SECRET"), "plaintext on the wire");
    let filter = format!("ipv6.addr=={CLIENT6} && ipv6.addr=={SERVER6}");
    let (ok, ports) = sh_out(&format!(
        "tshark -r {} -Y '{filter}' -T fields -e tcp.port 2>/dev/null | sort -u",
        pcap.display()
    ));
    assert!(
        ok && !ports.trim().is_empty(),
        "no v6 packets between the pods: {ports}"
    );
    assert!(
        ports.lines().all(|l| l.split(',').any(|p| p == "15008")),
        "non-HBONE ports between the pods: {ports}"
    );
    let (ok, versions) = sh_out(&format!(
        "tshark -r {} -d tcp.port==15008,tls -Y '{filter} && tls.handshake.type == 2' -T fields -e tls.handshake.extensions.supported_version 2>/dev/null",
        pcap.display()
    ));
    assert!(
        ok && !versions.trim().is_empty() && versions.lines().all(|v| v.trim() == "0x0304"),
        "ServerHello versions: {versions:?}"
    );

    // Both ends counted it as mTLS, with the v6 addresses.
    let dst = m.metrics("node2");
    assert!(
        dst.lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"destination\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/app/sa/client\"")),
        "{dst}"
    );
    let dump = m.config_dump("node1");
    let ips: Vec<&str> = dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "client")
        .and_then(|w| w["workloadIps"].as_array())
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(ips, ["10.244.1.10", CLIENT6]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v6_ip_blocks_deny_and_leave_v4_alone() {
    let m = dual_stack("v6d").await;
    m.whoami_server("server-2", 9090);
    // other's v6 address is in the denied block: refused, over HBONE.
    let mut s = m.connect("other", &v6(SERVER6, 9090)).unwrap();
    let mut buf = Vec::new();
    assert!(
        matches!(s.read_to_end(&mut buf), Ok(0) | Err(_)),
        "denied client got {:?}",
        String::from_utf8_lossy(&buf)
    );
    assert!(m
        .metrics("node2")
        .lines()
        .any(|l| l.starts_with("istio_tcp_connections_closed_total")
            && l.contains("response_flags=\"DENY\"")
            && l.contains("source_principal=\"spiffe://cluster.local/ns/app/sa/other\"")));
    // Its v4 address is not in a v6 block; the client's v6 one is not either.
    assert_eq!(
        m.whoami("other", "10.244.2.11:9090").unwrap(),
        "server-2 10.244.2.10"
    );
    assert_eq!(
        m.whoami("client", &v6(SERVER6, 9090)).unwrap(),
        format!("server-2 {CLIENT6}")
    );
}

/// `dig` inside the pod, to any server: the capture rules bring it to the
/// DNS proxy (a v6 server address through the v6 rules to [::1]:15053).
fn dig(m: &Mesh, pod: &str, server: &str, qtype: &str, name: &str) -> String {
    let (ok, out) = sh_out(&format!(
        "ip netns exec {} dig +short +time=3 +tries=1 @{server} {qtype} {name}",
        m.pod_ns(pod)
    ));
    assert!(ok, "dig {qtype} {name} @{server}: {out}");
    out.trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_proxy_answers_aaaa_with_the_v6_vip() {
    let m = dual_stack("v6n").await;
    let host = "server.app.svc.cluster.local";
    for server in ["10.96.0.53", "fd00:10:96::53"] {
        assert_eq!(
            dig(&m, "client", server, "AAAA", host),
            VIP6,
            "via {server}"
        );
        assert_eq!(
            dig(&m, "client", server, "A", host),
            "10.96.0.10",
            "via {server}"
        );
    }
    // The proxy answered all four (no server listens at either address).
    let metrics = m.metrics("node1");
    let answered: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("istio_dns_requests_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(answered >= 4.0, "{metrics}");
}

const V6_ONLY: &str = "apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app, labels: {app: client}}
spec: {serviceAccountName: client, nodeName: node1}
status: {podIP: 'fd00:10:244::1:20', podIPs: [{ip: 'fd00:10:244::1:20'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: app, labels: {app: server}}
spec: {serviceAccountName: server, nodeName: node2}
status: {podIP: 'fd00:10:244::2:20'}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: app}
spec:
  clusterIP: 'fd00:10:96::20'
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  selector: {app: server}
  ports: [{port: 80, targetPort: 9090}]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_only_pair() {
    let mut m = Mesh::new("v6o", ZT);
    m.pod_with_ips(
        "client",
        "app",
        "client",
        &["fd00:10:244::1:20"],
        "node1",
        true,
    );
    m.pod_with_ips(
        "server",
        "app",
        "server",
        &["fd00:10:244::2:20"],
        "node2",
        true,
    );
    m.write_config(V6_ONLY);
    let ca = m.dir.join("ca");
    m.start_node("node1", &ca).await;
    m.start_node("node2", &ca).await;
    m.whoami_server("server", 9090);
    for dst in ["fd00:10:244::2:20", "fd00:10:96::20"] {
        let port = if dst.contains(":96:") { 80 } else { 9090 };
        assert_eq!(
            m.whoami("client", &v6(dst, port)).unwrap(),
            "server fd00:10:244::1:20",
            "to {dst}"
        );
    }
    assert!(m.metrics("node1").lines().any(|l| l
        .starts_with("istio_tcp_connections_opened_total")
        && l.contains("reporter=\"source\"")
        && l.contains("connection_security_policy=\"mutual_tls\"")
        && l.contains("destination_workload=\"server\"")));
}
