//! The waypoint for dual-stack and IPv6-only Services: the client's ztunnel
//! reaches the waypoint at its v6 address for a v6 VIP, the waypoint routes
//! the request and reaches the endpoint at its v6 address over HBONE, and
//! the same Service's v4 VIP goes on as before.

use testbed::*;

mod common;
use common::access_log;

const WP: &str = env!("CARGO_BIN_EXE_waypoint");

const CLIENT6: &str = "fd00:10:244::1:10";
const ECHO6: &str = "fd00:10:244::1:11";
const WAYPOINT6: &str = "fd00:10:244::2:20";
/// `echo`'s v6 VIP (it also has 10.96.0.20); `six` has only a v6 VIP.
const VIP6: &str = "fd00:10:96::20";
const SIX6: &str = "fd00:10:96::21";

/// client and echo on node1, the waypoint on node2: every hop crosses
/// nodes. Pods list v4 first, as a v4-primary dual-stack cluster does.
const MESH: &str = "apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app, labels: {app: client}}
spec: {serviceAccountName: client, nodeName: node1}
status: {podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}, {ip: 'fd00:10:244::1:10'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: app, labels: {app: echo}}
spec: {serviceAccountName: echo, nodeName: node1}
status: {podIP: 10.244.1.11, podIPs: [{ip: 10.244.1.11}, {ip: 'fd00:10:244::1:11'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
spec: {serviceAccountName: waypoint, nodeName: node2}
status: {podIP: 10.244.2.20, podIPs: [{ip: 10.244.2.20}, {ip: 'fd00:10:244::2:20'}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: app}
spec:
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, 'fd00:10:96::20']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: tcp, port: 9000, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: six, namespace: app}
spec:
  clusterIP: 'fd00:10:96::21'
  clusterIPs: ['fd00:10:96::21']
  ipFamilies: [IPv6]
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: app, labels: {istio.io/use-waypoint: none}}
spec:
  clusterIP: 10.96.0.30
  clusterIPs: [10.96.0.30, 'fd00:10:96::30']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  selector: {gateway.networking.k8s.io/gateway-name: waypoint}
  ports: [{name: mesh, port: 15008}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: app, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: app}
spec:
  parentRefs: [{group: \"\", kind: Service, name: echo}]
  rules:
  - backendRefs: [{name: echo, port: 80}]
";

fn curl(m: &Mesh, url: &str) -> String {
    let (_, out) = sh_out(&format!(
        "ip netns exec {} curl -s -g -m 10 '{url}'",
        m.pod_ns("client")
    ));
    out
}

/// The access log line of the one request to `path`.
fn logged(m: &Mesh, path: &str) -> serde_json::Value {
    let mut lines: Vec<_> = access_log(m)
        .into_iter()
        .filter(|l| l["path"] == path)
        .collect();
    assert_eq!(lines.len(), 1, "access log lines for {path}: {lines:?}");
    lines.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_and_v6_only_services_go_through_the_waypoint_in_their_family() {
    let mut m = Mesh::new("wv6", &workspace_bin("ztunnel"));
    m.pod_with_ips(
        "client",
        "app",
        "client",
        &["10.244.1.10", CLIENT6],
        "node1",
        true,
    );
    m.pod_with_ips(
        "echo",
        "app",
        "echo",
        &["10.244.1.11", ECHO6],
        "node1",
        true,
    );
    m.pod_with_ips(
        "waypoint",
        "app",
        "waypoint",
        &["10.244.2.20", WAYPOINT6],
        "node2",
        false,
    );
    m.write_config(MESH);
    let ca = m.dir.join("ca");
    m.start_node("node1", &ca).await;
    m.start_node("node2", &ca).await;
    let hits = m.http_server("echo", 8080);
    m.whoami_server("echo", 9000);
    m.start_waypoint(WP, "waypoint", "waypoint", "app", "waypoint");

    // The v6 VIP: routed by the waypoint (its HTTPRoute), which the client's
    // ztunnel reached over v6 (the client's own v6 address is the
    // waypoint's peer), and sent on to echo's v6 address.
    assert_eq!(curl(&m, &format!("http://[{VIP6}]/v6")), "echo\n");
    let l = logged(&m, "/v6");
    assert_eq!(l["route_name"], "HTTPRoute app/echo", "{l}");
    assert_eq!(l["response_code"], 200, "{l}");
    assert_eq!(l["upstream_host"], format!("[{ECHO6}]:8080"), "{l}");
    assert!(
        l["downstream_remote_address"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("[{CLIENT6}]:"))),
        "{l}"
    );
    // The same Service's v4 VIP stays v4 end to end.
    assert_eq!(curl(&m, "http://10.96.0.20/v4"), "echo\n");
    let l = logged(&m, "/v4");
    assert_eq!(l["route_name"], "HTTPRoute app/echo", "{l}");
    assert_eq!(l["upstream_host"], "10.244.1.11:8080", "{l}");
    assert!(
        l["downstream_remote_address"]
            .as_str()
            .is_some_and(|a| a.starts_with("10.244.1.10:")),
        "{l}"
    );
    // An IPv6-only Service, without a route of its own.
    assert_eq!(curl(&m, &format!("http://[{SIX6}]/six")), "echo\n");
    let l = logged(&m, "/six");
    assert_eq!(l["upstream_host"], format!("[{ECHO6}]:8080"), "{l}");
    assert_eq!(l["response_code"], 200, "{l}");
    assert_eq!(
        (hits.get("/v6"), hits.get("/v4"), hits.get("/six")),
        (1, 1, 1)
    );

    // Its HBONE pool holds connections to echo's ztunnel in both families.
    let dump = m.pod_config_dump("waypoint");
    let pooled: Vec<&str> = dump["hbone_pool"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["destination"].as_str())
        .collect();
    for want in [format!("[{ECHO6}]:15008"), "10.244.1.11:15008".to_string()] {
        assert!(pooled.contains(&want.as_str()), "{want} not in {pooled:?}");
    }

    // At L4 the server sees the waypoint's address of the VIP's family: the
    // stream went through it, v6 to v6.
    assert_eq!(
        m.whoami("client", &format!("[{VIP6}]:9000")).unwrap(),
        format!("echo {WAYPOINT6}")
    );
    assert_eq!(
        m.whoami("client", "10.96.0.20:9000").unwrap(),
        "echo 10.244.2.20"
    );

    // echo's ztunnel was reached from the waypoint, over mTLS.
    let dst = m.metrics("node1");
    assert!(
        dst.lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"destination\"")
                && l.contains("destination_workload=\"echo\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/app/sa/waypoint\"")),
        "echo was not reached from the waypoint:\n{dst}"
    );
}
