//! The waypoint end to end: pods as network namespaces, real ztunnels, our
//! waypoint in its own pod, curl as the client, Envoy as one of the backends.

use std::collections::BTreeMap;
use std::time::Duration;

use testbed::*;

mod common;
use common::{access_log, dashboards};

const WP: &str = env!("CARGO_BIN_EXE_waypoint");

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
metadata: {name: echo-v1, namespace: app, labels: {app: echo, version: v1}}
spec: {serviceAccountName: echo, nodeName: node1}
status: {podIP: 10.244.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-v2, namespace: app, labels: {app: echo, version: v2}}
spec: {serviceAccountName: echo, nodeName: node2}
status: {podIP: 10.244.2.11}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
spec: {serviceAccountName: waypoint, nodeName: node2}
status: {podIP: 10.244.2.20}
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: app, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: node2}
status: {podIP: 10.244.3.10}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: app}
spec: {clusterIP: 10.96.0.20, selector: {app: echo}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v1, namespace: app}
spec: {clusterIP: 10.96.0.21, selector: {app: echo, version: v1}, ports: [{name: http, port: 80, targetPort: 8080}, {name: tcp, port: 9000, targetPort: 9000}, {port: 9001, targetPort: 9001}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: app}
spec: {clusterIP: 10.96.0.22, selector: {app: echo, version: v2}, ports: [{name: http2, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: app, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.96.0.30, selector: {gateway.networking.k8s.io/gateway-name: waypoint}, ports: [{name: mesh, port: 15008}]}
";

fn gateway(for_traffic: &str) -> String {
    format!(
        "---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: app, labels: {{istio.io/waypoint-for: {for_traffic}}}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
"
    )
}

/// echo-v2 is Envoy: 500 on /unstable, else 200 "echo-v2". Its `echo-v2`
/// Service port is named http2, so the waypoint speaks HTTP/2 to it.
const ENVOY_ECHO: &str = r#"
static_resources:
  listeners:
  - address: {socket_address: {address: 0.0.0.0, port_value: 8080}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: echo
          http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /unstable}
                direct_response: {status: 500, body: {inline_string: "echo-v2\n"}}
              - match: {prefix: /}
                direct_response: {status: 200, body: {inline_string: "echo-v2\n"}}
"#;

struct Cluster {
    m: Mesh,
    v1: std::sync::Arc<Hits>,
}

async fn cluster(tag: &str, extra: &str, for_traffic: &str) -> Cluster {
    cluster_with(tag, extra, for_traffic, &[]).await.0
}

/// `cluster` with extra waypoint flags; also returns the waypoint's pid.
async fn cluster_with(
    tag: &str,
    extra: &str,
    for_traffic: &str,
    wp_args: &[&str],
) -> (Cluster, u32) {
    let mut m = Mesh::new(tag, &workspace_bin("ztunnel"));
    m.pod("client", "app", "client", "10.244.1.10", "node1", true);
    m.pod("echo-v1", "app", "echo", "10.244.1.11", "node1", true);
    m.pod("echo-v2", "app", "echo", "10.244.2.11", "node2", true);
    m.pod("waypoint", "app", "waypoint", "10.244.2.20", "node2", false);
    m.pod("outsider", "app", "default", "10.244.3.10", "node2", false);
    m.write_config(&format!("{BASE}{}{extra}", gateway(for_traffic)));
    let ca = m.dir.join("ca");
    m.start_node("node1", &ca).await;
    m.start_node("node2", &ca).await;
    let v1 = m.http_server("echo-v1", 8080);
    m.start_envoy("echo-v2", ENVOY_ECHO, "echo-v2", 8080);
    let pid = m.start_waypoint_with(WP, "waypoint", "waypoint", "app", "waypoint", wp_args);
    (Cluster { m, v1 }, pid)
}

/// curl from inside `pod`; returns stdout.
fn curl(m: &Mesh, pod: &str, args: &str) -> String {
    let (_, out) = sh_out(&format!(
        "ip netns exec {} curl -s -m 10 {args}",
        m.pod_ns(pod)
    ));
    out
}

/// `n` GETs of `url` on one keep-alive connection; "<code> <body>" per line.
fn codes(m: &Mesh, url: &str, n: usize, extra: &str) -> Vec<String> {
    let out = curl(
        m,
        "client",
        &format!("{extra} -w '%{{http_code}}\\n' -o /dev/null '{url}?i=[1-{n}]'"),
    );
    out.lines().map(str::to_string).collect()
}

fn bodies(m: &Mesh, url: &str, n: usize, extra: &str) -> BTreeMap<String, usize> {
    let out = curl(m, "client", &format!("{extra} '{url}?i=[1-{n}]'"));
    let mut c = BTreeMap::new();
    for l in out.lines() {
        *c.entry(l.to_string()).or_default() += 1;
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_split_and_header_match_through_the_waypoint() {
    let route = "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: app}
spec:
  parentRefs: [{group: \"\", kind: Service, name: echo}]
  rules:
  - matches: [{headers: [{name: x-canary, value: \"true\"}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - backendRefs: [{name: echo-v1, port: 80, weight: 90}, {name: echo-v2, port: 80, weight: 10}]
";
    let c = cluster("wsp", route, "service").await;
    let m = &c.m;

    // 90/10 over 400 requests: v2 expected 40, sd 6; accept 4 sd either way.
    let spread = bodies(m, "http://10.96.0.20/split", 400, "");
    let (v1, v2) = (
        spread.get("echo-v1").copied().unwrap_or(0),
        spread.get("echo-v2").copied().unwrap_or(0),
    );
    assert_eq!(v1 + v2, 400, "{spread:?}");
    assert!((16..=64).contains(&v2), "90/10 split gave {spread:?}");
    // The header match wins over the weighted default.
    assert_eq!(
        bodies(m, "http://10.96.0.20/canary", 20, "-H 'x-canary: true'"),
        BTreeMap::from([("echo-v2".to_string(), 20)])
    );
    // HTTP/2 from the client (prior knowledge), HTTP/1.1 to the backend.
    // (One request per curl: curl 7.88 stalls reusing an h2c connection.)
    for _ in 0..5 {
        let out = curl(m, "client", "--http2-prior-knowledge -H 'x-canary: true' -w ' %{http_version}' http://10.96.0.20/h2");
        assert_eq!(out, "echo-v2\n 2");
    }

    // Telemetry: waypoint metrics, access log, and the backend saw the waypoint.
    let metrics = m.pod_http("waypoint", 15020, "/metrics");
    let total: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"waypoint\"")
                && l.contains("destination_service=\"echo.app.svc.cluster.local\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/app/sa/client\"")
                && l.contains("response_code=\"200\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(total, 425.0, "{metrics}");
    assert!(
        metrics.contains("istio_request_duration_milliseconds_bucket"),
        "{metrics}"
    );
    let log = access_log(m);
    assert_eq!(log.len(), 425);
    assert!(
        log.iter().all(|l| l["route_name"] == "HTTPRoute app/split"
            && l["request_id"].as_str().is_some_and(|s| s.len() == 36)
            && l["user_agent"]
                .as_str()
                .is_some_and(|s| s.starts_with("curl/"))
            && l["downstream_remote_address"]
                .as_str()
                .is_some_and(|s| s.starts_with("10.244.1.10:"))
            && l["start_time"]
                .as_str()
                .is_some_and(|s| humantime::parse_rfc3339(s).is_ok())),
        "{:?}",
        log[0]
    );
    assert!(log
        .iter()
        .any(|l| l["protocol"] == "http" && l["upstream_host"] == "10.244.2.11:8080"));
    let dst = m.metrics("node1");
    assert!(
        dst.lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"destination\"")
                && l.contains("destination_workload=\"echo-v1\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/app/sa/waypoint\"")),
        "echo-v1 was not reached from the waypoint:\n{dst}"
    );

    // Pod-addressed traffic with a waypoint for services only stays L4.
    let before = access_log(m).len();
    assert_eq!(
        curl(m, "client", "http://10.244.1.11:8080/direct"),
        "echo-v1\n"
    );
    assert_eq!(
        access_log(m).len(),
        before,
        "pod traffic went through a service waypoint"
    );
    assert_eq!(c.v1.get("/direct"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtualservice_retries_timeouts_faults_and_bad_references() {
    let vs = "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo-v1, namespace: app}
spec:
  hosts: [echo-v1]
  http:
  - match: [{uri: {prefix: /flaky}}]
    retries: {attempts: 2, retryOn: 5xx}
    route: [{destination: {host: echo-v1}}]
  - match: [{uri: {exact: /slow}}]
    timeout: 1s
    route: [{destination: {host: echo-v1}}]
  - match: [{uri: {prefix: /abort}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 50}}}
    route: [{destination: {host: echo-v1}}]
  - match: [{uri: {prefix: /nosubset}}]
    route: [{destination: {host: echo-v1, subset: nope}}]
  - match: [{uri: {prefix: /mirrored}}]
    route: [{destination: {host: echo-v2}}]
    mirror: {host: echo-v1}
    mirrorPercentage: {value: 100}
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, redirectCode: 301}
  - match: [{uri: {prefix: /api/v1}}]
    rewrite: {uri: /status/202}
    route: [{destination: {host: echo-v1}}]
  - match: [{uri: {prefix: /headers}}]
    headers: {response: {set: {x-route: headers}}}
    route: [{destination: {host: echo-v1}}]
  - route: [{destination: {host: echo-v1}}]
";
    let c = cluster("wvs", vs, "service").await;
    let m = &c.m;
    // A backend that fails its first attempt: retried, the caller sees 200.
    assert_eq!(
        curl(m, "client", "-w ' %{http_code}' http://10.96.0.21/flaky/a"),
        "echo-v1\n 200"
    );
    assert_eq!(c.v1.get("/flaky/a"), 2, "the backend counts both attempts");
    // Istio's default retry (503 only): a 500 is not retried, a 503 is, twice.
    assert_eq!(
        curl(
            m,
            "client",
            "-o /dev/null -w %{http_code} http://10.96.0.21/status/500"
        ),
        "500"
    );
    assert_eq!(c.v1.get("/status/500"), 1);
    assert_eq!(
        curl(
            m,
            "client",
            "-o /dev/null -w %{http_code} http://10.96.0.21/status/503"
        ),
        "503"
    );
    assert_eq!(c.v1.get("/status/503"), 3);
    // A slow backend: 504 at the route timeout.
    assert_eq!(
        curl(
            m,
            "client",
            "-o /dev/null -w %{http_code} http://10.96.0.21/slow"
        ),
        "504"
    );
    // Abort fault at 50% over 200 requests (sd 7): within 4 sd.
    let got = codes(m, "http://10.96.0.21/abort", 200, "");
    let aborted = got.iter().filter(|c| *c == "418").count();
    assert_eq!(
        got.iter().filter(|c| *c == "200").count() + aborted,
        200,
        "{got:?}"
    );
    assert!((72..=128).contains(&aborted), "{aborted} of 200 aborted");
    // A subset nobody defined: 503, and the log says why.
    assert_eq!(
        curl(
            m,
            "client",
            "-o /dev/null -w %{http_code} http://10.96.0.21/nosubset"
        ),
        "503"
    );
    let wlog = std::fs::read_to_string(m.dir.join("waypoint.log")).unwrap();
    assert!(wlog.contains("subset") && wlog.contains("nope"), "{wlog}");
    assert!(
        curl(m, "client", "-D - -o /dev/null http://10.96.0.21/headers")
            .to_lowercase()
            .contains("x-route: headers")
    );

    let log = access_log(m);
    let flags = |path: &str| {
        log.iter()
            .filter(|l| l["path"].as_str().is_some_and(|p| p.starts_with(path)))
            .map(|l| l["response_flags"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(flags("/slow"), ["UT"]);
    assert_eq!(flags("/nosubset"), ["NC"]);
    assert_eq!(
        flags("/abort").iter().filter(|f| *f == "FI").count(),
        aborted
    );
    let flaky: Vec<_> = log.iter().filter(|l| l["path"] == "/flaky/a").collect();
    assert_eq!(flaky[0]["attempts"], 2);
    let metrics = m.pod_http("waypoint", 15020, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("response_code=\"418\"")
                && l.contains("response_flags=\"FI\"")),
        "{metrics}"
    );
    assert!(metrics
        .lines()
        .any(|l| l.starts_with("istio_requests_total{")
            && l.contains("response_code=\"504\"")
            && l.contains("response_flags=\"UT\"")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_policy_outlier_ejection_and_pool_overflow() {
    let cfg = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: app}
spec:
  targetRefs: [{kind: Service, group: \"\", name: echo-v1}]
  action: DENY
  rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: app}
spec:
  host: echo.app.svc.cluster.local
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 3s, maxEjectionPercent: 100}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo-v1, namespace: app}
spec:
  host: echo-v1
  trafficPolicy: {connectionPool: {http: {http2MaxRequests: 1}}}
";
    let c = cluster("wlp", cfg, "service").await;
    let m = &c.m;
    // L7 DENY on one path; another passes.
    assert_eq!(
        curl(
            m,
            "client",
            "-w ' %{http_code}' http://10.96.0.21/admin/users"
        ),
        "RBAC: access denied 403"
    );
    assert_eq!(
        curl(m, "client", "-w ' %{http_code}' http://10.96.0.21/public"),
        "echo-v1\n 200"
    );
    assert_eq!(
        c.v1.get("/admin/users"),
        0,
        "a denied request never reached the backend"
    );
    // Bytes that are not HTTP cannot be checked against paths: the DENY
    // applies to all of them rather than letting them around it.
    m.echo_server("echo-v1", 9001);
    let mut raw = m.connect("client", "10.96.0.21:9001").unwrap();
    std::io::Write::write_all(&mut raw, b"not http at all\n").unwrap();
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut raw, &mut got);
    assert!(
        got.is_empty(),
        "an L4 stream went around an L7 DENY: {got:?}"
    );

    // echo-v2 (Envoy) answers 500 on /unstable: after two in a row it is
    // ejected and only echo-v1 answers; after the ejection time it is back.
    let first = bodies(m, "http://10.96.0.20/unstable", 8, "");
    assert!(first.get("echo-v2").copied().unwrap_or(0) >= 2, "{first:?}");
    let dump = m.pod_http("waypoint", 15000, "/config_dump");
    assert!(
        dump.contains("10.244.2.11"),
        "ejection not in config dump: {dump}"
    );
    assert_eq!(
        bodies(m, "http://10.96.0.20/unstable", 20, ""),
        BTreeMap::from([("echo-v1".to_string(), 20)])
    );
    std::thread::sleep(Duration::from_millis(3500));
    let back = bodies(m, "http://10.96.0.20/unstable", 4, "");
    assert!(
        back.contains_key("echo-v2"),
        "echo-v2 never came back: {back:?}"
    );
    let metrics = m.pod_http("waypoint", 15020, "/metrics");
    assert!(
        metrics.contains("istio_waypoint_outlier_ejections_total"),
        "{metrics}"
    );

    // One request at a time for echo-v1: a second one while /slow is in
    // flight overflows (503, flag UO).
    let ns = m.pod_ns("client");
    let slow = std::thread::spawn(move || {
        sh_out(&format!(
            "ip netns exec {ns} curl -s -o /dev/null -w %{{http_code}} http://10.96.0.21/slow"
        ))
        .1
    });
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        curl(
            m,
            "client",
            "-o /dev/null -w %{http_code} http://10.96.0.21/other"
        ),
        "503"
    );
    assert_eq!(slow.join().unwrap(), "200");
    assert!(access_log(m)
        .iter()
        .any(|l| l["path"] == "/other" && l["response_flags"] == "UO"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_for_all_captures_pod_traffic_and_forbids_bypass() {
    let c = cluster("wall", "", "all").await;
    let m = &c.m;
    // Addressed to the pod itself, it still goes through the waypoint.
    assert_eq!(
        curl(m, "client", "http://10.244.1.11:8080/direct"),
        "echo-v1\n"
    );
    assert!(
        access_log(m).iter().any(|l| l["path"] == "/direct"),
        "pod traffic skipped the waypoint"
    );
    // Plaintext from outside the mesh to that pod is refused by its ztunnel.
    let out = curl(
        m,
        "outsider",
        "-w ' %{http_code}' http://10.244.1.11:8080/sneak",
    );
    assert!(
        !out.contains("echo-v1"),
        "plaintext bypassed the waypoint: {out}"
    );
    assert_eq!(c.v1.get("/sneak"), 0);
    let metrics = m.metrics("node1");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_closed_total")
                && l.contains("response_flags=\"DENY\"")
                && l.contains("destination_workload=\"echo-v1\"")),
        "{metrics}"
    );
    // The waypoint serves the shared admin's /logging too.
    assert_eq!(
        m.pod_http("waypoint", 15000, "/logging"),
        "current log level is info\n"
    );
    let (_, out) = sh_out(&format!(
        "ip netns exec {} curl -s -X POST 'http://127.0.0.1:15000/logging?level=hyper:debug'",
        m.pod_ns("waypoint")
    ));
    assert_eq!(out, "current log level is info,hyper=debug\n");
}

/// Labels Prometheus adds at scrape time (kubernetes_sd relabeling, see
/// manifests/README.md), so the proxies never export them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_query_only_what_the_proxies_export() {
    let cfg = "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo-v1, namespace: app}
spec:
  hosts: [echo-v1]
  http: [{retries: {attempts: 2, retryOn: 5xx}, route: [{destination: {host: echo-v1}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: app}
spec:
  host: echo
  trafficPolicy: {outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 30s, maxEjectionPercent: 100}}
";
    let c = cluster("wdb", cfg, "service").await;
    let m = &c.m;
    // Make every series a panel reads exist: routed and failed requests, a
    // retry, an ejection, a DNS answer, a TLS handshake failure.
    bodies(m, "http://10.96.0.20/unstable", 8, "");
    curl(m, "client", "http://10.96.0.21/flaky/x");
    m.dns_query(
        "client",
        "10.96.0.53:53",
        "echo",
        testbed::hickory_proto::rr::RecordType::A,
        false,
    )
    .unwrap();
    curl(m, "outsider", "-m 2 http://10.244.1.11:15008/not-tls");

    let mut exported = BTreeMap::new();
    for text in [
        m.metrics("node1"),
        m.metrics("node2"),
        m.pod_http("waypoint", 15020, "/metrics"),
    ] {
        dashboards::exposition(&text, &mut exported);
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("manifests/dashboards");
    let read = |path: &std::path::Path| -> serde_json::Value {
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let mut checked = 0;
    for f in ["ztunnel.json", "waypoint.json"] {
        checked += dashboards::check(f, &read(&root.join(f)), &exported, &[]);
    }
    assert!(checked >= 25, "only {checked} selectors checked in ours");
    // Istio's own dashboards, as `scripts/peers.sh` copies them from the
    // pinned istio module. Their other series come from the kubelet's
    // cAdvisor (container_*) or are the seconds histogram Istio's proxies
    // stopped exporting (they query it beside the milliseconds one).
    let istio = std::path::PathBuf::from(
        std::env::var("MESH_PEERS_DIR").unwrap_or_else(|_| "/var/cache/mesh-peers".into()),
    )
    .join("dashboards");
    if !istio.exists() && std::env::var("MESH_PEERS_OPTIONAL").as_deref() == Ok("1") {
        eprintln!("skipping Istio's dashboards: {} missing", istio.display());
        return;
    }
    let not_ours = [
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "istio_request_duration_seconds_bucket",
    ];
    let mut checked = 0;
    for f in [
        "ztunnel-dashboard.gen.json",
        "istio-workload-dashboard.json",
        "istio-service-dashboard.json",
        "istio-mesh-dashboard.gen.json",
    ] {
        checked += dashboards::check(f, &read(&istio.join(f)), &exported, &not_ours);
    }
    assert!(
        checked >= 100,
        "only {checked} selectors checked in Istio's"
    );
}

const FAULTY: &str = "---
apiVersion: v1
kind: Service
metadata: {name: faulty, namespace: app}
spec: {clusterIP: 10.96.0.23, selector: {app: echo, version: v1}, ports: [{name: http-silent, port: 81, targetPort: 8081}, {name: http-reset, port: 82, targetPort: 8082}, {name: tcp-halfclose, port: 9003, targetPort: 9003}]}
";

/// Slow-loris clients are cut by the header timeout; a backend that never
/// answers is let go when its client gives up; a resetting backend becomes a
/// 503 flagged UR; a half-closing one passes through L4 faithfully. After
/// all of it the waypoint holds no more fds than before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_and_misbehaving_backends_leave_the_waypoint_clean() {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    use std::time::Instant;
    let (c, wp) = cluster_with(
        "wfl",
        FAULTY,
        "service",
        &["--request-header-timeout", "2s"],
    )
    .await;
    let m = &c.m;
    let released = m.silent_server("echo-v1", 8081);
    m.resetting_server("echo-v1", 8082);
    let late = m.half_closing_server("echo-v1", 9003);
    // Warm certificates and the HBONE pools so the baseline includes them.
    assert_eq!(codes(m, "http://10.96.0.21/", 1, ""), ["200"]);
    std::thread::sleep(Duration::from_millis(300));
    let fds_before = fd_count(wp);

    // 20 clients stop halfway through their headers; one trickles a byte
    // every 300 ms, which must not keep it alive either.
    let start = Instant::now();
    let mut slow: Vec<_> = (0..20)
        .map(|_| {
            let mut s = m.connect("client", "10.96.0.21:80").unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: echo\r\nX-Slow: ")
                .unwrap();
            s
        })
        .collect();
    let trickle = {
        let mut s = m.connect("client", "10.96.0.21:80").unwrap();
        std::thread::spawn(move || {
            s.write_all(b"GET / HTTP/1.1\r\nX-Slow: ").unwrap();
            let start = Instant::now();
            for _ in 0..40 {
                std::thread::sleep(Duration::from_millis(300));
                if s.write_all(b"a").is_err() {
                    break;
                }
            }
            start.elapsed()
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        fd_count(wp) < fds_before + 5,
        "slow clients cost the waypoint fds: the tunnels are streams"
    );
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut out = Vec::new();
        let r = s.read_to_end(&mut out);
        assert!(
            !matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "slow client never cut"
        );
        assert!(
            !String::from_utf8_lossy(&out).contains(" 200 "),
            "an incomplete request was answered"
        );
    }
    let cut = start.elapsed();
    let trickled = trickle.join().unwrap();
    eprintln!("slow-loris clients cut after {cut:?}; the trickling one after {trickled:?}");
    assert!(
        cut < Duration::from_secs(10),
        "header timeout (2 s) not enforced: {cut:?}"
    );
    assert!(
        trickled < Duration::from_secs(10),
        "a trickling client outlived the header timeout: {trickled:?}"
    );

    // A backend that never answers: each client gives up after 1 s, and the
    // waypoint must let go of the upstream request (the backend sees EOF).
    for i in 0..10 {
        assert_eq!(
            curl(
                m,
                "client",
                &format!("-m 1 -o /dev/null -w '%{{http_code}}' http://10.96.0.23:81/{i}")
            ),
            "000"
        );
    }
    eventually(
        "the waypoint releases abandoned upstream requests",
        Duration::from_secs(10),
        || released.load(Ordering::SeqCst) >= 10,
    )
    .await;

    // A backend that resets after reading the request: 503, flagged UR.
    assert_eq!(
        codes(m, "http://10.96.0.23:82/", 3, ""),
        ["503", "503", "503"]
    );
    let log = access_log(m);
    let reset: Vec<_> = log
        .iter()
        .filter(|l| l["authority"] == "10.96.0.23:82" && l["response_code"] == 503)
        .collect();
    assert_eq!(reset.len(), 3, "{log:?}");
    assert!(
        reset.iter().all(|l| l["response_flags"] == "UR"),
        "503s not flagged UR: {reset:?}"
    );

    // Half-close through the waypoint at L4: "bye" then EOF, and our bytes
    // after the backend's FIN still arrive.
    for _ in 0..5 {
        m.half_close_exchange("client", "10.96.0.23:9003");
    }
    eventually(
        "bytes sent after the backend's FIN arrive",
        Duration::from_secs(10),
        || late.load(Ordering::SeqCst) == 5 * HALF_CLOSE_LATE.len(),
    )
    .await;

    eventually(
        "the waypoint's fds return to the baseline",
        Duration::from_secs(10),
        || fd_count(wp) <= fds_before + 2,
    )
    .await;
}

const STRICT: &str = "---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: app}
spec: {mtls: {mode: STRICT}}
";

/// Under STRICT, a capture of the bridge never shows the application's
/// bytes: not in normal operation, not with the waypoint killed (requests
/// fail, they do not go around it in plaintext), not while either ztunnel
/// restarts. A plaintext control flow in the same capture does show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_wire_stays_encrypted_with_the_waypoint_down_and_ztunnels_restarting() {
    const SECRET: &str = "MESH-SECRET-REQUEST";
    let (mut c, wp) = cluster_with("wsx", STRICT, "service", &[]).await;
    let cap = Capture::start(&c.m.net, "br0", c.m.dir.join("strict.pcap"));
    let ask = |m: &Mesh, url: &str| {
        curl(
            m,
            "client",
            &format!(
                "-m 3 -o /dev/null -w '%{{http_code}}' -H 'x-secret: {SECRET}' '{url}/{SECRET}'"
            ),
        )
    };
    // Through the waypoint, and straight to the pod (HBONE, no waypoint).
    assert_eq!(ask(&c.m, "http://10.96.0.21"), "200");
    assert_eq!(ask(&c.m, "http://10.244.1.11:8080"), "200");

    // The waypoint dies: its services fail rather than bypass it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(wp as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..3 {
        let code = ask(&c.m, "http://10.96.0.21");
        assert!(
            code == "000" || code.starts_with('5'),
            "service answered {code} with its waypoint dead"
        );
    }
    c.m.start_waypoint(WP, "waypoint", "waypoint", "app", "waypoint");
    assert_eq!(ask(&c.m, "http://10.96.0.21"), "200");

    // Each ztunnel restarts; while the client's is down its traffic fails
    // in the pod (the capture rules stay), and everything resumes after.
    let ca = c.m.dir.join("ca");
    for node in ["node1", "node2"] {
        assert!(c.m.stop_node(node).success());
        let code = ask(&c.m, "http://10.96.0.21");
        if node == "node1" {
            assert_eq!(code, "000", "client traffic left with its ztunnel down");
        }
        c.m.start_node(node, &ca).await;
        // The waypoint redials node1's new ztunnel for echo-v1 on its own.
        let mut codes = Vec::new();
        for _ in 0..20 {
            let code = ask(&c.m, "http://10.96.0.21");
            codes.push(code.clone());
            if code == "200" {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        assert_eq!(
            codes.last().map(String::as_str),
            Some("200"),
            "after restarting {node}: {codes:?}"
        );
    }

    // Control: plaintext between two pods outside the mesh is visible.
    c.m.echo_server("outsider", 7070);
    echo_roundtrip(
        c.m.connect("waypoint", "10.244.3.10:7070").unwrap(),
        b"CONTROL-PLAINTEXT-PAYLOAD",
    );
    let pcap = cap.pcap.clone();
    let raw = cap.stop();
    assert!(
        contains(&raw, b"CONTROL-PLAINTEXT-PAYLOAD"),
        "the capture saw nothing"
    );
    assert!(
        !contains(&raw, SECRET.as_bytes()),
        "application bytes crossed the wire in plaintext"
    );
    // Everything the client pod sent or received went over 15008.
    let (ok, ports) = sh_out(&format!(
        "tshark -r {} -Y 'ip.addr==10.244.1.10' -T fields -e tcp.port 2>/dev/null | sort -u",
        pcap.display()
    ));
    assert!(ok && !ports.trim().is_empty(), "{ports}");
    assert!(
        ports.lines().all(|l| l.split(',').any(|p| p == "15008")),
        "client traffic off 15008: {ports}"
    );
}
