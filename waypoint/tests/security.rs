//! The waypoint's security boundaries, end to end.
//!
//! It serves only destinations bound to it: a client that reaches the
//! waypoint directly and names, in its CONNECT, a pod that is not bound here
//! (a pod whose policy trusts the waypoint's identity) is refused before any
//! byte reaches that pod — the waypoint is not a confused deputy.
//! Cross-namespace bindings follow the Gateway's `allowedRoutes`.
//!
//! A policy change reaches live traffic: L4 streams it now denies close, and
//! the next request on a kept-alive HTTP connection is judged by it.

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
spec: {clusterIP: 10.96.0.20, selector: {app: echo}, ports: [{name: http, port: 80, targetPort: 8080}, {name: tcp, port: 9000, targetPort: 9000}]}
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

async fn mesh(tag: &str) -> Mesh {
    let mut m = Mesh::new(tag, &workspace_bin("ztunnel"));
    m.pod("client", "app", "client", "10.244.1.10", "node1", true);
    m.pod("echo", "app", "echo", "10.244.1.11", "node1", true);
    m.pod("friend", "friends", "friend", "10.244.1.12", "node1", true);
    m.pod(
        "stranger",
        "strangers",
        "stranger",
        "10.244.1.13",
        "node1",
        true,
    );
    m.pod("db", "secure", "db", "10.244.2.30", "node2", true);
    m.pod("waypoint", "app", "waypoint", "10.244.2.20", "node2", false);
    m.write_config(MESH);
    let ca = m.dir.join("ca");
    m.start_node("node1", &ca).await;
    m.start_node("node2", &ca).await;
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_serves_only_destinations_bound_to_it() {
    let m = mesh("bind").await;
    let echo = m.http_server("echo", 8080);
    let friend = m.http_server("friend", 8080);
    let stranger = m.http_server("stranger", 8080);
    let db = m.http_server("db", 8080);
    m.start_waypoint(WP, "waypoint", "waypoint", "app", "waypoint");

    // A bound service works, through the waypoint.
    eventually(
        "bound service through the waypoint",
        Duration::from_secs(20),
        || curl(&m, "client", "http://10.96.0.20/bound").ends_with(" 200"),
    )
    .await;
    assert_eq!(echo.get("/bound"), 1);
    // A cross-namespace binding the Gateway admits works too.
    assert!(curl(&m, "client", "http://10.96.0.40/friend").ends_with(" 200"));
    assert_eq!(friend.get("/friend"), 1);

    // The confused deputy: straight to the waypoint, naming the database.
    let client = Identity::new("cluster.local", "app", "client");
    assert_eq!(
        connect_to_waypoint(&m, "client", client.clone(), "10.244.2.30:8080"),
        403
    );
    // A binding the Gateway does not admit is refused the same way.
    assert_eq!(
        connect_to_waypoint(&m, "client", client.clone(), "10.96.0.41:80"),
        403
    );
    // Not a port of a bound service.
    assert_eq!(
        connect_to_waypoint(&m, "client", client.clone(), "10.96.0.20:81"),
        403
    );
    // The same path to a bound destination is accepted: the refusals are
    // about the destination, not the way the CONNECT arrived.
    assert_eq!(
        connect_to_waypoint(&m, "client", client, "10.96.0.20:80"),
        200
    );
    assert_eq!(
        db.total(),
        0,
        "the database saw a request through the waypoint"
    );

    // Istio ignores a binding the Gateway does not admit: that service is
    // reached directly, and its own ztunnel enforces its policy.
    assert!(curl(&m, "client", "http://10.96.0.41/stranger").ends_with(" 200"));
    assert_eq!(stranger.get("/stranger"), 1);

    // The operator can read each refusal: log with the source, access log
    // and metrics with 403 and the no-route flag.
    let log = std::fs::read_to_string(m.dir.join("waypoint.log")).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("destination not bound to this waypoint")
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
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total")
                && l.contains("response_code=\"403\"")
                && l.contains("response_flags=\"NR\"")),
        "{metrics}"
    );
}

const DENY_CLIENT: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cut-client, namespace: app}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/app/sa/client]}}]}]
";

/// One HTTP/1.1 exchange on a kept-alive connection; returns the status.
fn http_get(s: &mut std::net::TcpStream, path: &str) -> std::io::Result<u16> {
    use std::io::{BufRead, BufReader, Read, Write};
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: echo.app.svc.cluster.local\r\n\r\n"
    )?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line: {line:?}")))?;
    let mut len = 0usize;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_change_reaches_live_streams_and_the_next_request() {
    let m = mesh("wlive").await;
    m.http_server("echo", 8080);
    m.echo_server("echo", 9000);
    m.start_waypoint(WP, "waypoint", "waypoint", "app", "waypoint");
    eventually(
        "service through the waypoint",
        Duration::from_secs(20),
        || curl(&m, "client", "http://10.96.0.20/up").ends_with(" 200"),
    )
    .await;
    // Two live L4 streams through the waypoint (port 9000 is declared TCP)
    // and one kept-alive HTTP connection.
    let mut cut = m.connect("client", "10.96.0.20:9000").unwrap();
    let mut kept = m.connect("friend", "10.96.0.20:9000").unwrap();
    let mut web = m.connect("client", "10.96.0.20:80").unwrap();
    for s in [&mut cut, &mut kept] {
        exchange(s, b"before").unwrap();
    }
    assert_eq!(http_get(&mut web, "/first").unwrap(), 200);

    m.write_config(&format!("{MESH}{DENY_CLIENT}"));
    assert!(
        closed_within(&mut cut, Duration::from_secs(5)),
        "the L4 stream the new DENY forbids is still open"
    );
    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i % 253) as u8).collect();
    exchange(&mut kept, &payload).expect("the unrelated stream was disturbed");
    // The next request on the connection opened before the change.
    assert_eq!(http_get(&mut web, "/second").unwrap(), 403);
    let log = std::fs::read_to_string(m.dir.join("waypoint.log")).unwrap_or_default();
    assert!(
        log.contains("live L4 stream closed by a policy change") && log.contains("app/cut-client"),
        "{log}"
    );
    let metrics = m.pod_http("waypoint", 15020, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mesh_connections_revoked_total")
                && l.contains("component=\"waypoint\"")),
        "{metrics}"
    );
}
