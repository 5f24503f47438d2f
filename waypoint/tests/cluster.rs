//! Our waypoint as a manual deployment in a cluster run by the real
//! kube-apiserver and istiod (scripts/peers.sh): a Gateway of class
//! istio-waypoint whose spec.addresses names our waypoint Service. istiod
//! advertises it to ztunnel; the waypoint reads routes and policies through
//! the API and gets its certificate from istiod's CA.

use std::collections::BTreeMap;
use std::time::Duration;

use testbed::*;

const WP: &str = env!("CARGO_BIN_EXE_waypoint");

const OBJECTS: &str = "apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: app}
spec: {selector: {app: echo}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v1, namespace: app}
spec: {selector: {app: echo, version: v1}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: app}
spec: {selector: {app: echo, version: v2}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: app, labels: {istio.io/use-waypoint: none}}
spec: {selector: {gateway.networking.k8s.io/gateway-name: waypoint}, ports: [{name: mesh, port: 15008, protocol: TCP}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: app, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  addresses: [{type: Hostname, value: waypoint.app.svc.cluster.local}]
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
";

fn split(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: echo-split, namespace: app}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: echo, port: 80}}]
  rules:
  - backendRefs:
    - {{name: echo-v1, port: 80, weight: {v1}}}
    - {{name: echo-v2, port: 80, weight: {v2}}}
"
    )
}

const L7_POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-get-public, namespace: app}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/app/sa/client]}}]
    to: [{operation: {methods: [GET], paths: [/public/*]}}]
";

fn codes(m: &Mesh, url: &str, n: usize) -> Vec<String> {
    let (_, out) = sh_out(&format!(
        "ip netns exec {} curl -s -m 10 -w '%{{http_code}}\\n' -o /dev/null '{url}?i=[1-{n}]'",
        m.pod_ns("client")
    ));
    out.lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_waypoint_applies_api_routes_and_policy() {
    let mut m = Mesh::new("kwp", &workspace_bin("ztunnel"));
    m.pod("client", "app", "client", "10.244.1.10", "node1", true);
    m.pod("echo-v1", "app", "echo", "10.244.1.11", "node1", true);
    m.pod("echo-v2", "app", "echo", "10.244.1.12", "node1", true);
    m.pod("waypoint", "app", "waypoint", "10.244.1.20", "node1", false);
    let c = Cluster::start(&m).await;
    c.start_istiod().await;
    c.apply(OBJECTS).await;
    let pods = [
        ("client", "client", vec![("app", "client")]),
        ("echo-v1", "echo", vec![("app", "echo"), ("version", "v1")]),
        ("echo-v2", "echo", vec![("app", "echo"), ("version", "v2")]),
        (
            "waypoint",
            "waypoint",
            vec![
                ("gateway.networking.k8s.io/gateway-name", "waypoint"),
                ("istio.io/dataplane-mode", "none"),
            ],
        ),
    ];
    let mut waypoint_pod = None;
    for (name, sa, labels) in pods {
        let labels: BTreeMap<String, String> = labels
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let p = c
            .pod("app", name, sa, "node1", Some(&m.ip(name)), &labels)
            .await;
        if name == "waypoint" {
            waypoint_pod = Some(p);
        } else {
            c.mark_captured("app", name).await;
        }
    }
    c.endpoint_slice(
        "app",
        "waypoint",
        &[("mesh", 15008)],
        &[("waypoint", "10.244.1.20")],
    )
    .await;
    let vip = c.cluster_ip("app", "echo").await;

    c.attach_node(&mut m, "node1", "10.244.250.1").await;
    m.start_node("node1", &m.dir.clone()).await;
    let v1 = m.http_server("echo-v1", 8080);
    let v2 = m.http_server("echo-v2", 8080);

    let token = c
        .pod_token("app", "waypoint", waypoint_pod.as_ref().unwrap())
        .await;
    m.kubeconfig = Some(c.kubeconfig.clone());
    m.waypoint_args = Some(vec![
        "--from-kube".into(),
        "--kube-render".into(),
        m.dir.join("waypoint-view.yaml").display().to_string(),
        "--ca-address".into(),
        format!("{}:15012", testbed::cluster::CONTROL_IP),
        "--ca-root-cert".into(),
        c.root_cert.display().to_string(),
        "--token-path".into(),
        token.display().to_string(),
    ]);
    m.start_waypoint(WP, "waypoint", "waypoint", "app", "waypoint");

    // Before any route: the Service's endpoints, through the waypoint.
    let url = format!("http://{vip}/public/x");
    eventually(
        "client reaches echo through the waypoint",
        Duration::from_secs(30),
        || codes(&m, &url, 1) == ["200"],
    )
    .await;
    // The waypoint flushes its access log every 100 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let wp_log = std::fs::read_to_string(m.dir.join("waypoint-access.log")).unwrap_or_default();
    if !wp_log.contains("/public/x") {
        let gw = c
            .get("gateway.networking.k8s.io/v1", "Gateway", "app", "waypoint")
            .await;
        panic!(
            "the request did not cross the waypoint:\n{wp_log}\nGateway: {gw}\nztunnel services: {}",
            m.config_dump("node1")["mesh"]["services"]
        );
    }

    // An HTTPRoute applied through the API splits the traffic.
    c.apply(&split(0, 1)).await;
    eventually("route sends all to v2", Duration::from_secs(20), || {
        let before = v1.total();
        codes(&m, &url, 5).iter().all(|c| c == "200") && v1.total() == before
    })
    .await;
    c.apply(&split(1, 1)).await;
    let (b1, b2) = (v1.total(), v2.total());
    eventually(
        "route splits between v1 and v2",
        Duration::from_secs(20),
        || codes(&m, &url, 10).iter().all(|c| c == "200") && v1.total() > b1 && v2.total() > b2,
    )
    .await;

    // An L7 policy applied through the API is enforced at the waypoint.
    c.apply(L7_POLICY).await;
    let denied = format!("http://{vip}/private");
    eventually("L7 policy denies a path", Duration::from_secs(20), || {
        codes(&m, &denied, 1) == ["403"]
    })
    .await;
    assert_eq!(codes(&m, &url, 3), ["200", "200", "200"]);
    let (_, post) = sh_out(&format!(
        "ip netns exec {} curl -s -m 10 -X POST -w '%{{http_code}}' -o /dev/null {url}",
        m.pod_ns("client")
    ));
    assert_eq!(post, "403", "POST is not allowed by the policy");

    let view = std::fs::read_to_string(m.dir.join("waypoint-view.yaml")).unwrap();
    assert!(
        view.contains("kind: HTTPRoute") && view.contains("kind: AuthorizationPolicy"),
        "{view}"
    );
}
