//! The waypoint serves only destinations bound to it. A client that reaches
//! the waypoint directly and names, in its CONNECT, a pod that is not bound
//! here (a pod whose policy trusts the waypoint's identity) is refused before
//! any byte reaches that pod: the waypoint is not a confused deputy.
//! Cross-namespace bindings follow the Gateway's `allowedRoutes`.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use identity::{BuiltinCa, Identity, SecretManager};
use testbed::*;

const WP: &str = env!("CARGO_BIN_EXE_waypoint");

const MESH: &str = "apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Namespace
metadata: {name: friends, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint, istio.io/use-waypoint-namespace: app, team: friends}}
---
apiVersion: v1
kind: Namespace
metadata: {name: strangers, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint, istio.io/use-waypoint-namespace: app}}
---
apiVersion: v1
kind: Namespace
metadata: {name: secure, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app, labels: {app: client}}
spec: {serviceAccountName: client, nodeName: node1}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: app, labels: {app: echo}}
spec: {serviceAccountName: echo, nodeName: node1}
status: {podIP: 10.244.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: friend, namespace: friends, labels: {app: friend}}
spec: {serviceAccountName: friend, nodeName: node1}
status: {podIP: 10.244.1.12}
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, namespace: strangers, labels: {app: stranger}}
spec: {serviceAccountName: stranger, nodeName: node1}
status: {podIP: 10.244.1.13}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: secure, labels: {app: db}}
spec: {serviceAccountName: db, nodeName: node2}
status: {podIP: 10.244.2.30}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
spec: {serviceAccountName: waypoint, nodeName: node2}
status: {podIP: 10.244.2.20}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: app}
spec: {clusterIP: 10.96.0.20, selector: {app: echo}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: friend, namespace: friends}
spec: {clusterIP: 10.96.0.40, selector: {app: friend}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: stranger, namespace: strangers}
spec: {clusterIP: 10.96.0.41, selector: {app: stranger}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: app, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.96.0.30, selector: {gateway.networking.k8s.io/gateway-name: waypoint}, ports: [{name: mesh, port: 15008}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: app}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
    allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {team: friends}}}}
---
# The database trusts the waypoint's identity: the policy a confused
# deputy would let anyone through.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-from-waypoint, namespace: secure}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/app/sa/waypoint]}}]}]
";

fn curl(m: &Mesh, pod: &str, url: &str) -> String {
    let (_, out) = sh_out(&format!(
        "ip netns exec {} curl -s -m 10 -w ' %{{http_code}}' {url}",
        m.pod_ns(pod)
    ));
    out
}

/// Sends one HBONE CONNECT for `authority` straight to the waypoint from
/// `pod`'s network, as `identity` (a certificate from the mesh CA, as a
/// captured pod's ztunnel would present); returns the answer's status.
fn connect_to_waypoint(m: &Mesh, pod: &str, identity: Identity, authority: &str) -> u16 {
    let ca_dir = m.dir.join("ca");
    let authority = authority.to_string();
    in_ns(&m.pod_ns(pod), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let ca = Arc::new(BuiltinCa::load_or_create(&ca_dir, "cluster.local").unwrap());
            let certs = SecretManager::new(ca, Duration::from_secs(600));
            certs.retain(&identity);
            let cert = certs.fetch(&identity).await.unwrap();
            let waypoint: std::net::SocketAddr = "10.244.2.20:15008".parse().unwrap();
            let key = hbone::PoolKey {
                source: "test".into(),
                dst_identity: Identity::new("cluster.local", "app", "waypoint"),
                dst: waypoint,
            };
            let r = hbone::Pool::new()
                .connect(
                    key,
                    cert.client.clone(),
                    || tokio::net::TcpStream::connect(waypoint),
                    &authority,
                    HeaderMap::new(),
                )
                .await;
            match r {
                Ok(_) => 200,
                Err(hbone::Error::Refused { status, .. }) => status.as_u16(),
                Err(e) => panic!("CONNECT to the waypoint failed: {e}"),
            }
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_serves_only_destinations_bound_to_it() {
    let mut m = Mesh::new("bind", &workspace_bin("ztunnel"));
    m.pod("client", "app", "client", "10.244.1.10", "node1", true);
    m.pod("echo", "app", "echo", "10.244.1.11", "node1", true);
    m.pod("friend", "friends", "friend", "10.244.1.12", "node1", true);
    m.pod("stranger", "strangers", "stranger", "10.244.1.13", "node1", true);
    m.pod("db", "secure", "db", "10.244.2.30", "node2", true);
    m.pod("waypoint", "app", "waypoint", "10.244.2.20", "node2", false);
    m.write_config(MESH);
    let ca = m.dir.join("ca");
    m.start_node("node1", &ca).await;
    m.start_node("node2", &ca).await;
    let echo = m.http_server("echo", 8080);
    let friend = m.http_server("friend", 8080);
    let stranger = m.http_server("stranger", 8080);
    let db = m.http_server("db", 8080);
    m.start_waypoint(WP, "waypoint", "waypoint", "app", "waypoint");

    // A bound service works, through the waypoint.
    eventually("bound service through the waypoint", Duration::from_secs(20), || {
        curl(&m, "client", "http://10.96.0.20/bound").ends_with(" 200")
    })
    .await;
    assert_eq!(echo.get("/bound"), 1);
    // A cross-namespace binding the Gateway admits works too.
    assert!(curl(&m, "client", "http://10.96.0.40/friend").ends_with(" 200"));
    assert_eq!(friend.get("/friend"), 1);

    // The confused deputy: straight to the waypoint, naming the database.
    let client = Identity::new("cluster.local", "app", "client");
    assert_eq!(connect_to_waypoint(&m, "client", client.clone(), "10.244.2.30:8080"), 403);
    // A binding the Gateway does not admit is refused the same way.
    assert_eq!(connect_to_waypoint(&m, "client", client.clone(), "10.96.0.41:80"), 403);
    // Not a port of a bound service.
    assert_eq!(connect_to_waypoint(&m, "client", client.clone(), "10.96.0.20:81"), 403);
    // The same path to a bound destination is accepted: the refusals are
    // about the destination, not the way the CONNECT arrived.
    assert_eq!(connect_to_waypoint(&m, "client", client, "10.96.0.20:80"), 200);
    assert_eq!(db.total(), 0, "the database saw a request through the waypoint");

    // Istio ignores a binding the Gateway does not admit: that service is
    // reached directly, and its own ztunnel enforces its policy.
    assert!(curl(&m, "client", "http://10.96.0.41/stranger").ends_with(" 200"));
    assert_eq!(stranger.get("/stranger"), 1);

    // The operator can read each refusal: log with the source, access log
    // and metrics with 403 and the no-route flag.
    let log = std::fs::read_to_string(m.dir.join("waypoint.log")).unwrap_or_default();
    assert!(
        log.lines().any(|l| l.contains("destination not bound to this waypoint")
            && l.contains("spiffe://cluster.local/ns/app/sa/client")
            && l.contains("10.244.2.30:8080")),
        "{log}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let access = std::fs::read_to_string(m.dir.join("waypoint-access.log")).unwrap_or_default();
    let refused: Vec<serde_json::Value> = access
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|l: &serde_json::Value| l["response_flags"] == "NR" && l["response_code"] == 403)
        .collect();
    assert!(
        refused.iter().any(|l| l["authority"] == "10.244.2.30:8080"),
        "{access}"
    );
    let metrics = m.pod_http("waypoint", 15020, "/metrics");
    assert!(
        metrics.lines().any(|l| l.starts_with("istio_requests_total")
            && l.contains("response_code=\"403\"")
            && l.contains("response_flags=\"NR\"")),
        "{metrics}"
    );
}
