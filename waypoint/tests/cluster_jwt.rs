//! RequestAuthentication and a requestPrincipals policy applied through the
//! real kube-apiserver (with istiod, as in cluster.rs): the waypoint watches
//! them and enforces them with keys fetched from a real OIDC provider.

use std::collections::BTreeMap;
use std::time::Duration;

use testbed::*;

mod oidc;

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

const JWT: &str = "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: app}
spec:
  targetRefs: [{group: \"\", kind: Service, name: echo}]
  jwtRules:
  - issuer: https://idp.test
    jwksUri: https://10.244.2.40:8443/oidc/.well-known/jwks.json
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: need-jwt, namespace: app}
spec:
  targetRefs: [{group: \"\", kind: Service, name: echo}]
  action: ALLOW
  rules: [{from: [{source: {requestPrincipals: [\"https://idp.test/*\"]}}]}]
";

fn code(m: &Mesh, url: &str, token: Option<&str>) -> String {
    let auth = token
        .map(|t| format!("-H 'Authorization: Bearer {t}'"))
        .unwrap_or_default();
    let (_, out) = sh_out(&format!(
        "ip netns exec {} curl -s -m 10 {auth} -w '%{{http_code}}' -o /dev/null '{url}'",
        m.pod_ns("client")
    ));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_request_authentication_at_the_waypoint() {
    let mut m = Mesh::new("kjwt", &workspace_bin("ztunnel"));
    m.pod("client", "app", "client", "10.244.1.10", "node1", true);
    m.pod("echo", "app", "echo", "10.244.1.11", "node1", true);
    m.pod("waypoint", "app", "waypoint", "10.244.1.20", "node1", false);
    m.pod("idp", "auth", "idp", oidc::IDP, "node1", false);
    let (_idp, idp_ca) = oidc::start_idp(&m);
    // Bound after the mesh: the control plane stops before the netns go.
    let c = Cluster::start(&m).await;
    c.start_istiod().await;
    c.apply(OBJECTS).await;
    let label = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    for (name, labels) in [
        ("client", label(&[("app", "client")])),
        ("echo", label(&[("app", "echo")])),
    ] {
        c.pod("app", name, name, "node1", Some(&m.ip(name)), &labels)
            .await;
        c.mark_captured("app", name).await;
    }
    let wp_labels = label(&[
        ("gateway.networking.k8s.io/gateway-name", "waypoint"),
        ("istio.io/dataplane-mode", "none"),
    ]);
    let wp_pod = c
        .pod(
            "app",
            "waypoint",
            "waypoint",
            "node1",
            Some("10.244.1.20"),
            &wp_labels,
        )
        .await;
    c.endpoint_slice(
        "app",
        "waypoint",
        &[("mesh", 15008)],
        &[("waypoint", "10.244.1.20")],
    )
    .await;
    c.attach_node(&mut m, "node1", "10.244.250.1").await;
    m.start_node("node1", &m.dir.clone()).await;
    m.http_server("echo", 8080);
    let token = c.pod_token("app", "waypoint", &wp_pod).await;
    m.kubeconfig = Some(c.kubeconfig.clone());
    m.waypoint_args = Some(vec![
        "--from-kube".into(),
        "--ca-address".into(),
        format!("{}:15012", testbed::cluster::CONTROL_IP),
        "--ca-root-cert".into(),
        c.root_cert.display().to_string(),
        "--token-path".into(),
        token.display().to_string(),
        "--jwks-ca-file".into(),
        idp_ca.display().to_string(),
    ]);
    m.start_waypoint(WP, "waypoint", "waypoint", "app", "waypoint");
    oidc::wait_ready(&m).await;

    let url = format!("http://{}/x", c.cluster_ip("app", "echo").await);
    eventually("echo through the waypoint", Duration::from_secs(30), || {
        code(&m, &url, None) == "200"
    })
    .await;

    c.apply(JWT).await;
    let stored = c
        .get(
            "security.istio.io/v1",
            "RequestAuthentication",
            "app",
            "jwt",
        )
        .await;
    assert_eq!(
        stored["spec"]["jwtRules"][0]["issuer"], "https://idp.test",
        "{stored}"
    );
    eventually("the policy needs a token", Duration::from_secs(20), || {
        code(&m, &url, None) == "403"
    })
    .await;
    let valid = oidc::mint(&m, serde_json::json!({"sub": "alice"}));
    assert_eq!(code(&m, &url, Some(&valid)), "200");
    let expired = oidc::mint(
        &m,
        serde_json::json!({"sub": "alice", "exp": 1000, "iat": 900}),
    );
    assert_eq!(code(&m, &url, Some(&expired)), "401");
    let dump = m.pod_config_dump("waypoint");
    assert!(
        dump["request_authentications"]
            .as_array()
            .is_some_and(|l| l.iter().any(|r| r["name"] == "jwt")),
        "{dump}"
    );
    // Deleted through the API: the token is no longer looked at, and the
    // policy, still there, has no principal to match.
    c.delete(
        "security.istio.io/v1",
        "RequestAuthentication",
        "app",
        "jwt",
    )
    .await;
    eventually(
        "without RequestAuthentication no principal",
        Duration::from_secs(20),
        || code(&m, &url, Some(&valid)) == "403",
    )
    .await;
}
