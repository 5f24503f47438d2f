//! Our waypoint as a manual deployment in a cluster run by the real
//! kube-apiserver and istiod (scripts/peers.sh): a Gateway of class
//! istio-waypoint whose spec.addresses names our waypoint Service. istiod
//! advertises it to ztunnel; the waypoint reads routes and policies through
//! the API and gets its certificate from istiod's CA.

use std::collections::BTreeMap;
use std::sync::Arc;
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

/// The cluster both tests run in, with our waypoint serving it.
struct Setup {
    m: Mesh,
    c: Cluster,
    v1: Arc<Hits>,
    v2: Arc<Hits>,
}

/// client, echo-v1 and echo-v2 (Services echo, echo-v1, echo-v2, all through
/// the waypoint by the namespace label) captured on node1, HTTP servers on
/// the echo pods, and our waypoint reading the API (`--from-kube`) with its
/// certificate from istiod; returns once the waypoint is ready.
async fn manual_waypoint(tag: &str) -> Setup {
    let mut m = Mesh::new(tag, &workspace_bin("ztunnel"));
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
        "--ca-address".into(),
        format!("{}:15012", testbed::cluster::CONTROL_IP),
        "--ca-root-cert".into(),
        c.root_cert.display().to_string(),
        "--token-path".into(),
        token.display().to_string(),
    ]);
    m.start_waypoint(WP, "waypoint", "waypoint", "app", "waypoint");
    Setup { m, c, v1, v2 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_waypoint_applies_api_routes_and_policy() {
    // Bound in this order so the control plane stops before the netns go.
    let Setup { m, c, v1, v2 } = manual_waypoint("kwp").await;
    let vip = c.cluster_ip("app", "echo").await;

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

    // What the waypoint holds is in its dump (no file is rendered).
    let dump = m.pod_config_dump("waypoint");
    let named = |list: &str, name: &str| {
        dump[list].as_array().is_some_and(|l| {
            l.iter()
                .any(|x| x["name"] == name || x["policy"]["name"] == name)
        })
    };
    assert!(
        named("routes", "echo-split") && named("policies", "only-get-public"),
        "{dump}"
    );

    watches_only_the_pods_it_serves(&m, &c).await;
}

fn held(m: &Mesh) -> Vec<String> {
    let dump = m.pod_config_dump("waypoint");
    serde_json::from_value(dump["workloads"].clone()).unwrap_or_else(|e| panic!("{e}: {dump}"))
}

/// The waypoint knows the pods of what it serves: a pod of an unrelated
/// namespace is not held until that namespace is bound to it, and leaves
/// when the binding does; a pod bound by its own label is held wherever it
/// is.
async fn watches_only_the_pods_it_serves(m: &Mesh, c: &Cluster) {
    let none = BTreeMap::new();
    c.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n")
        .await;
    c.pod(
        "other",
        "stranger",
        "default",
        "node2",
        Some("10.244.2.50"),
        &none,
    )
    .await;
    // A pod created after it, in a namespace it serves: once this one is
    // held, a cluster-wide pod watch would have delivered the stranger.
    c.pod(
        "app",
        "later",
        "default",
        "node2",
        Some("10.244.2.51"),
        &none,
    )
    .await;
    eventually(
        "the waypoint holds a new pod of its namespace",
        Duration::from_secs(20),
        || held(m).contains(&"app/later".to_string()),
    )
    .await;
    assert!(
        !held(m).contains(&"other/stranger".to_string()),
        "{:?}",
        held(m)
    );

    let bind: BTreeMap<String, String> = [
        ("istio.io/use-waypoint", "waypoint"),
        ("istio.io/use-waypoint-namespace", "app"),
    ]
    .into_iter()
    .map(|(k, v)| (k.into(), v.into()))
    .collect();
    c.pod(
        "other",
        "self-bound",
        "default",
        "node2",
        Some("10.244.2.52"),
        &bind,
    )
    .await;
    eventually(
        "a pod bound by its own label is held",
        Duration::from_secs(20),
        || held(m).contains(&"other/self-bound".to_string()),
    )
    .await;

    let labelled = "apiVersion: v1\nkind: Namespace\nmetadata: {name: other, labels: {istio.io/use-waypoint: waypoint, istio.io/use-waypoint-namespace: app}}\n";
    c.apply(labelled).await;
    eventually(
        "a namespace bound to it has its pods held",
        Duration::from_secs(20),
        || held(m).contains(&"other/stranger".to_string()),
    )
    .await;
    c.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n")
        .await;
    eventually(
        "unbound, the namespace's pods leave",
        Duration::from_secs(20),
        || {
            let h = held(m);
            !h.contains(&"other/stranger".to_string())
                && h.contains(&"other/self-bound".to_string())
        },
    )
    .await;
}

// Policies istiod accepts but we cannot evaluate (external authorization)
// must fail closed at the waypoint and be reported: dropping one would allow
// what it was written to deny. JWT principals and claims are evaluated; a
// request without a token has none (cluster_jwt.rs has tokens).

const CUSTOM_POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz-admin, namespace: app}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: CUSTOM
  provider: {name: ext-authz}
  rules:
  - to: [{operation: {paths: [\"/admin*\"]}}]
";

const NO_JWT_DENY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-without-jwt, namespace: app}
spec:
  targetRefs: [{group: \"\", kind: Service, name: echo-v2}]
  action: DENY
  rules:
  - from: [{source: {notRequestPrincipals: [\"*\"]}}]
";

const CLAIMS_ALLOW: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: admins-only, namespace: app}
spec:
  targetRefs: [{group: \"\", kind: Service, name: echo-v1}]
  action: ALLOW
  rules:
  - when: [{key: \"request.auth.claims[groups]\", values: [admin]}]
";

/// The fields the waypoint's config dump reports as not evaluable for
/// AuthorizationPolicy app/`name`.
fn rejected_fields(m: &Mesh, name: &str) -> Vec<String> {
    let dump = m.pod_config_dump("waypoint");
    let rejected = dump["rejected"]
        .as_array()
        .unwrap_or_else(|| panic!("config dump has no rejected list: {dump}"));
    rejected
        .iter()
        .filter(|r| {
            r["kind"] == "AuthorizationPolicy" && r["namespace"] == "app" && r["name"] == name
        })
        .filter_map(|r| r["field"].as_str().map(str::to_string))
        .collect()
}

/// The waypoint's metrics text and its count of AuthorizationPolicy findings
/// (`mesh_config_rejected_objects_total`), None while the series is absent.
fn rejected_policies_counted(m: &Mesh) -> (String, Option<f64>) {
    let text = m.pod_http("waypoint", 15020, "/metrics");
    let n = text
        .lines()
        .filter(|l| {
            l.starts_with("mesh_config_rejected_objects_total{")
                && l.contains("kind=\"AuthorizationPolicy\"")
        })
        .find_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    (text, n)
}

/// Waits for the counter to reach `want` (it is bumped just after the new
/// state is swapped in), then checks it did not count a finding twice.
async fn assert_rejected_counted(m: &Mesh, want: f64) {
    eventually(
        "mesh_config_rejected_objects_total counts the findings",
        Duration::from_secs(5),
        || rejected_policies_counted(m).1 >= Some(want),
    )
    .await;
    let (text, n) = rejected_policies_counted(m);
    assert_eq!(n, Some(want), "each finding is counted once:\n{text}");
}

/// AuthorizationPolicy app/`name` as the API server stored it: the CRD
/// schema prunes fields it does not know, so this shows what Istio accepted.
async fn policy(c: &Cluster, name: &str) -> serde_json::Value {
    c.get("security.istio.io/v1", "AuthorizationPolicy", "app", name)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unevaluable_api_policies_fail_closed_at_the_waypoint() {
    let Setup { m, c, v1, v2 } = manual_waypoint("kfc").await;
    let (echo, echo_v1, echo_v2) = (
        c.cluster_ip("app", "echo").await,
        c.cluster_ip("app", "echo-v1").await,
        c.cluster_ip("app", "echo-v2").await,
    );
    let public = format!("http://{echo}/public/x");
    let admin = format!("http://{echo}/admin/x");
    let to_v1 = format!("http://{echo_v1}/x");
    let to_v2 = format!("http://{echo_v2}/x");

    // Everything answers before any policy, so each 403 below is the policy's.
    eventually(
        "client reaches every service through the waypoint",
        Duration::from_secs(30),
        || {
            [&public, &admin, &to_v1, &to_v2]
                .iter()
                .all(|u| codes(&m, u, 1) == ["200"])
        },
    )
    .await;
    assert_eq!(rejected_policies_counted(&m).1, None);

    // CUSTOM naming a provider meshConfig does not define: its rules deny.
    c.apply(CUSTOM_POLICY).await;
    let stored = policy(&c, "ext-authz-admin").await;
    assert_eq!(
        (
            stored["spec"]["action"].as_str(),
            stored["spec"]["provider"]["name"].as_str()
        ),
        (Some("CUSTOM"), Some("ext-authz")),
        "the API server keeps the policy as written: {stored}"
    );
    eventually(
        "the CUSTOM policy denies /admin*",
        Duration::from_secs(20),
        || codes(&m, &admin, 1) == ["403"],
    )
    .await;
    let served = v1.total() + v2.total();
    assert_eq!(codes(&m, &admin, 3), ["403"; 3]);
    assert_eq!(
        v1.total() + v2.total(),
        served,
        "a denied request reached a backend"
    );
    assert_eq!(codes(&m, &public, 3), ["200"; 3]);

    // A request without a token has no request principal: the DENY on
    // notRequestPrincipals denies every request to echo-v2, as in Istio.
    c.apply(NO_JWT_DENY).await;
    let stored = policy(&c, "deny-without-jwt").await;
    assert_eq!(
        stored["spec"]["rules"][0]["from"][0]["source"]["notRequestPrincipals"],
        serde_json::json!(["*"]),
        "the API server keeps the policy as written: {stored}"
    );
    eventually(
        "the DENY without JWT denies echo-v2",
        Duration::from_secs(20),
        || codes(&m, &to_v2, 1) == ["403"],
    )
    .await;
    let served = v2.total();
    assert_eq!(codes(&m, &to_v2, 3), ["403"; 3]);
    assert_eq!(v2.total(), served, "a denied request reached echo-v2");
    assert_eq!(codes(&m, &to_v1, 3), ["200"; 3]);
    // A Service-targeted policy covers requests addressed to that Service,
    // not other Services sharing its pods.
    assert_eq!(codes(&m, &public, 3), ["200"; 3]);

    // The CUSTOM one (its provider is not in meshConfig) is named in the
    // config dump and counted, once; the JWT one is evaluated, not reported.
    assert_eq!(
        rejected_fields(&m, "ext-authz-admin"),
        ["spec.provider.name"]
    );
    assert!(rejected_fields(&m, "deny-without-jwt").is_empty());
    assert_rejected_counted(&m, 1.0).await;

    // An ALLOW on a JWT claim: without a token there are no claims, so
    // echo-v1 is locked down, not opened.
    c.apply(CLAIMS_ALLOW).await;
    let stored = policy(&c, "admins-only").await;
    assert_eq!(
        stored["spec"]["rules"][0]["when"][0]["key"].as_str(),
        Some("request.auth.claims[groups]"),
        "the API server keeps the policy as written: {stored}"
    );
    eventually(
        "the ALLOW on JWT claims allows no request without a token at echo-v1",
        Duration::from_secs(20),
        || codes(&m, &to_v1, 1) == ["403"],
    )
    .await;
    assert_eq!(codes(&m, &public, 3), ["200"; 3]);
    assert!(rejected_fields(&m, "admins-only").is_empty());
    assert_rejected_counted(&m, 1.0).await;
}
