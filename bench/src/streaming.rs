//! The waypoint bench's streaming cases, beside Envoy doing the same: a
//! large upload (BENCH_UPLOAD_MIB, default 256) into a sink that reads it in
//! 64 KiB pieces and checksums it, and a gRPC bidirectional stream of
//! ping-pong messages (BENCH_GRPC_MSGS, default 2000: each sent only after
//! the previous reply, so it measures per-message latency through the
//! proxy). Peers are the waypoint tests' Python ones. Each proxy's peak RSS
//! is read before and after: a proxy that held the body would grow by it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testbed::Mesh;

/// The services the cases use (appended to the bench's config): through
/// our waypoint, and to the Envoy pod (L4 through ztunnel, Envoy routes).
pub const YAML: &str = "---
apiVersion: v1
kind: Service
metadata: {name: upload, namespace: app, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.13, selector: {app: backend}, ports: [{name: http, port: 80, targetPort: 8081}]}
---
apiVersion: v1
kind: Service
metadata: {name: upload-envoy, namespace: app}
spec: {clusterIP: 10.96.0.14, selector: {app: envoy}, ports: [{name: http, port: 80, targetPort: 8081}]}
---
apiVersion: v1
kind: Service
metadata: {name: grpc, namespace: app, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.15, selector: {app: backend}, ports: [{name: grpc, port: 9090, targetPort: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: grpc-envoy, namespace: app}
spec: {clusterIP: 10.96.0.16, selector: {app: envoy}, ports: [{name: grpc, port: 9090, targetPort: 9090}]}
";

const PEERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../waypoint/tests/peers");

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn sh_in(m: &Mesh, pod: &str, cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("ip netns exec {} {cmd}", m.pod_ns(pod)))
        .output()
        .expect("sh");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Starts a Python peer in `pod` and waits until it listens on `port`.
fn peer(m: &Mesh, pod: &str, args: &str, port: u16) -> Child {
    let log = std::fs::File::create(m.dir.join(format!("peer-{port}.log"))).unwrap();
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec ip netns exec {} python3 {PEERS}/{args}",
            m.pod_ns(pod)
        ))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("python3 peer");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sh_in(m, pod, "ss -ltnH").contains(&format!(":{port} ")) {
        assert!(Instant::now() < deadline, "peer {args} never listened");
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

pub struct Case {
    pub name: String,
    pub proxy: &'static str,
    /// MiB/s for the upload, round trips/s for the stream.
    pub rate: f64,
    pub unit: &'static str,
    pub hwm_before: f64,
    pub hwm_after: f64,
}

/// Runs both cases through both proxies; `hwm` reads (waypoint, Envoy)
/// peak RSS in MiB.
pub fn run(m: &Mesh, hwm: impl Fn(&str) -> f64) -> Vec<Case> {
    let peers = [
        peer(m, "backend", "upload_server.py 8081", 8081),
        peer(m, "backend", "grpc_echo.py server 9090", 9090),
    ];
    let mib = env_or("BENCH_UPLOAD_MIB", 256);
    let msgs = env_or("BENCH_GRPC_MSGS", 2000);
    let file = m.dir.join("upload.bin");
    sh_in(
        m,
        "client",
        &format!("head -c {}M /dev/urandom > {}", mib, file.display()),
    );
    let sum = sh_in(m, "client", &format!("sha256sum {}", file.display()));
    let sum = sum.split_whitespace().next().unwrap_or("").to_string();
    let mut cases = Vec::new();
    for (proxy, upload, grpc) in [
        ("waypoint", "10.96.0.13", "10.96.0.15:9090"),
        ("envoy", "10.96.0.14", "10.96.0.16:9090"),
    ] {
        let before = hwm(proxy);
        let started = Instant::now();
        let out = sh_in(
            m,
            "client",
            &format!(
                "curl -s -m 600 -T {} -X POST http://{upload}/up",
                file.display()
            ),
        );
        let took = started.elapsed().as_secs_f64();
        assert_eq!(
            out,
            format!("{} {sum}", mib << 20),
            "{proxy}: the upload did not arrive whole"
        );
        cases.push(Case {
            name: format!("upload {mib} MiB (HTTP/1.1, checksummed)"),
            proxy,
            rate: mib as f64 / took,
            unit: "MiB/s",
            hwm_before: before,
            hwm_after: hwm(proxy),
        });

        let before = hwm(proxy);
        let started = Instant::now();
        let out = sh_in(
            m,
            "client",
            &format!("python3 {PEERS}/grpc_echo.py client {grpc} {msgs}"),
        );
        let took = started.elapsed().as_secs_f64();
        assert!(
            out.starts_with(&format!("chat {msgs} trailer=yes")),
            "{proxy}: the gRPC stream failed: {out}"
        );
        cases.push(Case {
            name: format!("gRPC bidi, {msgs} ping-pong messages"),
            proxy,
            rate: msgs as f64 / took,
            unit: "msgs/s",
            hwm_before: before,
            hwm_after: hwm(proxy),
        });
    }
    for mut p in peers {
        let _ = p.kill();
        let _ = p.wait();
    }
    cases
}

/// The table, then each case as a JSON line (`report`).
pub fn print(cases: &[Case]) {
    println!("\n| case | proxy | rate | peak RSS before → after (MiB) |");
    println!("|---|---|---:|---:|");
    for c in cases {
        println!(
            "| {} | {} | {:.0} {} | {:.1} → {:.1} |",
            c.name, c.proxy, c.rate, c.unit, c.hwm_before, c.hwm_after
        );
    }
    for c in cases {
        crate::report::Row::new("waypoint-streaming")
            .text("case", &c.name)
            .text("proxy", c.proxy)
            .num("rate", c.rate)
            .text("unit", c.unit)
            .num("peak_rss_before_mib", c.hwm_before)
            .num("peak_rss_after_mib", c.hwm_after)
            .emit();
    }
}
