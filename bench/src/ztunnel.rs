//! ztunnel vs direct, pod to pod across two nodes, in one run: iperf3 single
//! and 4-stream throughput, sockperf 64-byte ping-pong latency, new
//! connections per second with a 1-byte echo, ztunnel's RSS, and what
//! thousands of idle connections cost each node. Prints a table. Bounded:
//! every measurement has a fixed duration.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testbed::{in_ns, Mesh};

mod report;

fn secs() -> u64 {
    std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8)
}

fn yaml() -> String {
    let pod = |ns: &str, name: &str, node: &str, ip: &str| {
        format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{serviceAccountName: {name}, nodeName: {node}}}\nstatus: {{podIP: {ip}}}\n")
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: mesh, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: direct}}\n{}{}{}{}",
        pod("mesh", "client", "node1", "10.244.1.10"),
        pod("mesh", "server", "node2", "10.244.2.10"),
        pod("direct", "dclient", "node1", "10.244.1.20"),
        pod("direct", "dserver", "node2", "10.244.2.20"),
    )
}

fn run_in(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run");
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn iperf(m: &Mesh, client: &str, server: &str, streams: u32) -> f64 {
    let sns = m.pod_ns(server);
    let mut srv = Command::new("ip")
        .args(["netns", "exec", &sns, "iperf3", "-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = run_in(
        &m.pod_ns(client),
        &[
            "iperf3",
            "-c",
            &m.ip(server),
            "-p",
            "5201",
            "-t",
            &secs().to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ],
    );
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

/// (p50, p99) in microseconds of a 64-byte TCP ping-pong.
fn sockperf(m: &Mesh, client: &str, server: &str) -> (f64, f64) {
    let sns = m.pod_ns(server);
    let ip = m.ip(server);
    let mut srv = Command::new("ip")
        .args([
            "netns", "exec", &sns, "sockperf", "server", "--tcp", "-i", &ip, "-p", "11111",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = run_in(
        &m.pod_ns(client),
        &[
            "sockperf",
            "ping-pong",
            "--tcp",
            "-i",
            &ip,
            "-p",
            "11111",
            "-t",
            &secs().to_string(),
            "-m",
            "64",
        ],
    );
    let _ = srv.kill();
    let _ = srv.wait();
    let pct = |p: &str| {
        out.lines()
            .find(|l| l.contains(&format!("percentile {p}")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN)
    };
    (pct("50.000"), pct("99.000"))
}

/// New connections per second, each carrying a 1-byte echo, 4 in parallel.
fn conn_rate(m: &Mesh, client: &str, server: &str) -> f64 {
    let addr: SocketAddr = format!("{}:7000", m.ip(server)).parse().unwrap();
    let ns = m.pod_ns(client);
    let deadline = Instant::now() + Duration::from_secs(secs());
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let ns = ns.clone();
            std::thread::spawn(move || {
                in_ns(&ns, move || {
                    let mut n = 0u64;
                    while Instant::now() < deadline && n < 200_000 {
                        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                        else {
                            continue;
                        };
                        let _ = s.set_nodelay(true);
                        let mut b = [7u8];
                        if s.write_all(&b).is_ok() && s.read_exact(&mut b).is_ok() {
                            n += 1;
                        }
                    }
                    n
                })
            })
        })
        .collect();
    let total: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    total as f64 / secs() as f64
}

fn rss_mb(pid: u32, field: &str) -> f64 {
    testbed::proc_status_kb(pid, field).map_or(f64::NAN, |kb| kb as f64 / 1024.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // Thousands of held connections: both ztunnels (which inherit it) and
    // this process (client sockets and the echo server) need the fds.
    raise_nofile();
    let zt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/release/ztunnel".into());
    let mut m = Mesh::new("bench", &zt);
    m.extra_args = std::env::var("ZTUNNEL_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    m.pod("client", "mesh", "client", "10.244.1.10", "node1", true);
    m.pod("server", "mesh", "server", "10.244.2.10", "node2", true);
    m.pod(
        "dclient",
        "direct",
        "dclient",
        "10.244.1.20",
        "node1",
        false,
    );
    m.pod(
        "dserver",
        "direct",
        "dserver",
        "10.244.2.20",
        "node2",
        false,
    );
    m.write_config(&yaml());
    let ca = m.dir.join("ca");
    m.start_node("node1", &ca).await;
    m.start_node("node2", &ca).await;
    m.echo_server("server", 7000);
    m.echo_server("dserver", 7000);
    let pids = [m.nodes["node1"].pid(), m.nodes["node2"].pid()];
    // Warm the pooled HBONE connection and certificates, then measure idle.
    let _ = conn_rate_once(&m);
    std::thread::sleep(Duration::from_secs(1));
    let idle = pids.iter().map(|p| rss_mb(*p, "VmRSS")).fold(0.0, f64::max);
    // What idle RSS is made of: the heap and stacks, or the binary's pages.
    for (node, p) in ["node1", "node2"].iter().zip(pids) {
        eprintln!(
            "idle RSS {node}: anon {:.1} MB, file {:.1} MB",
            rss_mb(p, "RssAnon"),
            rss_mb(p, "RssFile")
        );
    }

    eprintln!(
        "measuring: {}s per run; two ztunnels, iperf3/sockperf client and server share 2 cores",
        secs()
    );
    if std::env::var("BENCH_ONLY_IDLE").is_ok() {
        let held = idle_conns(&m, pids).await;
        held.print();
        held.emit();
        return;
    }
    if std::env::var("BENCH_ONLY_CPS").is_ok() {
        let cps = (
            conn_rate(&m, "dclient", "dserver"),
            conn_rate(&m, "client", "server"),
        );
        println!("conn/s: direct {:.0} ztunnel {:.0}", cps.0, cps.1);
        return;
    }
    let t1 = (
        iperf(&m, "dclient", "dserver", 1),
        iperf(&m, "client", "server", 1),
    );
    if std::env::var("BENCH_ONLY_IPERF").is_ok() {
        println!(
            "1 stream: direct {:.2} ztunnel {:.2} ({:.2}x)",
            t1.0,
            t1.1,
            t1.1 / t1.0
        );
        return;
    }
    let t4 = (
        iperf(&m, "dclient", "dserver", 4),
        iperf(&m, "client", "server", 4),
    );
    let peak = pids.iter().map(|p| rss_mb(*p, "VmHWM")).fold(0.0, f64::max);
    let lat = (
        sockperf(&m, "dclient", "dserver"),
        sockperf(&m, "client", "server"),
    );
    let cps = (
        conn_rate(&m, "dclient", "dserver"),
        conn_rate(&m, "client", "server"),
    );
    let held = idle_conns(&m, pids).await;

    println!();
    println!("| measure (pod -> pod across nodes)      | direct     | ztunnel    | ztunnel vs direct | target          |");
    println!("|----------------------------------------|------------|------------|-------------------|-----------------|");
    println!("| iperf3 1 stream (Gbit/s)               | {:>10.2} | {:>10.2} | {:>16.2}x | >= 0.43x        |", t1.0, t1.1, t1.1 / t1.0);
    println!("| iperf3 4 streams (Gbit/s)              | {:>10.2} | {:>10.2} | {:>16.2}x |                 |", t4.0, t4.1, t4.1 / t4.0);
    println!("| 64 B ping-pong p50 (us)                | {:>10.1} | {:>10.1} | {:>+14.1} us | <= +100 us      |", lat.0 .0, lat.1 .0, lat.1 .0 - lat.0 .0);
    println!("| 64 B ping-pong p99 (us)                | {:>10.1} | {:>10.1} | {:>+14.1} us |                 |", lat.0 .1, lat.1 .1, lat.1 .1 - lat.0 .1);
    println!("| new connections/s (1-byte echo, 4 par) | {:>10.0} | {:>10.0} | {:>16.2}x | >= 1500/s       |", cps.0, cps.1, cps.1 / cps.0);
    println!("| ztunnel RSS idle (MB, max of 2 nodes)  |            | {:>10.1} |                   | <= 12 MB        |", idle);
    println!("| ztunnel RSS peak at 4 streams (MB)     |            | {:>10.1} |                   | <= 26 MB        |", peak);
    let row = |measure: &str, unit: &str, direct: f64, ztunnel: f64| {
        report::Row::new("ztunnel")
            .text("measure", measure)
            .text("unit", unit)
            .num("secs", secs() as f64)
            .num("direct", direct)
            .num("ztunnel", ztunnel)
            .emit()
    };
    row("iperf3 1 stream", "Gbit/s", t1.0, t1.1);
    row("iperf3 4 streams", "Gbit/s", t4.0, t4.1);
    row("64 B ping-pong p50", "us", lat.0 .0, lat.1 .0);
    row("64 B ping-pong p99", "us", lat.0 .1, lat.1 .1);
    row("new connections/s", "1/s", cps.0, cps.1);
    row("ztunnel RSS idle", "MB", f64::NAN, idle);
    row("ztunnel RSS peak at 4 streams", "MB", f64::NAN, peak);
    println!();
    held.print();
    held.emit();
}

fn conn_rate_once(m: &Mesh) -> bool {
    m.connect("client", "10.244.2.10:7000")
        .map(|mut s| s.write_all(b"x").is_ok() && s.read_exact(&mut [0u8]).is_ok())
        .unwrap_or(false)
}

fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// RSS of both ztunnels (client's node, server's node) around holding many
/// idle connections through the mesh.
struct Idle {
    n: usize,
    opened: usize,
    before: [f64; 2],
    holding: [f64; 2],
    after: [f64; 2],
}

impl Idle {
    fn print(&self) {
        let kb = |i: usize| (self.holding[i] - self.before[i]) * 1024.0 / self.opened.max(1) as f64;
        println!(
            "| {} idle connections ({} held)    | before MB | holding MB | after close MB | per conn KB | target     |",
            self.n, self.opened
        );
        println!("|----------------------------------|-----------|------------|----------------|-------------|------------|");
        for (i, node) in ["client's node (node1)", "server's node (node2)"]
            .iter()
            .enumerate()
        {
            println!(
                "| {node:<32} | {:>9.1} | {:>10.1} | {:>14.1} | {:>11.1} | <= 4 KB    |",
                self.before[i],
                self.holding[i],
                self.after[i],
                kb(i)
            );
        }
    }

    fn emit(&self) {
        let kb = |i: usize| (self.holding[i] - self.before[i]) * 1024.0 / self.opened.max(1) as f64;
        for (i, node) in ["node1", "node2"].iter().enumerate() {
            report::Row::new("ztunnel")
                .text("measure", "idle connections")
                .text("node", node)
                .num("connections", self.n as f64)
                .num("held", self.opened as f64)
                .num("before_mb", self.before[i])
                .num("holding_mb", self.holding[i])
                .num("after_close_mb", self.after[i])
                .num("per_conn_kb", kb(i))
                .emit();
        }
    }
}

/// Port of the idle row's echo server in the server pod (the shared echo
/// server spends a thread per connection).
const IDLE_PORT: u16 = 7001;

/// BENCH_IDLE_CONNS (4,000) connections from the client pod to the server
/// pod, each carrying one echoed byte end to end and then held idle: RSS of
/// both ztunnels before, while holding (settled), and a few seconds after
/// all are closed. Per connection: (holding - before) / held.
async fn idle_conns(m: &Mesh, pids: [u32; 2]) -> Idle {
    let n: usize = std::env::var("BENCH_IDLE_CONNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4000);
    let std_l = in_ns(&m.pod_ns("server"), || {
        std::net::TcpListener::bind(("0.0.0.0", IDLE_PORT)).expect("bind idle echo port")
    });
    std_l.set_nonblocking(true).unwrap();
    let l = tokio::net::TcpListener::from_std(std_l).unwrap();
    let echo = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut b = [0u8; 64];
                while let Ok(k) = s.read(&mut b).await {
                    if k == 0 || s.write_all(&b[..k]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let rss = || pids.map(|p| rss_mb(p, "VmRSS"));
    let before = rss();
    let addr: SocketAddr = format!("{}:{IDLE_PORT}", m.ip("server")).parse().unwrap();
    let ns = m.pod_ns("client");
    // A few openers in parallel, each in the client pod's netns.
    let per = n.div_ceil(4);
    let openers: Vec<_> = (0..4)
        .map(|i| {
            let ns = ns.clone();
            let count = per.min(n.saturating_sub(i * per));
            tokio::task::spawn_blocking(move || {
                in_ns(&ns, move || {
                    let mut held = Vec::with_capacity(count);
                    for _ in 0..count {
                        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                        else {
                            continue;
                        };
                        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                        let mut b = [7u8];
                        if s.write_all(&b).is_ok() && s.read_exact(&mut b).is_ok() {
                            held.push(s);
                        }
                    }
                    held
                })
            })
        })
        .collect();
    let mut held = Vec::with_capacity(n);
    for o in openers {
        held.extend(o.await.unwrap());
    }
    let opened = held.len();
    if opened < n {
        eprintln!("idle row: only {opened} of {n} connections carried their byte");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let holding = rss();
    drop(held);
    // Long enough for every close to cross both nodes and for ztunnel to
    // hand freed memory back (BENCH_IDLE_AFTER_SECS: allocators that decay
    // freed pages over time need longer to show it).
    let after_secs = std::env::var("BENCH_IDLE_AFTER_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    tokio::time::sleep(Duration::from_secs(after_secs)).await;
    let after = rss();
    echo.abort();
    Idle {
        n,
        opened,
        before,
        holding,
        after,
    }
}
