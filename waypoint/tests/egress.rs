//! Egress through the waypoint: ServiceEntry hosts outside the mesh, an
//! ambient client that names them (resolved by ztunnel's DNS proxy), our
//! waypoint applying routes and L7 policy before reaching the entry's
//! endpoints; and an entry without a waypoint routed by ztunnel at L4.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use testbed::*;

const WP: &str = env!("CARGO_BIN_EXE_waypoint");
const PEERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers");

const BASE: &str = "apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app, labels: {app: client}}
spec: {serviceAccountName: client, nodeName: node1}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
spec: {serviceAccountName: waypoint, nodeName: node2}
status: {podIP: 10.244.2.20}
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: app, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.96.0.30, selector: {gateway.networking.k8s.io/gateway-name: waypoint}, ports: [{name: mesh, port: 15008}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: app, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: origin, namespace: app}
spec:
  hosts: [origin.example.com]
  addresses: [240.240.0.1]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  endpoints: [{address: 10.244.3.5}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: raw, namespace: app, labels: {istio.io/use-waypoint: none}}
spec:
  hosts: [raw.example.com]
  addresses: [240.240.0.2]
  resolution: STATIC
  ports: [{number: 7000, name: tcp, protocol: TCP, targetPort: 9000}]
  endpoints: [{address: 10.244.3.5}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: origin, namespace: app}
spec:
  hosts: [origin.example.com]
  http:
  - match: [{uri: {prefix: /old/}}]
    rewrite: {uri: /new/}
    route: [{destination: {host: origin.example.com}}]
  - route: [{destination: {host: origin.example.com}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-secrets, namespace: app}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: [/secret*]}}]}]
";

/// Python peers, killed (by their own pid) when the test ends, pass or fail.
#[derive(Default)]
struct Peers(Vec<Child>);

impl Drop for Peers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Peers {
    /// Starts `script args` in `pod` and waits for it to listen on `port`.
    fn start(&mut self, m: &Mesh, pod: &str, script: &str, args: &[&str], port: u16) {
        let log = std::fs::File::create(m.dir.join(format!("{script}-{port}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &m.pod_ns(pod), "python3", "-u"])
            .arg(format!("{PEERS}/{script}"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("python3 (run scripts/deps.sh)");
        self.0.push(child);
        for _ in 0..100 {
            if in_ns(&m.pod_ns(pod), move || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            }) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{script} did not listen on {port}");
    }
}

async fn mesh(tag: &str, extra: &str) -> Mesh {
    let mut m = Mesh::new(tag, &workspace_bin("ztunnel"));
    m.pod("client", "app", "client", "10.244.1.10", "node1", true);
    m.pod("waypoint", "app", "waypoint", "10.244.2.20", "node2", false);
    // Outside the mesh: on the network, in no config.
    m.pod("origin", "ext", "none", "10.244.3.5", "node2", false);
    // Any address off the pod: the capture rules send DNS to ztunnel.
    m.resolv_conf("client", "nameserver 10.96.0.53\n");
    m.write_config(&format!("{BASE}{extra}"));
    let ca = m.dir.join("ca");
    m.start_node("node1", &ca).await;
    m.start_node("node2", &ca).await;
    m.start_waypoint(WP, "waypoint", "waypoint", "app", "waypoint");
    m
}

fn curl(m: &Mesh, url: &str) -> String {
    let cmd = format!(
        "ip netns exec {} curl -s -m 10 -w ' %{{http_code}}' {url}",
        m.pod_ns("client")
    );
    sh_out(&cmd).1.trim().to_string()
}

fn access_log(m: &Mesh) -> Vec<serde_json::Value> {
    // The waypoint flushes its access log every 100 ms.
    std::thread::sleep(Duration::from_millis(300));
    std::fs::read_to_string(m.dir.join("waypoint-access.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A STATIC ServiceEntry bound to the waypoint by its namespace: the client
/// names the host (ztunnel's DNS proxy answers the entry's VIP), ztunnel
/// sends the connection to the waypoint, which admits it, rewrites per the
/// VirtualService on the entry's host, denies what the policy denies, and
/// reaches the endpoint over plain TCP; the telemetry names the entry's
/// host. The entry that opts out of the waypoint is routed by ztunnel to
/// its endpoint at L4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_entry_served_by_the_waypoint_and_at_l4_without_it() {
    let m = mesh("egs", "").await;
    let mut peers = Peers::default();
    peers.start(&m, "origin", "origin.py", &["8080"], 8080);
    m.echo_server("origin", 9000);

    assert_eq!(
        curl(&m, "http://origin.example.com/hello"),
        "GET /hello host=origin.example.com sni=-\n 200"
    );
    assert_eq!(
        curl(&m, "http://origin.example.com/old/x?q=1"),
        "GET /new/x?q=1 host=origin.example.com sni=-\n 200"
    );
    assert_eq!(
        curl(&m, "http://origin.example.com/secret/key"),
        "RBAC: access denied 403"
    );
    let log = access_log(&m);
    assert!(
        log.iter()
            .any(|l| l["authority"] == "origin.example.com"
                && l["upstream_host"] == "10.244.3.5:8080"),
        "{log:?}"
    );
    let metrics = m.pod_http("waypoint", 15020, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("destination_service=\"origin.example.com\"")
                && l.contains("response_code=\"403\"")),
        "{metrics}"
    );

    // No waypoint: ztunnel connects the VIP's port to the endpoint's.
    let s = m.connect("client", "240.240.0.2:7000").unwrap();
    echo_roundtrip(s, &pattern(64 << 10, 7));
    drop(peers);
}
