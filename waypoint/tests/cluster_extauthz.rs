//! CUSTOM authorization with the cluster as the source: the `istio`
//! ConfigMap (meshConfig's extension providers) and a CUSTOM
//! AuthorizationPolicy applied through the real kube-apiserver reach our
//! waypoint (`--from-kube`), which asks Istio's sample authorizer, a
//! captured pod of the cluster; a change of the ConfigMap is followed.

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
metadata: {name: ext-authz, namespace: app}
spec: {selector: {app: ext-authz}, ports: [{name: http, port: 8000}]}
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

fn mesh_config(provider: &str) -> String {
    format!(
        "apiVersion: v1
kind: ConfigMap
metadata: {{name: istio, namespace: istio-system}}
data:
  mesh: |
    extensionProviders:
    - name: {provider}
      envoyExtAuthzHttp:
        service: ext-authz.app.svc.cluster.local
        port: 8000
        includeRequestHeadersInCheck: [x-ext-authz]
"
    )
}

const POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ask-sample, namespace: app}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: CUSTOM
  provider: {name: sample}
  rules: [{to: [{operation: {paths: [/guarded/*]}}]}]
";

/// The status and the authorizer's verdict header, as the client saw them.
fn get(m: &Mesh, url: &str, allow: bool) -> (String, bool) {
    let header = if allow { "-H 'x-ext-authz: allow'" } else { "" };
    let (_, out) = sh_out(&format!(
        "ip netns exec {} curl -s -m 10 -i {header} {url}",
        m.pod_ns("client")
    ));
    let status = out.split_whitespace().nth(1).unwrap_or("").to_string();
    let denied_by_sample = out
        .to_ascii_lowercase()
        .contains("x-ext-authz-check-result: denied");
    (status, denied_by_sample)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_policy_and_mesh_config_from_the_api() {
    let mut m = Mesh::new("kxauthz", &workspace_bin("ztunnel"));
    for (pod, ip, captured) in [
        ("client", "10.244.1.10", true),
        ("echo", "10.244.1.11", true),
        ("ext-authz", "10.244.1.13", true),
        ("waypoint", "10.244.1.20", false),
    ] {
        m.pod(pod, "app", pod, ip, "node1", captured);
    }
    // Bound after the mesh so the control plane stops before the netns go.
    let c = Cluster::start(&m).await;
    c.start_istiod().await;
    c.apply(OBJECTS).await;
    let mut waypoint_pod = None;
    for (name, labels) in [
        ("client", vec![("app", "client")]),
        ("echo", vec![("app", "echo")]),
        ("ext-authz", vec![("app", "ext-authz")]),
        (
            "waypoint",
            vec![
                ("gateway.networking.k8s.io/gateway-name", "waypoint"),
                ("istio.io/dataplane-mode", "none"),
            ],
        ),
    ] {
        let labels: BTreeMap<String, String> = labels
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let p = c
            .pod("app", name, name, "node1", Some(&m.ip(name)), &labels)
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
    let echo = m.http_server("echo", 8080);
    m.start_peer(
        "ext-authz",
        "extauthz",
        &["-http", "8000", "-grpc", "9000"],
        &[8000],
    );
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
    let vip = c.cluster_ip("app", "echo").await;
    let url = format!("http://{vip}/guarded/x");
    eventually("echo through the waypoint", Duration::from_secs(30), || {
        get(&m, &url, false).0 == "200"
    })
    .await;

    // meshConfig and the policy through the API: the sample decides.
    c.apply(&mesh_config("sample")).await;
    c.apply(POLICY).await;
    eventually(
        "the sample authorizer denies",
        Duration::from_secs(20),
        || get(&m, &url, false) == ("403".into(), true),
    )
    .await;
    let before = echo.total();
    assert_eq!(get(&m, &url, true), ("200".into(), false));
    assert_eq!(echo.total(), before + 1);

    // The provider renamed in the ConfigMap: the policy names none, and
    // denies even what the sample would allow.
    c.apply(&mesh_config("renamed")).await;
    eventually(
        "an unknown provider denies",
        Duration::from_secs(20),
        || get(&m, &url, true) == ("403".into(), false),
    )
    .await;
    let dump = m.pod_config_dump("waypoint");
    assert!(
        dump.to_string().contains("renamed"),
        "the waypoint's dump does not show the providers: {dump}"
    );
}
