//! CUSTOM AuthorizationPolicies end to end, through ztunnel ⇒ waypoint ⇒
//! ztunnel, against Istio's own sample authorizer
//! (`samples/extauthz/cmd/extauthz`, built by scripts/peers.sh) running as
//! a mesh workload: the waypoint reaches it through its Service over HBONE.
//! The sample allows a request carrying `x-ext-authz: allow` and sets
//! `x-ext-authz-check-result` on its answer either way; it speaks Envoy's
//! HTTP service (8000) and gRPC `Authorization/Check` (9000).

use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;

use testbed::*;

const WP: &str = env!("CARGO_BIN_EXE_waypoint");

const MESH: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio.io/dataplane-mode: ambient}}
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
metadata: {name: ext-authz, namespace: foo, labels: {app: ext-authz}}
spec: {serviceAccountName: ext-authz, nodeName: node1}
status: {podIP: 10.244.1.20}
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
metadata: {name: ext-authz, namespace: foo}
spec:
  clusterIP: 10.96.0.50
  selector: {app: ext-authz}
  ports:
  - {name: http, port: 8000}
  - {name: grpc, port: 9000}
  - {name: http-down, port: 8001}
  - {name: http-slow, port: 8002}
  - {name: grpc-slow, port: 9002}
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
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    extensionProviders:
    - name: http
      envoyExtAuthzHttp:
        service: ext-authz.foo.svc.cluster.local
        port: 8000
        includeRequestHeadersInCheck: [x-ext-authz]
        headersToUpstreamOnAllow: [x-ext-authz-check-result]
        headersToDownstreamOnDeny: [x-ext-authz-check-result]
    - name: grpc
      envoyExtAuthzGrpc: {service: foo/ext-authz.foo.svc.cluster.local, port: 9000}
    - name: down
      envoyExtAuthzHttp: {service: ext-authz.foo.svc.cluster.local, port: 8001, statusOnError: "503"}
    - name: down-open
      envoyExtAuthzGrpc: {service: ext-authz.foo.svc.cluster.local, port: 8001, failOpen: true}
    - name: slow
      envoyExtAuthzHttp: {service: ext-authz.foo.svc.cluster.local, port: 8002, timeout: 0.5s}
    - name: slow-grpc
      envoyExtAuthzGrpc: {service: ext-authz.foo.svc.cluster.local, port: 9002, timeout: 0.5s}
    - name: http-body
      envoyExtAuthzHttp:
        service: ext-authz.foo.svc.cluster.local
        port: 8000
        includeRequestHeadersInCheck: [x-ext-authz]
        includeRequestBodyInCheck: {maxRequestBytes: 8, allowPartialMessage: true}
    - name: grpc-body
      envoyExtAuthzGrpc:
        service: ext-authz.foo.svc.cluster.local
        port: 9000
        includeRequestBodyInCheck: {maxRequestBytes: 1000}
    - name: body-strict
      envoyExtAuthzHttp:
        service: ext-authz.foo.svc.cluster.local
        port: 8000
        includeRequestBodyInCheck: {maxRequestBytes: 4}
    - name: nowhere
      envoyExtAuthzHttp: {service: nowhere.foo.svc.cluster.local, port: 8000, failOpen: true}
    - name: wrong-namespace
      envoyExtAuthzHttp: {service: bar/ext-authz.foo.svc.cluster.local, port: 8000}
    - name: tracer
      zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
"#;

fn custom(provider: &str, path: &str) -> String {
    format!("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ext-{provider}, namespace: app}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  action: CUSTOM\n  provider: {{name: {provider}}}\n  rules: [{{to: [{{operation: {{paths: [\"{path}\"]}}}}]}}]\n")
}

/// Every provider on its own paths, and a DENY to show CUSTOM goes first.
fn policies() -> String {
    let mut s: String = [
        ("http", "/http/*"),
        ("grpc", "/grpc/*"),
        ("down", "/down"),
        ("down-open", "/down-open"),
        ("slow", "/slow"),
        ("slow-grpc", "/slow-grpc"),
        ("http-body", "/body-http"),
        ("grpc-body", "/body-grpc"),
        ("body-strict", "/body-strict"),
        ("nowhere", "/nowhere"),
        ("wrong-namespace", "/wrong-namespace"),
        ("tracer", "/tracer"),
        ("missing", "/missing"),
    ]
    .iter()
    .map(|(p, path)| custom(p, path))
    .collect();
    s.push_str("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-forbidden, namespace: app}\nspec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/http/forbidden\", \"/grpc/forbidden\"]}}]}]\n");
    s
}

/// One answer as the client saw it.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

fn get(m: &Mesh, path: &str, allow: bool) -> Answer {
    request(m, path, allow, None)
}

fn request(m: &Mesh, path: &str, allow: bool, data: Option<&str>) -> Answer {
    let header = if allow { "-H 'x-ext-authz: allow'" } else { "" };
    let data = data
        .map(|d| format!("--data-binary {d}"))
        .unwrap_or_default();
    let (_, out) = sh_out(&format!(
        "ip netns exec {} curl -s -m 10 -i {header} {data} http://10.96.0.20{path}",
        m.pod_ns("client")
    ));
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Answer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// An HTTP/1.1 server answering 200 with the request head and body it
/// got as the body: what reached the upstream.
fn head_echo(m: &Mesh, pod: &str, port: u16) {
    m.serve(pod, port, |s, _| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        loop {
            let mut head = String::new();
            let mut len = 0;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                if line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                head.push_str(&line);
            }
            let mut body = vec![0u8; len];
            if r.read_exact(&mut body).is_err() {
                return;
            }
            head.push_str(&format!("body: {}", String::from_utf8_lossy(&body)));
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{head}",
                head.len()
            );
            if w.write_all(resp.as_bytes()).is_err() {
                return;
            }
        }
    });
}

const DENY_BODY: &str =
    "denied by ext_authz for not found header `x-ext-authz: allow` in the request";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_policies_ask_istios_sample_authorizer() {
    let mut m = Mesh::new("xauthz", &workspace_bin("ztunnel"));
    m.pod("client", "app", "client", "10.244.1.10", "node1", true);
    m.pod("echo", "app", "echo", "10.244.1.11", "node1", true);
    m.pod(
        "ext-authz",
        "foo",
        "ext-authz",
        "10.244.1.20",
        "node1",
        true,
    );
    m.pod("waypoint", "app", "waypoint", "10.244.2.20", "node2", false);
    m.write_config(&format!("{MESH}{}", policies()));
    let ca = m.dir.join("ca");
    m.start_node("node1", &ca).await;
    m.start_node("node2", &ca).await;
    head_echo(&m, "echo", 8080);
    m.start_peer(
        "ext-authz",
        "extauthz",
        &["-http", "8000", "-grpc", "9000"],
        &[8000, 9000],
    );
    // Accept and never answer: a slow authorizer.
    m.silent_server("ext-authz", 8002);
    m.silent_server("ext-authz", 9002);
    m.start_waypoint(WP, "waypoint", "waypoint", "app", "waypoint");
    eventually(
        "the echo service through the waypoint",
        Duration::from_secs(20),
        || get(&m, "/public", false).status == 200,
    )
    .await;

    for api in ["http", "grpc"] {
        // Allowed: the request reaches the server with the authorizer's
        // header (the HTTP provider lists it in headersToUpstreamOnAllow;
        // gRPC's OK response carries it).
        let a = get(&m, &format!("/{api}/items"), true);
        assert_eq!(a.status, 200, "{api}: {}\n{}", a.head, a.body);
        assert!(
            a.body
                .to_ascii_lowercase()
                .contains("x-ext-authz-check-result: allowed"),
            "{api}: the upstream did not get the authorizer's header:\n{}",
            a.body
        );
        // Denied: the authorizer's status, body and headers reach the
        // client, and nothing reaches the server.
        let a = get(&m, &format!("/{api}/items"), false);
        assert_eq!(a.status, 403, "{api}: {}", a.head);
        assert_eq!(a.body, DENY_BODY, "{api}");
        assert_eq!(
            a.header("x-ext-authz-check-result").as_deref(),
            Some("denied"),
            "{api}: {}",
            a.head
        );
        // CUSTOM decides before DENY: without the header it is the
        // authorizer's denial; allowed by it, the DENY policy still denies.
        let a = get(&m, &format!("/{api}/forbidden"), false);
        assert_eq!((a.status, a.body.as_str()), (403, DENY_BODY), "{api}");
        let a = get(&m, &format!("/{api}/forbidden"), true);
        assert_eq!(
            (a.status, a.body.as_str()),
            (403, "RBAC: access denied"),
            "{api}"
        );
    }
    // headersToDownstreamOnDeny lists one header: the sample's others stay
    // with the waypoint.
    let a = get(&m, "/http/items", false);
    assert_eq!(a.header("x-ext-authz-check-received"), None, "{}", a.head);

    // The authorizer down: statusOnError, or through with failOpen.
    assert_eq!(get(&m, "/down", true).status, 503);
    let a = get(&m, "/down-open", false);
    assert_eq!(a.status, 200, "{}", a.head);
    // Slow: the timeout answers 403 (the default statusOnError).
    for path in ["/slow", "/slow-grpc"] {
        let a = get(&m, path, true);
        assert_eq!((a.status, a.body.as_str()), (403, ""), "{path}: {}", a.head);
    }
    // The body in the check: its first maxRequestBytes when partial
    // bodies are allowed (HTTP), all of it (gRPC), 413 over the limit
    // otherwise; the upstream gets all of it either way.
    let data = "0123456789abcdef";
    for path in ["/body-http", "/body-grpc"] {
        let a = request(&m, path, true, Some(data));
        assert_eq!(a.status, 200, "{path}: {}", a.head);
        assert!(
            a.body.ends_with(&format!("body: {data}")),
            "{path}: {}",
            a.body
        );
    }
    assert_eq!(request(&m, "/body-strict", true, Some(data)).status, 413);
    let authz_log = std::fs::read_to_string(m.dir.join("extauthz.err")).unwrap_or_default();
    assert!(authz_log.contains("body: [01234567]"), "{authz_log}");
    assert!(
        authz_log.contains(&format!("body:\"{data}\"")),
        "{authz_log}"
    );

    // A provider that is not an authorizer, none by that name, or whose
    // service the mesh does not have (failOpen or not): denied.
    for path in ["/tracer", "/missing", "/nowhere", "/wrong-namespace"] {
        let a = get(&m, path, true);
        assert_eq!(
            (a.status, a.body.as_str()),
            (403, "RBAC: access denied"),
            "{path}"
        );
    }

    // Both are named in the dump, at the field that names the provider.
    let dump = m.pod_config_dump("waypoint");
    for policy in ["ext-tracer", "ext-missing"] {
        assert!(
            dump["rejected"].as_array().is_some_and(|r| r
                .iter()
                .any(|r| r["name"] == policy && r["field"] == "spec.provider.name")),
            "{policy}: {}",
            dump["rejected"]
        );
    }

    // The operator can tell an external denial from an RBAC one: UAEX in
    // the access log and the metrics.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let access = std::fs::read_to_string(m.dir.join("waypoint-access.log")).unwrap_or_default();
    let lines: Vec<serde_json::Value> = access
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let flag = |path: &str, code: u16| {
        lines
            .iter()
            .filter(|l| l["path"] == path && l["response_code"] == code)
            .map(|l| l["response_flags"].as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };
    assert!(
        flag("/http/items", 403).iter().all(|f| f == "UAEX"),
        "{access}"
    );
    assert!(!flag("/http/items", 403).is_empty(), "{access}");
    assert!(flag("/slow", 403) == ["UAEX"], "{access}");
    assert!(flag("/down", 503) == ["UAEX"], "{access}");
    assert!(
        flag("/http/forbidden", 403).contains(&"-".to_string()),
        "{access}"
    );
    let metrics = m.pod_http("waypoint", 15020, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total")
                && l.contains("response_code=\"403\"")
                && l.contains("response_flags=\"UAEX\"")),
        "{metrics}"
    );
    let authz_log = std::fs::read_to_string(m.dir.join("extauthz.err")).unwrap_or_default();
    assert!(
        authz_log.contains("[gRPCv3][allowed]") && authz_log.contains("[HTTP][denied]"),
        "{authz_log}"
    );
}
