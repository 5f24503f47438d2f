//! The waypoint against Envoy configured as a waypoint (same hops), and
//! against Envoy as a plain L7 proxy outside the mesh, same route (one
//! backend), retries (2 on 5xx) and metrics on, 2 worker threads each, same
//! load: wrk (HTTP/1.1) and h2load (HTTP/2), bounded duration. Also the same
//! load through ztunnel alone (no L7), for scale. The two waypoints race
//! `BENCH_ROUNDS` times (default 3, `race`); the reference paths run once.
//! Prints a table of medians and each round's ratio, then each row as JSON
//! (`report`). Then the streaming cases (`streaming`: a large
//! upload, a gRPC stream) through our waypoint and the plain Envoy with
//! their peak RSS; BENCH_STREAMING=0 skips them.
//!
//! Paths (client and backend are ambient pods on two nodes):
//!   waypoint:          client → ztunnel ⇒HBONE⇒ waypoint ⇒HBONE⇒ ztunnel → backend
//!   envoy as waypoint: client → ztunnel ⇒HBONE⇒ Envoy (`envoy_waypoint`) ⇒HBONE⇒ ztunnel → backend
//!   envoy plain L7:    client → ztunnel (plain, Envoy is outside the mesh) → Envoy → ztunnel (15006) → backend
//!   L4 only:           client → ztunnel ⇒HBONE⇒ ztunnel → backend
//! The plain-Envoy path does two mTLS hops fewer than the other two.

mod envoy_waypoint;
mod race;
mod report;
mod soak;
mod streaming;

use std::process::Command;

use testbed::Mesh;

fn secs() -> u64 {
    std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

const YAML: &str = "apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app}
spec: {serviceAccountName: client, nodeName: node1}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: backend, namespace: app, labels: {app: backend}}
spec: {serviceAccountName: backend, nodeName: node2}
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
metadata: {name: envoy, namespace: app, labels: {app: envoy, istio.io/dataplane-mode: none}}
spec: {serviceAccountName: envoy, nodeName: node2}
status: {podIP: 10.244.2.30}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: app, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.10, selector: {app: backend}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-l4, namespace: app}
spec: {clusterIP: 10.96.0.11, selector: {app: backend}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-envoy, namespace: app}
spec: {clusterIP: 10.96.0.12, selector: {app: envoy}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: app}
spec: {clusterIP: 10.96.0.30, selector: {gateway.networking.k8s.io/gateway-name: waypoint}, ports: [{name: mesh, port: 15008}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: app}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: app}
spec:
  hosts: [web]
  http: [{retries: {attempts: 2, retryOn: 5xx}, route: [{destination: {host: web}}]}]
";

/// The backend: Envoy answering 200 with a small body.
const BACKEND: &str = r#"
static_resources:
  listeners:
  - address: {socket_address: {address: 0.0.0.0, port_value: 8080}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: backend
          codec_type: AUTO
          http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
          route_config:
            virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: /}, direct_response: {status: 200, body: {inline_string: "hello from the backend\n"}}}]}]
"#;

/// Envoy as the L7 proxy: one route to the backend, 2 retries on 5xx, stats on.
const PROXY: &str = r#"
admin: {address: {socket_address: {address: 127.0.0.1, port_value: 9901}}}
static_resources:
  listeners:
  - address: {socket_address: {address: 0.0.0.0, port_value: 8080}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: proxy
          codec_type: AUTO
          http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
          route_config:
            virtual_hosts:
            - name: web
              domains: ["*"]
              routes: [{match: {prefix: /}, route: {cluster: backend, retry_policy: {retry_on: 5xx, num_retries: 2}}}]
  # The streaming cases: an upload sink (HTTP/1.1) and a gRPC peer
  # (HTTP/2); no retries, as the waypoint has no route with retries for
  # them, and no route timeout.
  - address: {socket_address: {address: 0.0.0.0, port_value: 8081}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: upload
          codec_type: AUTO
          http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
          route_config:
            virtual_hosts: [{name: upload, domains: ["*"], routes: [{match: {prefix: /}, route: {cluster: upload, timeout: 0s}}]}]
  - address: {socket_address: {address: 0.0.0.0, port_value: 9090}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: grpc
          codec_type: AUTO
          http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
          route_config:
            virtual_hosts: [{name: grpc, domains: ["*"], routes: [{match: {prefix: /}, route: {cluster: grpc, timeout: 0s}}]}]
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment: {cluster_name: backend, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 10.244.2.11, port_value: 8080}}}}]}]}
  - name: upload
    type: STATIC
    connect_timeout: 1s
    load_assignment: {cluster_name: upload, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 10.244.2.11, port_value: 8081}}}}]}]}
  - name: grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment: {cluster_name: grpc, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 10.244.2.11, port_value: 9090}}}}]}]}
"#;

fn in_client(m: &Mesh, cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("ip netns exec {} {cmd}", m.pod_ns("client")))
        .output()
        .expect("load generator");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// wrk's "50%  1.23ms" style values in ms.
fn ms(v: &str) -> f64 {
    let (n, unit) = v.split_at(v.find(|c: char| c.is_alphabetic()).unwrap_or(v.len()));
    let n: f64 = n.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => f64::NAN,
    }
}

/// wrk: req/s, p50, p99 and failed requests (non-2xx plus socket errors).
fn wrk(m: &Mesh, url: &str) -> (f64, f64, f64, f64) {
    let out = in_client(m, &format!("wrk -t2 -c32 -d{}s --latency {url}", secs()));
    let field = |prefix: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_string()))
    };
    let rps = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    // "Non-2xx or 3xx responses: 5", "Socket errors: connect 0, read 1, write 0, timeout 0".
    let errors: f64 = out
        .lines()
        .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        .flat_map(|l| l.split(|c: char| !c.is_ascii_digit() && c != '.'))
        .filter_map(|n| n.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b);
    if errors > 0.0 || rps.is_nan() {
        eprintln!("wrk {url} reported errors:\n{out}");
    }
    (
        rps,
        field("50%").map(|v| ms(&v)).unwrap_or(f64::NAN),
        field("99%").map(|v| ms(&v)).unwrap_or(f64::NAN),
        errors,
    )
}

/// h2load: req/s, mean request time (it prints no percentiles) and failed
/// requests (failed + errored + timed out, and non-2xx answers).
fn h2load(m: &Mesh, url: &str) -> (f64, f64, f64) {
    let out = in_client(m, &format!("h2load -D {} -c8 -m16 -t2 {url}", secs()));
    let rps = out
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| {
            l.split(", ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(f64::NAN);
    let mean = out
        .lines()
        .find(|l| l.starts_with("time for request:"))
        .and_then(|l| l.split_whitespace().nth(5).map(ms))
        .unwrap_or(f64::NAN);
    // "requests: 10 total, 10 started, 10 done, 9 succeeded, 1 failed, 0 errored, 0 timeout"
    // "status codes: 9 2xx, 0 3xx, 1 4xx, 0 5xx"
    let count = |prefix: &str, what: &[&str]| -> f64 {
        out.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|l| {
                l.split(", ")
                    .filter_map(|part| {
                        let (n, name) = part.trim().split_once(' ')?;
                        what.contains(&name).then(|| n.parse::<f64>().ok())?
                    })
                    .sum()
            })
            .unwrap_or(f64::NAN)
    };
    let errors = count("requests: ", &["failed", "errored", "timeout"])
        .max(count("status codes: ", &["3xx", "4xx", "5xx"]));
    if errors != 0.0 {
        eprintln!("h2load {url} reported failures:\n{out}");
    }
    (rps, mean, errors)
}

fn pid_of(ns: &str, comm: &str) -> String {
    testbed::pids_in_netns(ns, comm)
        .first()
        .expect("process in netns")
        .to_string()
}

/// A memory field (`VmRSS`, `VmHWM`) of the processes named `comm` in netns
/// `ns`, the largest, MiB.
fn status_mib(ns: &str, comm: &str, field: &str) -> f64 {
    testbed::pids_in_netns(ns, comm)
        .into_iter()
        .filter_map(|pid| testbed::proc_status_kb(pid, field))
        .map(|kb| kb as f64 / 1024.0)
        .fold(0.0, f64::max)
}

/// The Envoy waypoint's counters whose names contain `filter` (admin
/// `/stats`), as "name: value" lines.
fn envoy_stats(m: &Mesh, filter: &str) -> String {
    let (_, out) = testbed::sh_out(&format!(
        "ip netns exec {} curl -sg 'http://127.0.0.1:9901/stats?filter={filter}'",
        m.pod_ns(envoy_waypoint::POD)
    ));
    out
}

/// Fails the bench unless the Envoy waypoint carries the traffic of
/// `web-envoy-wp`: the backend's ztunnel accepted HBONE from the Envoy
/// waypoint's identity (not from the client's), and Envoy's own counters
/// saw CONNECTs terminated and requests answered 2xx.
fn check_envoy_waypoint(m: &Mesh) {
    let from = format!(
        "source_principal=\"spiffe://cluster.local/ns/app/sa/{}\"",
        envoy_waypoint::SA
    );
    let metrics = m.metrics("node2");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"destination\"")
                && l.contains(&from)
                && l.contains("destination_workload=\"backend\"")),
        "node2's ztunnel saw no HBONE from the Envoy waypoint:\n{metrics}"
    );
    let stats = envoy_stats(m, "(connect_terminate.downstream_rq_total|main_internal.downstream_rq_2xx|connect_originate.upstream_cx_total)");
    // Lines are "name: value".
    let count = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(": ")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    assert!(
        count("http.connect_terminate.downstream_rq_total") > 0
            && count("http.main_internal.downstream_rq_2xx") > 0
            && count("cluster.connect_originate.upstream_cx_total") > 0,
        "the Envoy waypoint's counters show no traffic:\n{stats}"
    );
}

const OURS: &str = "waypoint (ours)";
const ENVOY_WP: &str = "envoy as waypoint";
const PLAIN: &str = "envoy (plain L7, 2 hops fewer)";
const H1: &str = "HTTP/1.1 (wrk -c32)";
const H2: &str = "HTTP/2 (h2load -c8 -m16)";

/// The CPU the path's L7 proxy process used during one run: less moved by
/// the machine's noise than req/s, since the other processes' share of the
/// cores does not enter it.
struct ProxyCpu {
    pid: Option<u32>,
    start_ms: f64,
    start_ctx: u64,
}

impl ProxyCpu {
    fn start(m: &Mesh, path: &str) -> ProxyCpu {
        let (ns, comm) = match path {
            OURS => ("waypoint", "waypoint"),
            ENVOY_WP => (envoy_waypoint::POD, "envoy"),
            PLAIN => ("envoy", "envoy"),
            _ => {
                return ProxyCpu {
                    pid: None,
                    start_ms: 0.0,
                    start_ctx: 0,
                }
            }
        };
        let pid = testbed::pids_in_netns(&m.pod_ns(ns), comm).first().copied();
        ProxyCpu {
            pid,
            start_ms: pid.map_or(0.0, testbed::proc_cpu_ms),
            start_ctx: pid.map_or(0, testbed::proc_ctx_switches),
        }
    }

    /// µs of CPU and context switches per request, for a run of `secs()`
    /// at `rps`; NaN for a path with no L7 proxy.
    fn per_request(&self, rps: f64) -> (f64, f64) {
        let Some(pid) = self.pid else {
            return (f64::NAN, f64::NAN);
        };
        let requests = rps * secs() as f64;
        let used_ms = testbed::proc_cpu_ms(pid) - self.start_ms;
        let switches = testbed::proc_ctx_switches(pid).saturating_sub(self.start_ctx);
        (used_ms * 1000.0 / requests, switches as f64 / requests)
    }
}

/// One path's HTTP/1.1 and HTTP/2 runs. BENCH_PROFILE=1: perf samples our
/// waypoint during its first HTTP/1.1 run (BENCH_PERF_OUT: where perf.data
/// goes, kept for `perf report`; BENCH_PERF_EVENT: what to sample instead of
/// CPU time). Stacks are unwound from DWARF: release builds keep no frame
/// pointers, so `-g` stops at the first frame.
fn measure(m: &Mesh, path: &'static str, url: &str, round: usize) -> [race::Sample; 2] {
    let perf_data = std::env::var("BENCH_PERF_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| m.dir.join("perf.data"));
    let perf = (path == OURS && round == 0 && std::env::var("BENCH_PROFILE").is_ok()).then(|| {
        let pid = pid_of(&m.pod_ns("waypoint"), "waypoint");
        Command::new("perf")
            .args(["record", "-F", "499", "--call-graph", "dwarf,16384"])
            // e.g. sched:sched_switch: where its threads give up the CPU.
            .args(match std::env::var("BENCH_PERF_EVENT") {
                Ok(e) => vec!["-e".to_string(), e],
                Err(_) => vec![],
            })
            .args(["-p", &pid, "-o"])
            .arg(&perf_data)
            .args(["--", "sleep", &secs().to_string()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("perf")
    });
    let cpu = ProxyCpu::start(m, path);
    let (rps, p50, p99, errors) = wrk(m, url);
    let (h1_cpu, h1_ctx) = cpu.per_request(rps);
    if let Some(mut p) = perf {
        let _ = p.wait();
        let out = Command::new("perf")
            .args([
                "report",
                "--no-children",
                "--stdio",
                "--percent-limit",
                "1.5",
            ])
            .args(["-g", "none", "-i"])
            .arg(&perf_data)
            .output()
            .unwrap();
        println!("{}", String::from_utf8_lossy(&out.stdout));
    }
    let h1 = race::Sample {
        path,
        proto: H1,
        round,
        rps,
        p50_ms: p50,
        p99_ms: p99,
        errors,
        cpu_us: h1_cpu,
        ctx_sw: h1_ctx,
    };
    let cpu = ProxyCpu::start(m, path);
    let (rps, mean, errors) = h2load(m, url);
    let (cpu_us, ctx_sw) = cpu.per_request(rps);
    let h2 = race::Sample {
        path,
        proto: H2,
        round,
        rps,
        p50_ms: mean,
        p99_ms: f64::NAN,
        errors,
        cpu_us,
        ctx_sw,
    };
    [h1, h2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let ztunnel = std::env::var("ZTUNNEL").unwrap_or_else(|_| "target/release/ztunnel".into());
    let waypoint = std::env::var("WAYPOINT").unwrap_or_else(|_| "target/release/waypoint".into());
    let mut m = Mesh::new("wpb", &ztunnel);
    m.dns_capture = false;
    m.pod("client", "app", "client", "10.244.1.10", "node1", true);
    m.pod("backend", "app", "backend", "10.244.2.11", "node2", true);
    m.pod("waypoint", "app", "waypoint", "10.244.2.20", "node2", false);
    m.pod("envoy", "app", "envoy", "10.244.2.30", "node2", false);
    m.pod(
        envoy_waypoint::POD,
        "app",
        envoy_waypoint::SA,
        "10.244.2.40",
        "node2",
        false,
    );
    m.write_config(&format!(
        "{YAML}{}{}",
        envoy_waypoint::YAML,
        streaming::YAML
    ));
    let ca = m.dir.join("ca");
    m.start_node("node1", &ca).await;
    m.start_node("node2", &ca).await;
    m.start_envoy("backend", BACKEND, "backend", 8080);
    m.start_envoy("envoy", PROXY, "proxy", 8080);
    // The Envoy waypoint's certificate, from the mesh CA, for its service account.
    let (chain, key, root) = testbed::issue_cert(
        &ca,
        &format!("spiffe://cluster.local/ns/app/sa/{}", envoy_waypoint::SA),
        &m.dir,
        "envoy-waypoint",
    );
    m.start_envoy(
        envoy_waypoint::POD,
        &envoy_waypoint::config(&chain, &key, &root),
        "envoy-waypoint",
        15008,
    );
    m.start_waypoint(&waypoint, "waypoint", "waypoint", "app", "waypoint");
    // Warm up each path (certificates, pools).
    for url in [
        "http://10.96.0.10/",
        envoy_waypoint::URL,
        "http://10.96.0.11/",
        "http://10.96.0.12/",
    ] {
        assert!(
            in_client(&m, &format!("curl -s {url}")).contains("hello"),
            "{url} does not answer"
        );
    }
    check_envoy_waypoint(&m);
    // SOAK_SECS=N: a steady-rate soak instead of the comparison.
    if std::env::var("SOAK_SECS").is_ok() {
        soak::run(&m, "10.96.0.10", "10.96.0.11");
        return;
    }
    let paths = [
        (OURS, "http://10.96.0.10/"),
        (ENVOY_WP, envoy_waypoint::URL),
        (PLAIN, "http://10.96.0.12/"),
        ("ztunnel only (L4)", "http://10.96.0.11/"),
    ];
    let mut samples = Vec::new();
    for round in 0..race::rounds() {
        // The reference rows once; the race every round, who goes first
        // alternating (a drift within a round favours neither).
        let mut order: Vec<_> = paths
            .iter()
            .filter(|(p, _)| round == 0 || *p == OURS || *p == ENVOY_WP)
            .collect();
        if round % 2 == 1 {
            order.swap(0, 1);
        }
        for (path, url) in order {
            samples.extend(measure(&m, path, url, round));
        }
    }
    let rows = race::rows(&samples);
    // The load went where it should: the Envoy waypoint's counters after it.
    check_envoy_waypoint(&m);
    let envoy_counts = envoy_stats(
        &m,
        "(connect_terminate.downstream_rq_total|main_internal.downstream_rq_2xx|main_internal.downstream_rq_5xx|backend.upstream_rq_retry|connect_originate.upstream_cx_total)$",
    );
    println!(
        "\n{} s per run, 2 cores shared by load generator, proxies and backend\n",
        secs()
    );
    println!("| path | protocol | rounds | req/s (median) | req/s range | p50 ms | p99 ms | proxy CPU µs/req | proxy ctx switches/req | errors |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let p99 = if r.p99_ms.is_nan() {
            "-".to_string()
        } else {
            format!("{:.2}", r.p99_ms)
        };
        let mean = if r.proto.starts_with("HTTP/2") {
            " (mean)"
        } else {
            ""
        };
        let or_dash = |x: f64, digits: usize| {
            if x.is_nan() {
                "-".to_string()
            } else {
                format!("{x:.digits$}")
            }
        };
        let (cpu, ctx) = (or_dash(r.cpu_us, 1), or_dash(r.ctx_sw, 2));
        println!(
            "| {} | {} | {} | {:.0} | {:.0}–{:.0} | {:.2}{mean} | {p99} | {cpu} | {ctx} | {} |",
            r.path, r.proto, r.rounds, r.rps, r.rps_min, r.rps_max, r.p50_ms, r.errors
        );
    }
    println!();
    let mut race_rows = Vec::new();
    for proto in [H1, H2] {
        let each = race::ratios(&samples, proto, OURS, ENVOY_WP);
        let each_text: Vec<String> = each.iter().map(|x| format!("{x:.2}x")).collect();
        let median = race::median(each.iter().copied());
        println!(
            "{proto}: ours / Envoy as waypoint, round by round: {}; median {median:.2}x (target >= 1.50x)",
            each_text.join(", ")
        );
        let row = |path| rows.iter().find(|r| r.path == path && r.proto == proto);
        let cpu = |path| row(path).map_or(f64::NAN, |r| r.cpu_us);
        let ctx = |path| row(path).map_or(f64::NAN, |r| r.ctx_sw);
        let cpu_ratio = cpu(ENVOY_WP) / cpu(OURS);
        println!(
            "{proto}: CPU per request, Envoy as waypoint / ours (medians): {:.1} / {:.1} µs = {cpu_ratio:.2}x; context switches per request {:.2} / {:.2}",
            cpu(ENVOY_WP),
            cpu(OURS),
            ctx(ENVOY_WP),
            ctx(OURS)
        );
        race_rows.push(
            report::Row::new("waypoint_race")
                .text("protocol", proto)
                .num("rounds", each.len() as f64)
                .num("ratio_median", median)
                .num("ratio_min", each.iter().copied().fold(f64::NAN, f64::min))
                .num("ratio_max", each.iter().copied().fold(f64::NAN, f64::max))
                .num("cpu_ratio", cpu_ratio),
        );
    }
    let hwm = [
        (OURS, status_mib(&m.pod_ns("waypoint"), "waypoint", "VmHWM")),
        (
            ENVOY_WP,
            status_mib(&m.pod_ns(envoy_waypoint::POD), "envoy", "VmHWM"),
        ),
        (PLAIN, status_mib(&m.pod_ns("envoy"), "envoy", "VmHWM")),
    ];
    println!(
        "\npeak RSS: waypoint {:.1} MiB, Envoy as waypoint {:.1} MiB, plain Envoy {:.1} MiB",
        hwm[0].1, hwm[1].1, hwm[2].1
    );
    println!("Envoy waypoint counters:\n{}", envoy_counts.trim_end());
    for r in &rows {
        let peak = hwm
            .iter()
            .find(|(p, _)| *p == r.path)
            .map_or(f64::NAN, |h| h.1);
        report::Row::new("waypoint")
            .text("path", r.path)
            .text("protocol", r.proto)
            .num("secs", secs() as f64)
            .num("rounds", r.rounds as f64)
            .num("rps", r.rps)
            .num("rps_min", r.rps_min)
            .num("rps_max", r.rps_max)
            .num(
                if r.proto.starts_with("HTTP/2") {
                    "mean_ms"
                } else {
                    "p50_ms"
                },
                r.p50_ms,
            )
            .num("p99_ms", r.p99_ms)
            .num("errors", r.errors)
            .num("peak_rss_mib", peak)
            .num("proxy_cpu_us_per_req", r.cpu_us)
            .num("proxy_ctx_switches_per_req", r.ctx_sw)
            .emit();
    }
    for r in race_rows {
        r.emit();
    }
    if std::env::var("BENCH_STREAMING").as_deref() != Ok("0") {
        // Each proxy's pod and process are named alike.
        let cases = streaming::run(&m, |proxy| status_mib(&m.pod_ns(proxy), proxy, "VmHWM"));
        streaming::print(&cases);
    }
}
